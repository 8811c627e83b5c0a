"""The shaping goals on the clinical horseshoe (1.95 x 1.95 x 2 mm, 9 beams): the paper's
experiment to the letter, and an isodose drag that lands where it was dragged."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr import MoveIsodoseLine, SetVoxelDose
from ids_engine.evaluation import beside_shift_mm, drag_landing_mm
from ids_engine.session import Session

RX = 60.0
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s():
    return Session.from_phantom("horseshoe", "clinical", prescription_gy=RX)


def rim(s):
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    return (int(c[0]), j, int(c[2]))


def test_paper_experiment_to_the_letter(s):
    """Section 3.1: m to 55 %, 25 recovery steps: all target voxels >= 95 %, m within 1 %,
    and the state kept is the best one reached."""
    ptv = s.patient.structure("PTV").mask
    m = rim(s)
    res = s.run(SetVoxelDose(m, 0.55 * RX))
    try:
        d = s.dose()
        assert d[ptv].min() >= 0.95 * RX
        assert abs(d[m] - 0.55 * RX) <= 0.01 * 0.55 * RX
        assert res.recovery_steps <= 25
        assert not [c for c in res.conflicts if c.kind != "rise"]  # far entrance rises are reported, not given up
    finally:
        s.undo()
        s.clear_redo()


def test_line_drag_lands_within_a_millimetre(s):
    """The 95 % line at the target's anterior edge dragged 5 mm outwards on the central slice:
    it ends within 1 mm of the drag end and moves less than 1 mm 10 mm beside the drag."""
    level = 0.95 * RX
    d = s.dose()
    sp = s.patient.grid.spacing_mm_zyx
    k, _, i = rim(s)
    ptv = s.patient.structure("PTV").mask
    j0 = int(np.flatnonzero(ptv[k, :, i]).min())
    prof = d[k, :, i]
    jj = [jj for jj in range(j0 - 8, j0 + 4) if prof[jj] < level <= prof[jj + 1]][0]
    start = (jj + (level - prof[jj]) / (prof[jj + 1] - prof[jj]), float(i))
    end = (start[0] - 5.0 / sp[1], float(i))
    s.run(MoveIsodoseLine("z", k, level, start, end))
    try:
        after = s.dose()
        land = drag_landing_mm(after, sp, (k, *start), (k, *end), level)
        assert land is not None and land <= 1.0
        beside = beside_shift_mm(d, after, sp, (k, *start), (k, *end), level, 10.0, plane_axis=0)
        assert beside and max(beside) < 1.0
    finally:
        s.undo()
        s.clear_redo()


def test_drag_the_beams_cannot_make_is_refused_up_front(s):
    """With m held at 30 %, the 95 % line dragged to the voxel next to m (1.95 mm away) would
    need a fall of about 38 Gy in 1.95 mm; with no dose above 64.2 Gy the steepest any beam
    can make there is about 28 Gy (a pencil's penumbra): refused before anything changes,
    naming the request that holds m. The same drag stopped 3 voxels short (5.9 mm from m) runs."""
    from ids_engine.dmr import RequestError

    m = rim(s)
    first = s.run(SetVoxelDose(m, 0.30 * RX))
    try:
        k, j, i = m
        level = 0.95 * RX
        prof = s.dose()[k, :, i]
        jj = [r for r in range(j - 10, j) if prof[r] >= level > prof[r + 1]][-1]
        start = (jj + (prof[jj] - level) / (prof[jj] - prof[jj + 1]), float(i))
        before, n = s.dose(), len(s.journal)
        with pytest.raises(RequestError, match=rf"cannot make that fall-off\. Request {first.id} \(set voxel dose\) "
                                                 rf"holds voxel \(z {k}, y {j}, x {i}\) at or below 19\.2 Gy"):
            s.run(MoveIsodoseLine("z", k, level, start, (j - 1.0, float(i))))
        assert len(s.journal) == n and np.array_equal(s.dose(), before)
        if start[0] < j - 3.0:
            s.run(MoveIsodoseLine("z", k, level, start, (j - 3.0, float(i))))  # possible: runs
            s.undo()
    finally:
        s.undo()
        s.clear_redo()


def test_recovery_does_not_throw_its_work_away_to_keep_the_request():
    """The ten-request session turned 10 deg, request 2 (found by the goal-6 experiments): the
    modification leaves the target at 77 %; every recovery step then raises the cold target
    beside m and m with it, a few tenths of a Gy outside its band, while J falls from ~5600 to
    ~13. The best state ranks the request's voxel first, so recovery used to go back to the
    state before its first step (target minimum 77.3 %). The request touch-up starts from the
    lowest-J state and solves for m alone: m in its band and the target near coverage."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_shaping as bench

    s = Session.from_phantom("horseshoe", "clinical", prescription_gy=RX)
    try:
        spots = bench.SESSION_VARIANTS["turned +10 deg"][:2]
        for dz, ang in spots:
            m = bench.oar_rim_voxel(s, dz, ang)
            res = s.run(SetVoxelDose(m, 0.55 * RX))
        d = s.dose()
        ptv = s.patient.structure("PTV").mask
        assert "recovery_request_touchup" in res.timings_ms  # the touch-up ran
        assert res.best_step != 0
        assert abs(d[m] - 0.55 * RX) <= s.options.tolerance_pct / 100 * RX
        assert d[ptv].min() >= 0.90 * RX  # 77.3 % without the touch-up
        assert not [c for c in res.conflicts if c.kind in ("request", "pin")]
    finally:
        s.close()
