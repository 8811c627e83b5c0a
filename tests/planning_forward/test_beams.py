"""Beam operations (the seed's Beams menu): new beam at the prior isocentre, copy, parallel
opposed (gantry + 180, collimator mirrored), move all isocentres; names unique."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ids_engine.deliver import Aperture, aperture_fluence
from ids_engine.model import Beam, FluenceGrid, default_mlc
from ids_engine.planning._beams import (
    copy_beam,
    find_beam,
    mirror_aperture,
    mirror_fluence,
    mirror_fluence_grid,
    move_isocentres,
    new_beam,
    parallel_opposed,
    unique_name,
)


def _plan() -> list[Beam]:
    return [Beam("AP", 0.0, isocentre_mm_xyz=(1.0, 2.0, 3.0)),
            Beam("LAT", 90.0, collimator_deg=30.0, couch_deg=10.0, isocentre_mm_xyz=(4.0, 5.0, 6.0),
                 fluence_grid=FluenceGrid((10, 20), 2.0, (-30.0, -9.0)))]


def test_new_beam_takes_the_prior_beams_isocentre():
    first = new_beam([], isocentre_mm_xyz=(7.0, 8.0, 9.0), gantry_deg=45.0)
    assert first.isocentre_mm_xyz == (7.0, 8.0, 9.0) and first.name == "Beam 1" and first.gantry_deg == 45.0
    assert new_beam([]).isocentre_mm_xyz == (0.0, 0.0, 0.0)
    beams = _plan()
    b = new_beam(beams, gantry_deg=180.0, energy_mv=15.0)
    assert b.isocentre_mm_xyz == (4.0, 5.0, 6.0)  # the last (prior) beam's
    assert (b.gantry_deg, b.energy_mv, b.name) == (180.0, 15.0, "Beam 3")
    with pytest.raises(ValueError, match="prior beam"):
        new_beam(beams, isocentre_mm_xyz=(0, 0, 0))


def test_names_are_unique():
    beams = _plan()
    assert new_beam(beams, "AP").name == "AP (2)"
    assert unique_name("AP (2)", ["AP", "AP (2)"]) == "AP (3)"
    assert unique_name("  ", []) == "beam"
    c1 = copy_beam(beams, "AP")
    c2 = copy_beam(beams + [c1], "AP")
    assert (c1.name, c2.name) == ("AP copy", "AP copy (2)")
    o1 = parallel_opposed(beams, 0)
    o2 = parallel_opposed(beams + [o1], 0)
    assert (o1.name, o2.name) == ("AP opp", "AP opp (2)")
    all_names = [b.name for b in beams + [c1, c2, o1, o2]]
    assert len(set(all_names)) == len(all_names)


def test_copy_keeps_isocentre_and_angles():
    beams = _plan()
    c = copy_beam(beams, "LAT", name="LAT2")
    assert c.name == "LAT2"
    for f in ("gantry_deg", "couch_deg", "collimator_deg", "isocentre_mm_xyz", "sad_mm", "energy_mv", "fluence_grid"):
        assert getattr(c, f) == getattr(beams[1], f), f
    assert beams[1].name == "LAT"  # the original is untouched


def test_find_beam_by_index_or_name():
    beams = _plan()
    assert find_beam(beams, -1) == 1 and find_beam(beams, "AP") == 0
    with pytest.raises(ValueError, match="out of range"):
        find_beam(beams, 5)
    with pytest.raises(ValueError, match="no beam named 'PA'; beams: AP, LAT"):
        find_beam(beams, "PA")


@pytest.mark.parametrize("gantry, couch, collimator", list(itertools.product((0.0, 35.0, 270.0), (0.0, 80.0), (0.0, 20.0, 300.0))))
def test_parallel_opposed_geometry(gantry, couch, collimator):
    """Gantry + 180, same couch, collimator 360 - c: the central ray reversed, X_b mirrored,
    Y_b the same, so a field drawn on the isocentre plane covers the same room region."""
    b = Beam("B", gantry, couch, collimator, (3.0, -4.0, 5.0))
    o = parallel_opposed([b], 0)
    assert o.gantry_deg == pytest.approx((gantry + 180.0) % 360.0)
    assert o.collimator_deg == pytest.approx((360.0 - collimator) % 360.0)
    assert o.couch_deg == b.couch_deg and o.isocentre_mm_xyz == b.isocentre_mm_xyz
    np.testing.assert_allclose(o.direction_xyz(), -b.direction_xyz(), atol=1e-12)
    Rb, Ro = b.rotation(), o.rotation()
    np.testing.assert_allclose(Ro[0], -Rb[0], atol=1e-12)  # X_b' = -X_b
    np.testing.assert_allclose(Ro[1], Rb[1], atol=1e-12)  # Y_b' = Y_b
    np.testing.assert_allclose(Ro[2], -Rb[2], atol=1e-12)  # Z_b' = -Z_b
    # Points on the isocentre plane: u' = -u, v' = v.
    pts = b.beam_to_patient(np.array([[12.0, -7.0, 0.0], [-40.0, 25.0, 0.0]]))
    np.testing.assert_allclose(o.patient_to_bev(pts)[:, :2], b.patient_to_bev(pts)[:, :2] * (-1, 1), atol=1e-9)


def test_parallel_opposed_of_the_opposed_is_the_original():
    b = _plan()[1]
    oo = parallel_opposed([parallel_opposed([b], 0)], 0)
    assert (oo.gantry_deg, oo.couch_deg, oo.collimator_deg) == pytest.approx((b.gantry_deg, b.couch_deg, b.collimator_deg))
    assert oo.fluence_grid == b.fluence_grid


def test_mirrored_aperture_and_fluence_agree_for_the_opposed_beam():
    mlc = default_mlc()
    b = _plan()[1]
    o = parallel_opposed([b], 0)
    g, go = b.fluence_grid, o.fluence_grid
    assert go == mirror_fluence_grid(g)
    np.testing.assert_allclose(go.u_mm(), -g.u_mm()[::-1])
    x1 = np.full(60, -3.0); x2 = np.full(60, 7.0)
    x1[28:33] = -12.5
    ap = Aperture(x1, x2, (-11.0, 6.0), (-6.0, 8.5))
    f = aperture_fluence(ap, mlc, g)
    fo = aperture_fluence(mirror_aperture(ap), mlc, go)
    assert f.sum() > 0
    np.testing.assert_allclose(fo, mirror_fluence(f), atol=1e-6)
    assert mirror_fluence_grid(None) is None


def test_move_isocentres_to_one_beam():
    beams = _plan() + [Beam("X", 200.0, isocentre_mm_xyz=(1.0, 2.0, 3.0))]
    moved = move_isocentres(beams, "LAT")
    assert all(b.isocentre_mm_xyz == (4.0, 5.0, 6.0) for b in moved)
    assert [b.gantry_deg for b in moved] == [b.gantry_deg for b in beams]
    assert [b.name for b in moved] == [b.name for b in beams]
    assert moved[1] is beams[1] and moved[1].fluence_grid is not None  # the reference beam is unchanged
    # Beams that moved drop their fluence grid (the engine picks one for the new isocentre).
    assert moved[0].fluence_grid is None
    assert beams[0].isocentre_mm_xyz == (1.0, 2.0, 3.0)  # input untouched
