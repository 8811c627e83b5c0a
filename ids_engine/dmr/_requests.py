"""Dose shaping requests (frozen values), their dict form (journal, scripts) and region masks.

How each request turns into voxels and bands is in :mod:`ids_engine.dmr._resolve`, one
resolver per request kind.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass

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
    "check_run_options",
    "request_fields",
    "request_from_dict",
]


class RequestError(ValueError):
    """A request that cannot be carried out; the plan is left untouched.

    A bad field also sets ``field`` (its name, e.g. ``"slice_index"``) and ``rule`` (what it
    must be, e.g. ``"must be an integer"``), so a script can name its own entry and value.
    """

    def __init__(self, message: str, *, field: str | None = None, rule: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule


def _bad(what: str, rule: str, value) -> RequestError:
    """The error for field ``what`` ("Class.field") whose ``value`` breaks ``rule``."""
    return RequestError(f"{what} {rule}, got {plain(value)}", field=what.rpartition(".")[2], rule=rule)


# ---------------------------------------------------------------------------- field checks
# Requests come from scripts (JSON), the viewer and the Python API: every field is checked
# on construction and a bad one is a RequestError naming the request, the field and the
# value as the user wrote it (plain numbers, never ``np.float64(0.0)``).
def plain(value) -> str:
    """A value as a user would write it: ``0``, ``-5.5``, ``'x'``, ``[21, 22, 40]``, ``nan``."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(plain(v) for v in value) + "]"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{plain(k)}: {plain(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# Positions (voxel units) and sizes (mm) beyond this are typing errors, not geometry: refused
# before they can overflow the mask arithmetic.
GEOMETRY_LIMIT = 1e6


def _number(what: str, value, *, positive: bool = False, non_negative: bool = False, limit: float | None = None) -> float:
    """A finite real number (optionally > 0 or >= 0, at most ``limit`` in size), as a Python float."""
    if not _is_number(value) or not np.isfinite(value):
        raise _bad(what, "must be a finite number", value)
    if positive and not value > 0:
        raise _bad(what, "must be positive", value)
    if non_negative and value < 0:
        raise _bad(what, "must be non-negative", value)
    if limit is not None and abs(value) > limit:
        raise _bad(what, f"must be at most {plain(limit)}", value)
    return float(value)


def _whole(what: str, value) -> int:
    """An integer (a float with an integral value is accepted), as a Python int."""
    if not _is_number(value) or not np.isfinite(value) or float(value) != int(value):
        raise _bad(what, "must be an integer", value)
    return int(value)


def _vector(what: str, value, n: int, *, integer: bool = False) -> tuple:
    """``n`` finite numbers (integers with ``integer``), as a tuple of Python floats or ints."""
    unit = "integers" if integer else "numbers"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(_is_number(v) for v in value):
        raise _bad(what, f"must be {n} {unit}", value)
    if not all(np.isfinite(v) for v in value):
        raise _bad(what, f"must be {n} finite {unit}", value)
    if integer and any(float(v) != int(v) for v in value):
        raise _bad(what, f"must be {n} integers (voxel indices)", value)
    if any(abs(v) > GEOMETRY_LIMIT for v in value):
        raise _bad(what, f"must be at most {plain(GEOMETRY_LIMIT)} in size (voxel units)", value)
    return tuple(int(v) for v in value) if integer else tuple(float(v) for v in value)


def _name(what: str, value, *, optional: bool = False) -> "str | None":
    if optional and value is None:
        return None
    if not isinstance(value, str) or (not optional and not value.strip()):
        raise _bad(what, "must be a structure name" if optional else "must be a non-empty name", value)
    return value


@dataclass(frozen=True)
class SetVoxelDose:
    """Set the dose of one voxel (CT index (k, j, i)) to ``dose_gy``."""

    index_zyx: tuple[int, int, int]
    dose_gy: float
    kind: str = "set_voxel_dose"

    def __post_init__(self) -> None:
        object.__setattr__(self, "index_zyx", _vector("SetVoxelDose.index_zyx", self.index_zyx, 3, integer=True))
        object.__setattr__(self, "dose_gy", _number("SetVoxelDose.dose_gy", self.dose_gy, non_negative=True))


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
        if not isinstance(self.axis, str) or self.axis not in ("z", "y", "x"):
            raise _bad("MoveIsodoseLine.axis", "must be 'z', 'y' or 'x'", self.axis)
        object.__setattr__(self, "slice_index", _whole("MoveIsodoseLine.slice_index", self.slice_index))
        object.__setattr__(self, "level_gy", _number("MoveIsodoseLine.level_gy", self.level_gy, positive=True))
        object.__setattr__(self, "width_mm", _number("MoveIsodoseLine.width_mm", self.width_mm, positive=True, limit=GEOMETRY_LIMIT))
        object.__setattr__(self, "start_rc", _vector("MoveIsodoseLine.start_rc", self.start_rc, 2))
        object.__setattr__(self, "end_rc", _vector("MoveIsodoseLine.end_rc", self.end_rc, 2))


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
        object.__setattr__(self, "level_gy", _number("MoveIsodoseSurface.level_gy", self.level_gy, positive=True))
        object.__setattr__(self, "radius_mm", _number("MoveIsodoseSurface.radius_mm", self.radius_mm, positive=True, limit=GEOMETRY_LIMIT))
        object.__setattr__(self, "start_zyx", _vector("MoveIsodoseSurface.start_zyx", self.start_zyx, 3))
        object.__setattr__(self, "end_zyx", _vector("MoveIsodoseSurface.end_zyx", self.end_zyx, 3))


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
        object.__setattr__(self, "centre_zyx", _vector("EraseSpot.centre_zyx", self.centre_zyx, 3))
        object.__setattr__(self, "radius_mm", _number("EraseSpot.radius_mm", self.radius_mm, positive=True, limit=GEOMETRY_LIMIT))
        lo = _number("EraseSpot.low_gy", self.low_gy)
        hi = _number("EraseSpot.high_gy", self.high_gy)
        if not (0 <= lo <= hi):
            field = "low_gy" if lo < 0 else "high_gy"
            raise RequestError(f"EraseSpot bounds must satisfy 0 <= low <= high, got [{plain(lo)}, {plain(hi)}]",
                               field=field, rule="must satisfy 0 <= low <= high")
        object.__setattr__(self, "low_gy", lo)
        object.__setattr__(self, "high_gy", hi)
        object.__setattr__(self, "structure", _name("EraseSpot.structure", self.structure, optional=True))


@dataclass(frozen=True)
class Pin:
    """Mark a ball (``radius_mm`` around ``centre_zyx``) whose dose recovery must keep."""

    name: str
    centre_zyx: tuple[float, float, float]
    radius_mm: float
    kind: str = "pin"

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _name("Pin.name", self.name))
        object.__setattr__(self, "centre_zyx", _vector("Pin.centre_zyx", self.centre_zyx, 3))
        object.__setattr__(self, "radius_mm", _number("Pin.radius_mm", self.radius_mm, positive=True, limit=GEOMETRY_LIMIT))


@dataclass(frozen=True)
class Unpin:
    """Remove a pin by name."""

    name: str
    kind: str = "unpin"

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _name("Unpin.name", self.name))


Request = SetVoxelDose | MoveIsodoseLine | MoveIsodoseSurface | EraseSpot | Pin | Unpin

_KINDS = {c.__dataclass_fields__["kind"].default: c for c in (SetVoxelDose, MoveIsodoseLine, MoveIsodoseSurface, EraseSpot, Pin, Unpin)}


def request_to_dict(req) -> dict:
    return asdict(req)


def request_fields(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) field names of a request kind (``kind`` itself not included)."""
    fields = _KINDS[kind].__dataclass_fields__.values()
    required = tuple(f.name for f in fields if f.name != "kind" and f.default is MISSING)
    optional = tuple(f.name for f in fields if f.name != "kind" and f.default is not MISSING)
    return required, optional


def request_from_dict(d: dict):
    """Rebuild a request from its dict form (journal, scripts); RequestError names what is wrong."""
    if not isinstance(d, dict):
        raise RequestError(f"a request is an object with a 'kind' and its fields, got {plain(d)}")
    kind = d.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise RequestError(f"unknown request kind {plain(kind)}; known: {', '.join(_KINDS)}")
    required, optional = request_fields(kind)
    unknown = [k for k in d if k != "kind" and k not in required + optional]
    if unknown:
        raise RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(plain, unknown))} for a "
                           f"{kind} request; expected: {', '.join(required + optional)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise RequestError(f"a {kind} request needs the field{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(map(plain, missing))} (fields: {', '.join(required + optional)})")
    return _KINDS[kind](**{k: v for k, v in d.items() if k != "kind"})


def check_run_options(recovery_steps, max_voxels) -> tuple:
    """Validated ``Session.run`` overrides: (recovery_steps or None, max_voxels or None)."""
    if recovery_steps is not None:
        recovery_steps = _whole("recovery_steps", recovery_steps)
        if recovery_steps < 0:
            raise _bad("recovery_steps", "must be 0 or more", recovery_steps)
    if max_voxels is not None:
        max_voxels = _whole("max_voxels", max_voxels)
        if max_voxels < 1:
            raise _bad("max_voxels", "must be 1 or more", max_voxels)
    return recovery_steps, max_voxels


def ball_mask(shape_zyx, spacing_mm_zyx, centre_zyx, radius_mm) -> np.ndarray:
    """Bool mask of voxels whose centre lies within ``radius_mm`` of a point (voxel units)."""
    return capsule_mask(shape_zyx, spacing_mm_zyx, centre_zyx, centre_zyx, radius_mm)


def capsule_mask(shape_zyx, spacing_mm_zyx, a_zyx, b_zyx, radius_mm) -> np.ndarray:
    """Bool mask of voxels within ``radius_mm`` of the segment a-b (points in voxel units)."""
    sp = np.asarray(spacing_mm_zyx, float)
    a = np.asarray(a_zyx, float)
    b = np.asarray(b_zyx, float)
    r_vox = radius_mm / sp
    # Clipped in floating point first: a point far off the grid must not overflow the cast.
    lo = np.clip(np.floor(np.minimum(a, b) - r_vox - 1), 0, shape_zyx).astype(int)
    hi = np.clip(np.ceil(np.maximum(a, b) + r_vox + 2), 0, shape_zyx).astype(int)
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
