"""The AAPM TG-119 C-shape phantom, rebuilt analytically from the public data set's figures."""

from __future__ import annotations

import math

import numpy as np

from ..model import Patient, PointOfInterest, Structure, StructureKind
from ._boxes import (
    AIR_HU,
    BODY_COLOUR,
    BOUNDARY_TOLERANCE_MM,
    WATER_HU,
    broadcast_axes,
    centred_grid,
    check_resolution,
)

__all__ = ["tg119"]

# Analytic geometry, mm, patient coordinates (x left, y posterior, z superior); the axis
# of the C and of the core is the z axis.
TARGET_OUTER_RADIUS_MM = 37.0
TARGET_INNER_RADIUS_MM = 15.0
TARGET_MAX_Y_MM = 6.0  # the C is cut open posteriorly: only y <= 6 mm is target
TARGET_HALF_LENGTH_MM = 40.0
CORE_RADIUS_MM = 10.0
CORE_Z_RANGE_MM = (-47.5, 50.0)
BODY_SIZE_MM_XYZ = (303.0, 150.0, 300.0)

_SPACING_MM_XYZ = {"clinical": (3.0, 3.0, 2.5), "coarse": (6.0, 6.0, 5.0)}
# x: a voxel centred on 0; y and z: a voxel boundary on 0, so that the posterior cut of
# the C (y = 6), the inner radius on the y axis and every z boundary fall half-way
# between clinical voxel centres.
_VOXEL_AT_CENTRE_XYZ = (True, False, False)

TARGET_COLOUR = (0.90, 0.10, 0.10)
CORE_COLOUR = (0.10, 0.60, 0.95)

PUBLISHED_VOLUME_CC = {"OuterTarget": 167.8, "Core": 29.7, "BODY": 13539.0}


def _disc_area_below(radius_mm: float, y_max_mm: float) -> float:
    """Area of the disc of ``radius_mm`` about the origin with y <= y_max_mm, mm^2."""
    c = max(-radius_mm, min(radius_mm, y_max_mm))
    return radius_mm**2 * (math.pi / 2.0 + math.asin(c / radius_mm)) + c * math.sqrt(radius_mm**2 - c**2)


def tg119_analytic_volumes_cc() -> dict[str, float]:
    """Exact volumes of the analytic shapes, cm^3 (before voxelisation)."""
    ring = _disc_area_below(TARGET_OUTER_RADIUS_MM, TARGET_MAX_Y_MM) - _disc_area_below(
        TARGET_INNER_RADIUS_MM, TARGET_MAX_Y_MM
    )
    z0, z1 = CORE_Z_RANGE_MM
    return {
        "OuterTarget": ring * 2.0 * TARGET_HALF_LENGTH_MM / 1000.0,
        "Core": math.pi * CORE_RADIUS_MM**2 * (z1 - z0) / 1000.0,
        "BODY": math.prod(BODY_SIZE_MM_XYZ) / 1000.0,
    }


def tg119(resolution: str = "clinical") -> Patient:
    """The AAPM TG-119 C-shape phantom: a C-shaped target around a cylindrical core.

    Source: the AAPM TG-119 IMRT commissioning test suite (Ezzell et al. 2009, Med. Phys.
    36, 5359), C-shape case, rebuilt from the extents and volumes measured on the public
    data set (``shared/notes/tg119-geometry.md``): OuterTarget x -37..35, y -37..5,
    z -40..40 mm, 167.8 cm^3; Core x -10..8, y -10..8, z -47.5..50 mm, 29.7 cm^3; body
    303 x 150 x 300 mm, water-like. The radii below are our fit to those figures.
    The data set's structures are centred about 1 mm off the origin; here the axis of the
    C lies on the z axis.

    Geometry (DICOM patient coordinates, mm):

    * "OuterTarget" (target): 15 mm <= sqrt(x^2 + y^2) <= 37 mm and y <= 6 mm, |z| <= 40 mm:
      a C open towards +y (posterior). Volume 165.1 cm^3 (published 167.8).
    * "Core" (oar): the cylinder sqrt(x^2 + y^2) <= 10 mm, -47.5 <= z <= 50 mm, in the
      hole of the C, 5 mm from it. Volume 30.6 cm^3 (published 29.7).
    * "BODY" (external): the box |x| <= 151.5, |y| <= 75, |z| <= 150 mm (303 x 150 x 300 mm,
      not cropped), water (0 HU); air (-1000 HU) outside. Volume 13,635 cm^3 (published
      13,539).

    Grids (two voxel layers of air around the body):

    * "clinical": 3 x 3 x 2.5 mm (x, y, z), as the data set; 105 x 54 x 124 voxels (x, y, z)
      instead of its 167 x 167 x 129 (the air around the body is cropped).
    * "coarse": 6 x 6 x 5 mm; 55 x 30 x 64 voxels.

    The isocentre "ISO" is the origin, the centre of the C; it is a voxel centre in x
    only (a voxel boundary in y and z).

    Parameters
    ----------
    resolution : "clinical" (default) or "coarse" (fast tests).

    Returns
    -------
    Patient
        HFS patient; ``ct_hu`` float32 (z, y, x); structures "OuterTarget", "Core", "BODY";
        point of interest "ISO" at (0, 0, 0). ``meta`` holds ``analytic_volume_cc``,
        ``published_volume_cc`` and the usual planning goals (``goals``, 50 Gy prescription)
        and beam angles (``gantry_angles_deg``).
    """
    res = check_resolution(resolution)
    spacing = _SPACING_MM_XYZ[res]
    half_body = tuple(v / 2.0 for v in BODY_SIZE_MM_XYZ)
    half_fov = tuple(h + 2.0 * s for h, s in zip(half_body, spacing))
    grid = centred_grid(half_fov, spacing, _VOXEL_AT_CENTRE_XYZ)
    x, y, z = broadcast_axes(grid)
    tol = BOUNDARY_TOLERANCE_MM

    hx, hy, hz = (h + tol for h in half_body)
    body = (np.abs(x) <= hx) & (np.abs(y) <= hy) & (np.abs(z) <= hz)

    rho = np.hypot(x, y)
    target = (
        (rho >= TARGET_INNER_RADIUS_MM - tol)
        & (rho <= TARGET_OUTER_RADIUS_MM + tol)
        & (y <= TARGET_MAX_Y_MM + tol)
        & (np.abs(z) <= TARGET_HALF_LENGTH_MM + tol)
    )
    z0, z1 = CORE_Z_RANGE_MM
    core = (rho <= CORE_RADIUS_MM + tol) & (z >= z0 - tol) & (z <= z1 + tol)

    ct = np.where(body, np.float32(WATER_HU), np.float32(AIR_HU)).astype(np.float32)
    structures = (
        Structure("OuterTarget", StructureKind.TARGET, target, grid, TARGET_COLOUR),
        Structure("Core", StructureKind.OAR, core, grid, CORE_COLOUR),
        Structure("BODY", StructureKind.EXTERNAL, body, grid, BODY_COLOUR),
    )
    return Patient(
        grid=grid,
        ct_hu=ct,
        structures=structures,
        points=(PointOfInterest("ISO", (0.0, 0.0, 0.0)),),
        name="AAPM TG-119 C-shape",
        meta={
            "phantom": "tg119",
            "resolution": res,
            "source": "AAPM TG-119 C-shape (Ezzell et al. 2009), extents from the public data set",
            "analytic_volume_cc": tg119_analytic_volumes_cc(),
            "published_volume_cc": dict(PUBLISHED_VOLUME_CC),
            "prescription_gy": 50.0,
            "goals": (
                "OuterTarget D95 >= 50 Gy",
                "OuterTarget D10 <= 55 Gy",
                "Core D10 <= 25 Gy (easier), <= 10 Gy (harder)",
            ),
            "gantry_angles_deg": tuple(float(a) for a in range(0, 360, 40)),
        },
    )
