"""The guarded repair of a request's far side effects (what ``Session.run`` does after recovery).

After a drag or an erase, tissue far from the request (farther than 10 mm, beyond what a
drag's rigid move asks) may have risen unasked above the report line
(``DMROptions.report_rise_pct``). :class:`SideEffectRepair` tries to take it back, with every
pass guarded: a pass is kept only when nothing recovery keeps (the request's own voxels, pins,
earlier features, guards, the target's coverage) got worse, otherwise the engine goes back to
its state before the pass, bit for bit, and nothing of it is journaled. How hard it tries is
set by :class:`RepairSettings` (``Session.repair_settings``); the stages and what each setting
does are in :class:`SideEffectRepair`.

The repair calls back into the session only through what it is given: the modifier (and its
engine), the watch, the request's voxels, a reader of the dose before the request
(``before_at``) and ``measure()``, the whole-cube unasked far rises of the engine's current
state (``Session._unasked``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from ._recovery import Watch, _watch_dose, extend_watch, recover
from ._repair_lp import MAX_ITERATIONS, LPRepairOptions, LPRepairResult, lp_far_repair
from ._side_effects import UnaskedRise

__all__ = ["LP_MODES", "RepairSettings", "SideEffectRepair", "WIDE_LP_OPTIONS"]

_log = logging.getLogger(__name__)

# When the LP repair runs in the first stage, against the focused passes (RepairSettings.lp).
_LP_ORDER = {"first": ("lp", "focused"), "after": ("focused", "lp"), "instead": ("lp",), "off": ("focused",)}
LP_MODES = tuple(_LP_ORDER)

# The LP's wide retry (RepairSettings.lp_wide, on by default): three times the columns, up to
# 8 rounds, more tissue rows and exact fluence-floor cuts, the programme kept in HiGHS between
# rounds (warm start) and the cells a solution would take below zero made rows before it is
# applied (floor_solves). Measured on the survey it changes only the one request left above
# 5 % (row 51: 10.6 -> 4.6 % beyond the rigid move, no longer reported); that request 2.5 ->
# 3.7 s (2 cores, interleaved, with stage 2 starting from the wide programme, see
# SideEffectRepair.lp_repair; from scratch with clipped solutions it was 9.0 s and 6.7 %).
WIDE_LP_OPTIONS = LPRepairOptions(far_columns=48, request_columns=12, spread_mm=4.0, rounds=8, margin_gy=0.6,
                                  exact=True, warm_start=True, floor_solves=3)


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and bool(np.isfinite(v))


@dataclass(frozen=True)
class RepairSettings:
    """How the far side-effect repair tries (see :class:`SideEffectRepair`). The defaults are
    the shipped behaviour; how many recovery steps each pass runs is
    ``DMROptions.side_effect_repair_steps`` (0: report only).

    rows : the repair watches at most this many of the worst far voxels (those whose unasked
        rise is above the cap, ``DMROptions.max_rise_pct``), per pass.
    focused_passes : the focused repair: up to this many passes in which only the far voxels
        are chosen as recovery steps (0: none, in both stages).
    focused_weight : the far rows' weight in the focused passes (the plain pass gives them
        normal tissue's weight).
    mix_steps : ordinary recovery steps after each focused pass (coverage and guards restored,
        the far voxels held as rows); 0: none.
    focused_j_slack : a focused pass or an LP repair is kept only with the watch's objective
        within this fraction (0.25: 25 %, plus 0.05 Gy^2) of the objective before the
        focused passes and the LP (the plain pass: 5 %).
    lp : the LP repair (``ids_engine/dmr/_repair_lp.py``) in the first stage: "first" (before
        the focused passes, which run only if it fails; the default), "after" them, "instead"
        of them, or "off" (also off in the second stage). "first" and "after" gave the same
        survey counts; "first" spares a drag the passes that would fail (the viewer
        benchmark's release request 662 ms against 1,001, a helper's A/B).
    lp_goal : the LP aims every far unasked rise at this fraction of the report line (0 to 1;
        it is kept when the whole cube is at or under the line).
    lp_options : the LP's settings (:class:`LPRepairOptions`).
    lp_wide : when the LP fails, it is tried once more with these settings (None: no retry;
        the default :data:`WIDE_LP_OPTIONS`, the measured wide retry). When stage 1 needed
        it, stage 2 tries it first (the shipped programme then only if it fails: on row 51 it
        failed in stage 2 too, 0.5 s).
    target_in_band : the second stage: far target voxels that rose unasked but stayed inside
        the target's band are repaired too (the LP, then, with ``target_focused``, focused
        passes), when the first stage left no other far rise above the report line.
    target_focused : the second stage may run focused passes when its LP fails or is off.
    lp_before_plain : with ``lp`` "first" or "instead", stage 1 first tries the shipped LP (no
        wide retry) before the plain pass; only when it fails do the plain pass and the rest (the LP again, from where the
        plain pass left the plan, with its wide retry) follow. Measured (tenth session, with
        the wide retry on): the survey's counts unchanged, 12 of its 16 repaired requests
        70-260 ms faster, row 77 0.5 s slower (the LP fails first); the viewer benchmark's
        release repair 330 -> 165 ms. Without the wide retry (ninth session) running the LP
        first lost row 77's repair.
    max_request_iterations : the most HiGHS iterations all of a request's LP calls may take
        together (up to five calls: the shipped programme before the plain pass, both
        programmes after it, both again in the second stage); each call is given what is
        left (at most its own ``max_call_iterations``), and a call after it is spent is not
        made (its result's status "iterations", limit "max_request_iterations"). With the
        measured 0.9-3.0 ms an iteration (2 cores) 12,000 is about 11-36 s of solving, about
        2 minutes on a programme as hard as the synthetic one (10 ms an iteration); the
        clock safeties of each call (``LPRepairOptions.call_time_limit_s``) still apply.
        Measured: at most 2,398 iterations a call in the tests.
    """

    rows: int = 96
    focused_passes: int = 3
    focused_weight: float = 3.0
    mix_steps: int = 5
    focused_j_slack: float = 0.25
    lp: str = "first"
    lp_goal: float = 0.9
    lp_options: LPRepairOptions = LPRepairOptions()
    lp_wide: LPRepairOptions | None = WIDE_LP_OPTIONS
    target_in_band: bool = True
    target_focused: bool = True
    lp_before_plain: bool = True
    max_request_iterations: int = 12_000

    def __post_init__(self) -> None:
        for name, least in (("rows", 1), ("focused_passes", 0), ("mix_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
                raise ValueError(f"RepairSettings.{name} must be a whole number, {least} or more, got {v!r}")
        if not _is_number(self.focused_weight) or self.focused_weight <= 0:
            raise ValueError(f"RepairSettings.focused_weight must be a finite number above 0, got {self.focused_weight!r}")
        if not _is_number(self.focused_j_slack) or self.focused_j_slack < 0:
            raise ValueError(f"RepairSettings.focused_j_slack must be a finite number, 0 or more (a fraction of the "
                             f"objective), got {self.focused_j_slack!r}")
        if not isinstance(self.lp, str) or self.lp not in LP_MODES:
            raise ValueError(f"RepairSettings.lp must be one of {', '.join(repr(m) for m in LP_MODES)}, got {self.lp!r}")
        if not _is_number(self.lp_goal) or not 0 < self.lp_goal <= 1:
            raise ValueError(f"RepairSettings.lp_goal must be a fraction of the report line above 0 and at most 1, "
                             f"got {self.lp_goal!r}")
        if not isinstance(self.lp_options, LPRepairOptions):
            raise ValueError(f"RepairSettings.lp_options must be an LPRepairOptions, got {self.lp_options!r}")
        if self.lp_wide is not None and not isinstance(self.lp_wide, LPRepairOptions):
            raise ValueError(f"RepairSettings.lp_wide must be an LPRepairOptions or None, got {self.lp_wide!r}")
        v = self.max_request_iterations
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_ITERATIONS:
            raise ValueError(f"RepairSettings.max_request_iterations must be a whole number from 1 to {MAX_ITERATIONS}"
                             f", got {v!r}")
        for name in ("target_in_band", "target_focused", "lp_before_plain"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RepairSettings.{name} must be True or False, got {getattr(self, name)!r}")


class SideEffectRepair:
    """A guarded repair pass for a request's far side effects (``DMROptions.side_effect_repair_steps``).

    When tissue far from the request rose by more than the report line (``report_gy``,
    ``DMROptions.report_rise_pct``) unasked, its worst voxels (up to ``RepairSettings.rows``)
    join the watch with the band "no higher than before plus what the request asks plus the
    cap" (``cap_gy``, ``DMROptions.max_rise_pct``), and recovery runs ``steps`` more steps
    (with the default options: no capped-row retry). For a drag too the band is
    ``max_rise_pct``, not the drag's lower soft cap: the pass is there for what crossed the
    5 % report line, and the survey figures with the 3 % drag cap were measured with it so.
    The pass is kept only if the request's own voxels and the pins are no worse, no pin,
    feature, guard or the request itself ends further outside its band than before (or
    newly outside it), the watch's objective is no worse (5 % or 0.05 Gy^2 of slack) and the
    largest unasked far rise fell by at least 0.3 % of Rx; otherwise the engine goes back to
    its snapshot from before the pass, bit for bit, and nothing of it is journaled.

    **The focused repair** (``RepairSettings.focused_passes``): when a far rise above the
    report line is still left, up to that many passes in which only the far voxels are chosen
    as recovery steps (``recover(focus=...)``, weight ``focused_weight``: lowering the beam
    entrance that carries the rise), each followed by ``mix_steps`` ordinary recovery steps
    (coverage and guards restored, the far voxels held as rows). Each pass must lower the far
    rise by 0.3 % of Rx with the request's voxels, pins, features and guards no worse and the
    objective within ``focused_j_slack`` (25 %); the passes are kept only when they take the
    unasked far rise to the report line or below (all or nothing: a partial gain moved the
    line beside one drag from 0.36 to 1.12 mm); otherwise the state from before them, bit for
    bit.

    **The LP repair** (``RepairSettings.lp``, ``ids_engine/dmr/_repair_lp.py``): when a far
    rise above the report line is still left (by default before the focused passes, which then
    run only if it fails; ``lp_wide`` a wider retry when it fails; ``lp_before_plain``: the
    shipped programme alone also before the plain pass, which runs only if it fails), a small linear programme
    over per-beam patches at the worst far voxels and the request's voxels takes every far
    unasked rise to ``lp_goal`` of the line with no watched voxel further outside its band and
    no fluence below zero; applied in one engine call, checked on the whole cube, kept only
    when the rise is at or under the line and the same no-worse test as the focused passes
    holds; otherwise the state from before it, bit for bit.

    **Target voxels inside their band** count as side effects too, in a second stage
    (``target_in_band``): the passes above look only at the rise outside the target's band
    (OARs, normal tissue, target voxels ending above it); when they left none above the report
    line and target voxels that stayed inside their band are still more than the line up
    unasked, the LP runs again with those voxels held to the line too, then
    (``target_focused``) focused passes of the same kind with every far voxel (those target
    voxels held at before + asked + the report line, not the cap: measured, the cap cost
    coverage and guards and was taken back). They are kept at the last good pass that leaves
    the rise outside the band at the report line or no higher than the first stage left it
    (else the state before them, bit for bit). Measured on the survey: holding them in the
    first stage too lost a repair (a 95 % line drag: far rise 7.69 -> 8.09 %, the line beside
    it 0.36 -> 1.28 mm).

    Parameters
    ----------
    modifier : the session's :class:`~ids_engine.dmr.Modifier` (its engine is the one repaired).
    watch : the request's watch (pins, features, guards, coverage, the request's voxels).
    request_voxels : the request's own voxels (flat indices; the LP's request columns).
    before_at : ``before_at(flat) -> (n,) float64``, the dose before the request (Gy, host).
    measure : ``measure() -> UnaskedRise``, the far voxels of the engine's current state that
        rose unasked above the floor (every tissue, the whole cube: ``Session._unasked``).
    prescription_gy, report_gy, cap_gy, target_hi_gy : Rx, the report line, the cap on a far
        rise and the target's upper band edge (Gy).
    steps : recovery steps of each pass (``DMROptions.side_effect_repair_steps``).
    shape_zyx, spacing_mm_zyx : the dose grid (the LP spreads its columns in mm).
    settings : :class:`RepairSettings` (None: the defaults).
    plain_weight : the far rows' weight in the plain pass (the session's normal-tissue weight).
    timings : a dict that gets "side_effect_repair" and "side_effect_lp" (ms), or None.
    cancel : ``cancel() -> bool`` (``Session.run``'s), asked before each LP solve: True ends
        that LP call (status "cancelled", nothing of it kept) and no further LP call is made.

    ``lp_results`` holds every LP call's :class:`LPRepairResult` in order (a call not made
    because the request's iterations were spent or it was cancelled included), and
    ``lp_iterations`` the HiGHS iterations they took (``RepairSettings.max_request_iterations``).
    """

    def __init__(self, modifier, watch: Watch, request_voxels: np.ndarray, *,
                 before_at: Callable[[np.ndarray], np.ndarray], measure: Callable[[], UnaskedRise],
                 prescription_gy: float, report_gy: float, cap_gy: float, target_hi_gy: float, steps: int,
                 shape_zyx, spacing_mm_zyx, settings: RepairSettings | None = None, plain_weight: float = 1.0,
                 timings: dict | None = None, cancel: Callable[[], bool] | None = None) -> None:
        self.modifier = modifier
        self.engine = modifier.engine
        self.watch = watch
        self.request_voxels = request_voxels
        self.before_at = before_at
        self.measure = measure
        self.rx = prescription_gy
        self.thr = report_gy
        self.cap = cap_gy
        self.t_hi = target_hi_gy
        self.steps = steps
        self.shape_zyx = shape_zyx
        self.spacing_mm_zyx = spacing_mm_zyx
        self.settings = settings or RepairSettings()
        self.plain_weight = plain_weight
        self.timings = {} if timings is None else timings
        # how much worse a kept band's violation may get (round-off), and the hard key's unit
        self.eps = 1e-3 * prescription_gy
        # stage 1's LP was kept from the wide retry: stage 2 tries the wide programme first
        self.wide_first = False
        self.cancel = cancel
        self.lp_results: list[LPRepairResult] = []
        self.lp_iterations = 0

    @cached_property
    def _hard(self) -> np.ndarray:
        return self.watch.hard()

    @cached_property
    def _kept_groups(self) -> list:
        """The watch's groups a pass must not make worse: every group but tissue."""
        return self.watch.kept_groups()

    # ------------------------------------------------------------------ the run
    def run(self, repair: bool = True):
        """Measure the far rises and, when one is above the report line (and ``repair``,
        ``steps`` > 0), repair them. Returns ``(patches applied, kept, unasked rises after
        (every tissue), the watch's dose after a kept pass or None)``; ``repair`` False
        measures only (set-voxel requests)."""
        found_all = self.measure()
        if not repair or self.steps <= 0 or found_all.max_gy() <= self.thr:
            return [], False, found_all, None
        t0 = time.perf_counter()
        h0, j0, w0, _ = self.state()
        patches, kept, watch_gy, j_ref = self.repair_outside_band(found_all, (h0, j0, w0))
        # Stage 2: target voxels inside their band, while the rest stays where stage 1 left it.
        found_all = self.measure() if patches else found_all
        got = self.repair_in_band(found_all, j_ref)
        if got is not None:
            patches += got[0]
            found_all, watch_gy, kept = got[1], got[2], True
        self.timings["side_effect_repair"] = (time.perf_counter() - t0) * 1000
        return patches, kept, found_all, watch_gy

    def repair_outside_band(self, found_all, base: tuple):
        """Stage 1: the rise outside the target's band; the shipped LP first
        (``lp_before_plain``, with ``lp`` "first" or "instead"), then, unless it repaired, the
        plain pass and the LP and the focused passes in the order ``RepairSettings.lp`` says.
        ``base``: the state (h, j, w) before it. Returns (patches, kept, the watch's dose after
        a kept pass or None, the objective later passes are judged against)."""
        h0, j0, w0 = base
        thr, rx = self.thr, self.rx
        patches, kept, watch_gy = [], False, None
        # The objective every later pass is judged against (focused_j_slack): the state
        # before the focused passes and the LP, so that the two stages' slacks do not compound.
        j_ref = j0
        found = self.outside(found_all)
        if found.max_gy() > thr and np.any(found.unasked_gy > self.cap):
            early = self.settings.lp_before_plain and self.settings.lp in ("first", "instead")
            if early:  # the shipped LP alone (no wide retry) before the plain pass
                got = self.lp_repair(found, self.outside, (h0, j0, w0), self.t_hi, programmes="shipped")
                if got is not None:
                    return list(got[0]), True, got[2], j0
            back = self.checkpoint()
            watch2, _ = self.extended(self.watch, found, self.plain_weight)
            rec = recover(self.modifier, watch2, steps=self.steps)
            patches = list(rec.patches)
            after = self.outside(self.measure())
            h1, j1, w1, watch_gy = self.state()
            # Kept only if nothing recovery keeps got worse and the side effect is clearly lower.
            kept = bool(patches) and self.no_worse(h0, j0, w0, h1, j1, w1) and after.max_gy() < found.max_gy() - 0.003 * rx
            if not kept:  # as if never tried: the state before it, bit for bit, and nothing journaled
                back()
                patches, after, watch_gy = [], found, None
                h1, j1, w1 = h0, j0, w0
            j_ref = j1
            for stage in _LP_ORDER[self.settings.lp]:
                if after.max_gy() <= thr:
                    break
                if stage == "focused" and self.settings.focused_passes <= 0:
                    continue
                if stage == "focused":
                    got = self.focused(after, self.outside, (h1, j1, w1), lambda r: r.max_gy() <= thr)
                else:  # after a failed early LP and no plain pass the shipped LP would fail again
                    got = self.lp_repair(after, self.outside, (h1, j1, w1), self.t_hi,
                                         programmes="wide" if early and not kept else "both")
                if got is not None:
                    patches += got[0]
                    after, watch_gy, kept = got[1], got[2], True
        return patches, kept, watch_gy, j_ref

    def repair_in_band(self, found_all, j_ref: float):
        """Stage 2: far target voxels that rose unasked inside their band, run only when the
        rest is at the report line or where stage 1 left it; the LP (everything under the line
        at once), then focused passes. Returns (patches, rises after, the watch's dose) or None."""
        s = self.settings
        left = np.any((found_all.unasked_gy > self.thr) & self.in_band(found_all))
        if not (s.target_in_band and left):
            return None
        limit = max(self.thr, self.outside(found_all).max_gy())
        h1, _, w1, _ = self.state()
        j1 = j_ref
        got = None
        if s.lp != "off" and limit <= self.thr:  # the LP: everything under the line at once
            got = self.lp_repair(found_all, lambda r: r, (h1, j1, w1), None)
        if got is None and s.target_focused and s.focused_passes > 0:
            got = self.focused(found_all, lambda r: r, (h1, j1, w1), lambda r: self.outside(r).max_gy() <= limit)
        return got

    # ------------------------------------------------------------------ pieces
    def in_band(self, rises) -> np.ndarray:
        """Target voxels that ended inside the target's band."""
        return (rises.tissue == 0) & (rises.after_gy <= self.t_hi)

    def outside(self, rises):
        """The rises without the target voxels inside their band (the first stage's)."""
        return rises.take(~self.in_band(rises))

    def state(self) -> tuple:
        """(hard key, objective, largest violation of each pin / feature / guard / request
        group, the watch's dose)."""
        w, hard = self.watch, self._hard
        d = _watch_dose(self.engine, w)  # a watch built on the base: its cached tables reused
        v = w.violation(d)
        worst = w.worst_per_group(v, self._kept_groups)
        hard_key = round(float(v[hard].max()) / self.eps) if hard.any() else 0
        return hard_key, float(np.sum(w.weight * v**2)), worst, d

    def extended(self, w: Watch, rises, weight: float) -> tuple:
        """``w`` with the worst far voxels of ``rises`` (up to ``rows``, unasked rise above the
        cap) held below before + asked + the cap (target voxels inside their band: + the report
        line), as a group of weight ``weight``; and those voxels."""
        over = np.flatnonzero(rises.unasked_gy > self.cap)
        top = over[np.argsort(-rises.unasked_gy[over], kind="stable")[:self.settings.rows]]
        vox = rises.voxels[top]
        hi = self.before_at(vox) + rises.asked_gy[top] + np.where(self.in_band(rises)[top], self.thr, self.cap)
        # never below a watched voxel's lower edge (a target voxel that rose into its band
        # from below is not pushed out of it again)
        i, watched = w.locate(vox)
        hi[watched] = np.maximum(hi[watched], w.lo[i[watched]])
        return extend_watch(w, vox, hi, weight, "far side effects"), vox

    def checkpoint(self) -> Callable[[], None]:
        """A function that takes the engine back to now, bit for bit, with nothing of what
        came after journaled."""
        eng = self.engine
        snap = eng.snapshot()
        n_log = None if eng.apply_log is None else len(eng.apply_log)

        def back():
            eng.restore(snap)
            if n_log is not None:
                del eng.apply_log[n_log:]
        return back

    def no_worse(self, h0, j0, w0, h1, j1, w1, j_slack: float = 0.05) -> bool:
        """Nothing recovery keeps got worse from (h0, j0, w0) to (h1, j1, w1) (:meth:`state`):
        no new or larger conflict, the objective within ``j_slack`` (or 0.05 Gy^2)."""
        return h1 <= h0 and bool(np.all(w1 <= np.maximum(w0, self.eps))) and j1 <= (1.0 + j_slack) * j0 + 0.05

    def focused(self, rises, view, base: tuple, accept):
        """Focused passes from now on ``view(rises)``, each judged against ``base`` (h, j, w);
        the engine ends at the last good pass whose rises ``accept``, else where it started.
        Returns (patches, rises after, the watch's dose) or None."""
        s, rx = self.settings, self.rx
        back = self.checkpoint()
        got, w3, best = [], self.watch, None
        rises = view(rises)
        for _ in range(s.focused_passes):
            w3, vox = self.extended(w3, rises, s.focused_weight)
            if not vox.size:
                break
            rec = recover(self.modifier, w3, steps=self.steps, focus=np.isin(w3.voxels, vox))
            got += list(rec.patches)
            if s.mix_steps > 0:
                got += list(recover(self.modifier, w3, steps=s.mix_steps).patches)
            last, rises = rises, view(self.measure())
            h2, j2, w2, gy2 = self.state()
            if not (bool(got) and self.no_worse(*base, h2, j2, w2, s.focused_j_slack)
                    and rises.max_gy() < last.max_gy() - 0.003 * rx):
                break
            if accept(rises):
                best = (len(got), rises, gy2, self.checkpoint())
                if rises.max_gy() <= self.thr:
                    break
        if best is None:
            back()
            return None
        n, rises, gy, back_to_best = best
        if n < len(got):  # a later pass that was not good: back to the best state
            back_to_best()
        return got[:n], rises, gy

    def lp_repair(self, rises, view, base: tuple, target_hi_gy, programmes: str = "both"):
        """The LP repair (ids_engine/dmr/_repair_lp.py) on ``view(rises)``, all or nothing,
        judged against ``base`` as the focused passes: (patches, rises after, the watch's
        dose) or None. ``target_hi_gy``: a target voxel may end up to there instead of
        within the line (None: held to the line too); ``programmes``: "both" (the shipped
        programme, then the wide retry when it fails), "shipped" or "wide" alone."""
        s = self.settings
        t1 = time.perf_counter()
        back = self.checkpoint()
        out = None
        order = (s.lp_wide, s.lp_options) if self.wide_first and target_hi_gy is None else (s.lp_options, s.lp_wide)
        order = {"both": order, "shipped": (s.lp_options,), "wide": (s.lp_wide,)}[programmes]
        for lp_opts in dict.fromkeys(o for o in order if o is not None):  # equal settings: tried once
            left = s.max_request_iterations - self.lp_iterations
            if left <= 0 or (self.cancel is not None and self.cancel()):  # not made: said so
                lp = LPRepairResult(status="iterations" if left <= 0 else "cancelled",
                                    limit="max_request_iterations" if left <= 0 else "")
                self.lp_results.append(lp)
                if left <= 0:
                    _log.warning("the LP side-effect repair skipped a programme: this request's LP calls took "
                                 "RepairSettings.max_request_iterations (%d) HiGHS iterations", s.max_request_iterations)
                break
            lp = lp_far_repair(self.modifier, self.watch, view(rises), back, request_voxels=self.request_voxels,
                               before_at=self.before_at, measure=lambda: view(self.measure()),
                               goal_gy=s.lp_goal * self.thr, accept_gy=self.thr, target_hi_gy=target_hi_gy,
                               shape_zyx=self.shape_zyx, spacing_mm_zyx=self.spacing_mm_zyx, eps_gy=self.eps,
                               options=lp_opts, iterations_left=left, cancel=self.cancel)
            self.lp_results.append(lp)
            self.lp_iterations += lp.iterations
            if lp.status in ("time", "iterations"):
                self._warn_limit(lp, lp_opts, s)
            if lp.ok:
                h2, j2, w2, gy2 = self.state()
                if self.no_worse(*base, h2, j2, w2, s.focused_j_slack):
                    out = lp.patches, lp.rises, gy2
                    self.wide_first = self.wide_first or (lp_opts == s.lp_wide and target_hi_gy is not None)
                    break
                lp.status = "worse"
                back()
        self.timings["side_effect_lp"] = self.timings.get("side_effect_lp", 0.0) + (time.perf_counter() - t1) * 1000
        return out

    @property
    def limits_hit(self) -> tuple[str, ...]:
        """The limits this request's LP calls reached, in order, each named as the setting
        that holds it (``"LPRepairOptions.max_call_iterations"``,
        ``"RepairSettings.max_request_iterations"``, ``"LPRepairOptions.call_time_limit_s"``
        ...): empty when every call ended on its own. The session keeps them on the request's
        result (``RequestResult.repair_limits``)."""
        return tuple(_limit_name(lp) for lp in self.lp_results if lp.status in ("time", "iterations") and lp.limit)

    @staticmethod
    def _warn_limit(lp: LPRepairResult, lp_opts: LPRepairOptions, s: RepairSettings) -> None:
        """A logged warning naming the limit an LP call reached (``lp.limit``) and its value."""
        value = s.max_request_iterations if lp.limit == "max_request_iterations" else getattr(lp_opts, lp.limit)
        where, _ = _limit_name(lp).split(".")
        if lp.status == "time":  # the one outcome that depends on the machine's speed: said so
            _log.warning("the LP side-effect repair hit its wall-clock safety %s.%s (%g s) after %d solve(s) and %d "
                         "iterations: on a faster or less loaded machine this request's repair may differ",
                         where, lp.limit, value, lp.solves, lp.iterations)
        else:
            _log.warning("the LP side-effect repair reached %s.%s (%d HiGHS iterations) after %d solve(s): the "
                         "programme was left unsolved (the same on every machine)", where, lp.limit, value, lp.solves)


def _limit_name(lp: LPRepairResult) -> str:
    """The setting that holds the limit an LP call reached: ``"RepairSettings.<limit>"`` for
    the request's budget, ``"LPRepairOptions.<limit>"`` for a call's or a solve's."""
    return f"{'RepairSettings' if lp.limit == 'max_request_iterations' else 'LPRepairOptions'}.{lp.limit}"
