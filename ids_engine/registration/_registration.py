"""The registration value: a planning CT -> new CT mapping (rigid part plus an optional displacement field).

Frames: every point is a DICOM patient coordinate (x, y, z) in mm; every volume is stored
(z, y, x) on an axis-aligned :class:`~ids_engine.model.Grid`. "planning" is the approved
plan's CT, "new" the later CT of the same patient.

The mapping, planning -> new, is

* rigid part: ``y = R @ x_planning + t`` (``rotation``, ``translation_mm_xyz``);
* deformable part (optional), two fields in the *new* CT's coordinates, float32
  ``(nz, ny, nx, 3)`` holding (dx, dy, dz) mm, sampled on ``field_grid`` (the new grid, or
  a coarser grid over the same region for a large CT):

  - ``displacement_mm_xyz`` (``d``, the "pull" field): a new-CT point ``x_new`` shows the
    anatomy of the rigidly moved planning point ``y = x_new + d(x_new)``, so
    ``x_planning = R.T @ (x_new + d(x_new) - t)``. This is the field an intensity
    registration with the new CT as the *fixed* image returns, and what warping a
    planning volume onto the new grid needs (one lookup per new voxel).
  - ``inverse_displacement_mm_xyz`` (``e``): ``x_new = y + e(y)`` with ``y = R @ x_planning + t``
    (``e`` sampled at ``y``). It inverts ``d`` (``e(y) = -d(y + e(y))``,
    solved by fixed-point iteration, see :func:`invert_displacement`) and maps points and
    volumes the other way.

Fields are interpolated trilinearly; beyond the field grid the edge value is carried on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .._files import atomic_npz, atomic_text
from ..model import Grid

__all__ = [
    "KINDS",
    "Registration",
    "RegistrationError",
    "identity_registration",
    "invert_displacement",
    "rotation_angles_deg",
    "rotation_matrix",
]

KINDS = ("identity", "rigid", "fiducial", "deformable")
_FORMAT = "ids-engine registration 1"
_JSON = "registration.json"
_NPZ = "registration_fields.npz"


class RegistrationError(ValueError):
    """Input a registration cannot use (names the field or file that is wrong)."""


# ------------------------------------------------------------------ rotations
def rotation_matrix(rotation_deg_xyz) -> np.ndarray:
    """3x3 rotation (float64) from angles about the fixed x, y and z axes, degrees.

    ``R = Rz(gamma) @ Ry(beta) @ Rx(alpha)``: rotate about x first, then y, then z (all
    about the patient axes, right-handed, positive = counter-clockwise looking down the axis).
    """
    a = np.asarray(rotation_deg_xyz, dtype=np.float64)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise RegistrationError(f"rotation_deg_xyz must be three finite angles, got {rotation_deg_xyz!r}")
    al, be, ga = np.radians(a)
    ca, sa, cb, sb, cg, sg = math.cos(al), math.sin(al), math.cos(be), math.sin(be), math.cos(ga), math.sin(ga)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cg, -sg, 0], [sg, cg, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_angles_deg(rotation) -> tuple[float, float, float]:
    """The angles (about x, y, z, degrees) of :func:`rotation_matrix` that give ``rotation``."""
    r = np.asarray(rotation, dtype=np.float64)
    beta = -math.asin(max(-1.0, min(1.0, r[2, 0])))
    alpha = math.atan2(r[2, 1], r[2, 2])
    gamma = math.atan2(r[1, 0], r[0, 0])
    return (math.degrees(alpha), math.degrees(beta), math.degrees(gamma))


def rotation_angle_deg(rotation) -> float:
    """The single angle (degrees) of a rotation matrix (axis-angle magnitude)."""
    r = np.asarray(rotation, dtype=np.float64)
    c = (np.trace(r) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


# ------------------------------------------------------------------ fields
def _check_field(value, grid: Grid, name: str) -> np.ndarray:
    f = np.asarray(value, dtype=np.float32)
    if f.shape != tuple(grid.shape_zyx) + (3,):
        raise RegistrationError(f"Registration.{name} must have shape {tuple(grid.shape_zyx) + (3,)} "
                                f"(field grid (z, y, x) by (dx, dy, dz) mm), got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise RegistrationError(f"Registration.{name} holds non-finite values")
    f = np.ascontiguousarray(f)
    f.setflags(write=False)
    return f


def sample_field(field_zyx3: np.ndarray, grid: Grid, points_xyz: np.ndarray) -> np.ndarray:
    """Trilinear sample of a vector field on ``grid`` at points ``(N, 3)`` xyz mm (edge values carried on)."""
    idx = grid.world_to_index(points_xyz).T  # (3, N) k, j, i
    out = np.empty((idx.shape[1], 3), dtype=np.float64)
    for c in range(3):
        out[:, c] = ndimage.map_coordinates(field_zyx3[..., c], idx, order=1, mode="nearest")
    return out


def invert_displacement(field_zyx3: np.ndarray, grid: Grid, *, iterations: int = 30,
                        tolerance_mm: float = 0.01) -> tuple[np.ndarray, dict]:
    """The inverse of a displacement field on one grid, by fixed-point iteration.

    Given ``d`` with ``x -> x + d(x)``, finds ``e`` with ``y -> y + e(y)`` its inverse:
    ``e(y) = -d(y + e(y))``, iterated from ``e = -d`` until no voxel's ``e`` changes by
    ``tolerance_mm`` (converges where the map is invertible, i.e. ``|grad d| < 1``; the
    deformations a smooth registration returns). Trilinear interpolation, edge values
    carried on beyond the grid.

    Returns
    -------
    e : float32 ``(nz, ny, nx, 3)`` mm.
    info : ``{"inverse_iterations", "inverse_residual_max_mm", "inverse_residual_mean_mm"}``,
        the residual being ``|e(y) + d(y + e(y))|`` over the grid (the round-trip error).
    """
    d = np.asarray(field_zyx3, dtype=np.float64)
    shape = tuple(grid.shape_zyx)
    sp = np.asarray(grid.spacing_mm_zyx, dtype=np.float64)[:, None]
    # Index units: (dx, dy, dz) mm -> (dk, dj, di) voxels, flattened to (3, N).
    d_idx = np.stack([d[..., 2], d[..., 1], d[..., 0]]) / sp[:, :, None, None].reshape(3, 1, 1, 1)
    base = np.indices(shape, dtype=np.float64).reshape(3, -1)
    e_idx = -d_idx.reshape(3, -1).copy()
    # The equation holds voxel by voxel (e at y depends on d only), so voxels that have
    # converged leave the iteration: later passes touch only the few that move.
    active = np.arange(base.shape[1])
    it = 0
    for it in range(1, int(iterations) + 1):
        coords = base[:, active] + e_idx[:, active]
        new = -np.stack([ndimage.map_coordinates(d_idx[c], coords, order=1, mode="nearest") for c in range(3)])
        step_mm = np.sqrt((((new - e_idx[:, active]) * sp) ** 2).sum(axis=0))
        e_idx[:, active] = new
        active = active[step_mm >= tolerance_mm]
        if active.size == 0:
            break
    coords = base + e_idx
    r = e_idx + np.stack([ndimage.map_coordinates(d_idx[c], coords, order=1, mode="nearest") for c in range(3)])
    resid = np.sqrt(((r * sp) ** 2).sum(axis=0))
    e_mm = e_idx * sp
    e = np.stack([e_mm[2], e_mm[1], e_mm[0]], axis=-1).reshape(shape + (3,)).astype(np.float32)
    info = {"inverse_iterations": int(it), "inverse_residual_max_mm": float(resid.max()),
            "inverse_residual_mean_mm": float(resid.mean()), "inverse_unconverged_voxels": int(active.size)}
    return e, info


def _points(points, name: str) -> tuple[np.ndarray, tuple]:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] != 3:
        raise RegistrationError(f"{name} must be points (..., 3) in (x, y, z) mm, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise RegistrationError(f"{name} holds non-finite coordinates")
    return p.reshape(-1, 3), p.shape


def _grid_to_json(g: Grid) -> dict:
    return {"shape_zyx": list(g.shape_zyx), "spacing_mm_zyx": list(g.spacing_mm_zyx),
            "origin_mm_xyz": list(g.origin_mm_xyz)}


def _grid_from_json(d: dict, where: str) -> Grid:
    try:
        return Grid(tuple(d["shape_zyx"]), tuple(d["spacing_mm_zyx"]), tuple(d["origin_mm_xyz"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistrationError(f"{where}: bad grid: {exc}") from exc


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


# ------------------------------------------------------------------ the value
@dataclass(frozen=True, eq=False)
class Registration:
    """A planning CT -> new CT mapping (see the module docstring for the frames).

    Parameters
    ----------
    kind : "identity", "rigid", "fiducial" or "deformable".
    planning_grid, new_grid : the two CT grids.
    rotation : 3x3 float64, ``x_new = rotation @ x_planning + translation_mm_xyz`` (rigid part).
    translation_mm_xyz : (3,) float64, mm.
    displacement_mm_xyz : optional float32 ``(nz, ny, nx, 3)`` on ``field_grid``, the pull field ``d``.
    inverse_displacement_mm_xyz : float32, same shape, ``e``; computed from ``d`` when only
        ``d`` is given.
    metrics : JSON-ready figures of how it was made (metric, iterations, residuals, timings).
    field_grid : the grid the fields are sampled on, in the new CT's patient coordinates
        (default ``new_grid``; a coarser grid for a large CT: the fields are smooth and are
        interpolated trilinearly).
    """

    kind: str
    planning_grid: Grid
    new_grid: Grid
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation_mm_xyz: np.ndarray = field(default_factory=lambda: np.zeros(3))
    displacement_mm_xyz: np.ndarray | None = None
    inverse_displacement_mm_xyz: np.ndarray | None = None
    metrics: dict = field(default_factory=dict)
    field_grid: Grid | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RegistrationError(f"Registration.kind {self.kind!r} is not one of {KINDS}")
        for name in ("planning_grid", "new_grid"):
            if not isinstance(getattr(self, name), Grid):
                raise RegistrationError(f"Registration.{name} must be a Grid")
        r = np.asarray(self.rotation, dtype=np.float64)
        if r.shape != (3, 3) or not np.all(np.isfinite(r)):
            raise RegistrationError(f"Registration.rotation must be a finite 3x3 matrix, got shape {r.shape}")
        if np.abs(r @ r.T - np.eye(3)).max() > 1e-6 or np.linalg.det(r) < 0:
            raise RegistrationError("Registration.rotation must be a proper rotation (orthonormal, det +1)")
        t = np.asarray(self.translation_mm_xyz, dtype=np.float64)
        if t.shape != (3,) or not np.all(np.isfinite(t)):
            raise RegistrationError(f"Registration.translation_mm_xyz must be three finite numbers, got {self.translation_mm_xyz!r}")
        r = r.copy()
        t = t.copy()
        r.setflags(write=False)
        t.setflags(write=False)
        object.__setattr__(self, "rotation", r)
        object.__setattr__(self, "translation_mm_xyz", t)
        metrics = dict(self.metrics)
        if self.displacement_mm_xyz is not None:
            fg = self.field_grid if self.field_grid is not None else self.new_grid
            if not isinstance(fg, Grid):
                raise RegistrationError("Registration.field_grid must be a Grid")
            object.__setattr__(self, "field_grid", fg)
            d = _check_field(self.displacement_mm_xyz, fg, "displacement_mm_xyz")
            object.__setattr__(self, "displacement_mm_xyz", d)
            if self.inverse_displacement_mm_xyz is None:
                e, info = invert_displacement(d, fg)
                metrics.update(info)
                object.__setattr__(self, "inverse_displacement_mm_xyz", e)
            else:
                object.__setattr__(self, "inverse_displacement_mm_xyz",
                                   _check_field(self.inverse_displacement_mm_xyz, fg, "inverse_displacement_mm_xyz"))
        elif self.inverse_displacement_mm_xyz is not None:
            raise RegistrationError("Registration.inverse_displacement_mm_xyz given without displacement_mm_xyz")
        elif self.field_grid is not None:
            raise RegistrationError("Registration.field_grid given without displacement_mm_xyz")
        object.__setattr__(self, "metrics", metrics)

    # -------------------------------------------------------------- points
    @property
    def is_deformable(self) -> bool:
        return self.displacement_mm_xyz is not None

    def map_points_xyz(self, points_planning_xyz) -> np.ndarray:
        """Where the anatomy at planning points ``(..., 3)`` (x, y, z mm) lies in the new CT (same shape)."""
        p, shape = _points(points_planning_xyz, "points_planning_xyz")
        y = p @ self.rotation.T + self.translation_mm_xyz
        if self.is_deformable:
            y = y + sample_field(self.inverse_displacement_mm_xyz, self.field_grid, y)
        return y.reshape(shape)

    def map_points_to_planning_xyz(self, points_new_xyz) -> np.ndarray:
        """The inverse of :meth:`map_points_xyz`: new-CT points ``(..., 3)`` to planning points."""
        q, shape = _points(points_new_xyz, "points_new_xyz")
        if self.is_deformable:
            q = q + sample_field(self.displacement_mm_xyz, self.field_grid, q)
        p = (q - self.translation_mm_xyz) @ self.rotation
        return p.reshape(shape)

    # -------------------------------------------------------------- volumes
    @staticmethod
    def _slabs(grid: Grid, voxels: int = 1 << 20):
        """Slices of whole z slices of ``grid``, about ``voxels`` each (bounds the memory of a warp)."""
        nz, ny, nx = grid.shape_zyx
        step = max(1, voxels // (ny * nx))
        for k0 in range(0, nz, step):
            yield k0, min(nz, k0 + step)

    def _planning_index_of_new_voxels(self, k0: int, k1: int) -> np.ndarray:
        """(3, k1 - k0, ny, nx) fractional planning indices (k, j, i) of new voxel centres in slices k0:k1."""
        g = self.new_grid
        shape = (k1 - k0,) + tuple(g.shape_zyx[1:])
        if not self.is_deformable:
            # Affine in index space: idx_p = A @ idx_new + b (no (N, 3) point array needed).
            sp_new = np.diag(np.asarray(g.spacing_mm_zyx)[::-1])  # xyz
            sp_p_inv = np.diag(1.0 / np.asarray(self.planning_grid.spacing_mm_zyx)[::-1])
            a_xyz = sp_p_inv @ self.rotation.T @ sp_new
            b_xyz = sp_p_inv @ (self.rotation.T @ (np.asarray(g.origin_mm_xyz) - self.translation_mm_xyz)
                                - np.asarray(self.planning_grid.origin_mm_xyz))
            perm = [2, 1, 0]
            a = a_xyz[np.ix_(perm, perm)]
            b = b_xyz[perm]
            idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
            idx[0] += k0
            return (a @ idx + b[:, None]).reshape((3,) + shape)
        idx = np.indices(shape, dtype=np.float64)
        idx[0] += k0
        pts = g.index_to_world(np.moveaxis(idx, 0, -1)).reshape(-1, 3)
        if self.field_grid == g:
            pts = pts + self.displacement_mm_xyz[k0:k1].reshape(-1, 3)
        else:
            pts = pts + sample_field(self.displacement_mm_xyz, self.field_grid, pts)
        p = (pts - self.translation_mm_xyz) @ self.rotation
        return np.moveaxis(self.planning_grid.world_to_index(p), -1, 0).reshape((3,) + shape)

    @staticmethod
    def _check_order(order: int) -> None:
        if order not in (0, 1):
            raise RegistrationError(f"order must be 0 (nearest) or 1 (trilinear), got {order!r}")

    @staticmethod
    def _sample(volume: np.ndarray, coords: np.ndarray, order: int, fill: float, out: np.ndarray) -> None:
        # Indices a rounding error away from a voxel centre are snapped onto it, so that a
        # whole-voxel shift copies values exactly instead of blending in 1e-12 of a neighbour.
        near = np.rint(coords)
        coords = np.where(np.abs(coords - near) < 1e-6, near, coords)
        out[...] = ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=float(fill),
                                           prefilter=False)

    def warp_to_new(self, volume_planning, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """A planning volume (z, y, x) (CT, dose) resampled onto ``new_grid`` through the mapping.

        ``order`` 0 nearest, 1 trilinear; new voxels that map outside the planning grid get
        ``fill``. Float32 input stays float32, anything else comes back float64. Works in
        slabs of about a million voxels, so a large CT needs no full-size coordinate arrays.
        """
        self._check_order(order)
        v = _on_grid(volume_planning, self.planning_grid, "volume_planning", "planning")
        out = np.empty(self.new_grid.shape_zyx, v.dtype)
        for k0, k1 in self._slabs(self.new_grid):
            self._sample(v, self._planning_index_of_new_voxels(k0, k1), order, fill, out[k0:k1])
        return out

    def warp_mask_to_new(self, mask_planning) -> np.ndarray:
        """A planning mask (bool, z, y, x) on ``new_grid``: trilinear partial volume >= 0.5."""
        m = _on_grid(np.asarray(mask_planning, np.float32), self.planning_grid, "mask_planning", "planning")
        return self.warp_to_new(m, order=1, fill=0.0) >= 0.5

    def resample_to_planning(self, volume_new, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """A new-CT volume (z, y, x) resampled onto ``planning_grid`` (the inverse of :meth:`warp_to_new`)."""
        self._check_order(order)
        v = _on_grid(volume_new, self.new_grid, "volume_new", "new")
        g = self.planning_grid
        out = np.empty(g.shape_zyx, v.dtype)
        for k0, k1 in self._slabs(g):
            idx = np.indices((k1 - k0,) + tuple(g.shape_zyx[1:]), dtype=np.float64)
            idx[0] += k0
            q = self.map_points_xyz(g.index_to_world(np.moveaxis(idx, 0, -1)).reshape(-1, 3))
            coords = np.moveaxis(self.new_grid.world_to_index(q), -1, 0).reshape((3,) + idx.shape[1:])
            self._sample(v, coords, order, fill, out[k0:k1])
        return out

    def inverted(self) -> "Registration":
        """The new -> planning mapping as a Registration (rigid kinds only)."""
        if self.is_deformable:
            raise RegistrationError("inverted() is only defined for rigid registrations")
        r = self.rotation.T
        return Registration(self.kind, self.new_grid, self.planning_grid, r, -(r @ self.translation_mm_xyz),
                            metrics=dict(self.metrics))

    # -------------------------------------------------------------- reporting
    def summary(self) -> dict:
        """JSON-ready: kind, rotation (degrees about x, y, z, and its total angle), translation, metrics."""
        out = {
            "kind": self.kind,
            "rotation_deg_xyz": [round(v, 6) for v in rotation_angles_deg(self.rotation)],
            "rotation_angle_deg": round(rotation_angle_deg(self.rotation), 6),
            "translation_mm_xyz": [round(float(v), 6) for v in self.translation_mm_xyz],
            "deformable": self.is_deformable,
            "metrics": _jsonable(self.metrics),
        }
        if self.is_deformable:
            mag = np.linalg.norm(self.displacement_mm_xyz, axis=-1)
            out["displacement_max_mm"] = round(float(mag.max()), 4)
            out["displacement_mean_mm"] = round(float(mag.mean()), 4)
        return out

    # -------------------------------------------------------------- files
    def save(self, folder) -> Path:
        """Write ``registration.json`` (and ``registration_fields.npz`` when deformable) into ``folder``, atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": _FORMAT,
            "kind": self.kind,
            "planning_grid": _grid_to_json(self.planning_grid),
            "new_grid": _grid_to_json(self.new_grid),
            "rotation": self.rotation.tolist(),
            "translation_mm_xyz": self.translation_mm_xyz.tolist(),
            "fields": _NPZ if self.is_deformable else None,
            "field_grid": _grid_to_json(self.field_grid) if self.is_deformable else None,
            "metrics": _jsonable(self.metrics),
        }
        if self.is_deformable:
            atomic_npz(folder / _NPZ, {"displacement_mm_xyz": self.displacement_mm_xyz,
                                       "inverse_displacement_mm_xyz": self.inverse_displacement_mm_xyz})
        atomic_text(folder / _JSON, json.dumps(doc, indent=1) + "\n")
        return folder / _JSON

    @classmethod
    def load(cls, folder) -> "Registration":
        """Read what :meth:`save` wrote (``folder`` or the ``registration.json`` path itself)."""
        path = Path(folder)
        if path.is_dir():
            path = path / _JSON
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise RegistrationError(f"{path}: no registration file") from exc
        except (OSError, ValueError) as exc:
            raise RegistrationError(f"{path}: cannot read registration: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise RegistrationError(f"{path}: format: not an ids-engine registration (expected {_FORMAT!r})")
        try:
            kw = dict(kind=doc["kind"], planning_grid=_grid_from_json(doc["planning_grid"], f"{path}: planning_grid"),
                      new_grid=_grid_from_json(doc["new_grid"], f"{path}: new_grid"),
                      rotation=np.asarray(doc["rotation"], dtype=np.float64),
                      translation_mm_xyz=np.asarray(doc["translation_mm_xyz"], dtype=np.float64),
                      metrics=doc.get("metrics") or {})
        except KeyError as exc:
            raise RegistrationError(f"{path}: missing field {exc.args[0]!r}") from exc
        if doc.get("fields"):
            npz = path.parent / doc["fields"]
            try:
                with np.load(npz) as f:
                    kw["displacement_mm_xyz"] = f["displacement_mm_xyz"]
                    kw["inverse_displacement_mm_xyz"] = f["inverse_displacement_mm_xyz"]
                if doc.get("field_grid"):
                    kw["field_grid"] = _grid_from_json(doc["field_grid"], f"{path}: field_grid")
            except (OSError, KeyError, ValueError) as exc:
                raise RegistrationError(f"{npz}: cannot read the displacement fields: {exc}") from exc
        try:
            return cls(**kw)
        except RegistrationError as exc:
            raise RegistrationError(f"{path}: {exc}") from exc


def identity_registration(planning_grid: Grid, new_grid: Grid) -> Registration:
    """The identity mapping (same patient coordinates in both CTs), e.g. a re-scan on the same couch frame."""
    return Registration("identity", planning_grid, new_grid, metrics={"metric": "none"})


def _on_grid(volume, grid, name: str, which: str) -> np.ndarray:
    """``volume`` as a float array (float32 kept, anything else float64), checked to have
    ``grid``'s shape (:class:`RegistrationError` naming the argument otherwise)."""
    v = np.asarray(volume)
    if v.shape != tuple(grid.shape_zyx):
        raise RegistrationError(f"{name} shape {v.shape} does not match the {which} grid {tuple(grid.shape_zyx)}")
    return v.astype(v.dtype if v.dtype in (np.float32, np.float64) else np.float64, copy=False)
