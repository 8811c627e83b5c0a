"""Grid: index <-> patient coordinates, hand-computed values, errors, downsampling."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.model import Grid

# (nz, ny, nx) = (4, 5, 6); (dz, dy, dx) = (2.5, 1.0, 0.5) mm; voxel [0, 0, 0] at (x, y, z) = (-10, 20, 30) mm.
GRID = Grid((4, 5, 6), (2.5, 1.0, 0.5), (-10.0, 20.0, 30.0))


def test_index_to_world_known_values():
    # Index (k, j, i) = (1, 2, 3): x = -10 + 3 * 0.5, y = 20 + 2 * 1.0, z = 30 + 1 * 2.5.
    np.testing.assert_allclose(GRID.index_to_world([1, 2, 3]), [-8.5, 22.0, 32.5])
    np.testing.assert_allclose(GRID.index_to_world([0, 0, 0]), [-10.0, 20.0, 30.0])
    # Last voxel (3, 4, 5): x = -10 + 2.5, y = 20 + 4, z = 30 + 7.5.
    np.testing.assert_allclose(GRID.index_to_world([3, 4, 5]), [-7.5, 24.0, 37.5])
    # Fractional index half-way along z.
    np.testing.assert_allclose(GRID.index_to_world([0.5, 0, 0]), [-10.0, 20.0, 31.25])


def test_world_to_index_known_values():
    np.testing.assert_allclose(GRID.world_to_index([-8.5, 22.0, 32.5]), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(GRID.world_to_index([-10.25, 19.5, 28.75]), [-0.5, -0.5, -0.5])


def test_round_trip(rng):
    idx = rng.uniform(-2.0, 8.0, size=(50, 3))
    np.testing.assert_allclose(GRID.world_to_index(GRID.index_to_world(idx)), idx, atol=1e-12)
    pts = rng.uniform(-50.0, 50.0, size=(7, 5, 3))
    np.testing.assert_allclose(GRID.index_to_world(GRID.world_to_index(pts)), pts, atol=1e-12)


def test_axes_sizes_and_spacing():
    np.testing.assert_allclose(GRID.axis_mm("x"), [-10.0, -9.5, -9.0, -8.5, -8.0, -7.5])
    np.testing.assert_allclose(GRID.axis_mm("y"), [20.0, 21.0, 22.0, 23.0, 24.0])
    np.testing.assert_allclose(GRID.axis_mm("z"), [30.0, 32.5, 35.0, 37.5])
    assert GRID.size == 120
    assert GRID.spacing_mm_xyz == (0.5, 1.0, 2.5)
    assert GRID.voxel_volume_cc == pytest.approx(0.5 * 1.0 * 2.5 / 1000.0)
    assert GRID.extent_mm_xyz() == ((-10.0, -7.5), (20.0, 24.0), (30.0, 37.5))


def test_voxel_centres_match_index_to_world():
    centres = GRID.voxel_centres_xyz()
    assert centres.shape == (4, 5, 6, 3)
    k, j, i = np.indices(GRID.shape_zyx)
    idx = np.stack([k, j, i], axis=-1)
    np.testing.assert_allclose(centres, GRID.index_to_world(idx))


def test_nearest_index_inside_and_on_edges():
    np.testing.assert_array_equal(GRID.nearest_index([-8.4, 22.3, 33.0]), [1, 2, 3])
    # The first voxel reaches 0.25 mm below x = -10 (half of dx); a point just inside rounds to 0.
    np.testing.assert_array_equal(GRID.nearest_index([-10.2, 19.6, 29.0]), [0, 0, 0])
    np.testing.assert_array_equal(
        GRID.nearest_index([[-10.0, 20.0, 30.0], [-7.5, 24.0, 37.5]]), [[0, 0, 0], [3, 4, 5]]
    )


@pytest.mark.parametrize(
    "point",
    [
        [-10.3, 20.0, 30.0],  # 0.3 mm below the lowest x edge (-10.25)
        [-7.2, 20.0, 30.0],  # beyond the highest x edge (-7.25)
        [-9.0, 25.0, 30.0],  # y beyond 24.5
        [-9.0, 22.0, 26.0],  # z below 28.75
    ],
)
def test_nearest_index_outside_raises(point):
    with pytest.raises(ValueError, match="outside the grid"):
        GRID.nearest_index(point)


def test_contains():
    pts = np.array([[-10.2, 20.0, 30.0], [-10.3, 20.0, 30.0], [-7.3, 24.4, 38.7], [-7.3, 24.6, 38.7]])
    np.testing.assert_array_equal(GRID.contains(pts), [True, False, True, False])


def test_downsampled_centres():
    fine = Grid((5, 4, 6), (2.0, 1.0, 0.5), (-10.0, 20.0, 30.0))
    coarse = fine.downsampled((2, 2, 3))
    # Ceil division: 5 / 2 -> 3, 4 / 2 -> 2, 6 / 3 -> 2.
    assert coarse.shape_zyx == (3, 2, 2)
    assert coarse.spacing_mm_zyx == (4.0, 2.0, 1.5)
    # Coarse voxel 0 is centred on the mean of the first block of fine centres:
    # x: mean(-10, -9.5, -9) = -9.5; y: mean(20, 21) = 20.5; z: mean(30, 32) = 31.
    np.testing.assert_allclose(coarse.origin_mm_xyz, [-9.5, 20.5, 31.0])
    # Every complete block: coarse centre = mean of its fine centres.
    fc = fine.voxel_centres_xyz()
    cc = coarse.voxel_centres_xyz()
    for k in range(2):
        for j in range(2):
            for i in range(2):
                block = fc[2 * k : 2 * k + 2, 2 * j : 2 * j + 2, 3 * i : 3 * i + 3].reshape(-1, 3)
                np.testing.assert_allclose(cc[k, j, i], block.mean(axis=0))


def test_downsampled_identity():
    assert GRID.downsampled((1, 1, 1)) == GRID


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"shape_zyx": (4, 0, 6), "spacing_mm_zyx": (1, 1, 1)}, "shape_zyx"),
        ({"shape_zyx": (4, 5), "spacing_mm_zyx": (1, 1, 1)}, "shape_zyx"),
        ({"shape_zyx": (4, 5, 6), "spacing_mm_zyx": (1, -1, 1)}, "spacing_mm_zyx"),
        ({"shape_zyx": (4, 5, 6), "spacing_mm_zyx": (1, 1)}, "spacing_mm_zyx"),
        ({"shape_zyx": (4, 5, 6), "spacing_mm_zyx": (1, 1, 1), "origin_mm_xyz": (0, np.nan, 0)}, "origin_mm_xyz"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Grid(**kwargs)


def test_frozen_and_normalised():
    g = Grid([2.0, 3, 4], [1, 2, 3], [0, 0, 0])
    assert g.shape_zyx == (2, 3, 4) and all(isinstance(n, int) for n in g.shape_zyx)
    assert g.spacing_mm_zyx == (1.0, 2.0, 3.0)
    with pytest.raises(AttributeError):
        g.shape_zyx = (1, 1, 1)  # type: ignore[misc]


def test_bad_index_shape():
    with pytest.raises(ValueError, match="last axis"):
        GRID.index_to_world([1, 2])
    with pytest.raises(ValueError, match="last axis"):
        GRID.world_to_index(np.zeros((3, 2)))
