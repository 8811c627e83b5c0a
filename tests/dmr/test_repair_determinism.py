"""The LP side-effect repair's work is bounded by HiGHS's iteration count, the same on every
machine (``LPRepairOptions.max_solve_iterations``); its wall-clock limits (``time_limit_s``,
``call_time_limit_s``) are safety nets far above what a solve takes, and a call that hits
one says so (status "time", a logged warning). Coarse horseshoe, the line drag of
test_focused_repair.py."""

from __future__ import annotations

import dataclasses
import logging
import time
import types

import numpy as np
import pytest

import ids_engine.dmr._repair as repair_module
from ids_engine.dmr import _repair_lp
from ids_engine.dmr._repair_lp import LPRepairOptions
from ids_engine.session import DMROptions

from .conftest import run_with_each, set_repair
from .test_focused_repair import LINE

pytestmark = pytest.mark.usefixtures("ring_as_found")  # the drags were found with the ring as it was

REPORT_PCT, CAP_PCT = 3.0, 2.5


@pytest.fixture
def lp_calls(monkeypatch):
    """The LP repair's results, in call order."""
    calls = []
    real = repair_module.lp_far_repair

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(repair_module, "lp_far_repair", spy)
    return calls


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "20000", None])
def test_a_bad_iteration_limit_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"LPRepairOptions\.max_solve_iterations must be a whole number, 1 or more"):
        LPRepairOptions(max_solve_iterations=value)


def test_the_limits_default_to_iterations_with_wall_clock_safety_nets():
    o = LPRepairOptions()
    assert o.max_solve_iterations == 20_000 and o.time_limit_s == 30.0 and o.call_time_limit_s == 120.0
    assert repair_module.WIDE_LP_OPTIONS.max_solve_iterations == o.max_solve_iterations


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
    assert [(c.status, c.ok, c.solves, c.patches) for c in calls] == [("iterations", False, 1, [])] * len(calls)
    assert len({c.sizes["columns"] for c in calls}) == 2  # the shipped and the wide programme
    np.testing.assert_array_equal(lp_dose, off_dose)
    assert (lp.patch_groups, lp.side_effects_repaired) == (off.patch_groups, off.side_effects_repaired)


def test_the_repair_does_not_depend_on_the_machine_s_speed(fresh, lp_calls, monkeypatch):
    """The shipped defaults' wide retry (report line at 0.5 % of Rx: ten solves) on this machine
    and on one that looks five times slower to the repair's clock: the same solves, the same
    patches, the same plan, bit for bit (with the wall-clock limits that bounded the repair
    before, 2 s a solve and 6 s a call, the slow machine's wide retry ran out of time)."""
    s = fresh
    monkeypatch.setattr(s, "options", DMROptions(report_rise_pct=0.5, max_rise_pct=0.4))
    runs = []
    for factor in (1.0, 5.0):
        real = time.perf_counter
        monkeypatch.setattr(_repair_lp, "time", types.SimpleNamespace(perf_counter=lambda: factor * real()))
        ((res, dose, calls),) = run_with_each(s, LINE, monkeypatch, "lp", (s.repair_settings.lp,), lp_calls)
        runs.append((res, dose, calls))
    (fast, fast_dose, fast_calls), (slow, slow_dose, slow_calls) = runs
    assert any(c.ok and c.solves > 4 for c in fast_calls)  # the wide retry repaired, in several solves
    assert all(c.status != "time" for c in fast_calls + slow_calls)
    assert [(c.status, c.rounds, c.solves, c.sizes) for c in slow_calls] == \
        [(c.status, c.rounds, c.solves, c.sizes) for c in fast_calls]
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
    warned = [r.getMessage() for r in caplog.records if r.name == repair_module.__name__]
    assert len(warned) == len(calls) and all("wall-clock safety" in w and "may differ" in w for w in warned)
