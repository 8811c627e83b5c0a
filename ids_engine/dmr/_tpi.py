"""Travelling path information (TPI) maps, eq. 1 of the IDS paper.

``TPI(b, s) = sum over voxels i of the tissue whose ray in beam b passes through control
point s of D_1(l_b(i))``: the depth-dose-weighted amount of that tissue behind each control
point. A control point is a block of ``cp_cells`` x ``cp_cells`` fine fluence amplitudes
(5 x 5 in the paper). Computed once per geometry, on the host, as a histogram over the
host copy of the engine's per-beam voxel cache.
"""

from __future__ import annotations

import numpy as np

__all__ = ["tpi_maps"]


def tpi_maps(engine, mask_zyx: np.ndarray, cp_cells: int = 5) -> list:
    """TPI maps of one tissue for every beam of ``engine``.

    Parameters
    ----------
    engine : :class:`ids_engine.dose.DoseEngine`.
    mask_zyx : bool (z, y, x) on the CT grid: the tissue (target or OARs).
    cp_cells : control point size in fine fluence amplitudes.

    Returns
    -------
    list of (ncr, ncc) float32 host arrays, one per beam, ``ncr = ceil(nv / cp_cells)``.
    ``D_1`` is the beam's first (primary) depth component (from the kernel set it uses),
    unnormalised; only ratios of TPI values matter (mu in eq. 3 is chosen relative to them).
    Computed on the host from the engine's host copy of the geometry (no device work).
    """
    flat = np.flatnonzero(np.asarray(mask_zyx, bool).ravel() & engine.body_mask.ravel())
    out = []
    for geo in engine.geometry:
        lvl = geo.fine.host
        d_tab, c_tab = (geo.machine or engine.machine).depth_table()
        # The tissue's voxels through the cache's position index: no pass over the whole body.
        pos = lvl.position[flat]
        pos = pos[pos >= 0]
        nv, nu = geo.fluence_grid.shape_vu
        ncr, ncc = -(-nv // cp_cells), -(-nu // cp_cells)
        r = np.clip(np.floor(lvl.v_cells[pos] / cp_cells).astype(np.int64), 0, ncr - 1)
        c = np.clip(np.floor(lvl.u_cells[pos] / cp_cells).astype(np.int64), 0, ncc - 1)
        w = np.interp(lvl.depth_mm[pos].astype(np.float64), d_tab, c_tab[0])
        tpi = np.bincount(r * ncc + c, weights=w, minlength=ncr * ncc).astype(np.float32)
        out.append(tpi.reshape(ncr, ncc))
    return out
