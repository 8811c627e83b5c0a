"""A small linear programme that takes an unasked far rise back under the report line.

The side-effect repair (``Session._repair_side_effects``) first tries greedy recovery steps;
when they leave a far rise above ``report_rise_pct`` this solves for it at once. Dose is linear
in fluence, so over a modest set of per-beam patches (the DMR's own normalised patches, see
:meth:`Modifier.normalised_patches`) the dose at any voxel after scaling them by ``x >= 0`` is
``D_now + G x`` exactly (``DoseEngine.delta_matrix``). The programme:

* columns: every beam's lowering and raising patch at a few far voxels (the worst, spread
  apart) and at a few of the request's voxels (to give back what lowering a beam's path takes
  from the request and the target next to it);
* minimise the fluence moved, ``sum_k |patch_k|_1 x_k`` (a small change, not an extreme one);
* far rows: every far voxel that rose unasked keeps its unasked rise at or below ``goal_gy``
  (a target voxel may instead end at or below the target's upper band when the caller says
  so: the session's first stage, which leaves rises inside the band to its second);
* watch rows (the request's voxels, pins, earlier features, guards, target coverage, OARs,
  the normal-tissue sample): no voxel ends further outside its band than it is now;
* fluence floor: each lowering column is bounded so that alone it takes none of the cells it
  mainly lowers (by more than a tenth of its largest change) below zero; its tails and where
  several overlap are caught by clipping the applied sum at zero, which the measure sees.

Watch rows start with the request's, pins', features' and guards' voxels and the tissue
voxels within a margin of their band; rows the applied solution breaks, and far voxels it
newly lifts above the goal, are added and the programme solved again (at most ``rounds``
times). A slack variable (costly) on the far rows keeps the programme feasible: when even the linear
model cannot reach the report line the repair stops after one solve (fail fast). Otherwise
the solution is applied through the engine's patch path and checked with the whole-cube
side-effect measure; the caller keeps it (journaled with the request) or takes it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..dose import FluencePatch
from ._recovery import Watch, _pick_spread, _watch_dose

__all__ = ["LPRepairOptions", "LPRepairResult", "lp_far_repair"]


@dataclass(frozen=True)
class LPRepairOptions:
    """far_columns : far voxels given columns (the worst, ``spread_mm`` apart), each beam's
    lowering patch and (``far_raise``) its raising one; request_columns : request voxels given
    both (spread the same way); margin_gy : tissue rows start as rows when within this of their
    band's edge; far_margin_gy : far voxels start as rows when within this of the goal; rounds :
    solves at most (each after the first adds the rows the previous solution broke, and the far
    voxels it lifted); max_new_rows : rows added per round and kind; time_limit_s : HiGHS's
    limit per solve (a safety: measured solves take 20-400 ms; hitting it makes the outcome
    depend on the machine's speed); slack_cost : the cost of 1 Gy of far rise above the goal,
    against the cheapest column's fluence per Gy; drop_gy : responses below this (Gy per Gy of
    a column's largest) are left out of the sparse programme; exact : after a round that failed,
    the fluence cells its solution took below zero (clipped when applied) become rows of the
    next (``psi + sum_k x_k delta_k >= 0`` exactly), a row of the programme that broke all
    the same aims inside its band by what it missed (the model's error), and a voxel of the
    request, a pin, a feature or a guard counts as broken as the session's no-worse test
    judges it (further outside than its group's worst now); the wide retry's setting."""

    far_columns: int = 16
    request_columns: int = 4
    spread_mm: float = 6.0
    margin_gy: float = 0.2
    rounds: int = 3
    max_new_rows: int = 400
    time_limit_s: float = 2.0
    slack_cost: float = 1000.0
    far_raise: bool = True
    far_margin_gy: float = 0.6
    drop_gy: float = 1e-3
    exact: bool = False


@dataclass
class LPRepairResult:
    """patches : applied and kept (empty unless ``ok``); ok : the engine holds the solution and
    the whole-cube measure found every far unasked rise at or under ``accept_gy`` with no watch
    row further outside its band; status : "ok", "infeasible" (even the linear model stays
    above the line, or HiGHS says so), "broke rows" / "far rise left" (the last round's applied
    solution did), "time", "nothing to do", "no columns", "empty" (the caller sets "worse" when
    its own check refuses it); rises : the measure's unasked rises after a kept solution;
    rounds : solves run; timings_ms : per stage; sizes : the last programme's size and slack;
    trace : per round, the slack and what the measure found (diagnostics)."""

    patches: list = field(default_factory=list)
    ok: bool = False
    status: str = ""
    rounds: int = 0
    rises: object = None
    timings_ms: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    trace: list = field(default_factory=list)


def _spread(flat: np.ndarray, k: int, shape_zyx, spacing_mm_zyx, apart_mm: float) -> list[int]:
    """Up to ``k`` of ``flat`` taken in order, each at least ``apart_mm`` from those taken
    (recovery's cluster pick, :func:`~ids_engine.dmr._recovery._pick_spread`)."""
    flat = np.asarray(flat, np.int64)
    if k <= 0 or flat.size == 0:
        return []
    pts = np.stack(np.unravel_index(flat, tuple(shape_zyx)), -1) * np.asarray(spacing_mm_zyx, float)
    return [int(flat[j]) for j in _pick_spread(np.arange(flat.size), pts, apart_mm, k)]


def _below_floor(eng, combined) -> list[tuple[int, int, int, float]]:
    """The fluence cells a combined solution takes below zero: (beam, row, column, fluence now)."""
    out = []
    for p in combined:
        h, w = p.delta.shape
        psi = np.asarray(eng.fluence_host(p.beam)[p.row0:p.row0 + h, p.col0:p.col0 + w], np.float64)
        for r, c in zip(*np.nonzero(psi + np.asarray(p.delta, np.float64) < 0)):
            out.append((int(p.beam), int(p.row0 + r), int(p.col0 + c), float(psi[r, c])))
    return out


def _floor_rows(columns, scale: np.ndarray, cells) -> np.ndarray:
    """Rows ``sum_k x_k scale_k delta_k(cell)`` for fluence cells (beam, row, column, psi)."""
    rows = np.zeros((len(cells), len(columns)))
    for k, ps in enumerate(columns):
        p = ps[0]
        h, w = p.delta.shape
        for i, (b, r, c, _) in enumerate(cells):
            if b == p.beam and p.row0 <= r < p.row0 + h and p.col0 <= c < p.col0 + w:
                rows[i, k] = float(p.delta[r - p.row0, c - p.col0]) * scale[k]
    return rows


def lp_far_repair(modifier, watch: Watch, rises, back: Callable[[], None], *, request_voxels: np.ndarray,
                  before_at: Callable[[np.ndarray], np.ndarray], measure: Callable[[], object],
                  goal_gy: float, accept_gy: float, target_hi_gy: float | None, shape_zyx, spacing_mm_zyx,
                  eps_gy: float, options: LPRepairOptions | None = None) -> LPRepairResult:
    """Solve for and apply patches taking every far unasked rise of ``rises``
    (:class:`~ids_engine.dmr._side_effects.UnaskedRise`) to ``goal_gy`` or below with no
    watched voxel further outside its band; see the module docstring.

    ``before_at(flat)``: the dose before the request (Gy, host); ``measure()``: the unasked
    rises of the engine's current state (the whole cube); ``accept_gy``: the largest unasked
    rise the measure may find for ``ok``; ``back()`` takes the engine back to its state at the
    call, bit for bit (the session's checkpoint). With ``ok`` False the engine is back there.
    ``target_hi_gy``: a far target voxel may end up to there instead of within ``goal_gy``
    (the target's upper band); None: target voxels are held to ``goal_gy`` like the rest."""
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    opts = options or LPRepairOptions()
    eng = modifier.engine
    t_all = time.perf_counter()
    tm: dict = {}
    out = LPRepairResult(timings_ms=tm)

    def tick(name, t0):
        t1 = time.perf_counter()
        tm[name] = tm.get(name, 0.0) + (t1 - t0) * 1000
        return t1

    t0 = time.perf_counter()
    over = np.flatnonzero(rises.unasked_gy > goal_gy)
    if not over.size:
        out.status = "nothing to do"
        return out
    order = over[np.argsort(-rises.unasked_gy[over], kind="stable")]
    far_cols = _spread(rises.voxels[order], opts.far_columns, shape_zyx, spacing_mm_zyx, opts.spread_mm)
    rv = np.asarray(request_voxels, np.int64)
    req_cols = _spread(rv, opts.request_columns, shape_zyx, spacing_mm_zyx, opts.spread_mm)
    columns: list[list[FluencePatch]] = []
    for v in far_cols:
        columns += modifier._columns(int(v), False, True)
        if opts.far_raise:
            columns += modifier._columns(int(v), True, True)
    for v in req_cols:
        for sign in (False, True):
            columns += modifier._columns(int(v), sign, True)
    n = len(columns)
    if n == 0:
        out.status = "no columns"
        return out
    cost = np.array([float(np.abs(ps[0].delta).sum()) for ps in columns])
    t0 = tick("columns", t0)

    # Far rows: unasked_now + G x <= goal, or (a target voxel) the dose <= the target's upper band.
    # Far rows to start with: those within ``far_margin_gy`` of the goal (others join as cuts).
    near_goal = rises.unasked_gy > goal_gy - opts.far_margin_gy
    rises = rises.take(near_goal)
    far_v = rises.voxels.copy()
    # The dose now at far voxels: before + rise; rise = unasked + asked.
    d_far = before_at(far_v) + rises.unasked_gy + rises.asked_gy
    b_far = np.full(far_v.size, goal_gy) - rises.unasked_gy
    tgt = rises.tissue == 0
    if target_hi_gy is not None:
        b_far[tgt] = np.maximum(b_far[tgt], target_hi_gy - d_far[tgt])
    far_known = set(far_v.tolist())

    # Watch rows.
    d_w = _watch_dose(eng, watch)
    lo_e = np.minimum(watch.lo, d_w)
    hi_e = np.maximum(watch.hi, d_w)
    kinds = np.asarray(watch.kinds, object)
    nontissue = (kinds != "tissue")[watch.group] if kinds.size else np.zeros(watch.voxels.size, bool)
    tight = (d_w - lo_e < opts.margin_gy) | (hi_e - d_w < opts.margin_gy)
    rows_w = np.flatnonzero(nontissue | tight)
    # What the session's no-worse test allows a non-tissue voxel: its group's worst violation now.
    v0 = watch.violation(d_w)
    allow_nt = np.full(watch.voxels.size, eps_gy)
    for g in np.unique(watch.group[nontissue]):
        sel = watch.group == g
        allow_nt[sel] = max(float(v0[sel].max()), eps_gy)
    # Per watched voxel, how far inside its band edges its row aims: raised by the model's
    # error (responses dropped, clipping) where a row of the programme still broke.
    inset = np.zeros(watch.voxels.size)
    t0 = tick("rows", t0)

    ub = np.full(n, np.inf)
    for k, ps in enumerate(columns):
        p = ps[0]
        d = np.asarray(p.delta, np.float64)
        neg = d < -0.1 * np.abs(d).max()
        if neg.any():
            h, w = d.shape
            psi = np.asarray(eng.fluence_host(p.beam)[p.row0:p.row0 + h, p.col0:p.col0 + w], np.float64)
            ub[k] = float(np.min(psi[neg] / -d[neg]))
    t0 = tick("floor", t0)

    G_far = eng.delta_matrix(columns, far_v).astype(np.float64)
    G_w = eng.delta_matrix(columns, watch.voxels[rows_w]).astype(np.float64)
    # Columns in Gy: each scaled so its largest response at a row is 1 Gy (a normalised patch
    # moves a voxel by ~1e-4 Gy per unit: unscaled, the solver's tolerances swamp it), its cost
    # the fluence it moves per Gy, relative to the cheapest.
    colmax = np.maximum(np.abs(G_far).max(axis=0, initial=0.0), np.abs(G_w).max(axis=0, initial=0.0))
    alive = colmax > 1e-9
    scale = np.where(alive, 1.0 / np.where(alive, colmax, 1.0), 0.0)
    G_far *= scale
    G_w *= scale
    cost = cost * scale
    cost = np.where(alive, cost / cost[alive].min(), 1.0) if alive.any() else cost
    t0 = tick("delta_matrix", t0)

    # Fluence-floor rows (cuts): one per cell a failed round took below zero.
    G_fl = np.zeros((0, n))
    psi_fl = np.zeros(0)
    floor_known: set = set()
    for rnd in range(opts.rounds):
        out.rounds = rnd + 1
        # One more variable: how far the far rows end above the goal (weighted ``slack_cost``
        # against the fluence moved), so the programme is always feasible and says how close
        # it gets; the measure decides. Watch rows are ranged (HiGHS takes both edges in one row).
        # Sparse: responses under ``drop_gy`` per scaled column left out (most columns miss most
        # rows; HiGHS's time goes with the non-zeros), the measure checks the applied result.
        G = np.vstack([G_far, G_w])
        G[np.abs(G) < opts.drop_gy] = 0.0
        if psi_fl.size:  # exact: fluence is what the solution moves, no dropping
            G = np.vstack([G, G_fl])
        slack_col = sparse.csr_matrix((-np.ones(far_v.size), (np.arange(far_v.size), np.zeros(far_v.size, np.int64))),
                                      shape=(G.shape[0], 1))
        A = sparse.hstack([sparse.csr_matrix(G), slack_col]).tocsr()
        lo_r = np.concatenate([np.full(far_v.size, -np.inf), (lo_e - d_w + inset)[rows_w] - 1e-6, -psi_fl])
        hi_r = np.concatenate([b_far + 1e-6, (hi_e - d_w - inset)[rows_w] + 1e-6, np.full(psi_fl.size, np.inf)])
        c = np.append(cost, opts.slack_cost)
        out.sizes = {"columns": n, "far_rows": int(far_v.size), "watch_rows": int(rows_w.size),
                     "floor_rows": int(psi_fl.size), "nnz": int(A.nnz)}
        ub_x = np.where(alive, np.where(np.isfinite(ub), ub / np.where(scale > 0, scale, 1.0), np.inf), 0.0)
        r = milp(c, constraints=LinearConstraint(A, lo_r, hi_r),
                 bounds=Bounds(np.zeros(n + 1), np.append(ub_x, np.inf)),
                 options={"time_limit": opts.time_limit_s, "presolve": True})
        t0 = tick("solve", t0)
        if r.status != 0 or r.x is None:
            out.status = "infeasible" if r.status == 2 else ("time" if r.status == 1 else f"solver {r.status}")
            break
        x, slack = r.x[:n], float(r.x[n])
        out.sizes["slack_gy"] = round(slack, 3)
        if slack > accept_gy - goal_gy + 1e-9:  # even the linear model stays above the report line
            out.status = "infeasible"
            break
        live = np.flatnonzero(x > 1e-7)
        combined = modifier._combine([(float(x[k] * scale[k]), columns[k]) for k in live])
        below = _below_floor(eng, combined) if opts.exact else []
        combined = modifier._clip_nonnegative(combined)
        if not combined:
            out.status = "empty"
            break
        eng.apply_patches(combined)
        t0 = tick("apply", t0)
        found = measure()
        d_w2 = _watch_dose(eng, watch)
        t0 = tick("measure", t0)
        # Broken: tissue further outside its band than now by more than eps_gy; a voxel of the
        # request, a pin, a feature or a guard further outside than its group's worst now (or
        # eps_gy), which the session's no-worse test would refuse.
        off_band = (d_w2 > hi_e + eps_gy) | (d_w2 < lo_e - eps_gy)
        if opts.exact:
            off_band = np.where(nontissue, watch.violation(d_w2) > allow_nt + 1e-6, off_band)
        broke = np.flatnonzero(off_band)
        off_gy = np.maximum(d_w2 - hi_e, lo_e - d_w2)
        out.trace.append({"slack_gy": round(slack, 3), "far_gy": round(found.max_gy(), 3), "broke": int(broke.size),
                          "broke_gy": round(float(off_gy[broke].max()), 3) if broke.size else 0.0})
        if found.max_gy() <= accept_gy and not broke.size:
            out.patches, out.ok, out.status, out.rises = combined, True, "ok", found
            break
        # Cut: the rows it broke and the far voxels it lifted above the goal, then solve again.
        back()
        new_w = np.setdiff1d(broke, rows_w)
        old_w = np.intersect1d(broke, rows_w)  # in the programme and broken all the same: model error
        if opts.exact and old_w.size:
            inset[old_w] += off_gy[old_w] + 0.25 * eps_gy
        if new_w.size:
            new_w = new_w[np.argsort(-off_gy[new_w])]
            new_w = np.sort(new_w[: opts.max_new_rows])
        sel = np.flatnonzero(found.unasked_gy > goal_gy)
        fresh = np.array([i for i in sel if int(found.voxels[i]) not in far_known], np.int64)
        if fresh.size:
            fresh = fresh[np.argsort(-found.unasked_gy[fresh])][: opts.max_new_rows]
        new_fl = [cell for cell in below if cell[:3] not in floor_known][: opts.max_new_rows]
        out.status = "broke rows" if broke.size else "far rise left"
        refine = opts.exact and old_w.size
        if (not new_w.size and not fresh.size and not new_fl and not refine) or rnd == opts.rounds - 1:  # nothing new
            break
        if new_fl:
            G_fl = np.vstack([G_fl, _floor_rows(columns, scale, new_fl)])
            psi_fl = np.concatenate([psi_fl, [cell[3] for cell in new_fl]])
            floor_known.update(cell[:3] for cell in new_fl)
        if new_w.size:
            G_w = np.vstack([G_w, eng.delta_matrix(columns, watch.voxels[new_w]).astype(np.float64) * scale])
            rows_w = np.concatenate([rows_w, new_w])
        if fresh.size:
            fv = found.voxels[fresh]
            # Their unasked rise now (before the solution): measured rise minus what the solution added.
            g = eng.delta_matrix(columns, fv).astype(np.float64)
            g *= scale
            un_now = found.unasked_gy[fresh] - g @ x
            bb = np.full(fv.size, goal_gy) - un_now
            t = found.tissue[fresh] == 0
            if target_hi_gy is not None and np.any(t):
                d_now = before_at(fv[t]) + found.unasked_gy[fresh][t] + found.asked_gy[fresh][t] - (g @ x)[t]
                bb[t] = np.maximum(bb[t], target_hi_gy - d_now)
            G_far = np.vstack([G_far, g])
            b_far = np.concatenate([b_far, bb])
            far_v = np.concatenate([far_v, fv])
            far_known.update(fv.tolist())
        t0 = tick("cuts", t0)
    tm["total"] = (time.perf_counter() - t_all) * 1000
    return out
