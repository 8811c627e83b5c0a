"""The LP side-effect repair's work is bounded by HiGHS's iteration count, the same on every
machine: ``LPRepairOptions.max_solve_iterations`` a solve, ``max_call_iterations`` a call's
solves together, ``RepairSettings.max_request_iterations`` a request's calls together. Its
wall-clock limits (``time_limit_s``, ``call_time_limit_s``) are safety nets, and a call that
hits one says so (status "time", ``limit`` naming it, a logged warning). Coarse horseshoe, the
line drag of test_focused_repair.py."""

from __future__ import annotations

import dataclasses
import logging
import time
import types

import numpy as np
import pytest

import ids_engine.dmr._repair as repair_module
import ids_engine.session as session_module
from ids_engine.dmr import _repair_lp
from ids_engine.dmr._repair_lp import LPRepairOptions
from ids_engine.session import DMROptions

from .conftest import run_with_each, set_repair
from .test_focused_repair import LINE

pytestmark = pytest.mark.usefixtures("ring_as_found")  # the drags were found with the ring as it was

REPORT_PCT, CAP_PCT = 3.0, 2.5


@pytest.mark.parametrize("name", ["max_solve_iterations", "max_call_iterations"])
@pytest.mark.parametrize("value", [0, -5, 2.5, True, "20000", None])
def test_a_bad_iteration_limit_is_refused_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"LPRepairOptions\.{name} must be a whole number, 1 or more"):
        LPRepairOptions(**{name: value})


@pytest.mark.parametrize("name", ["max_solve_iterations", "max_call_iterations"])
def test_an_iteration_limit_beyond_highs_s_is_refused_naming_the_field(name):
    """HiGHS's iteration options are C ints: 2**31 would make SciPy's bindings raise TypeError."""
    assert getattr(LPRepairOptions(**{name: 2**31 - 1}), name) == 2**31 - 1
    with pytest.raises(ValueError, match=rf"LPRepairOptions\.{name} must be at most 2147483647"):
        LPRepairOptions(**{name: 2**31})


def test_the_limits_default_to_iterations_with_wall_clock_safety_nets():
    o = LPRepairOptions()
    assert (o.max_solve_iterations, o.max_call_iterations, o.time_limit_s, o.call_time_limit_s) == (4_000, 8_000,
                                                                                                  30.0, 60.0)
    w = repair_module.WIDE_LP_OPTIONS
    assert (w.max_solve_iterations, w.max_call_iterations) == (o.max_solve_iterations, o.max_call_iterations)
    assert repair_module.RepairSettings().max_request_iterations == 12_000


def test_a_tiny_iteration_limit_binds_the_same_on_every_machine_and_leaves_the_plan(fresh, lp_calls, monkeypatch):
    """One iteration a solve: both programmes (the shipped one solved from scratch with
    ``milp``, the wide retry warm-started in HiGHS's bindings) stop at their first solve with
    status "iterations", apply nothing that stays, and the plan is the one without the LP, bit
    for bit."""
    s = fresh
    monkeypatch.setattr(s, "options", DMROptions(report_rise_pct=2.0, max_rise_pct=1.5))
    set_repair(monkeypatch, s, lp_options=LPRepairOptions(max_solve_iterations=1),
               lp_wide=dataclasses.replace(repair_module.WIDE_LP_OPTIONS, max_solve_iterations=1))
    (off, off_dose, none), (lp, lp_dose, calls) = run_with_each(s, LINE, monkeypatch, "lp", ("off", "first"), lp_calls)
    assert none == [] and calls
    assert [(c.status, c.limit, c.ok, c.solves, c.iterations, c.patches) for c in calls] == \
        [("iterations", "max_solve_iterations", False, 1, 1, [])] * len(calls)
    assert len({c.sizes["columns"] for c in calls}) == 2  # the shipped and the wide programme
    np.testing.assert_array_equal(lp_dose, off_dose)
    assert (lp.patch_groups, lp.side_effects_repaired) == (off.patch_groups, off.side_effects_repaired)


def test_the_repair_does_not_depend_on_the_machine_s_speed(fresh, lp_calls, monkeypatch):
    """The shipped defaults' wide retry (report line at 0.5 % of Rx: ten solves) on this machine
    and on one that looks slower to the repair's own clock (``_repair_lp``'s ``perf_counter``,
    which ``call_time_limit_s`` is judged by): the same solves, the same patches, the same plan,
    bit for bit. The factor is taken from the fast run so that the slowest call's solves look
    twice the wall-clock limit that bounded the repair before (6 s a call; 2 s a solve), at
    least 5x. Only the repair's clock is slowed: HiGHS's own clock (``time_limit_s``, inside
    the solver) is not simulated."""
    s = fresh
    monkeypatch.setattr(s, "options", DMROptions(report_rise_pct=0.5, max_rise_pct=0.4))
    old_call_limit_s = 6.0
    real = time.perf_counter
    runs = []
    factor = 1.0
    for slow in (False, True):
        if slow:
            fast_solve_s = max(c.timings_ms.get("solve", 0.0) for c in runs[0][2]) / 1000.0
            factor = max(5.0, 2.0 * old_call_limit_s / fast_solve_s)
            if factor * fast_solve_s > LPRepairOptions().call_time_limit_s / 2:  # a very loaded machine
                pytest.skip(f"solves too slow here ({fast_solve_s:.1f} s a call) to look slower under the safety net")
            monkeypatch.setattr(_repair_lp, "time", types.SimpleNamespace(perf_counter=lambda: factor * real()))
        ((res, dose, calls),) = run_with_each(s, LINE, monkeypatch, "lp", (s.repair_settings.lp,), lp_calls)
        runs.append((res, dose, calls))
    (fast, fast_dose, fast_calls), (slow, slow_dose, slow_calls) = runs
    assert any(c.ok and c.solves > 4 for c in fast_calls)  # the wide retry repaired, in several solves
    # the slow run's slowest call looked longer than the old call limit
    assert max(c.timings_ms.get("solve", 0.0) for c in slow_calls) / 1000.0 > old_call_limit_s
    assert all(c.status != "time" for c in fast_calls + slow_calls)
    assert [(c.status, c.rounds, c.solves, c.iterations, c.sizes) for c in slow_calls] == \
        [(c.status, c.rounds, c.solves, c.iterations, c.sizes) for c in fast_calls]
    np.testing.assert_array_equal(slow_dose, fast_dose)
    assert slow.patch_groups == fast.patch_groups and slow.side_effects_repaired == fast.side_effects_repaired
    for a, b in zip(slow.patches, fast.patches):
        assert (a.beam, a.row0, a.col0) == (b.beam, b.row0, b.col0)
        np.testing.assert_array_equal(a.delta, b.delta)


@pytest.mark.parametrize("limit", ["time_limit_s", "call_time_limit_s"])
def test_a_wall_clock_safety_that_is_hit_is_reported(fresh, lp_calls, monkeypatch, caplog, limit):
    """A wall-clock limit of 0 s (a solve's in HiGHS, or the call's before its first solve):
    the call ends with status "time", nothing of it stays, and a warning says that this
    outcome depends on the machine's speed."""
    s = fresh
    monkeypatch.setattr(s, "options", DMROptions(report_rise_pct=2.0, max_rise_pct=1.5))
    set_repair(monkeypatch, s, lp_options=LPRepairOptions(**{limit: 0.0}), lp_wide=None)
    with caplog.at_level(logging.WARNING, logger=repair_module.__name__):
        (off, off_dose, _), (lp, lp_dose, calls) = run_with_each(s, LINE, monkeypatch, "lp", ("off", "first"),
                                                                 lp_calls)
    assert calls and all(c.status == "time" and not c.ok and c.rounds == 1 for c in calls)
    np.testing.assert_array_equal(lp_dose, off_dose)
    assert all(c.limit == limit for c in calls)
    warned = [r.getMessage() for r in caplog.records if r.name == repair_module.__name__]
    assert len(warned) == len(calls)
    assert all("wall-clock safety" in w and f"LPRepairOptions.{limit}" in w and "may differ" in w for w in warned)


@pytest.fixture
def repairs(monkeypatch):
    """The session's :class:`SideEffectRepair` objects, in order (their ``lp_results``)."""
    made = []

    class Spy(repair_module.SideEffectRepair):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(session_module, "SideEffectRepair", Spy)
    return made


def test_a_call_s_solves_share_its_iteration_budget(fresh, lp_calls, repairs, monkeypatch, caplog):
    """The wide retry (report line at 0.5 % of Rx; about 2,400 iterations in ten solves with the
    defaults) allowed 300 iterations a call: each solve is given what the call has left, the call
    stops with status "iterations", limit "max_call_iterations", having taken no more than that,
    and a warning names the limit."""
    s = fresh
    monkeypatch.setattr(s, "options", DMROptions(report_rise_pct=0.5, max_rise_pct=0.4))
    set_repair(monkeypatch, s, lp_wide=dataclasses.replace(repair_module.WIDE_LP_OPTIONS, max_call_iterations=300))
    with caplog.at_level(logging.WARNING, logger=repair_module.__name__):
        ((res, _, calls),) = run_with_each(s, LINE, monkeypatch, "lp", ("first",), lp_calls)
    wide = [c for c in calls if c.limit == "max_call_iterations"]
    assert wide and all(c.status == "iterations" and 0 < c.iterations <= 300 and not c.ok for c in wide)
    assert any("LPRepairOptions.max_call_iterations (300" in r.getMessage() for r in caplog.records)
    (rep,) = repairs
    assert rep.lp_iterations == sum(c.iterations for c in calls)
    # The request's result names the limit too (not only the log), and its summary keeps it.
    assert res.repair_limits == ("LPRepairOptions.max_call_iterations",) * len(wide)
    assert res.summary()["repair_limits"] == list(res.repair_limits)


def test_a_request_s_lp_calls_share_its_iteration_budget(fresh, lp_calls, repairs, monkeypatch, caplog):
    """``RepairSettings.max_request_iterations`` 1: the request's first LP call (the shipped
    programme, before the plain pass) is given that one iteration and says so (limit
    "max_request_iterations"), and the calls after it are not made (their results say why)
    with a warning."""
    s = fresh
    monkeypatch.setattr(s, "options", DMROptions(report_rise_pct=0.5, max_rise_pct=0.4))
    set_repair(monkeypatch, s, max_request_iterations=1)
    with caplog.at_level(logging.WARNING, logger=repair_module.__name__):
        ((res, _, calls),) = run_with_each(s, LINE, monkeypatch, "lp", ("first",), lp_calls)
    (rep,) = repairs
    assert [(c.status, c.limit, c.iterations) for c in calls] == [("iterations", "max_request_iterations", 1)]
    assert rep.lp_iterations == 1
    skipped = [c for c in rep.lp_results if c.solves == 0 and c.limit == "max_request_iterations"]
    assert skipped and all(c.status == "iterations" and not c.ok for c in skipped)
    assert len(rep.lp_results) == len(calls) + len(skipped)
    assert any("RepairSettings.max_request_iterations (1)" in r.getMessage() for r in caplog.records)
    assert res.repair_limits == ("RepairSettings.max_request_iterations",) * (1 + len(skipped))


def test_a_cancel_stops_the_lp_between_solves(fresh, lp_calls, repairs, monkeypatch):
    """``Session.run``'s ``cancel`` reaches the LP repair: after it turns True (here: after
    HiGHS's first solve) no further solve runs, and the LP calls left end "cancelled" with
    nothing of them kept."""
    s = fresh
    monkeypatch.setattr(s, "options", DMROptions(report_rise_pct=0.5, max_rise_pct=0.4))
    flag = [False]
    real_run = _repair_lp._run

    def run_then_cancel(*args, **kwargs):
        out = real_run(*args, **kwargs)
        flag[0] = True
        return out

    monkeypatch.setattr(_repair_lp, "_run", run_then_cancel)
    before = s.dose()
    s.run(LINE, cancel=lambda: flag[0])
    s.undo()
    s.clear_redo()
    np.testing.assert_array_equal(s.dose(), before)
    (rep,) = repairs
    assert flag[0] and sum(c.solves for c in lp_calls if c.status != "cancelled") == 1
    assert any(c.status == "cancelled" for c in rep.lp_results)
    assert all(c.status == "cancelled" and not c.patches for c in rep.lp_results[1:])
