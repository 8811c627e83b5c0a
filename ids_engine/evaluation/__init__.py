"""Plan evaluation: DVHs and DVH metrics, isodose positions."""

from ._dvh import DVH, DeviceDVH, dvh, dvh_metrics
from ._isodose import beside_shift_mm, drag_landing_mm, level_crossing_mm

__all__ = ["DVH", "DeviceDVH", "beside_shift_mm", "drag_landing_mm", "dvh", "dvh_metrics", "level_crossing_mm"]
