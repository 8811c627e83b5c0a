"""Request resolution: one resolver per request kind, pure (request and context in, voxels out).

A resolver turns a shaping request into

* the **columns** of the modification: the voxels whose normalised patches are solved for,
  with their goal doses (``voxels``, ``target_gy``);
* the **feature**: every voxel the request is about, with the band ``[lo, hi]`` (Gy) its dose
  must stay in through recovery and later requests (``feature_voxels``, ``feature_lo``,
  ``feature_hi``, ``feature_goal``);
* **guards** (isodose drags): voxels just beyond the drag end and beside the dragged segment
  that must stay on their side of the dragged level, so the line lands where it was dragged
  and does not move beside the drag;
* optional caps on the target's band (an erase must not move its hot spot elsewhere).

Resolvers read the dose through ``ResolveContext.dose_at`` and never touch a session or an
engine, so they are testable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ._requests import (
    EraseSpot,
    MoveIsodoseLine,
    MoveIsodoseSurface,
    RequestError,
    SetVoxelDose,
    subsample,
)
from ._side_effects import trilinear

__all__ = ["ResolveContext", "Resolved", "resolve"]

INF = np.inf


@dataclass(frozen=True, eq=False)
class ResolveContext:
    """What a resolver may read.

    shape_zyx, spacing_mm_zyx : the CT grid.
    body_mask : bool (z, y, x), the body.
    dose_at : ``dose_at(flat_indices) -> (n,) float64 Gy``, the current dose.
    structure_mask : ``structure_mask(name) -> bool (z, y, x)`` (raises KeyError when unknown).
    prescription_gy : the prescription.
    max_voxels : at most this many columns (patches) for a line, surface or spot request.
    edge_margin_pct : how far past the level a dragged isodose is pushed (% of the level).
    feature_tolerance_gy : half width of a set-voxel-dose feature's band.
    max_dose_gy : requests above this dose are refused.
    guard_gap_mm, guard_width_mm : the beside-guard ring of an isodose drag starts
        ``guard_gap_mm`` beyond the swept band's edge and is ``guard_width_mm`` wide.
    guard_ring_in_max_mm : from this distance to the drag segment on, the voxels inside the
        gap keep their side of the level too (not within half their distance): the line 10 mm
        beside a drag is read from voxels up to ~2 mm nearer (a surface drag's ring starts at
        9 mm; unguarded, such voxels carried the line 1.2 mm in the survey). inf: off.
    beyond_mm : depth of the guard strip past the drag end.
    overshoot_gy : how far a dragged voxel may go past what the drag asks of it (the dose the
        plan would have there if it moved rigidly with the drag).
    min_gradient_pct_per_mm : a drag is refused where the dose changes by less than this (% of
        the level per mm, along the drag, at its start): there the isodose has no position.
    """

    shape_zyx: tuple[int, int, int]
    spacing_mm_zyx: tuple[float, float, float]
    body_mask: np.ndarray
    dose_at: Callable[[np.ndarray], np.ndarray]
    structure_mask: Callable[[str], np.ndarray]
    prescription_gy: float
    max_voxels: int = 24
    edge_margin_pct: float = 1.0
    feature_tolerance_gy: float = 0.3
    max_dose_gy: float = INF
    guard_gap_mm: float = 5.0
    guard_width_mm: float = 6.0
    guard_ring_in_max_mm: float = 8.0
    beyond_mm: float = 4.0
    overshoot_gy: float = 1.2
    min_gradient_pct_per_mm: float = 0.3


@dataclass(frozen=True, eq=False)
class Resolved:
    """A request turned into voxels (flat CT indices) and doses (Gy); see the module docstring."""

    voxels: np.ndarray
    target_gy: np.ndarray
    feature_mask: np.ndarray  # bool (z, y, x)
    feature_voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    feature_lo: np.ndarray = field(default_factory=lambda: np.zeros(0))
    feature_hi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    feature_goal: np.ndarray = field(default_factory=lambda: np.zeros(0))
    guard_voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    guard_lo: np.ndarray = field(default_factory=lambda: np.zeros(0))
    guard_hi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    target_hi_cap_gy: float | None = None
    target_lo_floor_gy: float | None = None
    # An isodose drag: (start_zyx, end_zyx, plane_axis) in voxel units (plane_axis: the slice
    # normal of a line drag, None for a surface); what its side-effect check subtracts as asked.
    drag: tuple | None = None


# ---------------------------------------------------------------------------- helpers
def _check_index(ctx: ResolveContext, index_zyx, what: str) -> int:
    shape = ctx.shape_zyx
    idx = tuple(int(round(float(v))) for v in index_zyx)
    if any(i < 0 or i >= n for i, n in zip(idx, shape)):
        raise RequestError(f"{what}: voxel {idx} lies outside the grid {tuple(int(s) for s in shape)}")
    if not ctx.body_mask[idx]:
        raise RequestError(f"{what}: voxel {idx} lies outside the body")
    return int(np.ravel_multi_index(idx, shape))


def _check_dose(ctx: ResolveContext, dose_gy: float, what: str) -> None:
    if dose_gy > ctx.max_dose_gy:
        raise RequestError(f"{what}: {dose_gy:g} Gy is above the largest dose a request may ask for "
                           f"({ctx.max_dose_gy:g} Gy, DMROptions.max_request_pct of the prescription)")


def _box(shape, lo_f, hi_f):
    lo = np.clip(np.floor(lo_f) - 1, 0, shape).astype(int)  # clipped before the cast (far-off points)
    hi = np.clip(np.ceil(hi_f) + 2, 0, shape).astype(int)
    return lo, hi


def drag_geometry(shape_zyx, spacing_mm_zyx, a_zyx, b_zyx, reach_mm: float, plane_axis: int | None = None):
    """Distances of the voxels near a drag segment a -> b (voxel units), in mm.

    Returns ``(flat, along_mm, perp_mm, seg_mm)`` for the voxels within ``reach_mm`` of the
    segment's box (restricted to the slice ``a[plane_axis]`` when ``plane_axis`` is given):
    ``along_mm`` is the signed position along the drag direction measured from the end point
    (negative before it), ``perp_mm`` the distance from the infinite line through a and b,
    ``seg_mm`` the distance from the segment itself (capsule distance).
    """
    sp = np.asarray(spacing_mm_zyx, float)
    a = np.asarray(a_zyx, float)
    b = np.asarray(b_zyx, float)
    r_vox = reach_mm / sp
    lo, hi = _box(shape_zyx, np.minimum(a, b) - r_vox, np.maximum(a, b) + r_vox)
    if plane_axis is not None:
        k = int(round(a[plane_axis]))
        lo[plane_axis], hi[plane_axis] = k, k + 1
    if np.any(hi <= lo):
        z = np.zeros(0)
        return np.zeros(0, np.int64), z, z, z
    zz, yy, xx = np.meshgrid(*(np.arange(l, h) for l, h in zip(lo, hi)), indexing="ij")
    p = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=-1).astype(float)
    flat = np.ravel_multi_index((zz.ravel(), yy.ravel(), xx.ravel()), shape_zyx)
    ab = (b - a) * sp
    length = float(np.sqrt(ab @ ab))
    pa = (p - a) * sp
    if length > 1e-9:
        d = ab / length
        t = pa @ d
        along = t - length
        perp_vec = pa - t[:, None] * d
        perp = np.sqrt(np.einsum("ij,ij->i", perp_vec, perp_vec))
        tc = np.clip(t, 0.0, length)
        sv = pa - tc[:, None] * d
        seg = np.sqrt(np.einsum("ij,ij->i", sv, sv))
    else:  # a click, not a drag
        seg = np.sqrt(np.einsum("ij,ij->i", pa, pa))
        along = np.zeros_like(seg)
        perp = seg
    return flat.astype(np.int64), along, perp, seg


# ---------------------------------------------------------------------------- resolvers
def resolve_set_voxel_dose(req: SetVoxelDose, ctx: ResolveContext) -> Resolved:
    """One voxel to ``dose_gy``; its feature band is +/- the feature tolerance."""
    flat = _check_index(ctx, req.index_zyx, "set voxel dose")
    _check_dose(ctx, req.dose_gy, "set voxel dose")
    mask = np.zeros(ctx.shape_zyx, bool)
    mask.flat[flat] = True
    tol = ctx.feature_tolerance_gy
    v = np.array([flat], np.int64)
    d = np.array([req.dose_gy], float)
    return Resolved(v, d, mask, v, d - tol, d + tol, d)


def _resolve_drag(req, ctx: ResolveContext, a, b, half_width_mm: float, plane_axis: int | None) -> Resolved:
    """Shared by the 2D line and the 3D surface drag.

    Swept region: voxels within ``half_width_mm`` of the segment a-b, cut flat at the drag end
    (no end cap, so the isodose does not overshoot the end by half the band width).
    Outward drag (the end lies below the level): the swept voxels must end above the level,
    the strip past the end stays below it. Inward: the other way round. Beside the segment, a
    ring of voxels on either side of the level keeps its side (the line does not move there).
    """
    level = float(req.level_gy)
    _check_dose(ctx, level, req.kind)
    end_flat = _check_index(ctx, b, req.kind)
    reach = half_width_mm + ctx.guard_gap_mm + ctx.guard_width_mm + ctx.beyond_mm
    flat, along, perp, seg = drag_geometry(ctx.shape_zyx, ctx.spacing_mm_zyx, a, b, reach, plane_axis)
    inbody = ctx.body_mask.ravel()[flat]
    flat, along, perp, seg = flat[inbody], along[inbody], perp[inbody], seg[inbody]
    tol = 1e-6
    swept = (seg <= half_width_mm + tol) & (along <= tol)
    if not swept.any():
        raise RequestError(f"{req.kind}: the dragged region lies outside the body")
    dose = ctx.dose_at(flat)
    # The level must exist near the drag: a 200 % line where the maximum is 105 % is refused.
    near = seg <= half_width_mm + ctx.guard_gap_mm
    if not (dose[near].min() <= level <= dose[near].max()):
        raise RequestError(
            f"{req.kind}: there is no {level:g} Gy isodose near the drag (the dose there is "
            f"{dose[near].min():.1f}-{dose[near].max():.1f} Gy)")
    # In a flat region an isodose has no well-defined position: a drag there would carry the
    # line by centimetres for a fraction of a percent. Refuse it, saying why.
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    sp = np.asarray(ctx.spacing_mm_zyx, float)
    d_mm = (b_ - a_) * sp
    if np.linalg.norm(d_mm) > 1e-9 and ctx.min_gradient_pct_per_mm > 0:
        step = (d_mm / np.linalg.norm(d_mm)) / sp  # 1 mm along the drag, in voxels
        pts = np.array([a_ - 2 * step, a_ + 2 * step])
        vals = _trilinear(ctx, pts)
        grad = abs(vals[0] - vals[1]) / 4.0 / level * 100.0
        if grad < ctx.min_gradient_pct_per_mm:
            raise RequestError(
                f"{req.kind}: the {level:g} Gy isodose is not well defined where the drag starts: the dose "
                f"changes by only {grad:.2f} % of the level per mm along the drag (at least "
                f"{ctx.min_gradient_pct_per_mm:g} % per mm is needed); set the dose or erase there instead")
    end_dose = float(ctx.dose_at(np.array([end_flat]))[0])
    margin = ctx.edge_margin_pct / 100.0 * level
    eps = 1e-3 * level
    outward = end_dose < level
    sw = flat[swept]
    # What the drag asks of a swept voxel at most: the dose the plan would have there if it
    # moved rigidly with the drag, D(v - drag) (trilinear). Swept voxels may go past the level
    # but not past that by more than the overshoot allowance.
    asked = _shifted_dose(ctx, sw, np.asarray(b, float) - np.asarray(a, float))
    if outward:  # raise the swept voxels above the level
        sel = dose[swept] < level + margin
        goal = level + margin
        f_lo = np.full(sw.size, level + eps)
        f_hi = np.maximum(np.maximum(asked, goal), dose[swept]) + ctx.overshoot_gy
    else:  # lower them below it
        sel = dose[swept] > level - margin
        goal = level - margin
        f_lo = np.minimum(np.minimum(asked, goal), dose[swept]) - ctx.overshoot_gy
        f_hi = np.full(sw.size, level - eps)
    vox = subsample(sw[sel], ctx.max_voxels)
    if vox.size == 0:
        raise RequestError(f"{req.kind}: the isodose already lies where it was dragged")
    mask = np.zeros(ctx.shape_zyx, bool)
    mask.flat[sw] = True
    # Guards: the strip past the end keeps the old side, the ring beside keeps its side.
    beyond = (~swept) & (along > tol) & (along <= ctx.beyond_mm) & (perp <= half_width_mm + tol)
    ring_in = half_width_mm + ctx.guard_gap_mm
    beside = (~swept) & (~beyond) & (seg >= ring_in) & (seg <= ring_in + ctx.guard_width_mm)
    # The inner ring: gap voxels from which the line 10 mm beside is read; their side only.
    inner = (~swept) & (~beyond) & (seg >= min(ring_in, ctx.guard_ring_in_max_mm)) & (seg < ring_in)
    side_margin = 5e-3 * level
    above = dose > level + side_margin
    below = dose < level - side_margin
    # Past the end every voxel keeps its side, however close to the level (in a flat region a
    # small rise would carry the line far past the drag end); beside, only those clearly on
    # one side (a voxel at the level itself cannot be held there).
    if outward:
        g_beyond = beyond & (dose < level - eps)
    else:
        g_beyond = beyond & (dose > level + eps)
    g_beside = (beside | inner) & (above | below)
    guard = g_beyond | g_beside
    g_flat = flat[guard]
    g_above = dose[guard] > level
    g_lo = np.where(g_above, level + eps, -INF)
    g_hi = np.where(g_above, INF, level - eps)
    # Beside the drag a guard also keeps its dose within half its distance from the level:
    # then the level's crossing between two neighbouring guards moves by at most about a
    # quarter of their spacing (the line stays put, not just on the same voxels).
    gd = dose[guard]
    half = 0.5 * np.abs(gd - level)
    side = (g_beside & ~inner)[guard]
    g_lo = np.where(side, np.maximum(g_lo, gd - half), g_lo)
    g_hi = np.where(side, np.minimum(g_hi, gd + half), g_hi)
    return Resolved(vox, np.full(vox.size, goal), mask, sw, f_lo, f_hi, np.full(sw.size, goal),
                    g_flat.astype(np.int64), g_lo, g_hi,
                    drag=(tuple(float(v) for v in a_), tuple(float(v) for v in b_), plane_axis))


def _trilinear(ctx: ResolveContext, points_zyx: np.ndarray) -> np.ndarray:
    """Trilinear dose at points (n, 3) in voxel units, from the voxel doses (clamped to the grid)."""
    return trilinear(ctx.dose_at, ctx.shape_zyx, points_zyx)


def _shifted_dose(ctx: ResolveContext, flat: np.ndarray, shift_zyx: np.ndarray) -> np.ndarray:
    """Trilinear dose at ``voxel - shift`` (voxel units) for each voxel."""
    if flat.size == 0:
        return np.zeros(0)
    p = np.stack(np.unravel_index(flat, ctx.shape_zyx), axis=-1).astype(float) - shift_zyx[None, :]
    return _trilinear(ctx, p)


def resolve_isodose_line(req: MoveIsodoseLine, ctx: ResolveContext) -> Resolved:
    if req.width_mm <= 0:
        raise RequestError(f"move isodose line: width_mm must be positive, got {req.width_mm}")
    ax = "zyx".index(req.axis)
    n = ctx.shape_zyx[ax]
    if not 0 <= req.slice_index < n:
        raise RequestError(f"move isodose line: slice_index {req.slice_index} outside 0..{n - 1} on axis {req.axis!r}")
    a = list(req.start_rc)
    b = list(req.end_rc)
    a.insert(ax, req.slice_index)
    b.insert(ax, req.slice_index)
    return _resolve_drag(req, ctx, a, b, req.width_mm / 2.0, ax)


def resolve_isodose_surface(req: MoveIsodoseSurface, ctx: ResolveContext) -> Resolved:
    if req.radius_mm <= 0:
        raise RequestError(f"move isodose surface: radius_mm must be positive, got {req.radius_mm}")
    return _resolve_drag(req, ctx, list(req.start_zyx), list(req.end_zyx), req.radius_mm, None)


def resolve_erase_spot(req: EraseSpot, ctx: ResolveContext) -> Resolved:
    """Every voxel of the region gets the band [low, high]; the worst ones are the columns.

    Elsewhere in the target, no voxel may newly rise above ``high`` (or fall below ``low``):
    an erase must not move the hot spot, only remove it.
    """
    from ._requests import ball_mask

    _check_dose(ctx, req.high_gy, "erase spot")
    region = ball_mask(ctx.shape_zyx, ctx.spacing_mm_zyx, req.centre_zyx, req.radius_mm) & ctx.body_mask
    if req.structure:
        try:
            region &= ctx.structure_mask(req.structure)
        except KeyError:
            raise RequestError(f"erase spot: no structure called {req.structure!r}") from None
    if not region.any():
        raise RequestError("erase spot: the region lies outside the body (or the structure)")
    flat = np.flatnonzero(region.ravel()).astype(np.int64)
    dose = ctx.dose_at(flat)
    lo, hi = float(req.low_gy), float(req.high_gy)
    # Aim a little inside the bounds (a quarter of the band, at most 1 % of the prescription).
    inset = min(0.25 * (hi - lo), 0.01 * ctx.prescription_gy)
    goal = np.clip(dose, lo + inset, hi - inset)
    off = (dose > hi) | (dose < lo)
    if not off.any():
        raise RequestError("erase spot: every voxel of the region is already within the bounds")
    order = np.argsort(-np.maximum(dose - hi, lo - dose)[off], kind="stable")
    pick = np.flatnonzero(off)[order][: ctx.max_voxels]
    n = flat.size
    cap = hi if (dose > hi).any() else None
    floor = lo if (dose < lo).any() else None
    return Resolved(flat[pick], goal[pick], region, flat, np.full(n, lo), np.full(n, hi), goal,
                    target_hi_cap_gy=cap, target_lo_floor_gy=floor)


RESOLVERS = {
    SetVoxelDose: resolve_set_voxel_dose,
    MoveIsodoseLine: resolve_isodose_line,
    MoveIsodoseSurface: resolve_isodose_surface,
    EraseSpot: resolve_erase_spot,
}


def resolve(req, ctx: ResolveContext) -> Resolved:
    """Resolve a shaping request with the resolver of its kind (RequestError when it cannot be done)."""
    fn = RESOLVERS.get(type(req))
    if fn is None:
        raise RequestError(f"not a dose shaping request: a {type(req).__name__} (expected SetVoxelDose, "
                           "MoveIsodoseLine, MoveIsodoseSurface, EraseSpot, Pin or Unpin)")
    return fn(req, ctx)
