"""Plan evaluation: DVHs and DVH metrics."""

from ._dvh import DVH, dvh, dvh_metrics

__all__ = ["DVH", "dvh", "dvh_metrics"]
