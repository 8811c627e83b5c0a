"""The seed's beam's-eye-view frame (z along the central ray towards the source, x and y
turning with the collimator) against the IEC 61217 chain, both ways, by hand-computed cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ids_engine.model import PATIENT_POSITIONS, Beam
from ids_engine.model._bev import patient_to_seed_bev, seed_bev_to_isocentre_plane, seed_bev_to_patient

ISO = np.array([10.0, -20.0, 5.0])
SAD = 1000.0


def _beam(gantry=0.0, couch=0.0, collimator=0.0) -> Beam:
    return Beam("b", gantry_deg=gantry, couch_deg=couch, collimator_deg=collimator, isocentre_mm_xyz=tuple(ISO),
                sad_mm=SAD)


def test_seed_axes_at_zero_angles_hfs():
    """Beam pointed at the floor, collimator 0: x left to right for someone at the foot of
    the couch facing the gantry (the HFS patient's left, DICOM +x), y towards the gantry
    (superior, +z), z up towards the source (anterior, DICOM -y)."""
    b = _beam()
    for d_patient, expected in [((1, 0, 0), (1, 0, 0)), ((0, 0, 1), (0, 1, 0)), ((0, -1, 0), (0, 0, 1))]:
        got = patient_to_seed_bev(b, ISO + 7.0 * np.asarray(d_patient, float))
        np.testing.assert_allclose(got, 7.0 * np.asarray(expected, float), atol=1e-12)
    # The origin is the isocentre; the source lies on +z at the SAD.
    np.testing.assert_allclose(patient_to_seed_bev(b, ISO), 0.0, atol=1e-12)
    np.testing.assert_allclose(patient_to_seed_bev(b, b.source_mm_xyz()), (0, 0, SAD), atol=1e-9)


def test_x_and_y_turn_with_the_collimator():
    """Collimator 90 (counter-clockwise seen from the source): the seed's x now points where
    y pointed (superior), y where -x pointed (the patient's right); z unchanged."""
    b = _beam(collimator=90.0)
    np.testing.assert_allclose(patient_to_seed_bev(b, ISO + (0, 0, 4.0)), (4.0, 0, 0), atol=1e-12)
    np.testing.assert_allclose(patient_to_seed_bev(b, ISO + (-4.0, 0, 0)), (0, 4.0, 0), atol=1e-12)
    np.testing.assert_allclose(patient_to_seed_bev(b, ISO + (0, -4.0, 0)), (0, 0, 4.0), atol=1e-12)


@pytest.mark.parametrize("gantry, couch, collimator", [(0, 0, 0), (90, 0, 0), (33, 20, 71), (250, 300, 190)])
def test_z_lies_along_the_central_ray_towards_the_source(gantry, couch, collimator):
    b = _beam(gantry, couch, collimator)
    # Points on the central axis between isocentre and source have x = y = 0 and z = distance.
    for t in (0.0, 100.0, 600.0):
        p = ISO - t * b.direction_xyz()
        np.testing.assert_allclose(patient_to_seed_bev(b, p), (0, 0, t), atol=1e-9)


def test_point_entered_in_bev_gantry_90_hfs():
    """By hand: at gantry 90 the source is at the HFS patient's left (+x), X_g points down
    (posterior, DICOM +y) and Y_g superior; BEV (10, 20, 30) is 10 mm posterior, 20 mm
    superior and 30 mm to the left of the isocentre."""
    b = _beam(gantry=90.0)
    p = seed_bev_to_patient(b, (10.0, 20.0, 30.0))
    np.testing.assert_allclose(p, ISO + (30.0, 10.0, 20.0), atol=1e-9)
    np.testing.assert_allclose(patient_to_seed_bev(b, p), (10.0, 20.0, 30.0), atol=1e-9)


def test_point_entered_in_bev_matches_the_points_tools():
    ev = pytest.importorskip("ids_engine.evaluation")
    if not hasattr(ev, "point_from_bev"):
        pytest.skip("evaluation.point_from_bev not built")
    b = _beam(37.0, 15.0, 80.0)
    q = np.array([[12.0, -7.0, 40.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(seed_bev_to_patient(b, q, "FFP"), ev.point_from_bev(b, q, "FFP"), atol=1e-12)


@pytest.mark.parametrize("position", PATIENT_POSITIONS)
def test_round_trip_both_ways_all_positions(position):
    rng = np.random.default_rng(7)
    pts = rng.uniform(-150, 150, size=(50, 3))
    for g, c, k in itertools.product((0.0, 47.0, 180.0, 301.0), (0.0, 90.0, 335.0), (0.0, 15.0, 270.0)):
        b = _beam(g, c, k)
        bev = patient_to_seed_bev(b, pts, position)
        np.testing.assert_allclose(seed_bev_to_patient(b, bev, position), pts, atol=1e-9)
        # Distances are kept (a rigid frame), the isocentre is the origin.
        np.testing.assert_allclose(np.linalg.norm(bev, axis=1), np.linalg.norm(pts - ISO, axis=1), rtol=1e-12)


def test_projection_to_the_isocentre_plane_is_the_engines_bev():
    rng = np.random.default_rng(3)
    pts = rng.uniform(-100, 100, size=(20, 3))
    b = _beam(123.0, 10.0, 45.0)
    uvd = seed_bev_to_isocentre_plane(patient_to_seed_bev(b, pts), SAD)
    np.testing.assert_allclose(uvd, b.patient_to_bev(pts), rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="behind the source"):
        seed_bev_to_isocentre_plane((0.0, 0.0, SAD), SAD)
    with pytest.raises(ValueError, match="last axis of length 3"):
        seed_bev_to_patient(b, (1.0, 2.0))
