"""The horseshoe phantom of the IDS paper (Ziegenhein et al. 2016, section 2.2)."""

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

__all__ = ["horseshoe"]

# Analytic geometry, mm, patient coordinates (x left, y posterior, z superior).
TARGET_OUTER_RADIUS_MM = 60.0
TARGET_INNER_RADIUS_MM = 30.0
TARGET_OPENING_DEG = 90.0  # full angle of the gap, centred on +y (posterior)
TARGET_HALF_LENGTH_MM = 35.0
OAR_RADIUS_MM = 25.0
BODY_SEMI_AXES_MM_XY = (150.0, 100.0)
BODY_HALF_LENGTH_MM = 80.0

# Half field of view to the outer voxel edges: the body plus 7, 10 and 4 mm of air.
# With a voxel centred on the origin this gives 161 x 113 x 85 voxels (x, y, z) at
# clinical resolution and 81 x 57 x 43 at coarse.
_HALF_FOV_MM_XYZ = (157.0, 110.0, 84.0)
_SPACING_MM_XYZ = {"clinical": (1.952, 1.952, 2.0), "coarse": (3.904, 3.904, 4.0)}

PTV_COLOUR = (0.90, 0.10, 0.10)
OAR_COLOUR = (0.10, 0.60, 0.95)


def horseshoe_analytic_volumes_cc() -> dict[str, float]:
    """Exact volumes of the analytic shapes, cm^3 (before voxelisation)."""
    kept_fraction = 1.0 - TARGET_OPENING_DEG / 360.0
    ring_area = math.pi * (TARGET_OUTER_RADIUS_MM**2 - TARGET_INNER_RADIUS_MM**2) * kept_fraction
    a, b = BODY_SEMI_AXES_MM_XY
    return {
        "PTV": ring_area * 2.0 * TARGET_HALF_LENGTH_MM / 1000.0,
        "OAR": 4.0 / 3.0 * math.pi * OAR_RADIUS_MM**3 / 1000.0,
        "BODY": math.pi * a * b * 2.0 * BODY_HALF_LENGTH_MM / 1000.0,
    }


def horseshoe(resolution: str = "clinical") -> Patient:
    """The horseshoe phantom: a C-shaped target around a spherical organ at risk, in water.

    Source: Ziegenhein, Kamerling and Oelfke 2016, *Interactive dose shaping part 1*,
    Phys. Med. Biol., section 2.2 and figure 2 (seed 002): "a horseshoe shaped target
    encompassing a spherical organ at risk", voxels of 1.952 x 1.952 x 2 mm, horseshoe
    diameter about 12 cm, nine equispaced coplanar beams. The paper gives no further
    dimensions; the ones below are our choice within that description.

    Geometry (DICOM patient coordinates, mm; the z axis is the horseshoe's axis):

    * "PTV" (target): an annular sector, 30 mm <= sqrt(x^2 + y^2) <= 60 mm (outer
      diameter 120 mm, inner 60 mm), |z| <= 35 mm (70 mm long), with a 90 degree
      opening facing posterior (+y): points with y > |x| are left out.
      Volume 0.75 * pi * (60^2 - 30^2) * 70 mm^3 = 445.3 cm^3.
    * "OAR" (oar): a sphere of radius 25 mm (diameter 50 mm) centred at the origin,
      5 mm from the inner face of the target. Volume 65.45 cm^3.
    * "BODY" (external): a water elliptic cylinder, semi-axes 150 mm (x) and 100 mm (y)
      (300 mm wide, 200 mm deep), |z| <= 80 mm (160 mm long). Volume 7540 cm^3; its z
      faces lie on voxel centres, which count as inside, so the voxelised body is one
      slice longer (about +1 % clinical, +2.5 % coarse).
    * Water is 0 HU everywhere in the body (target and OAR included), air -1000 HU.

    Grids (a voxel centred on the origin, the isocentre):

    * "clinical": 1.952 x 1.952 x 2 mm (x, y, z); 161 x 113 x 85 voxels (x, y, z).
    * "coarse": 3.904 x 3.904 x 4 mm; 81 x 57 x 43 voxels.

    Parameters
    ----------
    resolution : "clinical" (default) or "coarse" (fast tests).

    Returns
    -------
    Patient
        HFS patient; ``ct_hu`` float32 (z, y, x); structures "PTV", "OAR", "BODY";
        point of interest "ISO" at (0, 0, 0). ``meta["analytic_volume_cc"]`` holds the
        exact volumes of the analytic shapes.
    """
    res = check_resolution(resolution)
    grid = centred_grid(_HALF_FOV_MM_XYZ, _SPACING_MM_XYZ[res])
    x, y, z = broadcast_axes(grid)
    tol = BOUNDARY_TOLERANCE_MM

    a, b = BODY_SEMI_AXES_MM_XY
    body = ((x / a) ** 2 + (y / b) ** 2 <= 1.0 + 1e-12) & (np.abs(z) <= BODY_HALF_LENGTH_MM + tol)

    rho = np.hypot(x, y)
    half_opening = math.radians(TARGET_OPENING_DEG / 2.0)
    # The opening is the wedge within half_opening of +y: y * sin(half) > |x| * cos(half).
    in_opening = y * math.sin(half_opening) > np.abs(x) * math.cos(half_opening) + tol
    ptv = (
        (rho >= TARGET_INNER_RADIUS_MM - tol)
        & (rho <= TARGET_OUTER_RADIUS_MM + tol)
        & ~in_opening
        & (np.abs(z) <= TARGET_HALF_LENGTH_MM + tol)
    )
    oar = x**2 + y**2 + z**2 <= (OAR_RADIUS_MM + tol) ** 2

    ct = np.where(body, np.float32(WATER_HU), np.float32(AIR_HU)).astype(np.float32)
    structures = (
        Structure("PTV", StructureKind.TARGET, ptv, grid, PTV_COLOUR),
        Structure("OAR", StructureKind.OAR, oar, grid, OAR_COLOUR),
        Structure("BODY", StructureKind.EXTERNAL, body, grid, BODY_COLOUR),
    )
    return Patient(
        grid=grid,
        ct_hu=ct,
        structures=structures,
        points=(PointOfInterest("ISO", (0.0, 0.0, 0.0)),),
        name="horseshoe (IDS paper)",
        meta={
            "phantom": "horseshoe",
            "resolution": res,
            "source": "Ziegenhein et al. 2016, Phys. Med. Biol., section 2.2 (seed 002)",
            "analytic_volume_cc": horseshoe_analytic_volumes_cc(),
        },
    )
