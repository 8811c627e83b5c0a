"""The gamma index (Low et al., Med. Phys. 25 (1998) 656) on regular grids.

For each reference point ``r`` (dose above the low-dose cutoff) the evaluated dose is searched
on spheres of growing radius ``d`` around ``r``, interpolated (multilinear) at points spaced
``dta_mm / interp_fraction`` apart on each sphere (Wendling et al., Med. Phys. 34 (2007)
1647: the evaluated distribution interpolated to a tenth of the DTA, the search stopped as
soon as no larger distance can lower gamma):

    gamma(r) = min_d sqrt( (d / DTA)^2 + (min_{|x - r| = d} |D_e(x) - D_r(r)| / dD)^2 )

with ``dD = dose_percent / 100 * normalisation`` (global: the reference maximum unless given)
or ``dose_percent / 100 * D_r(r)`` (local). A point's search ends once ``d / DTA`` reaches
its current gamma (or ``max_gamma``). This is the search pymedphys' ``gamma`` runs; our
sphere points are a Fibonacci lattice (pymedphys uses its own shells), so the two agree to
about one search step (``1 / interp_fraction`` in gamma units) per point.

Grids: any regular grids, different spacing per axis, given by their axes (mm, one
increasing 1-D array per array dimension, e.g. (z, y, x) for a (z, y, x) dose). Evaluated
points outside the evaluated grid never match.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["gamma_index", "gamma_pass_rate", "gamma_summary", "grid_axes_mm"]


def grid_axes_mm(grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, y, x) voxel-centre coordinates (mm) of a :class:`~ids_engine.model.Grid`, for
    :func:`gamma_index` on dose cubes stored (z, y, x)."""
    ox, oy, oz = grid.origin_mm_xyz
    sz, sy, sx = grid.spacing_mm_zyx
    nz, ny, nx = grid.shape_zyx
    return (oz + sz * np.arange(nz), oy + sy * np.arange(ny), ox + sx * np.arange(nx))


def _check_axes(axes, dose: np.ndarray, name: str) -> list[np.ndarray]:
    axes = [np.asarray(a, dtype=np.float64) for a in axes]
    if len(axes) != dose.ndim:
        raise ValueError(f"gamma: {name} has {dose.ndim} dimensions but {len(axes)} axes")
    for i, (a, n) in enumerate(zip(axes, dose.shape)):
        if a.ndim != 1 or a.size != n:
            raise ValueError(f"gamma: {name} axis {i} has {a.size} coordinates for {n} points")
        if n > 1 and not np.all(np.diff(a) > 0):
            raise ValueError(f"gamma: {name} axis {i} must be strictly increasing")
    return axes


def _shell(radius: float, ndim: int, step: float) -> np.ndarray:
    """(k, ndim) points on the sphere of ``radius`` about 0, about ``step`` apart."""
    if radius == 0:
        return np.zeros((1, ndim))
    if ndim == 1:
        return np.array([[-radius], [radius]])
    if ndim == 2:
        k = max(4, int(math.ceil(2 * math.pi * radius / step)))
        t = 2 * math.pi * np.arange(k) / k
        return radius * np.stack([np.cos(t), np.sin(t)], axis=1)
    k = max(6, int(math.ceil(4 * math.pi * radius**2 / step**2)))
    i = np.arange(k) + 0.5
    z = 1 - 2 * i / k
    phi = math.pi * (3 - math.sqrt(5)) * i  # golden angle
    r = np.sqrt(1 - z**2)
    return radius * np.stack([z, r * np.cos(phi), r * np.sin(phi)], axis=1)


def _interp(dose: np.ndarray, axes: list[np.ndarray], pts: np.ndarray) -> np.ndarray:
    """Multilinear interpolation of ``dose`` at (m, ndim) points (mm); inf outside the grid."""
    idx = np.empty((dose.ndim, pts.shape[0]))
    outside = np.zeros(pts.shape[0], bool)
    for d, a in enumerate(axes):
        x = pts[:, d]
        if a.size == 1:
            outside |= np.abs(x - a[0]) > 1e-9
            idx[d] = 0.0
            continue
        outside |= (x < a[0] - 1e-9) | (x > a[-1] + 1e-9)
        da = np.diff(a)
        if np.allclose(da, da[0], rtol=1e-9, atol=0):  # regular axis: no search needed
            idx[d] = (x - a[0]) / da[0]
        else:
            idx[d] = np.interp(x, a, np.arange(a.size, dtype=np.float64))
    out = ndimage.map_coordinates(dose, idx, order=1, mode="nearest")
    out[outside] = np.inf
    return out


def gamma_index(axes_reference: Sequence, dose_reference, axes_evaluation: Sequence, dose_evaluation, *,
                dose_percent: float, dta_mm: float, local: bool = False, cutoff_percent: float = 10.0,
                global_normalisation: float | None = None, interp_fraction: int = 10,
                max_gamma: float | None = None, max_points: int | None = None, seed: int = 0,
                chunk_elements: int = 4_000_000) -> np.ndarray:
    """Gamma of ``dose_evaluation`` against ``dose_reference`` at the reference points.

    Parameters
    ----------
    axes_reference, axes_evaluation : one increasing 1-D coordinate array (mm) per dimension
        of the doses (for (z, y, x) cubes: :func:`grid_axes_mm`); the grids may differ and
        have different spacing per axis.
    dose_reference, dose_evaluation : float arrays (Gy or any one unit).
    dose_percent : dose-difference criterion, % (of the normalisation, or of the local
        reference dose when ``local``).
    dta_mm : distance-to-agreement criterion, mm.
    local : local instead of global gamma.
    cutoff_percent : reference points below this % of the normalisation are not evaluated.
    global_normalisation : the dose the percentages refer to (default: the reference maximum).
    interp_fraction : search step = ``dta_mm / interp_fraction``.
    max_gamma : stop searching at ``max_gamma * dta_mm`` (gamma capped there); None: no cap.
    max_points : evaluate at most this many reference points (a seeded random subset).
    seed : the subset's random seed.

    Returns
    -------
    Array of the reference's shape, float64: gamma, NaN where not evaluated.
    """
    ref = np.asarray(dose_reference, dtype=np.float64)
    ev = np.ascontiguousarray(dose_evaluation, dtype=np.float64)
    ax_r = _check_axes(axes_reference, ref, "dose_reference")
    ax_e = _check_axes(axes_evaluation, ev, "dose_evaluation")
    if ref.ndim != ev.ndim or ref.ndim not in (1, 2, 3):
        raise ValueError(f"gamma: 1-D to 3-D doses of the same dimension, got {ref.ndim}-D and {ev.ndim}-D")
    if not (dose_percent > 0 and dta_mm > 0):
        raise ValueError(f"gamma: dose_percent and dta_mm must be positive, got {dose_percent}, {dta_mm}")
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(ev))):
        raise ValueError("gamma: the doses must be finite")
    norm = float(ref.max()) if global_normalisation is None else float(global_normalisation)
    out = np.full(ref.shape, np.nan)
    if norm <= 0:
        return out
    cap = np.inf if max_gamma is None else float(max_gamma)
    flat = np.flatnonzero(ref.ravel() >= cutoff_percent / 100.0 * norm)
    if local:
        flat = flat[ref.ravel()[flat] > 0]
    if max_points is not None and flat.size > max_points:
        flat = np.sort(np.random.default_rng(seed).choice(flat, int(max_points), replace=False))
    if flat.size == 0:
        return out
    # Axes a single plane thick in both doses (e.g. a 2-D slice stored 3-D) are not searched.
    live = [d for d in range(ref.ndim)
            if not (ax_r[d].size == 1 and ax_e[d].size == 1 and abs(ax_r[d][0] - ax_e[d][0]) < 1e-9)]
    pos = np.stack([a[i] for a, i in zip(ax_r, np.unravel_index(flat, ref.shape))], axis=1)  # (n, ndim) mm
    d_ref = ref.ravel()[flat]
    tol = dose_percent / 100.0 * (d_ref if local else np.full_like(d_ref, norm))
    g2 = np.full(flat.size, np.inf)  # gamma squared so far
    active = np.arange(flat.size)
    step = dta_mm / interp_fraction
    # Beyond the diagonal of both grids' bounding box no sphere point lies in the evaluated grid.
    lo = np.minimum([a[0] for a in ax_r], [a[0] for a in ax_e])
    hi = np.maximum([a[-1] for a in ax_r], [a[-1] for a in ax_e])
    reach = min(cap * dta_mm, float(np.linalg.norm(hi - lo)) + step)
    distance = 0.0
    forced = dta_mm  # the DTA itself is always searched (as pymedphys does)
    while active.size and distance <= reach + 1e-12:
        shell = np.zeros((1, ref.ndim))
        if live:
            sub = _shell(distance, len(live), step)
            shell = np.zeros((sub.shape[0], ref.ndim))
            shell[:, live] = sub
        best = np.full(active.size, np.inf)
        per = max(1, chunk_elements // shell.shape[0])
        for s in range(0, active.size, per):
            a = active[s : s + per]
            pts = (pos[a][:, None, :] + shell[None, :, :]).reshape(-1, ref.ndim)
            de = _interp(ev, ax_e, pts).reshape(a.size, shell.shape[0])
            best[s : s + a.size] = np.min(np.abs(de - d_ref[a][:, None]), axis=1) / tol[a]
        g2[active] = np.minimum(g2[active], (distance / dta_mm) ** 2 + best**2)
        # A larger distance alone gives at least (distance / DTA)^2: those already below are done.
        active = active[g2[active] > (distance / dta_mm) ** 2]
        distance += max(step, distance / interp_fraction / cap)
        if forced is not None and distance >= forced:
            distance, forced = forced, None
    g = np.sqrt(g2)
    if np.isfinite(cap):
        g = np.minimum(g, cap)
    out.ravel()[flat] = g
    return out


def gamma_pass_rate(gamma: np.ndarray, threshold: float = 1.0) -> float:
    """% of the evaluated points (finite gamma) with gamma <= ``threshold``; NaN if none."""
    g = np.asarray(gamma)
    ok = np.isfinite(g)
    if not ok.any():
        return float("nan")
    return float(100.0 * np.count_nonzero(g[ok] <= threshold) / np.count_nonzero(ok))


def gamma_summary(gamma: np.ndarray) -> dict:
    """Pass rate (%), mean, 95th percentile and maximum of gamma, and the number of points."""
    g = np.asarray(gamma)
    v = g[np.isfinite(g)]
    if v.size == 0:
        return {"pass_rate_pct": float("nan"), "mean": float("nan"), "p95": float("nan"), "max": float("nan"), "points": 0}
    return {"pass_rate_pct": gamma_pass_rate(g), "mean": float(v.mean()), "p95": float(np.percentile(v, 95)),
            "max": float(v.max()), "points": int(v.size)}
