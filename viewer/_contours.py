"""Isolines of 2D slices as line segments (vectorised marching squares), and where to label them.

Host NumPy only: the slice views call these on snapshot arrays; nothing here touches the
engine or the GPU.
"""

from __future__ import annotations

import numpy as np

__all__ = ["asterisk_segments", "downhill_ticks", "hot_spot_rc", "isoline_segments", "label_anchor",
           "nearest_on_segments"]

# Corner bits: 1 = (r, c), 2 = (r, c+1), 4 = (r+1, c+1), 8 = (r+1, c) above the level.
# Edges: 0 top (r, c..c+1), 1 right (r..r+1, c+1), 2 bottom (r+1, c..c+1), 3 left (r..r+1, c).
# Each case lists the edge pairs its segments join; the saddles (5, 10) are split by the
# cell-centre value (see isoline_segments).
_CASES = {
    1: ((3, 0),), 2: ((0, 1),), 3: ((3, 1),), 4: ((1, 2),), 6: ((0, 2),), 7: ((3, 2),),
    8: ((2, 3),), 9: ((0, 2),), 11: ((1, 2),), 12: ((1, 3),), 13: ((0, 1),), 14: ((3, 0),),
}
_SADDLE_CENTRE_ABOVE = {5: ((3, 2), (0, 1)), 10: ((3, 0), (1, 2))}
_SADDLE_CENTRE_BELOW = {5: ((3, 0), (1, 2)), 10: ((0, 1), (2, 3))}


def _edge_points(field: np.ndarray, level: float, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Crossing point (row, col) on each of the four edges of the given cells, shape (4, n, 2)."""
    a = field[rows, cols]
    b = field[rows, cols + 1]
    c = field[rows + 1, cols + 1]
    d = field[rows + 1, cols]

    def frac(p, q):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (level - p) / (q - p)
        return np.clip(np.nan_to_num(t, nan=0.5, posinf=0.5, neginf=0.5), 0.0, 1.0)

    r = rows.astype(np.float64)
    col = cols.astype(np.float64)
    out = np.empty((4, rows.size, 2))
    out[0] = np.stack([r, col + frac(a, b)], -1)
    out[1] = np.stack([r + frac(b, c), col + 1], -1)
    out[2] = np.stack([r + 1, col + frac(d, c)], -1)
    out[3] = np.stack([r + frac(a, d), col], -1)
    return out


def isoline_segments(field: np.ndarray, level: float) -> np.ndarray:
    """Line segments of the ``level`` isoline of a 2D field.

    Parameters
    ----------
    field : (rows, cols) float array (e.g. a dose slice in Gy, or a mask as float).
    level : the isoline value, same unit as ``field``.

    Returns
    -------
    (n, 2, 2) float64 array: ``n`` segments, each two points (row, col) in fractional
    array indices (a sample sits at an integer index).

    Only the cells the line crosses are interpolated (found first from the corner bits), so
    the cost follows the line's length, not the slice's area.
    """
    f = np.asarray(field, dtype=np.float64)
    if f.ndim != 2 or min(f.shape) < 2:
        return np.zeros((0, 2, 2))
    above = f >= level
    case = (above[:-1, :-1] * 1 + above[:-1, 1:] * 2 + above[1:, 1:] * 4 + above[1:, :-1] * 8).astype(np.int8)
    rows, cols = np.nonzero((case > 0) & (case < 15))
    if rows.size == 0:
        return np.zeros((0, 2, 2))
    kind = case[rows, cols]
    pts = _edge_points(f, level, rows, cols)
    centre_above = (f[rows, cols] + f[rows, cols + 1] + f[rows + 1, cols + 1] + f[rows + 1, cols]) / 4.0 >= level
    chunks = []
    for k, pairs in _CASES.items():
        sel = np.flatnonzero(kind == k)
        if sel.size:
            for e0, e1 in pairs:
                chunks.append(np.stack([pts[e0][sel], pts[e1][sel]], 1))
    for k in (5, 10):
        for table, above_c in ((_SADDLE_CENTRE_ABOVE, centre_above), (_SADDLE_CENTRE_BELOW, ~centre_above)):
            sel = np.flatnonzero((kind == k) & above_c)
            if sel.size:
                for e0, e1 in table[k]:
                    chunks.append(np.stack([pts[e0][sel], pts[e1][sel]], 1))
    return np.concatenate(chunks, 0) if chunks else np.zeros((0, 2, 2))


def label_anchor(segments: np.ndarray, direction_rc=(-1.0, 0.0), centre_rc=None, avoid_rc=(),
                 min_separation: float = 0.0, scale_rc=(1.0, 1.0)) -> np.ndarray | None:
    """A place (row, col) for a line's label.

    The segment midpoint farthest along ``direction_rc`` from ``centre_rc`` (default: the
    line's own centre) that is at least ``min_separation`` (in the units ``scale_rc`` converts
    rows and columns to) from every point of ``avoid_rc``, the labels already placed; the
    farthest point regardless if none is. Giving each of a set of nested lines its own
    direction fans their labels out. None without segments.
    """
    if len(segments) == 0:
        return None
    mid = segments.mean(axis=1)
    c = mid.mean(axis=0) if centre_rc is None else np.asarray(centre_rc, np.float64)
    order = np.argsort(-((mid - c) @ np.asarray(direction_rc, np.float64)))
    avoid = np.asarray(avoid_rc, np.float64).reshape(-1, 2)
    if len(avoid) and min_separation > 0:
        s = np.asarray(scale_rc, np.float64)
        d = np.linalg.norm((mid[order, None, :] - avoid[None, :, :]) * s, axis=-1).min(axis=1)
        ok = np.flatnonzero(d >= min_separation)
        if ok.size:
            return mid[order[ok[0]]]
    return mid[order[0]]


def nearest_on_segments(segments: np.ndarray, point_rc, scale_rc=(1.0, 1.0)) -> tuple[np.ndarray | None, float]:
    """The point of ``segments`` nearest to ``point_rc`` and its distance.

    ``scale_rc`` converts rows and columns to a common unit (e.g. mm per voxel) so the
    distance is measured in that unit. Returns (None, inf) when there are no segments.
    """
    if len(segments) == 0:
        return None, float("inf")
    s = np.asarray(scale_rc, dtype=np.float64)
    a = segments[:, 0] * s
    b = segments[:, 1] * s
    p = np.asarray(point_rc, dtype=np.float64) * s
    ab = b - a
    denom = np.einsum("ij,ij->i", ab, ab)
    t = np.where(denom > 0, np.einsum("ij,ij->i", p - a, ab) / np.where(denom > 0, denom, 1), 0.0)
    t = np.clip(t, 0.0, 1.0)
    q = a + t[:, None] * ab
    d = np.linalg.norm(q - p, axis=1)
    k = int(np.argmin(d))
    return q[k] / s, float(d[k])


def _bilinear(field: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Bilinear samples of a 2D field at fractional (row, col) points (n, 2), clamped to the edge."""
    f = np.asarray(field, np.float64)
    r = np.clip(rc[:, 0], 0.0, f.shape[0] - 1.0)
    c = np.clip(rc[:, 1], 0.0, f.shape[1] - 1.0)
    r0 = np.minimum(np.floor(r).astype(int), f.shape[0] - 2) if f.shape[0] > 1 else np.zeros(len(r), int)
    c0 = np.minimum(np.floor(c).astype(int), f.shape[1] - 2) if f.shape[1] > 1 else np.zeros(len(c), int)
    tr, tc = r - r0, c - c0
    r1, c1 = np.minimum(r0 + 1, f.shape[0] - 1), np.minimum(c0 + 1, f.shape[1] - 1)
    return ((1 - tr) * (1 - tc) * f[r0, c0] + (1 - tr) * tc * f[r0, c1] + tr * (1 - tc) * f[r1, c0]
            + tr * tc * f[r1, c1])


def downhill_ticks(segments: np.ndarray, field: np.ndarray, length_mm: float, spacing_mm: float,
                   scale_rc=(1.0, 1.0)) -> np.ndarray:
    """Tick marks on the downhill (lower value) side of an isoline, as on a topographic map
    (seed 001: "tick marks on the down hill side (lower dose) of the isodose line").

    At most one tick per ``spacing_mm`` square (the midpoint of the first segment falling in
    it), perpendicular to its segment, ``length_mm`` long, on the side where the field is
    lower (sampled bilinearly a third of a voxel to either side).

    Parameters
    ----------
    segments : (n, 2, 2) segments of (row, col), from :func:`isoline_segments`.
    field : the (rows, cols) field the segments are an isoline of.
    length_mm, spacing_mm : tick length and spacing, in the units ``scale_rc`` gives.
    scale_rc : mm per row and per column.

    Returns
    -------
    (m, 2, 2) tick segments of (row, col), each from the line outwards.
    """
    if len(segments) == 0 or not (length_mm > 0 and spacing_mm > 0):
        return np.zeros((0, 2, 2))
    s = np.asarray(scale_rc, np.float64)
    mid = segments.mean(axis=1)
    d = (segments[:, 1] - segments[:, 0]) * s  # mm
    n = np.linalg.norm(d, axis=1)
    keep = n > 1e-9
    cell = np.floor(mid * s / float(spacing_mm)).astype(np.int64)
    _, first = np.unique(cell[keep], axis=0, return_index=True)
    idx = np.flatnonzero(keep)[np.sort(first)]
    mid, d, n = mid[idx], d[idx], n[idx]
    normal_mm = np.stack([-d[:, 1], d[:, 0]], -1) / n[:, None]  # perpendicular, in mm
    probe = normal_mm / s * (1.0 / 3.0) / np.maximum(np.abs(normal_mm / s).max(axis=1, keepdims=True), 1e-12)
    plus = _bilinear(field, mid + probe)
    minus = _bilinear(field, mid - probe)
    sign = np.where(plus <= minus, 1.0, -1.0)[:, None]
    end = mid + sign * normal_mm * float(length_mm) / s
    return np.stack([mid, end], 1)


def hot_spot_rc(field: np.ndarray) -> tuple[tuple[int, int], float] | None:
    """The hottest sample of a 2D field: ((row, col), value); None if the field is empty or not
    positive anywhere (seed 001: "the hot spot in that frame will be ... marked")."""
    f = np.asarray(field)
    if f.size == 0 or not np.nanmax(f) > 0:
        return None
    k = int(np.nanargmax(f))
    r, c = np.unravel_index(k, f.shape)
    return (int(r), int(c)), float(f[r, c])


def asterisk_segments(centre_xy, radius: float, spokes: int = 4) -> np.ndarray:
    """An asterisk (star) of ``spokes`` lines through ``centre_xy``: (spokes, 2, 2) segments."""
    t = np.pi * np.arange(spokes) / spokes + np.pi / 2
    d = radius * np.stack([np.cos(t), np.sin(t)], -1)
    c = np.asarray(centre_xy, np.float64)
    return np.stack([c - d, c + d], 1)
