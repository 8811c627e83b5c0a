"""Contour transfer and the limited-field-of-view merge."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.model import Grid
from ids_engine.registration import (
    Registration,
    RegistrationError,
    fov_mask,
    identity_registration,
    make_variant,
    merge_limited_fov,
    transfer_structures,
)


def test_transfer_with_the_true_mapping_gives_the_true_structures(deformed):
    bare = deformed.patient.without_structures(*deformed.patient.structure_names)
    out = transfer_structures(deformed.planning, bare, deformed.truth)
    assert out.structure_names == deformed.planning.structure_names
    assert out.meta["transferred"] == "deformable"
    for s in out.structures:
        src = deformed.planning.structure(s.name)
        assert s.kind == src.kind and s.colour == src.colour and s.grid == deformed.patient.grid
        assert s.meta["transferred"] == "deformable"
        np.testing.assert_array_equal(s.mask, deformed.patient.structure(s.name).mask)
    np.testing.assert_array_equal(out.ct_hu, deformed.patient.ct_hu)


def test_transfer_of_a_known_shift_replaces_same_named_structures(hs):
    dz, dy, dx = hs.grid.spacing_mm_zyx
    reg = Registration("rigid", hs.grid, hs.grid, np.eye(3), (0.0, 2 * dy, 0.0))
    out = transfer_structures(hs, hs, reg, names=["OAR"])
    assert out.structure_names == ("PTV", "BODY", "OAR")
    expected = np.zeros_like(hs.structure("OAR").mask)
    expected[:, 2:, :] = hs.structure("OAR").mask[:, :-2, :]
    np.testing.assert_array_equal(out.structure("OAR").mask, expected)
    np.testing.assert_array_equal(out.structure("PTV").mask, hs.structure("PTV").mask)


def test_merge_takes_new_hu_inside_and_registered_planning_outside(hs):
    spec = dict(shift_mm_xyz=(3.0, -2.0, 2.0), rotation_deg_xyz=(0.0, 0.0, 2.0), seed=4)
    full = make_variant(hs, **spec)
    fov = make_variant(hs, fov_mm=(150.0, 150.0, 90.0), **spec)
    inside = fov_mask(fov.patient)
    merged = merge_limited_fov(fov.planning, fov.patient, fov.truth)
    np.testing.assert_array_equal(merged.ct_hu[inside], fov.patient.ct_hu[inside])
    np.testing.assert_array_equal(merged.ct_hu[~inside], fov.truth.warp_to_new(fov.planning.ct_hu, fill=-1000.0)[~inside])
    # With the true mapping the merged CT is the full new CT.
    np.testing.assert_allclose(merged.ct_hu, full.patient.ct_hu, atol=1e-3)
    assert "fov_box_mm_xyz" not in merged.meta
    assert merged.meta["merged_fov"]["voxels_from_new"] == int(inside.sum())


def test_merge_after_rigid_registration_of_the_limited_view(hs):
    pytest.importorskip("SimpleITK")
    from ids_engine.registration import register_rigid

    spec = dict(shift_mm_xyz=(3.0, -2.0, 2.0), rotation_deg_xyz=(0.0, 0.0, 2.0), seed=4)
    full = make_variant(hs, **spec)
    fov = make_variant(hs, fov_mm=(150.0, 150.0, 90.0), **spec)
    reg = register_rigid(fov.planning, fov.patient)
    merged = merge_limited_fov(fov.planning, fov.patient, reg)
    body = full.patient.structure("BODY").mask
    # Outside the view the body comes from the planning CT: its outline lands where it is, to
    # the registration's accuracy (about 1 mm at worst here; 4 mm voxels on the outline flip).
    merged_body = merged.ct_hu > -500
    assert (merged_body & body).sum() / body.sum() > 0.95
    assert (merged_body & ~body).sum() / body.sum() < 0.05
    assert np.abs(merged.ct_hu - full.patient.ct_hu)[body].mean() < 10.0


def test_transfer_and_merge_errors(hs, moved):
    other = identity_registration(Grid((4, 4, 4), (1.0, 1.0, 1.0)), hs.grid)
    with pytest.raises(RegistrationError, match="planning grid"):
        transfer_structures(hs, hs, other)
    with pytest.raises(RegistrationError, match="new grid"):
        transfer_structures(hs, hs, identity_registration(hs.grid, Grid((4, 4, 4), (1.0, 1.0, 1.0))))
    with pytest.raises(KeyError, match="no structure 'Lung'"):
        transfer_structures(hs, hs, identity_registration(hs.grid, hs.grid), names=["Lung"])
    with pytest.raises(RegistrationError, match="no limited field of view"):
        merge_limited_fov(moved.planning, moved.patient, moved.truth)
    with pytest.raises(RegistrationError, match="fov mask shape"):
        merge_limited_fov(moved.planning, moved.patient, moved.truth, fov=np.ones((2, 2, 2), bool))
    with pytest.raises(RegistrationError, match="registration must be"):
        merge_limited_fov(moved.planning, moved.patient, "rigid")
