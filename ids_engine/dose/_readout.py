"""Read-outs of the dose engine's state: the dose at voxels and points, and what patches would add.

Everything here reads the state that :class:`~ids_engine.dose.DoseEngine` keeps (the dose
levels, the convolved maps, the per-beam geometry) and changes nothing in it:

* :meth:`~ReadOuts.dose_at_voxels`: the dose at CT voxels, consistent with the dose cube
  (fine level plus the trilinear upsampling of the coarse one), a few gathers on the device;
* :meth:`~ReadOuts.delta_at_voxels` and :meth:`~ReadOuts.delta_matrix`: the dose change that
  fluence patches would cause at CT voxels, without applying them: on the host, from the host
  copies of the geometry (``Level.host``); a DMR solve's columns and predictions, and with
  ``beam_parts`` each beam's part of each column (a per-beam retry's columns, bit for bit),
  which on a device backend is read on the device (``_device_rows``: one ``delta_rows``
  launch per level, one read);
* :meth:`~ReadOuts.voxel_bev`: a voxel's beam's-eye-view position and radiological depth;
* :meth:`~ReadOuts.dose_at_points`, :meth:`~ReadOuts.point_weights`: the reference point dose
  at arbitrary patient points, from each point's own BEV position and depth.

Host tables are cached per voxel set (:class:`_Neighbours`: the coarse neighbours, built in one
compiled pass where numba is installed (:func:`~ids_engine.kernels._cpu_readout.coarse_tables`),
and the per-beam level look-ups, :class:`_LevelRows`), since recovery reads the same watch and the
same rows again and again; a DMR joint read's look-ups in every beam are gathered from those of
every level voxel read before (:class:`_LevelTables`, kept per level while the engine's levels
are the same objects; the gather, the rows' bounds and the stacks' coarse block sums are
compiled loops where numba is installed, :mod:`~ids_engine.kernels._cpu_readout`); the patch
responses are convolved only over the window their samples read (:func:`_level_delta_compute`),
and the convolved windows are kept per beam and level
(:meth:`ReadOuts._response_windows`: recovery reads the same compensating column again at
other rows with the same window).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import fft as sfft

from ids_engine import backend
from ids_engine.kernels import _cpu, _cpu_readout
from ids_engine.kernels.pencil import sample_bilinear
from ids_engine.kernels.raytrace import radiological_depth

from ._geometry import Level
from ._types import FluencePatch
from ._uploads import _Uploads

__all__ = ["ReadOuts"]

_NEIGHBOUR_CACHE = 8  # voxel sets whose coarse-neighbour tables are kept (ReadOuts._neighbours): a drag preview reads about 7 small sets besides the watch base, which 4 pushed out (measured: its tables rebuilt and 6.9 MB uploaded once a preview)
_NEIGHBOUR_CACHE_MAX = 1 << 19  # voxels: larger sets are not kept (about 90 bytes a voxel)
_CROP_SPECTRA_CACHE = 64  # cropped kernel spectra kept per beam and level (delta_matrix)
_WINDOW_CACHE = 32  # patch-response windows kept per beam and level (delta_matrix)
# bytes: larger windows, or windows of larger stacks (the key holds the stack's bytes), are
# not kept: at most 2 x 32 KB an entry, 37 MB for 9 beams' two levels
_WINDOW_MAX = 1 << 15
_LEVEL_MEMO = 4  # read-outs of patch stacks kept per voxel set, beam and level (delta_matrix)
_LEVEL_MEMO_MAX = (1 << 18, 1 << 15)  # only stacks up to 256 KB and read-outs up to 32 k values are kept
_ROW0 = np.zeros(1, np.int64)  # row 0 of a one-row output (delta_at_voxels)
_LEVEL_TABLES_MAX = 1 << 16  # level voxels whose every-beam look-ups _LevelTables keeps per level (9 beams, 2 components: 12 MB)


@functools.lru_cache(maxsize=4096)
def _next_fast_len(n: int) -> int:
    return sfft.next_fast_len(n, real=True)


@dataclass(eq=False)
class _Neighbours:
    """Host tables of a set of CT voxels for reading the dose there (read-only arrays)."""

    idx: np.ndarray  # (n,) int64 flat CT indices
    cidx: np.ndarray  # (8, n) int64 coarse neighbours
    cw: np.ndarray  # (8, n) float32 trilinear weights
    in_body: np.ndarray  # (n,) bool
    cw_body: np.ndarray  # (8, n) float32: cw, 0 outside the body
    outside: np.ndarray  # (m,) int64 positions in idx of the voxels outside the body
    levels: dict = field(default_factory=dict)  # (beam, level) -> _LevelRows (delta_matrix)
    _coarse_unique: tuple | None = None
    # The tables on the device (GPU backends): uploaded once per cached voxel set, so recovery's
    # reads of the same watch cost no host-to-device copy after the first (about 7 MB each for a
    # clinical watch of 10^5 voxels).
    device: tuple | None = None
    # The read-only array the indices were read from (the root owning the memory), when the
    # caller's array was one: a later call with a view of the same memory is this set with
    # no comparison (a watch base's voxels, read at every recovery step: 10^5 indices).
    source: np.ndarray | None = None

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
    def compiled(ok: np.ndarray, v: np.ndarray, u: np.ndarray, weights: np.ndarray,
                 min_max: tuple | None) -> "_LevelRows":
        """The rows of a compiled look-up (``_cpu.level_rows``, a row of
        ``_cpu_readout.level_tables``): its float32 min / max of v and u (or None) floored."""
        bounds = None if min_max is None else tuple(math.floor(x) for x in min_max)
        return _LevelRows(int(ok.shape[0]), ok, v, u, weights, bounds)

    @staticmethod
    def of(lvl: Level, level_index: np.ndarray) -> "_LevelRows":
        h = lvl.host
        if _cpu.HAVE_NUMBA and h.weights.dtype == np.float32 and h.v_cells.dtype == np.float32 \
                and h.u_cells.dtype == np.float32:
            return _LevelRows.compiled(*_cpu.level_rows(h.position, h.v_cells, h.u_cells, h.weights, level_index))
        pos = h.position[level_index]
        ok = pos >= 0
        p = np.where(ok, pos, 0)
        v, u = h.v_cells[p], h.u_cells[p]
        return _LevelRows(int(level_index.shape[0]), ok, v, u, np.ascontiguousarray(h.weights[:, p]),
                          level_bounds(ok, v, u))


def level_bounds(ok: np.ndarray, v: np.ndarray, u: np.ndarray) -> tuple | None:
    """The floors of the least and greatest ``v`` and ``u`` over the level voxels that are in
    the level (``ok``) with finite ``v`` and ``u``, as Python ints, or None if there are none
    (``_LevelRows.bounds``: the window a read-out samples)."""
    use = ok & np.isfinite(v) & np.isfinite(u)
    if not use.any():
        return None
    vs, us = v[use], u[use]
    return (math.floor(float(vs.min())), math.floor(float(vs.max())),
            math.floor(float(us.min())), math.floor(float(us.max())))


class _LevelTables:
    """Every beam's look-ups (``_LevelRows``' ``ok``, ``v``, ``u``, ``weights``) at the level
    voxels read so far, on one level, for a DMR joint solve's read (:meth:`ReadOuts._rows_of_beams`).

    A recovery step's rows are drawn from the watch again and again (clinical horseshoe,
    measured: 5,200 fine and 6,800 coarse level voxels looked up per request, of 2,000 and
    1,600 distinct ones, and none new when the request is repeated), and a look-up is random
    reads in each beam's arrays of 10^6 voxels, while gathering the kept ones is one read of a
    small table: so each level voxel is looked up once, in every beam, and kept as one record
    ``[ok (B), v (B), u (B), weights (B, nc)]`` float32 (``ok`` 0 or 1), B the engine's beams.
    The records are the look-ups' values (gathers, no arithmetic), so a gather is bit for bit
    a fresh look-up. Built for the engine's level objects ``levels`` (one per beam); the engine
    replaces it when they are not the same objects (:meth:`ReadOuts._level_tables`). At most
    ``_LEVEL_TABLES_MAX`` voxels are kept: beyond, the table starts again, and a larger read
    is looked up without being kept."""

    def __init__(self, levels: list) -> None:
        self.levels = list(levels)
        self.n_beams = len(self.levels)
        self.nc = int(self.levels[0].host.weights.shape[0])
        # Each level voxel's record, -1 where not looked up (one int32 per level voxel).
        self._slot = np.full(int(self.levels[0].host.position.shape[0]), -1, np.int32)
        self._voxels = np.empty(0, np.int64)  # the level voxel of each record
        self._records = np.empty((0, self.n_beams * (3 + self.nc)), np.float32)
        self._n = 0  # records in use

    def gather(self, level_index: np.ndarray) -> np.ndarray:
        """The records of level voxels ``level_index`` ((m,) int64) transposed: ``(B (3 + nc),
        m)`` float32, C-contiguous, rows ``ok (B), v (B), u (B)`` then ``weights`` beam by beam
        (``[3 B:].reshape(B, nc, m)``). Looks up the voxels not kept yet. Raises IndexError
        for an index outside the level."""
        level_index = np.asarray(level_index, np.int64)
        slots = self._slot[level_index]
        missing = slots < 0
        if missing.any():
            new = np.unique(level_index[missing])
            if new.size > _LEVEL_TABLES_MAX:  # a one-off read of a large set: not kept
                return np.ascontiguousarray(self._look_up(level_index).T)
            if self._n + new.size > _LEVEL_TABLES_MAX:  # full: start again
                self._slot[self._voxels[: self._n]] = -1
                self._n = 0
                # (every voxel of this read is now missing, the kept ones included)
                new = np.unique(level_index)
                if new.size > _LEVEL_TABLES_MAX:
                    return np.ascontiguousarray(self._look_up(level_index).T)
            end = self._n + new.size
            if end > self._records.shape[0]:
                cap = min(max(end, 2 * self._records.shape[0], 1024), _LEVEL_TABLES_MAX)
                grown = np.empty((cap, self._records.shape[1]), np.float32)
                grown[: self._n] = self._records[: self._n]
                voxels = np.empty(cap, np.int64)
                voxels[: self._n] = self._voxels[: self._n]
                self._records, self._voxels = grown, voxels
            self._records[self._n : end] = self._look_up(new)
            self._voxels[self._n : end] = new
            self._slot[new] = np.arange(self._n, end, dtype=np.int32)
            self._n = end
            slots = self._slot[level_index]
        return _cpu_readout.gather_columns(self._records, slots)

    def _look_up(self, vox: np.ndarray) -> np.ndarray:
        """Every beam's look-up of level voxels ``vox`` as records ((k, B (3 + nc)) float32):
        one compiled pass over the beams where numba is installed
        (:func:`~ids_engine.kernels._cpu_readout.level_tables`), else ``_LevelRows.of`` per beam
        (the same values)."""
        b_count, nc, k = self.n_beams, self.nc, int(vox.shape[0])
        got = _cpu_readout.level_tables([lv.host for lv in self.levels], np.arange(b_count, dtype=np.int64), vox) \
            if _cpu.HAVE_NUMBA else None
        if got is None:
            rows = [_LevelRows.of(lv, vox) for lv in self.levels]
            ok, v, u = (np.stack([getattr(r, f) for r in rows]) for f in ("ok", "v", "u"))
            w = np.stack([r.weights for r in rows])
        else:
            ok, v, u, w, _ = got
        rec = np.empty((k, b_count * (3 + nc)), np.float32)
        rec[:, :b_count] = ok.T
        rec[:, b_count : 2 * b_count] = v.T
        rec[:, 2 * b_count : 3 * b_count] = u.T
        rec[:, 3 * b_count :] = w.reshape(b_count * nc, k).T
        return rec


def _stacked_bounds(ok: np.ndarray, v: np.ndarray, u: np.ndarray) -> list:
    """:func:`level_bounds` of each row of stacked tables (``ok`` (S, m) bool, ``v``, ``u``
    (S, m) float32), vectorised: the same float32 least and greatest values, so the same
    floors."""
    use = ok & np.isfinite(v) & np.isfinite(u)
    found = use.any(axis=1).tolist()
    if not any(found):  # (no voxel in any row, an empty read included)
        return [None] * ok.shape[0]
    vu = np.stack([v, u])  # (2, S, m)
    lo = np.where(use, vu, np.float32(np.inf)).min(axis=2).tolist()
    hi = np.where(use, vu, np.float32(-np.inf)).max(axis=2).tolist()
    return [(math.floor(lo[0][s]), math.floor(hi[0][s]), math.floor(lo[1][s]), math.floor(hi[1][s]))
            if found[s] else None for s in range(ok.shape[0])]


_ROWS_UPTO = np.arange(1024, dtype=np.int64)  # never written


def _rows_upto(m: int) -> np.ndarray:
    """``arange(m)`` (int64; a view of a shared array up to 1024: not to be written)."""
    return _ROWS_UPTO[:m] if m <= _ROWS_UPTO.size else np.arange(m, dtype=np.int64)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# The index arrays the read-out cache may know by identity (:func:`sealed_indices`), by id: an
# entry goes with its array.
_SEALED: "weakref.WeakValueDictionary[int, np.ndarray]" = weakref.WeakValueDictionary()


def sealed_indices(idx) -> np.ndarray:
    """A read-only int64 copy of ``idx`` (flattened) that the engine's read-out cache knows by
    identity: a later read of it, or of a whole view of it, finds its tables without comparing
    the indices (a watch base's 10^5 voxels, read at every recovery step). The copy owns its
    memory and no view of it was made writeable, so its indices cannot change; nothing may set
    its writeable flag back (nothing in the engine does)."""
    a = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1).copy()
    a.setflags(write=False)
    _SEALED[id(a)] = a
    return a


def _immutable_root(a: np.ndarray) -> np.ndarray | None:
    """The array owning ``a``'s memory when it is one of :func:`sealed_indices`' and it and
    every view between are read-only, else None (a caller's read-only array may still change
    through a writeable view made before it was frozen: it is compared, not trusted)."""
    while True:
        if a.flags.writeable:
            return None
        if a.base is None:
            return a if _SEALED.get(id(a)) is a else None
        if not isinstance(a.base, np.ndarray):
            return None
        a = a.base


def _whole_view(a: np.ndarray, root: np.ndarray) -> bool:
    """Whether ``a`` reads all of ``root``'s memory in ``root``'s order: (n,) contiguous int64
    from its first byte, as many elements."""
    return (a.ndim == 1 and a.dtype == root.dtype and a.size == root.size and a.flags.c_contiguous
            and root.flags.c_contiguous and a.ctypes.data == root.ctypes.data)


class ReadOuts:
    """The read-out methods of :class:`~ids_engine.dose.DoseEngine` (a mixin: the engine
    inherits them; nothing else does).

    They use the engine's ``xp``, ``grid``, ``coarse_grid``, ``body_mask``, ``_up_host`` (the
    separable trilinear tables), ``geometry``, ``dose_fine``, ``dose_coarse``, ``_state`` (the
    per-beam maps), ``patient``, ``machine`` and ``_density_device()``, and keep their host
    caches in the engine's ``__dict__``.
    """

    # ------------------------------------------------------------------ voxel tables
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
        source = _immutable_root(idx)
        # The first and last indices first: a step's new rows mostly differ there, and two
        # integer reads cost less than a whole comparison (which decides).
        ends = (int(idx[0]), int(idx[-1])) if idx.size else None
        for i, nb in enumerate(cache):
            if nb.idx.shape == idx.shape and (ends is None or (int(nb.idx[0]), int(nb.idx[-1])) == ends) \
                    and ((source is not None and nb.source is source and _whole_view(idx, source))
                         or np.array_equal(nb.idx, idx)):
                if i:
                    cache.insert(0, cache.pop(i))
                return nb
        # First, so that an index off the grid raises IndexError here (the compiled pass below
        # does not check its indices).
        in_body = self.body_mask.ravel()[idx]
        unique = None
        if _cpu.HAVE_NUMBA:  # the tables and the distinct neighbours in one pass (the same values)
            cshape = self.coarse_grid.shape_zyx
            # Work arrays kept, one per coarse voxel: taken off the engine for the call and put
            # back after it, so a second thread (or a call after a failed one) makes its own.
            scratch = self.__dict__.pop("_coarse_scratch", None)
            if scratch is None or scratch[0] != cshape:
                scratch = (cshape, _cpu_readout.coarse_scratch(cshape))
            cidx, cw, *unique = _cpu_readout.coarse_tables(idx, self.grid.shape_zyx, cshape, self._up_host,
                                                           scratch[1])
            self.__dict__["_coarse_scratch"] = scratch
        else:
            cidx, cw = self._coarse_neighbours(idx)
        cw_body, outside = np.where(in_body[None, :], cw, np.float32(0)), np.flatnonzero(~in_body)
        if idx.size > _NEIGHBOUR_CACHE_MAX:  # a one-off read of a large set: not kept
            return _Neighbours(idx, cidx, cw, in_body, cw_body, outside, _coarse_unique=unique and tuple(unique))
        nb = _Neighbours(_frozen(idx.copy()), _frozen(cidx), _frozen(cw), _frozen(in_body), _frozen(cw_body),
                         _frozen(outside), _coarse_unique=unique and tuple(unique),
                         source=source if source is not None and _whole_view(idx, source) else None)
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
        for p in patches:
            b = int(p.beam)
            delta = np.asarray(backend.asnumpy(p.delta), dtype=np.float32)
            h, w = delta.shape
            f = self.geometry[b].coarse_fluence_factor
            R0, C0 = p.row0 // f, p.col0 // f
            R1, C1 = (p.row0 + h - 1) // f + 1, (p.col0 + w - 1) // f + 1
            placed = np.zeros((1, (R1 - R0) * f, (C1 - C0) * f), dtype=np.float32)
            placed[0, p.row0 - R0 * f : p.row0 - R0 * f + h, p.col0 - C0 * f : p.col0 - C0 * f + w] = delta
            # The fine level reads the patch on its own box, not the coarse-aligned one (a
            # different FFT size: the same values up to round-off, but not the same bits).
            self._beam_delta(nb, idx, b, delta[None], p.row0, p.col0, placed, R0, C0, out[None], _ROW0)
        out[nb.outside] = 0  # outside the body: 0 (np.where(in_body, out, 0)'s bits)
        return out

    def delta_matrix(self, columns: Sequence[Sequence[FluencePatch]], flat_index, beam_parts: bool = False):
        """Dose change (Gy) at CT voxels from each of several patch sets, without applying them.

        ``columns[k]`` is a list of patches (at most one per beam is typical: a DMR normalised
        patch); the result is ``(n voxels, n columns)`` float32 (NumPy) with column ``k`` equal
        to ``delta_at_voxels(columns[k], flat_index)`` up to float32 round-off. Per beam, the
        columns' patches are stacked on the union of their boxes and convolved in one batched
        FFT per level, on the host (no device work), except with ``beam_parts`` on a device
        backend: a DMR joint solve's matrix, read on the device by one ``delta_rows`` launch
        per level and one read (:func:`~ids_engine.dose._device_rows.device_delta_matrix`:
        equal bit for bit on the counting backend; on a GPU, a direct sum, equal to float32
        round-off, and the bit-for-bit statements below hold on the host path).

        With ``beam_parts``, returns ``(joint, parts)``: ``joint`` the same ``(n, K)`` array,
        and ``parts`` ``(n beams, n, K)`` float32 with ``parts[b][:, k]`` beam ``b``'s part of
        column ``k`` (0 where column ``k`` has no patch in beam ``b``; 0 outside the body), bit
        for bit what ``delta_matrix`` gives for the columns that hold column ``k``'s beam-``b``
        patches alone, one column per (column, beam) in column order (a per-beam solve's
        columns, :meth:`Modifier._columns <ids_engine.dmr.Modifier>`): beam ``b``'s stack is
        the same in both calls, so are its fine and coarse read-outs, and a one-beam column
        adds only those. ``joint`` is not the sum of the parts bit for bit (it adds the beams
        in turn).
        """
        if beam_parts and self.xp is not np:
            # A joint solve's matrix, whose beam parts a per-beam retry reuses: on the device
            # (one launch per level, one read; see _device_rows). The solve's other reads
            # (compensating columns, predictions) stay on the host, within a step's sync budget.
            from ._device_rows import device_delta_matrix

            return device_delta_matrix(self, columns, flat_index)
        return self._host_delta_matrix(columns, flat_index, beam_parts)

    def _host_delta_matrix(self, columns: Sequence[Sequence[FluencePatch]], flat_index, beam_parts: bool = False):
        """:meth:`delta_matrix` on the host, whatever the backend."""
        idx = self._host_index(flat_index)
        n, ncol = int(idx.shape[0]), len(columns)
        out = np.zeros((ncol, n), dtype=np.float32)
        parts = np.zeros((len(self.geometry), ncol, n), np.float32) if beam_parts else None
        if ncol and n:
            nb = self._neighbours(idx)
            for b, stack, R0, C0, sel in self._beam_stacks(columns):
                f = self.geometry[b].coarse_fluence_factor
                self._beam_delta(nb, idx, b, stack, R0 * f, C0 * f, stack, R0, C0, out, sel,
                                 None if parts is None else parts[b])
            if nb.outside.size:  # voxels outside the body read 0 (np.where(in_body, ., 0)'s bits)
                out[:, nb.outside] = 0
                if parts is not None:
                    parts[:, :, nb.outside] = 0
        return (out.T, parts.transpose(0, 2, 1)) if beam_parts else out.T

    def _beam_stacks(self, columns: Sequence[Sequence[FluencePatch]]):
        """Per beam (ascending), the stack of the columns with a patch in that beam: yields
        ``(beam, stack, R0, C0, sel)``, ``stack`` ``(m, h, w)`` float32 on the coarse-aligned
        box at fine cell ``(R0 f, C0 f)`` (f = the beam's coarse fluence factor) holding, in
        column order, each such column's patches of the beam summed, and ``sel`` the columns
        (a slice when consecutive, else ``(m,)`` int64)."""
        # Per beam: [column, row0, col0, delta] of its patches, in column order.
        by_beam: dict[int, list] = {}
        for k, ps in enumerate(columns):
            for p in ps:
                d = p.delta
                if type(d) is not np.ndarray:
                    d = np.asarray(backend.asnumpy(d))
                b = int(p.beam)
                items = by_beam.get(b)
                if items is None:
                    items = by_beam[b] = []
                items.append((k, p.row0, p.col0, d))
        for b in sorted(by_beam):
            items = by_beam[b]
            r0 = min(it[1] for it in items)
            c0 = min(it[2] for it in items)
            r1 = max(it[1] + it[3].shape[0] for it in items)
            c1 = max(it[2] + it[3].shape[1] for it in items)
            f = self.geometry[b].coarse_fluence_factor
            R0, C0 = r0 // f, c0 // f
            R1, C1 = -(-r1 // f), -(-c1 // f)
            # A stack on the coarse-aligned box, so the fine and the coarse level share it, of
            # the columns with a patch in this beam only (a per-beam solve's columns each have
            # one beam's patch): the others' response is zero, and adding it changes nothing.
            # The items are in column order, so the columns used are the distinct ones in turn.
            used: list[int] = []
            for it in items:
                if not used or used[-1] != it[0]:
                    used.append(it[0])
            m = len(used)
            stack = np.zeros((m, (R1 - R0) * f, (C1 - C0) * f), np.float32)
            i = -1
            last = -1
            for k, pr, pc, d in items:
                if k != last:
                    i, last = i + 1, k
                rr, cc = pr - R0 * f, pc - C0 * f
                ph, pw = d.shape
                stack[i, rr : rr + ph, cc : cc + pw] += d.astype(np.float32, copy=False)
            # Rows of ``out``: a slice when the columns used are consecutive (the usual case;
            # the same float32 additions as through an index array).
            sel = slice(used[0], used[-1] + 1) if used[-1] - used[0] == m - 1 else np.asarray(used, np.int64)
            yield b, stack, R0, C0, sel

    def _beam_delta(self, nb: "_Neighbours", idx: np.ndarray, b: int, stack: np.ndarray, r0: int, c0: int,
                    placed: np.ndarray, R0: int, C0: int, out: np.ndarray, sel, part: np.ndarray | None = None) -> None:
        """Adds beam ``b``'s dose change at CT voxels ``idx`` from a stack of ``k`` patches to
        rows ``sel`` ((k,) int64, distinct, or a slice of k rows) of ``out`` ((K, n) float32):
        the fine level's part, then the coarse level's; and the same to rows ``sel`` of
        ``part`` ((K, n) float32, zero there: beam ``b``'s own part), when given.

        ``stack`` (k, h, w) float32 is placed at fine fluence cell (r0, c0); ``placed`` holds
        the same patches on the coarse-aligned box at (R0 f, C0 f) (f = the beam's coarse
        fluence factor), block-summed here for the coarse level.
        """
        geo = self.geometry[b]
        targets = (out,) if part is None else (out, part)
        if geo.fine.components:
            rows = self._rows_of(nb, b, "fine", idx)
            df = _level_delta_rows(geo.fine, stack, r0, c0, rows, self._crop_spectra(b, "fine"),
                                   self._response_windows(b, "fine"))
            for t in targets:
                t[sel] += df
        if geo.coarse.components:
            m = placed.shape[0]
            coarse = _cpu_readout.block_sum(placed, geo.coarse_fluence_factor)
            uniq, inv = nb.coarse_unique()
            rows = self._rows_of(nb, b, "coarse", uniq)
            # Read once per distinct coarse voxel (the same values as reading all 8 n).
            dc = _level_delta_rows(geo.coarse, coarse, R0, C0, rows, self._crop_spectra(b, "coarse"),
                                   self._response_windows(b, "coarse"))
            for t in targets:
                if _cpu.HAVE_NUMBA:  # the gather, weights and 8-sum in one pass (the same floats)
                    if isinstance(sel, slice):  # rows sel of t: a view, its rows 0..m-1
                        _cpu.combine_neighbours(dc, inv, nb.cw, t[sel], _rows_upto(m))
                    else:
                        _cpu.combine_neighbours(dc, inv, nb.cw, t, sel)
                else:
                    t[sel] += (dc[:, inv].reshape(m, 8, idx.shape[0]) * nb.cw[None]).sum(axis=1)

    def _rows_of(self, nb: "_Neighbours", b: int, name: str, level_index: np.ndarray) -> "_LevelRows":
        rows = nb.levels.get((b, name))
        if rows is None:
            rows = nb.levels[(b, name)] = _LevelRows.of(getattr(self.geometry[b], name), level_index)
        return rows

    def _level_tables(self, name: str) -> _LevelTables:
        """The kept every-beam look-ups of level ``name`` (:class:`_LevelTables`), new when the
        engine's levels are not the objects they were built for (other beams, geometry or
        machine)."""
        levels = [getattr(g, name) for g in self.geometry]
        cache = self.__dict__.setdefault("_level_tables_cache", {})
        got = cache.get(name)
        if got is None or len(got.levels) != len(levels) or any(a is not b for a, b in zip(got.levels, levels)):
            got = cache[name] = _LevelTables(levels)
        return got

    def _rows_of_beams(self, nb: "_Neighbours", beams: list, name: str, level_index: np.ndarray):
        """The look-ups of beams ``beams`` at level voxels ``level_index`` (a DMR joint solve's
        read: every beam at the same rows) stacked: ``(ok (S, m) bool, v, u (S, m) float32,
        weights (S, nc, m) float32)``, C-contiguous, bit for bit one ``_LevelRows.of`` per beam,
        gathered from the engine's kept look-ups (:class:`_LevelTables`: only the level voxels
        never read before are looked up). The beams not in ``nb.levels`` yet get their
        ``_LevelRows`` there (views of the stacked tables), so the host path's reads of the
        same rows find them."""
        kept = self._level_tables(name)
        x = kept.gather(level_index)
        b_count, m = len(self.geometry), int(x.shape[1])
        ok, v, u, w = x[:b_count], x[b_count : 2 * b_count], x[2 * b_count : 3 * b_count], \
            x[3 * b_count :].reshape(b_count, kept.nc, m)
        if len(beams) != b_count or any(b != s for s, b in enumerate(beams)):
            sel = np.asarray(beams, np.int64)
            ok, v, u, w = ok[sel], v[sel], u[sel], w[sel]
        ok = ok != 0
        todo = [s for s, b in enumerate(beams) if (b, name) not in nb.levels]
        if todo:
            bounds = _cpu_readout.stacked_bounds(ok, v, u) if _cpu.HAVE_NUMBA else _stacked_bounds(ok, v, u)
            for s in todo:
                nb.levels[(beams[s], name)] = _LevelRows(m, ok[s], v[s], u[s], w[s], bounds[s])
        return ok, v, u, w

    def _crop_spectra(self, b: int, name: str) -> dict:
        return self.__dict__.setdefault("_crop_spectra_cache", {}).setdefault((b, name), {})

    def _response_windows(self, b: int, name: str) -> dict:
        """Beam ``b``'s recent patch-response windows on level ``name`` (``_level_delta_compute``:
        a stack's convolved window does not depend on the rows that sample it, and recovery
        reads the same compensating column at rows with the same window again)."""
        return self.__dict__.setdefault("_response_window_cache", {}).setdefault((b, name), {})

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


# ----------------------------------------------------------------------------- level read-outs
def _level_delta_batch(lvl: Level, stack: np.ndarray, r0: int, c0: int, level_index: np.ndarray) -> np.ndarray:
    """Host: (k, n) dose change at level voxels from a stack of k patches on the level's grid."""
    return _level_delta_rows(lvl, stack, r0, c0, _LevelRows.of(lvl, level_index))

def _level_delta_rows(lvl: Level, stack: np.ndarray, r0: int, c0: int, rows: "_LevelRows",
                      spectra: dict | None = None, windows: dict | None = None) -> np.ndarray:
    """:func:`_level_delta_batch` at level voxels whose look-ups ``rows`` holds (``spectra``:
    a cache of the cropped kernels' spectra, keyed by crop and FFT shape; ``windows``: a cache
    of the stacks' convolved windows, see :func:`_level_delta_compute`)."""
    stack = np.asarray(stack, np.float32)
    if stack.nbytes > _LEVEL_MEMO_MAX[0] or stack.shape[0] * rows.n > _LEVEL_MEMO_MAX[1]:
        return _level_delta_compute(lvl, stack, r0, c0, rows, spectra)
    data = stack.tobytes()
    key = (int(r0), int(c0), stack.shape, data)
    got = rows.memo.get(key)
    if got is not None:
        return got
    out = _level_delta_compute(lvl, stack, r0, c0, rows, spectra, windows, data)
    out.setflags(write=False)
    if len(rows.memo) >= _LEVEL_MEMO:
        rows.memo.pop(next(iter(rows.memo)))
    rows.memo[key] = out
    return out

def _level_delta_compute(lvl: Level, stack: np.ndarray, r0: int, c0: int, rows: "_LevelRows",
                         spectra: dict | None = None, windows: dict | None = None,
                         data: bytes | None = None) -> np.ndarray:
    """:func:`_level_delta_rows` computed. With ``windows`` and ``data`` (``stack.tobytes()``),
    the convolved window is looked up in ``windows`` (the same level's, keyed by the kernel
    crop, the FFT shape, the window and the stack) before it is computed, and kept there:
    the same inputs, the same bits."""
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
    # Only the rows read (lr - kr0 : hr - kr0 <= shape[0]) are transformed back: (k, nc, ., .)
    # float32, bit for bit that window of scipy.fft.irfft2(rfft2(stack) * kspec, fshape).
    wkey = None if windows is None or data is None else (key, lr, hr, lc, hc, stack.shape, data)
    dmaps = None if wkey is None else windows.pop(wkey, None)
    if dmaps is not None:
        windows[wkey] = dmaps  # most recently used last
    else:
        dmaps = _cpu.patch_response_window(stack, kspec, fshape, (lr - kr0, hr - kr0), (lc - kc0, hc - kc0))
        if wkey is not None and dmaps.nbytes <= _WINDOW_MAX and len(data) <= _WINDOW_MAX:
            # Kept writeable (a read-only array is another numba signature); only read.
            if len(windows) >= _WINDOW_CACHE:
                windows.pop(next(iter(windows)))
            windows[wkey] = dmaps
    nc = dmaps.shape[1]
    origin = (r0 - hk + lr, c0 - hk + lc)
    if _cpu.HAVE_NUMBA:
        return _cpu.sample_weighted(dmaps.reshape((k * nc,) + dmaps.shape[2:]), rows.v, rows.u, origin,
                                    rows.weights, rows.ok, k)
    s = sample_bilinear(dmaps.reshape((k * nc,) + dmaps.shape[2:]), rows.v, rows.u, origin)
    val = (s.reshape(k, nc, -1) * rows.weights[None]).sum(axis=1)
    return np.where(rows.ok[None, :], val, np.float32(0))
