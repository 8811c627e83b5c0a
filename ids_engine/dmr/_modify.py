"""Dose modification: Algorithm 1 of the IDS paper (eq. 2-3), for one voxel or a set of voxels.

For a request "voxel m to dose d_t" (see also shared notes, dmr-reading.md):

1. ``d0 = D(m)``.
2. Competing tissue: lowering uses the target's TPI map (protect the target), raising uses
   the OARs' (protect the OARs).
3. ``mu = ln 2 / mean_b TPI(b, s_b(m))`` (eq. 3), ``s_b(m)`` the control point hit by m's ray.
4. Normalised patch per beam on a box around m's projection:
   ``A_b(x, y) = K(x - x_b(m), y - y_b(m)) * exp(-mu * TPI(b, s(x, y)))`` (eq. 2), ``K`` the
   machine's narrow lateral kernel (the primary; the paper derives K from a lateral kernel
   component in the same way).
5. The dose at m from ``A`` alone, without touching the cube (``engine.delta_at_voxels``).
6. Scale by linearity: ``f = (d_t - d0) / a``. (The paper prints ``|d_t - d0| / |d_t - d1|``,
   which read literally does not reach d_t; linearity does, and the tests check D(m) = d_t.)
7. Fluence stays non-negative: the patch is clipped at ``-psi``; if clipping lost part of the
   change, further passes spread the remainder over the amplitudes that can still move.

For several voxels at once (isodose lines and surfaces, spot erasure, recovery clusters) the
normalised patches are combined with scales solved together by :meth:`Modifier.solve_step`
(regularised NNLS on the matrix ``G[j, k]`` = dose at watched voxel j from patch k, an active
set on the rows' bands, a take-back guard); ``modify_joint`` and ``recover`` in
``_recovery.py`` drive it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from ids_engine import backend
from ids_engine.dose import FluencePatch

__all__ = ["ModificationResult", "Modifier", "StepResult"]

_BASIS_CACHE = 128  # voxels whose plan-independent normalised patches are kept (Modifier._patch_basis)


def _violation(dose, lo, hi):
    """How far each dose lies outside its band [lo, hi] (0 inside)."""
    return np.maximum(np.maximum(lo - dose, dose - hi), 0.0)


def _solve_scales(g: np.ndarray, need: np.ndarray, weight: np.ndarray, regularisation: float) -> np.ndarray:
    """Non-negative, Tikhonov-regularised weighted least squares for the column scales."""
    sw = np.sqrt(weight)
    a = sw[:, None] * g
    # The columns' 2-norms as np.linalg.norm(a, axis=0) computes them (the square root of the
    # sum along axis 0 of the squares), without its argument handling: the same bits.
    norms = np.sqrt(np.add.reduce(a * a, axis=0))
    keep = norms > 0
    nk = int(np.count_nonzero(keep))
    every = nk == g.shape[1]  # (the common case: no column indexed out)
    if not nk:
        return np.zeros(g.shape[1])
    # Each column's Tikhonov weight follows its own norm, with a floor at a tenth of the
    # strongest: a weak column (a patch that barely reaches the rows) cannot buy its
    # effect with a huge scale.
    lam = math.sqrt(regularisation) * np.maximum(norms if every else norms[keep], 0.1 * float(norms.max()))
    # The augmented system [a[:, keep]; diag(lam)], [sw * need; 0] written in place (the
    # diagonal as one strided slice of the flat C-ordered array).
    n = a.shape[0]
    aug = np.zeros((n + nk, nk))
    aug[:n] = a if every else a[:, keep]
    aug.reshape(-1)[n * nk :: nk + 1] = lam
    rhs = np.zeros(n + nk)
    np.multiply(sw, need, out=rhs[:n])
    x, _ = nnls(aug, rhs, maxiter=50 * nk)
    if every:
        return x
    f = np.zeros(g.shape[1])
    f[keep] = x
    return f


def _from_beam_parts(parts, eng, rows: np.ndarray, cols: list) -> np.ndarray | None:
    """A per-beam solve's matrix (n, len(cols)) float64 from the beam parts a joint solve read
    on the same rows and beams (``(geometry, rows, joint columns, parts)``, parts (beams, n, K)
    float32), or None unless ``cols`` are the joint columns' patches one a column, in order
    (``[[p] for col in joint for p in col]``: what ``delta_matrix`` of them gives is the parts
    bit for bit, each beam's patches stacked on the same box) and the beams and rows are the
    same."""
    geometry, rows0, joint, beam_parts = parts
    if len(geometry) != len(eng.geometry) or any(a is not b for a, b in zip(geometry, eng.geometry)):
        return None
    if rows0.shape != rows.shape or not np.array_equal(rows0, rows):
        return None
    flat = [(k, p) for k, ps in enumerate(joint) for p in ps]
    if len(flat) != len(cols) or any(len({int(p.beam) for p in ps}) != len(ps) for ps in joint):
        return None  # (a joint column with two patches of one beam: its part is their sum)
    g = np.empty((rows.shape[0], len(cols)))
    for j, ((k, q), ps) in enumerate(zip(flat, cols)):
        if len(ps) != 1:
            return None
        p = ps[0]
        if (int(p.beam), int(p.row0), int(p.col0)) != (int(q.beam), int(q.row0), int(q.col0)) \
                or not np.array_equal(p.delta, q.delta):
            return None
        g[:, j] = beam_parts[int(p.beam)][:, k]
    return g


@dataclass(frozen=True, eq=False)
class StepResult:
    """One guarded joint solve: patches applied (empty for a rejected step; a step taken back
    after a round-off tie lists the patch and its negation), accepted or not, the weighted band
    violation at its rows before and after, the column scales, the rows' dose after.
    ``proposed``: the solve found a non-empty step (whether or not it was good enough to apply)."""

    patches: list
    accepted: bool
    objective_before: float
    objective_after: float
    scales: np.ndarray
    rows_after_gy: np.ndarray
    watch_after_gy: np.ndarray | None = None  # the whole watch's dose after, when the solve was given it
    proposed: bool = False


@dataclass(frozen=True, eq=False)
class ModificationResult:
    """What a modification did.

    voxels : (n,) flat CT indices; requested_gy, before_gy, achieved_gy : (n,) doses.
    patches : the fluence patches actually applied (after clipping), in order.
    passes : number of passes (more than one when clipping at zero fluence lost part of it).
    proposed : a joint solve found a step but none was good enough to apply (the request's
        voxels can change, just not for the better here); with no patches and not proposed, no
        fluence reaches the voxels or can move.
    """

    voxels: np.ndarray
    requested_gy: np.ndarray
    before_gy: np.ndarray
    achieved_gy: np.ndarray
    patches: list = field(default_factory=list)
    passes: int = 1
    proposed: bool = False


class Modifier:
    """Builds and applies modification patches on a dose engine.

    Parameters
    ----------
    engine : the dose engine (state is changed through ``apply_patches`` only).
    tpi_target, tpi_oar : per-beam TPI maps (see :func:`tpi_maps`).
    cp_cells : control point size in fine amplitudes (must match the TPI maps).
    kernel_radius_mm : half size of the patch box around the voxel's projection
        (default: the reach of the machine's narrow kernel).
    """

    def __init__(self, engine, tpi_target: list, tpi_oar: list, cp_cells: int = 5,
                 kernel_radius_mm: float | None = None) -> None:
        self.engine = engine
        self.cp_cells = int(cp_cells)
        self.tpi = {"target": [backend.asnumpy(t).astype(np.float64) for t in tpi_target],
                    "oar": [backend.asnumpy(t).astype(np.float64) for t in tpi_oar]}
        m = engine.machine
        comp = m.narrow_components[0]
        self.kernel_radius_mm = float(kernel_radius_mm or m.kernel_reach_mm(comp, 1e-3))
        # Each beam's own kernel set (matRad machines tabulate one per SSD).
        self._machines = [g.machine or m for g in engine.geometry]
        self._comp = comp
        # Stage timings (ms), accumulated; with ``profile`` the GPU is synchronised at each
        # stage boundary so the split is true (a little slower).
        self.profile = False
        self.per_beam = False
        self._beam_parts = None  # (geometry, rows, columns, parts) of the last rejected joint solve (solve_step)
        self.timings_ms = {"create_patch": 0.0, "convolution": 0.0, "update_dose_cube": 0.0}

    def _tick(self, stage: str, t0: float) -> float:
        if self.profile:
            backend.synchronize()
        t1 = time.perf_counter()
        self.timings_ms[stage] += (t1 - t0) * 1000
        return t1

    # ------------------------------------------------------------------ patches
    def normalised_patches(self, voxel: int, raise_dose: bool, movable: bool = True) -> list[FluencePatch]:
        """Algorithm 1 lines 3-9 for one voxel: the normalised patch ``A_b`` of every beam (host arrays).

        Positive amplitudes to raise the dose, negative to lower it. With ``movable`` (lowering),
        amplitudes already at zero fluence are left out (they cannot go lower).
        """
        eng = self.engine
        tissue = "oar" if raise_dose else "target"
        basis = self._patch_basis(int(voxel), tissue)
        if basis is None:
            return []
        boxes, starts, sizes, a = basis
        if movable and not raise_dose:
            psi = np.concatenate([eng.fluence_host(b)[r0 : r0 + h, c0 : c0 + w].reshape(-1)
                                  for b, r0, c0, h, w in boxes])
            a = np.where(psi > 0, a, 0.0)
        live = np.logical_or.reduceat(a > 0, starts)
        out = ((1.0 if raise_dose else -1.0) * a).astype(np.float32)
        patches = []
        for i, (b, r0, c0, h, w) in enumerate(boxes):
            if live[i]:
                patches.append(FluencePatch(b, r0, c0, out[starts[i] : starts[i] + sizes[i]].reshape(h, w)))
        return patches

    def _patch_basis(self, voxel: int, tissue: str):
        """The plan-independent part of :meth:`normalised_patches` (eq. 2-3 before the sign and
        the zero-fluence mask): ``(boxes, starts, sizes, a)``, every beam's box ``(beam, r0, c0,
        h, w)`` and its amplitudes, flat float64, or None when no box lies on a fluence grid.
        Kept for the most recent voxels (a rejected step's per-beam retry and the compensating
        columns ask for the same voxels again), while the geometry and the TPI maps stay."""
        eng = self.engine
        # Valid while the beams' geometry, the TPI maps, the machines and the box size are the
        # same objects and values (they are replaced, not changed in place).
        token = (*eng.geometry, *self.tpi["target"], *self.tpi["oar"], *self._machines)
        values = (self.kernel_radius_mm, self.cp_cells, self._comp)
        cache = self.__dict__.get("_basis_cache")
        if cache is None or len(cache[0]) != len(token) or any(x is not y for x, y in zip(cache[0], token)) \
                or cache[1] != values:
            cache = self.__dict__["_basis_cache"] = (token, values, {})
        memo = cache[2]
        key = (voxel, tissue)
        if key in memo:
            got = memo.pop(key)
            memo[key] = got  # most recently used last
            return got
        got = self._compute_patch_basis(voxel, tissue)
        if len(memo) >= _BASIS_CACHE:
            memo.pop(next(iter(memo)))
        memo[key] = got
        return got

    def _compute_patch_basis(self, voxel: int, tissue: str):
        eng = self.engine
        tpis = self.tpi[tissue]
        cp = self.cp_cells
        proj = []
        for b in range(eng.n_beams):  # the voxel's BEV position (once per voxel: the basis is kept)
            u, v, _ = eng.voxel_bev(b, [voxel])
            proj.append((float(u[0]), float(v[0])))
        # eq. 3: exp(-mu * mean_b TPI(b, s_b(m))) = 1/2
        tpi_at_m = []
        for b, (u, v) in enumerate(proj):
            t = tpis[b]
            r = min(max(int(math.floor(v / cp)), 0), t.shape[0] - 1)
            c = min(max(int(math.floor(u / cp)), 0), t.shape[1] - 1)
            tpi_at_m.append(t[r, c])
        mean_tpi = float(np.mean(tpi_at_m))
        mu = math.log(2.0) / mean_tpi if mean_tpi > 0 else 0.0
        # Every beam's box at once: the same float64 operations per amplitude as one beam at a
        # time (hypot, the kernel table's interpolation, exp are elementwise), in a few NumPy
        # calls instead of a dozen per beam.
        boxes = []  # (beam, r0, c0, h, w, pitch)
        for b, (u, v) in enumerate(proj):
            geo = eng.geometry[b]
            nv, nu = geo.fluence_grid.shape_vu
            pitch = geo.fluence_grid.pitch_mm
            half = int(math.ceil(self.kernel_radius_mm / pitch))
            r0 = max(int(math.floor(v)) - half, 0)
            c0 = max(int(math.floor(u)) - half, 0)
            r1 = min(int(math.floor(v)) + half + 2, nv)
            c1 = min(int(math.floor(u)) + half + 2, nu)
            if r1 <= r0 or c1 <= c0:
                continue
            boxes.append((b, r0, c0, r1 - r0, c1 - c0, pitch))
        if not boxes:
            return None
        nb = len(boxes)
        bb = np.array([x[0] for x in boxes])
        r0s, c0s, hs, ws = (np.array([x[i] for x in boxes], np.int64) for i in (1, 2, 3, 4))
        sizes = hs * ws
        starts = np.zeros(nb, np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        which = np.repeat(np.arange(nb), sizes)
        local = np.arange(int(sizes.sum())) - starts[which]
        rows = r0s[which] + local // ws[which]
        cols = c0s[which] + local % ws[which]
        pv = np.array([proj[b][1] for b in bb])
        pu = np.array([proj[b][0] for b in bb])
        pitch = np.array([x[5] for x in boxes])
        # (rows - v) and (cols - u) as np.arange(r0, r1)[:, None] - v: int64 - float64.
        radius = np.hypot(rows - pv[which], cols - pu[which]) * pitch[which]
        tpi_flat, tpi_start, tpi_nu = self._tpi_flat(tissue)
        t = tpi_flat[tpi_start[bb][which] + rows * tpi_nu[bb][which] + cols]
        machines = [self._machines[b] for b in bb]
        if all(mc is machines[0] for mc in machines):
            k = machines[0].kernel_at(self._comp, radius)
        else:
            k = np.empty_like(radius)
            for i, mc in enumerate(machines):
                seg = slice(int(starts[i]), int(starts[i] + sizes[i]))
                k[seg] = mc.kernel_at(self._comp, radius[seg])
        a = k * np.exp(-mu * t)
        a.setflags(write=False)
        return [x[:5] for x in boxes], starts, sizes, a

    def _tpi_flat(self, tissue: str):
        """Every beam's per-amplitude TPI map of ``tissue`` (:meth:`_tpi_cells`) in one flat
        float64 array: (values, start of each beam, columns of each beam), built once."""
        cache = self.__dict__.setdefault("_tpi_flat_cache", {})
        maps = [self._tpi_cells(tissue, b) for b in range(len(self.engine.geometry))]
        got = cache.get(tissue)
        if got is None or len(got[0]) != len(maps) or any(m is not g for m, g in zip(maps, got[0])):
            sizes = np.array([m.size for m in maps], np.int64)
            start = np.zeros(len(maps), np.int64)
            np.cumsum(sizes[:-1], out=start[1:])
            flat = np.concatenate([m.reshape(-1) for m in maps]) if maps else np.zeros(0)
            got = cache[tissue] = (maps, (flat, start, np.array([m.shape[1] for m in maps], np.int64)))
        return got[1]

    def _tpi_cells(self, tissue: str, b: int) -> np.ndarray:
        """Beam ``b``'s TPI map of ``tissue`` per fine fluence amplitude (each control point's
        value repeated over its cells; the edge control points extended), built once."""
        cache = self.__dict__.setdefault("_tpi_cells_cache", {})
        t = self.tpi[tissue][b]
        got = cache.get((tissue, b))
        if got is None or got[0] is not t:
            nv, nu = self.engine.geometry[b].fluence_grid.shape_vu
            tr = np.clip(np.arange(nv) // self.cp_cells, 0, t.shape[0] - 1)
            tc = np.clip(np.arange(nu) // self.cp_cells, 0, t.shape[1] - 1)
            got = cache[(tissue, b)] = (t, t[tr[:, None], tc[None, :]])
        return got[1]

    # ------------------------------------------------------------------ modify
    def modify(self, voxels, target_gy, *, max_passes: int = 4, rel_tol: float = 0.005,
               abs_tol_gy: float = 1e-3) -> ModificationResult:
        """Bring CT voxels (flat indices) to ``target_gy`` and apply the patches to the engine."""
        eng = self.engine
        vox = np.atleast_1d(np.asarray(voxels, dtype=np.int64))
        goal = np.broadcast_to(np.asarray(target_gy, dtype=np.float64), vox.shape).copy()
        before = backend.asnumpy(eng.dose_at_voxels(vox)).astype(np.float64)
        applied: list[FluencePatch] = []
        passes = 0
        current = before.copy()
        if vox.size > 1:
            # Joint solves converge in two or three passes; later ones mostly trade one voxel's
            # error for another's (measured on an 18-voxel line drag: a fourth pass costs a third
            # more and gains nothing).
            max_passes = min(max_passes, 3)
        for passes in range(1, max_passes + 1):
            need = goal - current
            tol = np.maximum(rel_tol * np.abs(goal - before), abs_tol_gy)
            if vox.size > 1:
                # Several voxels solved together rarely meet every target exactly (neighbouring
                # patches overlap): stop at 0.25 % of the requested dose instead of chasing it.
                tol = np.maximum(tol, 0.0025 * np.abs(goal))
            active = np.abs(need) > tol
            if not active.any():
                passes -= 1
                break
            cols, mats = [], []
            for k in np.flatnonzero(active):
                t0 = time.perf_counter()
                ps = self.normalised_patches(int(vox[k]), raise_dose=need[k] > 0)
                t0 = self._tick("create_patch", t0)
                if not ps:
                    continue
                cols.append((k, ps))
                mats.append(backend.asnumpy(eng.delta_at_voxels(ps, vox)).astype(np.float64))
                self._tick("convolution", t0)
            if not cols:
                break
            g = np.stack(mats, axis=1)  # (n voxels, n patches)
            # Solve G f = need with f >= 0 (the patches carry their sign). Patches come from the
            # voxels still off target, but every voxel of the request is a row, so a later pass
            # does not push voxels that are already on target past it.
            if len(cols) == 1 and vox.size == 1:
                a = g[0, 0]
                f = np.array([need[0] / a]) if a != 0 and need[0] / a > 0 else np.zeros(1)
            else:
                f, _ = nnls(g, need)
            if not np.any(f > 0):
                break
            t0 = time.perf_counter()
            combined = self._combine([(fk, ps) for fk, (_, ps) in zip(f, cols) if fk > 0])
            clipped = self._clip_nonnegative(combined)
            t0 = self._tick("create_patch", t0)
            if not clipped:
                break
            eng.apply_patches(clipped)
            self._tick("update_dose_cube", t0)
            applied.extend(clipped)
            current = backend.asnumpy(eng.dose_at_voxels(vox)).astype(np.float64)
        self.last_passes = max(passes, 1)
        return ModificationResult(vox, goal, before, current, applied, max(passes, 1))

    # ------------------------------------------------------------------ joint solve
    def solve_step(self, rows, row_lo, row_hi, row_goal, row_weight, col_voxels, col_signs, *,
                   regularisation: float = 1e-3, keep_weight: float = 0.01, compensate: int = 3,
                   iterations: int = 3, accept_hi=None, per_beam: bool | None = None,
                   watch=None) -> "StepResult":
        """One guarded joint solve: patches at ``col_voxels`` scaled together so that the rows
        end in their bands.

        Parameters
        ----------
        rows : (n,) flat CT indices whose dose the solve looks at.
        row_lo, row_hi : (n,) the band each row must end in (Gy; +/- inf for open sides).
        row_goal : (n,) where a row outside its band should go (inside the band).
        row_weight : (n,) priority of each row.
        col_voxels, col_signs : voxels whose normalised patches are the columns, +1 to raise, -1 to lower.
        regularisation : Tikhonov weight relative to each column's norm (at least a tenth of the
            strongest column's). Without it, the
            raise and lower patches of neighbouring voxels (nearly opposite columns, condition
            numbers ~1e5) get huge opposite scales that cancel on paper and blow up once the
            fluence is clipped at zero.
        keep_weight : rows inside their band prefer to stay put with this relative weight.
        compensate : priority rows (weight > 1) the first solution would push out of their band
            get up to this many columns of their own (the opposite sign), e.g. the request's voxel
            next to a cold cluster that is being raised.
        iterations : rounds of the active set: rows predicted to leave their band are added
            as rows aiming at the band's edge, and the scales solved again.
        accept_hi : upper band edges for the acceptance test when they differ from ``row_hi``
            (a soft cap the solve respects but that does not make a step worse).
        per_beam : each beam's part of each patch a column of its own (the beam mix is solved
            too); default: ``self.per_beam``.
        watch : ``(voxels, dose_gy, row_pos)``: the watched voxels the rows are taken from
            (``rows == voxels[row_pos]``) and their current dose, just read by the caller. The
            solve then reads the dose of all of them once after applying its patches and returns
            it (``watch_after_gy``), so a recovery step costs one device read, not three.
            ``voxels`` may instead be a function of no arguments returning that dose (float64,
            host): recovery's reader of its watch (``dmr._recovery._watch_dose``).

        Scales solve ``min ||W^1/2 (G f - need)||^2 + reg sum_k n_k^2 f_k^2``, ``f >= 0``, with
        ``n_k = max(||W^1/2 G_k||, 0.1 max_j ||W^1/2 G_j||)``
        (NNLS on the augmented system). The combined patch is clipped at zero fluence and judged
        on its predicted effect at the rows (linear in the patch): unless the weighted band
        violation at the rows gets strictly better, half of it is judged, and if that is still
        not better the step is rejected and nothing is applied. A step that changes no row by
        more than 1e-4 of the rows' largest dose is rejected as negligible (solving the same
        voxel again would give the same step; recovery marks it done). An applied step whose
        measured violation is not better after all (a round-off tie) is taken back. Every
        patch applied, take-backs included, is in ``patches`` in order (so a journal replays
        it exactly).
        """
        eng = self.engine
        rows = np.asarray(rows, np.int64)
        lo = np.asarray(row_lo, float)
        hi = np.asarray(row_hi, float)
        weight = np.asarray(row_weight, float)
        t0 = time.perf_counter()
        col_voxels = [int(v) for v in col_voxels]
        col_signs = [float(v) for v in col_signs]
        cols = []
        per_beam = self.per_beam if per_beam is None else bool(per_beam)
        for v, sgn in zip(col_voxels, col_signs):
            cols.extend(self._columns(v, sgn > 0, per_beam))
        t0 = self._tick("create_patch", t0)
        # A rejected joint step is retried with per-beam columns on the same rows (recovery's
        # ``_Rows._solve``): the joint read keeps each beam's part, and the retry takes its
        # columns from it instead of reading again (on NumPy and the counting backend the same
        # numbers bit for bit: a per-beam column's read-out is its beam's part; on a GPU the
        # parts come from the device read-out, equal to the host's to float32 round-off).
        parts, self._beam_parts = self._beam_parts, None
        if watch is not None:
            w_vox, w_before, row_pos = watch
            w_before = np.asarray(w_before, np.float64)
            before = w_before[row_pos]
        else:
            w_vox = w_before = row_pos = None
            before = backend.asnumpy(eng.dose_at_voxels(rows)).astype(np.float64)
        acc_hi = hi if accept_hi is None else np.asarray(accept_hi, float)
        viol0 = _violation(before, lo, hi)
        obj0 = float(np.sum(weight * _violation(before, lo, acc_hi) ** 2))
        if not cols:
            return StepResult([], False, obj0, obj0, np.zeros(0), before, w_before)
        g = None
        if per_beam and parts is not None:
            g = _from_beam_parts(parts, eng, rows, cols)
        if g is None and not per_beam:
            joint, beam_parts = eng.delta_matrix(cols, rows, beam_parts=True)
            g = backend.asnumpy(joint).astype(np.float64)
            # (copies: the compensating columns below extend ``cols``, and a caller may reuse ``rows``)
            self._beam_parts = (tuple(eng.geometry), rows.copy(), list(cols), beam_parts)
        elif g is None:
            g = backend.asnumpy(eng.delta_matrix(cols, rows)).astype(np.float64)
        t0 = self._tick("convolution", t0)
        active = viol0 > 0
        aim = np.where(active, np.clip(np.asarray(row_goal, float), lo, hi), before)
        eps = 1e-4 * max(float(np.nanmax(np.abs(before))), 1.0)
        f = np.zeros(len(cols))
        for it in range(iterations):
            f = _solve_scales(g, aim - before, np.where(active, weight, keep_weight * weight), regularisation)
            pred = before + g @ f
            newly = (~active) & (_violation(pred, lo, hi) > eps)
            if not newly.any():
                break
            if it == 0 and compensate > 0:
                # The rows pushed furthest out get a column of their own, of the opposite sign.
                # Only priority rows (the request, pins, guards, earlier features): compensating
                # ordinary tissue with opposite patches trades a hot spot here for a cold one there.
                cand = np.flatnonzero(newly & (weight > 1.0))
                cand = cand[np.argsort(-(weight * _violation(pred, lo, hi))[cand], kind="stable")][:compensate]
                extra, added = [], []
                for i in cand:
                    sgn = -1.0 if pred[i] > hi[i] else 1.0
                    ps = self._columns(int(rows[i]), sgn > 0, per_beam)
                    extra.extend(ps)
                    added.extend([(int(rows[i]), sgn)] * len(ps))
                if extra:
                    g = np.hstack([g, backend.asnumpy(eng.delta_matrix(extra, rows)).astype(np.float64)])
                    cols.extend(extra)
                    col_voxels += [v for v, _ in added]
                    col_signs += [sg for _, sg in added]
            inset = np.minimum(0.25 * (hi - lo), 0.005 * np.maximum(np.abs(aim), 1.0))
            aim = np.where(newly, np.clip(pred, lo + inset, hi - inset), aim)
            active |= newly
        t0 = self._tick("convolution", t0)
        if not np.any(f > 0):
            return StepResult([], False, obj0, obj0, f, before, w_before)
        combined = self._combine([(fk, ps) for fk, ps in zip(f, cols) if fk > 0])
        clipped, cut = self._clip_nonnegative(combined, report=True)
        t0 = self._tick("create_patch", t0)
        if not clipped:
            return StepResult([], False, obj0, obj0, f, before, w_before)
        # The rows' dose after the step is linear in the patches: judged from its prediction
        # (one column of the patch response), a step that would not lower the rows' objective,
        # not even at half length, is never applied (no apply and take-back of the cube).
        pos = f > 0
        if not cut:  # nothing was clipped: the solve's own columns predict it
            pred = g[:, : f.size][:, pos] @ f[pos]
        else:
            pred = backend.asnumpy(eng.delta_matrix([clipped], rows))[:, 0].astype(np.float64)
        t0 = self._tick("convolution", t0)
        if float(np.abs(pred).max()) < eps:  # a negligible step (below 0.01 % of the dose): nothing to judge
            self._tick("update_dose_cube", t0)
            return StepResult([], False, obj0, obj0, f, before, w_before, proposed=True)
        if not float(np.sum(weight * _violation(before + pred, lo, acc_hi) ** 2)) < obj0:
            if not float(np.sum(weight * _violation(before + 0.5 * pred, lo, acc_hi) ** 2)) < obj0:
                self._tick("update_dose_cube", t0)
                return StepResult([], False, obj0, obj0, f, before, w_before, proposed=True)
            clipped = [FluencePatch(p.beam, p.row0, p.col0, (np.float32(0.5) * p.delta).astype(np.float32)) for p in clipped]
        applied = list(clipped)
        eng.apply_patches(clipped)
        if watch is not None:
            w_after = w_vox() if callable(w_vox) else backend.asnumpy(eng.dose_at_voxels(w_vox)).astype(np.float64)
            after = w_after[row_pos]
        else:
            w_after = None
            after = backend.asnumpy(eng.dose_at_voxels(rows)).astype(np.float64)
        obj1 = float(np.sum(weight * _violation(after, lo, acc_hi) ** 2))
        accepted = obj1 < obj0
        if accepted:  # no per-beam retry follows: the joint read's parts are not kept
            self._beam_parts = None
        if not accepted:  # the prediction's round-off decided a tie: the step is taken back
            back = [FluencePatch(p.beam, p.row0, p.col0, (-p.delta).astype(np.float32)) for p in clipped]
            eng.apply_patches(back)
            applied.extend(back)
            after, obj1, w_after = before, obj0, w_before
        self._tick("update_dose_cube", t0)
        return StepResult(applied, accepted, obj0, obj1, f, after, w_after, proposed=True)

    def _columns(self, voxel: int, raise_dose: bool, per_beam: bool) -> list[list[FluencePatch]]:
        """The columns of a joint solve for one voxel: its normalised patch as one column, or
        (``per_beam``) each beam's part as a column of its own, so the solve also chooses how
        much each beam contributes."""
        ps = self.normalised_patches(int(voxel), raise_dose=raise_dose)
        if not ps:
            return []
        return [[p] for p in ps] if per_beam else [ps]

    def _combine(self, scaled: list[tuple[float, list[FluencePatch]]]) -> list[FluencePatch]:
        """Sum scaled patches per beam on the union of their boxes."""
        by_beam: dict[int, list[tuple[float, FluencePatch]]] = {}
        for fk, ps in scaled:
            for p in ps:
                by_beam.setdefault(p.beam, []).append((fk, p))
        out = []
        for b, items in sorted(by_beam.items()):
            if len(items) == 1:  # (0.0 + the scaled patch, as the sum below: only a -0.0 changes, to +0.0)
                fk, p = items[0]
                out.append(FluencePatch(b, p.row0, p.col0, (fk * p.delta + 0.0).astype(np.float32)))
                continue
            r0 = min(p.row0 for _, p in items)
            c0 = min(p.col0 for _, p in items)
            r1 = max(p.row0 + p.delta.shape[0] for _, p in items)
            c1 = max(p.col0 + p.delta.shape[1] for _, p in items)
            acc = np.zeros((r1 - r0, c1 - c0), np.float64)
            for fk, p in items:
                ph, pw = p.delta.shape
                acc[p.row0 - r0 : p.row0 - r0 + ph, p.col0 - c0 : p.col0 - c0 + pw] += fk * p.delta
            out.append(FluencePatch(b, r0, c0, acc.astype(np.float32)))
        return out

    def _clip_nonnegative(self, patches: list[FluencePatch], report: bool = False):
        """Replace each patch by the part that keeps the fluence >= 0 (drops empty ones).
        With ``report``: ``(patches, cut)``, ``cut`` True when zero fluence cut some amplitude
        (the clipped patch then differs from the given one by more than round-off)."""
        eng = self.engine
        out = []
        cut = False
        zero = np.float32(0)
        for p in patches:
            h, w = p.shape
            psi = eng.fluence_host(p.beam)[p.row0 : p.row0 + h, p.col0 : p.col0 + w]
            raw = psi + p.delta
            if not cut:
                cut = bool((raw < 0).any())
            # max(raw, 0) - psi, written into raw (a new array), then float32 (no copy when it is)
            delta = np.subtract(np.maximum(raw, zero, out=raw), psi, out=raw).astype(np.float32, copy=False)
            if delta.any():  # (an element not 0: NaN counts, -0.0 does not, as delta != 0)
                out.append(FluencePatch(p.beam, p.row0, p.col0, delta))
            else:
                cut = True
        return (out, cut) if report else out
