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
