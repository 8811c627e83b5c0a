"""Compiled CPU loops of the host read-outs' voxel tables (numba, optional).

:func:`coarse_tables` builds, in one pass, what reading the dose at a set of CT voxels needs
from the coarse level (``ids_engine.dose._readout.ReadOuts._neighbours``): each voxel's 8
coarse neighbours and trilinear weights, and the distinct neighbours with each entry's place
among them. Its NumPy reference is ``ReadOuts._coarse_neighbours`` followed by
``np.unique(..., return_inverse=True)``: the same integers and the same float32 products in the
same order, so the same tables bit for bit (tested). A DMR request builds them for a few dozen
voxel sets of a few hundred voxels, where the reference's thirty-odd NumPy calls and its sort
cost more than the arithmetic; its two work arrays of the coarse grid's size come from the
caller (:func:`coarse_scratch`, kept by the engine) rather than a new pair a call.
:func:`level_tables` looks the same level voxels up in every beam at once (the level voxels a
DMR joint solve's read meets for the first time, ``ids_engine.dose._readout._LevelTables``):
the per-beam look-up (``_LevelRows.of``) for the
beams asked for in one call, where a call per beam and level cost more than its gathers (its
compiled loop, in :mod:`~ids_engine.kernels._cpu`, calls the per-beam one).
:func:`stacked_bounds` is the window a DMR joint read's every beam samples (the floors of the
least and greatest fluence row and column of its rows, ``ReadOuts._rows_of_beams``) in one
pass, and :func:`block_sum` a stack of patches summed over the coarse level's blocks (a DMR
read's coarse stack), without NumPy's many short inner loops: the same float32 additions in
NumPy's order, so the same values bit for bit (tested). Without numba (or with
``IDS_NUMBA=0``, see :mod:`ids_engine.kernels._cpu`) the engine uses the references.
"""

from __future__ import annotations

import numpy as np

from . import _cpu

__all__ = ["add_beam_parts", "block_sum", "coarse_scratch", "coarse_tables", "gather_columns", "level_tables",
           "stacked_bounds"]

_COARSE_TABLES = None  # the compiled loops, when numba is installed
_BOUNDS = None
_BLOCK_SUM = None
_GATHER_T = None
_ADD_PARTS = None
if _cpu.HAVE_NUMBA:  # pragma: no cover - depends on the environment
    import numba

    @numba.njit(nogil=True, cache=True)
    def _coarse_tables_nb(idx, nx, ny, z0, z1, wz, y0, y1, wy, x0, x1, wx, cy, cx, seen, place,
                          cidx, cw, inv):  # pragma: no cover - compiled
        # ``seen`` (one per coarse voxel) is 0 on entry and left 0; ``place`` is written at
        # the distinct neighbours before it is read there.
        n = idx.shape[0]
        one = np.float32(1)
        found = np.empty(8 * n, np.int64)
        m = 0
        for i in range(n):
            f = idx[i]
            ii = f % nx
            j = (f // nx) % ny
            k = f // (nx * ny)
            e = 0
            for iz in range(2):
                az = z0[k] if iz == 0 else z1[k]
                fz = one - wz[k] if iz == 0 else wz[k]
                for iy in range(2):
                    ay = y0[j] if iy == 0 else y1[j]
                    fy = one - wy[j] if iy == 0 else wy[j]
                    fzy = fz * fy
                    for ix in range(2):
                        ax = x0[ii] if ix == 0 else x1[ii]
                        fx = one - wx[ii] if ix == 0 else wx[ii]
                        c = (az * cy + ay) * cx + ax
                        cidx[e, i] = c
                        cw[e, i] = fzy * fx
                        if seen[c] == 0:
                            seen[c] = 1
                            found[m] = c
                            m += 1
                        e += 1
        uniq = np.sort(found[:m])
        for t in range(m):
            place[uniq[t]] = t
            seen[uniq[t]] = 0
        for e in range(8):
            for i in range(n):
                inv[e * n + i] = place[cidx[e, i]]
        return uniq

    _COARSE_TABLES = _coarse_tables_nb

    @numba.njit(nogil=True, cache=True)
    def _stacked_bounds_nb(ok, v, u, lo_hi, found):  # pragma: no cover - compiled
        inf32 = np.float32(np.inf)
        for s in range(ok.shape[0]):
            v_min, v_max, u_min, u_max = inf32, -inf32, inf32, -inf32
            hit = False
            for i in range(ok.shape[1]):
                vi = v[s, i]
                ui = u[s, i]
                if ok[s, i] and np.isfinite(vi) and np.isfinite(ui):
                    hit = True
                    v_min = min(v_min, vi)
                    v_max = max(v_max, vi)
                    u_min = min(u_min, ui)
                    u_max = max(u_max, ui)
            lo_hi[s, 0], lo_hi[s, 1], lo_hi[s, 2], lo_hi[s, 3] = v_min, v_max, u_min, u_max
            found[s] = hit

    _BOUNDS = _stacked_bounds_nb

    @numba.njit(nogil=True, cache=True)
    def _block_sum_nb(stack, f, out):  # pragma: no cover - compiled
        # NumPy's order for sum(axis=(2, 4)) of the (m, hh, f, ww, f) view: per block row a
        # running sum of its f cells from 0, then the rows' sums added in turn to 0.
        zero = np.float32(0)
        for p in range(out.shape[0]):
            for r in range(out.shape[1]):
                for c in range(out.shape[2]):
                    acc = zero
                    for a in range(f):
                        row = zero
                        for b in range(f):
                            row += stack[p, r * f + a, c * f + b]
                        acc += row
                    out[p, r, c] = acc

    _BLOCK_SUM = _block_sum_nb

    @numba.njit(nogil=True, cache=True)
    def _gather_columns_nb(records, rows, out):  # pragma: no cover - compiled
        for i in range(rows.shape[0]):
            r = rows[i]
            for j in range(records.shape[1]):
                out[j, i] = records[r, j]

    _GATHER_T = _gather_columns_nb

    @numba.njit(nogil=True, cache=True)
    def _add_parts_nb(read, order, cols, out, parts):  # pragma: no cover - compiled
        n = out.shape[1]
        for t in range(order.shape[0]):
            b, level, slot, c0, c1 = order[t, 0], order[t, 1], order[t, 2], order[t, 3], order[t, 4]
            for q in range(c0, c1):
                col = cols[q]
                for i in range(n):
                    g = read[level, slot, col, i]
                    out[col, i] += g
                    parts[b, col, i] += g

    _ADD_PARTS = _add_parts_nb


def coarse_scratch(coarse_shape_zyx: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The work arrays :func:`coarse_tables` takes (``scratch``): one entry per coarse voxel,
    ``(seen (N,) uint8 zeros, place (N,) int64)``."""
    size = int(np.prod([int(s) for s in coarse_shape_zyx]))
    return np.zeros(size, np.uint8), np.empty(size, np.int64)


def coarse_tables(flat_index: np.ndarray, shape_zyx: tuple[int, int, int], coarse_shape_zyx: tuple[int, int, int],
                  up: list, scratch: tuple | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The coarse-level tables of CT voxels ``flat_index`` ((n,) int64, flat in the CT grid of
    shape ``shape_zyx``): ``(cidx, cw, uniq, inv)``, the 8 coarse neighbours ((8, n) int64,
    flat in the coarse grid of shape ``coarse_shape_zyx``, z then y then x from the lower
    corner), their trilinear weights ((8, n) float32, ``(fz fy) fx``), the distinct
    neighbours (sorted int64) and each of the ``8 n`` entries' place among them ((8 n,)
    int64). ``up`` holds per axis (z, y, x) the separable upsampling tables ``(i0, i1, w)``
    (int64, int64, float32, one entry per CT index). ``scratch``: work arrays from
    :func:`coarse_scratch` for this coarse shape, kept by the caller and reused (left as they
    were given; one call at a time), else new ones (two arrays of the coarse grid's size a
    call: measured on a clinical request's 12 sets of about 450 voxels, 0.66 ms with new
    arrays, 0.61 ms with kept ones). Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _COARSE_TABLES is None:
        raise RuntimeError("coarse_tables needs numba (pip install ids-engine[fast])")
    n = int(flat_index.shape[0])
    ny, nx = int(shape_zyx[1]), int(shape_zyx[2])
    cz, cy, cx = (int(s) for s in coarse_shape_zyx)
    cidx = np.empty((8, n), np.int64)
    cw = np.empty((8, n), np.float32)
    inv = np.empty(8 * n, np.int64)
    (z0, z1, wz), (y0, y1, wy), (x0, x1, wx) = up
    seen, place = coarse_scratch(coarse_shape_zyx) if scratch is None else scratch
    if seen.shape[0] != cz * cy * cx or place.shape[0] != cz * cy * cx:
        raise ValueError(f"coarse_tables: scratch of {seen.shape[0]} and {place.shape[0]} entries for a coarse grid of "
                         f"{cz * cy * cx}")
    uniq = _COARSE_TABLES(flat_index, nx, ny, z0, z1, wz, y0, y1, wy, x0, x1, wx, cy, cx, seen, place,
                          cidx, cw, inv)
    return cidx, cw, uniq, inv


def level_tables(hosts: list, beams: np.ndarray, level_index: np.ndarray):
    """Several beams' look-ups at the same level voxels in one pass: of the level host copies
    ``hosts`` (``LevelHost``: ``position``, ``v_cells``, ``u_cells``, ``weights``; all the
    engine's beams, so that the compiled loop, which takes them as tuples, compiles once per
    engine), those of beams ``beams`` ((S,) int64), at the level voxels ``level_index`` ((n,)
    int64): ``ok`` ((S, n) bool, position >= 0), ``v``, ``u`` ((S, n) float32, of position 0
    where not ok), ``weights`` ((S, nc, n) float32) and per beam the float32 min / max of v and
    u over the ok voxels with finite v and u (None when there is none). Row ``s`` is what
    ``_cpu.level_rows`` (``_LevelRows.of``) computes for beam ``beams[s]``: the compiled loop
    (``_cpu._LEVEL_TABLES``, beside the one it calls so that numba's cache, which keys on the
    file, recompiles both together) calls that function's loop once per beam. Raises IndexError
    if ``level_index`` or ``beams`` points outside the levels or ``hosts``.

    Returns None where it cannot, the caller then looking each beam up alone: numba missing
    (or ``IDS_NUMBA=0``), no host, v, u or weights not float32, weights not 2-D, or the beams'
    arrays of one kind not all of one numba type: dtype, dimensions, layout (C-, F- or neither
    contiguous), writeable, aligned, and the same number of components (the NumPy backend's
    per-beam weights are column blocks of all beams' weights, strided; the device backends',
    whose reads call this, are C-contiguous: either way all beams alike)."""
    if _cpu._LEVEL_TABLES is None or not hosts:
        return None
    beams = np.asarray(beams, np.int64)
    level_index = np.asarray(level_index, np.int64)
    if beams.shape[0] and (int(beams.min()) < 0 or int(beams.max()) >= len(hosts)):
        raise IndexError(f"beams: entries in [{int(beams.min())}, {int(beams.max())}] outside {len(hosts)} beams")
    # The beams' arrays of each kind go in as one tuple, which the compiled loop indexes at run
    # time: they must be of one numba type.
    kinds = {(h.weights.shape[0], *((a.dtype, a.ndim, a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable,
                                     a.flags.aligned) for a in (h.position, h.v_cells, h.u_cells, h.weights)))
             for h in hosts}
    if len(kinds) != 1 or hosts[0].v_cells.dtype != np.float32 or hosts[0].u_cells.dtype != np.float32 \
            or hosts[0].weights.dtype != np.float32 or hosts[0].weights.ndim != 2:
        return None
    _cpu.check_level_index(level_index, min(int(h.position.shape[0]) for h in hosts))
    nc = hosts[0].weights.shape[0]
    s_count, n = int(beams.shape[0]), int(level_index.shape[0])
    ok = np.empty((s_count, n), np.bool_)
    v, u = np.empty((s_count, n), np.float32), np.empty((s_count, n), np.float32)
    w = np.empty((s_count, nc, n), np.float32)
    bounds = np.empty((s_count, 4), np.float32)
    found = np.empty(s_count, np.bool_)
    _cpu._LEVEL_TABLES(tuple(h.position for h in hosts), tuple(h.v_cells for h in hosts),
                       tuple(h.u_cells for h in hosts), tuple(h.weights for h in hosts), beams,
                       level_index, ok, v, u, w, bounds, found)
    mm = [tuple(float(x) for x in bounds[s]) if found[s] else None for s in range(s_count)]
    return ok, v, u, w, mm


def stacked_bounds(ok: np.ndarray, v: np.ndarray, u: np.ndarray) -> list:
    """Per row ``s`` of stacked look-ups (``ok`` (S, m) bool, ``v``, ``u`` (S, m) float32): the
    floors of the least and greatest ``v`` and ``u`` over the voxels with ``ok`` and finite
    ``v`` and ``u``, ``(v_min, v_max, u_min, u_max)`` as Python ints, or None where there is
    none: ``ReadOuts._stacked_bounds`` (:func:`~ids_engine.dose._readout.level_bounds` of each
    row) in one pass (min / max only, so the same values). Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _BOUNDS is None:
        raise RuntimeError("stacked_bounds needs numba (pip install ids-engine[fast])")
    s_count = int(ok.shape[0])
    lo_hi = np.empty((s_count, 4), np.float32)
    found = np.empty(s_count, np.bool_)
    _BOUNDS(ok, v, u, lo_hi, found)
    floors = np.floor(lo_hi).tolist()
    return [tuple(int(x) for x in floors[s]) if found[s] else None for s in range(s_count)]


def block_sum(stack: np.ndarray, factor: int) -> np.ndarray:
    """``stack`` ((m, hh f, ww f) float32) summed over ``factor`` x ``factor`` blocks: ``(m, hh,
    ww)`` float32, bit for bit ``stack.reshape(m, hh, f, ww, f).sum(axis=(2, 4))`` (a DMR read's
    stack on the coarse level). Compiled where that order is known: NumPy runs the innermost
    (contiguous) axis as a running sum for fewer than 8 entries and adds the block rows' sums
    in turn; with ``ww == 1`` it merges the two summed axes into one and sums pairwise, and
    from 8 entries on it sums pairwise: those, a factor of 1, a stack not C-ordered (NumPy sums
    in memory order) and the case without numba (``_cpu.HAVE_NUMBA`` false) take NumPy's sum.
    Where two different NaNs meet, which one's bits survive may differ from NumPy's."""
    m, hf, wf = (int(x) for x in stack.shape)
    f = int(factor)
    hh, ww = hf // f, wf // f
    if (_BLOCK_SUM is None or not _cpu.HAVE_NUMBA or not 2 <= f < 8 or ww < 2 or stack.dtype != np.float32
            or not stack.flags.c_contiguous or hh * f != hf or ww * f != wf):
        return stack.reshape(m, hh, f, ww, f).sum(axis=(2, 4))
    out = np.empty((m, hh, ww), np.float32)
    _BLOCK_SUM(stack, f, out)
    return out


def gather_columns(records: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(records[rows].T)`` in one pass: rows ``rows`` ((m,) int32 or
    int64, each in ``[0, len(records))``: not checked) of ``records`` ((N, R) float32,
    C-contiguous) as the columns of an ``(R, m)`` float32 C-contiguous array (copies: the same
    values). Without numba (``_cpu.HAVE_NUMBA`` false), NumPy's gather and transpose."""
    if _GATHER_T is None or not _cpu.HAVE_NUMBA:
        return np.ascontiguousarray(records[rows].T)
    out = np.empty((records.shape[1], rows.shape[0]), records.dtype)
    _GATHER_T(records, rows, out)
    return out


def add_beam_parts(read: np.ndarray, order: np.ndarray, cols: np.ndarray, out: np.ndarray, parts: np.ndarray) -> None:
    """Adds the parts a DMR joint read got (``read`` (L, S, K, n) float32: level, slot, column,
    row) to the joint columns ``out`` ((K, n) float32) and to each beam's own ``parts`` ((B, K,
    n) float32), in the order of ``order`` ((T, 5) int64 rows ``beam, level, slot, q0, q1``:
    the columns ``cols[q0:q1]`` (int64, distinct within a row) of that slot), each row as
    ``out[c] += read[level, slot, c]; parts[beam, c] += read[level, slot, c]`` for its columns
    ``c``: the same float32 additions in the same order as those NumPy statements, in one pass
    (where two different NaNs meet, which one's bits survive may differ). Indices are not checked. Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _ADD_PARTS is None:
        raise RuntimeError("add_beam_parts needs numba (pip install ids-engine[fast])")
    _ADD_PARTS(read, order, cols, out, parts)
