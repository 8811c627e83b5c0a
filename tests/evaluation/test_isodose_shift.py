"""Where an isodose lies and how far it moved (the shaping benchmark's landing and beside
measures)."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.evaluation import beside_shift_mm, drag_landing_mm


def _profile_cube(profile_x: np.ndarray) -> np.ndarray:
    return np.broadcast_to(profile_x[None, None, :], (3, 11, profile_x.size)).astype(np.float64).copy()


def test_a_rigid_shift_is_measured_exactly():
    x = np.arange(40, dtype=float)
    before = _profile_cube(100.0 - 2.0 * x)  # 60 Gy at x = 20
    after = _profile_cube(100.0 - 2.0 * (x - 3.0))  # moved 3 voxels towards +x
    sp = (1.0, 1.0, 1.0)
    assert drag_landing_mm(after, sp, (1, 5, 20), (1, 5, 23), 60.0) == pytest.approx(0.0, abs=1e-6)
    assert beside_shift_mm(before, after, sp, (1, 5, 20), (1, 5, 23), 60.0, 2.0, plane_axis=0) == \
        pytest.approx([3.0, 3.0], abs=1e-6)


def test_a_dip_in_a_plateau_beside_is_not_the_line_moving():
    # The level is crossed once, at x = 10; beyond, the dose rises to 70 Gy and comes back down
    # to a plateau just above the level (x = 19..26). A 0.1 Gy dip there makes new crossings
    # nearer the start point (x = 15) than the line is: the line itself did not move.
    x = np.arange(40, dtype=float)
    before = np.interp(x, [0, 10, 15, 19, 26, 39], [50.0, 60.0, 70.0, 60.05, 60.05, 70.0])
    after = np.where((x >= 19) & (x <= 26), before - 0.1, before)
    sp = (1.0, 1.0, 1.0)
    shift = beside_shift_mm(_profile_cube(before), _profile_cube(after), sp, (1, 5, 15), (1, 5, 17), 60.0, 2.0,
                            plane_axis=0)
    assert shift == pytest.approx([0.0, 0.0], abs=1e-6)
