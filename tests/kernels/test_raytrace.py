"""Radiological depth (kernels/raytrace.py): analytic phantoms, the float64 Siddon reference, twins.

Every kernel result is checked against physics (geometric path lengths through boxes and
slabs, computed analytically here) or against the slow per-point float64 Siddon
reference; the public function runs on both backends (the CuPy case skips without a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine import backend
from ids_engine.kernels import raytrace
from ids_engine.kernels.raytrace import (
    radiological_depth,
    radiological_depth_numpy,
    radiological_depth_reference,
)

# Tolerances of the float32 kernel against float64 truth, |error| <= atol + rtol * depth.
# Sample coordinates are float32 voxel offsets (~1e-7 voxel); piece lengths and step sums
# are float32, so the error grows with the number of steps (depth).
TOL = {np.float32: {"atol_mm": 2e-4, "rtol": 1e-5}}


def _assert_depth_close(actual, expected) -> None:
    actual = backend.asnumpy(actual)
    assert actual.dtype == np.float32
    tol = TOL[np.float32]
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol_mm"])


# ---------------------------------------------------------------------------- phantoms

# (nz, ny, nx) = (30, 36, 40) voxels of (dz, dy, dx) = (2.0, 1.5, 1.25) mm; voxel [0, 0, 0]
# centred at (x, y, z) = (-20, -25, -30) mm.
SHAPE = (30, 36, 40)
SPACING_ZYX = (2.0, 1.5, 1.25)
ORIGIN_XYZ = (-20.0, -25.0, -30.0)
# Water box: voxels k in [5, 25), j in [6, 30), i in [8, 34).
BOX_KJI = ((5, 25), (6, 30), (8, 34))


def _voxel_box_mm(ranges_kji) -> tuple[np.ndarray, np.ndarray]:
    """Patient-coordinate corners (x, y, z) of the union of voxels in half-open index ranges."""
    d = np.array(SPACING_ZYX[::-1])
    o = np.array(ORIGIN_XYZ)
    lo_idx = np.array([r[0] for r in ranges_kji[::-1]], dtype=float)
    hi_idx = np.array([r[1] for r in ranges_kji[::-1]], dtype=float)
    return o + (lo_idx - 0.5) * d, o + (hi_idx - 0.5) * d


def _fill(density: np.ndarray, ranges_kji, value: float) -> None:
    (k0, k1), (j0, j1), (i0, i1) = ranges_kji
    density[k0:k1, j0:j1, i0:i1] = value


def _path_in_box(source, points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Length (mm) of each segment source -> point inside the box [lo, hi] (slab method, float64)."""
    s = np.asarray(source, dtype=np.float64)
    delta = np.asarray(points, dtype=np.float64) - s
    t0 = np.zeros(len(delta))
    t1 = np.ones(len(delta))
    for a in range(3):
        moving = delta[:, a] != 0
        safe = np.where(moving, delta[:, a], 1.0)
        ta = np.where(moving, (lo[a] - s[a]) / safe, -np.inf)
        tb = np.where(moving, (hi[a] - s[a]) / safe, np.inf)
        if not lo[a] <= s[a] <= hi[a]:
            # A segment parallel to this slab and outside it never enters the box.
            ta = np.where(moving, ta, np.inf)
        t0 = np.maximum(t0, np.minimum(ta, tb))
        t1 = np.minimum(t1, np.maximum(ta, tb))
    return np.maximum(t1 - t0, 0.0) * np.linalg.norm(delta, axis=1)


def _voxel_centres(ranges_kji) -> np.ndarray:
    (k0, k1), (j0, j1), (i0, i1) = ranges_kji
    k, j, i = np.meshgrid(np.arange(k0, k1), np.arange(j0, j1), np.arange(i0, i1), indexing="ij")
    d = np.array(SPACING_ZYX[::-1])
    return np.array(ORIGIN_XYZ) + np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1) * d


def _points_around_box(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random points in and around the water box (some outside the grid)."""
    lo, hi = _voxel_box_mm(BOX_KJI)
    return rng.uniform(lo - 8.0, hi + 8.0, size=(n, 3))


def _on_device(*arrays):
    return tuple(backend.to_device(a) for a in arrays)


# Far sources (1 m away) from several directions, one close to the box, one inside it and
# one inside the grid but outside the box.
SOURCES = {
    "anterior": (0.0, -1000.0, 0.0),
    "oblique_xy": (700.0, -700.0, 100.0),
    "oblique_xyz": (500.0, -600.0, -500.0),
    "from_above": (-300.0, -200.0, 900.0),
    "close": (40.0, -60.0, 30.0),
    "inside_box": (3.3, 2.2, -4.1),
    "inside_grid_outside_box": (-18.0, -23.0, -27.0),
}


# --------------------------------------------------------------------------- physics


@pytest.mark.parametrize("source", list(SOURCES.values()), ids=list(SOURCES))
def test_water_box_equals_geometric_path(xp_name, rng, source):
    density = np.zeros(SHAPE, dtype=np.float32)
    _fill(density, BOX_KJI, 1.0)
    lo, hi = _voxel_box_mm(BOX_KJI)
    points = np.concatenate([_voxel_centres(BOX_KJI), _points_around_box(rng, 500)])
    rho_d, pts_d = _on_device(density, points)
    depth = radiological_depth(rho_d, SPACING_ZYX, ORIGIN_XYZ, source, pts_d)
    assert type(depth).__module__.split(".")[0] == ("cupy" if xp_name == "cupy" else "numpy")
    _assert_depth_close(depth, _path_in_box(source, points, lo, hi))


@pytest.mark.parametrize("source", [SOURCES["anterior"], SOURCES["oblique_xyz"], SOURCES["inside_box"]])
def test_slab_of_lung_in_water(xp_name, rng, source):
    # Density 0.3 in the slab j in [14, 20) inside the water box: depth is the path in
    # water plus 0.3 times the path in the slab.
    slab = (BOX_KJI[0], (14, 20), BOX_KJI[2])
    density = np.zeros(SHAPE, dtype=np.float32)
    _fill(density, BOX_KJI, 1.0)
    _fill(density, slab, 0.3)
    box_lo, box_hi = _voxel_box_mm(BOX_KJI)
    slab_lo, slab_hi = _voxel_box_mm(slab)
    points = np.concatenate([_voxel_centres(BOX_KJI), _points_around_box(rng, 500)])
    expected = _path_in_box(source, points, box_lo, box_hi) - 0.7 * _path_in_box(source, points, slab_lo, slab_hi)
    depth = radiological_depth(*_on_device(density), SPACING_ZYX, ORIGIN_XYZ, source, *_on_device(points))
    _assert_depth_close(depth, expected)


def test_axis_parallel_rays(xp_name):
    # Rays along +y and along -z through voxel interiors (never on a voxel face).
    density = np.zeros(SHAPE, dtype=np.float32)
    _fill(density, BOX_KJI, 1.0)
    lo, hi = _voxel_box_mm(BOX_KJI)
    x, z = 2.3, -3.7
    along_y = np.stack([np.full(9, x), np.linspace(-40.0, 40.0, 9), np.full(9, z)], axis=1)
    depth = radiological_depth(*_on_device(density), SPACING_ZYX, ORIGIN_XYZ, (x, -500.0, z), *_on_device(along_y))
    _assert_depth_close(depth, np.clip(along_y[:, 1], lo[1], hi[1]) - lo[1])
    along_z = np.stack([np.full(9, x), np.full(9, 1.1), np.linspace(-40.0, 40.0, 9)], axis=1)
    depth = radiological_depth(*_on_device(density), SPACING_ZYX, ORIGIN_XYZ, (x, 1.1, 300.0), *_on_device(along_z))
    _assert_depth_close(depth, hi[2] - np.clip(along_z[:, 2], lo[2], hi[2]))


def test_depth_is_linear_in_density(rng):
    density = rng.uniform(0.0, 2.0, size=(12, 14, 16)).astype(np.float32)
    points = rng.uniform(-5.0, 25.0, size=(200, 3))
    source = (300.0, -400.0, 250.0)
    once = radiological_depth(density, (1.5, 1.2, 1.0), (0.0, 0.0, 0.0), source, points)
    twice = radiological_depth(2.0 * density, (1.5, 1.2, 1.0), (0.0, 0.0, 0.0), source, points)
    np.testing.assert_allclose(twice, 2.0 * once, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ reference


def _random_cube(rng: np.random.Generator):
    """20 x 24 x 28 voxels of random density in [0, 2), anisotropic spacing, and its box (mm)."""
    density = rng.uniform(0.0, 2.0, size=(20, 24, 28)).astype(np.float32)
    spacing_zyx = (2.0, 1.5, 1.0)
    origin_xyz = (-10.0, 5.0, 3.0)
    d = np.array(spacing_zyx[::-1])
    lo = np.array(origin_xyz) - 0.5 * d
    hi = lo + np.array(density.shape[::-1]) * d
    return density, spacing_zyx, origin_xyz, lo, hi


CUBE_SOURCES = {
    "far_oblique": (400.0, -300.0, 200.0),
    "far_along_x": (-1000.0, 21.3, 17.9),
    "far_along_z": (5.0, 5.0, 1000.0),
    "inside": (3.0, 20.0, 20.0),
    "near_corner": (-15.0, 0.0, -3.0),
}


@pytest.mark.parametrize("source", list(CUBE_SOURCES.values()), ids=list(CUBE_SOURCES))
def test_random_cube_matches_reference(xp_name, rng, source):
    density, spacing, origin, lo, hi = _random_cube(rng)
    points = rng.uniform(lo - 5.0, hi + 5.0, size=(300, 3))
    expected = radiological_depth_reference(density, spacing, origin, source, points)
    assert expected.max() > 20.0  # the rays do cross the cube
    depth = radiological_depth(*_on_device(density), spacing, origin, source, *_on_device(points))
    _assert_depth_close(depth, expected)


@pytest.mark.parametrize(
    ("source", "offset_mm"),
    [((-500.0, -500.0, 5.0), 0.0), ((-500.5, -500.5, 5.2), 0.5)],
    ids=["through_voxel_centres", "through_voxel_edges"],
)
def test_diagonal_rays(rng, source, offset_mm):
    # Isotropic 1 mm voxels, rays at exactly 45 degrees in x-y: two axes cross together at
    # every voxel (through voxel centres, or exactly through the voxel edges).
    density = rng.uniform(0.0, 2.0, size=(12, 30, 30)).astype(np.float32)
    i = np.arange(30.0)
    points = np.stack([i + offset_mm, i + offset_mm, np.full(30, source[2])], axis=1)
    expected = radiological_depth_reference(density, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), source, points)
    _assert_depth_close(radiological_depth(density, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), source, points), expected)


def test_many_blocks_keep_point_order(rng):
    # Enough points for many vectorised blocks of different step counts (and, on NumPy,
    # several worker threads); results must come back in the callers' order.
    density, spacing, origin, lo, hi = _random_cube(rng)
    points = rng.uniform(lo - 2.0, hi + 2.0, size=(20000, 3))
    source = (250.0, 180.0, -320.0)
    depth = radiological_depth(density, spacing, origin, source, points)
    pick = rng.choice(len(points), size=200, replace=False)
    expected = radiological_depth_reference(density, spacing, origin, source, points[pick])
    _assert_depth_close(depth[pick], expected)


def test_reference_on_a_hand_computed_ray():
    # 3 voxels along x of 2 mm, densities 1, 2, 3, centres at x = 0, 2, 4 (box x in [-1, 5]).
    density = np.array([[[1.0, 2.0, 3.0]]], dtype=np.float32)
    source = (-10.0, 0.0, 0.0)
    points = np.array([[-2.0, 0.0, 0.0], [0.5, 0.0, 0.0], [3.5, 0.0, 0.0], [9.0, 0.0, 0.0]])
    # x = 0.5: 1.5 mm of density 1; x = 3.5: 2 * 1 + 2 * 2 + 0.5 * 3; x = 9: 2 * (1 + 2 + 3).
    expected = np.array([0.0, 1.5, 7.5, 12.0])
    np.testing.assert_allclose(
        radiological_depth_reference(density, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), source, points), expected
    )
    _assert_depth_close(radiological_depth(density, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), source, points), expected)


# ------------------------------------------------------------------------- twins


def test_numpy_twin_equals_public_function(rng):
    density, spacing, origin, lo, hi = _random_cube(rng)
    points = rng.uniform(lo, hi, size=(500, 3))
    source = (400.0, -300.0, 200.0)
    public = radiological_depth(density, spacing, origin, source, points)
    twin = radiological_depth_numpy(density, spacing, origin, source, points)
    assert isinstance(twin, np.ndarray)
    np.testing.assert_array_equal(public, twin)


def test_backend_matches_numpy_twin(xp_name, rng):
    density, spacing, origin, lo, hi = _random_cube(rng)
    points = rng.uniform(lo - 5.0, hi + 5.0, size=(5000, 3))
    source = (400.0, -300.0, 200.0)
    depth = radiological_depth(*_on_device(density), spacing, origin, source, *_on_device(points))
    assert type(depth).__module__.split(".")[0] == ("cupy" if xp_name == "cupy" else "numpy")
    _assert_depth_close(depth, radiological_depth_numpy(density, spacing, origin, source, points))


# ------------------------------------------------------------------------ edge cases


def test_points_before_beyond_and_at_the_source():
    density = np.zeros(SHAPE, dtype=np.float32)
    _fill(density, BOX_KJI, 1.0)
    lo, hi = _voxel_box_mm(BOX_KJI)
    source = np.array([1.0, -400.0, 2.0])
    points = np.array(
        [
            source,  # at the source: nothing traversed
            [1.0, -100.0, 2.0],  # in front of the grid
            [1.0, 500.0, 2.0],  # far behind the grid: the whole chord through the box
            [1.0, 0.0, 2.0],  # inside
        ]
    )
    depth = radiological_depth(density, SPACING_ZYX, ORIGIN_XYZ, source, points)
    chord = hi[1] - lo[1]
    _assert_depth_close(depth, np.array([0.0, 0.0, chord, 0.0 - lo[1]]))


def test_empty_inputs_and_zero_density():
    density = np.zeros(SHAPE, dtype=np.float32)
    empty = radiological_depth(density, SPACING_ZYX, ORIGIN_XYZ, (0.0, 0.0, 0.0), np.zeros((0, 3)))
    assert empty.shape == (0,) and empty.dtype == np.float32
    zero = radiological_depth(density, SPACING_ZYX, ORIGIN_XYZ, (0.0, -500.0, 0.0), np.ones((4, 3)))
    np.testing.assert_array_equal(zero, np.zeros(4, dtype=np.float32))


def test_float32_points_and_list_geometry(rng):
    density = np.zeros(SHAPE, dtype=np.float32)
    _fill(density, BOX_KJI, 1.0)
    lo, hi = _voxel_box_mm(BOX_KJI)
    points = _voxel_centres(BOX_KJI).astype(np.float32)
    source = [0.0, -1000.0, 0.0]
    depth = radiological_depth(density, list(SPACING_ZYX), np.array(ORIGIN_XYZ), source, points)
    _assert_depth_close(depth, _path_in_box(source, points.astype(np.float64), lo, hi))


@pytest.mark.parametrize(
    ("density", "spacing", "source", "points", "match"),
    [
        (np.ones((4, 4), np.float32), SPACING_ZYX, (0, 0, 0), np.zeros((1, 3)), "3-D"),
        (np.ones(SHAPE, np.float32), (1.0, 0.0, 1.0), (0, 0, 0), np.zeros((1, 3)), "positive"),
        (np.ones(SHAPE, np.float32), (1.0, 1.0), (0, 0, 0), np.zeros((1, 3)), "three"),
        (np.ones(SHAPE, np.float32), SPACING_ZYX, (0, 0), np.zeros((1, 3)), "source_mm_xyz"),
        (np.ones(SHAPE, np.float32), SPACING_ZYX, (0, np.nan, 0), np.zeros((1, 3)), "source_mm_xyz"),
        (np.ones(SHAPE, np.float32), SPACING_ZYX, (0, 0, 0), np.zeros((3, 2)), r"\(n, 3\)"),
        (np.ones(SHAPE, np.float32), SPACING_ZYX, (0, 0, 0), np.array([[0.0, np.inf, 0.0]]), "non-finite"),
    ],
)
def test_invalid_inputs_are_refused(density, spacing, source, points, match):
    with pytest.raises(ValueError, match=match):
        radiological_depth(density, spacing, ORIGIN_XYZ, source, points)


def test_module_contract():
    # One operation: the public op, its NumPy twin and the test-only reference.
    assert raytrace.__all__ == ["radiological_depth", "radiological_depth_numpy", "radiological_depth_reference"]
