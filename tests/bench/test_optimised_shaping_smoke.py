"""bench/bench_optimised_shaping.py: the kept-step rule, and one shaping step on the optimised
coarse horseshoe plan (issue 11, "shaping refines the optimised plan")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_optimised_shaping as bench  # noqa: E402


def _m(feature_gy, hottest_gy, met=True):
    return {"feature_gy": feature_gy, "oar_hottest_voxel_gy": hottest_gy, "goals_met": {"PTV D95 >= 57 Gy": met}}


def test_a_step_that_lowers_the_feature_but_raises_the_maximum_is_not_kept():
    # The TG-119 run before this rule: core D10 9.92 -> 9.25 Gy while the core maximum
    # rose 10.00 -> 10.59 Gy. That is not a cooler hot rim.
    kept, why = bench.judge_step(_m(9.92, 10.00), _m(9.25, 10.59), oar="Core")
    assert not kept and why == "Core maximum raised"


@pytest.mark.parametrize("after, kept, why", [
    (_m(9.25, 9.95), True, "kept"),
    (_m(9.25, 10.005), True, "kept"),  # within 0.01 Gy: no rise
    (_m(9.915, 9.95), False, "feature not lowered"),  # less than 0.01 Gy lower
    (_m(9.25, 9.95, met=False), False, "a goal broke"),
    (_m(10.5, 10.6, met=False), False, "a goal broke, feature not lowered, OAR maximum raised"),
])
def test_kept_step_rule(after, kept, why):
    assert bench.judge_step(_m(9.92, 10.00), after) == (kept, why)


@pytest.mark.slow
def test_one_erase_step_cools_the_oar_rim_of_the_optimised_horseshoe_plan():
    """The optimised coarse horseshoe plan meets the clinical goals of
    examples/protocols/horseshoe.toml; erasing the OAR's hot spot (with coverage repairs)
    lowers the OAR's D2 and its hottest voxel and leaves every goal met."""
    case = bench.CASES["horseshoe"]
    info, stages, q = bench.shape_case(case, "coarse", steps=("erase_spot",))
    before, after = q["before"], q["after"]
    assert all(before["goals_met"].values()), before["goals_met"]
    assert q["steps"][0]["kept"], q["steps"][0]["why"]
    assert all(after["goals_met"].values())
    assert after["oar_d2_gy"] < before["oar_d2_gy"] - 0.1
    assert after["oar_hottest_voxel_gy"] <= before["oar_hottest_voxel_gy"] + bench.MIN_CHANGE_GY
    # Every request is logged with its time and conflicts.
    assert q["requests"] and all("time_ms" in r and "conflicts" in r for r in q["requests"])
