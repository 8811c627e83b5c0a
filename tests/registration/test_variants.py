"""Test cases with known transforms (make_variant, variant_from_spec)."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.registration import RegistrationError, make_variant, variant_from_spec
from ids_engine.registration._variants import MARKER_HU


def test_shift_only_variant_moves_ct_structures_and_markers(hs):
    dz, dy, dx = hs.grid.spacing_mm_zyx
    v = make_variant(hs, shift_mm_xyz=(2 * dx, 0.0, -dz), markers=3, seed=1)
    # Whole-voxel shift: the new CT is the planning CT moved 2 voxels in +x and 1 in -z.
    np.testing.assert_array_equal(v.patient.ct_hu[:-1, :, 2:], v.planning.ct_hu[1:, :, :-2])
    np.testing.assert_array_equal(v.patient.structure("PTV").mask[:-1, :, 2:], hs.structure("PTV").mask[1:, :, :-2])
    assert set(v.fiducials_new_xyz) == {"M1", "M2", "M3"}
    for label, p in v.fiducials_planning_xyz.items():
        q = np.asarray(v.fiducials_new_xyz[label])
        np.testing.assert_allclose(q, np.asarray(p) + [2 * dx, 0.0, -dz], atol=1e-9)
        # The seed is visible at its true place in both CTs.
        assert v.planning.ct_hu[tuple(hs.grid.nearest_index(p))] == MARKER_HU
        assert v.patient.ct_hu[tuple(hs.grid.nearest_index(q))] == MARKER_HU
        assert v.planning.structure("PTV").mask[tuple(hs.grid.nearest_index(p))]
    # Uniform water phantom: tissue contrast added to the planning CT (targets +30, OAR +60 HU).
    assert v.planning.meta["tissue_contrast"]
    assert np.median(v.planning.ct_hu[hs.structure("OAR").mask]) == pytest.approx(60.0, abs=5.0)


def test_rotation_variant_keeps_volumes_and_rotates_about_the_target(moved, hs):
    truth = moved.truth
    centre = np.asarray(moved.spec["rotation_centre_mm_xyz"])
    np.testing.assert_allclose(truth.map_points_xyz(centre), centre + [3.0, -2.0, 1.5], atol=1e-9)
    for name, vols in moved.spec["volumes"].items():
        assert vols["new_cc"] == pytest.approx(vols["planning_cc"], rel=0.03), name


def test_deformed_variant_grows_the_oar_and_shrinks_the_target(deformed):
    vols = deformed.spec["volumes"]
    # 4 mm on a 25 mm sphere is about +50 % volume; 4 mm off a 30 mm thick C-shape about -40 %.
    assert vols["OAR"]["new_cc"] > 1.3 * vols["OAR"]["planning_cc"]
    assert vols["PTV"]["new_cc"] < 0.8 * vols["PTV"]["planning_cc"]
    assert vols["BODY"]["new_cc"] == pytest.approx(vols["BODY"]["planning_cc"], rel=0.01)
    assert deformed.truth.kind == "deformable"
    assert deformed.truth.metrics["inverse_residual_max_mm"] < 0.05


def test_limited_fov_variant_is_air_outside_its_box(hs):
    v = make_variant(hs, shift_mm_xyz=(1.0, 0.0, 0.0), fov_mm=(140.0, 140.0, 80.0), markers=False)
    box = np.asarray(v.patient.meta["fov_box_mm_xyz"])
    np.testing.assert_allclose(box[:, 1] - box[:, 0], [140.0, 140.0, 80.0])
    from ids_engine.registration import fov_mask

    inside = fov_mask(v.patient)
    assert inside.any() and not inside.all()
    assert np.all(v.patient.ct_hu[~inside] == -1000.0)
    assert np.all(v.patient.ct_hu[inside & v.patient.structure("BODY").mask] > -500.0)
    # The true structures are complete (also outside the box).
    assert v.patient.structure("BODY").mask[~inside].any()


def test_spec_parses_and_names_bad_fields():
    v = variant_from_spec("horseshoe:coarse;shift_mm=3,-2,0;rotate_deg=0,0,4;markers=3;seed=2")
    assert v.spec["shift_mm_xyz"] == [3.0, -2.0, 0.0] and v.spec["rotation_deg_xyz"] == [0.0, 0.0, 4.0]
    assert len(v.fiducials_planning_xyz) == 3
    for text, msg in [
        ("", "empty"),
        ("nothing:coarse", "phantom 'nothing'"),
        ("horseshoe:fine", "resolution"),
        ("horseshoe:coarse;shift_mm=3,2", "shift_mm: expected 3"),
        ("horseshoe:coarse;rotate_deg=a,b,c", "rotate_deg: expected numbers"),
        ("horseshoe:coarse;colour=red", "unknown field 'colour'"),
        ("horseshoe:coarse;markers=two", "markers: expected an integer"),
        ("horseshoe:coarse;oar_grow_mm", "expected key=value"),
        ("horseshoe:coarse;oar_grow_mm=-1", "oar_grow_mm must be"),
        ("horseshoe:coarse;target_shrink_mm=30", "fold"),
        ("horseshoe:coarse;markers=2", "count >= 3"),
    ]:
        with pytest.raises(RegistrationError, match=msg):
            variant_from_spec(text)
