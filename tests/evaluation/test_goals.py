"""Planning goals: parsing (errors name the field), checks, the TG-119 set, two plans side by side."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.evaluation import Goal, check_goals, compare_plans, parse_goal, plan_metrics, tg119_goals
from ids_engine.model import Grid, Patient, Structure, StructureKind
from ids_engine.phantoms import tg119


def small_patient(name="Doe^Jane"):
    """10^3 voxels of 1 cc: a 4x4x4 target (64 cc), an 2x2x2 OAR (8 cc) beside it, the body."""
    g = Grid((10, 10, 10), (10.0, 10.0, 10.0))
    ptv = np.zeros(g.shape_zyx, bool)
    ptv[3:7, 3:7, 2:6] = True
    oar = np.zeros(g.shape_zyx, bool)
    oar[4:6, 4:6, 7:9] = True
    return Patient(
        grid=g,
        ct_hu=np.zeros(g.shape_zyx, np.float32),
        structures=(
            Structure("PTV", StructureKind.TARGET, ptv, g),
            Structure("Spinal cord", StructureKind.OAR, oar, g),
            Structure("BODY", StructureKind.EXTERNAL, np.ones(g.shape_zyx, bool), g),
        ),
        name=name,
        frame_of_reference_uid="1.2.826.0.1.3680043.2.1125.99",
    )


def small_dose(p):
    ptv = p.structure("PTV").mask
    oar = p.structure("Spinal cord").mask
    dose = np.where(ptv, 50.0, 5.0)
    # A gradient through the target: 48, 50, 51, 53 Gy along x; the OAR 10..17 Gy.
    dose[ptv] = np.tile(np.array([48.0, 50.0, 51.0, 53.0]), 16)
    dose[oar] = np.arange(10.0, 18.0)
    return dose


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PTV D95 >= 50 Gy", Goal("PTV", "D95", ">=", 50.0, "Gy")),
        ("PTV D95>=50Gy", Goal("PTV", "D95", ">=", 50.0, "Gy")),
        ("Spinal cord PRV Dmax <= 45 Gy", Goal("Spinal cord PRV", "Dmax", "<=", 45.0, "Gy")),
        ("Lung V20Gy <= 30 %", Goal("Lung", "V20Gy", "<=", 30.0, "%")),
        ("Lung V20Gy < 30", Goal("Lung", "V20Gy", "<", 30.0, "%")),
        ("Cord V45Gy <= 0.1 cc", Goal("Cord", "V45Gy", "<=", 0.1, "cc")),
        ("Core D10 <= 10 Gy (harder)", Goal("Core", "D10", "<=", 10.0, "Gy", "harder")),
        ("PTV D2 => 107 %", Goal("PTV", "D2", ">=", 107.0, "%")),
        ("PTV Dmean <= 52 gy", Goal("PTV", "Dmean", "<=", 52.0, "Gy")),
    ],
)
def test_goal_texts(text, expected):
    assert parse_goal(text) == expected


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("PTV D95x >= 50 Gy", "metric"),
        ("PTV D95 >= fifty Gy", "value"),
        ("PTV D95 = 50 Gy", "comparator"),
        ("PTV D95 50 Gy", "comparator"),
        ("Lung V20Gy <= 30 Gy", "unit"),
        ("PTV D95 >= 50 cc", "unit"),
        ("D95 >= 50 Gy", "structure or metric missing"),
    ],
)
def test_goal_text_errors_name_the_field(text, field):
    with pytest.raises(ValueError, match=field):
        parse_goal(text)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"structure": " "}, "Goal.structure"),
        ({"metric": "D95x"}, "Goal.metric"),
        ({"comparator": "=="}, "Goal.comparator"),
        ({"value": "x"}, "Goal.value"),
        ({"value": float("nan")}, "Goal.value"),
        ({"unit": "cc"}, "Goal.unit"),
    ],
)
def test_goal_fields_are_validated(kwargs, field):
    args = {"structure": "PTV", "metric": "D95", "comparator": ">=", "value": 50.0, "unit": "Gy"} | kwargs
    with pytest.raises(ValueError, match=field):
        Goal(**args)


def test_goal_checks_by_hand():
    p = small_patient()
    dose = small_dose(p)
    results = check_goals(dose, p, [
        "PTV D95 >= 48 Gy",  # D95 = d[floor(0.05 * 64) = 3] = 48
        "PTV D50 >= 51 Gy",  # d[32] = 51
        "PTV D2 <= 105 %",  # d[62] = 53 Gy = 106 % of 50
        "Spinal cord Dmax <= 17 Gy",  # 1 cc voxels: the hottest, 17
        "Spinal cord D2cc < 16 Gy",  # second-hottest, 16: fails
        "Spinal cord V15Gy <= 3 cc",  # 15, 16, 17
        "PTV V95% >= 100 %",  # all >= 47.5
    ], prescription_gy=50.0)
    achieved = [r.achieved for r in results]
    assert achieved == pytest.approx([48.0, 51.0, 106.0, 17.0, 16.0, 3.0, 100.0])
    assert [r.passed for r in results] == [True, True, False, True, False, True, True]


def test_goal_check_errors():
    p = small_patient()
    with pytest.raises(KeyError, match="Rectum"):
        check_goals(small_dose(p), p, ["Rectum Dmean <= 30 Gy"])
    with pytest.raises(ValueError, match="prescription"):
        check_goals(small_dose(p), p, ["PTV V95% >= 95 %"])
    with pytest.raises(ValueError, match="shape"):
        check_goals(np.zeros((2, 2, 2)), p, ["PTV D95 >= 48 Gy"])


def test_tg119_goals_fit_the_phantom():
    p = tg119("coarse")
    target = p.structure("OuterTarget").mask
    core = p.structure("Core").mask
    for core_gy, easier, harder in ((8.0, True, True), (20.0, True, False), (30.0, False, False)):
        dose = np.where(target, 52.0, np.where(core, core_gy, 0.0))
        r_easy = check_goals(dose, p, tg119_goals("easier"))
        r_hard = check_goals(dose, p, tg119_goals("harder"))
        assert all(r.passed for r in r_easy[:2])
        assert (r_easy[2].passed, r_hard[2].passed) == (easier, harder)
    assert [str(g) for g in tg119_goals()] == [
        "OuterTarget D95 >= 50 Gy", "OuterTarget D10 <= 55 Gy", "Core D10 <= 10 Gy (harder)"]
    with pytest.raises(ValueError, match="level"):
        tg119_goals("hardest")


def test_two_plans_side_by_side():
    p = small_patient()
    a = small_dose(p)
    b = a * 1.1
    cmp = compare_plans(a, b, p, prescription_gy=50.0, goals=["PTV D95 >= 50 Gy"], labels=("before", "after"))
    rows = {(s, m): (va, vb, dv) for s, m, _, va, vb, dv in cmp.rows}
    assert rows[("PTV", "D95")] == pytest.approx((48.0, 52.8, 4.8))
    assert rows[("Spinal cord", "Dmax")] == pytest.approx((17.0, 18.7, 1.7))
    assert rows[("PTV", "HI (ICRU 83)")][2] == pytest.approx(0.0)  # scaling keeps HI
    assert [r.passed for r in cmp.goals_a] == [False] and [r.passed for r in cmp.goals_b] == [True]
    md = cmp.to_markdown()
    assert "| Structure | Metric | before | after | after - before |" in md
    assert "| PTV | D95 | 48 Gy | 52.8 Gy | +4.8 Gy |" in md
    assert "| PTV D95 >= 50 Gy | 48 FAIL | 52.8 pass |" in md
    assert len(plan_metrics(a, p, prescription_gy=50.0)) == len(cmp.rows)
