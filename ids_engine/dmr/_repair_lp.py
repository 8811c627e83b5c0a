"""A small linear programme that takes an unasked far rise back under the report line.

The side-effect repair (:class:`~ids_engine.dmr._repair.SideEffectRepair`) first tries
greedy recovery steps; when they leave a far rise above ``report_rise_pct`` this solves for
it at once. Dose is linear in fluence, so over a modest set of per-beam patches (the DMR's
own normalised patches, see :meth:`Modifier.normalised_patches`) the dose at any voxel after
scaling them by ``x >= 0`` is ``D_now + G x`` exactly (``DoseEngine.delta_matrix``). The programme:

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

import functools
import importlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..dose import FluencePatch
from ._recovery import Watch, _pick_spread, _watch_dose

__all__ = ["LPRepairOptions", "LPRepairResult", "lp_far_repair"]

# The largest iteration limit HiGHS takes (its options are C ints).
MAX_ITERATIONS = 2**31 - 1


@dataclass(frozen=True)
class LPRepairOptions:
    """far_columns : far voxels given columns (the worst, ``spread_mm`` apart), each beam's
    lowering patch and (``far_raise``) its raising one; request_columns : request voxels given
    both (spread the same way); margin_gy : tissue rows start as rows when within this of their
    band's edge; far_margin_gy : far voxels start as rows when within this of the goal; rounds :
    solves at most (each after the first adds the rows the previous solution broke, and the far
    voxels it lifted); max_new_rows : rows added per round and kind; max_solve_iterations :
    the most iterations HiGHS may take in one solve (its ``simplex_iteration_limit`` and
    ``ipm_iteration_limit``); max_call_iterations : the most all of a call's solves may take
    together (each solve is given what is left, at most ``max_solve_iterations``; the caller may
    lower it, :class:`~ids_engine.dmr._repair.RepairSettings` ``max_request_iterations``):
    these bound the call's work by a count that is the same on every machine (measured: at most
    1,335 iterations a solve and 2,398 a call, the wide retry's ten solves, in the tests; at
    most 438 a solve in the clinical survey; 0.2-1.9 ms an iteration warm-started, 0.7-3.0 ms
    from scratch, about 10 ms on a hard synthetic programme of the same shape, 2 cores, shared:
    4,000 iterations are at most about 12 s on the measured programmes, about 40 s on the
    synthetic one; a solve that runs interior point and simplex may take up to twice what it
    was given); a call whose solve hits one ends with status "iterations"; time_limit_s :
    HiGHS's wall-clock limit per solve and call_time_limit_s on all of a call's solves together:
    safety nets (30 s and 60 s; measured: at most 2.6 s a solve, about 20 s a call solving from
    scratch, 2 cores), above what the iteration limits allow on the measured programmes, but not
    on one as slow an iteration as the synthetic one (there, or on a machine several times
    slower or loaded, the clock can still come first); a call that hits one ends with status
    "time" (the caller logs a warning: that outcome does depend on the machine); in both cases
    ``LPRepairResult.limit`` names the limit; slack_cost : the cost of 1 Gy of far rise above
    the goal, against the cheapest column's fluence per Gy; drop_gy : responses below this (Gy
    per Gy of a column's largest) are left out of the sparse programme; exact : after a round
    that failed, the fluence cells its solution took below zero (clipped when applied) become
    rows of the
    next (``psi + sum_k x_k delta_k >= 0`` exactly), a row of the programme that broke all
    the same aims inside its band by what it missed (the model's error), and a voxel of the
    request, a pin, a feature or a guard counts as broken as the repair's no-worse test
    judges it (further outside than its group's worst now); the wide retry's setting;
    warm_start : keep the programme in HiGHS between rounds (rows are only added, a broken
    row's bounds moved), so that each round after the first starts from the last optimal basis
    (dual simplex) instead of solving from scratch: the same optimum, a fraction of the time
    (the wide retry's rounds on survey row 51: 0.9 s against 3.2); needs SciPy's bundled
    HiGHS bindings (``scipy.optimize._highspy``) or ``highspy``, else it solves from scratch;
    floor_solves : with ``exact``, the fluence cells a solution would take
    below zero become rows before it is applied, and the programme is solved again, up to this
    many times a round: the applied solution is then the programme's (clipped at zero only for
    what is left when they run out, or HiGHS's round-off), and a round is spent only on what
    the whole-cube measure alone finds (survey row 51: 4 rounds instead of 5, and the second
    stage's wide retry, which failed with clipped solutions, succeeds). Without HiGHS's
    bindings the same rows are solved from scratch (slower, the same programme)."""

    far_columns: int = 16
    request_columns: int = 4
    spread_mm: float = 6.0
    margin_gy: float = 0.2
    rounds: int = 3
    max_new_rows: int = 400
    max_solve_iterations: int = 4_000
    max_call_iterations: int = 8_000
    time_limit_s: float = 30.0
    call_time_limit_s: float = 60.0
    slack_cost: float = 1000.0
    far_raise: bool = True
    far_margin_gy: float = 0.6
    drop_gy: float = 1e-3
    exact: bool = False
    warm_start: bool = False
    floor_solves: int = 0

    def __post_init__(self) -> None:
        for name, least in (("far_columns", 0), ("request_columns", 0), ("rounds", 1), ("max_new_rows", 1),
                            ("max_solve_iterations", 1), ("max_call_iterations", 1), ("floor_solves", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
                raise ValueError(f"LPRepairOptions.{name} must be a whole number, {least} or more, got {v!r}")
        for name in ("max_solve_iterations", "max_call_iterations"):  # HiGHS's option is a C int
            if getattr(self, name) > MAX_ITERATIONS:
                raise ValueError(f"LPRepairOptions.{name} must be at most {MAX_ITERATIONS} (2**31 - 1, HiGHS's "
                                 f"largest), got {getattr(self, name)!r}")
        for name in ("spread_mm", "margin_gy", "time_limit_s", "call_time_limit_s", "slack_cost", "far_margin_gy",
                     "drop_gy"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v >= 0 \
                    or not np.isfinite(v):
                raise ValueError(f"LPRepairOptions.{name} must be a finite number, 0 or more, got {v!r}")
        for name in ("far_raise", "exact", "warm_start"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LPRepairOptions.{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class LPRepairResult:
    """patches : applied and kept (empty unless ``ok``); ok : the engine holds the solution and
    the whole-cube measure found every far unasked rise at or under ``accept_gy`` with no watch
    row further outside its band; status : "ok", "infeasible" (even the linear model stays
    above the line, or HiGHS says so), "broke rows" / "far rise left" (the last round's applied
    solution did), "iterations" (an iteration limit was reached), "time" (a wall-clock safety
    was hit: the one outcome that depends on the machine's speed), "cancelled" (the caller's
    ``cancel`` said so before a solve), "solver <HiGHS's model status>", "nothing to do", "no
    columns", "empty" (the caller sets "worse" when its own check refuses it, and
    "iterations" with nothing solved when its request's budget was spent); limit : with
    "iterations" or "time", the limit that was reached ("max_solve_iterations",
    "max_call_iterations", the caller's "max_request_iterations", "time_limit_s" or
    "call_time_limit_s"), else ""; iterations : HiGHS's iterations over the call's solves
    (simplex and interior point; from scratch, what HiGHS counted, or without its bindings
    the whole limit each solve was given); rises : the measure's unasked rises after a kept
    solution; rounds : rounds run; solves : HiGHS solves (more than rounds with
    ``floor_solves``); timings_ms : per stage; sizes : the last programme's size and slack;
    trace : per round, the slack and what the measure found (diagnostics)."""

    patches: list = field(default_factory=list)
    ok: bool = False
    status: str = ""
    limit: str = ""
    iterations: int = 0
    rounds: int = 0
    solves: int = 0
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
    if not len(cells):
        return rows
    cb, cr, cc = (np.array([cell[j] for cell in cells], np.int64) for j in range(3))
    for k, ps in enumerate(columns):
        p = ps[0]
        h, w = p.delta.shape
        i = np.flatnonzero((cb == p.beam) & (cr >= p.row0) & (cr < p.row0 + h) & (cc >= p.col0) & (cc < p.col0 + w))
        if i.size:
            rows[i, k] = np.asarray(p.delta, np.float64)[cr[i] - p.row0, cc[i] - p.col0] * scale[k]
    return rows


@functools.cache
def _highs_core():
    """HiGHS's Python bindings (the module with ``_Highs``): SciPy's bundled copy (a private
    module of SciPy >= 1.15), else ``highspy``'s, else None (the caller solves with
    ``scipy.optimize.milp``). Each is tried on a one-variable programme first, so bindings
    whose API drifted (or that lack an option this code sets) are passed over rather than
    failing a planner's request; the answer is cached. The probe is judged by its answer, not
    its time: its clock limit (an hour) only keeps a broken solver from hanging, so a stalled
    or loaded machine cannot switch the process away from the bindings."""
    for name in ("scipy.optimize._highspy._core", "highspy._core"):
        try:
            core = importlib.import_module(name)
            probe = _WarmProgramme(core, np.ones(1), np.full(1, np.inf))
            probe.add_rows(np.ones((1, 1)), [0.5], [np.inf])
            status, x, _ = probe.solve(time_limit_s=3600.0, max_iterations=100)
            if status == "optimal" and x is not None and abs(float(x[0]) - 0.5) < 1e-9:
                return core
        except Exception:  # not installed, or an API this code does not know: the next, else none
            continue
    return None


def _set_option(core, h, name: str, value) -> None:
    """``h.setOptionValue``, checked: an option HiGHS refuses raises (RuntimeError)."""
    if h.setOptionValue(name, value) != core.HighsStatus.kOk:
        raise RuntimeError(f"HiGHS refused the option {name}={value!r}")


def _run(core, h, *, time_limit_s: float, max_iterations: int):
    """Runs ``h`` with at most ``max_iterations`` simplex and interior-point iterations and the
    wall-clock limit ``time_limit_s`` on top of its run time so far (HiGHS's time limit counts
    from the object's first run); returns (status, x or None, iterations HiGHS counted in this
    run). The status: "optimal", "iterations", "time", "infeasible" (or a model error, as
    ``milp`` maps them: costs >= 0 and x >= 0 keep it bounded) or "solver <model status>"."""
    for opt, value in (("simplex_iteration_limit", int(max_iterations)), ("ipm_iteration_limit", int(max_iterations)),
                       ("time_limit", float(h.getRunTime()) + float(time_limit_s))):
        _set_option(core, h, opt, value)
    h.run()
    info = h.getInfo()
    used = int(info.simplex_iteration_count) + int(info.ipm_iteration_count) + int(info.crossover_iteration_count)
    ms, st = h.getModelStatus(), core.HighsModelStatus
    if ms == st.kOptimal:
        return "optimal", np.asarray(h.getSolution().col_value, np.float64), used
    if ms == st.kIterationLimit:
        return "iterations", None, used
    if ms == st.kTimeLimit:
        return "time", None, used
    if ms in (st.kInfeasible, st.kModelError):
        return "infeasible", None, used
    return f"solver {ms.name}", None, used


class _WarmProgramme:
    """The programme kept in HiGHS between rounds: ``min c x``, ``lo <= A x <= hi``,
    ``0 <= x <= ub``. Rows are only added and their bounds moved, so each ``solve`` after the
    first starts from the previous optimal basis (HiGHS's dual simplex). ``solve`` returns
    :func:`_run`'s (status, x or None, iterations of this solve)."""

    def __init__(self, core, cost: np.ndarray, ub: np.ndarray):
        self._core = core
        self._inf = float(core.kHighsInf)
        h = core._Highs()
        _set_option(core, h, "output_flag", False)
        # No presolve: on these dense programmes it removes little and costs more than it saves
        # (measured on row 51's programmes: the first solve 200-400 ms without, 430-1,450 with).
        _set_option(core, h, "presolve", "off")
        n = int(cost.size)
        h.addVars(n, np.zeros(n), self._finite(ub))
        h.changeColsCost(n, np.arange(n, dtype=np.int32), np.asarray(cost, np.float64))
        self._h = h

    def _finite(self, v) -> np.ndarray:
        v = np.asarray(v, np.float64)
        return np.where(np.isfinite(v), v, np.where(v > 0, self._inf, -self._inf))

    def add_rows(self, A, lo, hi) -> np.ndarray:
        """Appends the rows of ``A`` (dense or sparse); returns their row numbers."""
        from scipy import sparse
        A = sparse.csr_matrix(A)
        A.sort_indices()
        first = int(self._h.getNumRow())
        m = int(A.shape[0])
        if m:
            self._h.addRows(m, self._finite(lo), self._finite(hi), int(A.nnz), A.indptr[:-1].astype(np.int32),
                            A.indices.astype(np.int32), A.data.astype(np.float64))
        return np.arange(first, first + m)

    def set_bounds(self, rows, lo, hi) -> None:
        lo, hi = self._finite(lo), self._finite(hi)
        for r, a, b in zip(np.asarray(rows).tolist(), lo.tolist(), hi.tolist()):
            self._h.changeRowBounds(int(r), a, b)

    def solve(self, *, time_limit_s: float, max_iterations: int):
        return _run(self._core, self._h, time_limit_s=time_limit_s, max_iterations=max_iterations)


def _solve_from_scratch(core, c, A, lo, hi, ub, *, time_limit_s: float, max_iterations: int):
    """``min c x``, ``lo <= A x <= hi``, ``0 <= x <= ub`` in a fresh HiGHS object with presolve,
    the model passed as ``scipy.optimize.milp`` passes it (column-wise, every column
    continuous: the same answer, bit for bit), so that this solve's iterations can be read;
    returns :func:`_run`'s triple. Without bindings (``core`` None: SciPy before 1.15 and no
    ``highspy``): ``milp`` itself, charged the whole ``max_iterations`` (it does not say how
    many it took)."""
    from scipy import sparse
    if core is None:
        return _milp_solve(c, A, lo, hi, ub, time_limit_s=time_limit_s, max_iterations=max_iterations)
    A = sparse.csc_array(A)
    n, m = int(c.size), int(A.shape[0])
    lp = core.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = m
    lp.a_matrix_.num_col_ = n
    lp.a_matrix_.num_row_ = m
    lp.a_matrix_.format_ = core.MatrixFormat.kColwise
    lp.col_cost_ = np.asarray(c, np.float64)
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.asarray(ub, np.float64)
    lp.row_lower_ = np.asarray(lo, np.float64)
    lp.row_upper_ = np.asarray(hi, np.float64)
    lp.a_matrix_.start_ = A.indptr
    lp.a_matrix_.index_ = A.indices
    lp.a_matrix_.value_ = A.data.astype(np.float64)
    lp.integrality_ = [core.HighsVarType(0)] * n
    h = core._Highs()
    _set_option(core, h, "log_to_console", False)
    _set_option(core, h, "presolve", "on")
    if h.passModel(lp) == core.HighsStatus.kError:
        return "infeasible", None, 0
    return _run(core, h, time_limit_s=time_limit_s, max_iterations=max_iterations)


def _milp_solve(c, A, lo, hi, ub, *, time_limit_s: float, max_iterations: int):
    """:func:`_solve_from_scratch` without HiGHS's bindings: ``scipy.optimize.milp``, which
    passes the iteration limits it does not name to HiGHS verbatim (with a RuntimeWarning,
    silenced here; ``warnings.catch_warnings`` is not thread-safe, and only SciPy before 1.15
    without ``highspy`` comes here) and tells the limits apart only by its message."""
    import warnings

    from scipy.optimize import Bounds, LinearConstraint, milp
    limits = {"simplex_iteration_limit": int(max_iterations), "ipm_iteration_limit": int(max_iterations)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unrecognized options detected", RuntimeWarning)
        r = milp(c, constraints=LinearConstraint(A, lo, hi), bounds=Bounds(np.zeros(c.size), ub),
                 options={"time_limit": time_limit_s, "presolve": True, **limits})
    if r.status == 1:
        status = "time" if "time limit" in str(r.message).lower() else "iterations"
    else:
        status = {0: "optimal", 2: "infeasible"}.get(int(r.status), f"solver {r.status}")
    return status, r.x, int(max_iterations)


def lp_far_repair(modifier, watch: Watch, rises, back: Callable[[], None], *, request_voxels: np.ndarray,
                  before_at: Callable[[np.ndarray], np.ndarray], measure: Callable[[], object],
                  goal_gy: float, accept_gy: float, target_hi_gy: float | None, shape_zyx, spacing_mm_zyx,
                  eps_gy: float, options: LPRepairOptions | None = None, iterations_left: int | None = None,
                  cancel: Callable[[], bool] | None = None) -> LPRepairResult:
    """Solve for and apply patches taking every far unasked rise of ``rises``
    (:class:`~ids_engine.dmr._side_effects.UnaskedRise`) to ``goal_gy`` or below with no
    watched voxel further outside its band; see the module docstring.

    ``before_at(flat)``: the dose before the request (Gy, host); ``measure()``: the unasked
    rises of the engine's current state (the whole cube); ``accept_gy``: the largest unasked
    rise the measure may find for ``ok``; ``back()`` takes the engine back to its state at the
    call, bit for bit (the session's checkpoint). With ``ok`` False the engine is back there.
    ``target_hi_gy``: a far target voxel may end up to there instead of within ``goal_gy``
    (the target's upper band); None: target voxels are held to ``goal_gy`` like the rest.
    ``iterations_left``: the most HiGHS iterations the caller allows this call below
    ``max_call_iterations`` (its request's budget left, ``RepairSettings.max_request_iterations``;
    None: no lower); ``cancel()`` True before a solve ends the call (status "cancelled")."""
    from scipy import sparse

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
    # What the repair's no-worse test (SideEffectRepair.no_worse) allows a non-tissue voxel:
    # its group's worst violation now.
    v0 = watch.violation(d_w)
    allow_nt = np.full(watch.voxels.size, eps_gy)
    groups = watch.kept_groups()
    for g, worst in zip(groups, watch.worst_per_group(v0, groups)):
        allow_nt[watch.group == g] = max(worst, eps_gy)
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

    def responses(*voxel_sets) -> list:
        """``delta_matrix`` of the columns at each voxel set (float64). With ``warm_start`` in
        one call: its cost is mostly per call (the columns' FFTs), and a voxel's row differs
        from a separate call's only by round-off (~1e-12 Gy); without, a call each, as before."""
        if not opts.warm_start or not voxel_sets:
            return [eng.delta_matrix(columns, v).astype(np.float64) for v in voxel_sets]
        G_all = eng.delta_matrix(columns, np.concatenate(voxel_sets)).astype(np.float64)
        return np.split(G_all, np.cumsum([v.size for v in voxel_sets])[:-1])

    G_far, G_w = responses(far_v, watch.voxels[rows_w])
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
    c = np.append(cost, opts.slack_cost)
    ub_x = np.where(alive, np.where(np.isfinite(ub), ub / np.where(scale > 0, scale, 1.0), np.inf), 0.0)
    core = _highs_core()
    prog = _WarmProgramme(core, c, np.append(ub_x, np.inf)) if core is not None and opts.warm_start else None
    # The call's iteration budget, and which limit a solve given all of it would hit.
    call_iterations, call_limit = opts.max_call_iterations, "max_call_iterations"
    if iterations_left is not None and iterations_left < call_iterations:
        call_iterations, call_limit = max(int(iterations_left), 0), "max_request_iterations"
    # warm start: the programme's rows so far (far, watch in rows_w's order, floor) and the
    # watch rows whose aim moved inside their band since they were added (exact)
    in_prog = {"far": 0, "watch": 0, "floor": 0, "nnz": 0}
    w_ids = np.zeros(0, np.int64)
    moved = np.zeros(0, np.int64)

    def dropped(G_part):
        G_part = G_part.copy()
        G_part[np.abs(G_part) < opts.drop_gy] = 0.0
        return G_part

    def watch_bounds(rows):
        """The ranged bounds of watch rows ``rows`` (indices into ``rows_w``): inside their band
        by ``inset``, from the dose now."""
        w = rows_w[rows]
        return (lo_e - d_w + inset)[w] - 1e-6, (hi_e - d_w - inset)[w] + 1e-6

    def block(kind, a, b):
        """Rows ``a:b`` of one kind as (A with the slack's column, lo, hi). Far rows: their rise
        above the goal is what the slack pays for; watch rows: ranged, inside their band; floor
        rows (exact, not dropped): no fluence cell below zero. Responses under ``drop_gy`` are
        left out of the far and watch rows (most columns miss most rows; HiGHS's time goes with
        the non-zeros); the measure checks the applied result."""
        if kind == "far":
            G_part, slack, lo, hi = dropped(G_far[a:b]), -1.0, np.full(b - a, -np.inf), b_far[a:b] + 1e-6
        elif kind == "watch":
            G_part, slack, (lo, hi) = dropped(G_w[a:b]), 0.0, watch_bounds(np.arange(a, b))
        else:
            G_part, slack, lo, hi = G_fl[a:b], 0.0, -psi_fl[a:b], np.full(b - a, np.inf)
        slack_col = sparse.csr_matrix(np.full((b - a, 1), slack)) if slack else sparse.csr_matrix((b - a, 1))
        return sparse.hstack([sparse.csr_matrix(G_part), slack_col]).tocsr(), lo, hi

    def sizes():
        return {"far": far_v.size, "watch": rows_w.size, "floor": psi_fl.size}

    def add_new_rows():
        """warm start: the rows made since the last solve, into the programme kept in HiGHS."""
        nonlocal w_ids, moved
        if moved.size:  # rows already in the programme that aim further inside their band now
            pos = np.flatnonzero(np.isin(rows_w[: in_prog["watch"]], moved))
            prog.set_bounds(w_ids[pos], *watch_bounds(pos))
            moved = np.zeros(0, np.int64)
        for kind, size in sizes().items():
            A_new, lo, hi = block(kind, in_prog[kind], size)
            ids = prog.add_rows(A_new, lo, hi)
            if kind == "watch":
                w_ids = np.concatenate([w_ids, ids])
            in_prog[kind] = size
            in_prog["nnz"] += int(A_new.nnz)

    def add_floor_rows(cells):
        nonlocal G_fl, psi_fl
        G_fl = np.vstack([G_fl, _floor_rows(columns, scale, cells)])
        psi_fl = np.concatenate([psi_fl, [cell[3] for cell in cells]])
        floor_known.update(cell[:3] for cell in cells)

    def solve():
        """(status, x or None, non-zeros): in HiGHS's kept programme when there is one (only
        what is new since the last solve goes in), else from scratch; the status as
        :func:`_run` words it, ``out.limit`` set when a limit is reached and ``out.iterations``
        charged. A failure of the bindings drops to from scratch for the rest of the call (it
        rebuilds every row)."""
        nonlocal prog
        if cancel is not None and cancel():
            return "cancelled", None, 0
        left_s = opts.call_time_limit_s - out.timings_ms.get("solve", 0.0) / 1000.0
        left_it = call_iterations - out.iterations
        if left_s <= 0 or left_it <= 0:
            out.limit = "call_time_limit_s" if left_s <= 0 else call_limit
            return ("time" if left_s <= 0 else "iterations"), None, 0
        limit_s, max_it = min(opts.time_limit_s, left_s), min(opts.max_solve_iterations, left_it)
        status = None
        if prog is not None:
            try:
                add_new_rows()
                status, xs, used = prog.solve(time_limit_s=limit_s, max_iterations=max_it)
                nnz = in_prog["nnz"]
            except Exception:  # the bindings drifted: the same programme from scratch
                prog = None
        if status is None:
            blocks = [block(kind, 0, size) for kind, size in sizes().items()]
            A = sparse.vstack([blk[0] for blk in blocks]).tocsr()
            lo_r, hi_r = (np.concatenate([blk[i] for blk in blocks]) for i in (1, 2))
            status, xs, used = _solve_from_scratch(core, c, A, lo_r, hi_r, np.append(ub_x, np.inf),
                                                   time_limit_s=limit_s, max_iterations=max_it)
            nnz = int(A.nnz)
        out.iterations += int(used)
        if status == "iterations":
            out.limit = "max_solve_iterations" if max_it == opts.max_solve_iterations else call_limit
        elif status == "time":
            out.limit = "time_limit_s" if limit_s == opts.time_limit_s else "call_time_limit_s"
        return status, xs, nnz

    # exact with floor_solves: before a solution is applied, the fluence cells it would take
    # below zero become rows at once (up to ``floor_solves`` more solves), so the applied
    # solution is the programme's and a round is spent only on what the measure alone finds.
    inner_solves = 1 + (opts.floor_solves if opts.exact else 0)
    stop = False
    for rnd in range(opts.rounds):
        out.rounds = rnd + 1
        floor_added = 0  # fluence-floor rows added before this round's solution was applied
        for inner in range(inner_solves):
            # One more variable: how far the far rows end above the goal (weighted ``slack_cost``
            # against the fluence moved), so the programme is always feasible and says how close
            # it gets; the measure decides. Watch rows are ranged (HiGHS takes both edges in one row).
            # Sparse: responses under ``drop_gy`` per scaled column left out (most columns miss most
            # rows; HiGHS's time goes with the non-zeros), the measure checks the applied result.
            status, xs, nnz = solve()
            out.sizes = {"columns": n, "far_rows": int(far_v.size), "watch_rows": int(rows_w.size),
                         "floor_rows": int(psi_fl.size), "nnz": nnz}
            out.solves += 1
            t0 = tick("solve", t0)
            if status != "optimal" or xs is None:
                out.status = status
                stop = True
                break
            x, slack = xs[:n], float(xs[n])
            out.sizes["slack_gy"] = round(slack, 3)
            if slack > accept_gy - goal_gy + 1e-9:  # even the linear model stays above the report line
                out.status = "infeasible"
                stop = True
                break
            live = np.flatnonzero(x > 1e-7)
            combined = modifier._combine([(float(x[k] * scale[k]), columns[k]) for k in live])
            below = _below_floor(eng, combined) if opts.exact else []
            new_fl = [cell for cell in below if cell[:3] not in floor_known][: opts.max_new_rows]
            if inner == inner_solves - 1 or not new_fl:
                break
            add_floor_rows(new_fl)
            floor_added += len(new_fl)
            t0 = tick("floor_rows", t0)
        if stop:
            break
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
        # eps_gy), which the repair's no-worse test would refuse.
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
            moved = old_w
        if new_w.size:
            new_w = new_w[np.argsort(-off_gy[new_w])]
            new_w = np.sort(new_w[: opts.max_new_rows])
        sel = np.flatnonzero(found.unasked_gy > goal_gy)
        fresh = np.array([i for i in sel if int(found.voxels[i]) not in far_known], np.int64)
        if fresh.size:
            fresh = fresh[np.argsort(-found.unasked_gy[fresh])][: opts.max_new_rows]
        out.status = "broke rows" if broke.size else "far rise left"
        out.trace[-1].update(new_rows=int(new_w.size), rows_missed=int(old_w.size), new_far=int(fresh.size),
                             floor_cells=len(new_fl), floor_rows_before_apply=floor_added)
        refine = opts.exact and old_w.size
        if (not new_w.size and not fresh.size and not new_fl and not refine) or rnd == opts.rounds - 1:  # nothing new
            break
        if new_fl:
            add_floor_rows(new_fl)
        fv = found.voxels[fresh] if fresh.size else np.zeros(0, np.int64)
        got = iter(responses(*[v for v in (watch.voxels[new_w], fv) if v.size]))
        g_w = next(got) if new_w.size else None
        g = next(got) if fv.size else None
        if new_w.size:
            G_w = np.vstack([G_w, g_w * scale])
            rows_w = np.concatenate([rows_w, new_w])
        if fresh.size:
            # Their unasked rise now (before the solution): measured rise minus what the solution added.
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
