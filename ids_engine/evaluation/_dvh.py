"""Dose-volume histograms and DVH metrics (exact: every voxel of the structure counts)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DVH", "DeviceDVH", "dvh", "dvh_metrics"]


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


def dvh(name: str, dose_gy: np.ndarray, mask: np.ndarray, voxel_volume_cc: float, bin_gy: float = 0.1,
        *, weights: np.ndarray | None = None) -> DVH:
    """Exact cumulative DVH of the voxels in ``mask`` (host arrays, any matching shape).

    ``weights`` (same shape, >= 0) gives each voxel (or sample point) its share of
    ``voxel_volume_cc``, e.g. the fractional occupancy of voxels at the structure's edge
    (:func:`ids_engine.evaluation.exact_dvh`); without it every voxel counts fully.
    """
    m = np.asarray(mask, dtype=bool)
    d = np.asarray(dose_gy, dtype=np.float64)[m]
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[m]
    total = float(d.size) if w is None else float(w.sum())
    if d.size == 0 or not total > 0:
        raise ValueError(f"DVH of {name!r}: the structure is empty")
    edges = np.arange(0.0, d.max() + 2 * bin_gy, bin_gy)
    counts = np.histogram(d, bins=np.append(edges, np.inf), weights=w)[0]
    cum = counts[::-1].cumsum()[::-1] / total
    return DVH(name, edges, cum, total * voxel_volume_cc)


class DeviceDVH:
    """Cumulative DVHs of several structures computed where the dose lives (NumPy or CuPy).

    The structures' voxel indices go to the device once; each :meth:`compute` is a gather, a
    binning and one scatter-add for all structures together, and one copy of the bin counts
    (structures x bins) to the host, never the dose cube. The bins are fixed,
    ``bin_gy`` wide from 0 to ``max_gy``, with doses above counted in the last bin (whose
    edge then reads ``max_gy``); :func:`dvh` gives the exact curve up to the same binning.

    Parameters
    ----------
    structures : ``(name, mask)`` pairs, masks bool (z, y, x) on the CT grid (empty ones skipped).
    voxel_volume_cc : volume of one voxel.
    max_gy : upper end of the bins (e.g. twice the prescription).
    bin_gy : bin width.
    """

    def __init__(self, structures, voxel_volume_cc: float, max_gy: float, bin_gy: float = 0.1) -> None:
        from ids_engine import backend

        xp = backend.xp()
        self.xp = xp
        self.bin_gy = float(bin_gy)
        self.n_bins = int(np.ceil(max_gy / bin_gy)) + 1
        self.names, self.sizes, idx, sid = [], [], [], []
        for name, mask in structures:
            flat = np.flatnonzero(np.asarray(mask, bool).ravel())
            if flat.size == 0:
                continue
            sid.append(np.full(flat.size, len(self.names), np.int32))
            idx.append(flat.astype(np.int32))
            self.names.append(name)
            self.sizes.append(int(flat.size))
        self.voxel_volume_cc = float(voxel_volume_cc)
        host_idx = np.concatenate(idx) if idx else np.zeros(0, np.int32)
        host_off = (np.concatenate(sid) * self.n_bins).astype(np.int32) if sid else np.zeros(0, np.int32)
        self._index = host_idx if xp is np else xp.asarray(host_idx)
        self._offset = host_off if xp is np else xp.asarray(host_off)

    def compute(self, dose_flat) -> tuple[DVH, ...]:
        """The DVHs of the dose (flat (N,) float32 on the active backend's device)."""
        from ids_engine import backend
        from ids_engine.kernels.scatter import scatter_add

        xp = self.xp
        nb = self.n_bins
        counts = xp.zeros(len(self.names) * nb, dtype=xp.float32)
        if self.names:
            b = xp.minimum((dose_flat[self._index] * np.float32(1.0 / self.bin_gy)).astype(xp.int32), nb - 1)
            scatter_add(counts, b + self._offset, xp.ones(b.shape[0], dtype=xp.float32))
        host = backend.asnumpy(counts).astype(np.float64).reshape(len(self.names), nb)
        edges = np.arange(nb) * self.bin_gy
        out = []
        for k, name in enumerate(self.names):
            cum = host[k, ::-1].cumsum()[::-1] / self.sizes[k]
            out.append(DVH(name, edges, cum, self.sizes[k] * self.voxel_volume_cc))
        return tuple(out)


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
