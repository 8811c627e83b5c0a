"""The viewer's host-side geometry: isolines, label placement, meshes, slice composition."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import require_viewer_packages

require_viewer_packages()

from ids_engine.viewer._contours import isoline_segments, label_anchor, nearest_on_segments  # noqa: E402
from ids_engine.viewer._meshes import block_factors, level_mesh, mask_mesh  # noqa: E402
from ids_engine.viewer._style import compose_slice_rgba, isodose_levels  # noqa: E402

pytestmark = pytest.mark.viewer


def test_isoline_of_a_cone_is_a_circle():
    rows, cols = np.mgrid[0:61, 0:81]
    field = np.hypot(rows - 30.2, cols - 40.7)
    segs = isoline_segments(field, 12.5)
    r = np.hypot(segs[..., 0] - 30.2, segs[..., 1] - 40.7)
    assert len(segs) > 50
    # Linear interpolation along cell edges: within a few hundredths of a voxel of the circle.
    np.testing.assert_allclose(r, 12.5, atol=0.05)
    # Closed curve: every endpoint is shared by exactly two segments.
    ends = np.round(segs.reshape(-1, 2), 9)
    _, counts = np.unique(ends, axis=0, return_counts=True)
    assert np.all(counts == 2)


def test_isoline_saddle_and_flat_fields():
    saddle = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert isoline_segments(saddle, 0.5).shape == (2, 2, 2)
    assert isoline_segments(np.ones((5, 5)), 0.5).shape == (0, 2, 2)
    assert isoline_segments(np.ones((1, 5)), 0.5).shape == (0, 2, 2)


def test_nearest_point_and_label_placement():
    segs = np.array([[[0.0, 0.0], [0.0, 10.0]], [[5.0, 0.0], [5.0, 10.0]]])
    p, d = nearest_on_segments(segs, (1.0, 4.0), scale_rc=(2.0, 1.0))
    np.testing.assert_allclose(p, (0.0, 4.0))
    assert d == pytest.approx(2.0)
    assert nearest_on_segments(np.zeros((0, 2, 2)), (0, 0)) == (None, float("inf"))
    up = label_anchor(segs, direction_rc=(-1.0, 0.0))
    np.testing.assert_allclose(up, (0.0, 5.0))
    # A label already there pushes the next one to the other line.
    other = label_anchor(segs, direction_rc=(-1.0, 0.0), avoid_rc=[up], min_separation=3.0)
    np.testing.assert_allclose(other, (5.0, 5.0))
    assert label_anchor(np.zeros((0, 2, 2))) is None


def test_mask_mesh_of_a_ball_in_millimetres():
    spacing = (2.0, 1.0, 1.5)  # (dz, dy, dx) mm
    shape = (40, 70, 50)
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre_mm = np.array([25.0 * 1.5, 35.0 * 1.0, 20.0 * 2.0])  # (x, y, z)
    dist = np.sqrt(((xx * 1.5) - centre_mm[0]) ** 2 + ((yy * 1.0) - centre_mm[1]) ** 2
                   + ((zz * 2.0) - centre_mm[2]) ** 2)
    mesh = mask_mesh(dist <= 20.0, spacing, smooth_voxels=0.0)
    r = np.linalg.norm(mesh.vertices_mm_xyz - centre_mm, axis=1)
    assert not mesh.empty and mesh.faces.max() < len(mesh.vertices_mm_xyz)
    assert abs(np.median(r) - 20.0) < 1.0  # within a voxel of the sphere


def test_level_mesh_downsamples_large_grids_and_handles_empty_levels():
    assert block_factors((300, 97, 96)) == (4, 2, 1)
    dose = np.zeros((10, 300, 20), np.float32)
    dose[3:7, 100:200, 5:15] = 50.0
    mesh = level_mesh(dose, 25.0, (3.0, 1.0, 1.0))
    assert not mesh.empty
    y = mesh.vertices_mm_xyz[:, 1]
    assert 95.0 < y.min() < 105.0 and 195.0 < y.max() < 205.0
    assert level_mesh(dose, 80.0, (3.0, 1.0, 1.0)).empty


def test_compose_slice_window_level_and_wash():
    ct = np.array([[-1000.0, 40.0, 240.0]])
    rgba = compose_slice_rgba(ct, 400.0, 40.0, None, 60.0)
    assert rgba.dtype == np.uint8 and rgba.shape == (1, 3, 4)
    assert tuple(rgba[0, :, 0]) == (0, 128, 255) and np.all(rgba[..., 3] == 255)
    dose = np.array([[0.0, 60.0, 60.0]])
    washed = compose_slice_rgba(ct, 400.0, 40.0, dose, 60.0)
    assert np.array_equal(washed[0, 0], rgba[0, 0])  # no dose, no wash
    assert not np.array_equal(washed[0, 1], rgba[0, 1])
    levels = isodose_levels(60.0)
    assert [lv.label("%") for lv in levels][-1] == "107%" and levels[-1].label("Gy") == "64.2 Gy"
