"""Request resolvers on their own: a synthetic dose, no session, no engine."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr import EraseSpot, MoveIsodoseLine, MoveIsodoseSurface, RequestError, ResolveContext, SetVoxelDose, resolve
from ids_engine.dmr._resolve import drag_geometry

SHAPE = (9, 41, 41)
SPACING = (2.0, 1.0, 1.0)
RX = 60.0


def ramp_dose() -> np.ndarray:
    """Dose falling along x: 100 % of Rx at x <= 10, 10 %/mm down to 0 at x = 20 (a penumbra)."""
    x = np.arange(SHAPE[2], dtype=float)
    prof = np.clip(1.0 - (x - 10.0) / 10.0, 0.0, 1.0) * RX
    return np.broadcast_to(prof, SHAPE).copy()


def context(dose=None, **kw) -> ResolveContext:
    kw.setdefault("overshoot_gy", 1.2)
    dose = ramp_dose() if dose is None else dose
    body = np.ones(SHAPE, bool)
    body[:, :, -1] = False
    ptv = np.zeros(SHAPE, bool)
    ptv[:, 10:30, 5:15] = True
    opts = dict(shape_zyx=SHAPE, spacing_mm_zyx=SPACING, body_mask=body, dose_at=lambda f: dose.ravel()[np.asarray(f)].astype(float),
                structure_mask=lambda n: {"PTV": ptv}[n], prescription_gy=RX, max_dose_gy=2 * RX)
    opts.update(kw)
    return ResolveContext(**opts)


def xs(flat):
    return np.unravel_index(np.asarray(flat), SHAPE)[2]


def test_set_voxel_dose_band_and_refusals():
    r = resolve(SetVoxelDose((4, 20, 20), 30.0), context(feature_tolerance_gy=0.3))
    assert r.voxels.tolist() == [np.ravel_multi_index((4, 20, 20), SHAPE)]
    assert r.feature_lo[0] == pytest.approx(29.7) and r.feature_hi[0] == pytest.approx(30.3)
    with pytest.raises(RequestError, match="outside the body"):
        resolve(SetVoxelDose((4, 20, 40), 30.0), context())
    with pytest.raises(RequestError, match="outside the grid"):
        resolve(SetVoxelDose((40, 20, 20), 30.0), context())
    with pytest.raises(RequestError, match="above the largest dose"):
        resolve(SetVoxelDose((4, 20, 20), 1e6), context())


def test_outward_line_drag_is_cut_at_the_drag_end():
    """The 70 % line sits at x = 13; dragged to x = 16 the swept band must stop at x = 16 (no end
    cap), its voxels must end above the level, and the strip just past the end must stay below."""
    level = 0.7 * RX
    req = MoveIsodoseLine("z", 4, level, (20.0, 13.0), (20.0, 16.0), width_mm=4.0)
    r = resolve(req, context())
    fx = xs(r.feature_voxels)
    assert fx.max() == 16 and fx.min() >= 11
    assert np.all(r.feature_lo > level)
    # No overshoot: at most the rigidly shifted dose D(x - 3) (60 % of Rx per 10 mm) plus the allowance.
    rigid = np.clip(1.0 - (fx - 3 - 10.0) / 10.0, 0.0, 1.0) * RX
    np.testing.assert_allclose(r.feature_hi, np.maximum(rigid, level + 0.01 * level) + 1.2)
    assert np.all(r.target_gy > level)
    z, y, x = np.unravel_index(r.guard_voxels, SHAPE)
    assert np.all(z == 4)  # a line drag guards its slice only
    beyond = (x > 16) & (np.abs(y - 20) <= 2)
    assert beyond.any()
    assert np.all(r.guard_hi[beyond] < level)  # past the end: stays below the level
    # Beside the drag (>= 5 mm from the band's edge), each guard keeps its own side of the level.
    dose = ramp_dose().ravel()[r.guard_voxels]
    assert np.all(np.where(dose > level, r.guard_lo > level, r.guard_hi < level))
    flat, _, _, seg = drag_geometry(SHAPE, SPACING, (4, 20, 13), (4, 20, 16), 20.0, plane_axis=0)
    seg_of = dict(zip(flat.tolist(), seg.tolist()))
    assert all(seg_of[v] >= 2 + 5 - 1e-9 for v in r.guard_voxels[~beyond].tolist())


def test_inward_line_drag_lowers_and_guards_the_inside():
    level = 0.7 * RX
    r = resolve(MoveIsodoseLine("z", 4, level, (20.0, 13.0), (20.0, 10.0), width_mm=4.0), context())
    assert np.all(r.target_gy < level)
    assert np.all(r.feature_hi < level)
    fx = xs(r.feature_voxels)
    rigid = np.clip(1.0 - (fx + 3 - 10.0) / 10.0, 0.0, 1.0) * RX
    np.testing.assert_allclose(r.feature_lo, np.minimum(np.minimum(rigid, level - 0.01 * level), ramp_dose()[4, 0, fx]) - 1.2)
    assert fx.min() == 10
    z, y, x = np.unravel_index(r.guard_voxels, SHAPE)
    beyond = (x < 10) & (np.abs(y - 20) <= 2)
    assert beyond.any() and np.all(r.guard_lo[beyond] > level)


def test_drag_of_a_level_that_is_not_there_is_refused():
    with pytest.raises(RequestError, match="no 120 Gy isodose"):
        resolve(MoveIsodoseLine("z", 4, 120.0, (20.0, 13.0), (20.0, 16.0)), context())
    with pytest.raises(RequestError, match="slice_index"):
        resolve(MoveIsodoseLine("z", 40, 42.0, (20.0, 13.0), (20.0, 16.0)), context())


def test_negative_sizes_are_refused():
    with pytest.raises(RequestError, match="width_mm"):
        MoveIsodoseLine("z", 4, 42.0, (20.0, 13.0), (20.0, 16.0), width_mm=-6.0)
    with pytest.raises(RequestError, match="radius_mm"):
        MoveIsodoseSurface(42.0, (4, 20, 13), (4, 20, 16), radius_mm=-1.0)
    with pytest.raises(RequestError, match="radius_mm"):
        EraseSpot((4, 20, 20), -3.0, 10.0, 20.0)


def test_surface_drag_is_three_dimensional():
    r = resolve(MoveIsodoseSurface(0.7 * RX, (4.0, 20.0, 13.0), (4.0, 20.0, 16.0), radius_mm=3.0), context())
    z = np.unravel_index(r.feature_voxels, SHAPE)[0]
    assert set(z.tolist()) == {3, 4, 5}
    assert xs(r.feature_voxels).max() == 16


def test_erase_watches_the_whole_region_and_caps_the_target():
    dose = ramp_dose()
    dose[4, 18:23, 6:9] = 1.1 * RX  # a hot spot
    r = resolve(EraseSpot((4, 20, 7), 3.0, 0.95 * RX, 1.03 * RX, structure="PTV"), context(dose, max_voxels=4))
    assert r.voxels.size == 4  # the worst ones as columns...
    region = r.feature_voxels
    assert region.size > r.voxels.size  # ...but every region voxel is watched
    assert np.all(r.feature_hi == pytest.approx(1.03 * RX)) and np.all(r.feature_lo == pytest.approx(0.95 * RX))
    assert r.target_hi_cap_gy == pytest.approx(1.03 * RX)
    assert np.all(r.target_gy <= 1.03 * RX)
    with pytest.raises(RequestError, match="no structure called"):
        resolve(EraseSpot((4, 20, 7), 3.0, 0.95 * RX, 1.03 * RX, structure="nope"), context(dose))


def test_drag_geometry_distances():
    flat, along, perp, seg = drag_geometry(SHAPE, SPACING, (4, 20, 10), (4, 20, 15), 3.0, plane_axis=0)
    z, y, x = np.unravel_index(flat, SHAPE)
    assert np.all(z == 4)
    i = np.flatnonzero((y == 20) & (x == 15))[0]
    assert along[i] == pytest.approx(0.0) and perp[i] == pytest.approx(0.0)
    i = np.flatnonzero((y == 22) & (x == 17))[0]
    assert along[i] == pytest.approx(2.0) and perp[i] == pytest.approx(2.0) and seg[i] == pytest.approx(np.hypot(2, 2))


def test_drag_in_a_flat_region_is_refused():
    """A 95 % line in a plateau that hovers around 95 % has no position to drag."""
    dose = np.full(SHAPE, 0.95 * RX)
    dose[:, :, :20] += np.linspace(-0.002, 0.002, 20)[None, None, :] * RX  # 0.02 %/mm
    with pytest.raises(RequestError, match="not well defined"):
        resolve(MoveIsodoseLine("z", 4, 0.95 * RX, (20.0, 10.0), (20.0, 14.0)), context(dose))
