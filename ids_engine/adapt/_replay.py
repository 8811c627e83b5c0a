"""The approved plan's shaping requests carried onto the new CT.

A request holds positions in voxel units on the planning grid ((z, y, x), fractional allowed;
a line request a slice and (row, column) on it). Each position is taken to patient
coordinates (mm, (x, y, z)), mapped through the registration to where that anatomy lies in
the new CT (:meth:`Registration.map_points_xyz`), and taken back to voxel units on the new
grid. Doses, radii and structure names stay as they were (the prescription is the same).
A request whose position falls outside the new grid or outside the new body is skipped, and
the reason reported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ids_engine.dmr import EraseSpot, MoveIsodoseLine, MoveIsodoseSurface, Pin, SetVoxelDose, Unpin

__all__ = ["MappedRequest", "map_request", "map_requests"]

# (slice axis) -> indices into (z, y, x) of the slice's (row, column)
_SLICE_AXES = {"z": (0, (1, 2)), "y": (1, (0, 2)), "x": (2, (0, 1))}


@dataclass(frozen=True)
class MappedRequest:
    """One approved request and its counterpart on the new CT.

    original : the approved request (planning grid voxel units).
    mapped : the request on the new grid, or None when skipped.
    note : why it was skipped, or what the mapping changed (e.g. a line moved off its slice).
    shift_mm : how far its (first) position moved, mm (NaN when it has none).
    """

    original: object
    mapped: object | None
    note: str = ""
    shift_mm: float = float("nan")

    def to_dict(self) -> dict:
        from ids_engine.dmr._requests import request_to_dict

        return {"original": request_to_dict(self.original),
                "mapped": None if self.mapped is None else request_to_dict(self.mapped),
                "skipped": self.mapped is None, "note": self.note,
                "shift_mm": None if not np.isfinite(self.shift_mm) else round(float(self.shift_mm), 3)}


def _map_index(points_zyx, registration) -> np.ndarray:
    """(n, 3) planning-grid voxel positions (z, y, x) -> new-grid voxel positions (float)."""
    p = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    xyz = registration.planning_grid.index_to_world(p)
    return registration.new_grid.world_to_index(np.asarray(registration.map_points_xyz(xyz)).reshape(-1, 3))


def _where_bad(idx_zyx: np.ndarray, grid, body_mask) -> str:
    """'' when every position lies in the new grid and body, else the reason."""
    shape = np.asarray(grid.shape_zyx)
    r = np.rint(idx_zyx).astype(np.int64)
    if np.any((idx_zyx <= -0.5) | (idx_zyx >= shape - 0.5)):
        return "its position maps outside the new CT's grid"
    if body_mask is not None and not np.all(body_mask[r[:, 0], r[:, 1], r[:, 2]]):
        return "its position maps outside the body on the new CT"
    return ""


def _moved_mm(before_zyx, after_zyx, registration) -> float:
    a = registration.planning_grid.index_to_world(np.asarray(before_zyx, float).reshape(-1, 3))[0]
    b = registration.new_grid.index_to_world(np.asarray(after_zyx, float).reshape(-1, 3))[0]
    return float(np.linalg.norm(b - a))


def map_request(req, registration, body_mask_new=None) -> MappedRequest:
    """Map one request (see the module docstring).

    Parameters
    ----------
    req : a request (:mod:`ids_engine.dmr`) with planning-grid voxel positions.
    registration : planning -> new (``map_points_xyz``, ``planning_grid``, ``new_grid``).
    body_mask_new : bool (z, y, x) on the new grid; positions outside it are skipped (None:
        only the grid's bounds are checked).
    """
    if isinstance(req, Unpin):
        return MappedRequest(req, req)
    grid = registration.new_grid
    if isinstance(req, SetVoxelDose):
        new = _map_index([req.index_zyx], registration)
        why = _where_bad(new, grid, body_mask_new)
        if why:
            return MappedRequest(req, None, f"skipped: {why}")
        k = tuple(int(v) for v in np.rint(new[0]))
        return MappedRequest(req, replace(req, index_zyx=k), "", _moved_mm(req.index_zyx, k, registration))
    if isinstance(req, (EraseSpot, Pin)):
        new = _map_index([req.centre_zyx], registration)
        why = _where_bad(new, grid, body_mask_new)
        if why:
            return MappedRequest(req, None, f"skipped: {why}")
        c = tuple(float(v) for v in new[0])
        return MappedRequest(req, replace(req, centre_zyx=c), "", _moved_mm(req.centre_zyx, c, registration))
    if isinstance(req, MoveIsodoseSurface):
        new = _map_index([req.start_zyx, req.end_zyx], registration)
        why = _where_bad(new, grid, body_mask_new)
        if why:
            return MappedRequest(req, None, f"skipped: {why}")
        s, e = (tuple(float(v) for v in p) for p in new)
        return MappedRequest(req, replace(req, start_zyx=s, end_zyx=e), "", _moved_mm(req.start_zyx, s, registration))
    if isinstance(req, MoveIsodoseLine):
        normal, (ra, ca) = _SLICE_AXES[req.axis]
        pts = np.zeros((2, 3))
        for n, rc in enumerate((req.start_rc, req.end_rc)):
            pts[n, normal] = req.slice_index
            pts[n, ra], pts[n, ca] = rc
        new = _map_index(pts, registration)
        why = _where_bad(new, grid, body_mask_new)
        if why:
            return MappedRequest(req, None, f"skipped: {why}")
        # The drag stays a line on the slice nearest to both mapped ends; how far the ends
        # left that slice (a rotation tilts the plane) is reported.
        k = int(np.rint(new[:, normal].mean()))
        off_mm = float(np.abs(new[:, normal] - k).max() * grid.spacing_mm_zyx[normal])
        note = (f"the mapped drag leaves slice {k} by up to {off_mm:.1f} mm (rotation); drawn on that slice"
                if off_mm > 0.5 * grid.spacing_mm_zyx[normal] else "")
        m = replace(req, slice_index=k, start_rc=(float(new[0, ra]), float(new[0, ca])),
                    end_rc=(float(new[1, ra]), float(new[1, ca])))
        return MappedRequest(req, m, note, _moved_mm(pts[0], new[0], registration))
    return MappedRequest(req, None, f"skipped: request kind {getattr(req, 'kind', type(req).__name__)!r} is not mapped")


def map_requests(requests, registration, body_mask_new=None) -> list[MappedRequest]:
    """:func:`map_request` for each request in order. An ``Unpin`` whose ``Pin`` was skipped
    is skipped too (the pin does not exist on the new CT)."""
    out, pins = [], set()
    for req in requests:
        if isinstance(req, Unpin) and req.name not in pins:
            out.append(MappedRequest(req, None, f"skipped: its pin {req.name!r} was skipped"))
            continue
        m = map_request(req, registration, body_mask_new)
        if isinstance(req, Pin) and m.mapped is not None:
            pins.add(req.name)
        out.append(m)
    return out
