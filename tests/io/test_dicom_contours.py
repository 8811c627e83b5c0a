"""Polygons <-> masks in voxel index units (no DICOM involved)."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.io._dicom_contours import fill_polygons, trace_outlines


def _reference_fill(polygons, ny, nx):
    """Slow even-odd point-in-polygon at each voxel centre (float64, one point at a time)."""
    out = np.zeros((ny, nx), dtype=bool)
    for j in range(ny):
        for i in range(nx):
            inside = False
            for rows, cols in polygons:
                n = len(rows)
                for a in range(n):
                    r0, c0, r1, c1 = rows[a], cols[a], rows[(a + 1) % n], cols[(a + 1) % n]
                    if (r0 <= j) != (r1 <= j):
                        c = c0 + (j - r0) * (c1 - c0) / (r1 - r0)
                        if c < i:
                            inside = not inside
            out[j, i] = inside
    return out


def _fill2d(polygons, ny, nx):
    return fill_polygons([(0, r, c) for r, c in polygons], (1, ny, nx))[0]


def test_square_with_hole_and_island():
    outer = (np.array([1.5, 1.5, 8.5, 8.5]), np.array([1.5, 8.5, 8.5, 1.5]))
    hole = (np.array([3.5, 3.5, 6.5, 6.5]), np.array([3.5, 6.5, 6.5, 3.5]))
    island = (np.array([4.6, 4.6, 5.4, 5.4]), np.array([4.6, 5.4, 5.4, 4.6]))  # inside the hole
    expected = np.zeros((11, 11), dtype=bool)
    expected[2:9, 2:9] = True
    expected[4:7, 4:7] = False
    expected[5, 5] = True
    assert np.array_equal(_fill2d([outer, hole, island], 11, 11), expected)


def test_fill_matches_slow_reference_on_random_polygons(rng):
    for _ in range(20):
        polygons = []
        for _ in range(rng.integers(1, 4)):
            n = int(rng.integers(3, 9))
            polygons.append((rng.uniform(-2, 14, n), rng.uniform(-2, 11, n)))
        assert np.array_equal(_fill2d(polygons, 12, 9), _reference_fill(polygons, 12, 9))


def test_fill_circle_is_exact_at_voxel_centres():
    theta = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    r_mm, c_row, c_col = 10.3, 20.2, 19.7
    got = _fill2d([(c_row + r_mm * np.sin(theta), c_col + r_mm * np.cos(theta))], 41, 41)
    jj, ii = np.mgrid[:41, :41]
    d = np.hypot(jj - c_row, ii - c_col)
    clear = np.abs(d - r_mm) > 1e-3  # away from the polygon's chord error
    assert np.array_equal(got[clear], (d < r_mm)[clear])


def test_fill_several_slices_and_vertices_on_rows():
    # A diamond whose vertices sit exactly on voxel-centre rows and columns.
    rows, cols = np.array([0.0, 3.0, 6.0, 3.0]), np.array([3.0, 6.0, 3.0, 0.0])
    mask = fill_polygons([(1, rows, cols), (3, rows, cols)], (4, 7, 7))
    assert not mask[0].any() and not mask[2].any()
    assert np.array_equal(mask[1], mask[3])
    assert np.array_equal(mask[1], _reference_fill([(rows, cols)], 7, 7))


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_trace_then_fill_is_exact_on_random_masks(rng, density):
    for _ in range(40):
        ny, nx = (int(n) for n in rng.integers(1, 16, 2))
        mask = rng.random((ny, nx)) < density
        loops = trace_outlines(mask)
        assert np.array_equal(_fill2d([(lp[:, 0], lp[:, 1]) for lp in loops], ny, nx), mask)
        for lp in loops:
            assert len({tuple(v) for v in lp}) == len(lp) >= 4  # simple polygons
            assert np.all(np.abs(lp - np.rint(lp)) == 0.5)  # on voxel corners


def test_trace_diagonal_neighbours_and_ring():
    diag = np.array([[1, 0], [0, 1]], dtype=bool)
    loops = trace_outlines(diag)
    assert len(loops) == 2 and all(len(lp) == 4 for lp in loops)

    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False
    loops = trace_outlines(ring)
    assert sorted(len(lp) for lp in loops) == [4, 4]  # outer square and the hole
    assert trace_outlines(np.zeros((3, 3), dtype=bool)) == []
