"""The SVD pencil-beam dose engine: geometry cache, full dose, exact incremental updates.

Dose model (eq. 4-5 of the IDS paper; Bortfeld et al. 1993), per beam ``b`` and voxel ``v``::

    D(v) = sum_b gy_per_mu * ISQ_b(v) * sum_c D_c(l_b(v)) * C_{b,c}(u_b(v), v_b(v)),
    C_{b,c} = psi_b conv w_c

with ``(u, v)`` the voxel's BEV position at the isocentre plane, ``l`` its radiological
depth and ``ISQ = (SAD / distance)^2``.

Two-level structure (what keeps exact updates local)
----------------------------------------------------
The machine's narrow components (the primary) are evaluated on the CT grid from
convolved maps on the fine fluence grid. The broad (scatter) components spread any
fluence change over most of a beam, so they are evaluated on a coarse dose grid
(``coarse_factor_zyx`` CT voxels per coarse voxel) from maps on a coarse fluence grid
(``coarse_fluence_factor`` amplitudes per coarse amplitude, block sums). The dose cube
is ``fine + trilinear_upsample(coarse)``; both parts are linear in the fluence, the full
computation uses the same scheme, and so summed incremental updates equal a full
recomputation to float32 round-off.

Per beam, once per geometry, the engine keeps for every body voxel (and every coarse
voxel near the body) its fractional fluence-grid position and its per-component weight
``gy_per_mu * ISQ * D_c(l)``, sorted by fluence tile (``tile_cells`` x ``tile_cells``
amplitudes), so that a patch touches only the voxels under the tiles its convolved
change reaches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ids_engine import backend
from ids_engine.kernels.pencil import (
    accumulate_bilinear,
    bilinear_contribution_numpy,
    convolve_full,
    convolve_full_batched,
    sample_bilinear,
)
from ids_engine.kernels.raytrace import radiological_depth
from ids_engine.model import Beam, FluenceGrid, Grid, Patient

from ids_engine.model import PhotonMachine, default_6mv

__all__ = ["BeamGeometry", "DoseEngine", "EngineOptions", "FluencePatch", "calibrate", "central_axis_ssd_mm"]


@dataclass(frozen=True)
class EngineOptions:
    """Discretisation of the engine.

    fluence_pitch_mm : amplitude spacing of the fine fluence grid at the isocentre plane.
    coarse_fluence_factor : fine amplitudes per coarse amplitude (per axis) for the broad components.
    coarse_factor_zyx : CT voxels per coarse dose voxel (per axis) for the broad components.
    tile_cells : fluence tile size (fine amplitudes per side) used to bucket voxels.
    kernel_fraction : lateral kernels are truncated where they fall below this fraction of their peak.
    field_margin_mm : margin of the automatic fluence grid around the body's projection.
    """

    fluence_pitch_mm: float = 1.0
    coarse_fluence_factor: int = 4
    coarse_factor_zyx: tuple[int, int, int] = (2, 4, 4)
    tile_cells: int = 8
    kernel_fraction: float = 1e-4
    field_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if not self.fluence_pitch_mm > 0:
            raise ValueError("EngineOptions.fluence_pitch_mm must be positive")
        if int(self.coarse_fluence_factor) < 1 or int(self.tile_cells) < 1:
            raise ValueError("EngineOptions.coarse_fluence_factor and tile_cells must be >= 1")
        if len(self.coarse_factor_zyx) != 3 or min(self.coarse_factor_zyx) < 1:
            raise ValueError("EngineOptions.coarse_factor_zyx must be three integers >= 1")


@dataclass(frozen=True, eq=False)
class FluencePatch:
    """A change of one beam's fluence on a rectangle of its fine fluence grid.

    beam : beam index.
    row0, col0 : fine-grid index of ``delta[0, 0]``.
    delta : (h, w) float32 change in fluence (MU), any sign.
    """

    beam: int
    row0: int
    col0: int
    delta: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.delta.shape)


# ----------------------------------------------------------------------------- helpers
def _kernel_grid(machine: PhotonMachine, component: int, pitch_mm: float, fraction: float) -> np.ndarray:
    """The radial kernel sampled on a square grid of ``pitch_mm``, times the cell area (sums to ~1)."""
    reach = machine.kernel_reach_mm(component, fraction)
    if machine.kernel_pixel_mm:
        return _kernel_grid_from_pixels(machine, component, pitch_mm, reach)
    half = max(1, int(math.ceil(reach / pitch_mm)))
    x = np.arange(-half, half + 1) * pitch_mm
    r = np.hypot(x[None, :], x[:, None])
    k = machine.kernel_at(component, r) * pitch_mm**2
    k[r > reach] = 0.0
    # Keep the sum of the truncated kernel equal to the analytic integral within the reach,
    # so a coarse and a fine sampling of the same kernel give the same output factor.
    rr = machine.kernel_radius_mm
    inside = rr <= reach
    analytic = np.trapezoid(2 * np.pi * rr[inside] * machine.kernels_per_mm2[component][inside], rr[inside])
    total = k.sum()
    if total > 0 and analytic > 0:
        k *= analytic / total
    return k.astype(np.float32)


def _kernel_grid_from_pixels(machine: PhotonMachine, component: int, pitch_mm: float, reach: float) -> np.ndarray:
    """Kernels given as pixel values (matRad: 0.5 mm pixels, one centred on r = 0): each pixel's
    mass ``k(r) * a^2`` is splatted bilinearly onto the engine's cells (mass-conserving)."""
    a = float(machine.kernel_pixel_mm)
    n_native = int(math.ceil(reach / a))
    xs = np.arange(-n_native, n_native + 1) * a
    r = np.hypot(xs[None, :], xs[:, None])
    mass = machine.kernel_at(component, r) * a * a
    mass[r > reach] = 0.0
    half = int(math.ceil(reach / pitch_mm)) + 1
    out = np.zeros((2 * half + 1, 2 * half + 1))
    f = xs / pitch_mm + half
    i0 = np.floor(f).astype(int)
    w = f - i0
    rows0, cols0 = np.meshgrid(i0, i0, indexing="ij")
    wr, wc = np.meshgrid(w, w, indexing="ij")
    for dr, fr in ((0, 1 - wr), (1, wr)):
        for dc, fc in ((0, 1 - wc), (1, wc)):
            np.add.at(out, (rows0 + dr, cols0 + dc), mass * fr * fc)
    return out.astype(np.float32)


def _stack_centred(kernels: list[np.ndarray]) -> np.ndarray:
    """Stack square odd-sized kernels, zero-padding the smaller ones around their centre."""
    if not kernels:
        return np.zeros((0, 1, 1), np.float32)
    n = max(k.shape[0] for k in kernels)
    out = np.zeros((len(kernels), n, n), np.float32)
    for i, k in enumerate(kernels):
        o = (n - k.shape[0]) // 2
        out[i, o : o + k.shape[0], o : o + k.shape[1]] = k
    return out


def _block_sum(xp, a, factor: int):
    """Sum ``factor`` x ``factor`` blocks of a 2D array (padded with zeros to a multiple)."""
    h, w = a.shape
    hh, ww = -(-h // factor) * factor, -(-w // factor) * factor
    if (hh, ww) != (h, w):
        p = xp.zeros((hh, ww), dtype=a.dtype)
        p[:h, :w] = a
        a = p
    return a.reshape(hh // factor, factor, ww // factor, factor).sum(axis=(1, 3))


def _tile_ranges(tile_start: np.ndarray, ntc: int, r0: int, r1: int, c0: int, c1: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of sorted voxels in tiles rows r0..r1, cols c0..c1 (inclusive)."""
    out = []
    for tr in range(r0, r1 + 1):
        s = int(tile_start[tr * ntc + c0])
        e = int(tile_start[tr * ntc + c1 + 1])
        if e > s:
            out.append((s, e))
    return out


@dataclass(eq=False)
class _Level:
    """Voxels of one level (fine or coarse) for one beam, sorted by fluence tile (device arrays)."""

    vox: object  # (n,) int32 flat index into the level's cube
    u: object  # (n,) float32 fractional column on the level's fluence grid
    v: object  # (n,) float32 fractional row
    weights: object  # (nc, n) float32 gy_per_mu * ISQ * D_c(l)
    depth_mm: object  # (n,) float32 radiological depth
    tile_start: np.ndarray  # host int64 (ntr * ntc + 1,)
    ntr: int
    ntc: int
    tile: int  # level fluence cells per tile side
    components: tuple[int, ...]
    kernels: object  # (nc, kh, kw) float32 on the level's fluence grid
    half: int  # kernel half width (cells)
    map_shape: tuple[int, int]  # level fluence map shape (rows, cols)
    position: object = None  # (level cube size,) int32: sorted position of each voxel, -1 if none

    def ranges(self, r0: int, r1: int, c0: int, c1: int) -> list[tuple[int, int]]:
        """Sorted-voxel ranges whose bilinear lookup may read map rows r0..r1, cols c0..c1."""
        r0 = max(r0 - 1, 0) // self.tile
        c0 = max(c0 - 1, 0) // self.tile
        r1 = min(r1, self.map_shape[0] - 1) // self.tile
        c1 = min(c1, self.map_shape[1] - 1) // self.tile
        r1 = min(r1, self.ntr - 1)
        c1 = min(c1, self.ntc - 1)
        if r1 < r0 or c1 < c0:
            return []
        return _tile_ranges(self.tile_start, self.ntc, r0, r1, c0, c1)


@dataclass(eq=False)
class BeamGeometry:
    """Per-beam geometry cache (on the device): fine and coarse voxel levels and the fluence grids.

    ``ssd_mm`` is the beam's central-axis SSD (None when the axis misses the body) and
    ``machine`` the engine's machine with the kernel set tabulated nearest that SSD
    (:meth:`PhotonMachine.for_ssd`; the engine's own machine when it has a single set).
    """

    beam: Beam
    fluence_grid: FluenceGrid
    fine: _Level
    coarse: _Level
    coarse_fluence_factor: int
    ssd_mm: float | None = None
    machine: PhotonMachine | None = None

    @property
    def kernel_ssd_mm(self) -> float | None:
        """SSD (mm) of the kernel set this beam uses (None for an SSD-independent machine)."""
        return self.machine.kernel_ssd_mm if self.machine is not None else None


def _gather(xp, lvl: _Level, ranges):
    """The sorted voxels of some tile ranges: flat index, u, v, weights. Contiguous runs are
    concatenated (copies at memory speed, no fancy-index gather)."""
    if len(ranges) == 1:
        s, e = ranges[0]
        return lvl.vox[s:e], lvl.u[s:e], lvl.v[s:e], lvl.weights[:, s:e]
    cat = lambda a: xp.concatenate([a[..., s:e] for s, e in ranges], axis=-1)  # noqa: E731
    return cat(lvl.vox), cat(lvl.u), cat(lvl.v), cat(lvl.weights)


def _job_contribution(job):
    """NumPy: the dose contribution of one level job (run on the thread pool)."""
    _, lvl, ranges, dmaps, origin = job
    vox, u, v, wts = _gather(np, lvl, ranges)
    return vox, bilinear_contribution_numpy(u, v, wts, dmaps, origin)


_POOL = None


def _pool():
    """A small thread pool for the NumPy voxel work (created on first use)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(n, 4)), thread_name_prefix="ids-dose")
    return _POOL


# matRad's threshold on the relative electron density for the skin along a ray (matRad_computeSSD).
SSD_DENSITY_THRESHOLD = 0.05


def central_axis_ssd_mm(density_zyx, grid: Grid, beam: Beam, patient_position: str = "HFS",
                        threshold: float = SSD_DENSITY_THRESHOLD) -> float | None:
    """Source-surface distance along a beam's central axis (mm), as matRad computes a ray's SSD.

    The central axis is traced (Siddon, float64, on the host) from the source over twice the
    SAD, through and beyond the isocentre; the SSD is the distance from the source to where it
    enters the first voxel whose density exceeds ``threshold`` (matRad_computeSSD). None when
    the axis misses every such voxel.

    Parameters
    ----------
    density_zyx : (nz, ny, nx) relative electron density on ``grid`` (NumPy or CuPy), zero
        outside the body; only the voxels on the axis are read.
    grid : the CT grid.
    beam : the beam (source, direction and SAD).
    """
    s = np.asarray(beam.source_mm_xyz(patient_position), dtype=np.float64)
    length = 2.0 * beam.sad_mm
    delta = np.asarray(beam.direction_xyz(patient_position), dtype=np.float64) * length
    n_xyz = np.array(grid.shape_zyx[::-1])
    d = np.array(grid.spacing_mm_zyx[::-1], dtype=np.float64)
    o = np.array(grid.origin_mm_xyz, dtype=np.float64)
    alphas = [np.array([0.0, 1.0])]
    for a in range(3):
        if delta[a] != 0.0:
            al = (o[a] + (np.arange(n_xyz[a] + 1) - 0.5) * d[a] - s[a]) / delta[a]
            alphas.append(al[(al > 0.0) & (al < 1.0)])
    al = np.unique(np.concatenate(alphas))
    mid = 0.5 * (al[:-1] + al[1:])
    idx = np.floor((s + mid[:, None] * delta - o) / d + 0.5).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < n_xyz), axis=1)
    if not inside.any():
        return None
    i, j, k = idx[inside].T
    xp = backend.array_module(density_zyx)
    rho = np.asarray(backend.asnumpy(density_zyx[xp.asarray(k), xp.asarray(j), xp.asarray(i)]), dtype=np.float64)
    hit = np.flatnonzero(rho > threshold)
    if hit.size == 0:
        return None
    return float(al[:-1][inside][hit[0]] * length)


def _auto_fluence_grid(beam: Beam, points_xyz: np.ndarray, position: str, pitch: float, margin_mm: float, align: int) -> FluenceGrid:
    """A fluence grid covering the BEV projection of ``points`` plus a margin, with the axis on a node."""
    bev = beam.patient_to_bev(points_xyz, position)
    umin, umax = bev[:, 0].min() - margin_mm, bev[:, 0].max() + margin_mm
    vmin, vmax = bev[:, 1].min() - margin_mm, bev[:, 1].max() + margin_mm
    step = pitch * align
    i0 = math.floor(umin / step) * align
    i1 = math.ceil(umax / step) * align
    j0 = math.floor(vmin / step) * align
    j1 = math.ceil(vmax / step) * align
    return FluenceGrid((j1 - j0 + 1, i1 - i0 + 1), pitch, (i0 * pitch, j0 * pitch))


# ----------------------------------------------------------------------------- engine
class DoseEngine:
    """Pencil-beam dose for one patient and a set of beams, kept on the active backend's device.

    Parameters
    ----------
    patient : the patient (CT, body contour).
    beams : the beams; their fluence grids are chosen automatically when not set.
    machine : beam model (default: :func:`default_6mv`); calibrated here if needed.
    options : discretisation (:class:`EngineOptions`).
    progress : optional ``progress(done, total, label)`` callable for the geometry build.

    Fluence is in MU per amplitude: an open field of fluence 1 delivers 1 MU (0.01 Gy at
    dmax for a 10 x 10 cm field at SSD 100 cm with the default calibration).
    """

    def __init__(
        self,
        patient: Patient,
        beams: Sequence[Beam],
        machine: PhotonMachine | None = None,
        *,
        options: EngineOptions | None = None,
        progress=None,
    ) -> None:
        if not beams:
            raise ValueError("DoseEngine needs at least one beam")
        self.patient = patient
        self.options = options or EngineOptions()
        machine = machine or default_6mv()
        if machine.gy_per_mu is None:
            machine = calibrate(machine, self.options)
        self.machine = machine
        self.xp = backend.xp()
        self.grid: Grid = patient.grid
        self.coarse_grid: Grid = patient.grid.downsampled(self.options.coarse_factor_zyx)
        self._build_masks()
        self.beams: list[Beam] = []
        self.geometry: list[BeamGeometry] = []
        self._fluence: list = []
        self._maps_fine: list = []
        self._maps_coarse: list = []
        self.dose_fine = self.xp.zeros(self.grid.size, dtype=self.xp.float32)
        self.dose_coarse = self.xp.zeros(self.coarse_grid.size, dtype=self.xp.float32)
        self._density = None
        total = len(beams)
        for i, b in enumerate(beams):
            if progress:
                progress(i, total, "geometry cache")
            self._add_beam(b)
        self.__dict__.pop("_points_cache", None)
        if progress:
            progress(total, total, "geometry cache")

    # ------------------------------------------------------------------ set-up
    def _build_masks(self) -> None:
        xp = self.xp
        body = self.patient.body_mask()
        if not body.any():
            raise ValueError("the patient's body (external) contour is empty")
        self.body_mask = body
        self.body_index = np.flatnonzero(body.ravel()).astype(np.int32)  # host
        fz, fy, fx = self.options.coarse_factor_zyx
        cg = self.coarse_grid
        # A coarse voxel is needed when any fine body voxel interpolates from it: dilate
        # the block-wise "any body voxel" mask by one coarse voxel.
        from scipy import ndimage

        nz, ny, nx = cg.shape_zyx
        pad = np.zeros((nz * fz, ny * fy, nx * fx), dtype=bool)
        pad[: body.shape[0], : body.shape[1], : body.shape[2]] = body
        blocks = pad.reshape(nz, fz, ny, fy, nx, fx).any(axis=(1, 3, 5))
        cmask = ndimage.binary_dilation(blocks, iterations=1)
        self.coarse_mask = cmask
        self.coarse_index = np.flatnonzero(cmask.ravel()).astype(np.int32)
        # Separable trilinear upsampling tables (fine index -> coarse index, weight).
        self._up = []
        for axis in range(3):
            f = self.options.coarse_factor_zyx[axis]
            n_fine = self.grid.shape_zyx[axis]
            n_c = cg.shape_zyx[axis]
            pos = (np.arange(n_fine) - (f - 1) / 2.0) / f
            i0 = np.clip(np.floor(pos), 0, max(n_c - 2, 0)).astype(np.int64)
            w = np.clip(pos - i0, 0.0, 1.0).astype(np.float32)
            i1 = np.minimum(i0 + 1, n_c - 1)
            self._up.append((xp.asarray(i0), xp.asarray(i1), xp.asarray(w)))
        self._body_mask_dev = xp.asarray(body.ravel())

    def _level_points(self, grid: Grid, index: np.ndarray) -> np.ndarray:
        """Voxel centres (patient coordinates, (n, 3)) of a level, computed once per engine."""
        key = (grid, index.size)
        cache = self.__dict__.setdefault("_points_cache", {})
        if key not in cache:
            cache[key] = grid.index_to_world(np.stack(np.unravel_index(index, grid.shape_zyx), axis=-1))
        return cache[key]

    def _density_device(self):
        if self._density is None:
            dens = self.patient.relative_electron_density().copy()
            dens[~self.body_mask] = 0.0
            self._density = self.xp.asarray(dens)
        return self._density

    def _build_level(self, beam: Beam, grid: Grid, index: np.ndarray, fgrid: FluenceGrid, factor: int,
                     components: tuple[int, ...], machine: PhotonMachine) -> _Level:
        xp = self.xp
        opts = self.options
        pos = self.patient.patient_position
        pts = self._level_points(grid, index)
        bev = beam.patient_to_bev(pts, pos)
        src = beam.source_mm_xyz(pos)
        g = self.grid
        depth = radiological_depth(
            self._density_device(), g.spacing_mm_zyx, g.origin_mm_xyz, tuple(src), xp.asarray(pts)
        )
        depth = xp.asarray(depth, dtype=xp.float32)
        # Fractional position on this level's fluence grid.
        pitch = fgrid.pitch_mm * factor
        u0 = fgrid.origin_mm_uv[0] + (factor - 1) / 2.0 * fgrid.pitch_mm
        v0 = fgrid.origin_mm_uv[1] + (factor - 1) / 2.0 * fgrid.pitch_mm
        u = ((bev[:, 0] - u0) / pitch).astype(np.float32)
        v = ((bev[:, 1] - v0) / pitch).astype(np.float32)
        map_shape = (-(-fgrid.shape_vu[0] // factor), -(-fgrid.shape_vu[1] // factor))
        tile = max(1, opts.tile_cells // factor) if factor > 1 else opts.tile_cells
        ntr = -(-map_shape[0] // tile)
        ntc = -(-map_shape[1] // tile)
        tr = np.clip(np.floor(v), 0, map_shape[0] - 1).astype(np.int64) // tile
        tc = np.clip(np.floor(u), 0, map_shape[1] - 1).astype(np.int64) // tile
        tile_id = tr * ntc + tc
        order = np.argsort(tile_id, kind="stable")
        tile_start = np.searchsorted(tile_id[order], np.arange(ntr * ntc + 1)).astype(np.int64)
        # Per-voxel component weights: gy_per_mu * ISQ * D_c(l), D_c evaluated analytically
        # in float64 on the host for both backends (a 0.5 mm table was 0.6 % low at 1.25 mm).
        isq = (beam.sad_mm / bev[:, 2]) ** 2
        depth_h = backend.asnumpy(depth)
        w = machine.depth_components(depth_h, components) * (isq * machine.gy_per_mu)
        # A coarse amplitude is the block sum of factor^2 fine amplitudes, each of which
        # stands for one fine cell's area: so the kernel sums to 1 / factor^2.
        kernels = _stack_centred([_kernel_grid(machine, c, pitch, opts.kernel_fraction) for c in components])
        kernels /= np.float32(factor * factor)
        half = (kernels.shape[-1] - 1) // 2
        order_dev = xp.asarray(order)
        position = np.full(grid.size, -1, dtype=np.int32)
        position[index[order]] = np.arange(order.size, dtype=np.int32)
        return _Level(
            vox=xp.asarray(index[order].astype(np.int32)),
            u=xp.asarray(u)[order_dev],
            v=xp.asarray(v)[order_dev],
            weights=xp.asarray(w.astype(np.float32))[:, order_dev] if components else xp.zeros((0, order.size), xp.float32),
            depth_mm=depth[order_dev],
            tile_start=tile_start,
            ntr=ntr,
            ntc=ntc,
            tile=tile,
            components=components,
            kernels=xp.asarray(kernels),
            half=half,
            map_shape=map_shape,
            position=xp.asarray(position),
        )

    def _add_beam(self, beam: Beam) -> None:
        opts = self.options
        pos = self.patient.patient_position
        fgrid = beam.fluence_grid
        f = int(opts.coarse_fluence_factor)
        if fgrid is None:
            body_pts = self._level_points(self.grid, self.body_index)
            fgrid = _auto_fluence_grid(beam, body_pts, pos, opts.fluence_pitch_mm, opts.field_margin_mm, f)
            from dataclasses import replace

            beam = replace(beam, fluence_grid=fgrid)
        # matRad's rule: the kernel set tabulated nearest the central axis's SSD, per beam.
        ssd = central_axis_ssd_mm(self._density_device(), self.grid, beam, pos)
        machine = self.machine.for_ssd(ssd) if ssd is not None else self.machine
        fine = self._build_level(beam, self.grid, self.body_index, fgrid, 1, machine.narrow_components, machine)
        coarse = self._build_level(beam, self.coarse_grid, self.coarse_index, fgrid, f, machine.broad_components, machine)
        geo = BeamGeometry(beam, fgrid, fine, coarse, f, ssd, machine)
        xp = self.xp
        self.beams.append(beam)
        self.geometry.append(geo)
        self._fluence.append(xp.zeros(fgrid.shape_vu, dtype=xp.float32))
        self._maps_fine.append(xp.zeros((len(fine.components),) + fine.map_shape, dtype=xp.float32))
        self._maps_coarse.append(xp.zeros((len(coarse.components),) + coarse.map_shape, dtype=xp.float32))

    # ------------------------------------------------------------------ fluence
    @property
    def n_beams(self) -> int:
        return len(self.beams)

    def fluence(self, b: int):
        """Beam ``b``'s fluence map (device, (nv, nu) float32, MU). Do not modify in place."""
        return self._fluence[b]

    def fluences_host(self) -> list[np.ndarray]:
        return [backend.asnumpy(f).copy() for f in self._fluence]

    def set_fluences(self, fluences: Sequence) -> None:
        """Replace all fluence maps and recompute the dose from scratch."""
        if len(fluences) != self.n_beams:
            raise ValueError(f"set_fluences: {len(fluences)} maps for {self.n_beams} beams")
        xp = self.xp
        for b, f in enumerate(fluences):
            a = xp.asarray(f, dtype=xp.float32)
            if a.shape != self.geometry[b].fluence_grid.shape_vu:
                raise ValueError(f"set_fluences: beam {b} map shape {a.shape} != {self.geometry[b].fluence_grid.shape_vu}")
            self._fluence[b] = a.copy()
        self.recompute()

    def open_field(self, b: int, u_range_mm: tuple[float, float], v_range_mm: tuple[float, float], mu: float = 1.0) -> np.ndarray:
        """A host fluence map for beam ``b``: ``mu`` inside a BEV rectangle (at the isocentre plane), 0 outside."""
        return self.geometry[b].fluence_grid.rectangle_mask(u_range_mm, v_range_mm).astype(np.float32) * np.float32(mu)

    def snapshot(self) -> tuple:
        """A copy of the engine's plan state (fluences, convolved maps, dose levels), on the device."""
        copy = lambda arrays: [a.copy() for a in arrays]  # noqa: E731
        return (copy(self._fluence), copy(self._maps_fine), copy(self._maps_coarse),
                self.dose_fine.copy(), self.dose_coarse.copy())

    def restore(self, snap: tuple) -> None:
        """Go back to a :meth:`snapshot` exactly (bit for bit)."""
        fl, mf, mc, df, dc = snap
        self._fluence = [a.copy() for a in fl]
        self._maps_fine = [a.copy() for a in mf]
        self._maps_coarse = [a.copy() for a in mc]
        self.dose_fine = df.copy()
        self.dose_coarse = dc.copy()

    # ------------------------------------------------------------------ full dose
    def recompute(self) -> None:
        """Full dose from the current fluence maps (same scheme as the incremental path)."""
        xp = self.xp
        self.dose_fine.fill(0)
        self.dose_coarse.fill(0)
        for b in range(self.n_beams):
            geo = self.geometry[b]
            psi = self._fluence[b]
            self._maps_fine[b] = self._convolve_level(psi, geo.fine, 0, 0)
            psi_c = _block_sum(xp, psi, geo.coarse_fluence_factor)
            self._maps_coarse[b] = self._convolve_level(psi_c, geo.coarse, 0, 0)
            for lvl, maps, dose in ((geo.fine, self._maps_fine[b], self.dose_fine), (geo.coarse, self._maps_coarse[b], self.dose_coarse)):
                if lvl.components:
                    accumulate_bilinear(dose, lvl.vox, lvl.u, lvl.v, lvl.weights, maps, (0, 0))

    def _convolve_level(self, psi, lvl: _Level, r0: int, c0: int):
        """Convolved maps of ``psi`` (placed at r0, c0 of the level grid), clipped to the level map."""
        xp = self.xp
        out = xp.zeros((len(lvl.components),) + lvl.map_shape, dtype=xp.float32)
        if not lvl.components:
            return out
        h = lvl.half
        for i in range(len(lvl.components)):
            full = convolve_full(psi, lvl.kernels[i])
            out[i] = self._clip_into(full, r0 - h, c0 - h, lvl.map_shape)
        return out

    def _clip_into(self, a, r0: int, c0: int, shape):
        xp = self.xp
        out = xp.zeros(shape, dtype=xp.float32)
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + a.shape[0], shape[0]), min(c0 + a.shape[1], shape[1])
        if re > rs and ce > cs:
            out[rs:re, cs:ce] = a[rs - r0 : re - r0, cs - c0 : ce - c0]
        return out

    # ------------------------------------------------------------------ incremental
    def apply_patches(self, patches: Sequence[FluencePatch]) -> None:
        """Add fluence patches and update the dose incrementally (exact by linearity).

        On NumPy the per-beam voxel work runs on a small thread pool (NumPy releases the GIL
        in array operations); the scatter into the dose stays serial and in patch order, so the
        result is the same as a serial update, bit for bit.
        """
        xp = self.xp
        jobs = []
        for p in patches:
            geo = self.geometry[p.beam]
            delta = xp.asarray(p.delta, dtype=xp.float32)
            h, w = delta.shape
            nv, nu = geo.fluence_grid.shape_vu
            if p.row0 < 0 or p.col0 < 0 or p.row0 + h > nv or p.col0 + w > nu:
                raise ValueError(
                    f"patch for beam {p.beam} at rows {p.row0}:{p.row0 + h}, cols {p.col0}:{p.col0 + w} "
                    f"leaves the fluence grid {nv}x{nu}"
                )
        for p in patches:
            geo = self.geometry[p.beam]
            delta = xp.asarray(p.delta, dtype=xp.float32)
            h, w = delta.shape
            self._fluence[p.beam][p.row0 : p.row0 + h, p.col0 : p.col0 + w] += delta
            jobs.append(self._update_level(geo.fine, self._maps_fine[p.beam], self.dose_fine, delta, p.row0, p.col0))
            f = geo.coarse_fluence_factor
            R0, C0 = p.row0 // f, p.col0 // f
            R1, C1 = (p.row0 + h - 1) // f + 1, (p.col0 + w - 1) // f + 1
            placed = xp.zeros(((R1 - R0) * f, (C1 - C0) * f), dtype=xp.float32)
            placed[p.row0 - R0 * f : p.row0 - R0 * f + h, p.col0 - C0 * f : p.col0 - C0 * f + w] = delta
            delta_c = _block_sum(xp, placed, f)
            jobs.append(self._update_level(geo.coarse, self._maps_coarse[p.beam], self.dose_coarse, delta_c, R0, C0))
        jobs = [j for j in jobs if j is not None]
        if xp is np and len(jobs) > 1:
            results = list(_pool().map(_job_contribution, jobs))
            for job, (vox, contrib) in zip(jobs, results):
                job[0][vox] += contrib
            return
        for dose, lvl, ranges, dmaps, origin in jobs:
            vox, u, v, wts = _gather(xp, lvl, ranges)
            accumulate_bilinear(dose, vox, u, v, wts, dmaps, origin)

    def _update_level(self, lvl: _Level, maps, dose, delta, r0: int, c0: int):
        """Convolve a patch on one level, add it to the level's maps, and return the voxel job
        ``(dose, level, ranges, dmaps, origin)`` (None when no voxel is touched)."""
        if not lvl.components:
            return None
        xp = self.xp
        hk = lvl.half
        dmaps = xp.stack([convolve_full(delta, lvl.kernels[i]) for i in range(len(lvl.components))])
        o_r, o_c = r0 - hk, c0 - hk
        # Clip the change to the level's map (voxels never read outside it).
        rs, cs = max(o_r, 0), max(o_c, 0)
        re = min(o_r + dmaps.shape[1], lvl.map_shape[0])
        ce = min(o_c + dmaps.shape[2], lvl.map_shape[1])
        if re <= rs or ce <= cs:
            return None
        dmaps = dmaps[:, rs - o_r : re - o_r, cs - o_c : ce - o_c]
        maps[:, rs:re, cs:ce] += dmaps
        ranges = lvl.ranges(rs, re - 1, cs, ce - 1)
        if not ranges:
            return None
        return (dose, lvl, ranges, dmaps, (rs, cs))

    # ------------------------------------------------------------------ read-out
    def _upsample(self, coarse_cube):
        """Trilinear upsampling of a coarse cube (nzc, nyc, nxc) to the CT grid (separable)."""
        xp = self.xp
        a = coarse_cube
        for axis in range(3):
            i0, i1, w = self._up[axis]
            shape = [1, 1, 1]
            shape[axis] = -1
            w = w.reshape(shape)
            a = xp.take(a, i0, axis=axis) * (1 - w) + xp.take(a, i1, axis=axis) * w
        return a

    def dose_cube(self):
        """The dose (Gy) on the CT grid, (nz, ny, nx) float32 on the device; zero outside the body."""
        xp = self.xp
        coarse = self.dose_coarse.reshape(self.coarse_grid.shape_zyx)
        up = self._upsample(coarse).reshape(-1)
        total = self.dose_fine + up
        return xp.where(self._body_mask_dev, total, xp.float32(0)).reshape(self.grid.shape_zyx)

    def dose_cube_host(self) -> np.ndarray:
        return backend.asnumpy(self.dose_cube())

    def _coarse_neighbours(self, flat_index):
        """The 8 coarse voxels (flat indices, (8, n)) and trilinear weights ((8, n) float32) of fine voxels."""
        xp = self.xp
        k, j, i = xp.unravel_index(flat_index, self.grid.shape_zyx)
        cshape = self.coarse_grid.shape_zyx
        (z0, z1, wz), (y0, y1, wy), (x0, x1, wx) = self._up
        zz = (z0[k], z1[k], wz[k])
        yy = (y0[j], y1[j], wy[j])
        xx = (x0[i], x1[i], wx[i])
        idx, wts = [], []
        for az, fz in ((zz[0], 1 - zz[2]), (zz[1], zz[2])):
            for ay, fy in ((yy[0], 1 - yy[2]), (yy[1], yy[2])):
                for ax, fx in ((xx[0], 1 - xx[2]), (xx[1], xx[2])):
                    idx.append((az * cshape[1] + ay) * cshape[2] + ax)
                    wts.append(fz * fy * fx)
        return xp.stack(idx), xp.stack(wts).astype(xp.float32)

    def _coarse_trilinear(self, flat_index):
        """Trilinear interpolation of the coarse dose at fine voxels (flat indices), without the cube."""
        idx, wts = self._coarse_neighbours(flat_index)
        return (self.dose_coarse[idx] * wts).sum(axis=0)

    def delta_at_voxels(self, patches: Sequence[FluencePatch], flat_index):
        """Dose change (Gy) at CT voxels that ``patches`` would cause, without applying them.

        Exactly what :meth:`apply_patches` followed by :meth:`dose_at_voxels` would add
        (same convolution, same bilinear and trilinear weights). Voxels outside the body give 0.
        """
        xp = self.xp
        idx = xp.asarray(flat_index, dtype=xp.int64).reshape(-1)
        out = xp.zeros(idx.shape, dtype=xp.float32)
        cidx, cw = self._coarse_neighbours(idx)
        for p in patches:
            geo = self.geometry[p.beam]
            delta = xp.asarray(p.delta, dtype=xp.float32)
            h, w = delta.shape
            if geo.fine.components:
                out += self._level_delta(geo.fine, delta, p.row0, p.col0, idx)
            if geo.coarse.components:
                f = geo.coarse_fluence_factor
                R0, C0 = p.row0 // f, p.col0 // f
                R1, C1 = (p.row0 + h - 1) // f + 1, (p.col0 + w - 1) // f + 1
                placed = xp.zeros(((R1 - R0) * f, (C1 - C0) * f), dtype=xp.float32)
                placed[p.row0 - R0 * f : p.row0 - R0 * f + h, p.col0 - C0 * f : p.col0 - C0 * f + w] = delta
                dc = self._level_delta(geo.coarse, _block_sum(xp, placed, f), R0, C0, cidx.reshape(-1))
                out += (dc.reshape(cidx.shape) * cw).sum(axis=0)
        return xp.where(self._body_mask_dev[idx], out, xp.float32(0))

    def delta_matrix(self, columns: Sequence[Sequence[FluencePatch]], flat_index):
        """Dose change (Gy) at CT voxels from each of several patch sets, without applying them.

        ``columns[k]`` is a list of patches (at most one per beam is typical: a DMR normalised
        patch); the result is ``(n voxels, n columns)`` float32 with column ``k`` equal to
        ``delta_at_voxels(columns[k], flat_index)`` up to float32 round-off. Per beam, the
        columns' patches are stacked on the union of their boxes and convolved in one batched
        FFT per level (the matrix of a DMR joint solve in a handful of operations).
        """
        xp = self.xp
        idx = xp.asarray(flat_index, dtype=xp.int64).reshape(-1)
        n, ncol = int(idx.shape[0]), len(columns)
        out = xp.zeros((ncol, n), dtype=xp.float32)
        if ncol == 0 or n == 0:
            return out.T
        cidx, cw = self._coarse_neighbours(idx)
        by_beam: dict[int, list[tuple[int, FluencePatch]]] = {}
        for k, ps in enumerate(columns):
            for p in ps:
                by_beam.setdefault(int(p.beam), []).append((k, p))
        for b, items in sorted(by_beam.items()):
            geo = self.geometry[b]
            r0 = min(p.row0 for _, p in items)
            c0 = min(p.col0 for _, p in items)
            r1 = max(p.row0 + p.shape[0] for _, p in items)
            c1 = max(p.col0 + p.shape[1] for _, p in items)
            f = geo.coarse_fluence_factor
            R0, C0 = r0 // f, c0 // f
            R1, C1 = -(-r1 // f), -(-c1 // f)
            # Host stack on the coarse-aligned box, so the fine and the coarse level share it.
            stack = np.zeros((ncol, (R1 - R0) * f, (C1 - C0) * f), np.float32)
            for k, p in items:
                rr, cc = p.row0 - R0 * f, p.col0 - C0 * f
                stack[k, rr : rr + p.shape[0], cc : cc + p.shape[1]] += np.asarray(backend.asnumpy(p.delta), np.float32)
            dev = xp.asarray(stack)
            if geo.fine.components:
                out += self._level_delta_batch(geo.fine, dev, R0 * f, C0 * f, idx)
            if geo.coarse.components:
                hh, ww = R1 - R0, C1 - C0
                coarse = dev.reshape(ncol, hh, f, ww, f).sum(axis=(2, 4))
                dc = self._level_delta_batch(geo.coarse, coarse, R0, C0, cidx.reshape(-1))
                out += (dc.reshape(ncol, 8, n) * cw[None]).sum(axis=1)
        out = xp.where(self._body_mask_dev[idx][None, :], out, xp.float32(0))
        return out.T

    def _level_delta_batch(self, lvl: _Level, stack, r0: int, c0: int, level_index):
        """(k, n) dose change at level voxels from a stack of k patches on the level's grid."""
        xp = self.xp
        hk = lvl.half
        k = int(stack.shape[0])
        dmaps = convolve_full_batched(stack, lvl.kernels)  # (k, nc, H, W)
        nc = dmaps.shape[1]
        pos = lvl.position[level_index]
        ok = pos >= 0
        p = xp.where(ok, pos, 0)
        s = sample_bilinear(dmaps.reshape((k * nc,) + dmaps.shape[2:]), lvl.v[p], lvl.u[p], (r0 - hk, c0 - hk))
        val = (s.reshape(k, nc, -1) * lvl.weights[:, p][None]).sum(axis=1)
        return xp.where(ok[None, :], val, xp.float32(0))

    def _level_delta(self, lvl: _Level, delta, r0: int, c0: int, level_index):
        """Dose change at level voxels (flat indices into the level's cube) from a patch on its grid."""
        xp = self.xp
        hk = lvl.half
        dmaps = xp.stack([convolve_full(delta, lvl.kernels[i]) for i in range(len(lvl.components))])
        pos = lvl.position[level_index]
        ok = pos >= 0
        p = xp.where(ok, pos, 0)
        s = sample_bilinear(dmaps, lvl.v[p], lvl.u[p], (r0 - hk, c0 - hk))
        val = (lvl.weights[:, p] * s).sum(axis=0)
        return xp.where(ok, val, xp.float32(0))

    def voxel_bev(self, b: int, flat_index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host (u, v) fractional fine fluence indices and radiological depth (mm) of body voxels in beam ``b``."""
        lvl = self.geometry[b].fine
        pos = backend.asnumpy(lvl.position[self.xp.asarray(flat_index, dtype=self.xp.int64).reshape(-1)])
        if np.any(pos < 0):
            raise ValueError("voxel_bev: a voxel lies outside the body")
        p = self.xp.asarray(pos)
        return (backend.asnumpy(lvl.u[p]).astype(np.float64), backend.asnumpy(lvl.v[p]).astype(np.float64),
                backend.asnumpy(lvl.depth_mm[p]).astype(np.float64))

    def dose_at_voxels(self, flat_index):
        """Dose (Gy) at CT voxels given by flat indices, consistent with :meth:`dose_cube`, without building it."""
        xp = self.xp
        idx = xp.asarray(flat_index, dtype=xp.int64).reshape(-1)
        val = self.dose_fine[idx] + self._coarse_trilinear(idx)
        return xp.where(self._body_mask_dev[idx], val, xp.float32(0))

    def dose_at_points(self, points_mm_xyz):
        """Dose (Gy) at arbitrary patient points, evaluated directly from the convolved maps.

        Uses each point's own BEV position and radiological depth for every component (no
        grid interpolation of the broad part), so it is the reference point dose; on voxel
        centres it agrees with :meth:`dose_at_voxels` up to the coarse-grid interpolation of
        the scatter components.
        """
        xp = self.xp
        pts = np.asarray(points_mm_xyz, dtype=np.float64).reshape(-1, 3)
        total = xp.zeros(pts.shape[0], dtype=xp.float32)
        for b in range(self.n_beams):
            total += self._point_dose_beam(b, pts, self._maps_fine[b], self._maps_coarse[b])
        return total

    def point_weights(self, b: int, pts: np.ndarray):
        """Per-point data for beam ``b``: fine (u, v), coarse (u, v), component weights (3, n) on the device."""
        xp = self.xp
        geo = self.geometry[b]
        beam = geo.beam
        pos = self.patient.patient_position
        bev = beam.patient_to_bev(pts, pos)
        g = self.grid
        depth = radiological_depth(self._density_device(), g.spacing_mm_zyx, g.origin_mm_xyz, tuple(beam.source_mm_xyz(pos)), xp.asarray(pts))
        depth_h = backend.asnumpy(depth).astype(np.float64)
        inside = self.patient.grid.contains(pts)
        isq = (beam.sad_mm / bev[:, 2]) ** 2
        w = self.machine.depth_components(depth_h) * (isq * self.machine.gy_per_mu)
        w[:, ~inside] = 0.0
        fg = geo.fluence_grid
        f = geo.coarse_fluence_factor
        uf = (bev[:, 0] - fg.origin_mm_uv[0]) / fg.pitch_mm
        vf = (bev[:, 1] - fg.origin_mm_uv[1]) / fg.pitch_mm
        uc = (uf - (f - 1) / 2.0) / f
        vc = (vf - (f - 1) / 2.0) / f
        as32 = lambda a: xp.asarray(a.astype(np.float32))  # noqa: E731
        return as32(uf), as32(vf), as32(uc), as32(vc), as32(w)

    def _point_dose_beam(self, b: int, pts: np.ndarray, maps_fine, maps_coarse):
        geo = self.geometry[b]
        uf, vf, uc, vc, w = self.point_weights(b, pts)
        out = 0
        if geo.fine.components:
            s = sample_bilinear(maps_fine, vf, uf)
            out = out + (w[list(geo.fine.components)] * s).sum(axis=0)
        if geo.coarse.components:
            s = sample_bilinear(maps_coarse, vc, uc)
            out = out + (w[list(geo.coarse.components)] * s).sum(axis=0)
        return out

    # ------------------------------------------------------------------ info
    def describe(self) -> dict:
        """Sizes of the cache, for reports and benchmarks."""
        return {
            "grid_shape_zyx": list(self.grid.shape_zyx),
            "spacing_mm_zyx": list(self.grid.spacing_mm_zyx),
            "coarse_shape_zyx": list(self.coarse_grid.shape_zyx),
            "beams": self.n_beams,
            "body_voxels": int(self.body_index.size),
            "coarse_voxels": int(self.coarse_index.size),
            "fluence_shapes_vu": [list(g.fluence_grid.shape_vu) for g in self.geometry],
            "fluence_pitch_mm": self.options.fluence_pitch_mm,
            "machine": self.machine.name,
            "ssd_mm": [g.ssd_mm for g in self.geometry],
            "kernel_ssd_mm": [g.kernel_ssd_mm for g in self.geometry],
            "backend": backend.backend_name(),
        }


# ----------------------------------------------------------------------------- calibration
def calibrate(machine: PhotonMachine, options: EngineOptions | None = None, *, field_mm: float = 100.0,
              ssd_mm: float | None = None, gy_per_mu_at_dmax: float = 0.01) -> PhotonMachine:
    """Absolute calibration: ``gy_per_mu_at_dmax`` (default 1 cGy/MU) at dmax on the axis of a
    ``field_mm`` square field at SSD = SAD (100 cm), in water.

    Uses the engine's own discretisation of the lateral kernels (fine grid for the narrow
    components, block sums on the coarse grid for the broad ones), evaluated on the axis, so
    that the engine reproduces the calibration.
    """
    options = options or EngineOptions()
    ssd = float(ssd_mm if ssd_mm is not None else machine.sad_mm)
    # The reference condition's kernels (matRad machines tabulate one set per SSD); the
    # resulting Gy per MU holds for every set.
    reference = machine.for_ssd(ssd)
    pitch = options.fluence_pitch_mm
    f = int(options.coarse_fluence_factor)
    c_axis = np.zeros(3)
    for comp in range(3):
        coarse = comp not in machine.narrow_components
        p = pitch * f if coarse else pitch
        k = _kernel_grid(reference, comp, p, options.kernel_fraction).astype(np.float64)
        half = (k.shape[0] - 1) // 2
        # Sum of the kernel over the field's cells (a cell grid with a node on the axis). On
        # the coarse grid a cell counts with the fraction of it inside the field, as block
        # sums of a fine open field give.
        x = np.arange(-half, half + 1) * p
        if coarse:
            cover = np.clip(np.minimum(x + p / 2 + field_mm / 2.0, field_mm / 2.0 - (x - p / 2)) / p, 0.0, 1.0)
        else:
            cover = (np.abs(x) <= field_mm / 2.0 + 1e-9).astype(float)
        c_axis[comp] = float((cover[:, None] * cover[None, :] * k).sum())
    depth = np.arange(0.0, 60.0, 0.05)
    isq = (machine.sad_mm / (ssd + depth)) ** 2
    dd = (machine.depth_components(depth) * c_axis[:, None]).sum(axis=0) * isq
    return machine.with_calibration(gy_per_mu_at_dmax / dd.max())
