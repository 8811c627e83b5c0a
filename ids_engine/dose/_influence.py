"""Beamlet influence matrices (dose per unit beamlet weight) for the optimisers.

The matrix is the interactive engine's own model, built from its geometry cache (no second
ray trace) with the same two-level scheme: a beamlet's dose at a CT voxel is its narrow
(primary) part, bilinear in the beamlet's fluence convolved on the fine fluence grid, plus the
trilinear upsampling of its broad (scatter) part on the coarse dose grid, from the
block-summed fluence convolved on the coarse fluence grid; convolved maps are zero outside the
beam's map, as in the engine. A beamlet is a block of ``beamlet_cells`` x ``beamlet_cells``
fine amplitudes aligned with the coarse cells (cut at the map's edge). So ``matrix @ weights``
equals :meth:`DoseEngine.dose_cube` for the fluence ``fluence_maps(weights)`` at the rows'
voxels to float32 round-off when ``cutoff_mm`` is None.

Without a cutoff the matrix is kept in that two-level form, ``A = F + U C``
(:class:`TwoLevelMatrix`): ``F`` (rows x beamlets, sparse) the narrow part, a few beamlets
per row; ``C`` (coarse voxels x beamlets, dense) the broad part on the coarse voxels the rows
interpolate from; ``U`` (rows x coarse voxels, sparse, 8 entries a row) the trilinear
upsampling. It is exact (the engine computes its dose the same way) and much smaller than
the assembled matrix, whose scatter reaches every beamlet of a beam from every row (matRad's
TG119.mat, 9 beams, 5 mm beamlets, target and core rows: 4.3 M stored numbers instead of
17.4 M with a 50 mm cutoff or 27.6 M exact; built in 0.3 s instead of 1.2 s, and a product
``A @ w`` or ``A.T @ y`` takes 1.1 ms instead of 8-10 ms on one EPYC core, the parts fitting
in its cache).

A finite ``cutoff_mm`` drops every entry whose beamlet centre lies farther than that from the
voxel's ray (isocentre plane); the dropped tail is corrected by an offset
``engine dose(w) - matrix @ w`` (:meth:`InfluenceMatrix.tail_offset`) refreshed between
optimiser rounds, so the optimised plan's dose is the engine's dose.

Construction, per beam: the response of each beamlet shape (at most four: the map's last row
and column of beamlets may be cut) is summed directly from the kernels (float64, exact zeros
beyond the kernels' reach) and placed in a zero-padded flat table, so that every bilinear
corner of every (voxel, beamlet) pair is one gather at ``base[voxel] - offset[beamlet]``.
The broad part is evaluated densely on the coarse voxels the rows interpolate from, for a
block of beamlet columns at a time, and upsampled by a sparse product with the rows'
trilinear weights; the narrow part (a few beamlets per voxel) is enumerated and added; the
block is cut and its non-zeros taken in column order, so the CSC matrix needs no sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ids_engine import backend
from ids_engine.kernels.sparse import csc_from_columns, csc_from_triplets
from ids_engine.model import Grid

__all__ = ["InfluenceMatrix", "TwoLevelMatrix", "influence_matrix"]

_BLOCK_ELEMENTS = 1 << 24  # (rows x beamlet columns) evaluated at once: 64 MB of float32


class TwoLevelMatrix:
    """The influence matrix in the engine's two-level form ``A = F + U C`` (module docstring).

    Behaves as the (n_voxels, n_beamlets) matrix it stands for in products: ``A @ x`` and
    ``A.T @ y`` (x: (n_beamlets,) or (n_beamlets, k); y: (n_voxels,) or (n_voxels, k)), on the
    parts' backend, in the operands' common dtype (float32 operands: float32 products).

    Parameters
    ----------
    fine, fine_t : ``F`` (n_voxels, n_beamlets) and ``F.T`` as sparse matrices (host: CSR,
        so both products are row-wise; device: CSC), float32, Gy per unit weight.
    upsample, upsample_t : ``U`` (n_voxels, n_coarse) and ``U.T``, sparse, float32: trilinear
        weights (zero rows outside the body).
    coarse : ``C``, dense (n_coarse, n_beamlets) float32, Gy per unit weight, on the device.
    """

    format = "two-level"
    ndim = 2

    def __init__(self, fine, fine_t, upsample, upsample_t, coarse) -> None:
        n, m = (int(x) for x in fine.shape)
        if tuple(fine_t.shape) != (m, n) or tuple(upsample.shape) != (n, int(coarse.shape[0])) \
                or tuple(upsample_t.shape) != (int(coarse.shape[0]), n) or int(coarse.shape[1]) != m:
            raise ValueError(f"TwoLevelMatrix: parts do not fit: F {fine.shape}, F.T {fine_t.shape}, "
                             f"U {upsample.shape}, U.T {upsample_t.shape}, C {coarse.shape}")
        self.fine, self.fine_t = fine, fine_t
        self.upsample, self.upsample_t = upsample, upsample_t
        self.coarse = coarse
        self.shape = (n, m)

    dtype = property(lambda self: np.dtype(self.coarse.dtype))

    @property
    def nnz(self) -> int:
        """Stored numbers of ``F``, ``U`` and ``C`` (what one product reads)."""
        return int(self.fine.nnz) + int(self.upsample.nnz) + int(np.prod(self.coarse.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of all parts (values and indices, both orientations of ``F`` and ``U``)."""
        total = int(self.coarse.nbytes)
        for a in (self.fine, self.fine_t, self.upsample, self.upsample_t):
            total += sum(int(getattr(a, k).nbytes) for k in ("data", "indices", "indptr"))
        return total

    @property
    def xp(self):
        """The parts' array namespace (NumPy or CuPy)."""
        return backend.array_module(self.coarse)

    def __matmul__(self, x):
        return self.fine @ x + self.upsample @ (self.coarse @ x)

    dot = __matmul__

    @property
    def T(self) -> "_TransposedTwoLevel":  # noqa: N802 - NumPy's name
        return _TransposedTwoLevel(self)

    def toarray(self):
        """The assembled dense matrix (n_voxels, n_beamlets), on the parts' backend."""
        return self.fine.toarray() + self.upsample @ self.coarse

    def tocsc(self):
        """The assembled matrix as CSC (SciPy on the host; dense on the way: for export, not products)."""
        import scipy.sparse as sp

        return sp.csc_matrix(backend.asnumpy(self.toarray()))

    def tocsr(self):
        return self.tocsc().tocsr()

    def get(self) -> "TwoLevelMatrix":
        """A host (NumPy/SciPy) copy; the matrix itself when already on the host."""
        if self.xp is np:
            return self
        host = [p.get() for p in (self.fine, self.fine_t, self.upsample, self.upsample_t)]
        return TwoLevelMatrix(host[0].tocsr(), host[1].tocsr(), host[2].tocsr(), host[3].tocsr(),
                              backend.asnumpy(self.coarse))

    def __repr__(self) -> str:
        return (f"<TwoLevelMatrix {self.shape[0]} x {self.shape[1]}: F nnz {self.fine.nnz}, "
                f"C {self.coarse.shape[0]} x {self.coarse.shape[1]}, {self.dtype}>")


class _TransposedTwoLevel:
    """``A.T`` of a :class:`TwoLevelMatrix`: ``F.T y + C.T (U.T y)``."""

    ndim = 2

    def __init__(self, a: TwoLevelMatrix) -> None:
        self._a = a
        self.shape = (a.shape[1], a.shape[0])

    dtype = property(lambda self: self._a.dtype)
    T = property(lambda self: self._a)

    def __matmul__(self, y):
        a = self._a
        return a.fine_t @ y + a.coarse.T @ (a.upsample_t @ y)

    dot = __matmul__


@dataclass(frozen=True, eq=False)
class InfluenceMatrix:
    """A sparse dose-influence matrix and what its rows and columns mean.

    matrix : (n_voxels, n_beamlets) float32, Gy per unit beamlet weight (MU per amplitude), on
        the engine's device: with a cutoff a CSC matrix, scipy (NumPy) or cupyx.scipy (CuPy; on
        the counting backend its stand-in) sparse; without one the exact :class:`TwoLevelMatrix`
        (products ``matrix @ w``, ``matrix.T @ y``; ``tocsc()`` assembles it).
    grid : the dose grid of the rows; ``voxels`` are flat indices into it.
    voxels : (n_voxels,) int64 host, flat indices of the rows on ``grid``.
    beamlets : (n_beamlets, 3) int64 host: beam, fine-grid row0, col0 of each beamlet block.
    beamlet_cells : block size in fine amplitudes.
    fluence_shapes : per beam, the fine fluence map shape (rows, cols).
    cutoff_mm : lateral cutoff used (None: full kernel reach).
    ct_voxels : (n_voxels,) int64 host, the CT voxel (flat index on the engine's grid) whose
        engine dose each row reproduces: the row's own voxel on the CT grid, else the nearest
        CT voxel; -1 where the row lies outside the CT grid (a zero row).
    """

    matrix: object
    grid: Grid
    voxels: np.ndarray
    beamlets: np.ndarray
    beamlet_cells: int
    fluence_shapes: tuple
    cutoff_mm: float | None
    ct_voxels: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)

    def fluence_maps(self, weights) -> list[np.ndarray]:
        """Host fluence maps (one per beam, (nv, nu) float32, MU) of a beamlet weight vector."""
        w = backend.asnumpy(weights).astype(np.float32).ravel()
        if w.size != self.beamlets.shape[0]:
            raise ValueError(f"fluence_maps: {w.size} weights for {self.beamlets.shape[0]} beamlets")
        maps = [np.zeros(s, np.float32) for s in self.fluence_shapes]
        bc = self.beamlet_cells
        for (b, r0, c0), wt in zip(self.beamlets, w):
            maps[b][r0 : r0 + bc, c0 : c0 + bc] = wt
        return maps

    def points_xyz(self) -> np.ndarray:
        """Patient coordinates (mm, (n_voxels, 3)) of the rows' voxel centres."""
        return self.grid.index_to_world(np.stack(np.unravel_index(self.voxels, self.grid.shape_zyx), axis=-1))

    def engine_dose(self, engine, weights):
        """The engine's dose (Gy, (n_voxels,) float32 on the device) at the rows for the fluence
        ``fluence_maps(weights)``; the engine's plan state is restored afterwards (bit for bit).

        Parameters
        ----------
        engine : the :class:`DoseEngine` the matrix was built from.
        weights : (n_beamlets,) beamlet weights (MU per amplitude), host or device.
        """
        snap = engine.snapshot()
        try:
            engine.set_fluences(self.fluence_maps(weights))
            dose = engine.dose_at_voxels(np.maximum(self.ct_voxels, 0))
        finally:
            engine.restore(snap)
        if np.any(self.ct_voxels < 0):
            dose = dose * engine.xp.asarray(self.ct_voxels >= 0)
        return dose

    def tail_offset(self, engine, weights):
        """``engine dose(w) - matrix @ w`` at the rows (Gy, (n_voxels,) float32, device): the
        scatter tail a cutoff dropped, for fluence ``w``. Refresh it between optimiser rounds;
        ``dose(w, offset)`` then equals the engine's dose at the ``w`` it was taken at (float32
        round-off) and is close to it nearby. Zero to round-off without a cutoff."""
        w = engine.xp.asarray(np.asarray(backend.asnumpy(weights), np.float32).ravel())
        return self.engine_dose(engine, weights) - self.matrix @ w

    def dose(self, weights, offset=None):
        """``matrix @ weights (+ offset)``: the rows' dose (Gy, (n_voxels,) float32, device)."""
        d = self.matrix @ weights
        return d if offset is None else d + offset


def influence_matrix(engine, grid: Grid | None = None, voxel_mask: np.ndarray | None = None, *,
                     beamlet_cells: int | None = None, beamlet_masks=None, cutoff_mm: float | None = 50.0,
                     progress=None) -> InfluenceMatrix:
    """Beamlet influence matrix of ``engine``'s beams: the engine's own dose model, per beamlet.

    Parameters
    ----------
    engine : a :class:`DoseEngine` (its geometry cache, kernels and fluence grids).
    grid : the grid of the rows (default: the CT grid). On another grid (e.g. 3 mm over the
        CT) a row is the engine's dose at the CT voxel nearest its centre.
    voxel_mask : bool (z, y, x) on ``grid``: the rows (default: inside the body).
    beamlet_cells : beamlet size in fine amplitudes; a multiple of the coarse fluence factor
        (default: the coarse fluence factor).
    beamlet_masks : optional list (per beam) of bool maps over the beamlet grid
        (ceil(nv / bc), ceil(nu / bc)) selecting the beamlets to include (default: all).
    cutoff_mm : keep entries whose beamlet centre is within this lateral distance (mm,
        isocentre plane) of the voxel's ray (an assembled CSC matrix; correct the dropped tail
        with :meth:`InfluenceMatrix.tail_offset`); None keeps the full kernel reach, exactly,
        in the two-level form (:class:`TwoLevelMatrix`), which is also the smaller one.
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
    n = int(voxels.size)
    if n == 0:
        raise ValueError("influence_matrix: no voxel selected")
    ct = _ct_voxels(engine, grid, voxels)
    ct_safe = np.maximum(ct, 0)
    in_body = (ct >= 0) & engine.body_mask.ravel()[ct_safe]
    # Trilinear upsampling of the coarse level at the rows (the engine's dose_cube), as a
    # sparse (rows x needed coarse voxels) matrix shared by all beams.
    cidx, cw = engine._coarse_neighbours(ct_safe)
    cw = np.where(in_body[None, :], cw, np.float32(0))
    coarse_vox, inv = np.unique(cidx, return_inverse=True)
    inv = inv.reshape(cidx.shape)
    keep = cw != 0
    up = csc_from_triplets(xp.asarray(cw[keep]), xp.asarray(np.broadcast_to(np.arange(n), cidx.shape)[keep]),
                           xp.asarray(inv[keep]), (n, int(coarse_vox.size)))
    two_level = cutoff_mm is None
    if xp is np:
        up = up.tocsr()  # row-wise product: each row sums 8 rows of the coarse block
    values, rows, counts, beamlets = [], [], [], []
    fine_parts, n_cols_done = [], 0
    nb = engine.n_beams
    coarse_all = None
    if two_level:
        # C is filled in place, block by block: concatenating per-beam blocks would hold it
        # twice at the peak (the clinical horseshoe's body: 1 GB more).
        n_total = 0
        for b in range(nb):
            nv, nu = engine.geometry[b].fluence_grid.shape_vu
            n_total += int(np.count_nonzero(beamlet_masks[b])) if beamlet_masks is not None \
                else (-(-nv // bc)) * (-(-nu // bc))
        coarse_all = xp.zeros((int(coarse_vox.size), n_total), xp.float32)
    for b in range(nb):
        if progress:
            progress(b, nb, "influence matrix")
        geo = engine.geometry[b]
        nv, nu = geo.fluence_grid.shape_vu
        nbr, nbc = -(-nv // bc), -(-nu // bc)
        bmask = np.ones((nbr, nbc), bool) if beamlet_masks is None else np.asarray(beamlet_masks[b], bool)
        if bmask.shape != (nbr, nbc):
            raise ValueError(f"beamlet_masks[{b}] shape {bmask.shape} != beamlet grid {(nbr, nbc)}")
        sel = np.argwhere(bmask)
        beamlets.extend((b, r * bc, c * bc) for r, c in sel)
        if sel.shape[0] == 0:
            continue
        beam = _BeamTables(geo, bc, nbr, nbc, bmask)
        fine = beam.level_rows(xp, geo.fine, ct_safe, in_body) if geo.fine.components else None
        coarse = beam.level_rows(xp, geo.coarse, coarse_vox, None) if geo.coarse.components else None
        fine_entries = beam.fine_entries(xp, fine, by_column=not two_level) if fine is not None else None
        if two_level:
            m_all = sel.shape[0]
            if coarse is not None:
                step = max(1, _BLOCK_ELEMENTS // max(1, int(coarse_vox.size)))
                for j0 in range(0, m_all, step):
                    j1 = min(m_all, j0 + step)
                    coarse_all[:, n_cols_done + j0 : n_cols_done + j1] = _gather(
                        xp, coarse.table, coarse.base[:, None] - coarse.boff[None, j0:j1], coarse.w, coarse.offs)
            if fine_entries is not None:
                f_rows, f_cols, f_vals, _ = fine_entries
                nz = xp.flatnonzero(f_vals)  # corners beyond the kernel's reach read zeros
                # int32 indices: SciPy would otherwise copy int64 ones down to int32 (1e8 entries
                # for the clinical horseshoe's body rows).
                cols = (f_cols[nz] + n_cols_done).astype(xp.int32)
                fine_parts.append((f_vals[nz], f_rows[nz].astype(xp.int32), cols))
            n_cols_done += m_all
            continue
        # The rows' fine fluence position (cells) for the cutoff.
        pos = geo.fine.host.position[ct_safe]
        v_row = np.where(pos >= 0, geo.fine.host.v_cells[np.maximum(pos, 0)], np.float32(0))
        u_row = np.where(pos >= 0, geo.fine.host.u_cells[np.maximum(pos, 0)], np.float32(0))
        lim = None if cutoff_mm is None else float(cutoff_mm) / geo.fluence_grid.pitch_mm
        v_row_d, u_row_d = xp.asarray(v_row), xp.asarray(u_row)
        centre_r = (sel[:, 0] * bc + (bc - 1) / 2.0).astype(np.float32)
        centre_c = (sel[:, 1] * bc + (bc - 1) / 2.0).astype(np.float32)
        m_all = sel.shape[0]
        step = max(1, _BLOCK_ELEMENTS // n)
        for j0 in range(0, m_all, step):
            j1 = min(m_all, j0 + step)
            m = j1 - j0
            if coarse is not None:
                ac = _gather(xp, coarse.table, coarse.base[:, None] - coarse.boff[None, j0:j1], coarse.w, coarse.offs)
                block = up @ ac
            else:
                block = xp.zeros((n, m), xp.float32)
            if fine_entries is not None:
                f_rows, f_cols, f_vals, col_start = fine_entries
                s, e = int(col_start[j0]), int(col_start[j1])
                if e > s:
                    block[f_rows[s:e], f_cols[s:e] - j0] += f_vals[s:e]
            bt = xp.ascontiguousarray(block.T)  # (m, n): non-zeros in column order
            keep = bt != 0
            if lim is not None:
                d2 = xp.asarray(centre_r[j0:j1])[:, None] - v_row_d[None, :]
                d2 *= d2
                du = xp.asarray(centre_c[j0:j1])[:, None] - u_row_d[None, :]
                du *= du
                d2 += du
                keep &= d2 <= np.float32(lim * lim)
            cnt = xp.count_nonzero(keep, axis=1)
            nz = xp.flatnonzero(keep)
            values.append(bt.ravel()[nz])
            rows.append((nz % n).astype(xp.int32))
            counts.append(backend.asnumpy(cnt))
    if progress:
        progress(nb, nb, "influence matrix")
    n_cols = len(beamlets)
    if two_level:
        mat = _two_level(xp, fine_parts, coarse_all, up, n, n_cols)
        return InfluenceMatrix(mat, grid, voxels, np.asarray(beamlets, np.int64).reshape(-1, 3), bc,
                               tuple(g.fluence_grid.shape_vu for g in engine.geometry), cutoff_mm, ct)
    if values:
        vals_all = xp.concatenate(values) if len(values) > 1 else values[0]
        rows_all = xp.concatenate(rows) if len(rows) > 1 else rows[0]
        counts_all = np.concatenate(counts)
    else:
        vals_all, rows_all, counts_all = xp.zeros(0, xp.float32), xp.zeros(0, xp.int32), np.zeros(n_cols, np.int64)
    mat = csc_from_columns(vals_all, rows_all, counts_all, (n, n_cols))
    return InfluenceMatrix(mat, grid, voxels, np.asarray(beamlets, np.int64).reshape(-1, 3), bc,
                           tuple(g.fluence_grid.shape_vu for g in engine.geometry), cutoff_mm, ct)


def _two_level(xp, fine_parts, coarse, up, n: int, n_cols: int) -> TwoLevelMatrix:
    """Assemble :class:`TwoLevelMatrix` from the beams' narrow entries (values, rows, global
    columns; each beam's in column order) and the dense broad part (n_coarse, n_cols)."""
    if fine_parts:
        vals = xp.concatenate([p[0] for p in fine_parts])
        rows = xp.concatenate([p[1] for p in fine_parts])
        cols = xp.concatenate([p[2] for p in fine_parts])
        fine_parts.clear()  # the per-beam parts, freed before the sparse matrix is built
    else:
        vals, rows, cols = xp.zeros(0, xp.float32), xp.zeros(0, xp.int32), xp.zeros(0, xp.int32)
    if int(coarse.shape[1]) != n_cols:
        raise ValueError(f"influence_matrix: {coarse.shape[1]} broad columns for {n_cols} beamlets")
    fine = csc_from_triplets(vals, rows, cols, (n, n_cols))
    if xp is np:
        del vals, rows, cols  # the CSC holds its own copies: freed before the CSR is made
        # Both products row-wise on CSR: F from the CSC, F.T as the CSC's free transpose.
        up_csr = up.tocsr()
        return TwoLevelMatrix(fine.tocsr(), fine.T, up_csr, up_csr.T.tocsr(), coarse)
    fine_t = csc_from_triplets(vals, cols, rows, (n_cols, n))
    up_t = _transpose_on_device(xp, up)
    return TwoLevelMatrix(fine, fine_t, up, up_t, coarse)


def _transpose_on_device(xp, m):
    """The transpose of a device CSC matrix, as a device CSC matrix (from its triplets)."""
    indptr = backend.asnumpy(m.indptr)
    cols = xp.asarray(np.repeat(np.arange(m.shape[1]), np.diff(indptr)))
    return csc_from_triplets(m.data, cols, m.indices, (m.shape[1], m.shape[0]))


@dataclass(eq=False)
class _LevelRows:
    """One level's part of the matrix for some voxels: the padded response table (device),
    each voxel's base index and corner-times-component weights, each beamlet's offset."""

    table: object  # (T * nc * Hp * Wp,) float32 device: responses, zero-padded
    offs: tuple  # (q,) host ints: table offset of each (component, corner)
    base: object  # (n,) int32 device: (iv + py) * Wp + (iu + px)
    w: object  # (q, n) float32 device: component weight x bilinear corner weight (0 off the map)
    boff: object  # (m,) int32 device: offset of each selected beamlet's response
    boff_grid: np.ndarray  # (nbr, nbc) int32 host: the same for every beamlet-grid cell
    base_host: np.ndarray  # (n,) int32 host copy of ``base``
    corner: np.ndarray  # (2, n) int64 host: integer corner (row, col) on the level's map


class _BeamTables:
    """One beam's beamlet shapes and their responses on each level."""

    def __init__(self, geo, bc: int, nbr: int, nbc: int, bmask: np.ndarray) -> None:
        self.geo, self.bc, self.nbr, self.nbc, self.bmask = geo, bc, nbr, nbc, bmask
        nv, nu = geo.fluence_grid.shape_vu
        th = np.minimum(bc, nv - np.arange(nbr) * bc)
        tw = np.minimum(bc, nu - np.arange(nbc) * bc)
        shapes = np.stack(np.broadcast_arrays(th[:, None], tw[None, :]), axis=-1).reshape(-1, 2)
        self.shapes, type_of = np.unique(shapes, axis=0, return_inverse=True)
        self.type_grid = type_of.reshape(nbr, nbc)
        self.sel = np.argwhere(bmask)
        col_grid = np.full((nbr, nbc), -1, np.int64)
        col_grid[self.sel[:, 0], self.sel[:, 1]] = np.arange(self.sel.shape[0])
        self.col_grid = col_grid

    def level_rows(self, xp, lvl, level_index: np.ndarray, valid: np.ndarray | None) -> _LevelRows:
        """Tables of one level for voxels given by flat indices into the level's cube."""
        geo, bc = self.geo, self.bc
        f = geo.coarse_fluence_factor
        factor = 1 if lvl is geo.fine else f
        blk = bc // factor  # beamlet side in the level's cells
        h = lvl.host
        half = lvl.half
        mh, mw = lvl.map_shape
        kernels = h.kernels.astype(np.float64)
        nc, ks = kernels.shape[0], kernels.shape[-1]
        # Each beamlet shape's fluence on the level's grid (fine: ones; coarse: block sums).
        responses = []
        for th, tw in self.shapes:
            ones = np.zeros((blk * factor, blk * factor))
            ones[:th, :tw] = 1.0
            amp = ones.reshape(blk, factor, blk, factor).sum(axis=(1, 3))
            r = np.zeros((nc, blk + ks - 1, blk + ks - 1))
            for i, j in zip(*np.nonzero(amp)):
                r[:, i : i + ks, j : j + ks] += amp[i, j] * kernels
            responses.append(r)
        size = blk + ks - 1
        py, px = mh + 2, mw + 2
        hp, wp = 2 * mh + 2 * size + 8, 2 * mw + 2 * size + 8
        table = np.zeros((len(responses), nc, hp, wp), np.float32)
        for t, r in enumerate(responses):
            table[t, :, py : py + size, px : px + size] = r
        if table.size >= 2**31:
            raise ValueError("influence_matrix: response table too large for int32 offsets")
        # Per voxel: integer corner, bilinear weights (zero for corners off the map).
        pos = h.position[level_index]
        ok = pos >= 0 if valid is None else (pos >= 0) & valid
        p = np.maximum(pos, 0)
        v = h.v_cells[p]
        u = h.u_cells[p]
        iv = np.floor(v)
        iu = np.floor(u)
        tv = (v - iv).astype(np.float32)
        tu = (u - iu).astype(np.float32)
        iv = np.clip(iv, -2, mh).astype(np.int64)
        iu = np.clip(iu, -2, mw).astype(np.int64)
        one = np.float32(1)
        offs, wts = [], []
        for c in range(nc):
            wc = np.where(ok, h.weights[c, p], np.float32(0))
            for dr, fr in ((0, one - tv), (1, tv)):
                for dc, fc in ((0, one - tu), (1, tu)):
                    on_map = (iv + dr >= 0) & (iv + dr < mh) & (iu + dc >= 0) & (iu + dc < mw)
                    offs.append(c * hp * wp + dr * wp + dc)
                    wts.append(np.where(on_map, wc * (fr * fc), np.float32(0)))
        base = ((iv + py) * wp + (iu + px)).astype(np.int32)
        w = np.stack(wts).astype(np.float32)
        # Per beamlet-grid cell: offset of its response, origin (row0 - half, col0 - half).
        o_r = np.arange(self.nbr) * blk - half
        o_c = np.arange(self.nbc) * blk - half
        boff_grid = (o_r[:, None] * wp + o_c[None, :] - self.type_grid * (nc * hp * wp)).astype(np.int32)
        boff = boff_grid[self.sel[:, 0], self.sel[:, 1]]
        return _LevelRows(xp.asarray(table.ravel()), tuple(offs), xp.asarray(base), xp.asarray(w),
                          xp.asarray(boff), boff_grid, base, np.stack([iv, iu]))

    def fine_entries(self, xp, fine: _LevelRows, by_column: bool = True):
        """The narrow part's entries: every (row, selected beamlet) pair whose response reaches
        the row's bilinear corners, as device (rows, local columns, values) sorted by column,
        and the host start of each column (``by_column=False``: unsorted, and None)."""
        bc, half = self.bc, self.geo.fine.half
        # Beamlet rows whose response rows [jr * bc - half, jr * bc + bc - 1 + half] meet a
        # corner row iv or iv + 1 (one more is harmless: it reads zeros).
        nd = (bc + 2 * half + 1) // bc + 2
        n = fine.base_host.size
        iv, iu = fine.corner
        jr_lo = np.floor_divide(iv - half - bc + 1, bc)
        jc_lo = np.floor_divide(iu - half - bc + 1, bc)
        rows_l, cols_l, idx_l = [], [], []
        row_ids = np.arange(n, dtype=np.int64)
        d = np.arange(nd)
        for dr in range(nd):
            jr = jr_lo + dr  # (n,)
            jc = jc_lo[:, None] + d[None, :]  # (n, nd)
            ok = ((jr >= 0) & (jr < self.nbr))[:, None] & (jc >= 0) & (jc < self.nbc)
            jr_s = np.broadcast_to(np.clip(jr, 0, self.nbr - 1)[:, None], jc.shape)
            jc_s = np.clip(jc, 0, self.nbc - 1)
            col = self.col_grid[jr_s, jc_s]
            ok &= col >= 0
            rr = np.broadcast_to(row_ids[:, None], jc.shape)[ok]
            rows_l.append(rr)
            cols_l.append(col[ok])
            idx_l.append(fine.base_host[rr] - fine.boff_grid[jr_s[ok], jc_s[ok]])
        rows = np.concatenate(rows_l)
        cols = np.concatenate(cols_l)
        idx0 = np.concatenate(idx_l).astype(np.int32)
        col_start = None
        if by_column:
            order = np.argsort(cols, kind="stable")
            rows, cols, idx0 = rows[order], cols[order], idx0[order]
            col_start = np.searchsorted(cols, np.arange(self.sel.shape[0] + 1))
        rows_d = xp.asarray(rows)
        vals = _gather(xp, fine.table, xp.asarray(idx0)[:, None], fine.w[:, rows_d], fine.offs)[:, 0]
        return rows_d, xp.asarray(cols), vals, col_start


def _gather(xp, table, idx0, w, offs):
    """``out[i, j] = sum_q w[q, i] * table[idx0[i, j] + offs[q]]``: (n, m) float32 from
    ``idx0`` (n, m) int32 and ``w`` (q, n) float32 (device)."""
    out = xp.zeros(idx0.shape, xp.float32)
    for q, off in enumerate(offs):
        out += w[q][:, None] * xp.take(table, idx0 + np.int32(off))
    return out


def _ct_voxels(engine, grid: Grid, voxels: np.ndarray) -> np.ndarray:
    """Flat CT-grid index of each row (the nearest CT voxel; -1 outside the CT grid)."""
    if grid == engine.grid:
        return voxels.astype(np.int64)
    g = engine.grid
    pts = grid.index_to_world(np.stack(np.unravel_index(voxels, grid.shape_zyx), axis=-1))
    inside = g.contains(pts)
    idx = np.rint(g.world_to_index(pts[inside])).astype(np.int64)
    idx = np.clip(idx, 0, np.asarray(g.shape_zyx) - 1)
    out = np.full(voxels.size, -1, np.int64)
    out[inside] = np.ravel_multi_index((idx[:, 0], idx[:, 1], idx[:, 2]), g.shape_zyx)
    return out


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
