"""DVHs with partial volumes at structure edges: exact (every voxel, sub-voxel integration) and
by random sampling (Niemierko and Goitein, "Random sampling for evaluating treatment plans",
Med. Phys. 17(5), 1990, 753-762; seed 001, "Dose Volume Histogram Popup").

The structure as a continuous region
------------------------------------
A structure is a voxel mask, which says nothing about where its surface runs inside the edge
voxels. Both DVHs here use one continuous model of it: the region where the trilinear
interpolation of the mask (1 inside, 0 outside, between voxel centres) is at least 0.5, the
surface the 3D view's marching cubes draw. Flat faces run exactly between voxels; convex
edges and corners are rounded off, concave ones filled in, so edge voxels count partly (their
*occupancy*, 0..1). A structure that touches the grid's edge runs on to the edge (mask and
dose are continued beyond the outermost voxel centres). The dose at any point is the
trilinear interpolation of the dose cube between voxel centres.

* :func:`exact_dvh`: every voxel whose box meets the region, each integrated on an
  ``s x s x s`` sub-grid (dose and membership per sub-point). It converges to the continuous
  DVH as ``s`` grows; ``s = 1`` with a mask whose edges are all flat is the voxel-centre DVH.
* :func:`sample_dvhs`: points drawn uniformly in the region (a uniform voxel among the ones the
  region meets, a uniform position in its box, kept if inside), dose at each point, the DVH of
  the points so far yielded after every round, until the density of points exceeds
  ``density_per_mm3`` (the seed: 1 per mm^3) for every structure, or the caller stops.
  The sampled volume fraction at a dose level is a binomial estimate of the true one: its
  standard error is ``sqrt(V (1 - V) / n)`` (Niemierko and Goitein, eq. 3), and the largest
  error over the curve shrinks as ``1 / sqrt(n)`` (the Dvoretzky-Kiefer-Wolfowitz bound:
  ``P(max |dV| > eps) <= 2 exp(-2 n eps^2)``).

All arrays are host NumPy, volumes (z, y, x) on the CT grid, doses in Gy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from ._dvh import DVH, dvh

__all__ = [
    "DVHCurve",
    "DVHSamplingState",
    "dkw_bound",
    "dvh_max_difference",
    "dvh_standard_error",
    "exact_dvh",
    "plot_dvhs",
    "sample_dvhs",
    "sampled_dvh",
    "structure_occupancy",
]

_LEVEL = 0.5  # the region: trilinear mask >= 0.5
_CHUNK_POINTS = 2_000_000  # points evaluated at once (memory ~ 100 MB)


# --------------------------------------------------------------------------- the region
@dataclass(frozen=True, eq=False)
class _Region:
    """A structure's mask cropped to its bounding box plus a margin, and its candidate voxels."""

    name: str
    offset: np.ndarray  # (3,) int: crop start (z, y, x) in the full grid
    mask: np.ndarray  # float32 cropped mask (1 inside)
    candidates: np.ndarray  # (n, 3) int: cropped indices of voxels whose box can meet the region
    interior: np.ndarray  # (n,) bool: the whole box is inside (all 27 neighbours in the mask)
    voxel_mm3: float


def _region(name: str, mask: np.ndarray) -> _Region:
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"structure {name!r}: the mask must be (z, y, x), got shape {m.shape}")
    idx = np.argwhere(m)
    if idx.size == 0:
        raise ValueError(f"structure {name!r} is empty")
    lo = np.maximum(idx.min(axis=0) - 2, 0)
    hi = np.minimum(idx.max(axis=0) + 3, m.shape)
    crop = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    # A box meets the region only if one of the 8 centres around each of its points is in the
    # mask, i.e. one of its 27 neighbours is; it lies wholly inside if all 27 are.
    block = np.ones((3, 3, 3), bool)
    near = ndimage.binary_dilation(crop, block)
    inner = ndimage.binary_erosion(crop, block, border_value=1)
    cand = np.argwhere(near)
    return _Region(name, lo, crop.astype(np.float32), cand, inner[tuple(cand.T)], 0.0)


def _trilinear(volume: np.ndarray, pts_zyx: np.ndarray) -> np.ndarray:
    """Trilinear interpolation at fractional (z, y, x) indices (n, 3), constant beyond the
    outermost voxel centres (a structure touching the grid's edge runs on to the edge)."""
    return ndimage.map_coordinates(volume, pts_zyx.T, order=1, mode="nearest", prefilter=False)


def _subgrid(s: int) -> np.ndarray:
    """(s^3, 3) offsets of an s x s x s sub-grid of a unit voxel box centred on 0."""
    t = (np.arange(s) + 0.5) / s - 0.5
    return np.stack(np.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)


def _edge_occupancy(region: _Region, voxels: np.ndarray, s: int) -> np.ndarray:
    """Occupancy (0..1) of the given cropped voxels, from an s^3 sub-grid."""
    sub = _subgrid(s)
    out = np.empty(len(voxels))
    step = max(1, _CHUNK_POINTS // len(sub))
    for a in range(0, len(voxels), step):
        v = voxels[a:a + step]
        pts = (v[:, None, :] + sub[None]).reshape(-1, 3)
        inside = _trilinear(region.mask, pts) >= _LEVEL
        out[a:a + step] = inside.reshape(len(v), -1).mean(axis=1)
    return out


def structure_occupancy(mask: np.ndarray, supersample: int = 4) -> np.ndarray:
    """Fraction of each voxel's box inside the structure's continuous region (see the module
    docstring): float32 (z, y, x), 1 inside, 0 far outside, in between at the edges.

    ``supersample``: sub-points per axis for the edge voxels (interior ones are exactly 1).
    ``occupancy.sum() * voxel volume`` is the region's volume.
    """
    region = _region("structure", mask)
    occ = np.zeros(np.shape(mask), np.float32)
    edge = region.candidates[~region.interior]
    vals = np.ones(len(region.candidates))
    vals[~region.interior] = _edge_occupancy(region, edge, int(supersample))
    full = region.candidates + region.offset
    occ[tuple(full.T)] = vals
    return occ


def _structures(structures) -> list[tuple[str, np.ndarray]]:
    out = []
    for s in structures:
        if hasattr(s, "mask") and hasattr(s, "name"):
            out.append((s.name, s.mask))
        else:
            name, mask = s
            out.append((str(name), mask))
    if not out:
        raise ValueError("no structures given")
    return out


def _check_dose(dose_gy, grid) -> np.ndarray:
    d = np.asarray(dose_gy, dtype=np.float32)
    if d.shape != tuple(grid.shape_zyx):
        raise ValueError(f"dose_gy shape {d.shape} does not match the grid {tuple(grid.shape_zyx)}")
    return d


def _crop_dose(dose: np.ndarray, region: _Region) -> np.ndarray:
    lo = region.offset
    hi = lo + np.asarray(region.mask.shape)
    return np.ascontiguousarray(dose[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])


# --------------------------------------------------------------------------- exact
def exact_dvh(name: str, dose_gy: np.ndarray, mask: np.ndarray, grid, *, supersample: int = 4,
              bin_gy: float = 0.1) -> DVH:
    """The DVH of every voxel of a structure with partial volumes at its edges.

    Each voxel whose box meets the structure's region is integrated on a
    ``supersample``^3 sub-grid: at each sub-point the dose is interpolated trilinearly and the
    point counts if it lies in the region (trilinear mask >= 0.5). The DVH's ``volume_cc`` is
    the region's volume (edge voxels partly).

    Parameters
    ----------
    name : the structure's name.
    dose_gy : float (z, y, x) Gy on ``grid``.
    mask : bool (z, y, x) on ``grid``.
    grid : :class:`ids_engine.model.Grid`.
    supersample : sub-points per axis and voxel (1: voxel centres; 4: 64 points per voxel; in a
        steep gradient the curve moves by about 0.1 % of the volume from 4 to 8).
    bin_gy : DVH bin width.
    """
    dose = _check_dose(dose_gy, grid)
    region = _region(name, mask)
    s = int(supersample)
    if s < 1:
        raise ValueError(f"exact_dvh: supersample must be >= 1, got {supersample}")
    d = _crop_dose(dose, region)
    sub = _subgrid(s)
    doses = []
    step = max(1, _CHUNK_POINTS // len(sub))
    for a in range(0, len(region.candidates), step):
        v = region.candidates[a:a + step]
        pts = (v[:, None, :] + sub[None]).reshape(-1, 3)
        inside = _trilinear(region.mask, pts) >= _LEVEL
        pts = pts[inside]
        doses.append(_trilinear(d, pts))
    dd = np.concatenate(doses)
    return dvh(name, dd, np.ones(dd.shape, bool), grid.voxel_volume_cc / len(sub), bin_gy=bin_gy)


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True, eq=False)
class DVHSamplingState:
    """The DVHs of random sampling after one round.

    dvhs : one :class:`DVH` per structure (``volume_cc`` the region's volume).
    points : points drawn inside each structure so far.
    density_per_mm3 : points per mm^3 of each structure.
    done : every structure reached the requested density (the last state).
    round : the round's number (0-based).
    target_points : points each structure needs to reach the density.
    """

    dvhs: tuple[DVH, ...]
    points: tuple[int, ...]
    density_per_mm3: tuple[float, ...]
    done: bool
    round: int
    target_points: tuple[int, ...] = ()

    def dvh(self, name: str) -> DVH:
        for h in self.dvhs:
            if h.name == name:
                return h
        raise KeyError(f"no sampled DVH {name!r}; known: {', '.join(h.name for h in self.dvhs)}")


def sample_dvhs(dose_gy: np.ndarray, structures, grid, *, density_per_mm3: float = 1.0, seed: int = 0,
                first_batch: int = 2000, growth: float = 2.0, bin_gy: float = 0.1,
                cancel: Callable[[], bool] | None = None) -> Iterator[DVHSamplingState]:
    """DVHs by random sampling, updated as they converge (a generator).

    Each round draws points uniformly in every structure that has not yet reached
    ``density_per_mm3`` (``first_batch`` points in the first round, ``growth`` times more in
    each next, never past the density), computes the dose at them by trilinear interpolation
    and yields the DVHs of all points so far. It ends after the state with ``done`` True, or
    when ``cancel()`` returns True (the last state yielded stands; stopping the iteration
    does the same: the seed's stop button).

    Parameters
    ----------
    dose_gy : float (z, y, x) Gy on ``grid``.
    structures : :class:`ids_engine.model.Structure` objects or ``(name, mask)`` pairs,
        masks bool (z, y, x) on ``grid``.
    grid : :class:`ids_engine.model.Grid`.
    density_per_mm3 : stop once each structure has this many points per mm^3.
    seed : seed of the local random generator (the result is reproducible).
    """
    dose = _check_dose(dose_gy, grid)
    if not density_per_mm3 > 0:
        raise ValueError(f"density_per_mm3 must be positive, got {density_per_mm3}")
    rng = np.random.default_rng(seed)
    # Positions are drawn in voxel units; the density counts per mm^3 of the region.
    voxel_mm3 = float(np.prod(grid.spacing_mm_zyx))
    regions, crops, volumes_mm3, accept, samples = [], [], [], [], []
    for name, mask in _structures(structures):
        r = _region(name, mask)
        occ = np.ones(len(r.candidates))
        occ[~r.interior] = _edge_occupancy(r, r.candidates[~r.interior], 4)
        regions.append(r)
        crops.append(_crop_dose(dose, r))
        volumes_mm3.append(float(occ.sum()) * voxel_mm3)
        accept.append(max(float(occ.mean()), 1e-3))  # expected share of draws inside
        samples.append([])
    counts = [0] * len(regions)
    target = [int(np.ceil(density_per_mm3 * v)) for v in volumes_mm3]
    batch = float(first_batch)
    rnd = 0
    while True:
        if cancel is not None and cancel():
            return
        for k, r in enumerate(regions):
            need = min(int(batch), target[k] - counts[k])
            while need > 0:
                # Rejection sampling: a uniform candidate voxel, a uniform point in its box.
                n_draw = int(need / accept[k] * 1.1) + 16
                v = r.candidates[rng.integers(0, len(r.candidates), n_draw)]
                pts = v + rng.random((n_draw, 3)) - 0.5
                inside = _trilinear(r.mask, pts) >= _LEVEL
                pts = pts[inside][:need]
                samples[k].append(_trilinear(crops[k], pts).astype(np.float64))
                counts[k] += len(pts)
                need -= len(pts)
        done = all(c >= t for c, t in zip(counts, target))
        dvhs = []
        for k, r in enumerate(regions):
            d = np.concatenate(samples[k])
            samples[k] = [d]
            h = dvh(r.name, d, np.ones(d.shape, bool), 1.0, bin_gy=bin_gy)
            dvhs.append(DVH(r.name, h.dose_gy, h.volume_fraction, volumes_mm3[k] / 1000.0))
        yield DVHSamplingState(tuple(dvhs), tuple(counts), tuple(c / v for c, v in zip(counts, volumes_mm3)),
                               done, rnd, tuple(target))
        if done:
            return
        batch *= growth
        rnd += 1


def sampled_dvh(dose_gy: np.ndarray, structures, grid, *, progress=None, cancel=None, **options) -> DVHSamplingState:
    """Run :func:`sample_dvhs` to the end (or until ``cancel()``); the last state.

    ``progress(done, total, label)`` gets the points drawn against the points needed.
    """
    last = None
    for state in sample_dvhs(dose_gy, structures, grid, cancel=cancel, **options):
        last = state
        if progress is not None:
            progress(sum(state.points), sum(state.target_points), "DVH sampling")
    if last is None:
        raise RuntimeError("DVH sampling was cancelled before the first round")
    return last


# --------------------------------------------------------------------------- comparison
def _on_common_edges(a: DVH, b: DVH) -> tuple[np.ndarray, np.ndarray]:
    if len(a.dose_gy) > 1 and len(b.dose_gy) > 1 and not np.isclose(a.dose_gy[1], b.dose_gy[1]):
        raise ValueError(f"DVHs {a.name!r} and {b.name!r} have different bin widths")
    n = max(len(a.volume_fraction), len(b.volume_fraction))
    va = np.zeros(n)
    vb = np.zeros(n)
    va[:len(a.volume_fraction)] = a.volume_fraction
    vb[:len(b.volume_fraction)] = b.volume_fraction
    return va, vb


def dvh_max_difference(a: DVH, b: DVH) -> float:
    """Largest difference of volume fraction between two DVHs of the same bins (0..1)."""
    va, vb = _on_common_edges(a, b)
    return float(np.max(np.abs(va - vb)))


def dvh_standard_error(h: DVH, n_points: int) -> np.ndarray:
    """Standard error of a sampled DVH's volume fractions, ``sqrt(V (1 - V) / n)``."""
    v = np.asarray(h.volume_fraction, float)
    return np.sqrt(v * (1.0 - v) / max(int(n_points), 1))


def dkw_bound(n_points: int, failure_probability: float = 1e-6) -> float:
    """The largest volume-fraction error of a DVH of ``n_points`` uniform samples that is
    exceeded with at most ``failure_probability`` (Dvoretzky-Kiefer-Wolfowitz, Massart's
    constant): ``sqrt(ln(2 / p) / (2 n))``."""
    return float(np.sqrt(np.log(2.0 / failure_probability) / (2.0 * max(int(n_points), 1))))


# --------------------------------------------------------------------------- plotting
_PLAN_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True, eq=False)
class DVHCurve:
    """One curve of a DVH plot: a plan's DVH of a structure, drawn in the structure's colour."""

    plan: str
    dvh: DVH
    colour: tuple[float, float, float] = (0.2, 0.4, 0.8)
    label: str = ""


def plot_dvhs(path, curves: Sequence[DVHCurve], *, volume: str = "%", title: str = "",
              prescription_gy: float | None = None, bands: dict | None = None,
              dose_range_gy: tuple[float, float] | None = None):
    """Several plans' and structures' DVHs in one PNG (matplotlib, no pyplot state).

    Colour per structure (each curve's ``colour``), line style per plan (solid, dashed,
    dotted, dash-dot in the order plans first appear), as the seed's DVH popup does.
    ``volume``: "%" of each structure or "cc". ``bands``: optional {curve index: (n,) half
    widths (fraction)} drawn as shaded bands (e.g. sampling standard errors).
    ``dose_range_gy``: the dose axis' (low, high), default from 0 to the highest dose.
    Returns the path, or None when matplotlib is not installed.
    """
    from pathlib import Path

    if volume not in ("%", "cc"):
        raise ValueError(f"volume must be '%' or 'cc', got {volume!r}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the reports
        return None
    plans: list[str] = []
    for c in curves:
        if c.plan not in plans:
            plans.append(c.plan)
    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(curves):
        scale = 100.0 if volume == "%" else c.dvh.volume_cc
        style = _PLAN_STYLES[plans.index(c.plan) % len(_PLAN_STYLES)]
        label = c.label or (f"{c.dvh.name} ({c.plan})" if len(plans) > 1 else c.dvh.name)
        y = scale * np.asarray(c.dvh.volume_fraction)
        ax.plot(c.dvh.dose_gy, y, style, color=c.colour, label=label, linewidth=1.4, drawstyle="steps-post")
        if bands and i in bands:
            w = scale * np.asarray(bands[i])
            ax.fill_between(c.dvh.dose_gy, y - w, y + w, color=c.colour, alpha=0.2, step="post", linewidth=0)
    if prescription_gy:
        ax.axvline(prescription_gy, color="0.4", linewidth=0.8, linestyle="--", label=f"Rx {prescription_gy:g} Gy")
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)" if volume == "%" else "Volume (cc)")
    if dose_range_gy is not None:
        ax.set_xlim(*dose_range_gy)
    else:
        ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="best", fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
