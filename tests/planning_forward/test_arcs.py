"""Arcs: the seed's Make-Conformed-Beams angles (0 and 360 not duplicated, stop before the
arc's end) and arcs simulated by equally spaced static beams at an adjusted increment."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.model import Beam
from ids_engine.planning._arcs import Arc, arc_angles, arc_direction, simulate_arcs


def test_seed_example_full_circle_every_40_degrees():
    np.testing.assert_allclose(arc_angles(0, 360, 40), [0, 40, 80, 120, 160, 200, 240, 280, 320])


@pytest.mark.parametrize("start, length, inc, direction, expected", [
    (30, 100, 40, "CW", [30, 70, 110]),            # the next (150) would pass the arc's end
    (30, 80, 40, "CW", [30, 70, 110]),             # the end itself is reached
    (30, 79.9, 40, "CW", [30, 70]),
    (350, 60, 20, "CW", [350, 10, 30, 50]),        # across 0
    (20, 60, 20, "CC", [20, 0, 340, 320]),         # counter-clockwise
    (90, 0, 10, "CW", [90]),                       # no length: one beam
    (0, 360, 50, "CW", [0, 50, 100, 150, 200, 250, 300, 350]),  # 360 not a multiple: no repeat either
    (45, 360, 90, "CC", [45, 315, 225, 135]),
])
def test_arc_angles(start, length, inc, direction, expected):
    got = arc_angles(start, length, inc, direction)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert len(np.unique(np.round(got % 360, 6))) == len(got)  # never a repeated angle


def test_no_duplicate_with_floating_point_increments():
    got = arc_angles(0, 360, 360 / 7)
    assert len(got) == 7
    np.testing.assert_allclose(np.diff(got), 360 / 7)


def test_bad_arcs_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 360\]"):
        arc_angles(0, 400, 10)
    with pytest.raises(ValueError, match="positive"):
        arc_angles(0, 100, 0)
    with pytest.raises(ValueError, match="CW or CC"):
        arc_direction("up")
    assert arc_direction("ccw") == -1 and arc_direction("cw") == 1


def test_increment_adjusted_to_fit_the_arc_length():
    arc = Arc(Beam("A1", gantry_deg=10.0), 100.0, "CW")
    # 100 / 30 = 3.33 -> 4 sub-arcs of 25 degrees (never coarser than the plan's increment).
    assert arc.n_sub_arcs(30.0) == 4 and arc.spacing_deg(30.0) == pytest.approx(25.0)
    assert arc.n_sub_arcs(25.0) == 4 and arc.n_sub_arcs(20.0) == 5
    angles, w = arc.static_angles(30.0)
    np.testing.assert_allclose(angles, [22.5, 47.5, 72.5, 97.5])
    np.testing.assert_allclose(w, 1 / 4)
    # The trapezoid rule: beams at both ends too, half weight there.
    angles, w = arc.static_angles(40.0, "ends")
    np.testing.assert_allclose(angles, 10 + np.arange(4) * 100 / 3)
    np.testing.assert_allclose(w, [1 / 6, 1 / 3, 1 / 3, 1 / 6])
    assert arc.stop_deg == 110.0


@pytest.mark.parametrize("length, inc", [(360, 10), (360, 7), (200, 15), (45, 10), (5, 10), (359, 40)])
@pytest.mark.parametrize("rule", ["midpoint", "ends"])
def test_static_beams_are_equally_spaced_and_weighted_to_one(length, inc, rule):
    arc = Arc(Beam("A", gantry_deg=300.0), length, "CC")
    angles, w = arc.static_angles(inc, rule)
    assert w.sum() == pytest.approx(1.0)
    # Unwrapped along the arc (counter-clockwise: decreasing angles).
    along = (300.0 - angles) % 360.0
    steps = np.diff(along)
    np.testing.assert_allclose(steps, arc.spacing_deg(inc), atol=1e-9)
    assert arc.spacing_deg(inc) <= inc + 1e-9
    assert arc.spacing_deg(inc) > inc / 2 or length < inc  # the fewest sub-arcs that fit
    assert along.max() <= length + 1e-9
    assert len(np.unique(np.round(angles, 6))) == len(angles)  # 0 and 360 never both


def test_full_circle_ends_rule_starts_at_the_start_without_repeating():
    arc = Arc(Beam("A", gantry_deg=0.0), 360.0)
    angles, w = arc.static_angles(40.0, "ends")
    np.testing.assert_allclose(angles, np.arange(0, 360, 40))
    np.testing.assert_allclose(w, 1 / 9)
    angles, _ = arc.static_angles(40.0)
    np.testing.assert_allclose(angles, np.arange(20, 360, 40))


def test_static_beams_share_the_arcs_settings():
    base = Beam("Arc 1", gantry_deg=180.0, couch_deg=10.0, collimator_deg=30.0, isocentre_mm_xyz=(1, 2, 3), energy_mv=10)
    beams = Arc(base, 90.0, "CW").static_beams(30.0)
    assert [b.name for b in beams] == ["Arc 1 1/3", "Arc 1 2/3", "Arc 1 3/3"]
    np.testing.assert_allclose([b.gantry_deg for b in beams], [195, 225, 255])
    for b in beams:
        assert (b.couch_deg, b.collimator_deg, b.isocentre_mm_xyz, b.energy_mv) == (10.0, 30.0, (1.0, 2.0, 3.0), 10.0)


def test_several_arcs_at_one_plan_increment():
    arcs = [Arc(Beam("A", gantry_deg=0.0), 360.0), Arc(Beam("B", gantry_deg=90.0), 50.0, "CC")]
    beams, w, owner = simulate_arcs(arcs, 20.0)
    assert len(beams) == 18 + 3  # 360/20, and 50/20 = 2.5 -> 3 sub-arcs of 16.7 degrees
    np.testing.assert_allclose([w[owner == k].sum() for k in (0, 1)], 1.0)
    assert arcs[1].spacing_deg(20.0) == pytest.approx(50 / 3)
    np.testing.assert_allclose([b.gantry_deg for b in beams[18:]], 90 - (np.arange(3) + 0.5) * 50 / 3)
    with pytest.raises(ValueError, match="rule"):
        arcs[0].static_angles(10, "simpson")
