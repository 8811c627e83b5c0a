"""Beamlet influence matrices (dose per unit beamlet weight) for the optimisers.

Built from the engine's own model and discretisation: a beamlet is a square block of
``beamlet_cells`` x ``beamlet_cells`` fine fluence amplitudes aligned with the coarse
fluence cells, and its dose at a voxel is what :meth:`DoseEngine.dose_at_points` gives for a
fluence equal to that block. So ``matrix @ weights`` equals the engine's point dose for the
fluence ``fluence_maps(weights)`` to float32 round-off when ``cutoff_mm`` is None (every
beamlet within the kernels' reach is kept); a finite ``cutoff_mm`` drops the scatter tail
beyond that lateral distance from the beamlet centre and its effect is reported by
:func:`truncation_error`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from ids_engine import backend
from ids_engine.kernels.pencil import convolve_full, sample_bilinear
from ids_engine.kernels.sparse import csc_from_triplets
from ids_engine.model import Grid

__all__ = ["InfluenceMatrix", "influence_matrix"]


@dataclass(frozen=True, eq=False)
class InfluenceMatrix:
    """A sparse dose-influence matrix and what its rows and columns mean.

    matrix : (n_voxels, n_beamlets) CSC, Gy per unit beamlet weight (MU), scipy (NumPy) or
        cupyx.scipy (CuPy; on the counting backend its stand-in) sparse, on the engine's device.
    grid : the dose grid of the rows; ``voxels`` are flat indices into it.
    beamlets : (n_beamlets, 3) int: beam, fine-grid row0, col0 of each beamlet block.
    beamlet_cells : block size in fine amplitudes.
    cutoff_mm : lateral cutoff used (None: full kernel reach).
    """

    matrix: object
    grid: Grid
    voxels: np.ndarray
    beamlets: np.ndarray
    beamlet_cells: int
    fluence_shapes: tuple
    cutoff_mm: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def fluence_maps(self, weights) -> list[np.ndarray]:
        """Host fluence maps (one per beam) of a beamlet weight vector."""
        w = backend.asnumpy(weights).astype(np.float32).ravel()
        if w.size != self.beamlets.shape[0]:
            raise ValueError(f"fluence_maps: {w.size} weights for {self.beamlets.shape[0]} beamlets")
        maps = [np.zeros(s, np.float32) for s in self.fluence_shapes]
        bc = self.beamlet_cells
        for (b, r0, c0), wt in zip(self.beamlets, w):
            maps[b][r0 : r0 + bc, c0 : c0 + bc] = wt
        return maps

    def points_xyz(self) -> np.ndarray:
        """Patient coordinates of the rows' voxel centres."""
        return self.grid.index_to_world(np.stack(np.unravel_index(self.voxels, self.grid.shape_zyx), axis=-1))


def influence_matrix(engine, grid: Grid | None = None, voxel_mask: np.ndarray | None = None, *,
                     beamlet_cells: int | None = None, beamlet_masks=None, cutoff_mm: float | None = 50.0,
                     progress=None) -> InfluenceMatrix:
    """Beamlet influence matrix of ``engine``'s beams on a dose grid.

    Parameters
    ----------
    engine : a :class:`DoseEngine` (its beams, machine, fluence grids and density).
    grid : the dose grid (default: the CT grid); e.g. ``Grid`` with 3 mm spacing over the CT.
    voxel_mask : bool (z, y, x) on ``grid``: the rows (default: inside the body).
    beamlet_cells : beamlet size in fine amplitudes; a multiple of the coarse fluence factor
        (default: the coarse fluence factor).
    beamlet_masks : optional list (per beam) of bool maps over the beamlet grid
        (ceil(nv / bc), ceil(nu / bc)) selecting the beamlets to include (default: all).
    cutoff_mm : keep beamlets whose centre is within this lateral distance (isocentre plane)
        of the voxel's ray; None keeps the full kernel reach (exact, but much denser).
    progress : ``progress(done, total, label)``.
    """
    xp = engine.xp
    f = engine.geometry[0].coarse_fluence_factor
    bc = int(beamlet_cells or f)
    if bc % f:
        raise ValueError(f"beamlet_cells ({bc}) must be a multiple of the coarse fluence factor ({f})")
    grid = grid or engine.grid
    if voxel_mask is None:
        voxel_mask = _body_on(engine, grid)
    if voxel_mask.shape != grid.shape_zyx:
        raise ValueError(f"voxel_mask shape {voxel_mask.shape} != grid shape {grid.shape_zyx}")
    voxels = np.flatnonzero(voxel_mask.ravel())
    if voxels.size == 0:
        raise ValueError("influence_matrix: no voxel selected")
    pts = grid.index_to_world(np.stack(np.unravel_index(voxels, grid.shape_zyx), axis=-1))
    rows_all, cols_all, vals_all = [], [], []
    beamlets = []
    col_offset = 0
    nb = engine.n_beams
    for b in range(nb):
        if progress:
            progress(b, nb, "influence matrix")
        geo = engine.geometry[b]
        fg = geo.fluence_grid
        nbr, nbc = -(-fg.shape_vu[0] // bc), -(-fg.shape_vu[1] // bc)
        bmask = np.ones((nbr, nbc), bool) if beamlet_masks is None else np.asarray(beamlet_masks[b], bool)
        if bmask.shape != (nbr, nbc):
            raise ValueError(f"beamlet_masks[{b}] shape {bmask.shape} != beamlet grid {(nbr, nbc)}")
        col_of = np.full((nbr, nbc), -1, np.int64)
        sel = np.argwhere(bmask)
        col_of[sel[:, 0], sel[:, 1]] = np.arange(sel.shape[0]) + col_offset
        for r, c in sel:
            beamlets.append((b, r * bc, c * bc))
        uf, vf, uc, vc, w = engine.point_weights(b, pts)
        # Response maps of one beamlet: fine (narrow components), coarse (broad components).
        block = xp.ones((bc, bc), xp.float32)
        fine_maps = xp.stack([convolve_full(block, geo.fine.kernels[i]) for i in range(len(geo.fine.components))]) if geo.fine.components else None
        nblk = bc // f
        cblock = xp.full((nblk, nblk), float(f * f), xp.float32)
        coarse_maps = xp.stack([convolve_full(cblock, geo.coarse.kernels[i]) for i in range(len(geo.coarse.components))]) if geo.coarse.components else None
        reach = max(geo.fine.half * fg.pitch_mm, geo.coarse.half * fg.pitch_mm * f) + bc * fg.pitch_mm
        lim = reach if cutoff_mm is None else min(reach, float(cutoff_mm))
        nwin = int(math.ceil(lim / (bc * fg.pitch_mm)))
        jr0 = xp.floor(vf / bc).astype(xp.int64)
        jc0 = xp.floor(uf / bc).astype(xp.int64)
        vox_rows = xp.arange(voxels.size, dtype=xp.int64)
        col_dev = xp.asarray(col_of)  # one upload per beam, not one per window
        wf = w[list(geo.fine.components)] if geo.fine.components else None
        wc = w[list(geo.coarse.components)] if geo.coarse.components else None
        for dr in range(-nwin, nwin + 1):
            for dc in range(-nwin, nwin + 1):
                jr = jr0 + dr
                jc = jc0 + dc
                ok = (jr >= 0) & (jr < nbr) & (jc >= 0) & (jc < nbc)
                # Lateral distance from the beamlet centre (fine cells) for the cutoff.
                cr = jr * bc + (bc - 1) / 2.0
                cc = jc * bc + (bc - 1) / 2.0
                if cutoff_mm is not None:
                    ok &= xp.hypot(vf - cr, uf - cc) * fg.pitch_mm <= cutoff_mm
                jr_s = xp.where(ok, jr, 0)
                jc_s = xp.where(ok, jc, 0)
                col = col_dev[jr_s, jc_s]
                ok &= col >= 0
                if not bool(ok.any()):
                    continue
                val = xp.zeros(voxels.size, xp.float32)
                if fine_maps is not None:
                    hf = geo.fine.half
                    s = sample_bilinear(fine_maps, vf - (jr * bc - hf), uf - (jc * bc - hf))
                    val += (wf * s).sum(axis=0)
                if coarse_maps is not None:
                    hc = geo.coarse.half
                    s = sample_bilinear(coarse_maps, vc - (jr * nblk - hc), uc - (jc * nblk - hc))
                    val += (wc * s).sum(axis=0)
                ok &= val != 0
                rows_all.append(vox_rows[ok])
                cols_all.append(col[ok])
                vals_all.append(val[ok])
        col_offset += sel.shape[0]
    if progress:
        progress(nb, nb, "influence matrix")
    rows = xp.concatenate(rows_all) if rows_all else xp.zeros(0, xp.int64)
    cols = xp.concatenate(cols_all) if cols_all else xp.zeros(0, xp.int64)
    vals = xp.concatenate(vals_all) if vals_all else xp.zeros(0, xp.float32)
    shape = (voxels.size, col_offset)
    mat = csc_from_triplets(vals, rows, cols, shape)
    return InfluenceMatrix(mat, grid, voxels, np.asarray(beamlets, np.int64).reshape(-1, 3), bc,
                           tuple(g.fluence_grid.shape_vu for g in engine.geometry), cutoff_mm)


def _body_on(engine, grid: Grid) -> np.ndarray:
    """The body mask resampled (nearest voxel) onto another grid."""
    if grid == engine.grid:
        return engine.body_mask
    pts = grid.voxel_centres_xyz().reshape(-1, 3)
    inside = engine.grid.contains(pts)
    idx = np.rint(engine.grid.world_to_index(pts[inside])).astype(np.int64)
    out = np.zeros(grid.size, bool)
    out[np.flatnonzero(inside)] = engine.body_mask[idx[:, 0], idx[:, 1], idx[:, 2]]
    return out.reshape(grid.shape_zyx)
