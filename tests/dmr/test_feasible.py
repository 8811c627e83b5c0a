"""Up-front feasibility (``ids_engine.dmr._feasible``): the fall-off tables bound what the dose
engine's beams actually do, and a request is refused exactly when it needs more."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr._feasible import SLACK, HeldGroup, fall_off_table, find_infeasible
from ids_engine.dose import DoseEngine
from ids_engine.model import Beam
from tests.dose.test_physics import DEPTH_HALF_MM, water_phantom


@pytest.fixture(scope="module")
def water_engine():
    w = water_phantom()
    eng = DoseEngine(w, [Beam(gantry_deg=0.0, isocentre_mm_xyz=(0.0, -DEPTH_HALF_MM, 0.0))])
    g = eng.geometry[0]
    return eng, fall_off_table(g.machine or eng.machine, float(g.fluence_grid.pitch_mm))


def _profile(eng, depth_mm, x_mm):
    pts = np.stack([x_mm, np.full_like(x_mm, -DEPTH_HALF_MM + depth_mm), np.zeros_like(x_mm)], axis=-1)
    return np.asarray(eng.dose_at_points(pts), float)


@pytest.mark.parametrize("depth_mm", [10.0, 100.0])
def test_edge_table_bounds_a_half_blocked_field(water_engine, depth_mm):
    """Across the edge of a wide half-blocked field, the engine's dose falls over d mm (at the
    isocentre plane) by no more than the table allows, and by at least 80 % of it (tight)."""
    eng, fo = water_engine
    eng.set_fluences([eng.open_field(0, (-75.0, 0.0), (-75.0, 75.0))])
    mag = (1000.0 + depth_mm) / 1000.0  # SSD 1000 mm: distances at depth are magnified
    x = np.arange(-40.0, 30.0, 0.1)
    prof = _profile(eng, depth_mm, x)
    for d in (1.0, 2.0, 4.0, 6.0):
        k = int(round(d * mag / 0.1))
        fall = float((prof[:-k] - prof[k:]).max() / prof[0])
        bound = float(fo.drop(d, True))
        assert fall <= bound + 0.005, (d, fall, bound)
        assert fall >= 0.8 * bound, (d, fall, bound)


def test_point_table_bounds_a_single_pencil(water_engine):
    """One fluence cell's dose falls over d mm by at most the point table (normalised to its peak)."""
    eng, fo = water_engine
    eng.set_fluences([eng.open_field(0, (-0.5, 0.5), (-0.5, 0.5))])
    x = np.arange(-20.0, 20.0, 0.05)
    prof = _profile(eng, 100.0, x)
    for d in (0.5, 1.0, 2.0, 4.0):
        k = int(round(d * 1.1 / 0.05))
        fall = float(np.abs(prof[:-k] - prof[k:]).max() / prof.max())
        bound = float(fo.drop(d, False))
        assert fall <= bound + SLACK, (d, fall, bound)
        assert fall >= 0.8 * bound, (d, fall, bound)
    # A pencil can fall faster than an edge over a few mm; the tables grow with distance.
    assert fo.drop(2.0, False) > fo.drop(2.0, True)
    assert np.all(np.diff(fo.edge) >= 0) and np.all(np.diff(fo.point) >= 0)
    assert fo.edge[0] == 0.0 and 0.9 < fo.edge[-1] <= 1.0


SHAPE = (1, 40, 40)
SP = (2.0, 1.0, 1.0)


def _flat(zyx):
    return np.array([np.ravel_multi_index(zyx, SHAPE)], np.int64)


def _bev_beam_along_y(b, flat):
    """One beam travelling along y: its eye view sees (x, z) in mm (1 mm cells); its dose per
    unit fluence falls by 0.5 % per mm of depth."""
    z, y, x = np.unravel_index(np.asarray(flat, np.int64), SHAPE)
    return x.astype(float), z.astype(float) * SP[0], np.exp(-0.005 * y * SP[1])


@pytest.fixture(scope="module")
def fo():
    from ids_engine.model import default_6mv

    return fall_off_table(default_6mv(), 1.0)


def _check(fo, req_zyx, req_lo, held_zyx, held_hi, region=True, held_name="pin 'cord'"):
    held = [HeldGroup(held_name, _flat(held_zyx), np.array([0.0]), np.array([held_hi]), False)]
    return find_infeasible(_flat(req_zyx), np.array([req_lo]), np.array([req_lo + 2.0]), region, held,
                           shape_zyx=SHAPE, spacing_mm_zyx=SP, bev=_bev_beam_along_y, pitch_mm=[1.0],
                           fall_offs=[fo], plateau_gy=64.2)


def test_refused_exactly_when_the_fall_exceeds_the_penumbra(fo):
    """Request >= 57 Gy beside a pin held <= hi: 2 mm apart across the beam, an edge falls by at
    most ~29 % of 64.2 Gy (18.6 Gy): 47 Gy held is fine (10 Gy), 20 Gy is not (37 Gy);
    6 mm apart (73 %: 47 Gy) the 20 Gy pin is fine too."""
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 12), 47.0) is None
    found = _check(fo, (0, 10, 10), 57.0, (0, 10, 12), 20.0)
    assert found is not None and found.held == "pin 'cord'" and found.held_is_low
    assert found.distance_mm == pytest.approx(2.0)
    assert found.can == pytest.approx(fo.drop(2.0, True))  # side by side across the beam: same depth
    assert found.need == pytest.approx(37.0 / 64.2)
    msg = found.message("move isodose line")
    assert "Pin 'cord' holds voxel (z 0, y 10, x 12) at or below 20.0 Gy" in msg and "37.0 Gy over 2.0 mm" in msg
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 16), 20.0) is None


def test_a_beam_cannot_separate_points_on_its_own_axis(fo):
    """The same pair 2 mm apart along the only beam's axis: no lateral separation, only the
    depth dose (1 % over 2 mm) can separate them, so a 10 Gy fall is refused."""
    found = _check(fo, (0, 10, 10), 57.0, (0, 12, 10), 47.0)
    assert found is not None and found.can == pytest.approx(1.0 - np.exp(-0.01))
    # Within the slack (a 1 Gy fall: depth dose, sampling) nothing is refused.
    assert _check(fo, (0, 10, 10), 57.0, (0, 12, 10), 57.0 - 0.5 * SLACK * 64.2) is None


def test_a_spot_is_judged_by_the_pencil(fo):
    """A set-voxel request (a spot) beside a held-low pin: the pencil bound, with the spot's
    own dose as the high side (2 mm: a pencil falls by up to ~44 %)."""
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 12), 35.0, region=False) is None
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 12), 20.0, region=False) is not None
    # Far beyond the reach nothing is checked.
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 35), 0.0) is None
