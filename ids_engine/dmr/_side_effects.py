"""Side effects of a request: where the dose rose far from what was asked.

Recovery keeps watched voxels in their bands, but the normal tissue is watched on a sample
(every third voxel per axis) and far from the request only under a soft cap that recovery does
not chase (chasing it ping-pongs; docs/architecture.md). Physics adds to it: raising the dose
at a place raises it along every ray through that place, and the entrance of a beam can rise by
more than the place itself. So after every request the whole dose cube is compared with the
cube before it, and a rise of more than a threshold (5 % of the prescription by default) that
the request did not ask for is reported to the planner. Never silent.

Every tissue counts, the target too: a target voxel that rose more than the threshold unasked
is a side effect even where it stays inside the target's band (goal 2 counts every voxel
outside the request; the plateau moved, and a rise to 106 % is one step from an overdose); the
report says how many of them end above the band.

"Asked for": within ``near_mm`` (10 mm) of the request's feature any change is the request's
own; a drag (an isodose line or surface) also asks its dose fall-off to move with it, so
within ``shift_reach_mm`` (20 mm) of the feature the rise a rigid move of the plan by the drag
vector would give, ``max(D_before(v - drag) - D_before(v), 0)``, is subtracted first (for a
line drag only on its own slice). The same definitions are the shaping benchmark's far-rise
measures (``bench/bench_shaping.py``).

Pure and on the host: it takes the candidate voxels (those that rose more than the threshold,
found by the caller, on the device when there is one) and a callable for the dose before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["FarRise", "UnaskedRise", "rigid_shift_rise", "summarise_rises", "trilinear", "unasked_rises"]

NEAR_MM = 10.0
SHIFT_REACH_MM = 20.0


@dataclass(frozen=True)
class FarRise:
    """Voxels of one tissue class that rose more than the threshold, unasked.

    tissue : "target", "OAR" or "normal tissue"; voxels : how many; worst_gy : the largest
    unasked rise (Gy); worst_zyx : where it is (CT voxel index); distance_mm : its distance from
    the request's feature. For the target, when :func:`summarise_rises` is given the target's
    upper band: above_band : how many of ``voxels`` end above it (0: all stayed inside), and
    highest_gy : the highest dose any of them ends at; None otherwise.
    """

    tissue: str
    voxels: int
    worst_gy: float
    worst_zyx: tuple[int, int, int]
    distance_mm: float
    above_band: int | None = None
    highest_gy: float | None = None


def trilinear(dose_at: Callable[[np.ndarray], np.ndarray], shape_zyx, points_zyx: np.ndarray) -> np.ndarray:
    """Trilinear dose at points (n, 3) in voxel units from ``dose_at(flat) -> Gy`` (one call for
    all eight corners), clamped to the grid."""
    shape = np.asarray(shape_zyx)
    p = np.clip(np.asarray(points_zyx, float).reshape(-1, 3), 0, shape - 1)
    i0 = np.minimum(np.floor(p).astype(np.int64), shape - 2).clip(0)
    t = p - i0
    corners = []
    weights = []
    for corner in range(8):
        o = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = np.minimum(i0 + o, shape - 1)
        corners.append(np.ravel_multi_index(tuple(idx.T), tuple(shape_zyx)))
        weights.append(np.prod(np.where(o == 1, t, 1 - t), axis=1))
    vals = np.asarray(dose_at(np.concatenate(corners)), np.float64).reshape(8, -1)  # one read
    return (vals * np.stack(weights)).sum(axis=0)


def rigid_shift_rise(before_at, shape_zyx, flat: np.ndarray, a_zyx, b_zyx) -> np.ndarray:
    """``max(D_before(v - (b - a)) - D_before(v), 0)`` at the voxels ``flat`` (Gy): the rise a
    rigid move of the plan by the drag vector ``b - a`` (voxel units, z y x) asks of them."""
    flat = np.asarray(flat, np.int64)
    if flat.size == 0:
        return np.zeros(0)
    p = np.stack(np.unravel_index(flat, tuple(shape_zyx)), axis=-1).astype(float)
    shift = np.asarray(b_zyx, float) - np.asarray(a_zyx, float)
    here = np.asarray(before_at(flat), np.float64)
    return np.maximum(trilinear(before_at, shape_zyx, p - shift[None, :]) - here, 0.0)


@dataclass(frozen=True, eq=False)
class UnaskedRise:
    """Far voxels that rose, with the part of their rise the request did not ask for.

    voxels : (n,) flat CT indices (far from the feature; a target voxel only where it ends
    above ``target_hi_gy`` when one is given); unasked_gy : (n,) their rise minus what a drag's rigid move asks;
    asked_gy : (n,) that asked part (0 for other requests); distance_mm : (n,) from the feature;
    tissue : (n,) 0 target, 1 OAR, 2 normal tissue; after_gy : (n,) the dose they end at
    (None where built without).
    """

    voxels: np.ndarray
    unasked_gy: np.ndarray
    asked_gy: np.ndarray
    distance_mm: np.ndarray
    tissue: np.ndarray
    after_gy: np.ndarray | None = None

    def max_gy(self) -> float:
        return float(self.unasked_gy.max()) if self.unasked_gy.size else 0.0

    def take(self, keep: np.ndarray) -> "UnaskedRise":
        """The rises where ``keep`` (bool (n,) or indices), every field (``after_gy`` too)."""
        return UnaskedRise(self.voxels[keep], self.unasked_gy[keep], self.asked_gy[keep], self.distance_mm[keep],
                           self.tissue[keep], None if self.after_gy is None else self.after_gy[keep])


TISSUES = ("target", "OAR", "normal tissue")


def unasked_rises(candidates: np.ndarray, rise_gy: np.ndarray, *, shape_zyx, spacing_mm_zyx, feature_voxels: np.ndarray,
                  before_at: Callable[[np.ndarray], np.ndarray], target_mask: np.ndarray, oar_mask: np.ndarray,
                  drag: tuple | None = None, target_hi_gy: float | None = None, near_mm: float = NEAR_MM,
                  shift_reach_mm: float = SHIFT_REACH_MM) -> UnaskedRise:
    """The far candidates and their unasked rise (:func:`summarise_rises` makes the report).

    Parameters
    ----------
    candidates : (n,) flat CT indices of body voxels whose dose rose by more than a floor
        (the report's threshold or lower: the only ones that can be reported).
    rise_gy : (n,) their rise (after - before).
    feature_voxels : flat indices of the request's feature (what it is about).
    before_at : ``before_at(flat) -> (m,) Gy``, the dose before the request.
    target_mask, oar_mask : bool (z, y, x), for naming the tissue (a target voxel counts as target).
    drag : ``(a_zyx, b_zyx, plane_axis)`` for an isodose drag (voxel units; ``plane_axis`` the
        slice normal of a line drag, else None), or None.
    target_hi_gy : a target voxel counts only when it ends above this; None (what the
        session's check passes): every target voxel (:func:`summarise_rises` tells how many
        end above the band).
    """
    candidates = np.asarray(candidates, np.int64).reshape(-1)
    rise = np.asarray(rise_gy, np.float64).reshape(-1)
    feature_voxels = np.asarray(feature_voxels, np.int64).reshape(-1)
    if candidates.size == 0 or feature_voxels.size == 0:
        z = np.zeros(0)
        return UnaskedRise(np.zeros(0, np.int64), z, z, z, np.zeros(0, np.int8), z)
    sp = np.asarray(spacing_mm_zyx, float)
    cz = np.stack(np.unravel_index(candidates, tuple(shape_zyx)), axis=-1)
    fz = np.stack(np.unravel_index(feature_voxels, tuple(shape_zyx)), axis=-1)
    dist, _ = cKDTree(fz * sp).query(cz * sp)
    keep = dist > near_mm
    tflat, oflat = np.asarray(target_mask, bool).ravel(), np.asarray(oar_mask, bool).ravel()
    in_target = tflat[candidates]
    if target_hi_gy is not None and np.any(keep & in_target):
        t = np.flatnonzero(keep & in_target)
        after = np.asarray(before_at(candidates[t]), np.float64) + rise[t]
        keep[t[after <= target_hi_gy]] = False
    asked = np.zeros(candidates.size)
    if drag is not None:
        a, b, plane = drag
        near_drag = keep & (dist <= shift_reach_mm)
        if plane is not None:
            near_drag &= cz[:, int(plane)] == int(round(float(a[int(plane)])))
        if near_drag.any():
            asked[near_drag] = rigid_shift_rise(before_at, shape_zyx, candidates[near_drag], a, b)
    tissue = np.where(in_target, 0, np.where(oflat[candidates], 1, 2)).astype(np.int8)
    after = np.asarray(before_at(candidates[keep]), np.float64) + rise[keep] if keep.any() else np.zeros(0)
    return UnaskedRise(candidates[keep], (rise - asked)[keep], asked[keep], dist[keep], tissue[keep], after)


def summarise_rises(u: UnaskedRise, threshold_gy: float, shape_zyx, target_hi_gy: float | None = None) -> list[FarRise]:
    """One :class:`FarRise` per tissue class with an unasked rise above ``threshold_gy``; for
    the target, given its upper band ``target_hi_gy`` (and ``u.after_gy``), how many of those
    voxels end above it and the highest dose they end at."""
    out = []
    hit = u.unasked_gy > threshold_gy
    for k, tissue in enumerate(TISSUES):
        sel = hit & (u.tissue == k)
        if not sel.any():
            continue
        i = np.flatnonzero(sel)[int(np.argmax(u.unasked_gy[sel]))]
        where = tuple(int(v) for v in np.unravel_index(int(u.voxels[i]), tuple(shape_zyx)))
        above = highest = None
        if k == 0 and target_hi_gy is not None and u.after_gy is not None:
            ends = u.after_gy[sel]
            above, highest = int(np.sum(ends > target_hi_gy)), float(ends.max())
        out.append(FarRise(tissue, int(sel.sum()), float(u.unasked_gy[i]), where, float(u.distance_mm[i]), above,
                           highest))
    return out
