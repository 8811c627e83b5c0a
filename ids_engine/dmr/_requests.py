"""Dose shaping requests (frozen values), their dict form (journal, scripts) and region masks.

How each request turns into voxels and bands is in :mod:`ids_engine.dmr._resolve`, one
resolver per request kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "EraseSpot",
    "MoveIsodoseLine",
    "MoveIsodoseSurface",
    "Pin",
    "Request",
    "RequestError",
    "SetVoxelDose",
    "Unpin",
    "request_from_dict",
]


class RequestError(ValueError):
    """A request that cannot be carried out; the plan is left untouched."""


@dataclass(frozen=True)
class SetVoxelDose:
    """Set the dose of one voxel (CT index (k, j, i)) to ``dose_gy``."""

    index_zyx: tuple[int, int, int]
    dose_gy: float
    kind: str = "set_voxel_dose"

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_zyx", tuple(int(v) for v in self.index_zyx))
        if len(self.index_zyx) != 3:
            raise RequestError("SetVoxelDose.index_zyx must be three integers")
        if not np.isfinite(self.dose_gy) or self.dose_gy < 0:
            raise RequestError(f"SetVoxelDose.dose_gy must be a non-negative dose, got {self.dose_gy}")
        object.__setattr__(self, "dose_gy", float(self.dose_gy))


@dataclass(frozen=True)
class MoveIsodoseLine:
    """Drag a segment of the ``level_gy`` isodose line on a slice from ``start`` to ``end``.

    ``axis`` is the slice normal ("z": axial, "y": coronal, "x": sagittal), ``slice_index`` the
    slice, ``start_rc`` / ``end_rc`` (row, column) positions on that slice in voxel units (rows
    and columns of the 2D slice array, e.g. (j, i) for an axial slice). The swept band is the
    segment widened to ``width_mm``. Dragging out of the isodose region (the end lies where the
    dose is below the level) pushes the line outwards: swept voxels below the level are raised
    to just above it; dragging into the region pulls it inwards: swept voxels above the level
    are lowered to just below it.
    """

    axis: str
    slice_index: int
    level_gy: float
    start_rc: tuple[float, float]
    end_rc: tuple[float, float]
    width_mm: float = 6.0
    kind: str = "move_isodose_line"

    def __post_init__(self) -> None:
        if self.axis not in ("z", "y", "x"):
            raise RequestError(f"MoveIsodoseLine.axis must be 'z', 'y' or 'x', got {self.axis!r}")
        if not self.level_gy > 0:
            raise RequestError(f"MoveIsodoseLine.level_gy must be positive, got {self.level_gy}")
        if not self.width_mm > 0:
            raise RequestError(f"MoveIsodoseLine.width_mm must be positive, got {self.width_mm}")
        object.__setattr__(self, "start_rc", tuple(float(v) for v in self.start_rc))
        object.__setattr__(self, "end_rc", tuple(float(v) for v in self.end_rc))
        object.__setattr__(self, "slice_index", int(self.slice_index))


@dataclass(frozen=True)
class MoveIsodoseSurface:
    """Drag the ``level_gy`` isodose surface from ``start_zyx`` to ``end_zyx`` (CT voxel units);
    the swept capsule of radius ``radius_mm`` is the requested feature (same rule as the line)."""

    level_gy: float
    start_zyx: tuple[float, float, float]
    end_zyx: tuple[float, float, float]
    radius_mm: float = 4.0
    kind: str = "move_isodose_surface"

    def __post_init__(self) -> None:
        if not self.level_gy > 0:
            raise RequestError(f"MoveIsodoseSurface.level_gy must be positive, got {self.level_gy}")
        if not self.radius_mm > 0:
            raise RequestError(f"MoveIsodoseSurface.radius_mm must be positive, got {self.radius_mm}")
        object.__setattr__(self, "start_zyx", tuple(float(v) for v in self.start_zyx))
        object.__setattr__(self, "end_zyx", tuple(float(v) for v in self.end_zyx))


@dataclass(frozen=True)
class EraseSpot:
    """Bring the voxels of a region (a ball of ``radius_mm`` around ``centre_zyx``, optionally
    restricted to one structure) to within [``low_gy``, ``high_gy``]."""

    centre_zyx: tuple[float, float, float]
    radius_mm: float
    low_gy: float
    high_gy: float
    structure: str | None = None
    kind: str = "erase_spot"

    def __post_init__(self) -> None:
        if not (0 <= self.low_gy <= self.high_gy):
            raise RequestError(f"EraseSpot bounds must satisfy 0 <= low <= high, got [{self.low_gy}, {self.high_gy}]")
        if not self.radius_mm > 0:
            raise RequestError("EraseSpot.radius_mm must be positive")
        object.__setattr__(self, "centre_zyx", tuple(float(v) for v in self.centre_zyx))


@dataclass(frozen=True)
class Pin:
    """Mark a ball (``radius_mm`` around ``centre_zyx``) whose dose recovery must keep."""

    name: str
    centre_zyx: tuple[float, float, float]
    radius_mm: float
    kind: str = "pin"

    def __post_init__(self) -> None:
        if not self.radius_mm > 0:
            raise RequestError(f"Pin.radius_mm must be positive, got {self.radius_mm}")
        object.__setattr__(self, "centre_zyx", tuple(float(v) for v in self.centre_zyx))


@dataclass(frozen=True)
class Unpin:
    """Remove a pin by name."""

    name: str
    kind: str = "unpin"


Request = SetVoxelDose | MoveIsodoseLine | MoveIsodoseSurface | EraseSpot | Pin | Unpin

_KINDS = {c.__dataclass_fields__["kind"].default: c for c in (SetVoxelDose, MoveIsodoseLine, MoveIsodoseSurface, EraseSpot, Pin, Unpin)}


def request_to_dict(req) -> dict:
    return asdict(req)


def request_from_dict(d: dict):
    """Rebuild a request from its dict form (journal)."""
    try:
        cls = _KINDS[d["kind"]]
    except KeyError as exc:
        raise RequestError(f"unknown request kind {d.get('kind')!r}") from exc
    return cls(**{k: v for k, v in d.items()})


def ball_mask(shape_zyx, spacing_mm_zyx, centre_zyx, radius_mm) -> np.ndarray:
    """Bool mask of voxels whose centre lies within ``radius_mm`` of a point (voxel units)."""
    return capsule_mask(shape_zyx, spacing_mm_zyx, centre_zyx, centre_zyx, radius_mm)


def capsule_mask(shape_zyx, spacing_mm_zyx, a_zyx, b_zyx, radius_mm) -> np.ndarray:
    """Bool mask of voxels within ``radius_mm`` of the segment a-b (points in voxel units)."""
    sp = np.asarray(spacing_mm_zyx, float)
    a = np.asarray(a_zyx, float)
    b = np.asarray(b_zyx, float)
    r_vox = radius_mm / sp
    lo = np.maximum(np.floor(np.minimum(a, b) - r_vox - 1), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(a, b) + r_vox + 2), shape_zyx).astype(int)
    out = np.zeros(shape_zyx, bool)
    if np.any(hi <= lo):
        return out
    zz, yy, xx = np.meshgrid(*(np.arange(l, h) for l, h in zip(lo, hi)), indexing="ij")
    p = np.stack([zz, yy, xx], axis=-1).astype(float)
    ab = (b - a) * sp
    pa = (p - a) * sp
    denom = float(ab @ ab)
    t = np.clip((pa @ ab) / denom, 0.0, 1.0) if denom > 0 else np.zeros(p.shape[:-1])
    d = pa - t[..., None] * ab
    inside = np.einsum("...i,...i->...", d, d) <= radius_mm**2 + 1e-9
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = inside
    return out


def subsample(indices: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` indices, evenly spread over the (sorted) input."""
    if indices.size <= limit:
        return indices
    pick = np.linspace(0, indices.size - 1, limit).round().astype(int)
    return indices[pick]
