"""Up-front feasibility (``ids_engine.dmr._feasible``): the fall-off tables bound what the dose
engine's beams actually do, and a request is refused exactly when it needs more."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr._feasible import (SLACK, HeldGroup, _box_rows, _ranges_index, fall_off_table, find_infeasible,
                                      within_reach)
from ids_engine.dose import DoseEngine
from ids_engine.model import Beam
from tests.dose.test_physics import DEPTH_HALF_MM, water_phantom


@pytest.fixture(scope="module")
def water_engine():
    w = water_phantom()
    eng = DoseEngine(w, [Beam(gantry_deg=0.0, isocentre_mm_xyz=(0.0, -DEPTH_HALF_MM, 0.0))])
    g = eng.geometry[0]
    return eng, fall_off_table(g.machine or eng.machine, float(g.fluence_grid.pitch_mm))


@pytest.mark.parametrize("depth_mm", [10.0, 100.0])
def test_no_fluence_falls_faster_than_the_table(water_engine, depth_mm):
    """The bound against the engine itself: one beam in water, every 1 mm fluence column free
    (non-negative) and the dose nowhere above the plateau (a wide open field's dose). A linear
    programme over the engine's own column responses finds the largest fall between two
    points d mm apart (isocentre plane): never above the table, and within 0.03 of it (tight).
    (The edge spread function, the bound first used, is beaten here by 0.08-0.14.)"""
    from scipy.optimize import linprog

    eng, fo = water_engine
    fg = eng.geometry[0].fluence_grid
    u, inside = fg.u_mm(), np.abs(fg.v_mm()) <= 75.0
    x = np.arange(-20.0, 20.0, 0.25)
    pts = np.stack([x, np.full_like(x, -DEPTH_HALF_MM + depth_mm), np.zeros_like(x)], axis=-1)

    def profile(fluence):
        eng.set_fluences([fluence.astype(np.float32)])
        return np.asarray(eng.dose_at_points(pts), float)

    plateau = profile(eng.open_field(0, (-75.0, 75.0), (-75.0, 75.0)))[x.size // 2]
    blocks = []
    for cols in ([u < -30.0], [u > 30.0]) + tuple([u == c] for c in u[(u >= -30.0) & (u <= 30.0)]):
        f = np.zeros(fg.shape_vu, np.float32)
        f[np.ix_(inside, cols[0])] = 1.0
        blocks.append(profile(f) / plateau)
    R = np.array(blocks).T  # (points, fluence variables)
    mag = (1000.0 + depth_mm) / 1000.0  # SSD 1000 mm: distances at depth are magnified
    for d in (1.0, 2.0, 3.0, 4.0):
        hi, lo = int(np.argmin(np.abs(x))), int(np.argmin(np.abs(x - d * mag)))
        lp = linprog(-(R[hi] - R[lo]), A_ub=R, b_ub=np.ones(x.size), bounds=(0, None), method="highs")
        assert lp.status == 0
        fall, bound = -lp.fun, float(fo.drop(d))
        assert fall <= bound + 0.005, (d, fall, bound)
        assert fall >= bound - 0.03, (d, fall, bound)
    assert np.all(np.diff(fo.fall) >= 0) and fo.fall[0] == 0.0 and 0.99 < fo.fall[-1] <= 1.0


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


def _check(fo, req_zyx, req_lo, held_zyx, held_hi, held_name="pin 'cord'", held_lo=0.0, bev=None, fall_offs=None):
    held = [HeldGroup(held_name, _flat(held_zyx), np.array([held_lo]), np.array([held_hi]))]
    n = 1 if fall_offs is None else len(fall_offs)
    return find_infeasible(_flat(req_zyx), np.array([req_lo]), np.array([req_lo + 2.0]), held,
                           shape_zyx=SHAPE, spacing_mm_zyx=SP, bev=bev or _bev_beam_along_y, pitch_mm=[1.0] * n,
                           fall_offs=fall_offs or [fo], plateau_gy=64.2)


def test_refused_exactly_when_the_fall_exceeds_the_penumbra(fo):
    """Request >= 57 Gy beside a pin held <= hi: 2 mm apart across the beam, with no dose above
    64.2 Gy a beam's dose falls by at most ~44 % of it (28 Gy): 35 Gy held is fine (22 Gy),
    15 Gy is not (42 Gy); 6 mm apart (93 %) the 15 Gy pin is fine too."""
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 12), 35.0) is None
    found = _check(fo, (0, 10, 10), 57.0, (0, 10, 12), 15.0)
    assert found is not None and found.held == "pin 'cord'" and found.held_is_low
    assert found.distance_mm == pytest.approx(2.0)
    assert found.can == pytest.approx(float(fo.drop(2.0)))  # side by side across the beam: same depth
    assert found.need == pytest.approx(42.0 / 64.2)
    msg = found.message("move isodose line")
    assert "Pin 'cord' holds voxel (z 0, y 10, x 12) at or below 15.0 Gy" in msg and "42.0 Gy over 2.0 mm" in msg
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 16), 15.0) is None
    # The other way round: a held-high voxel beside a request that must stay low.
    low = find_infeasible(_flat((0, 10, 10)), np.array([0.0]), np.array([10.0]),
                          [HeldGroup("target coverage", _flat((0, 10, 12)), np.array([57.0]), np.array([64.2]))],
                          shape_zyx=SHAPE, spacing_mm_zyx=SP, bev=_bev_beam_along_y, pitch_mm=[1.0], fall_offs=[fo],
                          plateau_gy=64.2)
    assert low is not None and not low.held_is_low and low.high_gy == 57.0 and low.low_gy == 10.0


def test_a_beam_cannot_separate_points_on_its_own_axis(fo):
    """The same pair 2 mm apart along the only beam's axis: no lateral separation, only the
    depth dose (1 % over 2 mm) can separate them, so a 10 Gy fall is refused."""
    found = _check(fo, (0, 10, 10), 57.0, (0, 12, 10), 47.0)
    assert found is not None and found.can == pytest.approx(1.0 - np.exp(-0.01))
    # Within the slack (a 0.6 Gy fall: sampling, the coarse grid) nothing is refused.
    assert _check(fo, (0, 10, 10), 57.0, (0, 12, 10), 57.0 - 0.5 * SLACK * 64.2) is None


def test_the_best_placed_beam_decides(fo):
    """Two beams, one along the pair and one across it: the one across separates them
    laterally, so what the one along it cannot do is still possible."""
    def across(b, flat):  # a beam along x: its eye view sees (y, z)
        z, y, x = np.unravel_index(np.asarray(flat, np.int64), SHAPE)
        return y.astype(float), z.astype(float) * SP[0], np.exp(-0.005 * x * SP[2])

    pair = ((0, 10, 10), 57.0, (0, 12, 10), 47.0)  # 2 mm apart along y
    assert _check(fo, *pair) is not None  # the beam along y alone: refused
    two = lambda b, flat: (_bev_beam_along_y if b == 0 else across)(b, flat)  # noqa: E731
    assert _check(fo, *pair, bev=two, fall_offs=[fo, fo]) is None


def test_voxels_a_beam_does_not_reach_never_refuse(fo):
    """A voxel outside a beam's level (zero dose per unit fluence) gives that beam no say: the
    check can only refuse through beams that reach both voxels."""
    def unreached(b, flat):
        u, v, w = _bev_beam_along_y(b, flat)
        return u, v, np.zeros_like(w)

    assert _check(fo, (0, 10, 10), 57.0, (0, 12, 10), 47.0, bev=unreached) is None


def test_a_held_band_above_the_plateau_raises_it(fo):
    """A hot spot held at 80-85 Gy near the request: the plateau is 85 Gy, not 64.2, so a fall
    the 64.2 Gy plateau could not make becomes possible."""
    pin_low = ((0, 10, 10), 57.0, (0, 10, 12), 22.0)  # needs 35 Gy over 2 mm: 28 Gy at 64.2 Gy
    assert _check(fo, *pin_low) is not None
    held = [HeldGroup("pin 'cord'", _flat((0, 10, 12)), np.array([0.0]), np.array([22.0])),
            HeldGroup("pin 'hot'", _flat((0, 20, 20)), np.array([80.0]), np.array([85.0]))]
    assert find_infeasible(_flat((0, 10, 10)), np.array([57.0]), np.array([59.0]), held, shape_zyx=SHAPE,
                           spacing_mm_zyx=SP, bev=_bev_beam_along_y, pitch_mm=[1.0], fall_offs=[fo],
                           plateau_gy=64.2) is None
    # Far beyond the reach nothing is checked.
    assert _check(fo, (0, 10, 10), 57.0, (0, 10, 35), 0.0) is None


def test_only_the_nearest_held_voxels_within_reach_are_checked(fo):
    """Per request voxel, the 8 nearest held voxels of a group within 20 mm: a held voxel that
    would refuse the request is checked when it is among them, and missed (the documented
    approximation) when 8 nearer voxels of its group stand between."""
    low_far = (0, 10, 14)  # 4 mm away across the beam, held <= 5 Gy: needs 52 Gy, 0.77 x 64.2 possible
    req = ((0, 10, 10), 57.0)
    assert _check(fo, *req, low_far, 5.0) is not None
    near = [(0, 10 + dy, 10 + dx) for dy, dx in ((-1, 1), (1, 1), (-1, -1), (1, -1), (0, 2), (0, -2), (2, 0), (-2, 0))]
    vox = np.concatenate([_flat(z) for z in near] + [_flat(low_far)])
    held = [HeldGroup("pin 'cord'", np.sort(vox), np.zeros(vox.size),
                      np.where(np.sort(vox) == _flat(low_far)[0], 5.0, 64.2))]
    kw = dict(shape_zyx=SHAPE, spacing_mm_zyx=SP, bev=_bev_beam_along_y, pitch_mm=[1.0], fall_offs=[fo], plateau_gy=64.2)
    assert find_infeasible(_flat(req[0]), np.array([57.0]), np.array([59.0]), held, **kw) is None
    assert find_infeasible(_flat(req[0]), np.array([57.0]), np.array([59.0]), held, nearest=9, **kw) is not None


@pytest.mark.parametrize("spacing", [(2.0, 1.952, 1.952), (3.0, 0.7, 1.1), (2.5, 2.5, 2.5)])
def test_the_box_rows_select_what_testing_every_voxel_selects(spacing):
    """``find_infeasible`` takes a sorted group's voxels within reach as searched row ranges:
    the same voxels, in the same order, as unravelling every voxel and testing it against the
    box (boxes on cell positions exactly, past the grid's ends, inside one cell, empty)."""
    rng = np.random.default_rng(7)
    shape = (17, 23, 29)
    sp = np.asarray(spacing, float)
    hv = np.sort(rng.choice(int(np.prod(shape)), 4000, replace=False)).astype(np.int64)
    hmm = np.stack(np.unravel_index(hv, shape), axis=-1) * sp
    boxes = [(hmm[5], hmm[5]), (hmm[100] - 20.0, hmm[100] + 20.0), (hmm[7] - 1e-9, hmm[3000] + 1e-9),
             (np.full(3, -50.0), np.full(3, 500.0)), (hmm[9] + 0.1, hmm[9] + 0.2), (hmm[20], hmm[20] - 1.0),
             (sp * 3, sp * 3 + 1e-12), (sp * 7 - 1e-13, sp * 11 + 1e-13)]
    for box_lo, box_hi in boxes:
        box_lo, box_hi = np.asarray(box_lo, float), np.asarray(box_hi, float)
        want = np.flatnonzero(np.all((hmm >= box_lo) & (hmm <= box_hi), axis=1))
        starts, ends = _box_rows(box_lo, box_hi, sp, shape)
        got = _ranges_index(np.searchsorted(hv, starts), np.searchsorted(hv, ends))
        np.testing.assert_array_equal(got, want)
    req = hv[[10, 2000]]
    rmm = hmm[[10, 2000]]
    want = np.flatnonzero(np.all((hmm >= rmm.min(axis=0) - 20.0) & (hmm <= rmm.max(axis=0) + 20.0), axis=1))
    np.testing.assert_array_equal(within_reach(req, hv, shape_zyx=shape, spacing_mm_zyx=sp), want)
