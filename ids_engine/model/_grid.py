"""The voxel grid and its link to DICOM patient coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Grid"]


def _triple(value, name: str, positive: bool = False) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)
    except TypeError as exc:
        raise ValueError(f"Grid.{name} must be three numbers, got {value!r}") from exc
    if len(t) != 3 or not all(np.isfinite(t)):
        raise ValueError(f"Grid.{name} must be three finite numbers, got {value!r}")
    if positive and min(t) <= 0:
        raise ValueError(f"Grid.{name} must be positive, got {value!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Grid:
    """A regular, axis-aligned voxel grid in DICOM patient coordinates.

    Volumes on this grid are stored with axis order ``(z, y, x)``: index
    ``[k, j, i]`` is slice ``k``, row ``j``, column ``i``. World points are
    DICOM patient coordinates ``(x, y, z)`` in mm (LPS: +x to the patient's
    left, +y posterior, +z superior).

    Parameters
    ----------
    shape_zyx : (nz, ny, nx) voxel counts.
    spacing_mm_zyx : (dz, dy, dx) voxel spacing in mm, all positive.
    origin_mm_xyz : patient coordinate (x, y, z) of the centre of voxel ``[0, 0, 0]``.

    Rows run along +y and columns along +x (DICOM ImageOrientationPatient
    ``[1, 0, 0, 0, 1, 0]``); slices run along +z. Oblique grids are refused at
    import, so every grid here is axis-aligned.
    """

    shape_zyx: tuple[int, int, int]
    spacing_mm_zyx: tuple[float, float, float]
    origin_mm_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(n) for n in self.shape_zyx)
        except TypeError as exc:
            raise ValueError(f"Grid.shape_zyx must be three integers, got {self.shape_zyx!r}") from exc
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"Grid.shape_zyx must be three positive integers, got {self.shape_zyx!r}")
        object.__setattr__(self, "shape_zyx", shape)
        object.__setattr__(self, "spacing_mm_zyx", _triple(self.spacing_mm_zyx, "spacing_mm_zyx", positive=True))
        object.__setattr__(self, "origin_mm_xyz", _triple(self.origin_mm_xyz, "origin_mm_xyz"))

    # ------------------------------------------------------------------ sizes
    @property
    def size(self) -> int:
        """Number of voxels."""
        nz, ny, nx = self.shape_zyx
        return nz * ny * nx

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cm^3."""
        dz, dy, dx = self.spacing_mm_zyx
        return dz * dy * dx / 1000.0

    @property
    def spacing_mm_xyz(self) -> tuple[float, float, float]:
        """Voxel spacing in (x, y, z) order, mm."""
        dz, dy, dx = self.spacing_mm_zyx
        return (dx, dy, dz)

    # ------------------------------------------------------------ coordinates
    def axis_mm(self, axis: str) -> np.ndarray:
        """Voxel-centre coordinates along ``"x"``, ``"y"`` or ``"z"``, mm, float64."""
        k = {"z": 0, "y": 1, "x": 2}[axis]
        o = self.origin_mm_xyz[2 - k]
        return o + self.spacing_mm_zyx[k] * np.arange(self.shape_zyx[k], dtype=np.float64)

    def index_to_world(self, index_zyx) -> np.ndarray:
        """Voxel indices ``(..., 3)`` in (k, j, i) order to patient points ``(..., 3)`` (x, y, z) mm.

        Fractional indices are allowed (a voxel centre sits at an integer index).
        """
        idx = np.asarray(index_zyx, dtype=np.float64)
        if idx.shape[-1] != 3:
            raise ValueError(f"index_zyx must have a last axis of length 3, got shape {idx.shape}")
        sp = np.asarray(self.spacing_mm_zyx)[::-1]
        return np.asarray(self.origin_mm_xyz) + idx[..., ::-1] * sp

    def world_to_index(self, points_xyz) -> np.ndarray:
        """Patient points ``(..., 3)`` (x, y, z) mm to fractional indices ``(..., 3)`` (k, j, i)."""
        p = np.asarray(points_xyz, dtype=np.float64)
        if p.shape[-1] != 3:
            raise ValueError(f"points_xyz must have a last axis of length 3, got shape {p.shape}")
        sp = np.asarray(self.spacing_mm_zyx)[::-1]
        return ((p - np.asarray(self.origin_mm_xyz)) / sp)[..., ::-1]

    def nearest_index(self, points_xyz) -> np.ndarray:
        """Integer index (k, j, i) of the voxel containing each point; raises if outside the grid."""
        idx = np.rint(self.world_to_index(points_xyz)).astype(np.int64)
        shape = np.asarray(self.shape_zyx)
        outside = np.any((idx < 0) | (idx >= shape), axis=-1)
        if np.any(outside):
            bad = np.asarray(points_xyz, dtype=float).reshape(-1, 3)[np.ravel(outside)][0]
            raise ValueError(f"point {tuple(round(float(v), 2) for v in bad)} mm lies outside the grid {self.describe()}")
        return idx

    def contains(self, points_xyz) -> np.ndarray:
        """Boolean: does each point lie inside the grid's voxel boxes?"""
        idx = self.world_to_index(points_xyz)
        shape = np.asarray(self.shape_zyx)
        return np.all((idx > -0.5) & (idx < shape - 0.5), axis=-1)

    def voxel_centres_xyz(self) -> np.ndarray:
        """All voxel centres as a ``(nz, ny, nx, 3)`` float64 array of (x, y, z) mm."""
        z, y, x = np.meshgrid(self.axis_mm("z"), self.axis_mm("y"), self.axis_mm("x"), indexing="ij")
        return np.stack([x, y, z], axis=-1)

    def extent_mm_xyz(self) -> tuple[tuple[float, float], ...]:
        """(min, max) voxel-centre coordinate along x, y and z."""
        return tuple((float(a[0]), float(a[-1])) for a in (self.axis_mm("x"), self.axis_mm("y"), self.axis_mm("z")))

    def describe(self) -> str:
        nz, ny, nx = self.shape_zyx
        dz, dy, dx = self.spacing_mm_zyx
        return f"{nx}x{ny}x{nz} voxels of {dx:g}x{dy:g}x{dz:g} mm (x*y*z)"

    def downsampled(self, factor_zyx: tuple[int, int, int]) -> "Grid":
        """A coarser grid covering the same region, ``factor`` voxels per coarse voxel per axis.

        Coarse voxel 0 is centred on the centre of the first block of fine voxels.
        """
        f = tuple(int(v) for v in factor_zyx)
        shape = tuple(-(-n // k) for n, k in zip(self.shape_zyx, f))
        spacing = tuple(s * k for s, k in zip(self.spacing_mm_zyx, f))
        shift_zyx = [(k - 1) / 2.0 * s for k, s in zip(f, self.spacing_mm_zyx)]
        origin = tuple(o + d for o, d in zip(self.origin_mm_xyz, shift_zyx[::-1]))
        return Grid(shape, spacing, origin)
