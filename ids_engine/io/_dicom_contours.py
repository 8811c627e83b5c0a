"""Planar contours <-> voxel masks, in voxel index units (pure NumPy, no DICOM).

Coordinates here are fractional voxel indices on one slice: ``row`` along y (axis 1 of a
``(z, y, x)`` volume) and ``col`` along x (axis 2); voxel ``[j, i]`` has its centre at
``(row, col) = (j, i)`` and covers ``[j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]``.

* :func:`fill_polygons` rasterises closed polygons with the even-odd rule, evaluated
  exactly at voxel centres (a scan-line crossing count), so holes and several
  contours per slice need no bookkeeping: a voxel centre is inside when a ray from it
  crosses the slice's polygon edges an odd number of times.
* :func:`trace_outlines` turns a 2-D mask into closed polygons that run along voxel
  edges. Filling them with :func:`fill_polygons` gives back the mask exactly, because no
  voxel centre lies on a voxel edge.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["fill_polygons", "trace_outlines"]


def _crossings(rows: np.ndarray, cols: np.ndarray, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-centre rows crossed by each polygon edge and the column where it crosses.

    An edge from ``r0`` to ``r1`` crosses integer row ``j`` when ``(r0 <= j) != (r1 <= j)``
    (half-open, so a vertex lying exactly on a row is counted once, and horizontal edges
    never). Rows outside ``[0, ny)`` are dropped.

    Returns
    -------
    j : int64 (n,) crossed rows.
    col : float64 (n,) fractional column of each crossing.
    """
    r0, c0 = rows, cols
    r1, c1 = np.roll(rows, -1), np.roll(cols, -1)
    lo, hi = np.minimum(r0, r1), np.maximum(r0, r1)
    j_start = np.clip(np.ceil(lo), 0, ny).astype(np.int64)
    j_stop = np.clip(np.ceil(hi), 0, ny).astype(np.int64)
    n = np.maximum(j_stop - j_start, 0)
    total = int(n.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    edge = np.repeat(np.arange(rows.size), n)
    offset = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    j = j_start[edge] + offset
    t = (j - r0[edge]) / (r1[edge] - r0[edge])
    col = c0[edge] + t * (c1[edge] - c0[edge])
    return j, col


def fill_polygons(contours: Iterable[tuple[int, np.ndarray, np.ndarray]], shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """Even-odd fill of closed planar polygons at voxel centres.

    All polygons on one slice are filled together with the even-odd rule: a contour
    inside another is a hole, two disjoint contours are two islands.

    Parameters
    ----------
    contours : iterable of ``(k, rows, cols)``: the slice index (int) and the vertices'
        fractional row (y) and column (x) indices, float64 arrays of equal length >= 3.
        The polygon closes from the last vertex back to the first.
    shape_zyx : (nz, ny, nx) of the output mask.

    Returns
    -------
    numpy.ndarray
        bool, shape ``shape_zyx`` (z, y, x): True where the voxel centre is inside.
    """
    nz, ny, nx = (int(n) for n in shape_zyx)
    mask = np.zeros((nz, ny, nx), dtype=bool)
    per_slice: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for k, rows, cols in contours:
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        if rows.shape != cols.shape or rows.ndim != 1:
            raise ValueError("fill_polygons: rows and cols must be 1-D arrays of equal length")
        if not 0 <= int(k) < nz:
            raise ValueError(f"fill_polygons: slice index {k} outside 0..{nz - 1}")
        per_slice.setdefault(int(k), []).append(_crossings(rows, cols, ny))
    for k, parts in per_slice.items():
        j = np.concatenate([p[0] for p in parts])
        col = np.concatenate([p[1] for p in parts])
        if j.size == 0:
            continue
        # A crossing at column c toggles every voxel centre strictly to its right.
        first = np.clip(np.floor(col).astype(np.int64) + 1, 0, nx)
        toggles = np.bincount(j * (nx + 1) + first, minlength=ny * (nx + 1)).reshape(ny, nx + 1)
        mask[k] = (np.cumsum(toggles[:, :nx], axis=1) & 1).astype(bool)
    return mask


# Direction codes of voxel edges in (row, col) index space, rows pointing down:
# east, south, west, north. (d + 1) % 4 is a right turn.
_STEP = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]], dtype=np.int64)


def trace_outlines(mask_yx: np.ndarray) -> list[np.ndarray]:
    """Closed polygons along voxel edges whose even-odd fill is ``mask_yx``.

    Each boundary edge between a voxel inside and one outside (or the grid border) is
    oriented with the inside on its right; the edges link into closed loops. Where two
    voxels touch only at a corner, the loop turns right, so diagonal neighbours get
    separate loops; a loop that would touch itself at a corner is split there, so every
    polygon is simple (no vertex repeated, no crossing). Collinear vertices are dropped.

    Parameters
    ----------
    mask_yx : bool (ny, nx), one slice of a ``(z, y, x)`` mask.

    Returns
    -------
    list of numpy.ndarray
        One float64 ``(n, 2)`` array of ``(row, col)`` vertex indices per loop (vertices
        sit on voxel corners, half-integers); outer boundaries and holes alike.
    """
    m = np.pad(np.asarray(mask_yx, dtype=bool), 1)
    ny, nx = m.shape[0] - 2, m.shape[1] - 2
    nv = nx + 1  # vertices per row of corners; corner (a, b) is at (a - 0.5, b - 0.5)

    # Horizontal edges on corner row a between voxel rows a-1 and a, columns i..i+1.
    above, below = m[0:ny + 1, 1:nx + 1], m[1:ny + 2, 1:nx + 1]
    a_e, i_e = np.nonzero(below & ~above)   # inside below: run east
    a_w, i_w = np.nonzero(above & ~below)   # inside above: run west
    # Vertical edges on corner column b between voxel columns b-1 and b, rows j..j+1.
    left, right = m[1:ny + 1, 0:nx + 1], m[1:ny + 1, 1:nx + 2]
    j_n, b_n = np.nonzero(right & ~left)    # inside on the right (east): run north
    j_s, b_s = np.nonzero(left & ~right)    # inside on the left (west): run south

    start_a = np.concatenate([a_e, a_w, j_s, j_n + 1])
    start_b = np.concatenate([i_e, i_w + 1, b_s, b_n])
    direction = np.concatenate([np.full(a_e.size, 0), np.full(a_w.size, 2), np.full(j_s.size, 1),
                                np.full(j_n.size, 3)]).astype(np.int64)
    n_edges = direction.size
    if n_edges == 0:
        return []
    start = start_a * nv + start_b
    end = (start_a + _STEP[direction, 0]) * nv + (start_b + _STEP[direction, 1])

    # Outgoing edges per vertex: one, or two at a corner where diagonal voxels touch.
    order = np.argsort(start, kind="stable")
    s = start[order]
    is_first = np.r_[True, s[1:] != s[:-1]]
    out1 = np.full((ny + 1) * nv, -1, dtype=np.int64)
    out2 = np.full((ny + 1) * nv, -1, dtype=np.int64)
    out1[s[is_first]] = order[is_first]
    out2[s[~is_first]] = order[~is_first]

    # Successor of every edge; at a two-way corner take the right turn.
    nxt = out1[end]
    two_way = out2[end] >= 0
    if np.any(two_way):
        e2 = np.nonzero(two_way)[0]
        alt = out2[end[e2]]
        right_turn = (direction[e2] + 1) % 4
        nxt[e2] = np.where(direction[nxt[e2]] == right_turn, nxt[e2], alt)

    nxt_list = nxt.tolist()
    start_list = start.tolist()
    visited = bytearray(n_edges)
    loops = []
    for e0 in range(n_edges):
        if visited[e0]:
            continue
        # Walk the closed chain of edges from e0. When a vertex comes round again, the
        # edges since its first visit close a loop of their own: emit it, so that every
        # polygon is simple (the edge set, hence the even-odd fill, is unchanged).
        stack: list[int] = []
        position: dict[int, int] = {}
        e = e0
        while not visited[e]:
            visited[e] = 1
            v = start_list[e]
            i = position.get(v)
            if i is not None:
                loops.append(_loop_vertices(stack[i:], start, direction, nv))
                for f in stack[i + 1:]:
                    del position[start_list[f]]
                del stack[i:]
            position[v] = len(stack)
            stack.append(e)
            e = nxt_list[e]
        loops.append(_loop_vertices(stack, start, direction, nv))
    return loops


def _loop_vertices(chain: list[int], start: np.ndarray, direction: np.ndarray, nv: int) -> np.ndarray:
    """(row, col) corners of a closed chain of edges, collinear vertices dropped."""
    idx = np.asarray(chain, dtype=np.int64)
    d = direction[idx]
    corner = d != np.roll(d, 1)
    v = start[idx[corner]]
    return np.stack([v // nv - 0.5, v % nv - 0.5], axis=1).astype(np.float64)
