"""Sampled rows for goals on large structures (the body, a ring, normal tissue).

A goal on the whole body makes every body voxel a row of the influence matrix (about 1.0 M at
clinical resolution), and the matrix's narrow part grows with the rows (about 225 stored
numbers a row with 9 beams). Such a structure's dose is smooth far from the targets, so its
goals need far fewer rows there. The rule (:func:`sample_rows`), deterministic, per structure:

1. A structure with at most ``max_rows`` voxels keeps every voxel (targets and organs at
   risk usually do), with weight 1.
2. A larger one keeps, with weight 1, its *dense* voxels: those within ``dense_margin_mm``
   of a target (where the dose, its gradients and the hot spots near the target are) and
   those of every structure kept whole by rule 1 (already rows: no cost).
3. Its other (*far*) voxels are cut into blocks of ``stride_zyx`` voxels aligned with the
   grid's origin, the block of fewest voxels (sides within a factor 2 of each other in mm,
   then the most nearly cubic) for which the structure has at most ``max_rows`` rows. Each block's far voxels
   are represented by one of them, the one nearest the block's centre (ties: the lowest
   flat index), weighted by how many far voxels of the structure the block holds.

The weights of a structure add up to its voxel count, so a weighted sum or mean over its rows
is the midpoint rule of the whole structure's (exact for a dose constant in each block), and
DVH volumes are weighted volumes (:mod:`._goals`). A maximum over the rows can miss a peak
between them, and more so after optimising: the optimiser lowers the sampled voxels, and with
beamlets finer than the blocks their unsampled neighbours can stay hot (the clinical horseshoe
with a 64 Gy body maximum: 64.00 Gy on the rows, 65.84 Gy over every voxel). Hence the hot-spot
rounds of ``optimise_plan`` (:attr:`RowSampling.hot_rounds`): unsampled voxels of a structure
with a maximum-dose goal that the engine finds within ``hot_margin_gy`` of the goal (or above)
become rows of weight 1 (:meth:`SampledRows.with_hot`) and the plan is re-optimised (there:
107 voxels, one round, 64.00 Gy over every voxel). ``optimise_plan`` reports the engine's
maximum over every voxel next to the rows'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np

__all__ = ["RowSampling", "SampledRows", "sample_rows"]

RULE = ("structures above max_rows voxels: every voxel within dense_margin_mm of a target or in a "
        "structure kept whole, plus one voxel per block of the rest (block sides within a factor 2 in mm, "
        "the fewest voxels that keep the structure within max_rows rows; the voxel nearest the block centre), "
        "weighted by the block's voxel count")


@dataclass(frozen=True)
class RowSampling:
    """How :func:`~ids_engine.planning.optimise_plan` picks the rows of large structures.

    Parameters
    ----------
    max_rows : a structure with more voxels than this is sampled (module docstring): all its
        dense voxels and at most ``max(max_rows - dense, max_rows // 5)`` far rows, so at most
        ``max(max_rows, dense + max_rows // 5)`` rows. Default 150 000: the clinical horseshoe's body
        (1.0 M voxels) becomes 164 k rows, 137 k of them dense (within 10 mm of the PTV, or
        in the PTV or OAR), 27 k far (blocks of 3 x 3 x 4 voxels, 6 x 5.9 x 7.8 mm).
    dense_margin_mm : voxels of a sampled structure within this distance (mm) of a target
        are all kept.
    hot_rounds : after optimising on the sample, far voxels of a structure with a maximum
        dose goal whose engine dose is within ``hot_margin_gy`` of the goal's dose (or above)
        become rows of their own (weight 1, taken from their block's representative) and the
        plan is re-optimised, warm-started, at most this many times (0: never): the optimiser
        can otherwise lower the sampled voxels while their unsampled neighbours stay hot.
    hot_margin_gy : see ``hot_rounds``.
    """

    max_rows: int = 150_000
    dense_margin_mm: float = 10.0
    hot_rounds: int = 2
    hot_margin_gy: float = 1.0

    def __post_init__(self) -> None:
        m = self.max_rows
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"RowSampling.max_rows must be a positive integer, got {m!r}")
        object.__setattr__(self, "max_rows", int(m))
        d = self.dense_margin_mm
        if isinstance(d, bool) or not isinstance(d, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(d)) or float(d) < 0.0:
            raise ValueError(f"RowSampling.dense_margin_mm must be a finite number >= 0, got {d!r}")
        object.__setattr__(self, "dense_margin_mm", float(d))
        h = self.hot_rounds
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 0:
            raise ValueError(f"RowSampling.hot_rounds must be an integer >= 0, got {h!r}")
        object.__setattr__(self, "hot_rounds", int(h))
        g = self.hot_margin_gy
        if isinstance(g, bool) or not isinstance(g, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(g)) or float(g) < 0.0:
            raise ValueError(f"RowSampling.hot_margin_gy must be a finite number >= 0, got {g!r}")
        object.__setattr__(self, "hot_margin_gy", float(g))


@dataclass(frozen=True)
class StructureRows:
    """How one structure's rows were chosen.

    voxels : the structure's voxels (in the body).
    rows : its rows (dense + sampled + hot).
    dense : rows kept with weight 1 (all of them for a structure kept whole) near the targets.
    hot : far voxels made rows of their own by the hot-spot rounds (weight 1).
    stride_zyx : block size in voxels of the far part ((1, 1, 1): not sampled).
    spacing_mm_zyx : the grid spacing (for the block size in mm).
    """

    voxels: int
    rows: int
    dense: int
    stride_zyx: tuple[int, int, int]
    spacing_mm_zyx: tuple[float, float, float]
    hot: int = 0

    @property
    def sampled(self) -> bool:
        return self.rows < self.voxels

    def summary(self) -> dict:
        return {"voxels": self.voxels, "rows": self.rows, "dense_rows": self.dense, "hot_rows": self.hot,
                "far_rows": self.rows - self.dense - self.hot, "stride_zyx": list(self.stride_zyx),
                "block_mm_zyx": [round(s * h, 3) for s, h in zip(self.stride_zyx, self.spacing_mm_zyx)]}


@dataclass(frozen=True, eq=False)
class SampledRows:
    """The rows for a set of structures.

    mask : bool (z, y, x): every row (the union over the structures).
    voxels : structure name -> int64 (n,) sorted flat indices (z, y, x) of its rows.
    weights : structure name -> float64 (n,) weights (how many voxels each row stands for;
        they add up to the structure's voxel count), None for a structure kept whole.
    structures : structure name -> :class:`StructureRows`.
    options : the :class:`RowSampling` used.
    far : sampled structure name -> (far voxels not rows (sorted flat indices), the position
        in ``voxels[name]`` of the row representing each): for :meth:`with_hot`.
    hot_rounds : hot-spot rounds done (:meth:`with_hot`).
    """

    mask: np.ndarray
    voxels: dict
    weights: dict
    structures: dict
    options: RowSampling
    far: dict = field(default_factory=dict)
    hot_rounds: int = 0

    def unsampled(self, name: str) -> np.ndarray:
        """Flat indices of ``name``'s voxels that are represented by another row (empty for a
        structure kept whole)."""
        return self.far[name][0] if name in self.far else np.zeros(0, np.int64)

    def with_hot(self, hot: Mapping[str, np.ndarray]) -> "SampledRows":
        """These rows plus, per structure, the given unsampled voxels (flat indices, from
        :meth:`unsampled`) as rows of weight 1, each taken from its representative's weight
        (which stays >= 1: a representative represents itself)."""
        mask = self.mask.copy()
        voxels, weights, structures, far = dict(self.voxels), dict(self.weights), dict(self.structures), dict(self.far)
        for name, new in hot.items():
            new = np.unique(np.asarray(new, np.int64))
            if new.size == 0:
                continue
            fv, rep_pos = self.far[name]
            pos = np.searchsorted(fv, new)
            if np.any(pos >= fv.size) or np.any(fv[np.minimum(pos, fv.size - 1)] != new):
                raise ValueError(f"with_hot: voxels given for {name!r} are not among its unsampled voxels")
            w = weights[name].copy()
            np.subtract.at(w, rep_pos[pos], 1.0)
            keep = np.ones(fv.size, bool)
            keep[pos] = False
            fv, rep_pos = fv[keep], rep_pos[keep]
            # Merge the new rows into the sorted row list; representatives' positions move.
            old = voxels[name]
            allv = np.concatenate([old, new])
            order = np.argsort(allv, kind="stable")
            moved = np.empty(allv.size, np.int64)
            moved[order] = np.arange(allv.size)
            voxels[name] = allv[order]
            weights[name] = np.concatenate([w, np.ones(new.size)])[order]
            far[name] = (fv, moved[rep_pos])
            mask.ravel()[new] = True
            info = structures[name]
            structures[name] = replace(info, rows=info.rows + int(new.size), hot=info.hot + int(new.size))
        return replace(self, mask=mask, voxels=voxels, weights=weights, structures=structures, far=far,
                       hot_rounds=self.hot_rounds + 1)

    @property
    def n_rows(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def sampled(self) -> bool:
        """Whether any structure is sampled (else the rows are exact)."""
        return any(s.sampled for s in self.structures.values())

    def voxel_weights(self) -> dict:
        """Structure name -> weights, for the sampled structures only (``optimise_fluence``'s
        ``voxel_weights``)."""
        return {k: w for k, w in self.weights.items() if w is not None}

    def summary(self) -> dict:
        return {"mode": "sampled" if self.sampled else "exact", "rows": self.n_rows,
                "max_rows": self.options.max_rows, "dense_margin_mm": self.options.dense_margin_mm,
                "hot_rounds": self.hot_rounds, "hot_margin_gy": self.options.hot_margin_gy, "rule": RULE,
                "structures": {k: s.summary() for k, s in self.structures.items()}}


def sample_rows(masks: Mapping[str, np.ndarray], targets_zyx: np.ndarray, spacing_mm_zyx, options: RowSampling,
                *, exact: bool = False) -> SampledRows:
    """Rows for goals on ``masks`` (module docstring).

    Parameters
    ----------
    masks : structure name -> bool (z, y, x): the structure's voxels that can be rows (those
        in the body).
    targets_zyx : bool (z, y, x): the targets' voxels (the dense margin is measured from them).
    spacing_mm_zyx : the grid spacing, mm, (z, y, x).
    options : :class:`RowSampling`.
    exact : keep every voxel of every structure (the weights all None).
    """
    if not isinstance(options, RowSampling):
        raise TypeError(f"options must be a RowSampling, got {type(options).__name__}")
    spacing = tuple(float(s) for s in spacing_mm_zyx)
    names = list(masks)
    counts = {k: int(np.count_nonzero(m)) for k, m in masks.items()}
    large = [] if exact else [k for k in names if counts[k] > options.max_rows]
    shape = next(iter(masks.values())).shape if masks else np.shape(targets_zyx)
    rows = np.zeros(shape, bool)
    voxels, weights, info, far_map = {}, {}, {}, {}
    whole = np.zeros(shape, bool)
    for k in names:
        if k not in large:
            whole |= masks[k]
            voxels[k] = np.flatnonzero(masks[k].ravel()).astype(np.int64)
            weights[k] = None
            info[k] = StructureRows(counts[k], counts[k], counts[k], (1, 1, 1), spacing)
    rows |= whole
    if large:
        near = whole.copy()
        if options.dense_margin_mm > 0 and np.any(targets_zyx):
            from scipy import ndimage

            near |= _near(np.asarray(targets_zyx, bool), spacing, options.dense_margin_mm, ndimage)
        else:
            near |= np.asarray(targets_zyx, bool)
        for k in large:
            m = masks[k]
            dense = np.flatnonzero((m & near).ravel())
            far = np.flatnonzero((m & ~near).ravel())
            budget = max(options.max_rows - dense.size, options.max_rows // 5, 1)
            reps, w, stride, rep_of = _sample_far(far, shape, spacing, budget)
            flat = np.concatenate([dense, reps])
            wt = np.concatenate([np.ones(dense.size), w])
            order = np.argsort(flat)
            voxels[k], weights[k] = flat[order].astype(np.int64), wt[order]
            # Each far voxel's representative, as a position in voxels[k]; the
            # representatives themselves are rows, so they leave the unsampled list.
            rep_pos = np.searchsorted(voxels[k], reps[rep_of])
            unsampled = far != reps[rep_of]
            far_map[k] = (far[unsampled].astype(np.int64), rep_pos[unsampled])
            rows.ravel()[flat] = True
            info[k] = StructureRows(counts[k], int(flat.size), int(dense.size), stride, spacing)
    return SampledRows(rows, voxels, weights, info, options, far_map)


def _near(targets: np.ndarray, spacing, margin_mm: float, ndimage) -> np.ndarray:
    """Voxels within ``margin_mm`` of a target voxel (centre to centre), on a crop around the
    targets grown by the margin (the distance transform of a clinical grid costs seconds)."""
    grow = [int(math.ceil(margin_mm / s)) for s in spacing]
    idx = np.argwhere(targets)
    lo = np.maximum(idx.min(axis=0) - grow, 0)
    hi = np.minimum(idx.max(axis=0) + np.asarray(grow) + 1, targets.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros(targets.shape, bool)
    out[box] = ndimage.distance_transform_edt(~targets[box], sampling=spacing) <= margin_mm
    return out


def _sample_far(far: np.ndarray, shape, spacing, budget: int):
    """Block representatives of the far voxels (flat indices, sorted ascending), their weights
    and the stride: the block of fewest voxels, sides within a factor ``_MAX_ASPECT`` of each
    other in mm (then the most nearly cubic), giving at most ``budget`` blocks."""
    if far.size <= budget:
        return far, np.ones(far.size), (1, 1, 1), np.arange(far.size)
    sp = np.asarray(spacing)
    zyx = np.unravel_index(far, shape)
    for stride in _strides(sp, shape):
        # Blocks cut by the structure's edge make the count higher than this estimate, never lower.
        if far.size / float(np.prod(stride)) > budget:
            continue
        reps, w, rep_of = _blocks(far, zyx, shape, stride, sp)
        if reps.size <= budget:
            return reps, w, stride, rep_of
    stride = tuple(int(n) for n in shape)  # one block: a single row (budget >= 1)
    reps, w, rep_of = _blocks(far, zyx, shape, stride, sp)
    return reps, w, stride, rep_of


_MAX_ASPECT = 2.0


def _strides(sp: np.ndarray, shape) -> list[tuple[int, int, int]]:
    """Candidate strides (z, y, x), fewest voxels first, then most nearly cubic in mm."""
    hi = [int(min(n, max(1, math.ceil(64.0 / s)))) for n, s in zip(shape, sp)]  # blocks up to 64 mm a side
    out = []
    for a in range(1, hi[0] + 1):
        for b in range(1, hi[1] + 1):
            for c in range(1, hi[2] + 1):
                side = np.array([a, b, c]) * sp
                aspect = float(side.max() / side.min())
                if aspect <= _MAX_ASPECT:
                    out.append((a * b * c, aspect, (a, b, c)))
    out.sort()
    return [s for _, _, s in out]


def _blocks(far, zyx, shape, stride, sp):
    nb = [-(-n // s) for n, s in zip(shape, stride)]
    block = np.zeros(far.size, np.int64)
    d2 = np.zeros(far.size)
    for a in range(3):
        b = zyx[a] // stride[a]
        block = block * nb[a] + b
        d2 += ((zyx[a] - (b * stride[a] + (stride[a] - 1) / 2.0)) * sp[a]) ** 2
    order = np.lexsort((far, d2, block))
    bs = block[order]
    first = np.flatnonzero(np.r_[True, bs[1:] != bs[:-1]])
    w = np.diff(np.r_[first, bs.size]).astype(np.float64)
    reps = far[order[first]]
    # Each far voxel's block, as an index into the representatives (sorted below).
    blk_of = np.empty(far.size, np.int64)
    blk_of[order] = np.cumsum(np.r_[True, bs[1:] != bs[:-1]]) - 1
    o = np.argsort(reps)
    inv = np.empty(o.size, np.int64)
    inv[o] = np.arange(o.size)
    return reps[o], w[o], inv[blk_of]
