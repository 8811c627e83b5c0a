"""Requests carried through a registration: voxel positions move with the anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.adapt import fluence_on_grid, map_request, map_requests
from ids_engine.dmr import EraseSpot, MoveIsodoseLine, MoveIsodoseSurface, Pin, SetVoxelDose, Unpin
from ids_engine.model import FluenceGrid, Grid
from ids_engine.registration import Registration, rotation_matrix

GRID = Grid((20, 30, 40), (4.0, 2.0, 2.5), (-50.0, -30.0, -40.0))


def _shift(t_xyz, grid=GRID, new_grid=None):
    return Registration("rigid", grid, new_grid or grid, np.eye(3), np.asarray(t_xyz, float))


def test_set_voxel_dose_moves_by_the_shift_in_voxels():
    # +5 mm in x = 2 voxels of 2.5 mm, -4 mm in y = -2 voxels of 2 mm, +8 mm in z = 2 slices of 4 mm.
    m = map_request(SetVoxelDose((5, 10, 12), 58.0), _shift((5.0, -4.0, 8.0)))
    assert m.mapped == SetVoxelDose((7, 8, 14), 58.0)
    assert m.shift_mm == pytest.approx(np.sqrt(5**2 + 4**2 + 8**2))


def test_positions_map_onto_another_grid():
    new = Grid((10, 30, 40), (4.0, 2.0, 2.5), (-50.0, -30.0, -20.0))  # origin moved by +20 mm in z
    m = map_request(EraseSpot((6.0, 10.0, 12.0), 5.0, 0.0, 20.0, structure="OAR"), _shift((0.0, 0.0, 4.0), new_grid=new))
    assert m.mapped.centre_zyx == pytest.approx((2.0, 10.0, 12.0))  # z: (-40 + 6 * 4 + 4 - (-20)) / 4 = 2
    assert m.mapped.structure == "OAR" and m.mapped.high_gy == 20.0


def test_rotation_about_a_point_moves_positions_as_the_anatomy():
    R = rotation_matrix((0.0, 0.0, 90.0))
    centre = GRID.index_to_world((10, 15, 20))
    reg = Registration("rigid", GRID, GRID, R, centre - R @ centre)
    start = np.array([10.0, 15.0, 24.0])  # 4 voxels (10 mm) along +x from the centre
    m = map_request(MoveIsodoseSurface(30.0, tuple(start), (10.0, 15.0, 20.0)), reg)
    # +x turns into +y: 10 mm = 5 rows of 2 mm; the end (the centre) stays.
    assert m.mapped.start_zyx == pytest.approx((10.0, 20.0, 20.0))
    assert m.mapped.end_zyx == pytest.approx((10.0, 15.0, 20.0))


def test_line_request_keeps_its_slice_axis():
    m = map_request(MoveIsodoseLine("z", 5, 30.0, (10.0, 12.0), (11.0, 14.0)), _shift((2.5, 2.0, -4.0)))
    assert m.mapped.slice_index == 4 and m.mapped.axis == "z"
    assert m.mapped.start_rc == pytest.approx((11.0, 13.0)) and m.mapped.end_rc == pytest.approx((12.0, 15.0))
    m = map_request(MoveIsodoseLine("x", 12, 30.0, (5.0, 10.0), (5.0, 12.0)), _shift((5.0, 0.0, 0.0)))
    assert m.mapped.slice_index == 14 and m.mapped.start_rc == pytest.approx((5.0, 10.0))


def test_outside_grid_or_body_is_skipped_with_reason():
    m = map_request(SetVoxelDose((19, 10, 12), 50.0), _shift((0.0, 0.0, 8.0)))
    assert m.mapped is None and "outside the new CT's grid" in m.note
    body = np.zeros(GRID.shape_zyx, bool)
    body[:, :, :20] = True
    m = map_request(Pin("keep", (5.0, 10.0, 18.0), 4.0), _shift((5.0, 0.0, 0.0)), body)
    assert m.mapped is None and "outside the body" in m.note
    out = map_requests([Pin("keep", (5.0, 10.0, 18.0), 4.0), Unpin("keep"), Unpin("other")], _shift((5.0, 0.0, 0.0)), body)
    assert [o.mapped is None for o in out] == [True, True, True]
    assert "its pin 'keep' was skipped" in out[1].note


def test_fluence_on_grid_copies_whole_cell_offsets_and_interpolates_otherwise():
    old = FluenceGrid((4, 5), 1.0, (-2.0, -1.0))
    f = np.arange(20, dtype=np.float32).reshape(4, 5)
    new = FluenceGrid((3, 7), 1.0, (-3.0, 0.0))  # one column more on the left, one row fewer at the top
    g = fluence_on_grid(f, old, new)
    assert g.shape == (3, 7)
    assert np.array_equal(g[:, 1:6], f[1:4]) and not g[:, 0].any() and not g[:, 6].any()
    half = fluence_on_grid(f, old, FluenceGrid((4, 4), 1.0, (-1.5, -1.0)))
    assert half[1, 0] == pytest.approx((f[1, 0] + f[1, 1]) / 2)


@pytest.mark.parametrize("gantry", [0.0, 40.0, 180.0, 260.0])
def test_beams_turned_with_the_patient_see_the_anatomy_where_they_did(gantry):
    from ids_engine.adapt import mapped_beams
    from ids_engine.model import Beam

    R = rotation_matrix((1.5, -2.0, 3.0))
    t = np.array([4.0, -3.0, 2.0])
    reg = Registration("rigid", GRID, GRID, R, t)
    b = Beam("b", gantry, 10.0, 5.0, (10.0, 5.0, 0.0))
    [kept] = mapped_beams([b], reg)
    [turned] = mapped_beams([b], reg, rotate_beams=True)
    assert (kept.gantry_deg, kept.couch_deg, kept.collimator_deg) == (b.gantry_deg, b.couch_deg, b.collimator_deg)
    assert np.allclose(turned.isocentre_mm_xyz, R @ np.array(b.isocentre_mm_xyz) + t)
    pts = np.random.default_rng(1).normal(size=(20, 3)) * 60.0
    moved = pts @ R.T + t
    # Every anatomy point keeps its beam's-eye-view position and depth in the turned beam.
    assert np.allclose(turned.patient_to_bev(moved), b.patient_to_bev(pts), atol=1e-6)
    assert not np.allclose(kept.patient_to_bev(moved), b.patient_to_bev(pts), atol=0.5)
