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
with the cached kernel spectra, one inverse FFT, one kernel launch adding the windows into
the maps (each element's map cell found on the device from its window's box) and one over a
segment table of the voxels to update; plus one launch adding the fine level's windows
(before the convolution) into the fluence. No value is read back. The DMR's per-voxel
queries (a patch's dose at some voxels, a voxel's beam's-eye-view position, the fluence under
a patch) are answered on the host from copies of the static geometry and of the fluence
(``Level.host``, :meth:`DoseEngine.fluence_host`); reading the dose at voxels is a few
gathers. The read-outs live in :mod:`ids_engine.dose._readout` (a mixin the engine inherits);
this module keeps the state and its updates.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import fft as sfft

from ids_engine import backend
from ids_engine.kernels import _cpu
from ids_engine.kernels.pencil import (
    accumulate_segments,
    padded_window,
    segment_contribution_numpy,
)
from ids_engine.kernels.raytrace import radiological_depth
from ids_engine.kernels.windows import add_windows
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
from ._readout import ReadOuts, _LevelRows, _Neighbours  # noqa: F401 (the two tables: imported from here by tests)
from ._types import EngineOptions, FluencePatch
from ._uploads import _Uploads

__all__ = ["BeamGeometry", "DoseEngine", "EngineOptions", "FluencePatch", "SSD_DENSITY_THRESHOLD", "calibrate",
           "central_axis_ssd_mm"]

LEVELS = ("fine", "coarse")
# Plan-state versions, unique across engines (DoseEngine.state_version).
_STATE_VERSIONS = itertools.count(1)
_SPECTRA_CACHE = 32  # kernel spectra kept per level (one per FFT shape)
_SEGMENT_TABLES_KEPT = 8  # recent segment tables kept per level


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
class _BeamState:
    """One beam's plan state: views into the engine's flat buffers, and the host fluence."""

    geometry: BeamGeometry
    fluence: object  # (nv, nu) float32 device view
    fluence_host: np.ndarray  # (nv, nu) float32 host copy (the same array on NumPy)
    fluence_offset: int  # into the flat fluence buffer
    maps: dict  # level -> (nc, mh, mw) float32 device view of the convolved fluence


@dataclass(eq=False)
class _Window:
    """A change of one beam's fluence on one level: ``delta`` placed at (row0, col0) of the level grid."""

    beam: int
    row0: int
    col0: int
    delta: np.ndarray  # (h, w) float32 host


# ----------------------------------------------------------------------------- engine
class DoseEngine(ReadOuts):
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
        to for values that fall outside every map (so scatters need no masks). The maps
        buffer's sink is no longer written since ``add_windows`` finds each element's cell from
        its window's box (nothing outside the box is written); it stays for the layout."""
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
        # Per beam: its offset in a flat buffer and its map's shape, for add_windows (rows
        # gathered by beam for each update): the fluence and each level's maps.
        self._window_targets = {"fluence": np.zeros((self.n_beams, 3), np.int32),
                                **{name: np.zeros((self.n_beams, 3), np.int32) for name in LEVELS}}
        for b, g in enumerate(self.geometry):
            shape = g.fluence_grid.shape_vu
            fl = self._fluence_buf[off : off + sizes[b]].reshape(shape)
            host = fl if xp is np else np.zeros(shape, np.float32)
            maps = {}
            for name in LEVELS:
                lv = getattr(g, name)
                n = map_sizes[name][b]
                maps[name] = self._maps_buf[name][moff[name] : moff[name] + n].reshape((len(lv.components),) + lv.map_shape)
                self._window_targets[name][b] = (moff[name], *lv.map_shape)
                moff[name] += n
            self._window_targets["fluence"][b] = (off, *shape)
            self._state.append(_BeamState(g, fl, host, off, maps))
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
        self._propagate(windows, fluence=self.xp is not np)
        # The host copy last: if the pass above failed, host and device still agree.
        for b, r0, c0, d in windows:
            h, w = d.shape
            self._state[b].fluence_host[r0 : r0 + h, c0 : c0 + w] += d

    def _propagate(self, windows, fluence: bool = False) -> None:
        """Convolve fluence changes ``(beam, row0, col0, delta)`` on both levels and add them to
        the maps and the dose; with ``fluence`` (device runs) also to the device fluence.

        The fluence is added from the fine level's uploaded windows (the changes before the
        convolution, each at the start of its zero-padded window): every change with an element
        is among them, as the fine map is the fluence grid and a window's box holds the change."""
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
        uploads = _Uploads()
        keys = {}
        for name, plan in plans.items():
            if plan is not None:
                plan.map_info = self._window_targets[name][plan.beams]
                keys[name] = plan.upload(uploads, self.n_beams)
        if fluence:
            fine = plans["fine"]  # never None: a machine has narrow components
            dtype, start, (n, fh, fw) = keys["fine"]["stack"]
            fluence_keys = ((dtype, start, (n, 1, fh, fw)), uploads.add(_change_boxes(fine.windows)),
                            uploads.add(self._window_targets["fluence"][fine.beams]))
        sent = uploads.send(xp)
        if fluence:
            add_windows(self._fluence_buf, *(_Uploads.view(sent, k) for k in fluence_keys))
        for name, plan in plans.items():
            if plan is not None:
                self._run_device(name, plan, sent, keys[name])

    def _plan_level(self, name: str, windows: list[_Window]) -> "_LevelPlan | None":
        la = self._levels[name]
        if la.nc == 0:
            return None
        K = 2 * la.half + 1
        # NumPy runs each window's voxel ranges (lists); a device run gets the same ranges as
        # one segment table for all windows, built per window from the level's tile table in
        # Python ints (_segment_table).
        per_window = self.xp is np
        kept, boxes, ranges = [], [], []
        for wdw in windows:
            lvl: Level = getattr(self.geometry[wdw.beam], name)
            box = _window_box(wdw.row0, wdw.col0, wdw.delta.shape, la.half, lvl.map_shape)
            if box is None:
                continue
            _, _, r_lo, r_hi, c_lo, c_hi = box
            kept.append(wdw)
            boxes.append(box)
            if per_window:
                ranges.append(_merge_ranges([(s + lvl.base, e + lvl.base) for s, e in lvl.ranges(r_lo, r_hi - 1, c_lo, c_hi - 1)]))
        if not kept:
            return None
        fh = _fft_len(max(wd.delta.shape[0] for wd in kept) + K - 1)
        fw = _fft_len(max(wd.delta.shape[1] for wd in kept) + K - 1)
        stack = np.zeros((len(kept), fh, fw), np.float32)
        for p, wd in enumerate(kept):
            stack[p, : wd.delta.shape[0], : wd.delta.shape[1]] = wd.delta
        beams = [wd.beam for wd in kept]
        segments = None if per_window else self._segment_table(name, beams, boxes)
        return _LevelPlan(kept, np.asarray(boxes, np.int32).reshape(-1, 6), ranges, stack, np.asarray(beams, np.int32),
                          (fh, fw), segments=segments)

    def _segment_table(self, name: str, beams: Sequence[int], boxes: Sequence[tuple]) -> tuple:
        """The voxel ranges of a level's windows as one segment table (what
        :func:`~ids_engine.kernels.pencil.accumulate_segments` takes): ``(seg_first, seg_start,
        seg_patch)`` int32, the same ranges in the same order as each window's
        :meth:`Level.ranges` merged by :func:`_merge_ranges` (:func:`_segment_rows`).

        ``beams`` (P,) ints and ``boxes`` (P, 6) ints as in :class:`_LevelPlan` (each box
        non-empty; sequences of Python ints, or arrays). The last few tables are kept
        (read-only): a request often applies the same windows again (a step undone and redone)."""
        tables, recent = self._tile_tables(name)
        beams = beams.tolist() if isinstance(beams, np.ndarray) else beams
        boxes = boxes.tolist() if isinstance(boxes, np.ndarray) else boxes
        key = (tuple(beams), tuple(tuple(b) for b in boxes))
        got = recent.pop(key, None)
        if got is None:
            got = _segment_rows(tables, beams, boxes)
            for a in got:
                a.setflags(write=False)
            if len(recent) >= _SEGMENT_TABLES_KEPT:
                recent.pop(next(iter(recent)))
        recent[key] = got  # most recently used last
        return got

    def _tile_tables(self, name: str) -> tuple:
        """Every beam's tile table of a level (for :meth:`_segment_table`), and the level's
        recent segment tables: ``((tile_start, per_beam), recent)``: tile_start a list of ints
        (all beams' ``Level.tile_start``, each with its beam's ``Level.base`` added), per_beam a
        list of ``(offset, ntc, ntr, tile, mh, mw)`` ints per beam (its offset in tile_start,
        tile columns and rows, cells per tile, map shape); recent a dict (beams, boxes) ->
        table. Python ints: a table has a few dozen ranges, fewer than the array operations
        that would build it. Built once per geometry."""
        cache = self.__dict__.setdefault("_tile_tables_cache", {})
        levels = [getattr(g, name) for g in self.geometry]
        got = cache.get(name)
        if got is None or len(got[0]) != len(levels) or any(a is not b for a, b in zip(got[0], levels)):
            ts, per_beam = [], []
            for lv in levels:
                per_beam.append((len(ts), lv.ntc, lv.ntr, lv.tile, *lv.map_shape))
                ts += (np.asarray(lv.tile_start, np.int64) + lv.base).tolist()
            got = cache[name] = (levels, (ts, per_beam), {})
        return got[1:]

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
        spec = self._spectra(name, plan.shape)
        F = xp.fft.rfft2(_Uploads.view(sent, keys["stack"]))
        if "beams" in keys:  # else every beam has a window, in beam order: the spectra as they are
            spec = spec[_Uploads.view(sent, keys["beams"])]
        out = xp.fft.irfft2(F[:, None] * spec, s=plan.shape)
        boxes = _Uploads.view(sent, keys["boxes"])
        add_windows(self._maps_buf[name], out, boxes, _Uploads.view(sent, keys["map_info"]))
        dose = self.dose_fine if name == "fine" else self.dose_coarse
        if plan.n_threads:
            accumulate_segments(dose, la.vox, la.u_cells, la.v_cells, la.weights, out,
                                _Uploads.view(sent, keys["seg_first"]), _Uploads.view(sent, keys["seg_start"]),
                                _Uploads.view(sent, keys["seg_patch"]), boxes, plan.n_threads)

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
    # Device runs: (P, 3) int32 per window, its beam's offset in the level's flat maps buffer and
    # the beam's map shape (mh, mw) (add_windows finds each element's map cell from these and the box).
    map_info: np.ndarray | None = None
    # Device runs: (seg_first, seg_start, seg_patch) int32, the ranges of all windows as one
    # segment table (DoseEngine._segment_table), in place of ``ranges``.
    segments: tuple | None = None

    @property
    def n_threads(self) -> int:
        if self.segments is not None:
            return int(self.segments[0][-1])
        return int(sum(e - s for rs in self.ranges for s, e in rs))

    def upload(self, uploads: _Uploads, n_beams: int) -> dict:
        """Add the plan's arrays to ``uploads``; their keys by name. The beams are left out
        when every one of the ``n_beams`` has a window (they are then 0, 1, ..., in order)."""
        seg_first, seg_start, seg_patch = self.segments
        keys = {"stack": uploads.add(self.stack), "boxes": uploads.add(self.boxes),
                "map_info": uploads.add(self.map_info), "seg_first": uploads.add(seg_first),
                "seg_start": uploads.add(seg_start), "seg_patch": uploads.add(seg_patch)}
        if self.beams.size < n_beams:
            keys["beams"] = uploads.add(self.beams)
        return keys


def _job_contribution(job):
    """NumPy: the dose contribution of one window on one level (run on the thread pool)."""
    _, la, out_p, box, ranges = job
    return segment_contribution_numpy(la.u_cells, la.v_cells, la.weights, out_p, box, ranges)


def _window_box(row0: int, col0: int, shape_hw: tuple[int, int], half: int, map_shape: tuple[int, int]):
    """The box of a patch's full convolution (kernel half-width ``half``) on its map:
    ``(o_r, o_c, r_lo, r_hi, c_lo, c_hi)``, the window's origin and the rows and columns of it
    that lie on the map (``map_shape``), in map cells; None when none do."""
    h, w = shape_hw
    mh, mw = map_shape
    o_r, o_c = row0 - half, col0 - half
    r_lo, r_hi = max(o_r, 0), min(o_r + h + 2 * half, mh)
    c_lo, c_hi = max(o_c, 0), min(o_c + w + 2 * half, mw)
    if r_hi <= r_lo or c_hi <= c_lo:
        return None
    return o_r, o_c, r_lo, r_hi, c_lo, c_hi


def _change_boxes(windows: list) -> np.ndarray:
    """(P, 6) int32 boxes (as :func:`_window_box`'s) of the changes themselves, each at the
    start of its window: ``(row0, col0, row0, row0 + h, col0, col0 + w)``."""
    boxes = np.empty((len(windows), 6), np.int32)
    boxes[:, 0] = boxes[:, 2] = [wd.row0 for wd in windows]
    boxes[:, 1] = boxes[:, 4] = [wd.col0 for wd in windows]
    boxes[:, 3] = boxes[:, 2] + [wd.delta.shape[0] for wd in windows]
    boxes[:, 5] = boxes[:, 4] + [wd.delta.shape[1] for wd in windows]
    return boxes


def _segment_rows(tables: tuple, beams: Sequence[int], boxes: Sequence[tuple]) -> tuple:
    """:meth:`DoseEngine._segment_table` computed, from the level's tile tables (``tables`` as
    :meth:`DoseEngine._tile_tables` gives them): per window, :meth:`Level.ranges` (its tile
    rows' ranges, two strided slices of the tile table) merged as :func:`_merge_ranges` merges
    them, in Python ints."""
    ts, per_beam = tables
    starts: list[int] = []
    lengths: list[int] = []
    patches: list[int] = []
    for p, (b, box) in enumerate(zip(beams, boxes)):
        off, ntc, ntr, tile, mh, mw = per_beam[b]
        r_lo, r_hi, c_lo, c_hi = box[2:]
        # Level.ranges(r_lo, r_hi - 1, c_lo, c_hi - 1): the window's tile rows and columns.
        tr0, tc0 = max(r_lo - 1, 0) // tile, max(c_lo - 1, 0) // tile
        tr1 = min(min(r_hi - 1, mh - 1) // tile, ntr - 1)
        tc1 = min(min(c_hi - 1, mw - 1) // tile, ntc - 1)
        if tr1 < tr0 or tc1 < tc0:
            continue
        first, last = off + tr0 * ntc, off + tr1 * ntc
        end_before = -1
        for s, e in zip(ts[first + tc0 : last + tc0 + 1 : ntc], ts[first + tc1 + 1 : last + tc1 + 2 : ntc]):
            if e > s:
                if s == end_before:  # the same window's range goes on: one segment
                    lengths[-1] += e - s
                else:
                    starts.append(s)
                    lengths.append(e - s)
                    patches.append(p)
                end_before = e
    seg_first = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=seg_first[1:])
    return seg_first.astype(np.int32), np.array(starts, np.int32), np.array(patches, np.int32)


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
