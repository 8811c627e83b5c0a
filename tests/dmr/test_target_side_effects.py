"""A far target voxel that rose unasked counts as a side effect even where it stays inside the
target's band (goal 2 counts every voxel outside the request): it is reported, saying that it
stayed inside the band, and the repair's second stage (``RepairSettings.target_in_band``) takes it back
under the report line when it can (here its focused passes, with the LP repair off). Coarse horseshoe, report line and repair cap lowered to
1.5 % / 1.2 % of Rx so that the coarse plan's drags cross them (clinical survey: 5 % / 4.5 %)."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr import MoveIsodoseSurface
from ids_engine.dmr._side_effects import FarRise, summarise_rises, unasked_rises
from .conftest import assert_nothing_given_up, far_unasked, run_with_each, set_repair

pytestmark = pytest.mark.usefixtures("ring_as_found")  # the drags were found with the ring as it was

RX = 60.0
REPORT_PCT, CAP_PCT = 1.5, 1.2
# A drag of the coarse survey (bench_shaping.survey_requests on the coarse open-field plan):
# it raises target voxels far away, inside their band, and normal tissue; the repair's first
# stage (the rise outside the band only) is rejected, the second takes both under the line.
SURFACE = MoveIsodoseSurface(level_gy=57.0, start_zyx=(21.0, 41.13396875373677, 32.41709960450194),
                             end_zyx=(21.0, 42.24312014178036, 31.776730752042926), radius_mm=4.0)


def test_a_target_rise_inside_the_band_is_reported_then_repaired(fresh, monkeypatch):
    s = fresh
    before = s.dose()
    thr = REPORT_PCT / 100.0 * RX
    # The LP repair takes this drag's whole rise under the line in the first stage; off, the
    # first stage fails and the second stage's focused passes are what is tested here.
    set_repair(monkeypatch, s, lp="off")
    # (undo takes every pass back, bit for bit: run_with_each asserts it)
    (plain, plain_dose, _), (fixed, fixed_dose, _) = run_with_each(
        s, SURFACE, monkeypatch, "target_in_band", (False, True))
    # Without the second stage: target voxels, all still inside their band, rose more than
    # the report line unasked; that is reported (as a side effect of its own), and says so.
    u = far_unasked(s, plain, before, plain_dose)
    over = (u.unasked_gy > thr) & (u.tissue == 0)
    assert over.any()
    assert np.all(plain_dose.ravel()[u.voxels[over]] <= s.options.target_max_pct / 100.0 * RX)
    (rise,) = [c for c in plain.conflicts if c.kind == "rise" and c.name.startswith("target ")]
    assert rise.voxels == int(over.sum())
    assert rise.worst_gy == pytest.approx(float(u.unasked_gy[over].max()), abs=1e-4)
    assert rise.detail.startswith("all inside the target's band")
    assert not plain.side_effects_repaired
    # With it: under the report line everywhere on the whole cube, nothing reported ...
    assert fixed.side_effects_repaired
    assert far_unasked(s, fixed, before, fixed_dose).max_gy() <= thr + 1e-6
    assert not [c for c in fixed.conflicts if c.kind == "rise"]
    # ... and nothing recovery keeps given up for it.
    assert_nothing_given_up(plain, fixed, fixed_dose, RX)


def test_the_target_line_counts_the_voxels_above_the_band():
    shape = (3, 4, 5)
    u = unasked_rises(np.array([0, 1, 2, 40]), np.array([4.0, 5.0, 6.0, 7.0]), shape_zyx=shape,
                      spacing_mm_zyx=(5.0, 5.0, 5.0), feature_voxels=np.array([59]),
                      before_at=lambda f: np.full(np.size(f), 58.0),
                      target_mask=np.ones(shape, bool), oar_mask=np.zeros(shape, bool))
    np.testing.assert_allclose(u.after_gy, [62.0, 63.0, 64.0, 65.0])
    (t,) = summarise_rises(u, 3.0, shape, target_hi_gy=63.5)
    assert (t.tissue, t.voxels, t.above_band, t.highest_gy) == ("target", 4, 2, 65.0)
    (t,) = summarise_rises(u, 4.5, shape, target_hi_gy=70.0)
    assert (t.voxels, t.above_band, t.highest_gy) == (3, 0, 65.0)
    assert summarise_rises(u, 3.0, shape)[0] == FarRise("target", 4, 7.0, (2, 0, 0), t.distance_mm)
