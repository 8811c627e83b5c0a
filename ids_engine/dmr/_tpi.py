"""Travelling path information (TPI) maps, eq. 1 of the IDS paper.

``TPI(b, s) = sum over voxels i of the tissue whose ray in beam b passes through control
point s of D_1(l_b(i))``: the depth-dose-weighted amount of that tissue behind each control
point. A control point is a block of ``cp_cells`` x ``cp_cells`` fine fluence amplitudes
(5 x 5 in the paper). Computed once per geometry, on the device, as a scatter-add over the
engine's per-beam voxel cache.
"""

from __future__ import annotations

import numpy as np

from ids_engine import backend

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
    list of (ncr, ncc) float32 device arrays, one per beam, ``ncr = ceil(nv / cp_cells)``.
    ``D_1`` is the machine's first (primary) depth component, unnormalised; only ratios of
    TPI values matter (mu in eq. 3 is chosen relative to them).
    """
    xp = engine.xp
    flat = np.flatnonzero(np.asarray(mask_zyx, bool).ravel() & engine.body_mask.ravel())
    flat_dev = xp.asarray(flat)
    d_tab, c_tab = engine.machine.depth_table()
    d_tab = xp.asarray(d_tab)
    d1_tab = xp.asarray(c_tab[0])
    out = []
    for geo in engine.geometry:
        lvl = geo.fine
        # The tissue's voxels through the cache's position index: no pass over the whole body.
        pos = lvl.position[flat_dev]
        nv, nu = geo.fluence_grid.shape_vu
        ncr, ncc = -(-nv // cp_cells), -(-nu // cp_cells)
        r = xp.clip(xp.floor(lvl.v[pos] / cp_cells).astype(xp.int64), 0, ncr - 1)
        c = xp.clip(xp.floor(lvl.u[pos] / cp_cells).astype(xp.int64), 0, ncc - 1)
        w = xp.interp(lvl.depth_mm[pos].astype(xp.float64), d_tab, d1_tab)
        tpi = xp.bincount(r * ncc + c, weights=w, minlength=ncr * ncc).astype(xp.float32)
        out.append(tpi.reshape(ncr, ncc))
    backend.synchronize()
    return out
