"""Compiled CPU loops of the host read-outs' voxel tables (numba, optional).

:func:`coarse_tables` builds, in one pass, what reading the dose at a set of CT voxels needs
from the coarse level (``ids_engine.dose._readout.ReadOuts._neighbours``): each voxel's 8
coarse neighbours and trilinear weights, and the distinct neighbours with each entry's place
among them. Its NumPy reference is ``ReadOuts._coarse_neighbours`` followed by
``np.unique(..., return_inverse=True)``: the same integers and the same float32 products in the
same order, so the same tables bit for bit (tested). A DMR request builds them for a few dozen
voxel sets of a few hundred voxels, where the reference's thirty-odd NumPy calls and its sort
cost more than the arithmetic. Without numba (or with ``IDS_NUMBA=0``, see
:mod:`ids_engine.kernels._cpu`) the engine uses the reference.
"""

from __future__ import annotations

import numpy as np

from . import _cpu

__all__ = ["coarse_tables"]

_COARSE_TABLES = None  # the compiled loop, when numba is installed
if _cpu.HAVE_NUMBA:  # pragma: no cover - depends on the environment
    import numba

    @numba.njit(nogil=True, cache=True)
    def _coarse_tables_nb(idx, nx, ny, z0, z1, wz, y0, y1, wy, x0, x1, wx, cy, cx, n_coarse,
                          cidx, cw, inv):  # pragma: no cover - compiled
        n = idx.shape[0]
        one = np.float32(1)
        seen = np.zeros(n_coarse, np.uint8)
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
        place = np.empty(n_coarse, np.int64)  # written at the distinct neighbours only
        for t in range(m):
            place[uniq[t]] = t
        for e in range(8):
            for i in range(n):
                inv[e * n + i] = place[cidx[e, i]]
        return uniq

    _COARSE_TABLES = _coarse_tables_nb


def coarse_tables(flat_index: np.ndarray, shape_zyx: tuple[int, int, int], coarse_shape_zyx: tuple[int, int, int],
                  up: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The coarse-level tables of CT voxels ``flat_index`` ((n,) int64, flat in the CT grid of
    shape ``shape_zyx``): ``(cidx, cw, uniq, inv)``, the 8 coarse neighbours ((8, n) int64,
    flat in the coarse grid of shape ``coarse_shape_zyx``, z then y then x from the lower
    corner), their trilinear weights ((8, n) float32, ``(fz fy) fx``), the distinct
    neighbours (sorted int64) and each of the ``8 n`` entries' place among them ((8 n,)
    int64). ``up`` holds per axis (z, y, x) the separable upsampling tables ``(i0, i1, w)``
    (int64, int64, float32, one entry per CT index). Needs numba (``_cpu.HAVE_NUMBA``)."""
    if _COARSE_TABLES is None:
        raise RuntimeError("coarse_tables needs numba (pip install ids-engine[fast])")
    n = int(flat_index.shape[0])
    ny, nx = int(shape_zyx[1]), int(shape_zyx[2])
    cz, cy, cx = (int(s) for s in coarse_shape_zyx)
    cidx = np.empty((8, n), np.int64)
    cw = np.empty((8, n), np.float32)
    inv = np.empty(8 * n, np.int64)
    (z0, z1, wz), (y0, y1, wy), (x0, x1, wx) = up
    uniq = _COARSE_TABLES(flat_index, nx, ny, z0, z1, wz, y0, y1, wy, x0, x1, wx, cy, cx, cz * cy * cx,
                          cidx, cw, inv)
    return cidx, cw, uniq, inv
