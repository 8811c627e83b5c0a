"""Where an isodose lies: level crossings along a line, for checking that drags land.

All positions are in CT voxel units (z, y, x); distances in mm. The dose is sampled by
trilinear interpolation between voxel centres (``scipy.ndimage.map_coordinates``, order 1).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["beside_shift_mm", "drag_landing_mm", "level_crossing_mm"]


def level_crossing_mm(dose_gy, spacing_mm_zyx, point_zyx, direction_zyx, level_gy: float,
                      reach_mm: float, step_mm: float = 0.2, near_mm: float = 0.0,
                      shape_zyx=None) -> float | None:
    """Signed position (mm along ``direction``) of the ``level_gy`` crossing nearest to ``point``
    (or to ``point + near_mm * direction``).

    The dose is sampled on ``point + t * direction`` for ``|t| <= reach_mm``; a crossing is
    where ``dose - level`` changes sign, located by linear interpolation between samples.
    Returns None when the level is not crossed within the reach. ``dose_gy`` is the cube, or a
    sampler ``dose_gy(points (n, 3) voxel units) -> (n,)`` trilinear dose (then ``shape_zyx``
    gives the grid), e.g. a session's dose read at a few voxels instead of the whole cube.
    """
    sp = np.asarray(spacing_mm_zyx, float)
    d = np.asarray(direction_zyx, float) * sp  # to mm
    n = float(np.linalg.norm(d))
    if n == 0:
        raise ValueError("level_crossing_mm: the direction is zero")
    d_vox = np.asarray(direction_zyx, float) / n  # voxel units per mm
    t = np.arange(-reach_mm, reach_mm + step_mm / 2, step_mm)
    pts = np.asarray(point_zyx, float)[:, None] + d_vox[:, None] * t[None, :]
    shape = np.asarray(shape_zyx if callable(dose_gy) else np.shape(dose_gy))
    inside = np.all((pts >= 0) & (pts <= shape[:, None] - 1), axis=0)
    if callable(dose_gy):
        vals = np.asarray(dose_gy(np.clip(pts, 0, shape[:, None] - 1).T), np.float64)
    else:
        vals = ndimage.map_coordinates(np.asarray(dose_gy, np.float64), pts, order=1, mode="nearest")
    f = vals - level_gy
    s = np.sign(f)
    idx = np.flatnonzero((s[:-1] * s[1:] <= 0) & (s[:-1] != s[1:]) & inside[:-1] & inside[1:])
    if idx.size == 0:
        return None
    f0, f1 = f[idx], f[idx + 1]
    frac = np.where(f1 != f0, f0 / (f0 - f1), 0.5)
    cross = t[idx] + frac * step_mm
    return float(cross[np.argmin(np.abs(cross - near_mm))])


def drag_landing_mm(dose_gy, spacing_mm_zyx, start_zyx, end_zyx, level_gy: float,
                    reach_mm: float = 10.0, signed: bool = False, shape_zyx=None) -> float | None:
    """Distance (mm) from the drag end to where the level now crosses the drag line (nearest
    crossing); ``signed``: negative when the level stopped short of the end, positive past it.
    ``dose_gy``: the cube or a sampler (see :func:`level_crossing_mm`)."""
    a = np.asarray(start_zyx, float)
    b = np.asarray(end_zyx, float)
    c = level_crossing_mm(dose_gy, spacing_mm_zyx, b, b - a, level_gy, reach_mm, shape_zyx=shape_zyx)
    return None if c is None else (c if signed else abs(c))


def _perpendiculars(direction_mm: np.ndarray, plane_axis: int | None) -> list[np.ndarray]:
    d = direction_mm / np.linalg.norm(direction_mm)
    if plane_axis is not None:
        normal = np.zeros(3)
        normal[plane_axis] = 1.0
        p = np.cross(normal, d)
        p /= np.linalg.norm(p)
        return [p, -p]
    helper = np.eye(3)[int(np.argmin(np.abs(d)))]
    p1 = np.cross(d, helper)
    p1 /= np.linalg.norm(p1)
    p2 = np.cross(d, p1)
    return [p1, -p1, p2, -p2]


def beside_shift_mm(before_gy: np.ndarray, after_gy: np.ndarray, spacing_mm_zyx, start_zyx, end_zyx, level_gy: float,
                    offset_mm: float = 10.0, plane_axis: int | None = None, reach_mm: float = 6.0) -> list[float]:
    """How far the level moved ``offset_mm`` beside a drag (mm, one value per side).

    From the drag start, step ``offset_mm`` perpendicular to the drag (in the slice for a line
    drag, ``plane_axis`` its normal; four directions for a surface drag) and find the level
    crossing along the drag direction before and after. Sides where the level is not crossed
    before (within ``reach_mm``) are skipped.
    """
    sp = np.asarray(spacing_mm_zyx, float)
    a = np.asarray(start_zyx, float)
    b = np.asarray(end_zyx, float)
    dmm = (b - a) * sp
    out = []
    for p in _perpendiculars(dmm, plane_axis):
        q = a + p * offset_mm / sp
        if np.any(q < 0) or np.any(q > np.asarray(before_gy.shape) - 1):
            continue
        c0 = level_crossing_mm(before_gy, sp, q, b - a, level_gy, reach_mm)
        if c0 is None:
            continue
        c1 = level_crossing_mm(after_gy, sp, q, b - a, level_gy, reach_mm + 6.0, near_mm=c0)
        out.append(float("inf") if c1 is None else abs(c1 - c0))
    return out
