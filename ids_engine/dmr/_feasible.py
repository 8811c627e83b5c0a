"""Up-front feasibility of a request against what the plan holds: can the beams make the fall-off?

A request asks some voxels for a dose band while recovery holds others (the target's
coverage, pins, earlier requests' features). Where a voxel the request needs high lies a few
millimetres from one held low (or the other way round), the dose must fall between them
faster than any beam can make it fall: the request cannot be met without breaking what is
held, and recovery would spend its steps failing (measured: a drag of the 95 % line to 2 mm
from a voxel held at 55 % ended 2 mm short, with 52 guard voxels broken by up to 9.9 % of Rx).
Such a request is refused before anything changes, with the pair, the fall-off it needs and
the steepest the beams can make.

The bound: each beam's dose is its fluence convolved with its lateral kernel (the engine's
model, in the fluence grid's millimetres), times its dose per unit fluence at the voxel (depth
dose and inverse square, ``w``). Between two points ``delta_b`` apart laterally in beam ``b``'s
eye view, that beam's fluence-weighted profile can fall by at most the steepest
``delta_b``-wide window of its lateral profile, times its open-field dose there; along the
beam, only ``w`` falls. When the high side is a region at least as wide as the kernel (an
isodose's dose region, the target), the profile is the **edge spread function** (the dose
across a half-blocked field; table ``edge``) and the beams' open-field doses add up to at most
the plateau dose (the larger of the target's upper band and the highest upper band held near
the request). When the high side is a small spot (a set-voxel request, a pin's ball), a single
pencil is the steepest (table ``point``: one fluence cell's dose profile, normalised to its
peak), and the plateau is the spot's own upper band. Summed over beams,
``D(high) - D(low) <= max_b [1 - (1 - fall_b(delta_b)) w_b(low) / w_b(high)] * plateau``: the
best-placed beam bounds them all, and a beam whose axis runs along the pair (``delta_b ~ 0``)
separates the two points by its depth dose only. A request is refused when the fall it needs
exceeds that by more than the slack (2 % of the plateau: bilinear sampling, the coarse scatter
grid). Checked per request voxel against the 8 nearest held voxels of each group within 20 mm
(with several beams the nearest ones are the hardest; with one or two beams a farther voxel
along a beam's axis could be harder and is missed).

Measured against the engine (tests/dmr/test_feasible.py): across a wide half-blocked field in
water the engine's dose falls by at most the edge table (within 0.5 % of the open field) and by
at least 80 % of it; one fluence cell's dose falls by at most the point table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FallOff", "HeldGroup", "Infeasible", "fall_off_table", "find_infeasible"]

# Pairs farther apart than this are never checked (every kernel's edge falls by > 95 % in 20 mm).
REACH_MM = 20.0
# Per request voxel, this many of each group's nearest held voxels are checked.
NEAREST = 8
# A request is refused only when the fall it needs exceeds the bound by this fraction of the
# high dose (depth dose over a few mm, bilinear sampling, the coarse scatter grid).
SLACK = 0.02


@dataclass(frozen=True)
class FallOff:
    """The largest fraction by which one beam's dose can fall over a lateral distance.

    distance_mm : (n,) increasing from 0, the lateral separation in the fluence grid's mm.
    edge, point : (n,) the largest fall of one beam's dose over that distance, as a fraction of
        its open-field dose (edge spread function) or of a single pencil's peak (one fluence cell).
    """

    distance_mm: np.ndarray
    edge: np.ndarray
    point: np.ndarray

    def drop(self, distance_mm, region) -> np.ndarray:
        """The largest fall over ``distance_mm`` (array), per pair: ``region`` (bool array)
        picks the edge bound, else the point bound."""
        d = np.asarray(distance_mm, float)
        e = np.interp(d, self.distance_mm, self.edge)
        p = np.interp(d, self.distance_mm, self.point)
        return np.where(region, e, p)


def fall_off_table(machine, pitch_mm: float, depths_mm=(5.0, 15.0, 30.0, 60.0, 100.0, 150.0, 250.0),
                   max_mm: float = REACH_MM + 5.0, step_mm: float = 0.05) -> FallOff:
    """:class:`FallOff` of ``machine``'s lateral kernels (all three components, mixed by their
    depth dose), the steepest over ``depths_mm`` (the bound must hold at every depth).

    Edge: the line spread function ``LSF(x) = integral K(sqrt(x^2 + y^2)) dy`` integrated to the
    edge spread function (1 in the open field), and its largest rise over a window of width d.
    Point: the dose profile ``P`` of one ``pitch_mm`` square fluence cell, normalised to its
    peak, and its largest change over a window of width d.
    """
    x = np.arange(0.0, max_mm + 60.0 + step_mm / 2, step_mm)  # LSF abscissa (|x|), beyond the reach for the ESF
    y = np.arange(0.0, 200.0 + 0.1, 0.1)  # y >= 0; the integral is twice the half line
    r = np.sqrt(x[:, None] ** 2 + y[None, :] ** 2)
    comps = np.stack([machine.kernel_at(c, r) for c in range(3)])  # (3, nx, ny)
    lsf_c = 2.0 * np.trapezoid(comps, y, axis=2)  # (3, nx)
    # The pencil: the kernel averaged over a pitch-wide square (5 x 5 sub-samples), along x.
    sub = (np.arange(5) - 2) * (pitch_mm / 5.0)
    pr = np.sqrt((x[:, None, None] + sub[None, :, None]) ** 2 + sub[None, None, :] ** 2)
    pen_c = np.stack([machine.kernel_at(c, pr).mean(axis=(1, 2)) for c in range(3)])  # (3, nx)
    d = np.arange(0.0, max_mm + step_mm / 2, step_mm)
    n = d.size
    edge = np.zeros(n)
    point = np.zeros(n)
    for depth in depths_mm:
        w = machine.depth_components(np.array([float(depth)]))[:, 0]
        lsf = w @ lsf_c
        full = np.concatenate([lsf[:0:-1], lsf])  # symmetric, on -X..X
        esf = np.cumsum(full) * step_mm
        esf /= esf[-1]
        k = np.arange(n)
        # Largest rise of the ESF over a window of k steps: max_j esf[j + k] - esf[j].
        e = np.array([0.0] + [float(np.max(esf[kk:] - esf[:-kk])) for kk in k[1:]])
        pen = w @ pen_c
        pen_full = np.concatenate([pen[:0:-1], pen]) / pen[0]
        p = np.array([0.0] + [float(np.max(np.abs(pen_full[kk:] - pen_full[:-kk]))) for kk in k[1:]])
        edge = np.maximum(edge, e)
        point = np.maximum(point, p)
    return FallOff(d, np.maximum.accumulate(edge), np.maximum.accumulate(point))


@dataclass(frozen=True)
class HeldGroup:
    """Voxels the plan holds in a band: ``name`` (as in conflicts), flat ``voxels``, ``lo`` /
    ``hi`` (Gy), and whether they form a region as wide as the kernel (``region``: the target,
    an isodose drag's band) or a spot (a set-voxel request, a pin's ball)."""

    name: str
    voxels: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    region: bool


@dataclass(frozen=True)
class Infeasible:
    """The worst pair: the request's voxel and a held voxel, the fall needed between them and
    the largest any beam can make (fractions of ``plateau_gy``, the open-field dose)."""

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
                f"{self.high_gy - self.low_gy:.1f} Gy over {self.distance_mm:.1f} mm, and with at most "
                f"{self.plateau_gy:.1f} Gy on the high side the steepest fall any beam can make there is "
                f"{self.can * self.plateau_gy:.1f} Gy (its penumbra and depth dose). Ask for less, farther away, or "
                f"undo, unpin or change what holds that voxel first.")


def find_infeasible(request_voxels, request_lo, request_hi, request_region: bool, held: list[HeldGroup], *,
                    shape_zyx, spacing_mm_zyx, bev, pitch_mm, fall_offs: list[FallOff], plateau_gy: float,
                    reach_mm: float = REACH_MM, nearest: int = NEAREST, slack: float = SLACK) -> Infeasible | None:
    """The worst request-held pair whose fall-off no beam can make, or None.

    request_voxels, request_lo, request_hi : the request's feature (flat CT indices, Gy bands).
    request_region : whether the request's voxels form a region (a drag, an erase) or a spot.
    held : what the plan holds (target coverage, pins, earlier features).
    bev : ``bev(b, flat) -> (u, v, w)``: fractional fluence cells of voxels in beam ``b`` and the
        beam's dose per unit fluence there (depth dose times inverse square: along the beam's
        axis only this can make the dose fall).
    pitch_mm : (beams,) fluence cell size; fall_offs : (beams,) :func:`fall_off_table` per beam.
    plateau_gy : the least dose a region's high side may reach (the target's upper band); the
        highest finite upper band of the request and of the held voxels within reach raises it.
    reach_mm, nearest : per request voxel, the ``nearest`` held voxels of each group within
        ``reach_mm`` are checked.

    Per pair and beam ``b``, the largest fall is ``1 - (1 - edge_b(delta_b)) * w_b(low) /
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
    # Flat indices are z-major: the slices within reach are one range of a sorted group.
    plane = int(np.prod(shape_zyx[1:]))
    z_lo = max(int(np.floor(box_lo[0] / sp[0])), 0) * plane
    z_hi = (int(np.ceil(box_hi[0] / sp[0])) + 1) * plane
    near_groups = []
    for g in held:
        hv = np.asarray(g.voxels, np.int64)
        keep = np.arange(hv.size)
        if hv.size > 1 and np.all(hv[1:] > hv[:-1]):
            keep = keep[np.searchsorted(hv, z_lo):np.searchsorted(hv, z_hi)]
        if keep.size == 0:
            continue
        hmm = np.stack(np.unravel_index(hv[keep], shape_zyx), axis=-1) * sp
        near = np.all((hmm >= box_lo) & (hmm <= box_hi), axis=1)
        if near.any():
            k = keep[near]
            near_groups.append((g, hv[k], hmm[near], np.asarray(g.lo, float)[k], np.asarray(g.hi, float)[k]))
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
                high, low, region, spot_top = rlo[ri], hhi[hj], request_region, rhi[ri]
            else:  # the plan holds >= hlo at j, the request needs <= rhi at i
                high, low, region, spot_top = hlo[hj], rhi[ri], g.region, hhi[hj]
            # The open-field dose the fall is a fraction of: the plateau for a region, the
            # spot's own upper band (at least the high dose itself) for a spot.
            top = np.maximum(np.full(high.shape, plateau) if region else spot_top, high)
            with np.errstate(invalid="ignore"):
                need = np.where(np.isfinite(high) & np.isfinite(low) & np.isfinite(top), (high - low) / top, -np.inf)
            cand = need > slack
            if cand.any():
                pairs.append((g.name, rv[ri[cand]], hv[hj[cand]], dist[cand], high[cand], low[cand], top[cand],
                              need[cand], region, held_low))
    if not pairs:
        return None
    vox = np.unique(np.concatenate([np.concatenate([p[1], p[2]]) for p in pairs]))
    beams = [bev(b, vox) for b in range(len(fall_offs))]
    worst, worst_excess = None, 0.0
    for name, ri, hj, dist, high, low, top, need, region, held_low in pairs:
        a, c = np.searchsorted(vox, ri), np.searchsorted(vox, hj)
        hi_at, lo_at = (a, c) if held_low else (c, a)  # which voxel of the pair must be the high one
        can = np.zeros(ri.size)
        for (u, v, w), fo, pitch in zip(beams, fall_offs, pitch_mm):
            delta = np.hypot(u[a] - u[c], v[a] - v[c]) * float(pitch)
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(w[hi_at] > 0, np.minimum(w[lo_at] / w[hi_at], 1.0), 0.0)
            can = np.maximum(can, 1.0 - (1.0 - fo.drop(delta, region)) * ratio)
        excess = need - can - slack
        k = int(np.argmax(excess))
        if excess[k] > worst_excess:
            worst_excess = float(excess[k])
            zyx_i = tuple(int(v) for v in np.unravel_index(int(ri[k]), shape_zyx))
            zyx_j = tuple(int(v) for v in np.unravel_index(int(hj[k]), shape_zyx))
            worst = Infeasible(name, zyx_j, zyx_i, float(dist[k]), float(high[k]), float(low[k]), float(need[k]),
                               float(can[k]), held_low, float(top[k]))
    return worst
