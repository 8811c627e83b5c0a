"""Water box and slab box phantoms, and the grid helpers the built-in phantoms share.

All phantoms here are analytic: a voxel belongs to a shape when its centre lies inside
the shape (a centre exactly on a boundary counts as inside). Grids are symmetric about
the patient origin; volumes are stored ``(z, y, x)``.
"""

from __future__ import annotations

import math

import numpy as np

from ..model import Grid, Patient, PointOfInterest, Structure, StructureKind

__all__ = ["slab_box", "water_box"]

RESOLUTIONS = ("clinical", "coarse")

WATER_HU = 0.0
AIR_HU = -1000.0
# -700 HU gives a relative electron density of 0.3 on the default curve
# (linear between -800 HU -> 0.20 and 0 HU -> 1.00).
LUNG_HU = -700.0
# +1000 HU gives 1.55 on the default curve: cortical-bone-like.
BONE_HU = 1000.0

BODY_COLOUR = (0.75, 0.75, 0.75)
SLAB_COLOUR = (0.95, 0.75, 0.10)

# A voxel centre within this distance outside an analytic boundary still counts as inside,
# so that centres lying exactly on a boundary are classified the same way on every platform.
BOUNDARY_TOLERANCE_MM = 1e-6

_BOX_SPACING_MM = {"clinical": 2.0, "coarse": 5.0}


def check_resolution(resolution: str) -> str:
    """Validate a phantom ``resolution`` keyword ("clinical" or "coarse")."""
    r = str(resolution).strip().lower()
    if r not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}")
    return r


def centred_axis(half_fov_mm: float, spacing_mm: float, voxel_at_centre: bool) -> tuple[int, float]:
    """Voxel count and first voxel-centre coordinate of an axis symmetric about 0.

    Parameters
    ----------
    half_fov_mm : the grid must reach at least this far from 0 on both sides, measured
        to the outer voxel *edges*, mm.
    spacing_mm : voxel spacing, mm.
    voxel_at_centre : True puts a voxel centre on 0 (odd count); False puts a voxel
        boundary on 0 (even count).

    Returns
    -------
    (n, origin_mm) : the voxel count and the coordinate of the centre of voxel 0, mm.
    """
    if voxel_at_centre:
        m = max(0, math.ceil(half_fov_mm / spacing_mm - 0.5 - 1e-9))
        n = 2 * m + 1
    else:
        m = max(1, math.ceil(half_fov_mm / spacing_mm - 1e-9))
        n = 2 * m
    return n, -(n - 1) / 2.0 * spacing_mm


def centred_grid(
    half_fov_mm_xyz: tuple[float, float, float],
    spacing_mm_xyz: tuple[float, float, float],
    voxel_at_centre_xyz: tuple[bool, bool, bool] = (True, True, True),
) -> Grid:
    """A grid symmetric about the patient origin covering ``+-half_fov_mm_xyz`` (to voxel edges)."""
    axes = [centred_axis(h, s, c) for h, s, c in zip(half_fov_mm_xyz, spacing_mm_xyz, voxel_at_centre_xyz)]
    (nx, ox), (ny, oy), (nz, oz) = axes
    dx, dy, dz = spacing_mm_xyz
    return Grid((nz, ny, nx), (dz, dy, dx), (ox, oy, oz))


def broadcast_axes(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (x, y, z) mm, float64, shaped to broadcast over (z, y, x)."""
    x = grid.axis_mm("x")[None, None, :]
    y = grid.axis_mm("y")[None, :, None]
    z = grid.axis_mm("z")[:, None, None]
    return x, y, z


def _box_mask(grid: Grid, size_mm_xyz: tuple[float, float, float]) -> np.ndarray:
    x, y, z = broadcast_axes(grid)
    hx, hy, hz = (s / 2.0 + BOUNDARY_TOLERANCE_MM for s in size_mm_xyz)
    return (np.abs(x) <= hx) & (np.abs(y) <= hy) & (np.abs(z) <= hz)


def _box_grid(size_mm_xyz: tuple[float, float, float], resolution: str) -> Grid:
    """A grid with a voxel boundary on every face of the box (when the size is a multiple
    of the spacing) and two voxel layers of air around it."""
    s = _BOX_SPACING_MM[resolution]
    half_fov = tuple(v / 2.0 + 2 * s for v in size_mm_xyz)
    # An even count puts voxel boundaries at 0, +-s, +-2s, ... so a box of size N*s with N
    # even has its faces on voxel boundaries; an odd N wants a voxel centre at 0.
    centre = tuple(abs(round(v / s) - v / s) < 1e-9 and int(round(v / s)) % 2 == 1 for v in size_mm_xyz)
    return centred_grid(half_fov, (s, s, s), centre)


def _check_size(size_mm) -> tuple[float, float, float]:
    try:
        size = tuple(float(v) for v in size_mm)
    except TypeError as exc:
        raise ValueError(f"size_mm must be three lengths (x, y, z) in mm, got {size_mm!r}") from exc
    if len(size) != 3 or not all(np.isfinite(size)) or min(size) <= 0:
        raise ValueError(f"size_mm must be three positive lengths (x, y, z) in mm, got {size_mm!r}")
    return size  # type: ignore[return-value]


def water_box(resolution: str = "clinical", size_mm=(300.0, 300.0, 300.0)) -> Patient:
    """A box of water (0 HU) in air (-1000 HU), centred on the patient origin.

    Geometry: a rectangular box of ``size_mm`` (x, y, z) centred at (0, 0, 0), surrounded
    by two voxel layers of air. Voxels are 2 x 2 x 2 mm ("clinical") or 5 x 5 x 5 mm
    ("coarse"). With the default 300 mm cube the faces lie on voxel boundaries, so the
    box holds exactly 150^3 (clinical) or 60^3 (coarse) voxels; its anterior surface
    is the plane y = -150 mm.

    Source: a generic reference geometry for dose-engine tests (depth doses, profiles,
    output factors), no publication.

    Parameters
    ----------
    resolution : "clinical" (default) or "coarse" (fast tests).
    size_mm : (x, y, z) edge lengths of the box, mm.

    Returns
    -------
    Patient
        HFS patient with ``ct_hu`` float32 (z, y, x); structure "BODY" (external);
        point of interest "ISO" at (0, 0, 0). ``meta`` holds ``size_mm_xyz`` and
        ``anterior_surface_y_mm``.
    """
    res = check_resolution(resolution)
    size = _check_size(size_mm)
    grid = _box_grid(size, res)
    body = _box_mask(grid, size)
    ct = np.where(body, np.float32(WATER_HU), np.float32(AIR_HU)).astype(np.float32)
    return Patient(
        grid=grid,
        ct_hu=ct,
        structures=(Structure("BODY", StructureKind.EXTERNAL, body, grid, BODY_COLOUR),),
        points=(PointOfInterest("ISO", (0.0, 0.0, 0.0)),),
        name=f"water box {size[0]:g}x{size[1]:g}x{size[2]:g} mm",
        meta={
            "phantom": "water_box",
            "resolution": res,
            "size_mm_xyz": size,
            "anterior_surface_y_mm": -size[1] / 2.0,
        },
    )


_SLAB_HU = {"lung": LUNG_HU, "bone": BONE_HU}


def slab_box(
    resolution: str = "clinical",
    material: str = "lung",
    *,
    size_mm=(300.0, 300.0, 300.0),
    slab_depth_mm: tuple[float, float] = (50.0, 110.0),
) -> Patient:
    """A water box with one heterogeneity slab perpendicular to y, for heterogeneity tests.

    Geometry: the box of :func:`water_box` (default 300 x 300 x 300 mm, centred at the
    origin, anterior surface at y = -150 mm) holds a slab spanning all of x and z between
    depths ``slab_depth_mm`` = (50, 110) mm below the anterior surface, i.e. for the
    default box between y = -100 mm and y = -40 mm. A gantry-0 beam (source anterior,
    travelling towards +y) meets 50 mm of water, 60 mm of slab, then 190 mm of water.
    With the default sizes, both slab faces lie on voxel boundaries at both resolutions.

    Materials: "lung" is -700 HU (relative electron density 0.30 with the default density
    curve), "bone" is +1000 HU (1.55). The rest of the box is water (0 HU) and air
    outside (-1000 HU).

    Source: a generic slab-phantom set-up for heterogeneity corrections, no publication.

    Parameters
    ----------
    resolution : "clinical" (2 mm voxels, default) or "coarse" (5 mm voxels).
    material : "lung" or "bone".
    size_mm : (x, y, z) edge lengths of the box, mm.
    slab_depth_mm : (start, end) depth of the slab below the anterior surface along +y, mm.

    Returns
    -------
    Patient
        HFS patient; structures "BODY" (external) and "SLAB" (oar); point "ISO" at
        (0, 0, 0). ``meta["slab_depth_mm"]`` is the (start, end) depth from the anterior
        surface along +y, ``meta["slab_y_mm"]`` the same as patient y coordinates,
        ``meta["slab_hu"]`` the slab's HU and ``meta["anterior_surface_y_mm"]`` the surface.
    """
    res = check_resolution(resolution)
    mat = str(material).strip().lower()
    if mat not in _SLAB_HU:
        raise ValueError(f"material must be one of {sorted(_SLAB_HU)}, got {material!r}")
    size = _check_size(size_mm)
    start, end = (float(v) for v in slab_depth_mm)
    if not 0.0 <= start < end <= size[1]:
        raise ValueError(
            f"slab_depth_mm must satisfy 0 <= start < end <= {size[1]:g} (box depth), got {slab_depth_mm!r}"
        )
    grid = _box_grid(size, res)
    body = _box_mask(grid, size)
    surface_y = -size[1] / 2.0
    y0, y1 = surface_y + start, surface_y + end
    _, y, _ = broadcast_axes(grid)
    slab = body & (y >= y0 - BOUNDARY_TOLERANCE_MM) & (y <= y1 + BOUNDARY_TOLERANCE_MM)
    ct = np.where(body, np.float32(WATER_HU), np.float32(AIR_HU)).astype(np.float32)
    ct[slab] = np.float32(_SLAB_HU[mat])
    return Patient(
        grid=grid,
        ct_hu=ct,
        structures=(
            Structure("BODY", StructureKind.EXTERNAL, body, grid, BODY_COLOUR),
            Structure("SLAB", StructureKind.OAR, slab, grid, SLAB_COLOUR),
        ),
        points=(PointOfInterest("ISO", (0.0, 0.0, 0.0)),),
        name=f"{mat} slab box",
        meta={
            "phantom": "slab_box",
            "resolution": res,
            "material": mat,
            "slab_hu": _SLAB_HU[mat],
            "size_mm_xyz": size,
            "anterior_surface_y_mm": surface_y,
            "slab_depth_mm": (start, end),
            "slab_y_mm": (y0, y1),
        },
    )
