"""The side-effect repair's settings (``ids_engine.dmr._repair.RepairSettings``, a session's
``repair_settings``) and the repair's measure-only path (``SideEffectRepair.run``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ids_engine.dmr._repair import WIDE_LP_OPTIONS, RepairSettings, SideEffectRepair
from ids_engine.dmr._repair_lp import LPRepairOptions
from ids_engine.dmr._side_effects import UnaskedRise
from ids_engine.phantoms import PHANTOMS
from ids_engine.session import Session


@pytest.mark.parametrize("field, value", [
    ("rows", 0), ("rows", 2.5), ("rows", True), ("focused_passes", -1), ("focused_passes", 1.0), ("mix_steps", -2),
    ("focused_weight", 0.0), ("focused_weight", float("nan")), ("focused_j_slack", -0.1), ("focused_j_slack", "0.2"),
    ("lp", "before"), ("lp", None), ("lp_goal", 0.0), ("lp_goal", 1.5), ("lp_options", None), ("lp_options", {}),
    ("lp_wide", "wide"), ("target_in_band", 1), ("target_focused", None), ("lp_before_plain", 1),
    ("max_request_iterations", 0), ("max_request_iterations", 2**31), ("max_request_iterations", 1.0),
    ("max_request_iterations", True),
])
def test_a_bad_setting_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RepairSettings\.{field} "):
        RepairSettings(**{field: value})
    with pytest.raises(ValueError, match=rf"RepairSettings\.{field} "):  # and when replaced on a good one
        dataclasses.replace(RepairSettings(), **{field: value})


@pytest.mark.parametrize("field, value", [
    ("far_columns", -1), ("rounds", 0), ("rounds", 2.0), ("floor_solves", -1), ("max_new_rows", True),
    ("time_limit_s", -1.0), ("call_time_limit_s", float("nan")), ("drop_gy", "0.001"), ("exact", 1),
    ("warm_start", None), ("max_solve_iterations", 2**31), ("max_call_iterations", 0), ("max_call_iterations", 2**31),
])
def test_a_bad_lp_option_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"LPRepairOptions\.{field} "):
        LPRepairOptions(**{field: value})


def test_every_lp_mode_and_the_wide_retry_are_accepted():
    for mode in ("first", "after", "instead", "off"):
        assert RepairSettings(lp=mode).lp == mode
    s = RepairSettings(lp_wide=WIDE_LP_OPTIONS, focused_passes=0, mix_steps=0, focused_j_slack=0, lp_goal=1)
    assert s.lp_wide.far_columns == 48 and s.lp_wide.exact
    assert RepairSettings().lp_options == LPRepairOptions() and RepairSettings().lp_wide is WIDE_LP_OPTIONS


def test_a_session_keeps_its_repair_settings_and_refuses_anything_else():
    patient = PHANTOMS["water"](resolution="coarse")
    with pytest.raises(ValueError, match="repair_settings must be a RepairSettings"):
        Session(patient, [], prescription_gy=60.0, repair_settings={"lp": "off"})
    s = Session.from_phantom("horseshoe", "coarse", prescription_gy=60.0, repair_settings=RepairSettings(lp="off"))
    try:
        assert s.repair_settings == RepairSettings(lp="off")
        with pytest.raises(ValueError, match="repair_settings must be a RepairSettings, got dict"):
            s.repair_settings = {"lp": "first"}  # set later: checked too
        assert s.repair_settings == RepairSettings(lp="off")
        s.repair_settings = dataclasses.replace(s.repair_settings, rows=12)
        assert s.repair_settings.rows == 12
    finally:
        s.close()


class _Untouchable:
    """An engine (and modifier) the repair must not use: any attribute raises."""

    def __getattr__(self, name):
        raise AssertionError(f"the repair used the engine ({name})")


def _rises(unasked_gy):
    n = len(unasked_gy)
    return UnaskedRise(np.arange(n, dtype=np.int64), np.asarray(unasked_gy, float), np.zeros(n), np.full(n, 30.0),
                       np.full(n, 2), np.full(n, 40.0))


@pytest.mark.parametrize("repair, steps, worst_gy", [(False, 5, 9.0), (True, 0, 9.0), (True, 5, 3.0)],
                         ids=["report only", "no repair steps", "nothing above the line"])
def test_the_repair_only_measures_when_it_has_nothing_to_do(repair, steps, worst_gy):
    """Set-voxel requests (``repair`` False), ``side_effect_repair_steps`` 0, or no far rise
    above the report line: one measure, returned as it is, and the engine is never touched."""
    found = _rises([1.0, worst_gy])
    measured = []

    def measure():
        measured.append(1)
        return found

    untouchable = _Untouchable()
    untouchable.engine = untouchable
    timings = {}
    rep = SideEffectRepair(untouchable, None, np.zeros(0, np.int64), before_at=None, measure=measure,
                           prescription_gy=60.0, report_gy=3.0, cap_gy=2.7, target_hi_gy=64.2, steps=steps,
                           shape_zyx=(4, 4, 4), spacing_mm_zyx=(3.0, 3.0, 3.0), timings=timings)
    patches, kept, after, watch_gy = rep.run(repair)
    assert (patches, kept, watch_gy) == ([], False, None) and after is found
    assert measured == [1] and timings == {}


class _StageTwo(SideEffectRepair):
    """A repair whose state and LP are stubs: the second stage's judgement alone."""

    def __init__(self, objective_now: float):
        untouchable = _Untouchable()
        untouchable.engine = untouchable
        super().__init__(untouchable, None, np.zeros(0, np.int64), before_at=None, measure=None,
                         prescription_gy=60.0, report_gy=3.0, cap_gy=2.7, target_hi_gy=64.2, steps=5,
                         shape_zyx=(4, 4, 4), spacing_mm_zyx=(3.0, 3.0, 3.0),
                         settings=RepairSettings(target_focused=False))
        self.objective_now = objective_now
        self.bases = []

    def state(self):
        return 0, self.objective_now, np.zeros(2), None

    def lp_repair(self, rises, view, base, target_hi_gy):
        self.bases.append(base)
        return None


def test_the_second_stage_is_judged_against_the_objective_before_the_first_stages_lp():
    """The two stages' objective slacks must not compound: stage 2 is judged against the
    objective from before the first stage's LP and focused passes (``j_ref``), not the
    objective stage 1 ended at (here 25 % higher, all of stage 1's slack used)."""
    rep = _StageTwo(objective_now=1.25)
    # a far target voxel 4 Gy up unasked, ending inside its band (64.2 Gy): stage 2's business
    found = UnaskedRise(np.array([7], np.int64), np.array([4.0]), np.zeros(1), np.full(1, 30.0),
                        np.zeros(1, np.int64), np.array([63.0]))
    assert rep.repair_in_band(found, j_ref=1.0) is None
    assert len(rep.bases) == 1 and rep.bases[0][1] == 1.0


class _StageOne(_StageTwo):
    """A repair whose state is a stub and whose shipped LP repairs: stage 1's early LP alone."""

    def lp_repair(self, rises, view, base, target_hi_gy, programmes="both"):
        self.bases.append((base, programmes))
        return (["patch"], view(rises), "watch dose") if programmes == "shipped" else None


def test_an_lp_before_the_plain_pass_that_repairs_ends_stage_one(monkeypatch):
    """``lp_before_plain``: the shipped programme alone, judged against the state before the
    repair; when it repairs, no plain pass runs (no recovery), and stage 2 is judged against
    that same objective (``j_ref``), not the one the LP ended at."""
    from ids_engine.dmr import _repair

    monkeypatch.setattr(_repair, "recover", lambda *a, **k: pytest.fail("the plain pass ran"))
    rep = _StageOne(objective_now=1.25)
    found = UnaskedRise(np.array([7], np.int64), np.array([4.0]), np.zeros(1), np.full(1, 30.0),
                        np.full(1, 2, np.int64), np.array([30.0]))  # normal tissue, 4 Gy up (line 3, cap 2.7)
    patches, kept, watch_gy, j_ref = rep.repair_outside_band(found, (0, 1.0, np.zeros(2)))
    assert (patches, kept, watch_gy, j_ref) == (["patch"], True, "watch dose", 1.0)
    assert [p for _, p in rep.bases] == ["shipped"] and rep.bases[0][0][1] == 1.0
    assert not rep.wide_first
