"""Rigid intensity registration (SimpleITK) against known transforms."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.registration import RegistrationCancelled, register_fiducials, register_rigid
from ids_engine.registration._registration import rotation_angle_deg

sitk = pytest.importorskip("SimpleITK")


def _errors(reg, truth, mask, grid):
    """(translation error at the target's points, mm; rotation error, degrees)."""
    pts = grid.index_to_world(np.argwhere(mask))
    err = np.linalg.norm(reg.map_points_xyz(pts) - truth.map_points_xyz(pts), axis=1)
    rot = rotation_angle_deg(reg.rotation @ truth.rotation.T)
    return float(err.max()), rot


def test_rigid_recovers_shift_and_rotation(moved):
    calls = []
    reg = register_rigid(moved.planning, moved.patient, progress=lambda d, t, s: calls.append((d, t)))
    assert reg.kind == "rigid" and reg.metrics["iterations"] > 0
    err_mm, rot_deg = _errors(reg, moved.truth, moved.planning.structure("PTV").mask, moved.planning.grid)
    # Measured: 0.25 mm at worst over the PTV, 0.09 degree (coarse horseshoe, 3.9 mm voxels).
    assert err_mm < 1.0 and rot_deg < 1.0, (err_mm, rot_deg)
    np.testing.assert_allclose(reg.translation_mm_xyz, moved.truth.translation_mm_xyz, atol=1.0)
    assert calls and calls[-1][0] == calls[-1][1]


def test_rigid_direction_conventions_on_a_pure_shift(hs):
    from ids_engine.registration import make_variant

    v = make_variant(hs, shift_mm_xyz=(6.0, 0.0, 0.0), markers=False)
    reg = register_rigid(v.planning, v.patient, samples=10000)
    # Planning anatomy at the origin appears at +6 mm x in the new CT (not at -6 mm).
    np.testing.assert_allclose(reg.map_points_xyz([0.0, 0.0, 0.0]), [6.0, 0.0, 0.0], atol=0.5)
    np.testing.assert_allclose(reg.map_points_to_planning_xyz([6.0, 0.0, 0.0]), [0.0, 0.0, 0.0], atol=0.5)


def test_fiducials_from_the_variant_match_the_truth(moved):
    reg = register_fiducials(moved.fiducials_planning_xyz, moved.fiducials_new_xyz,
                             planning_grid=moved.planning.grid, new_grid=moved.patient.grid)
    np.testing.assert_allclose(reg.rotation, moved.truth.rotation, atol=1e-6)
    np.testing.assert_allclose(reg.translation_mm_xyz, moved.truth.translation_mm_xyz, atol=1e-6)


def test_limited_fov_rigid(hs):
    from ids_engine.registration import make_variant

    v = make_variant(hs, shift_mm_xyz=(-3.0, 2.0, 2.0), rotation_deg_xyz=(0.0, 0.0, -3.0), fov_mm=(150, 150, 90))
    reg = register_rigid(v.planning, v.patient)
    assert reg.metrics["limited_fov"]
    err_mm, rot_deg = _errors(reg, v.truth, v.planning.structure("PTV").mask, v.planning.grid)
    # Only the box around the target informs it (soft-tissue window by default): measured
    # 0.3 mm at worst over the PTV (60 mm from the centre).
    assert reg.metrics["window_hu"] == [-200.0, 400.0]
    assert err_mm < 1.0 and rot_deg < 1.0, (err_mm, rot_deg)


def test_cancel_stops_the_registration(moved):
    with pytest.raises(RegistrationCancelled):
        register_rigid(moved.planning, moved.patient, cancel=lambda: True)


def test_bad_metric_is_refused(moved):
    from ids_engine.registration import RegistrationError

    with pytest.raises(RegistrationError, match="metric"):
        register_rigid(moved.planning, moved.patient, metric="correlation")


def test_rigid_between_different_grids(hs):
    """Origins and spacings reach SimpleITK correctly: a new CT on another grid registers."""
    from ids_engine.model import Grid
    from ids_engine.registration import make_variant

    g = hs.grid
    new_grid = Grid((40, 50, 70), (4.5, 4.2, 4.4), tuple(np.asarray(g.origin_mm_xyz) + [5.0, 3.0, -2.0]))
    v = make_variant(hs, shift_mm_xyz=(2.0, 3.0, -1.0), rotation_deg_xyz=(0.0, 2.0, -3.0), new_grid=new_grid)
    assert v.patient.grid == new_grid
    reg = register_rigid(v.planning, v.patient)
    assert reg.new_grid == new_grid and reg.planning_grid == g
    err_mm, rot_deg = _errors(reg, v.truth, v.planning.structure("PTV").mask, g)
    assert err_mm < 1.0 and rot_deg < 1.0, (err_mm, rot_deg)
