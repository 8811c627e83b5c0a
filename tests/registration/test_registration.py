"""The Registration value: point mapping, warping, inverse, files (no SimpleITK needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ids_engine.model import Grid
from ids_engine.registration import (
    Registration,
    RegistrationError,
    identity_registration,
    invert_displacement,
    rotation_angles_deg,
    rotation_matrix,
)


def test_rotation_matrix_axes_and_angles_round_trip(rng):
    # 90 degrees about z takes +x to +y (right-handed, counter-clockwise looking down +z).
    np.testing.assert_allclose(rotation_matrix((0, 0, 90)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(rotation_matrix((90, 0, 0)) @ [0, 1, 0], [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(rotation_matrix((0, 90, 0)) @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    for _ in range(20):
        a = rng.uniform(-80, 80, 3)
        np.testing.assert_allclose(rotation_angles_deg(rotation_matrix(a)), a, atol=1e-9)


def test_identity_maps_points_and_volumes_unchanged(hs):
    reg = identity_registration(hs.grid, hs.grid)
    pts = np.array([[1.0, 2.0, 3.0], [-40.0, 10.0, 20.0]])
    np.testing.assert_array_equal(reg.map_points_xyz(pts), pts)
    np.testing.assert_array_equal(reg.map_points_to_planning_xyz(pts), pts)
    np.testing.assert_array_equal(reg.warp_to_new(hs.ct_hu), hs.ct_hu)
    np.testing.assert_array_equal(reg.warp_mask_to_new(hs.structure("PTV").mask), hs.structure("PTV").mask)


def test_known_shift_warps_mask_to_the_shifted_mask(hs):
    dz, dy, dx = hs.grid.spacing_mm_zyx
    # Anatomy moves +1 voxel in x, -2 in y, +1 in z.
    reg = Registration("rigid", hs.grid, hs.grid, np.eye(3), (dx, -2 * dy, dz))
    mask = hs.structure("PTV").mask
    expected = np.zeros_like(mask)
    expected[1:, :-2, 1:] = mask[:-1, 2:, :-1]
    np.testing.assert_array_equal(reg.warp_mask_to_new(mask), expected)
    # CT: new voxels whose planning source lies outside the grid get the fill.
    ct = reg.warp_to_new(hs.ct_hu, fill=-1000.0)
    np.testing.assert_array_equal(ct[1:, :-2, 1:], hs.ct_hu[:-1, 2:, :-1])
    assert np.all(ct[0] == -1000.0)
    back = reg.resample_to_planning(ct, fill=-1000.0)
    np.testing.assert_array_equal(back[:-1, 2:, :-1], hs.ct_hu[:-1, 2:, :-1])


def test_warp_between_different_grids_samples_the_mapped_point(rng):
    # A linear ramp is reproduced exactly by trilinear interpolation, so the warped value at
    # each new voxel must equal the ramp at the mapped planning point.
    gp = Grid((30, 32, 34), (2.0, 2.5, 3.0), (-50.0, -40.0, -30.0))
    gn = Grid((20, 22, 24), (2.5, 2.0, 2.0), (-20.0, -25.0, -22.0))
    reg = Registration("rigid", gp, gn, rotation_matrix((3, -4, 10)), (2.0, -1.0, 3.5))
    coef = np.array([0.3, -0.7, 1.1])
    ramp = gp.voxel_centres_xyz() @ coef
    warped = reg.warp_to_new(ramp, fill=np.nan)
    expected = reg.map_points_to_planning_xyz(gn.voxel_centres_xyz()) @ coef
    np.testing.assert_allclose(warped, expected, atol=1e-9)
    # The new-grid centres map inside the planning grid here.
    assert np.isfinite(warped).all()


def test_rigid_points_round_trip(rng):
    g = Grid((10, 10, 10), (2.0, 2.0, 2.0))
    reg = Registration("rigid", g, g, rotation_matrix((10, 20, -30)), (5.0, -3.0, 7.0))
    p = rng.uniform(-50, 50, (100, 3))
    q = reg.map_points_xyz(p)
    np.testing.assert_allclose(reg.map_points_to_planning_xyz(q), p, atol=1e-10)
    np.testing.assert_allclose(q, p @ reg.rotation.T + reg.translation_mm_xyz)
    inv = reg.inverted()
    np.testing.assert_allclose(inv.map_points_xyz(q), p, atol=1e-10)


def test_deformable_truth_round_trips_points(deformed):
    truth = deformed.truth
    assert truth.is_deformable
    # Points inside the body, where the deformation acts.
    body = deformed.planning.structure("BODY").mask
    idx = np.argwhere(body)[::37]
    p = truth.planning_grid.index_to_world(idx)
    q = truth.map_points_xyz(p)
    back = truth.map_points_to_planning_xyz(q)
    err = np.linalg.norm(back - p, axis=1)
    # Two trilinearly interpolated fields on a 4 mm grid: the round trip is good to the
    # fields' interpolation error (h^2/8 |w''|), a few tenths of a mm at worst.
    assert err.mean() < 0.05 and err.max() < 0.4, (err.mean(), err.max())
    # The deformation is real: points move by up to about the requested 4 mm beyond the rigid part.
    rigid = p @ truth.rotation.T + truth.translation_mm_xyz
    # (4 mm each; where the OAR push and the target pull add up, the sum.)
    assert 3.0 < np.linalg.norm(q - rigid, axis=1).max() < 8.0


def test_invert_displacement_of_a_smooth_field():
    g = Grid((20, 24, 28), (3.0, 3.0, 3.0), (-40.0, -35.0, -30.0))
    c = g.voxel_centres_xyz()
    d = np.zeros(c.shape)
    d[..., 0] = 3.0 * np.sin(c[..., 1] / 15.0)
    d[..., 2] = 2.0 * np.cos(c[..., 0] / 20.0)
    e, info = invert_displacement(d, g)
    assert info["inverse_residual_max_mm"] < 0.05
    # Round trip through two trilinearly interpolated fields: within a tenth of a mm on a
    # 3 mm grid for this field (curvature up to 3/15^2 per mm).
    # x -> x + d(x) -> + e(...) returns to x.
    pts = c.reshape(-1, 3)[::7]
    from ids_engine.registration._registration import sample_field

    y = pts + sample_field(d, g, pts)
    inside = g.contains(y)
    back = y + sample_field(e, g, y)
    assert np.abs(back[inside] - pts[inside]).max() < 0.1


def test_save_load_round_trip(tmp_path, deformed, moved):
    for reg, name in ((moved.truth, "rigid"), (deformed.truth, "deformable")):
        folder = tmp_path / name
        reg.save(folder)
        back = Registration.load(folder)
        assert back.kind == reg.kind and back.new_grid == reg.new_grid and back.planning_grid == reg.planning_grid
        np.testing.assert_array_equal(back.rotation, reg.rotation)
        np.testing.assert_array_equal(back.translation_mm_xyz, reg.translation_mm_xyz)
        if reg.is_deformable:
            np.testing.assert_array_equal(back.displacement_mm_xyz, reg.displacement_mm_xyz)
            np.testing.assert_array_equal(back.inverse_displacement_mm_xyz, reg.inverse_displacement_mm_xyz)
        json.dumps(back.summary())
    s = moved.truth.summary()
    np.testing.assert_allclose(s["rotation_deg_xyz"], [1.0, -2.0, 4.0], atol=1e-9)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(RegistrationError, match="no registration file"):
        Registration.load(tmp_path)
    (tmp_path / "registration.json").write_text('{"format": "something else"}')
    with pytest.raises(RegistrationError, match="registration.json: format"):
        Registration.load(tmp_path)


def test_bad_input_is_refused(hs):
    g = hs.grid
    with pytest.raises(RegistrationError, match="kind"):
        Registration("affine", g, g)
    with pytest.raises(RegistrationError, match="proper rotation"):
        Registration("rigid", g, g, np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(RegistrationError, match="translation_mm_xyz"):
        Registration("rigid", g, g, np.eye(3), (1.0, 2.0))
    with pytest.raises(RegistrationError, match="displacement_mm_xyz must have shape"):
        Registration("deformable", g, g, displacement_mm_xyz=np.zeros((3, 3, 3, 3)))
    reg = identity_registration(g, g)
    with pytest.raises(RegistrationError, match="planning grid"):
        reg.warp_to_new(np.zeros((2, 2, 2)))
    with pytest.raises(RegistrationError, match="new grid"):
        reg.resample_to_planning(np.zeros((2, 2, 2)))
    with pytest.raises(RegistrationError, match=r"\(\.\.\., 3\)"):
        reg.map_points_xyz(np.zeros((4, 2)))
    with pytest.raises(RegistrationError, match="order"):
        reg.warp_to_new(hs.ct_hu, order=2)
