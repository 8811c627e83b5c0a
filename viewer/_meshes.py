"""Triangle meshes of masks and dose levels for the 3D view (host NumPy; vispy's marching cubes).

scipy/scikit-image marching cubes are not available here, so this uses
``vispy.geometry.isosurface``. That function keeps its edge shifts as uint8 and so wraps
around (with an overflow warning) on axes of 256 or more samples; every volume is
block-averaged below that size first, which also keeps the meshes light enough to redraw
during a drag.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from vispy.geometry.isosurface import isosurface

__all__ = ["SurfaceMesh", "block_factors", "mask_mesh", "level_mesh"]

MAX_SAMPLES_PER_AXIS = 96


@dataclass(frozen=True, eq=False)
class SurfaceMesh:
    """A triangle mesh in patient-grid millimetres.

    vertices_mm_xyz : (n, 3) float32, (x, y, z) mm measured from the centre of voxel [0, 0, 0]
        along the grid axes (add the grid origin for DICOM patient coordinates).
    faces : (m, 3) uint32 vertex indices.
    """

    vertices_mm_xyz: np.ndarray
    faces: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.faces) == 0


def block_factors(shape_zyx, max_samples: int = MAX_SAMPLES_PER_AXIS) -> tuple[int, int, int]:
    """Per-axis block sizes that bring every axis to at most ``max_samples`` samples."""
    return tuple(max(1, -(-int(n) // max_samples)) for n in shape_zyx)


def _block_mean(volume: np.ndarray, factors) -> np.ndarray:
    v = np.asarray(volume, np.float32)
    if all(f == 1 for f in factors):
        return v
    pad = [(0, (-n) % f) for n, f in zip(v.shape, factors)]
    v = np.pad(v, pad, mode="edge")
    nz, ny, nx = (n // f for n, f in zip(v.shape, factors))
    fz, fy, fx = factors
    return v.reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5))


def _mesh(field: np.ndarray, level: float, factors, spacing_mm_zyx) -> SurfaceMesh:
    # Pad with a value below the level so surfaces that touch the grid's edge are closed.
    low = float(min(field.min(), level)) - 1.0
    f = np.pad(field, 1, mode="constant", constant_values=low)
    if not (np.any(f >= level) and np.any(f < level)):
        return SurfaceMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint32))
    with warnings.catch_warnings():
        # vispy's uint8 edge shifts overflow by design of its tables; exact below 256 samples.
        warnings.simplefilter("ignore", RuntimeWarning)
        verts, faces = isosurface(np.ascontiguousarray(f), float(level))
    verts = np.asarray(verts, np.float64) - 1.0  # undo the padding
    fz, fy, fx = factors
    block = np.array([fz, fy, fx], np.float64)
    # Block b covers fine voxels b*f .. b*f + f - 1: its centre is b*f + (f - 1)/2.
    index_zyx = verts * block + (block - 1.0) / 2.0
    mm_xyz = (index_zyx * np.asarray(spacing_mm_zyx, np.float64))[:, ::-1]
    return SurfaceMesh(mm_xyz.astype(np.float32), np.asarray(faces, np.uint32))


def mask_mesh(mask: np.ndarray, spacing_mm_zyx, smooth_voxels: float = 0.8) -> SurfaceMesh:
    """Surface of a bool (z, y, x) mask, lightly smoothed so it does not look like Lego."""
    factors = block_factors(mask.shape)
    field = _block_mean(mask, factors)
    if smooth_voxels > 0:
        field = ndimage.gaussian_filter(field, smooth_voxels)
    return _mesh(field, 0.5, factors, spacing_mm_zyx)


def level_mesh(dose_gy: np.ndarray, level_gy: float, spacing_mm_zyx) -> SurfaceMesh:
    """Isodose surface of a dose cube (Gy, (z, y, x)) at ``level_gy``."""
    factors = block_factors(dose_gy.shape)
    return _mesh(_block_mean(dose_gy, factors), level_gy, factors, spacing_mm_zyx)
