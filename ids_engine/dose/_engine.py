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

Device work per operation (what issue 10 budgets)
-------------------------------------------------
All beams' level arrays are concatenated, and the fluence and the convolved maps of all
beams live in one flat buffer per kind, so an incremental update of any number of beams is
a fixed handful of device operations: two uploads (the packed patch windows and index
tables, built on the host), then per level one batched real FFT of the windows, a product
with the cached kernel spectra, one inverse FFT, one scatter-add into the maps and one
kernel launch over a segment table of the voxels to update; plus one scatter-add into the
fluence. No value is read back. The DMR's per-voxel queries (a patch's dose at some voxels,
a voxel's beam's-eye-view position, the fluence under a patch) are answered on the host
from copies of the static geometry and of the fluence (``Level.host``,
:meth:`DoseEngine.fluence_host`); reading the dose at voxels is a few gathers.
"""

from __future__ import annotations

import functools
import itertools
import math

import os
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
from scipy import fft as sfft

from ids_engine import backend
from ids_engine.kernels import _cpu
from ids_engine.kernels.pencil import (
    accumulate_segments,
    convolve_full_batched,
    padded_window,
    sample_bilinear,
    segment_contribution_numpy,
)
from ids_engine.kernels.raytrace import radiological_depth
from ids_engine.kernels.scatter import scatter_add
from ids_engine.model import Beam, Grid, Patient, PhotonMachine, default_6mv

from ._calibration import calibrate
from ._geometry import (
    SSD_DENSITY_THRESHOLD,
    BeamGeometry,
    Level,
    _auto_fluence_grid,
    _block_sum,
    _stack_centred,
    build_level,
    central_axis_ssd_mm,
)
from ._types import EngineOptions, FluencePatch

__all__ = ["BeamGeometry", "DoseEngine", "EngineOptions", "FluencePatch", "SSD_DENSITY_THRESHOLD", "calibrate",
           "central_axis_ssd_mm"]

LEVELS = ("fine", "coarse")
# Plan-state versions, unique across engines (DoseEngine.state_version).
_STATE_VERSIONS = itertools.count(1)
_SPECTRA_CACHE = 32  # kernel spectra kept per level (one per FFT shape)
_NEIGHBOUR_CACHE = 4  # voxel sets whose coarse-neighbour tables are kept (DoseEngine._neighbours)
_NEIGHBOUR_CACHE_MAX = 1 << 19  # voxels: larger sets are not kept (about 90 bytes a voxel)
_CROP_SPECTRA_CACHE = 64  # cropped kernel spectra kept per beam and level (delta_matrix)
_LEVEL_MEMO = 4  # read-outs of patch stacks kept per voxel set, beam and level (delta_matrix)
_LEVEL_MEMO_MAX = (1 << 18, 1 << 15)  # only stacks up to 256 KB and read-outs up to 32 k values are kept


_POOL = None


def _pool():
    """A small thread pool for the NumPy voxel work (created on first use)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(_cores(), 4)), thread_name_prefix="ids-dose")
    return _POOL


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=4096)
def _next_fast_len(n: int) -> int:
    return sfft.next_fast_len(n, real=True)


def _fft_len(n: int) -> int:
    """An FFT length >= n that is fast and taken from a small set (so few spectra are cached)."""
    return sfft.next_fast_len(-(-n // 16) * 16, real=True)


@dataclass(eq=False)
class _LevelArrays:
    """One level's arrays of all beams concatenated (device), for one launch over all beams."""

    vox: object  # (N,) int32
    u_cells: object  # (N,) float32
    v_cells: object  # (N,) float32
    weights: object  # (nc, N) float32
    nc: int
    kernels: np.ndarray  # (n_beams, nc, K, K) float32 host, each beam's kernels centred in K x K
    half: int  # (K - 1) // 2
    spectra: dict  # (Fh, Fw) -> (n_beams, nc, Fh, Fw // 2 + 1) complex64 (device)


@dataclass(eq=False)
class _Neighbours:
    """Host tables of a set of CT voxels for reading the dose there (read-only arrays)."""

    idx: np.ndarray  # (n,) int64 flat CT indices
    cidx: np.ndarray  # (8, n) int64 coarse neighbours
    cw: np.ndarray  # (8, n) float32 trilinear weights
    in_body: np.ndarray  # (n,) bool
    cw_body: np.ndarray  # (8, n) float32: cw, 0 outside the body
    levels: dict = field(default_factory=dict)  # (beam, level) -> _LevelRows (delta_matrix)
    _coarse_unique: tuple | None = None
    # The tables on the device (GPU backends): uploaded once per cached voxel set, so recovery's
    # reads of the same watch cost no host-to-device copy after the first (about 7 MB each for a
    # clinical watch of 10^5 voxels).
    device: tuple | None = None

    def coarse_unique(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct coarse neighbours (sorted) and, for each of the (8 n) entries of
        ``cidx``, its position among them: a level look-up is made once per coarse voxel."""
        if self._coarse_unique is None:
            uniq, inv = np.unique(self.cidx.reshape(-1), return_inverse=True)
            self._coarse_unique = (uniq, inv.reshape(-1))
        return self._coarse_unique


@dataclass(eq=False)
class _LevelRows:
    """One beam's level look-ups at some level voxels (host): what reading a stack of patch
    responses there needs, computed once per voxel set."""

    n: int
    ok: np.ndarray  # (n,) bool: the voxel is in the level
    v: np.ndarray  # (n,) float32 fractional row (of position 0 where not ok)
    u: np.ndarray  # (n,) float32 fractional column
    weights: np.ndarray  # (nc, n) float32 component weights, contiguous
    bounds: tuple | None  # floor of min / max of v and u over the usable voxels (None: none)
    # (r0, c0, stack shape, stack bytes) -> the read-out of that stack here (read-only): a
    # rejected DMR step's per-beam retry convolves the same per-beam stacks at the same rows
    memo: dict = field(default_factory=dict)

    @staticmethod
    def of(lvl: Level, level_index: np.ndarray) -> "_LevelRows":
        h = lvl.host
        if _cpu.HAVE_NUMBA and h.weights.dtype == np.float32 and h.v_cells.dtype == np.float32 \
                and h.u_cells.dtype == np.float32:
            ok, v, u, w, mm = _cpu.level_rows(h.position, h.v_cells, h.u_cells, h.weights, level_index)
            bounds = None if mm is None else tuple(math.floor(x) for x in mm)
            return _LevelRows(int(level_index.shape[0]), ok, v, u, w, bounds)
        pos = h.position[level_index]
        ok = pos >= 0
        p = np.where(ok, pos, 0)
        v, u = h.v_cells[p], h.u_cells[p]
        use = ok & np.isfinite(v) & np.isfinite(u)
        bounds = None
        if use.any():
            vs, us = v[use], u[use]
            bounds = (math.floor(float(vs.min())), math.floor(float(vs.max())),
                      math.floor(float(us.min())), math.floor(float(us.max())))
        return _LevelRows(int(level_index.shape[0]), ok, v, u, np.ascontiguousarray(h.weights[:, p]), bounds)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(eq=False)
class _BeamState:
    """One beam's plan state: views into the engine's flat buffers, and the host fluence."""

    geometry: BeamGeometry
    fluence: object  # (nv, nu) float32 device view
    fluence_host: np.ndarray  # (nv, nu) float32 host copy (the same array on NumPy)
    fluence_offset: int  # into the flat fluence buffer
    maps: dict  # level -> (nc, mh, mw) float32 device view of the convolved fluence
    maps_offset: dict  # level -> offset into the level's flat maps buffer


@dataclass(eq=False)
class _Window:
    """A change of one beam's fluence on one level: ``delta`` placed at (row0, col0) of the level grid."""

    beam: int
    row0: int
    col0: int
    delta: np.ndarray  # (h, w) float32 host


class _Uploads:
    """Host arrays gathered for one upload per dtype (one host-to-device copy each)."""

    def __init__(self) -> None:
        self._parts: dict = {np.dtype(np.int32): [], np.dtype(np.float32): []}

    ALIGN = 64  # elements: every part starts 256 bytes into the buffer (cuFFT needs aligned input)

    def add(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        parts = self._parts[a.dtype]
        start = sum(p.size for p, _ in parts)
        pad = -start % self.ALIGN
        if pad:
            parts.append((np.zeros(pad, a.dtype), (pad,)))
            start += pad
        parts.append((a.ravel(), a.shape))
        return a.dtype, start, a.shape

    def send(self, xp) -> dict:
        out = {}
        for dtype, parts in self._parts.items():
            if parts:
                host = np.concatenate([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
                out[dtype] = host if xp is np else xp.asarray(host)
        return out

    @staticmethod
    def view(sent: dict, key):
        dtype, start, shape = key
        n = int(np.prod(shape))
        return sent[dtype][start : start + n].reshape(shape)


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
        self._density = None
        # When a list, apply_patches appends the number of patches of each call (a session
        # journals the grouping so that a replay repeats the same calls, bit for bit).
        self.apply_log: list[int] | None = None
        self._state_version = next(_STATE_VERSIONS)
        total = len(beams)
        for i, b in enumerate(beams):
            if progress:
                progress(i, total, "geometry cache")
            self._add_beam(b)
        self.__dict__.pop("_points_cache", None)
        self._allocate_state()
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
        # Separable trilinear upsampling tables (fine index -> coarse index, weight), host and device.
        self._up_host = []
        for axis in range(3):
            f = self.options.coarse_factor_zyx[axis]
            n_fine = self.grid.shape_zyx[axis]
            n_c = cg.shape_zyx[axis]
            pos = (np.arange(n_fine) - (f - 1) / 2.0) / f
            i0 = np.clip(np.floor(pos), 0, max(n_c - 2, 0)).astype(np.int64)
            w = np.clip(pos - i0, 0.0, 1.0).astype(np.float32)
            i1 = np.minimum(i0 + 1, n_c - 1)
            self._up_host.append((i0, i1, w))
        self._up = [tuple(xp.asarray(a) for a in t) for t in self._up_host]
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

    def _build_level(self, beam: Beam, grid: Grid, index: np.ndarray, fgrid, factor: int,
                     components: tuple[int, ...], machine: PhotonMachine) -> Level:
        xp = self.xp
        pos = self.patient.patient_position
        pts = self._level_points(grid, index)
        g = self.grid
        depth = radiological_depth(self._density_device(), g.spacing_mm_zyx, g.origin_mm_xyz,
                                   tuple(beam.source_mm_xyz(pos)), xp.asarray(pts))
        return build_level(xp, beam, pts, index, grid.size, depth, fgrid, factor, components, machine,
                           self.options.tile_cells, self.options.kernel_fraction, pos)

    def _add_beam(self, beam: Beam) -> None:
        opts = self.options
        pos = self.patient.patient_position
        fgrid = beam.fluence_grid
        f = int(opts.coarse_fluence_factor)
        if fgrid is None:
            body_pts = self._level_points(self.grid, self.body_index)
            fgrid = _auto_fluence_grid(beam, body_pts, pos, opts.fluence_pitch_mm, opts.field_margin_mm, f)
            beam = replace(beam, fluence_grid=fgrid)
        # matRad's rule: the kernel set tabulated nearest the central axis's SSD, per beam.
        ssd = central_axis_ssd_mm(self._density_device(), self.grid, beam, pos)
        machine = self.machine.for_ssd(ssd) if ssd is not None else self.machine
        fine = self._build_level(beam, self.grid, self.body_index, fgrid, 1, machine.narrow_components, machine)
        coarse = self._build_level(beam, self.coarse_grid, self.coarse_index, fgrid, f, machine.broad_components, machine)
        self.beams.append(beam)
        self.geometry.append(BeamGeometry(beam, fgrid, fine, coarse, f, ssd, machine))

    def _allocate_state(self) -> None:
        """Concatenate the beams' level arrays; allocate the flat fluence, maps and dose buffers.

        Every flat buffer has one element more than it needs, a sink that index tables point
        to for values that fall outside every map (so scatters need no masks)."""
        xp = self.xp
        self._levels: dict[str, _LevelArrays] = {}
        for name in LEVELS:
            lvls = [getattr(g, name) for g in self.geometry]
            ncs = {len(lv.components) for lv in lvls}
            if len(ncs) != 1:
                raise ValueError(f"the beams' kernel sets have different numbers of {name} components")
            nc = ncs.pop()
            base = 0
            for lv in lvls:
                lv.base = base
                base += lv.size
            cat = (lambda arrays, axis=-1: np.concatenate(arrays, axis=axis)) if xp is np else \
                (lambda arrays, axis=-1: xp.concatenate(arrays, axis=axis))  # noqa: E731
            vox = cat([lv.vox for lv in lvls])
            u = cat([lv.u_cells for lv in lvls])
            v = cat([lv.v_cells for lv in lvls])
            wts = cat([lv.weights for lv in lvls], axis=1)
            # The beams' arrays become views of the concatenation (no second copy).
            for lv in lvls:
                s = slice(lv.base, lv.base + lv.size)
                lv.vox, lv.u_cells, lv.v_cells, lv.weights = vox[s], u[s], v[s], wts[:, s]
                if xp is np:
                    lv.host.vox, lv.host.u_cells, lv.host.v_cells, lv.host.weights = lv.vox, lv.u_cells, lv.v_cells, lv.weights
            k = max(int(lv.host.kernels.shape[-1]) for lv in lvls)
            kernels = np.stack([_stack_centred(list(lv.host.kernels) + [np.zeros((k, k), np.float32)])[:nc] for lv in lvls]) \
                if nc else np.zeros((len(lvls), 0, k, k), np.float32)
            self._levels[name] = _LevelArrays(vox, u, v, wts, nc, kernels, (k - 1) // 2, {})
        sizes = [int(np.prod(g.fluence_grid.shape_vu)) for g in self.geometry]
        self._fluence_buf = xp.zeros(sum(sizes) + 1, dtype=xp.float32)
        self._maps_buf = {}
        map_sizes = {}
        for name in LEVELS:
            map_sizes[name] = [len(getattr(g, name).components) * int(np.prod(getattr(g, name).map_shape)) for g in self.geometry]
            self._maps_buf[name] = xp.zeros(sum(map_sizes[name]) + 1, dtype=xp.float32)
        self._state: list[_BeamState] = []
        off = 0
        moff = {name: 0 for name in LEVELS}
        for b, g in enumerate(self.geometry):
            shape = g.fluence_grid.shape_vu
            fl = self._fluence_buf[off : off + sizes[b]].reshape(shape)
            host = fl if xp is np else np.zeros(shape, np.float32)
            maps, offsets = {}, {}
            for name in LEVELS:
                lv = getattr(g, name)
                n = map_sizes[name][b]
                maps[name] = self._maps_buf[name][moff[name] : moff[name] + n].reshape((len(lv.components),) + lv.map_shape)
                offsets[name] = moff[name]
                moff[name] += n
            self._state.append(_BeamState(g, fl, host, off, maps, offsets))
            off += sizes[b]
        self.dose_fine = xp.zeros(self.grid.size, dtype=xp.float32)
        self.dose_coarse = xp.zeros(self.coarse_grid.size, dtype=xp.float32)

    # ------------------------------------------------------------------ fluence
    @property
    def n_beams(self) -> int:
        return len(self.beams)

    def fluence(self, b: int):
        """Beam ``b``'s fluence map (device, (nv, nu) float32, MU). Do not modify in place."""
        return self._state[b].fluence

    def fluence_host(self, b: int) -> np.ndarray:
        """Beam ``b``'s fluence map on the host (a read-only view kept equal to the device's)."""
        v = self._state[b].fluence_host.view()
        v.setflags(write=False)
        return v

    def fluences_host(self) -> list[np.ndarray]:
        return [st.fluence_host.copy() for st in self._state]

    def set_fluences(self, fluences: Sequence) -> None:
        """Replace all fluence maps and recompute the dose from scratch."""
        if len(fluences) != self.n_beams:
            raise ValueError(f"set_fluences: {len(fluences)} maps for {self.n_beams} beams")
        maps = []
        for b, f in enumerate(fluences):
            a = np.asarray(backend.asnumpy(f), dtype=np.float32)
            if a.shape != self.geometry[b].fluence_grid.shape_vu:
                raise ValueError(f"set_fluences: beam {b} map shape {a.shape} != {self.geometry[b].fluence_grid.shape_vu}")
            maps.append(a)
        for st, a in zip(self._state, maps):
            st.fluence_host[...] = a
        if self.xp is not np:
            self._fluence_buf[:-1] = self.xp.asarray(np.concatenate([a.ravel() for a in maps]))
        self.recompute()

    def open_field(self, b: int, u_range_mm: tuple[float, float], v_range_mm: tuple[float, float], mu: float = 1.0) -> np.ndarray:
        """A host fluence map for beam ``b``: ``mu`` inside a BEV rectangle (at the isocentre plane), 0 outside."""
        return self.geometry[b].fluence_grid.rectangle_mask(u_range_mm, v_range_mm).astype(np.float32) * np.float32(mu)

    @property
    def state_version(self) -> int:
        """A number for the plan state, new (never reused, across engines) at every change:
        patches applied, fluences set, a recompute. :meth:`restore` brings back the version
        its snapshot was taken at, since it brings back that state bit for bit. Equal versions
        mean the same state: the session's exact undo checks this."""
        return self._state_version

    def _bump(self) -> None:
        self._state_version = next(_STATE_VERSIONS)

    def snapshot(self) -> tuple:
        """A copy of the engine's plan state (fluences, convolved maps, dose levels)."""
        host = None if self.xp is np else [st.fluence_host.copy() for st in self._state]
        return (self._fluence_buf.copy(), {k: v.copy() for k, v in self._maps_buf.items()},
                self.dose_fine.copy(), self.dose_coarse.copy(), host, self._state_version)

    def restore(self, snap: tuple) -> None:
        """Go back to a :meth:`snapshot` exactly (bit for bit)."""
        fl, maps, df, dc, host, version = snap
        self._bump()  # a new version while the buffers are being written
        self._fluence_buf[...] = fl
        for k, v in maps.items():
            self._maps_buf[k][...] = v
        self.dose_fine[...] = df
        self.dose_coarse[...] = dc
        if host is not None:
            for st, h in zip(self._state, host):
                st.fluence_host[...] = h
        self._state_version = version  # the state the snapshot was taken of, bit for bit

    # ------------------------------------------------------------------ dose propagation
    def recompute(self) -> None:
        """Full dose from the current fluence maps (the incremental path with whole maps as patches)."""
        self._bump()
        for buf in (self.dose_fine, self.dose_coarse, *self._maps_buf.values()):
            buf.fill(0)
        self._propagate([(b, 0, 0, st.fluence_host) for b, st in enumerate(self._state)])

    def apply_patches(self, patches: Sequence[FluencePatch]) -> None:
        """Add fluence patches and update the dose incrementally (exact by linearity).

        The patches of one beam are summed on the union of their boxes (float32, in order),
        then all beams' changes go through one batched pass (see the module docstring). On
        NumPy the per-beam voxel work runs on a small thread pool; the scatter into the dose
        stays serial and in beam order, so the result does not depend on the threads.
        """
        patches = list(patches)
        for p in patches:
            nv, nu = self.geometry[p.beam].fluence_grid.shape_vu if 0 <= int(p.beam) < self.n_beams else (0, 0)
            h, w = p.shape if np.ndim(p.delta) == 2 else (-1, -1)
            if not 0 <= int(p.beam) < self.n_beams:
                raise ValueError(f"patch for beam {p.beam}: the plan has beams 0..{self.n_beams - 1}")
            if h < 0 or p.row0 < 0 or p.col0 < 0 or p.row0 + h > nv or p.col0 + w > nu:
                raise ValueError(
                    f"patch for beam {p.beam} at rows {p.row0}:{p.row0 + h}, cols {p.col0}:{p.col0 + w} "
                    f"leaves the fluence grid {nv}x{nu}"
                )
        if self.apply_log is not None and patches:
            self.apply_log.append(len(patches))
        if patches:
            self._bump()
        windows = _merge_per_beam(patches)
        if not windows:
            return
        uploads = _Uploads()
        fluence_keys = None
        if self.xp is not np:
            idx = np.concatenate([self._fluence_index(b, r0, c0, d.shape) for b, r0, c0, d in windows])
            vals = np.concatenate([d.ravel() for _, _, _, d in windows])
            fluence_keys = (uploads.add(idx), uploads.add(vals))
        self._propagate(windows, uploads, fluence_keys)
        # The host copy last: if the pass above failed, host and device still agree.
        for b, r0, c0, d in windows:
            h, w = d.shape
            self._state[b].fluence_host[r0 : r0 + h, c0 : c0 + w] += d

    def _fluence_index(self, b: int, r0: int, c0: int, shape) -> np.ndarray:
        nu = self.geometry[b].fluence_grid.shape_vu[1]
        rr = np.arange(r0, r0 + shape[0], dtype=np.int64)[:, None]
        cc = np.arange(c0, c0 + shape[1], dtype=np.int64)[None, :]
        return (self._state[b].fluence_offset + rr * nu + cc).astype(np.int32).ravel()

    def _propagate(self, windows, uploads: _Uploads | None = None, fluence_keys=None) -> None:
        """Convolve fluence changes ``(beam, row0, col0, delta)`` on both levels and add them to
        the maps and the dose."""
        xp = self.xp
        f = int(self.options.coarse_fluence_factor)
        per_level = {"fine": [_Window(b, r0, c0, np.asarray(d, np.float32)) for b, r0, c0, d in windows]}
        coarse = []
        for b, r0, c0, d in windows:
            h, w = d.shape
            R0, C0 = r0 // f, c0 // f
            R1, C1 = (r0 + h - 1) // f + 1, (c0 + w - 1) // f + 1
            placed = np.zeros(((R1 - R0) * f, (C1 - C0) * f), np.float32)
            placed[r0 - R0 * f : r0 - R0 * f + h, c0 - C0 * f : c0 - C0 * f + w] = d
            coarse.append(_Window(b, R0, C0, _block_sum(np, placed, f)))
        per_level["coarse"] = coarse
        plans = {name: self._plan_level(name, per_level[name]) for name in LEVELS}
        if xp is np:
            self._run_numpy(plans)
            return
        uploads = uploads or _Uploads()
        keys = {}
        for name, plan in plans.items():
            if plan is not None:
                plan.maps_index = self._maps_index(name, plan)
                keys[name] = plan.upload(uploads)
        sent = uploads.send(xp)
        if fluence_keys is not None:
            scatter_add(self._fluence_buf, _Uploads.view(sent, fluence_keys[0]), _Uploads.view(sent, fluence_keys[1]))
        for name, plan in plans.items():
            if plan is not None:
                self._run_device(name, plan, sent, keys[name])

    def _plan_level(self, name: str, windows: list[_Window]) -> "_LevelPlan | None":
        la = self._levels[name]
        if la.nc == 0:
            return None
        K = 2 * la.half + 1
        kept, boxes, ranges = [], [], []
        for wdw in windows:
            lvl: Level = getattr(self.geometry[wdw.beam], name)
            h, w = wdw.delta.shape
            o_r, o_c = wdw.row0 - la.half, wdw.col0 - la.half
            mh, mw = lvl.map_shape
            r_lo, r_hi = max(o_r, 0), min(o_r + h + K - 1, mh)
            c_lo, c_hi = max(o_c, 0), min(o_c + w + K - 1, mw)
            if r_hi <= r_lo or c_hi <= c_lo:
                continue
            kept.append(wdw)
            boxes.append((o_r, o_c, r_lo, r_hi, c_lo, c_hi))
            ranges.append(_merge_ranges([(s + lvl.base, e + lvl.base) for s, e in lvl.ranges(r_lo, r_hi - 1, c_lo, c_hi - 1)]))
        if not kept:
            return None
        fh = _fft_len(max(wd.delta.shape[0] for wd in kept) + K - 1)
        fw = _fft_len(max(wd.delta.shape[1] for wd in kept) + K - 1)
        stack = np.zeros((len(kept), fh, fw), np.float32)
        for p, wd in enumerate(kept):
            stack[p, : wd.delta.shape[0], : wd.delta.shape[1]] = wd.delta
        return _LevelPlan(kept, np.asarray(boxes, np.int32).reshape(-1, 6), ranges, stack,
                          np.asarray([wd.beam for wd in kept], np.int32), (fh, fw))

    def _spectra(self, name: str, shape: tuple[int, int]):
        """The kernels' spectra for FFT shape ``shape`` ((n_beams, nc, Fh, Fw//2+1) complex64), cached."""
        la = self._levels[name]
        spec = la.spectra.pop(shape, None)
        if spec is None:
            fh, fw = shape
            k = la.kernels.shape[-1]
            padded = np.zeros(la.kernels.shape[:2] + (fh, fw), np.float32)
            padded[..., :k, :k] = la.kernels
            spec = sfft.rfft2(padded, workers=_cores())
            spec = spec if self.xp is np else self.xp.asarray(spec)
            if len(la.spectra) >= _SPECTRA_CACHE:
                la.spectra.pop(next(iter(la.spectra)))
        la.spectra[shape] = spec  # most recently used last
        return spec

    def _run_numpy(self, plans: dict) -> None:
        jobs = []
        for name, plan in plans.items():
            if plan is None:
                continue
            la = self._levels[name]
            spec = self._spectra(name, plan.shape)
            F = sfft.rfft2(plan.stack, workers=_cores())
            out = sfft.irfft2(F[:, None] * spec[plan.beams], s=plan.shape, workers=_cores())
            dose = self.dose_fine if name == "fine" else self.dose_coarse
            for p, wd in enumerate(plan.windows):
                o_r, o_c, r_lo, r_hi, c_lo, c_hi = (int(x) for x in plan.boxes[p])
                maps = self._state[wd.beam].maps[name]
                maps[:, r_lo:r_hi, c_lo:c_hi] += out[p, :, r_lo - o_r : r_hi - o_r, c_lo - o_c : c_hi - o_c]
                if plan.ranges[p]:
                    jobs.append((dose, la, out[p], plan.boxes[p], plan.ranges[p]))
        if _cpu.HAVE_NUMBA:
            # Compiled: read out and add in one pass per range, in the same order (identical
            # float32 results; no temporaries). The fine and the coarse level update different
            # dose arrays: on two or more cores the coarse one runs on a second thread (each
            # array still gets its windows in order, so the result does not depend on it).
            def run(level_jobs) -> None:
                for dose, la, out_p, box, ranges in level_jobs:
                    flat, h, w, origin = padded_window(out_p, box)
                    for s, e in ranges:
                        _cpu.accumulate_padded(dose, la.vox[s:e], la.u_cells[s:e], la.v_cells[s:e],
                                               la.weights[:, s:e], flat, h, w, origin)

            fine = [j for j in jobs if j[0] is self.dose_fine]
            coarse = [j for j in jobs if j[0] is not self.dose_fine]
            if fine and coarse and _cores() >= 2:
                other = _pool().submit(run, coarse)
                try:
                    run(fine)
                finally:
                    other.result()
            else:
                run(jobs)
            return
        if len(jobs) > 1:
            results = list(_pool().map(_job_contribution, jobs))
        else:
            results = [_job_contribution(j) for j in jobs]
        for (dose, la, *_), parts in zip(jobs, results):
            for s, e, contrib in parts:
                dose[la.vox[s:e]] += contrib

    def _run_device(self, name: str, plan: "_LevelPlan", sent: dict, keys: dict) -> None:
        xp = self.xp
        la = self._levels[name]
        stack = _Uploads.view(sent, keys["stack"])
        spec = self._spectra(name, plan.shape)
        F = xp.fft.rfft2(stack)
        beams = _Uploads.view(sent, keys["beams"])
        out = xp.fft.irfft2(F[:, None] * spec[beams], s=plan.shape)
        maps_index = _Uploads.view(sent, keys["maps_index"])
        scatter_add(self._maps_buf[name], maps_index, out.reshape(-1))
        dose = self.dose_fine if name == "fine" else self.dose_coarse
        if plan.n_threads:
            accumulate_segments(dose, la.vox, la.u_cells, la.v_cells, la.weights, out,
                                _Uploads.view(sent, keys["seg_first"]), _Uploads.view(sent, keys["seg_start"]),
                                _Uploads.view(sent, keys["seg_patch"]), _Uploads.view(sent, keys["boxes"]),
                                plan.n_threads)

    def _maps_index(self, name: str, plan: "_LevelPlan") -> np.ndarray:
        """Flat maps-buffer index of every element of a plan's convolved windows (the sink for
        those outside the beam's map)."""
        nc = self._levels[name].nc
        fh, fw = plan.shape
        sink = int(self._maps_buf[name].shape[0]) - 1
        out = np.full((len(plan.windows), nc, fh, fw), sink, np.int64)
        for p, wd in enumerate(plan.windows):
            lvl = getattr(self.geometry[wd.beam], name)
            mh, mw = lvl.map_shape
            o_r, o_c, r_lo, r_hi, c_lo, c_hi = (int(x) for x in plan.boxes[p])
            rr = np.arange(r_lo, r_hi)[:, None]
            cc = np.arange(c_lo, c_hi)[None, :]
            base = self._state[wd.beam].maps_offset[name]
            for c in range(nc):
                out[p, c, r_lo - o_r : r_hi - o_r, c_lo - o_c : c_hi - o_c] = base + (c * mh + rr) * mw + cc
        return out.astype(np.int32).ravel()

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

    def _coarse_neighbours(self, flat_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host: the 8 coarse voxels (flat indices, (8, n) int64) and trilinear weights ((8, n)
        float32) of CT voxels given by flat indices (integer arithmetic, no unravel)."""
        ny, nx = self.grid.shape_zyx[1:]
        i = flat_index % nx
        j = (flat_index // nx) % ny
        k = flat_index // (nx * ny)
        cshape = self.coarse_grid.shape_zyx
        (z0, z1, wz), (y0, y1, wy), (x0, x1, wx) = self._up_host
        zz = (z0[k], z1[k], wz[k])
        yy = (y0[j], y1[j], wy[j])
        xx = (x0[i], x1[i], wx[i])
        idx, wts = [], []
        one = np.float32(1)
        for az, fz in ((zz[0], one - zz[2]), (zz[1], zz[2])):
            for ay, fy in ((yy[0], one - yy[2]), (yy[1], yy[2])):
                for ax, fx in ((xx[0], one - xx[2]), (xx[1], xx[2])):
                    idx.append((az * cshape[1] + ay) * cshape[2] + ax)
                    wts.append(fz * fy * fx)
        return np.stack(idx), np.stack(wts).astype(np.float32)

    def _neighbours(self, idx: np.ndarray) -> "_Neighbours":
        """The coarse neighbours of CT voxels ``idx`` (host, int64), from a small cache keyed
        by the indices' content: recovery reads the same watch and the same rows again and
        again, and the tables are what reading the dose there costs on the host."""
        cache = self.__dict__.setdefault("_neighbour_cache", [])
        for i, nb in enumerate(cache):
            if nb.idx.shape == idx.shape and np.array_equal(nb.idx, idx):
                if i:
                    cache.insert(0, cache.pop(i))
                return nb
        cidx, cw = self._coarse_neighbours(idx)
        in_body = self.body_mask.ravel()[idx]
        if idx.size > _NEIGHBOUR_CACHE_MAX:  # a one-off read of a large set: not kept
            return _Neighbours(idx, cidx, cw, in_body, np.where(in_body[None, :], cw, np.float32(0)))
        nb = _Neighbours(_frozen(idx.copy()), _frozen(cidx), _frozen(cw), _frozen(in_body),
                         _frozen(np.where(in_body[None, :], cw, np.float32(0))))
        cache.insert(0, nb)
        del cache[_NEIGHBOUR_CACHE:]
        return nb

    @staticmethod
    def _host_index(flat_index) -> np.ndarray:
        return np.asarray(backend.asnumpy(flat_index), dtype=np.int64).reshape(-1)

    def dose_at_voxels(self, flat_index):
        """Dose (Gy) at CT voxels given by flat indices (host array), consistent with
        :meth:`dose_cube`, without building it: (n,) float32 on the device.

        The neighbour tables are built on the host (integer arithmetic), so the device work is
        one upload and five operations, and nothing is read back.
        """
        xp = self.xp
        idx = self._host_index(flat_index)
        nb = self._neighbours(idx)
        cidx, cw = nb.cidx, nb.cw_body
        if xp is np:
            return self.dose_fine[idx] + (self.dose_coarse[cidx] * cw).sum(axis=0)
        dev = nb.device
        if dev is None or dev[0] is not xp:
            up = _Uploads()
            ki, kc, kw = up.add(idx.astype(np.int32)), up.add(cidx.astype(np.int32)), up.add(cw)
            sent = up.send(xp)
            dev = nb.device = (xp, _Uploads.view(sent, ki), _Uploads.view(sent, kc), _Uploads.view(sent, kw))
        _, di, dc, dw = dev
        return self.dose_fine[di] + (self.dose_coarse[dc] * dw).sum(axis=0)

    def delta_at_voxels(self, patches: Sequence[FluencePatch], flat_index) -> np.ndarray:
        """Dose change (Gy) at CT voxels that ``patches`` would cause, without applying them.

        Computed on the host from the host copies of the geometry (no device work); equal to
        what :meth:`apply_patches` followed by :meth:`dose_at_voxels` would add, up to float32
        round-off. Voxels outside the body give 0. Returns (n,) float32 (NumPy).
        """
        idx = self._host_index(flat_index)
        out = np.zeros(idx.shape, dtype=np.float32)
        nb = self._neighbours(idx)  # cached tables and level look-ups, as in delta_matrix
        cidx, cw = nb.cidx, nb.cw
        for p in patches:
            b = int(p.beam)
            geo = self.geometry[b]
            delta = np.asarray(backend.asnumpy(p.delta), dtype=np.float32)
            h, w = delta.shape
            if geo.fine.components:
                rows = self._rows_of(nb, b, "fine", idx)
                out += self._level_delta_rows(geo.fine, delta[None], p.row0, p.col0, rows, self._crop_spectra(b, "fine"))[0]
            if geo.coarse.components:
                f = geo.coarse_fluence_factor
                R0, C0 = p.row0 // f, p.col0 // f
                R1, C1 = (p.row0 + h - 1) // f + 1, (p.col0 + w - 1) // f + 1
                placed = np.zeros(((R1 - R0) * f, (C1 - C0) * f), dtype=np.float32)
                placed[p.row0 - R0 * f : p.row0 - R0 * f + h, p.col0 - C0 * f : p.col0 - C0 * f + w] = delta
                uniq, inv = nb.coarse_unique()
                rows = self._rows_of(nb, b, "coarse", uniq)
                dc = self._level_delta_rows(geo.coarse, _block_sum(np, placed, f)[None], R0, C0, rows,
                                            self._crop_spectra(b, "coarse"))[0][inv]
                out += (dc.reshape(cidx.shape) * cw).sum(axis=0)
        return np.where(nb.in_body, out, np.float32(0))

    def delta_matrix(self, columns: Sequence[Sequence[FluencePatch]], flat_index) -> np.ndarray:
        """Dose change (Gy) at CT voxels from each of several patch sets, without applying them.

        ``columns[k]`` is a list of patches (at most one per beam is typical: a DMR normalised
        patch); the result is ``(n voxels, n columns)`` float32 (NumPy) with column ``k`` equal
        to ``delta_at_voxels(columns[k], flat_index)`` up to float32 round-off. Per beam, the
        columns' patches are stacked on the union of their boxes and convolved in one batched
        FFT per level, on the host (no device work).
        """
        idx = self._host_index(flat_index)
        n, ncol = int(idx.shape[0]), len(columns)
        out = np.zeros((ncol, n), dtype=np.float32)
        if ncol == 0 or n == 0:
            return out.T
        nb = self._neighbours(idx)
        cidx, cw = nb.cidx, nb.cw
        by_beam: dict[int, list[tuple[int, FluencePatch]]] = {}
        for k, ps in enumerate(columns):
            for p in ps:
                by_beam.setdefault(int(p.beam), []).append((k, p))
        for b, items in sorted(by_beam.items()):
            geo = self.geometry[b]
            r0 = min(p.row0 for _, p in items)
            c0 = min(p.col0 for _, p in items)
            r1 = max(p.row0 + p.delta.shape[0] for _, p in items)
            c1 = max(p.col0 + p.delta.shape[1] for _, p in items)
            f = geo.coarse_fluence_factor
            R0, C0 = r0 // f, c0 // f
            R1, C1 = -(-r1 // f), -(-c1 // f)
            # A stack on the coarse-aligned box, so the fine and the coarse level share it, of
            # the columns with a patch in this beam only (a per-beam solve's columns each have
            # one beam's patch): the others' response is zero, and adding it changes nothing.
            used = sorted({k for k, _ in items})
            at = {k: i for i, k in enumerate(used)}
            m = len(used)
            sel = slice(None) if m == ncol else np.asarray(used, np.int64)
            stack = np.zeros((m, (R1 - R0) * f, (C1 - C0) * f), np.float32)
            for k, p in items:
                rr, cc = p.row0 - R0 * f, p.col0 - C0 * f
                ph, pw = p.delta.shape
                stack[at[k], rr : rr + ph, cc : cc + pw] += np.asarray(backend.asnumpy(p.delta), np.float32)
            if geo.fine.components:
                rows = self._rows_of(nb, b, "fine", idx)
                out[sel] += self._level_delta_rows(geo.fine, stack, R0 * f, C0 * f, rows, self._crop_spectra(b, "fine"))
            if geo.coarse.components:
                hh, ww = R1 - R0, C1 - C0
                coarse = stack.reshape(m, hh, f, ww, f).sum(axis=(2, 4))
                uniq, inv = nb.coarse_unique()
                rows = self._rows_of(nb, b, "coarse", uniq)
                # Read once per distinct coarse voxel (the same values as reading all 8 n).
                dc = self._level_delta_rows(geo.coarse, coarse, R0, C0, rows, self._crop_spectra(b, "coarse"))[:, inv]
                out[sel] += (dc.reshape(m, 8, n) * cw[None]).sum(axis=1)
        out = np.where(nb.in_body[None, :], out, np.float32(0))
        return out.T

    def _rows_of(self, nb: "_Neighbours", b: int, name: str, level_index: np.ndarray) -> "_LevelRows":
        rows = nb.levels.get((b, name))
        if rows is None:
            rows = nb.levels[(b, name)] = _LevelRows.of(getattr(self.geometry[b], name), level_index)
        return rows

    def _crop_spectra(self, b: int, name: str) -> dict:
        return self.__dict__.setdefault("_crop_spectra_cache", {}).setdefault((b, name), {})

    @staticmethod
    def _level_delta_batch(lvl: Level, stack: np.ndarray, r0: int, c0: int, level_index: np.ndarray) -> np.ndarray:
        """Host: (k, n) dose change at level voxels from a stack of k patches on the level's grid."""
        return DoseEngine._level_delta_rows(lvl, stack, r0, c0, _LevelRows.of(lvl, level_index))

    @staticmethod
    def _level_delta_rows(lvl: Level, stack: np.ndarray, r0: int, c0: int, rows: "_LevelRows",
                          spectra: dict | None = None) -> np.ndarray:
        """:meth:`_level_delta_batch` at level voxels whose look-ups ``rows`` holds (``spectra``:
        a cache of the cropped kernels' spectra, keyed by crop and FFT shape)."""
        stack = np.asarray(stack, np.float32)
        if stack.nbytes > _LEVEL_MEMO_MAX[0] or stack.shape[0] * rows.n > _LEVEL_MEMO_MAX[1]:
            return DoseEngine._level_delta_compute(lvl, stack, r0, c0, rows, spectra)
        key = (int(r0), int(c0), stack.shape, stack.tobytes())
        got = rows.memo.get(key)
        if got is not None:
            return got
        out = DoseEngine._level_delta_compute(lvl, stack, r0, c0, rows, spectra)
        out.setflags(write=False)
        if len(rows.memo) >= _LEVEL_MEMO:
            rows.memo.pop(next(iter(rows.memo)))
        rows.memo[key] = out
        return out

    @staticmethod
    def _level_delta_compute(lvl: Level, stack: np.ndarray, r0: int, c0: int, rows: "_LevelRows",
                             spectra: dict | None = None) -> np.ndarray:
        h = lvl.host
        hk = lvl.half
        k = int(stack.shape[0])
        # Only the window of the full convolution that the samples read is computed: the
        # kernel cropped to the offsets between the window and the patch box (exact, and
        # for the broad scatter kernel of the coarse level several times less FFT work).
        hh, ww = int(stack.shape[1]), int(stack.shape[2])
        kh, kw = int(h.kernels.shape[1]), int(h.kernels.shape[2])
        full = (hh + kh - 1, ww + kw - 1)
        if rows.bounds is None:
            return np.zeros((k, rows.n), np.float32)
        v_min, v_max, u_min, u_max = rows.bounds
        lr, hr = min(max(v_min - (r0 - hk), 0), full[0]), min(max(v_max + 2 - (r0 - hk), 0), full[0])
        lc, hc = min(max(u_min - (c0 - hk), 0), full[1]), min(max(u_max + 2 - (c0 - hk), 0), full[1])
        if hr <= lr or hc <= lc:
            return np.zeros((k, rows.n), np.float32)
        kr0, kr1 = max(0, lr - hh + 1), min(kh, hr)
        kc0, kc1 = max(0, lc - ww + 1), min(kw, hc)
        # convolve_full_batched's transforms, with the cropped kernels' spectra cached (a
        # solve's columns and its prediction share the rows, hence the crop).
        shape = (hh + kr1 - kr0 - 1, ww + kc1 - kc0 - 1)
        fshape = (_next_fast_len(shape[0]), _next_fast_len(shape[1]))
        key = (kr0, kr1, kc0, kc1, fshape)
        kspec = spectra.pop(key, None) if spectra is not None else None
        if kspec is not None:
            spectra[key] = kspec  # most recently used last
        else:
            kspec = _cpu.rfft2_padded(h.kernels[:, kr0:kr1, kc0:kc1], fshape)
            if spectra is not None:
                if len(spectra) >= _CROP_SPECTRA_CACHE:
                    spectra.pop(next(iter(spectra)))
                spectra[key] = kspec
        spec = _cpu.rfft2_padded(stack, fshape)[:, None] * kspec[None]
        # Only the rows read (lr - kr0 : hr - kr0 <= shape[0]) are transformed back: (k, nc, ., .)
        # float32, bit for bit the rows of scipy.fft.irfft2(spec, fshape).
        part = _cpu.irfft2_rows(spec, fshape, lr - kr0, hr - kr0)
        dmaps = np.ascontiguousarray(part[:, :, :, lc - kc0 : hc - kc0])
        nc = dmaps.shape[1]
        origin = (r0 - hk + lr, c0 - hk + lc)
        if _cpu.HAVE_NUMBA:
            return _cpu.sample_weighted(dmaps.reshape((k * nc,) + dmaps.shape[2:]), rows.v, rows.u, origin,
                                        rows.weights, rows.ok, k)
        s = sample_bilinear(dmaps.reshape((k * nc,) + dmaps.shape[2:]), rows.v, rows.u, origin)
        val = (s.reshape(k, nc, -1) * rows.weights[None]).sum(axis=1)
        return np.where(rows.ok[None, :], val, np.float32(0))

    def voxel_bev(self, b: int, flat_index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host (u, v) fractional fine fluence cells and radiological depth (mm) of body voxels
        in beam ``b`` (from the host copy of the geometry: no device work)."""
        h = self.geometry[b].fine.host
        pos = h.position[self._host_index(flat_index)]
        if np.any(pos < 0):
            raise ValueError("voxel_bev: a voxel lies outside the body")
        return (h.u_cells[pos].astype(np.float64), h.v_cells[pos].astype(np.float64), h.depth_mm[pos].astype(np.float64))

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
        for b, st in enumerate(self._state):
            total += self._point_dose_beam(b, pts, st.maps["fine"], st.maps["coarse"])
        return total

    def point_weights(self, b: int, pts: np.ndarray):
        """Per-point data for beam ``b``: fine (u, v), coarse (u, v), component weights (3, n) on the device."""
        xp = self.xp
        geo = self.geometry[b]
        beam = geo.beam
        machine = geo.machine or self.machine
        pos = self.patient.patient_position
        bev = beam.patient_to_bev(pts, pos)
        g = self.grid
        depth = radiological_depth(self._density_device(), g.spacing_mm_zyx, g.origin_mm_xyz, tuple(beam.source_mm_xyz(pos)), xp.asarray(pts))
        depth_h = backend.asnumpy(depth).astype(np.float64)
        inside = self.patient.grid.contains(pts)
        isq = (beam.sad_mm / bev[:, 2]) ** 2
        w = machine.depth_components(depth_h) * (isq * machine.gy_per_mu)
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
            # Which CPU kernel updates the dose on the NumPy backend (numba: the 'fast' extra).
            "cpu_kernel": "numba" if (_cpu.HAVE_NUMBA and self.xp is np) else "numpy",
        }


@dataclass(eq=False)
class _LevelPlan:
    """One level's part of an update, built on the host."""

    windows: list  # [_Window] kept (touching the beam's map)
    boxes: np.ndarray  # (P, 6) int32: origin row, origin col, valid rows [lo, hi), valid cols [lo, hi)
    ranges: list  # per window: [(start, end)] into the level's concatenated arrays
    stack: np.ndarray  # (P, Fh, Fw) float32 zero-padded windows
    beams: np.ndarray  # (P,) int32
    shape: tuple[int, int]  # (Fh, Fw)
    maps_index: np.ndarray | None = None  # (P * nc * Fh * Fw,) int32 flat maps index (device runs)

    @property
    def n_threads(self) -> int:
        return int(sum(e - s for rs in self.ranges for s, e in rs))

    def upload(self, uploads: _Uploads) -> dict:
        seg_start, seg_len, seg_patch = [], [], []
        for p, rs in enumerate(self.ranges):
            for s, e in rs:
                seg_start.append(s)
                seg_len.append(e - s)
                seg_patch.append(p)
        seg_first = np.concatenate([[0], np.cumsum(seg_len, dtype=np.int64)]).astype(np.int32)
        return {"stack": uploads.add(self.stack), "beams": uploads.add(self.beams), "boxes": uploads.add(self.boxes),
                "maps_index": uploads.add(self.maps_index), "seg_first": uploads.add(seg_first),
                "seg_start": uploads.add(np.asarray(seg_start, np.int32)),
                "seg_patch": uploads.add(np.asarray(seg_patch, np.int32))}


def _job_contribution(job):
    """NumPy: the dose contribution of one window on one level (run on the thread pool)."""
    _, la, out_p, box, ranges = job
    return segment_contribution_numpy(la.u_cells, la.v_cells, la.weights, out_p, box, ranges)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _merge_per_beam(patches: Sequence[FluencePatch]) -> list[tuple[int, int, int, np.ndarray]]:
    """One change per beam, in beam order: the beam's patches summed (float32, in order) on the
    union of their boxes."""
    by_beam: dict[int, list[FluencePatch]] = {}
    for p in patches:
        by_beam.setdefault(int(p.beam), []).append(p)
    out = []
    for b in sorted(by_beam):
        ps = by_beam[b]
        if len(ps) == 1:
            p = ps[0]
            out.append((b, int(p.row0), int(p.col0), np.asarray(backend.asnumpy(p.delta), np.float32)))
            continue
        r0 = min(p.row0 for p in ps)
        c0 = min(p.col0 for p in ps)
        r1 = max(p.row0 + p.shape[0] for p in ps)
        c1 = max(p.col0 + p.shape[1] for p in ps)
        acc = np.zeros((r1 - r0, c1 - c0), np.float32)
        for p in ps:
            acc[p.row0 - r0 : p.row0 - r0 + p.shape[0], p.col0 - c0 : p.col0 - c0 + p.shape[1]] += \
                np.asarray(backend.asnumpy(p.delta), np.float32)
        out.append((b, int(r0), int(c0), acc))
    return out
