"""Beam geometry against IEC 61217, with hand-computed cases.

Conventions checked here (IEC 61217):

* Fixed system: +Y_f from the isocentre towards the gantry, +Z_f up, +X_f to the right of
  an observer at the foot of the couch facing the gantry.
* A head-first supine (HFS) patient lies with the head towards the gantry, face up, so
  the patient's left is +X_f, superior is +Y_f and anterior is +Z_f.
* Gantry angle: rotation about Y_f, clockwise seen from the foot of the couch; the source
  sits at +Z_g, so at gantry 0 it is above the couch (anterior for HFS) and at gantry 90
  it is at +X_f (the HFS patient's left).
* Couch angle: rotation about Z_f, counter-clockwise seen from above.
* Collimator angle: rotation about Z_g (towards the source), counter-clockwise seen from
  the source.

DICOM patient coordinates: +x patient left, +y posterior, +z superior.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ids_engine.model import PATIENT_POSITIONS, Beam, FluenceGrid, rotation_matrix_patient_to_beam

ISO = (10.0, 20.0, 30.0)
SAD = 1000.0


def _beam(gantry=0.0, couch=0.0, collimator=0.0) -> Beam:
    return Beam("b", gantry_deg=gantry, couch_deg=couch, collimator_deg=collimator, isocentre_mm_xyz=ISO, sad_mm=SAD)


@pytest.mark.parametrize(
    "gantry, source",
    [
        (0.0, (10.0, 20.0 - SAD, 30.0)),  # above the couch: anterior (-y)
        (90.0, (10.0 + SAD, 20.0, 30.0)),  # patient's left (+x)
        (180.0, (10.0, 20.0 + SAD, 30.0)),  # below the couch: posterior (+y)
        (270.0, (10.0 - SAD, 20.0, 30.0)),  # patient's right (-x)
    ],
)
def test_source_position_hfs_cardinal_gantry(gantry, source):
    b = _beam(gantry)
    np.testing.assert_allclose(b.source_mm_xyz("HFS"), source, atol=1e-9)
    # The central axis points from the source to the isocentre.
    expected_dir = (np.asarray(ISO) - np.asarray(source)) / SAD
    np.testing.assert_allclose(b.direction_xyz("HFS"), expected_dir, atol=1e-12)


def test_source_gantry_45_hfs():
    # Half-way between anterior (G0) and the patient's left (G90).
    s = SAD / np.sqrt(2.0)
    np.testing.assert_allclose(_beam(45.0).source_mm_xyz(), (10.0 + s, 20.0 - s, 30.0), atol=1e-9)


def test_couch_90_gantry_90_hfs_source_at_feet():
    """Couch 90 turns the couch counter-clockwise seen from above: the head end, at +Y_f
    (towards the gantry) at couch 0, swings to -X_f, and the feet to +X_f. Gantry 90 puts
    the source at +X_f, so the source lies towards the patient's feet: -z, at the
    isocentre's x and y."""
    b = _beam(gantry=90.0, couch=90.0)
    np.testing.assert_allclose(b.source_mm_xyz("HFS"), (10.0, 20.0, 30.0 - SAD), atol=1e-9)
    np.testing.assert_allclose(b.direction_xyz("HFS"), (0.0, 0.0, 1.0), atol=1e-12)


def test_couch_270_gantry_90_hfs_source_at_head():
    """Couch 270 (= -90, clockwise seen from above) swings the head end to +X_f, where the
    gantry-90 source is: the source lies superior (+z)."""
    np.testing.assert_allclose(_beam(90.0, 270.0).source_mm_xyz("HFS"), (10.0, 20.0, 30.0 + SAD), atol=1e-9)


def test_couch_does_not_move_vertical_beam():
    """A couch rotation turns about the vertical axis, so a gantry-0 source stays anterior."""
    for couch in (30.0, 90.0, 275.0):
        np.testing.assert_allclose(_beam(0.0, couch).source_mm_xyz(), (10.0, 20.0 - SAD, 30.0), atol=1e-9)


def test_couch_90_rotates_bev_at_gantry_0():
    """At gantry 0, X_b = +X_f and Y_b = +Y_f. Couch 90 turns the couch counter-clockwise
    seen from above: the feet swing from -Y_f to +X_f and the patient's left from +X_f to
    +Y_f. So u (X_b) runs towards the feet (-z) and v (Y_b) towards the patient's left (+x)."""
    b = _beam(0.0, 90.0)
    iso = np.asarray(ISO)
    np.testing.assert_allclose(b.patient_to_beam(iso + [0.0, 0.0, -5.0]), [5.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(b.patient_to_beam(iso + [5.0, 0.0, 0.0]), [0.0, 5.0, 0.0], atol=1e-9)


def test_bev_axes_gantry_0_hfs():
    """At G0 C0 collimator 0, X_b = +X_f = patient left (+x), Y_b = +Y_f = superior (+z),
    Z_b = up = anterior (-y)."""
    b = _beam()
    iso = np.asarray(ISO)
    np.testing.assert_allclose(b.patient_to_beam(iso + [5.0, 0.0, 0.0]), [5.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(b.patient_to_beam(iso + [0.0, 0.0, 7.0]), [0.0, 7.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(b.patient_to_beam(iso + [0.0, -3.0, 0.0]), [0.0, 0.0, 3.0], atol=1e-12)


def test_collimator_90_rotates_bev():
    """Collimator 90 turns the collimator counter-clockwise seen from the source (at G0 seen
    from above, patient left to the right of the page and the head at the top): X_b turns
    from patient left (+x) to superior (+z), Y_b from superior to patient right (-x)."""
    b = _beam(collimator=90.0)
    iso = np.asarray(ISO)
    np.testing.assert_allclose(b.patient_to_beam(iso + [0.0, 0.0, 7.0]), [7.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(b.patient_to_beam(iso + [5.0, 0.0, 0.0]), [0.0, -5.0, 0.0], atol=1e-12)
    # The collimator does not move the source.
    np.testing.assert_allclose(b.source_mm_xyz(), _beam().source_mm_xyz(), atol=1e-9)


def test_collimator_rotates_uv_by_its_angle(rng):
    pts = np.asarray(ISO) + rng.uniform(-80.0, 80.0, size=(20, 3))
    for gantry, couch in [(0.0, 0.0), (40.0, 20.0), (200.0, 330.0)]:
        uv0 = _beam(gantry, couch, 0.0).patient_to_bev(pts)
        for coll in (30.0, 90.0, 300.0):
            uv = _beam(gantry, couch, coll).patient_to_bev(pts)
            c, s = np.cos(np.radians(coll)), np.sin(np.radians(coll))
            # Coordinates in a frame turned by +coll: u' = c u + s v, v' = -s u + c v.
            np.testing.assert_allclose(uv[:, 0], c * uv0[:, 0] + s * uv0[:, 1], atol=1e-9)
            np.testing.assert_allclose(uv[:, 1], -s * uv0[:, 0] + c * uv0[:, 1], atol=1e-9)
            np.testing.assert_allclose(uv[:, 2], uv0[:, 2], atol=1e-9)


def test_divergence_hand_computed():
    """G0 HFS: X_b is +x and Z_b is -y. The point 90 mm to the patient's left and 100 mm
    anterior of the isocentre has X_b = 90, Z_b = 100, so it lies 1000 - 100 = 900 mm from
    the source and projects to u = 90 * 1000 / 900 = 100 mm at the isocentre plane."""
    b = _beam()
    p = (10.0 + 90.0, 20.0 - 100.0, 30.0)
    np.testing.assert_allclose(b.patient_to_bev(p), [100.0, 0.0, 900.0], atol=1e-9)
    np.testing.assert_allclose(b.bev_to_patient(100.0, 0.0, 900.0), p, atol=1e-9)
    # The same ray 1200 mm from the source (200 mm beyond the isocentre): X_b = 120.
    np.testing.assert_allclose(b.bev_to_patient(100.0, 0.0, 1200.0), (130.0, 220.0, 30.0), atol=1e-9)


def test_divergence_generic_beam(rng):
    b = _beam(123.0, 17.0, 45.0)
    for _ in range(5):
        xb, yb, zb = rng.uniform(-150.0, 150.0, size=3)
        p = b.beam_to_patient([xb, yb, zb])
        u, v, d = b.patient_to_bev(p)
        assert d == pytest.approx(SAD - zb)
        assert u == pytest.approx(xb * SAD / (SAD - zb))
        assert v == pytest.approx(yb * SAD / (SAD - zb))
        # The source, the point and its projection at the isocentre plane are collinear.
        src = b.source_mm_xyz()
        at_iso = b.bev_to_patient(u, v, SAD)
        cross = np.cross(p - src, at_iso - src)
        np.testing.assert_allclose(cross, 0.0, atol=1e-6 * np.linalg.norm(p - src) * SAD)


@pytest.mark.parametrize("position", PATIENT_POSITIONS)
def test_round_trips(position, rng):
    pts = rng.uniform(-200.0, 200.0, size=(30, 3))
    for gantry, couch, coll in [(0, 0, 0), (33, 0, 0), (270, 90, 15), (181, 305, 290)]:
        b = _beam(gantry, couch, coll)
        np.testing.assert_allclose(b.beam_to_patient(b.patient_to_beam(pts, position), position), pts, atol=1e-9)
        bev = b.patient_to_bev(pts, position)
        back = b.bev_to_patient(bev[:, 0], bev[:, 1], bev[:, 2], position)
        np.testing.assert_allclose(back, pts, atol=1e-9)


@pytest.mark.parametrize("position", PATIENT_POSITIONS)
def test_rotations_are_proper(position, rng):
    angles = [(0, 0, 0), (90, 90, 90)] + [tuple(rng.uniform(0, 360, size=3)) for _ in range(10)]
    for g, c, k in angles:
        r = rotation_matrix_patient_to_beam(g, c, k, position)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "position, g0_source, g90_source",
    [
        # Head first supine: anterior is up; the patient's left is +X_f.
        ("HFS", (10.0, 20.0 - SAD, 30.0), (10.0 + SAD, 20.0, 30.0)),
        # Head first prone: posterior (+y) is up; the patient's left is -X_f, so +X_f is the right.
        ("HFP", (10.0, 20.0 + SAD, 30.0), (10.0 - SAD, 20.0, 30.0)),
        # Feet first supine: anterior up; feet towards the gantry turn the left to -X_f.
        ("FFS", (10.0, 20.0 - SAD, 30.0), (10.0 - SAD, 20.0, 30.0)),
        # Feet first prone: posterior up; the left is +X_f again.
        ("FFP", (10.0, 20.0 + SAD, 30.0), (10.0 + SAD, 20.0, 30.0)),
    ],
)
def test_source_positions_other_patient_positions(position, g0_source, g90_source):
    np.testing.assert_allclose(_beam(0.0).source_mm_xyz(position), g0_source, atol=1e-9)
    np.testing.assert_allclose(_beam(90.0).source_mm_xyz(position), g90_source, atol=1e-9)


def test_ffs_couch_90_gantry_90_source_at_head():
    """Feet first: the feet point to +Y_f; couch 90 swings them to -X_f and the head to
    +X_f, where the gantry-90 source is: the source lies superior (+z)."""
    np.testing.assert_allclose(_beam(90.0, 90.0).source_mm_xyz("FFS"), (10.0, 20.0, 30.0 + SAD), atol=1e-9)


def test_lower_case_patient_position_and_bad_position():
    np.testing.assert_allclose(_beam(90.0).source_mm_xyz("hfs"), _beam(90.0).source_mm_xyz("HFS"))
    with pytest.raises(ValueError, match="patient_position"):
        _beam().rotation("XYZ")


def test_angles_wrap_and_validation():
    b = Beam(gantry_deg=-90.0, couch_deg=450.0, collimator_deg=360.0)
    assert (b.gantry_deg, b.couch_deg, b.collimator_deg) == (270.0, 90.0, 0.0)
    for field, value in [("sad_mm", 0.0), ("energy_mv", -6.0), ("gantry_deg", np.inf)]:
        with pytest.raises(ValueError, match=field):
            Beam(**{field: value})
    with pytest.raises(ValueError, match="isocentre_mm_xyz"):
        Beam(isocentre_mm_xyz=(0.0, 0.0))


def test_opposed_beams_share_the_axis():
    """Gantry g and g + 180 have opposite directions and mirror-image sources about the isocentre."""
    for g, couch in itertools.product((0.0, 40.0, 250.0), (0.0, 90.0)):
        a, b = _beam(g, couch), _beam(g + 180.0, couch)
        np.testing.assert_allclose(a.direction_xyz(), -b.direction_xyz(), atol=1e-12)
        np.testing.assert_allclose(a.source_mm_xyz() + b.source_mm_xyz(), 2 * np.asarray(ISO), atol=1e-9)


def test_fluence_grid_centred():
    fg = FluenceGrid.centred((100.0, 50.0), 5.0)
    assert fg.shape_vu == (11, 21)
    np.testing.assert_allclose(fg.u_mm()[[0, 10, 20]], [-50.0, 0.0, 50.0])
    np.testing.assert_allclose(fg.v_mm()[[0, 5, 10]], [-25.0, 0.0, 25.0])
    row, col = fg.to_index(0.0, 0.0)
    assert (row, col) == (5.0, 10.0)
    open_field = fg.rectangle_mask((-20.0, 20.0), (-10.0, 10.0))
    assert open_field.shape == (11, 21)
    assert open_field.sum() == 9 * 5  # u in -20..20 (9 amplitudes), v in -10..10 (5)
    with pytest.raises(ValueError, match="pitch_mm"):
        FluenceGrid((3, 3), 0.0, (0.0, 0.0))
