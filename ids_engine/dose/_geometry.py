"""Per-beam geometry of the dose engine: kernel sampling, voxel levels sorted by fluence tile,
the central-axis SSD and the automatic fluence grid.

A *level* is the set of voxels one part of the dose is evaluated on (the CT grid for the
machine's narrow components, a coarse grid for the broad ones) with, per beam, each voxel's
fractional position on the level's fluence grid (``u_cells``: column, ``v_cells``: row, in
cells of that grid, not millimetres), its radiological depth and its per-component weight
``gy_per_mu * ISQ * D_c(l)``, sorted by fluence tile so that a fluence change touches only
the contiguous runs of voxels under the tiles it reaches.

Every level keeps its arrays on the active backend's device and, as :class:`LevelHost`,
on the host: the DMR queries (a patch's dose at a few voxels, a voxel's beam's-eye-view
position) are answered from the host copy without device work. On NumPy both are the same
arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ids_engine import backend
from ids_engine.model import Beam, FluenceGrid, Grid, PhotonMachine

__all__ = ["BeamGeometry", "LevelHost", "SSD_DENSITY_THRESHOLD", "central_axis_ssd_mm"]


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
    # Tile row tr's range is tile_start[tr * ntc + c0] .. tile_start[tr * ntc + c1 + 1]: two
    # strided slices read as Python ints at once.
    starts = tile_start[r0 * ntc + c0 : r1 * ntc + c0 + 1 : ntc].tolist()
    ends = tile_start[r0 * ntc + c1 + 1 : r1 * ntc + c1 + 2 : ntc].tolist()
    return [(s, e) for s, e in zip(starts, ends) if e > s]


@dataclass(eq=False)
class LevelHost:
    """Host (NumPy) copies of a level's per-voxel arrays (the same arrays on NumPy)."""

    vox: np.ndarray  # (n,) int32 flat index into the level's cube, sorted by fluence tile
    u_cells: np.ndarray  # (n,) float32 fractional column on the level's fluence grid
    v_cells: np.ndarray  # (n,) float32 fractional row
    weights: np.ndarray  # (nc, n) float32 gy_per_mu * ISQ * D_c(l)
    depth_mm: np.ndarray  # (n,) float32 radiological depth
    position: np.ndarray  # (level cube size,) int32 sorted position of each voxel, -1 if none
    kernels: np.ndarray  # (nc, kh, kw) float32 lateral kernels on the level's fluence grid


@dataclass(eq=False)
class Level:
    """Voxels of one level (fine or coarse) for one beam, sorted by fluence tile.

    The device arrays are views into the engine's per-level arrays of all beams
    concatenated (``base`` is this beam's offset there); ``host`` holds their host copies.
    """

    vox: object  # (n,) int32 flat index into the level's cube (device)
    u_cells: object  # (n,) float32 fractional column on the level's fluence grid (device)
    v_cells: object  # (n,) float32 fractional row (device)
    weights: object  # (nc, n) float32 gy_per_mu * ISQ * D_c(l) (device)
    depth_mm: object  # (n,) float32 radiological depth (device)
    tile_start: np.ndarray  # host int64 (ntr * ntc + 1,)
    ntr: int
    ntc: int
    tile: int  # level fluence cells per tile side
    components: tuple[int, ...]
    kernels: object  # (nc, kh, kw) float32 on the level's fluence grid (device)
    half: int  # kernel half width (cells)
    map_shape: tuple[int, int]  # level fluence map shape (rows, cols)
    position: object  # (level cube size,) int32: sorted position of each voxel, -1 if none (device)
    host: LevelHost
    base: int = 0  # offset of this beam's voxels in the engine's concatenated level arrays

    @property
    def size(self) -> int:
        return int(self.host.vox.size)

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
    """Per-beam geometry cache: fine and coarse voxel levels and the fluence grids.

    ``ssd_mm`` is the beam's central-axis SSD (None when the axis misses the body) and
    ``machine`` the engine's machine with the kernel set tabulated nearest that SSD
    (:meth:`PhotonMachine.for_ssd`; the engine's own machine when it has a single set).
    """

    beam: Beam
    fluence_grid: FluenceGrid
    fine: Level
    coarse: Level
    coarse_fluence_factor: int
    ssd_mm: float | None = None
    machine: PhotonMachine | None = None

    @property
    def kernel_ssd_mm(self) -> float | None:
        """SSD (mm) of the kernel set this beam uses (None for an SSD-independent machine)."""
        return self.machine.kernel_ssd_mm if self.machine is not None else None


def build_level(xp, beam: Beam, points_xyz: np.ndarray, index: np.ndarray, level_size: int, depth,
                fgrid: FluenceGrid, factor: int, components: tuple[int, ...], machine: PhotonMachine,
                tile_cells: int, kernel_fraction: float, patient_position: str) -> Level:
    """One level of one beam.

    Parameters
    ----------
    points_xyz : (n, 3) float64 voxel centres, patient coordinates (mm), of the level's voxels.
    index : (n,) flat indices of those voxels in the level's cube (size ``level_size``).
    depth : (n,) radiological depth (mm) of the voxels for this beam (device).
    fgrid : the beam's fine fluence grid; ``factor`` fine cells per level cell.
    """
    bev = beam.patient_to_bev(points_xyz, patient_position)
    # Fractional position on this level's fluence grid (cells).
    pitch = fgrid.pitch_mm * factor
    u0 = fgrid.origin_mm_uv[0] + (factor - 1) / 2.0 * fgrid.pitch_mm
    v0 = fgrid.origin_mm_uv[1] + (factor - 1) / 2.0 * fgrid.pitch_mm
    u = ((bev[:, 0] - u0) / pitch).astype(np.float32)
    v = ((bev[:, 1] - v0) / pitch).astype(np.float32)
    map_shape = (-(-fgrid.shape_vu[0] // factor), -(-fgrid.shape_vu[1] // factor))
    tile = max(1, tile_cells // factor) if factor > 1 else tile_cells
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
    depth_h = backend.asnumpy(depth).astype(np.float32)
    w = machine.depth_components(depth_h.astype(np.float64), components) * (isq * machine.gy_per_mu)
    # A coarse amplitude is the block sum of factor^2 fine amplitudes, each of which
    # stands for one fine cell's area: so the kernel sums to 1 / factor^2.
    kernels = _stack_centred([_kernel_grid(machine, c, pitch, kernel_fraction) for c in components])
    kernels /= np.float32(factor * factor)
    half = (kernels.shape[-1] - 1) // 2
    position = np.full(level_size, -1, dtype=np.int32)
    position[index[order]] = np.arange(order.size, dtype=np.int32)
    weights = (np.ascontiguousarray(w[:, order], dtype=np.float32) if components
               else np.zeros((0, order.size), np.float32))
    host = LevelHost(vox=index[order].astype(np.int32), u_cells=u[order], v_cells=v[order], weights=weights,
                     depth_mm=depth_h[order], position=position, kernels=kernels)
    dev = (lambda a: a) if xp is np else xp.asarray  # noqa: E731
    return Level(vox=dev(host.vox), u_cells=dev(host.u_cells), v_cells=dev(host.v_cells), weights=dev(host.weights),
                 depth_mm=dev(host.depth_mm), tile_start=tile_start, ntr=ntr, ntc=ntc, tile=tile,
                 components=tuple(components), kernels=dev(kernels), half=half, map_shape=map_shape,
                 position=dev(position), host=host)


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
