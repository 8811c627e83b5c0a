"""Dose-volume histograms and DVH metrics (exact: every voxel of the structure counts)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DVH", "dvh", "dvh_metrics"]


@dataclass(frozen=True, eq=False)
class DVH:
    """A cumulative DVH of one structure.

    dose_gy : (n,) bin edges from 0 upwards, Gy.
    volume_fraction : (n,) fraction of the structure receiving at least ``dose_gy``.
    volume_cc : the structure's volume.
    """

    name: str
    dose_gy: np.ndarray
    volume_fraction: np.ndarray
    volume_cc: float


def dvh(name: str, dose_gy: np.ndarray, mask: np.ndarray, voxel_volume_cc: float, bin_gy: float = 0.1) -> DVH:
    """Exact cumulative DVH of the voxels in ``mask`` (host arrays, any matching shape)."""
    d = np.asarray(dose_gy, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if d.size == 0:
        raise ValueError(f"DVH of {name!r}: the structure is empty")
    edges = np.arange(0.0, d.max() + 2 * bin_gy, bin_gy)
    counts = np.histogram(d, bins=np.append(edges, np.inf))[0]
    cum = counts[::-1].cumsum()[::-1] / d.size
    return DVH(name, edges, cum, d.size * voxel_volume_cc)


def dvh_metrics(dose_gy: np.ndarray, mask: np.ndarray, prescription_gy: float | None = None) -> dict:
    """DVH metrics of one structure from the voxel doses (exact order statistics).

    Returns mean, min, max, D98, D95, D50, D2 (Gy: the dose that at least that percentage
    of the volume receives) and, with a prescription, V95 and V107 (% of the volume at or
    above 95% / 107% of it).
    """
    d = np.sort(np.asarray(dose_gy, dtype=np.float64)[np.asarray(mask, dtype=bool)])
    if d.size == 0:
        raise ValueError("dvh_metrics: the structure is empty")

    def dx(pct: float) -> float:
        # Dose received by at least pct % of the volume: the (100 - pct) percentile from below.
        k = int(np.floor((1.0 - pct / 100.0) * d.size))
        return float(d[min(max(k, 0), d.size - 1)])

    out = {
        "mean_gy": float(d.mean()),
        "min_gy": float(d[0]),
        "max_gy": float(d[-1]),
        "D98_gy": dx(98),
        "D95_gy": dx(95),
        "D50_gy": dx(50),
        "D2_gy": dx(2),
    }
    if prescription_gy:
        out["V95_pct"] = float(100.0 * np.mean(d >= 0.95 * prescription_gy))
        out["V107_pct"] = float(100.0 * np.mean(d >= 1.07 * prescription_gy))
    return out
