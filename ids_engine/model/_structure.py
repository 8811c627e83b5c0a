"""Structures (targets, organs at risk, the external contour) and their algebra."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from scipy import ndimage

from ._grid import Grid

__all__ = [
    "Structure",
    "StructureKind",
    "contract",
    "expand",
    "intersection",
    "subtract",
    "union",
]

# A palette for structures that come without a colour (RGB, 0..1).
_PALETTE = (
    (0.90, 0.10, 0.10),
    (0.10, 0.60, 0.95),
    (0.10, 0.80, 0.20),
    (0.95, 0.75, 0.10),
    (0.70, 0.30, 0.90),
    (0.95, 0.45, 0.10),
    (0.10, 0.85, 0.85),
    (0.90, 0.40, 0.70),
)


def default_colour(i: int) -> tuple[float, float, float]:
    """The i-th colour of the default palette (RGB in 0..1)."""
    return _PALETTE[i % len(_PALETTE)]


class StructureKind(str, Enum):
    """What a structure is for: the target, an organ at risk, or the external (body) contour."""

    TARGET = "target"
    OAR = "oar"
    EXTERNAL = "external"

    @classmethod
    def parse(cls, value: "str | StructureKind") -> "StructureKind":
        if isinstance(value, StructureKind):
            return value
        v = str(value).strip().lower()
        aliases = {
            "target": cls.TARGET, "ptv": cls.TARGET, "ctv": cls.TARGET, "gtv": cls.TARGET,
            "oar": cls.OAR, "organ": cls.OAR, "avoidance": cls.OAR, "organ_at_risk": cls.OAR,
            "external": cls.EXTERNAL, "body": cls.EXTERNAL,
        }
        if v not in aliases:
            raise ValueError(f"structure kind {value!r} is not one of target, oar, external")
        return aliases[v]


@dataclass(frozen=True, eq=False)
class Structure:
    """A named region of interest on a grid.

    Parameters
    ----------
    name : the structure's name as the planner knows it.
    kind : target, OAR or external.
    mask : bool array, shape ``grid.shape_zyx`` (z, y, x), True inside.
    grid : the grid the mask lives on.
    colour : RGB in 0..1.
    meta : extra fields kept from the source (e.g. matRad objectives), read-only use.
    """

    name: str
    kind: StructureKind
    mask: np.ndarray
    grid: Grid
    colour: tuple[float, float, float] = (1.0, 0.0, 0.0)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("Structure.name must be a non-empty string")
        object.__setattr__(self, "kind", StructureKind.parse(self.kind))
        mask = np.asarray(self.mask)
        if mask.shape != self.grid.shape_zyx:
            raise ValueError(
                f"Structure {self.name!r}: mask shape {mask.shape} does not match grid shape {self.grid.shape_zyx}"
            )
        mask = mask.astype(bool, copy=True)
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)
        colour = tuple(float(c) for c in self.colour)
        if len(colour) != 3 or min(colour) < 0 or max(colour) > 1:
            raise ValueError(f"Structure {self.name!r}: colour must be RGB in 0..1, got {self.colour!r}")
        object.__setattr__(self, "colour", colour)

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def volume_cc(self) -> float:
        """Volume in cm^3 (voxel count times voxel volume)."""
        return self.voxel_count * self.grid.voxel_volume_cc

    @property
    def is_empty(self) -> bool:
        return not self.mask.any()

    def centroid_xyz(self) -> np.ndarray:
        """Centre of mass in patient coordinates (x, y, z) mm."""
        if self.is_empty:
            raise ValueError(f"structure {self.name!r} is empty: it has no centroid")
        idx = np.argwhere(self.mask).mean(axis=0)
        return self.grid.index_to_world(idx)

    def renamed(self, name: str, **changes) -> "Structure":
        from dataclasses import replace

        return replace(self, name=name, **changes)


# ------------------------------------------------------------------ algebra
def _check_same_grid(*structures: Structure) -> Grid:
    grid = structures[0].grid
    for s in structures[1:]:
        if s.grid != grid:
            raise ValueError(f"structures {structures[0].name!r} and {s.name!r} lie on different grids")
    return grid


def union(name: str, *structures: Structure, kind=None, colour=None) -> Structure:
    """Voxels in any of the structures."""
    if not structures:
        raise ValueError("union needs at least one structure")
    grid = _check_same_grid(*structures)
    mask = np.logical_or.reduce([s.mask for s in structures])
    first = structures[0]
    return Structure(name, kind or first.kind, mask, grid, colour or first.colour)


def intersection(name: str, *structures: Structure, kind=None, colour=None) -> Structure:
    """Voxels in all of the structures."""
    if not structures:
        raise ValueError("intersection needs at least one structure")
    grid = _check_same_grid(*structures)
    mask = np.logical_and.reduce([s.mask for s in structures])
    first = structures[0]
    return Structure(name, kind or first.kind, mask, grid, colour or first.colour)


def subtract(name: str, base: Structure, *others: Structure, kind=None, colour=None) -> Structure:
    """Voxels of ``base`` that lie in none of ``others``."""
    grid = _check_same_grid(base, *others)
    mask = base.mask.copy()
    for o in others:
        mask &= ~o.mask
    return Structure(name, kind or base.kind, mask, grid, colour or base.colour)


def _margin_mask(mask: np.ndarray, grid: Grid, margin_mm: float) -> np.ndarray:
    """Expand (margin > 0) or contract (margin < 0) a mask by an isotropic margin in mm.

    Uses the exact Euclidean distance transform with the grid's (anisotropic)
    spacing: a voxel joins the expansion when its centre lies within
    ``margin_mm`` of a voxel centre of the original mask; contraction keeps
    voxels whose centre is farther than ``|margin_mm|`` from every outside voxel
    centre.
    """
    if margin_mm == 0:
        return mask.copy()
    sampling = grid.spacing_mm_zyx
    if margin_mm > 0:
        if not mask.any():
            return mask.copy()
        dist = ndimage.distance_transform_edt(~mask, sampling=sampling)
        return dist <= margin_mm + 1e-9
    # Pad so that the grid border counts as outside (a structure touching the
    # border shrinks from it too).
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=sampling)[1:-1, 1:-1, 1:-1]
    return dist > -margin_mm + 1e-9


def expand(name: str, structure: Structure, margin_mm: float, kind=None, colour=None) -> Structure:
    """The structure grown by ``margin_mm`` in every direction (anisotropic spacing handled)."""
    if margin_mm < 0:
        raise ValueError(f"expand: margin_mm must be >= 0, got {margin_mm}")
    mask = _margin_mask(structure.mask, structure.grid, float(margin_mm))
    return Structure(name, kind or structure.kind, mask, structure.grid, colour or structure.colour)


def contract(name: str, structure: Structure, margin_mm: float, kind=None, colour=None) -> Structure:
    """The structure shrunk by ``margin_mm`` in every direction (anisotropic spacing handled)."""
    if margin_mm < 0:
        raise ValueError(f"contract: margin_mm must be >= 0, got {margin_mm}")
    mask = _margin_mask(structure.mask, structure.grid, -float(margin_mm))
    return Structure(name, kind or structure.kind, mask, structure.grid, colour or structure.colour)
