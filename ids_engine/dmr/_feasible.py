"""Up-front feasibility of a request against what the plan holds: can the beams make the fall-off?

A request asks some voxels for a dose band while recovery holds others (the target's
coverage, pins, earlier requests' features). Where a voxel the request needs high lies a few
millimetres from one held low (or the other way round), the dose must fall between them
faster than any beam can make it fall: the request cannot be met without breaking what is
held, and recovery would spend its steps failing. Such a request is refused before anything
changes, with the pair, the fall it needs and the steepest fall the beams can make.

The bound: each beam's dose is its fluence (non-negative) convolved with its lateral kernel
(the engine's model, in the fluence grid's millimetres), times its dose per unit fluence at
the voxel (depth dose and inverse square, ``w``). If no voxel's dose exceeds the **plateau**
(the larger of the target's upper band and the highest upper band held near the request),
one beam's dose can fall between two points ``delta_b`` apart laterally in its beam's eye view
by at most the steepest ``delta_b``-wide window of a single fluence cell's profile, normalised
to its peak, times the plateau (table ``fall``: a pencil is the steepest thing a beam makes;
a half-blocked field, or any mix of cells, falls less steeply). Along the beam only ``w``
falls. Summed over beams, ``D(high) - D(low) <= max_b [1 - (1 - fall_b(delta_b)) w_b(low) /
w_b(high)] * plateau``: the best-placed beam bounds them all, and a beam whose axis runs along
the pair (``delta_b ~ 0``) separates the two points by its depth dose only. A request is
refused when the fall it needs exceeds that by more than the slack (2 % of the plateau:
bilinear sampling, the coarse scatter grid). Checked per request voxel against the 8 nearest
held voxels of each group within 20 mm (with several beams the nearest ones are the
hardest; with one or two beams a farther voxel along a beam's axis could be harder and is
missed).

Measured against the engine (tests/dmr/test_feasible.py): for one beam in water, a linear
programme over every non-negative fluence with the dose nowhere above the plateau finds
falls within 0.03 of the table, never above it. (An earlier version used the edge spread
function of a half-blocked field as the bound: a fluence "horn" just inside the edge beats it
by 0.08-0.14 of the plateau over 2-4 mm, so it refused requests that were possible.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FallOff", "HeldGroup", "Infeasible", "fall_off_table", "find_infeasible", "within_reach"]

# Pairs farther apart than this are never checked (a pencil's dose falls by > 99 % in 20 mm).
REACH_MM = 20.0
# Per request voxel, this many of each group's nearest held voxels are checked.
NEAREST = 8
# A request is refused only when the fall it needs exceeds the bound by this fraction of the
# plateau (bilinear sampling, the coarse scatter grid).
SLACK = 0.02


@dataclass(frozen=True)
class FallOff:
    """The largest fraction of the plateau by which one beam's dose can fall over a lateral
    distance: ``distance_mm`` (n,) increasing from 0 (the fluence grid's mm), ``fall`` (n,)."""

    distance_mm: np.ndarray
    fall: np.ndarray

    def drop(self, distance_mm) -> np.ndarray:
        """The largest fall over ``distance_mm`` (array)."""
        return np.interp(np.asarray(distance_mm, float), self.distance_mm, self.fall)


def fall_off_table(machine, pitch_mm: float, depths_mm=(5.0, 15.0, 30.0, 60.0, 100.0, 150.0, 250.0),
                   max_mm: float = REACH_MM + 5.0, step_mm: float = 0.05) -> FallOff:
    """:class:`FallOff` of ``machine``'s lateral kernels (all three components, mixed by their
    depth dose), the steepest over ``depths_mm`` (the bound must hold at every depth): the dose
    profile ``P`` of one ``pitch_mm`` square fluence cell (the kernel averaged over the cell,
    5 x 5 sub-samples), normalised to its peak, and its largest change over a window of width d.
    """
    x = np.arange(0.0, max_mm + step_mm / 2, step_mm)
    sub = (np.arange(5) - 2) * (pitch_mm / 5.0)
    pr = np.sqrt((x[:, None, None] + sub[None, :, None]) ** 2 + sub[None, None, :] ** 2)
    pen_c = np.stack([machine.kernel_at(c, pr).mean(axis=(1, 2)) for c in range(3)])  # (3, nx)
    n = x.size
    fall = np.zeros(n)
    for depth in depths_mm:
        w = machine.depth_components(np.array([float(depth)]))[:, 0]
        pen = w @ pen_c
        full = np.concatenate([pen[:0:-1], pen]) / pen[0]  # symmetric, on -max..max
        f = np.array([0.0] + [float(np.max(np.abs(full[k:] - full[:-k]))) for k in range(1, n)])
        fall = np.maximum(fall, f)
    return FallOff(x, np.maximum.accumulate(fall))


@dataclass(frozen=True)
class HeldGroup:
    """Voxels the plan holds in a band: ``name`` (as in conflicts), flat ``voxels``, ``lo`` /
    ``hi`` (Gy)."""

    name: str
    voxels: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


@dataclass(frozen=True)
class Infeasible:
    """The worst pair: the request's voxel and a held voxel, the fall needed between them and
    the largest any beam can make (fractions of ``plateau_gy``, the dose no voxel exceeds)."""

    held: str
    held_zyx: tuple
    request_zyx: tuple
    distance_mm: float
    high_gy: float
    low_gy: float
    need: float
    can: float
    held_is_low: bool
    plateau_gy: float

    def message(self, what: str) -> str:
        side = "at or below" if self.held_is_low else "at or above"
        other = "at or above" if self.held_is_low else "at or below"
        held_gy = self.low_gy if self.held_is_low else self.high_gy
        req_gy = self.high_gy if self.held_is_low else self.low_gy
        hz, rz = self.held_zyx, self.request_zyx
        held = self.held[:1].upper() + self.held[1:]
        return (f"{what}: the beams cannot make that fall-off. {held} holds voxel (z {hz[0]}, y {hz[1]}, "
                f"x {hz[2]}) {side} {held_gy:.1f} Gy, {self.distance_mm:.1f} mm from voxel (z {rz[0]}, y {rz[1]}, "
                f"x {rz[2]}) that the request needs {other} {req_gy:.1f} Gy: the dose would have to fall by "
                f"{self.high_gy - self.low_gy:.1f} Gy over {self.distance_mm:.1f} mm, and with no dose above "
                f"{self.plateau_gy:.1f} Gy the steepest fall any beam can make there is "
                f"{self.can * self.plateau_gy:.1f} Gy (a pencil's penumbra across the beam, its depth dose along "
                f"it). Ask for less, farther away, or undo, unpin or change what holds that voxel first.")


def find_infeasible(request_voxels, request_lo, request_hi, held: list[HeldGroup], *,
                    shape_zyx, spacing_mm_zyx, bev, pitch_mm, fall_offs: list[FallOff], plateau_gy: float,
                    reach_mm: float = REACH_MM, nearest: int = NEAREST, slack: float = SLACK) -> Infeasible | None:
    """The worst request-held pair whose fall-off no beam can make, or None.

    request_voxels, request_lo, request_hi : the request's feature (flat CT indices, Gy bands).
    held : what the plan holds (target coverage, pins, earlier features).
    bev : ``bev(b, flat) -> (u, v, w)``: fractional fluence cells of voxels in beam ``b`` and the
        beam's dose per unit fluence there (depth dose times inverse square: along the beam's
        axis only this can make the dose fall).
    pitch_mm : (beams,) fluence cell size; fall_offs : (beams,) :func:`fall_off_table` per beam.
    plateau_gy : the dose no voxel should exceed (the target's upper band); the highest finite
        upper band of the request and of the held voxels within reach raises it.
    reach_mm, nearest : per request voxel, the ``nearest`` held voxels of each group within
        ``reach_mm`` are checked.

    Per pair and beam ``b``, the largest fall is ``1 - (1 - fall_b(delta_b)) * w_b(low) /
    w_b(high)`` (``w`` ratio capped at 1), with ``delta_b`` their lateral separation in the beam's
    eye view; the pair is infeasible when the fall it needs (over the plateau) exceeds the
    largest over beams by more than ``slack``.
    """
    rv = np.asarray(request_voxels, np.int64)
    if rv.size == 0 or not held:
        return None
    from scipy.spatial import cKDTree

    sp = np.asarray(spacing_mm_zyx, float)
    rlo, rhi = np.asarray(request_lo, float), np.asarray(request_hi, float)
    rmm = np.stack(np.unravel_index(rv, shape_zyx), axis=-1) * sp
    box_lo, box_hi = rmm.min(axis=0) - reach_mm, rmm.max(axis=0) + reach_mm
    # Flat indices are z-major: in a sorted group, the box's rows are ranges (searched, not
    # every voxel of the group unravelled and tested).
    rows = _box_rows(box_lo, box_hi, sp, shape_zyx)
    near_groups = []
    for g in held:
        hv = np.asarray(g.voxels, np.int64)
        if hv.size <= 1 or np.all(hv[1:] > hv[:-1]):
            k = _ranges_index(np.searchsorted(hv, rows[0]), np.searchsorted(hv, rows[1]))
            hmm = np.stack(np.unravel_index(hv[k], shape_zyx), axis=-1) * sp
        else:
            hmm = np.stack(np.unravel_index(hv, shape_zyx), axis=-1) * sp
            near = np.all((hmm >= box_lo) & (hmm <= box_hi), axis=1)
            k, hmm = np.flatnonzero(near), hmm[near]
        if k.size:
            near_groups.append((g, hv[k], hmm, np.asarray(g.lo, float)[k], np.asarray(g.hi, float)[k]))
    his = [rhi] + [grp[4] for grp in near_groups]
    finite = np.concatenate([h[np.isfinite(h)] for h in his])
    plateau = max(float(plateau_gy), float(finite.max()) if finite.size else 0.0)
    pairs = []
    for g, hv, hmm, hlo, hhi in near_groups:
        kq = min(int(nearest), hv.size)
        dist, j = cKDTree(hmm).query(rmm, k=kq, distance_upper_bound=reach_mm)
        dist, j = dist.reshape(rv.size, kq), j.reshape(rv.size, kq)
        ok = j < hv.size
        ri, col = np.nonzero(ok)
        hj, dist = j[ri, col], dist[ri, col]
        for held_low in (True, False):
            if held_low:  # the request needs >= rlo at i, the plan holds <= hhi at j
                high, low = rlo[ri], hhi[hj]
            else:  # the plan holds >= hlo at j, the request needs <= rhi at i
                high, low = hlo[hj], rhi[ri]
            top = np.maximum(plateau, high)
            with np.errstate(invalid="ignore"):
                need = np.where(np.isfinite(high) & np.isfinite(low), (high - low) / top, -np.inf)
            cand = need > slack
            if cand.any():
                pairs.append((g.name, rv[ri[cand]], hv[hj[cand]], dist[cand], high[cand], low[cand], top[cand],
                              need[cand], held_low))
    if not pairs:
        return None
    vox = np.unique(np.concatenate([np.concatenate([p[1], p[2]]) for p in pairs]))
    beams = [bev(b, vox) for b in range(len(fall_offs))]
    worst, worst_excess = None, 0.0
    for name, ri, hj, dist, high, low, top, need, held_low in pairs:
        a, c = np.searchsorted(vox, ri), np.searchsorted(vox, hj)
        hi_at, lo_at = (a, c) if held_low else (c, a)  # which voxel of the pair must be the high one
        can = np.zeros(ri.size)
        for (u, v, w), fo, pitch in zip(beams, fall_offs, pitch_mm):
            delta = np.hypot(u[a] - u[c], v[a] - v[c]) * float(pitch)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(w[hi_at] > 0, np.minimum(w[lo_at] / w[hi_at], 1.0), 0.0)
            can = np.maximum(can, 1.0 - (1.0 - fo.drop(delta)) * ratio)
        excess = need - can - slack
        k = int(np.argmax(excess))
        if excess[k] > worst_excess:
            worst_excess = float(excess[k])
            zyx_i = tuple(int(v) for v in np.unravel_index(int(ri[k]), shape_zyx))
            zyx_j = tuple(int(v) for v in np.unravel_index(int(hj[k]), shape_zyx))
            worst = Infeasible(name, zyx_j, zyx_i, float(dist[k]), float(high[k]), float(low[k]), float(need[k]),
                               float(can[k]), held_low, float(top[k]))
    return worst


def within_reach(request_voxels, voxels, *, shape_zyx, spacing_mm_zyx, reach_mm: float = REACH_MM) -> np.ndarray:
    """The positions in ``voxels`` (sorted flat indices) of the voxels :func:`find_infeasible`
    may check against ``request_voxels`` (those in the request's box grown by ``reach_mm``),
    ascending: a held group restricted to them gives the same result."""
    rv = np.asarray(request_voxels, np.int64)
    if rv.size == 0:
        return np.zeros(0, np.int64)
    sp = np.asarray(spacing_mm_zyx, float)
    rmm = np.stack(np.unravel_index(rv, shape_zyx), axis=-1) * sp
    starts, ends = _box_rows(rmm.min(axis=0) - reach_mm, rmm.max(axis=0) + reach_mm, sp, shape_zyx)
    return _ranges_index(np.searchsorted(voxels, starts), np.searchsorted(voxels, ends))


def _axis_cells(lo_mm: float, hi_mm: float, spacing_mm: float, n: int) -> tuple[int, int]:
    """The cells ``i`` (of ``n``) with ``lo_mm <= i * spacing_mm <= hi_mm`` (the float64
    products, as a test of every cell would compute them): ``(first, last)``, empty when
    ``last < first``."""
    first = min(max(int(np.ceil(lo_mm / spacing_mm)), 0), n)
    while first > 0 and (first - 1) * spacing_mm >= lo_mm:
        first -= 1
    while first < n and first * spacing_mm < lo_mm:
        first += 1
    last = max(min(int(np.floor(hi_mm / spacing_mm)), n - 1), -1)
    while last < n - 1 and (last + 1) * spacing_mm <= hi_mm:
        last += 1
    while last >= 0 and last * spacing_mm > hi_mm:
        last -= 1
    return first, last


def _box_rows(box_lo, box_hi, sp: np.ndarray, shape_zyx) -> tuple[np.ndarray, np.ndarray]:
    """The voxels whose position (index times ``sp``, mm) lies in the box ``[box_lo, box_hi]``
    as flat-index ranges, one per (z, y) row of the box in flat order: ``(starts, ends)``
    (int64, ends exclusive)."""
    nz, ny, nx = (int(n) for n in shape_zyx)
    (z0, z1), (y0, y1), (x0, x1) = (_axis_cells(float(box_lo[d]), float(box_hi[d]), sp[d], n)
                                    for d, n in enumerate((nz, ny, nx)))
    if z1 < z0 or y1 < y0 or x1 < x0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    row = (np.arange(z0, z1 + 1, dtype=np.int64)[:, None] * ny + np.arange(y0, y1 + 1)).ravel() * nx
    return row + x0, row + x1 + 1


def _ranges_index(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The indices of the ranges ``[starts, ends)`` (ascending, disjoint), concatenated."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(lengths) - lengths  # each range's first position in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts - first, lengths)
