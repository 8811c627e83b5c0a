"""Dose recovery (section 2.3 of the IDS paper), rebuilt around bands and joint solves.

What recovery keeps is a **watch list**: voxels with a band ``[lo, hi]`` (Gy) their dose must
stay in, a goal inside the band to aim for when they leave it, a weight (priority) and a
group (what the band stands for: target coverage, an OAR, a pin, an earlier request's
feature, this request, an isodose guard). The session builds it (see ``Session.run``).

Each step (at most ``steps``, 25 by default):

1. The dose at every watched voxel; the violation ``max(lo - D, D - hi, 0)`` and the
   objective ``J = sum(weight * violation^2)``. The state with the lowest ``J`` seen is
   remembered.
2. **Largest weighted violation first**: the worst voxel ``r``. (The paper closes in from the
   farthest candidate; measured on the horseshoe, that ping-pongs between hot and cold spots
   far from the request while the cold voxels next to it drift, see docs/architecture.md.)
3. **A cluster**: up to ``cluster_size`` voxels off in the same direction within
   ``cluster_radius_mm`` of ``r``, at least ``cluster_spacing_mm`` apart, are the columns;
   high-priority voxels (the request's own voxels, pins, guards, earlier features) that the
   first solve predicts will leave their band get a compensating column of the opposite sign.
4. **A guarded joint solve** (:meth:`Modifier.solve_step`): rows are the voxels within
   ``rows_radius_mm`` of ``r`` (off ones aim at their goal, in-band ones should stay put with a
   small weight), regularised non-negative scales, clipped at zero fluence, applied, and taken
   back (half, then all) if the band violation at the rows got worse. A rejected voxel is not
   chosen again in this request. With ``cap_retry_rows`` (the session sets it for drags and
   erases), a step that pushed soft-capped voxels that were not rows above their cap is taken
   back and solved once more with them as rows (the first step stands if that one is rejected).
5. After the last step the plan goes back to the best state seen (the tail of patches is
   taken back), so what is kept is the best state reached, not the last one. "Best" is
   lexicographic: first the largest violation of the request's own voxels and the pins
   (to 0.1 % of the largest goal), then ``J``.
6. **Request touch-up**: when the state with the lowest ``J`` is not the best one (it misses
   the request's own voxels or a pin), the plan first goes to that state and solves for the
   missed voxels alone (columns: the hard voxels off their band; rows as in a step, the hard
   ones weighted ``touchup_weight`` times), at most ``touchup_steps`` times; the state it
   reaches is then ranked like any other. Without it, a recovery whose every step leaves the
   request's voxel a few tenths of a Gy outside its band (raising the cold target next to it
   raises it too) went back to the state before its first step: measured on the ten-request
   session, target minimum 77-84 % kept instead of 93 % (docs/architecture.md).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from ids_engine import backend
from ids_engine.kernels import _cpu, _cpu_rows

__all__ = ["RecoveryOptions", "RecoveryResult", "Watch", "WatchBase", "WatchComposition", "attach_composition",
           "compose_watch", "distance_grid", "extend_watch", "modify_joint", "recover"]


@dataclass(frozen=True)
class RecoveryOptions:
    """Knobs of a recovery step (defaults measured on the horseshoe; see docs/architecture.md)."""

    cluster_size: int = 8
    cluster_radius_mm: float = 10.0
    cluster_spacing_mm: float = 3.0
    rows_radius_mm: float = 14.0
    max_rows_off: int = 48
    max_rows_priority: int = 24
    max_rows_keep: int = 24
    keep_weight: float = 0.01
    max_rows_risk: int = 64
    risk_slack_gy: float = 3.0
    max_rows_capped: int = 384
    max_compensate: int = 3
    regularisation: float = 1e-3
    touchup_steps: int = 3
    touchup_weight: float = 100.0
    cap_retry_rows: int = 0
    cap_retry_margin_gy: float = 0.3


@dataclass(eq=False)
class Watch:
    """The voxels recovery keeps in their bands.

    voxels : (n,) flat CT indices, sorted and unique.
    lo, hi : (n,) band (Gy; -inf / inf for open sides).
    goal : (n,) dose to aim for when the voxel is outside its band (inside the band).
    weight : (n,) priority (the violation is multiplied by it).
    group : (n,) int index into ``names``.
    names : what each group stands for, e.g. "target coverage", "pin 'cord'".
    kinds : per group, one of "tissue", "pin", "feature", "request", "guard".
    cap : (n,) a softer ceiling (<= hi) that the joint solves try to respect but recovery does
        not chase: far from the request, target and normal tissue should not rise by more than
        a few % (hot spots are better avoided than chased step by step). Default: ``hi``.
    floor : (n,) the dose below which a voxel counts as given up (reports only; recovery uses
        ``lo``): for target voxels the coverage level, or the dose before for one never covered.
        Default: ``lo``.
    """

    voxels: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    goal: np.ndarray
    weight: np.ndarray
    group: np.ndarray
    names: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    cap: np.ndarray | None = None
    floor: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.cap is None:
            self.cap = np.asarray(self.hi, float).copy()
        if self.floor is None:
            self.floor = np.asarray(self.lo, float).copy()

    def violation(self, dose_gy: np.ndarray) -> np.ndarray:
        return np.maximum(np.maximum(self.lo - dose_gy, dose_gy - self.hi), 0.0)

    def objective(self, dose_gy: np.ndarray) -> float:
        """``sum(weight * violation^2)``: what recovery minimises (the soft cap does not count)."""
        return float(np.sum(self.weight * self.violation(dose_gy) ** 2))

    def locate(self, flat) -> tuple[np.ndarray, np.ndarray]:
        """Where CT voxels ``flat`` (flat indices) sit in the watch: ``(positions, watched)``,
        positions clamped into range (valid only where ``watched``)."""
        flat = np.asarray(flat, np.int64)
        if not self.voxels.size:
            return np.zeros(flat.shape, np.int64), np.zeros(flat.shape, bool)
        at = np.minimum(np.searchsorted(self.voxels, flat), self.voxels.size - 1)
        return at, self.voxels[at] == flat

    def kept_groups(self) -> list[int]:
        """The groups that are not tissue (pins, features, guards, the request) and hold
        voxels: what a side-effect repair must not make worse."""
        kinds = np.asarray(self.kinds, object)
        return [g for g, k in enumerate(kinds) if k != "tissue" and np.any(self.group == g)]

    def worst_per_group(self, violation: np.ndarray, groups) -> np.ndarray:
        """Per group of ``groups``, the largest of ``violation`` (n,) over its voxels."""
        return np.array([float(violation[self.group == g].max()) for g in groups])

    def hard(self) -> np.ndarray:
        """(n,) bool: the request's own voxels and the pins, what the best state keeps first."""
        per_group = np.isin(np.asarray(self.kinds, object), ["request", "pin"])
        return per_group[self.group] if per_group.size else np.zeros(np.shape(self.group), bool)


@dataclass(frozen=True, eq=False)
class RecoveryResult:
    """What recovery did.

    steps : steps run; voxels : the voxel each step chose (flat); accepted : whether its solve
    was kept; patches : every patch applied in order (take-backs and the return to the best
    state included); best_step : the index in ``objective`` of the state kept (0 = before any
    step); objective : J after each step (index 0: before; after a request touch-up one more
    entry, J after it); steps, voxels and accepted count the touch-up's solves too;
    remaining_candidates : watched voxels still outside their band at the end; final_gy : dose
    at the watched voxels at the end.
    """

    steps: int
    voxels: np.ndarray
    accepted: np.ndarray
    remaining_candidates: int
    best_step: int
    objective: np.ndarray
    final_gy: np.ndarray
    patches: list = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)


def extend_watch(watch: Watch, voxels, hi_gy, weight: float, name: str) -> Watch:
    """The watch with more voxels held below ``hi_gy`` (open below), new ones as a group of
    their own (kind "tissue"). A voxel already watched keeps its group, and gets the new upper
    edge only where it is lower (its lower edge never above it, its goal inside it); the
    request's own voxels and pins are left as they are."""
    voxels = np.asarray(voxels, np.int64).reshape(-1)
    hi_gy = np.asarray(hi_gy, float).reshape(-1)
    if voxels.size != hi_gy.size:
        raise ValueError(f"extend_watch: {voxels.size} voxels but {hi_gy.size} upper edges")
    allv = np.union1d(watch.voxels, voxels)
    n = allv.size
    old = np.searchsorted(allv, watch.voxels)
    new = np.searchsorted(allv, voxels)
    lo, hi, goal, cap = np.full(n, -np.inf), np.full(n, np.inf), np.zeros(n), np.full(n, np.inf)
    wgt, grp, floor = np.zeros(n), np.full(n, -1, np.int32), np.full(n, -np.inf)
    lo[old], hi[old], goal[old], cap[old], floor[old] = watch.lo, watch.hi, watch.goal, watch.cap, watch.floor
    wgt[old], grp[old] = watch.weight, watch.group
    kinds = np.asarray(watch.kinds, object)
    fresh = grp[new] < 0
    kept = ~fresh & np.isin(kinds[np.maximum(grp[new], 0)], ["request", "pin"])
    change = fresh | (~kept & (hi_gy < hi[new]))
    i, h = new[change], hi_gy[change]
    hi[i] = h
    lo[i] = np.minimum(lo[i], h - 1e-6)
    cap[i] = np.minimum(cap[i], h)
    # aim a little inside the new edge (0.25 Gy, or a quarter of a narrower band)
    inside = h - np.minimum(0.25, 0.25 * (h - np.where(np.isfinite(lo[i]), lo[i], -np.inf)))
    goal[i] = np.where(fresh[change], inside, np.minimum(goal[i], inside))
    wgt[i] = np.maximum(wgt[i], float(weight))
    grp[new[fresh]] = len(watch.names)
    return Watch(allv, lo, hi, goal, wgt, grp, list(watch.names) + [name], list(watch.kinds) + ["tissue"], cap,
                 np.minimum(floor, lo))


def distance_grid(request_mask_zyx: np.ndarray, candidates_flat: np.ndarray, shape_zyx) -> np.ndarray:
    """Chamfer (chessboard) distance in voxels from the requested feature, at the candidate voxels.

    The paper orders recovery by this distance (Borgefors 1984); the band-based recovery
    orders by violation instead and uses Euclidean millimetres for its neighbourhoods, but the
    transform stays available for analyses of the recovery order. Computed on the bounding
    box of the request and the candidates only.
    """
    req = np.argwhere(request_mask_zyx)
    if req.size == 0:
        raise ValueError("distance_grid: the request has no voxel")
    cand = np.stack(np.unravel_index(candidates_flat, shape_zyx), axis=-1) if candidates_flat.size else req[:0]
    pts = np.concatenate([req, cand]) if cand.size else req
    lo = pts.min(axis=0)
    hi = pts.max(axis=0) + 1
    box = request_mask_zyx[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    dist = ndimage.distance_transform_cdt(~box, metric="chessboard")
    if not cand.size:
        return np.zeros(0, np.float64)
    c = cand - lo
    return dist[c[:, 0], c[:, 1], c[:, 2]].astype(np.float64)


def _smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest ``keys``, in increasing order (stable on ties)."""
    if keys.size > 4 * k:
        part = np.argpartition(keys, k)[:k]
        return part[np.argsort(keys[part], kind="stable")]
    return np.argsort(keys, kind="stable")[:k]


def _sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    """``np.unique(np.concatenate(parts))`` (integer parts): sorted, repeats dropped. NumPy 2's
    ``unique`` hashes before it sorts: measured 150 us for a step's 500 rows, this 20 us."""
    out = np.concatenate(parts)
    out.sort()
    if out.size > 1:
        first = np.empty(out.size, bool)
        first[0] = True
        np.not_equal(out[1:], out[:-1], out=first[1:])
        out = out[first]
    return out


@functools.lru_cache(maxsize=16)
def _ball_offsets(radius_mm: float, spacing_mm: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray | None]:
    """The grid offsets ((m, 3) int64 (z, y, x)) within ``radius_mm`` on a grid of spacing
    ``spacing_mm`` (z, y, x), and them as rows along x (:func:`_cpu_rows.ball_rows`), read-only:
    made once per radius and spacing, not once per watch (measured 2 ms a request on the
    clinical horseshoe)."""
    spacing = np.asarray(spacing_mm, float)
    r = np.floor(radius_mm / spacing).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in r], indexing="ij"), axis=-1).reshape(-1, 3)
    offs = grid[((grid * spacing) ** 2).sum(axis=1) <= radius_mm**2 + 1e-9]
    rows = _cpu_rows.ball_rows(offs)
    for a in (offs, rows):
        if a is not None:
            a.flags.writeable = False
    return offs, rows


def _rows_for(modifier, watch: "Watch", opts: "RecoveryOptions") -> "_Rows":
    """The watch's row helper, built once per watch (the modification and recovery share it)."""
    cached = watch.__dict__.get("_rows_cache")
    if cached is None or cached[0] is not modifier or cached[1] != opts:  # the modifier itself, not its id()
        cached = (modifier, opts, _Rows(modifier, watch, opts))
        watch.__dict__["_rows_cache"] = cached
    return cached[2]


@dataclass(frozen=True, eq=False)
class WatchBase:
    """The part of every watch that depends on the case's geometry only (the session's target,
    OAR and normal-tissue sample): ``voxels``, sorted unique flat CT indices (read-only). The
    modifier keeps the BEV row tables of the latest base (:func:`_base_rows`), so a watch built
    on it (:func:`compose_watch`) gets its tables spliced, not built: measured 18 ms of a drag
    preview's host work on the clinical horseshoe."""

    voxels: np.ndarray
    memo: dict = field(default_factory=dict, repr=False)  # the dose at the voxels, by plan state (_composed_dose)


@dataclass(frozen=True, eq=False)
class WatchComposition:
    """How a watch's voxels are made of its base's: ``removed`` (base indices not in the watch),
    ``extra`` (sorted flat voxels not in the base) at watch positions ``extra_at``,
    ``base_at`` (each base voxel's watch position, -1 where removed) and ``source`` (for each
    watch position, its index into ``[base voxels, extra voxels]``)."""

    base: WatchBase
    removed: np.ndarray
    extra: np.ndarray
    extra_at: np.ndarray
    base_at: np.ndarray
    source: np.ndarray


def compose_watch(base: WatchBase, removed, others) -> tuple[np.ndarray, WatchComposition]:
    """The sorted union of ``base.voxels`` less the base indices ``removed`` (unless one of
    ``others`` holds them) and the flat voxels ``others`` (arrays), with its composition
    (:class:`WatchComposition`). Equal to marking every part on the grid and taking the
    marked voxels, for a few operations on the small parts instead of the grid. ``removed``
    must lie in ``[0, len(base.voxels))`` (ValueError otherwise)."""
    bv = base.voxels
    nb = bv.size
    removed = np.asarray(removed, np.int64).reshape(-1)
    if removed.size and (removed.min() < 0 or removed.max() >= nb):
        raise ValueError(f"compose_watch: removed base indices must lie in [0, {nb}), got "
                         f"{int(removed.min())}..{int(removed.max())}")
    others = [np.asarray(o, np.int64).reshape(-1) for o in others]
    small = np.unique(np.concatenate(others)) if others else np.zeros(0, np.int64)
    if nb and small.size:
        pos = np.minimum(np.searchsorted(bv, small), nb - 1)
        in_base = bv[pos] == small
    else:
        pos, in_base = np.zeros(small.size, np.int64), np.zeros(small.size, bool)
    extra = small[~in_base]
    removed = np.setdiff1d(np.asarray(removed, np.int64), pos[in_base])
    # A kept base voxel's watch position: its base index, plus the extra voxels before it,
    # less the removed base voxels before it (counted on the small parts: no base-sized gathers).
    below = np.searchsorted(bv, extra)  # base voxels before each extra one
    step = np.zeros(nb + 1, np.int64)
    np.add.at(step, below, 1)
    if removed.size:
        keep = np.ones(nb, bool)
        keep[removed] = False
        kept = np.flatnonzero(keep)
        at = below - np.searchsorted(bv[removed], extra)  # kept base voxels before each extra one
        np.add.at(step, removed + 1, -1)
    else:
        kept = np.arange(nb)
        at = below
    source = np.insert(kept, at, nb + np.arange(extra.size))
    extra_at = at + np.arange(extra.size)
    base_at = np.arange(nb, dtype=np.int64) + np.cumsum(step[:nb])
    base_at[removed] = -1
    allv = np.take(np.concatenate([bv, extra]), source)
    return allv, WatchComposition(base, removed, extra, extra_at, base_at, source)


def attach_composition(watch: Watch, comp: WatchComposition) -> Watch:
    """Mark ``watch`` (whose voxels are exactly those ``comp`` composes) as built on a base:
    its row tables are then spliced from the base's (:class:`_Rows`)."""
    if comp.source.size != watch.voxels.size:
        raise ValueError(f"attach_composition: {comp.source.size} composed voxels, the watch has {watch.voxels.size}")
    watch.__dict__["_composition"] = comp
    watch.__dict__.pop("_rows_cache", None)  # row tables spliced from another composition are stale
    return watch


def _base_rows(modifier, base: WatchBase) -> "_BaseRows":
    """The row tables of ``base``, kept on the modifier for the latest base while the engine's
    beam geometry is the same objects (they depend on nothing else: not on the plan)."""
    eng = modifier.engine
    token = tuple(eng.geometry)
    cached = modifier.__dict__.get("_base_rows_cache")
    if cached is None or cached[0] is not base or len(cached[1]) != len(token) \
            or any(a is not b for a, b in zip(cached[1], token)):
        cached = modifier.__dict__["_base_rows_cache"] = (base, token, _BaseRows(eng, base))
    return cached[2]


def _watch_dose(eng, watch: Watch) -> np.ndarray:
    """The dose (Gy, float64 host) at the watch's voxels. The watch remembers the last read
    and the engine's plan-state version it was read at (:func:`_remember_dose`): at the same
    version (the same plan state, bit for bit) that read is returned (a copy), not read again,
    e.g. the session's read for the watch's bands, then the modification's, then recovery's
    after a modification whose last solve was kept. A watch built on a base
    (:func:`compose_watch`) is read as its base's voxels and its extra ones
    (:func:`_composed_dose`)."""
    ver = getattr(eng, "state_version", None)
    memo = watch.__dict__.get("_dose_memo")
    if ver is not None and memo is not None and memo[0] is eng and memo[1] == ver:
        return memo[2].copy()
    comp = watch.__dict__.get("_composition")
    if comp is not None:
        dose = _composed_dose(eng, comp)
    else:
        dose = backend.asnumpy(eng.dose_at_voxels(watch.voxels)).astype(np.float64)
    _remember_dose(eng, watch, dose)
    return dose


# Plan states whose dose at the base's voxels is kept (the states the latest requests started from).
_BASE_DOSES = 4


def _composed_dose(eng, comp: "WatchComposition", remember: bool = False) -> np.ndarray:
    """The dose (Gy, float64 host) at a composed watch's voxels, read at the base's voxels and
    the extra ones (one read of both, :meth:`DoseEngine.dose_at_voxels` is per voxel) and
    put in watch order. The base's voxel set is the same for every request, so its read-out
    tables stay in the engine's cache (a new watch's 10^5 voxels would build and upload them
    for every request). With ``remember`` (the session's read when it builds a watch), the
    base's dose is kept with the plan-state version it was read at, for the latest few
    versions: drag previews that are taken back start from the same state, and then only
    the extra voxels are read."""
    base = comp.base
    nb = base.voxels.size
    ver = getattr(eng, "state_version", None)
    memo = base.memo.setdefault("dose", {})  # version -> (engine, dose), the latest _BASE_DOSES
    got = memo.get(ver) if ver is not None else None
    if got is not None and got[0] is eng:
        db = got[1]
        memo[ver] = memo.pop(ver)  # most recently used last
        de = backend.asnumpy(eng.dose_at_voxels(comp.extra)) if comp.extra.size else np.zeros(0, np.float32)
    else:
        d = eng.dose_at_voxels(base.voxels)
        if comp.extra.size:
            d = eng.xp.concatenate([d, eng.dose_at_voxels(comp.extra)])
        h = backend.asnumpy(d)
        db, de = h[:nb], h[nb:]
        if remember and ver is not None:
            db = db.copy()  # (its own array: the read of both is not kept with it)
            db.setflags(write=False)
            memo[ver] = (eng, db)
            while len(memo) > _BASE_DOSES:
                memo.pop(next(iter(memo)))
    if _cpu.HAVE_NUMBA:
        return _cpu_rows.gather_composed(db, de, comp.source)
    return np.take(np.concatenate([db, de]), comp.source).astype(np.float64)


def _remember_dose(eng, watch: Watch, dose: np.ndarray) -> None:
    """Record ``dose`` (just read at the watch's voxels) as the watch's dose at the engine's
    current plan state (a copy is kept)."""
    ver = getattr(eng, "state_version", None)
    if ver is not None:
        watch.__dict__["_dose_memo"] = (eng, ver, np.array(dose, np.float64))


def _row_key(row: int):
    """A BEV row as a search key into the int16 row tables (an int16 when it fits: a Python
    int would make NumPy compare in int64, converting the whole table on every search)."""
    return np.int16(row) if -32768 <= row <= 32767 else row


def _take_back(modifier, patches: list, n_keep: int, watch: Watch | None) -> np.ndarray | None:
    """Take back ``patches[n_keep:]`` in one patch per beam (appended to ``patches``; clipped:
    the float32 sum of the tail can overshoot zero fluence by round-off); returns the watch's
    dose read after it (None, and no device read, when ``watch`` is None)."""
    eng = modifier.engine
    back = modifier._clip_nonnegative(modifier._combine([(-1.0, [p]) for p in patches[n_keep:]]))
    eng.apply_patches(back)
    patches.extend(back)
    if watch is None:
        return None
    return _watch_dose(eng, watch)


def _pick_spread(order: np.ndarray, coords: np.ndarray, spacing: float, limit: int) -> list[int]:
    """Greedy: walk ``order`` and keep indices at least ``spacing`` mm from every kept one
    (compiled with numba when it is installed: the same indices)."""
    if _cpu.HAVE_NUMBA:
        return _cpu_rows.pick_spread(order, coords, spacing, limit)
    kept: list[int] = []
    for i in order:
        if len(kept) >= limit:
            break
        if kept:
            d = np.linalg.norm(coords[kept] - coords[i], axis=1)
            if d.min() < spacing:
                continue
        kept.append(int(i))
    return kept


class _Rows:
    """Which watched voxels a joint solve looks at (shared by the modification and recovery).

    Precomputes each watched voxel's position in mm and on every beam's fine fluence grid.
    """

    _u_sorted = False  # the row tables' rows are ordered by u too (a base's, see _BaseRows)
    _whole_rows = None  # then, per beam, whether its rows are whole (_cpu.sort_rows_by_u)
    _row_starts = None  # and where each row begins (_cpu.row_starts)

    def __init__(self, modifier, watch: Watch, opts: RecoveryOptions) -> None:
        eng = modifier.engine
        self.watch = watch
        self.opts = opts
        self.vox = np.asarray(watch.voxels, np.int64)
        self.shape = tuple(int(n) for n in eng.grid.shape_zyx)
        self.spacing = np.asarray(eng.grid.spacing_mm_zyx, float)
        # Neighbourhoods are looked up on the grid (a ball of index offsets, then the sorted
        # watch), not in a k-d tree over 10^5 points.
        self._balls: dict = {}
        self._ball_rows: dict = {}  # the balls' offsets as rows along x (_cpu_rows.ball_rows)
        n_beams = len(eng.geometry)
        if not self._from_base(modifier, watch):
            self._build(eng)
        self.by_v = [(self._order2[b], self._rows2[b]) for b in range(n_beams)]
        self._by_v_uv = [(self._bu_sorted2[b], self._bv_sorted2[b]) for b in range(n_beams)]
        # The request's own voxels and the pins are rows of every solve, wherever it is.
        self.hard = watch.hard()
        always = np.flatnonzero(self.hard)
        if always.size > 64:
            always = always[np.linspace(0, always.size - 1, 64).round().astype(int)]
        self.always = always
        self.reach_cells = float(modifier.kernel_radius_mm / eng.geometry[0].fluence_grid.pitch_mm) + 2.0
        self.hi_solve = np.minimum(watch.hi, watch.cap)
        self.capped = np.asarray(watch.cap) < np.asarray(watch.hi)

    def __getattr__(self, name: str):
        """The BEV tables made on first use: a watch on a base's (beams, n) ``bev_u2``,
        ``bev_v2``, ``bev_w2`` spliced from the base's (its extra voxels' looked up), and the
        per-beam rows ``bev_u``, ``bev_v``, ``bev_w`` of those tables."""
        if name in ("bev_u2", "bev_v2", "bev_w2") and "_bev_source" in self.__dict__:
            base, eu, ev, ew = self._bev_source
            comp = self.watch.__dict__["_composition"]
            src, e_pos = comp.source, comp.extra_at
            shape = (len(base.bev_u2), self.vox.size)
            for key, src_tab, e_tab in (("bev_u2", base.bev_u2, eu), ("bev_v2", base.bev_v2, ev),
                                        ("bev_w2", base.bev_w2, ew)):
                # mode="clip": the extra voxels' source indices, nb and above, read a base entry
                # then overwritten (NumPy buffers ``out`` in the default mode).
                dst = self.__dict__[key] = np.empty(shape, np.float32)
                np.take(src_tab, src, axis=1, mode="clip", out=dst)
                dst[:, e_pos] = e_tab
            return self.__dict__[name]
        if name in ("bev_u", "bev_v", "bev_w"):
            rows = self.__dict__[name] = list(getattr(self, name + "2"))
            return rows
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def _bev_at(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(beams, len(idx)) float32: ``bev_u2[:, idx]`` and ``bev_v2[:, idx]``, read from the
        base's tables where the watch's own are not made (the same values)."""
        if "_bev_source" not in self.__dict__ or "bev_u2" in self.__dict__:
            return self.bev_u2[:, idx], self.bev_v2[:, idx]
        base, eu, ev, _ = self._bev_source
        s = self.watch.__dict__["_composition"].source[idx]
        nb = base.vox.size
        inb = s < nb
        out = []
        for src_tab, e_tab in ((base.bev_u2, eu), (base.bev_v2, ev)):
            got = np.empty((src_tab.shape[0], s.size), np.float32)
            got[:, inb] = src_tab[:, s[inb]]
            got[:, ~inb] = e_tab[:, s[~inb] - nb]
            out.append(got)
        return out[0], out[1]

    def _build(self, eng) -> None:
        """The voxels' grid positions and every beam's row tables, from scratch."""
        self.index_zyx = np.stack(np.unravel_index(self.vox, self.shape), axis=-1)
        self.coords = self.index_zyx * self.spacing
        # Per beam, rows of (beams, voxels) blocks (so that all beams can be handled at once).
        shape = (len(eng.geometry), self.vox.size)
        self.bev_u2, self.bev_v2, self.bev_w2 = (np.empty(shape, np.float32) for _ in range(3))
        # Per beam (rows of (beams, voxels) blocks): the voxels ordered by whole BEV row, their
        # rows, and their (u, v) in that order (a patch's rows are one slice).
        self._order2 = np.empty(shape, np.int64)
        self._rows2 = np.empty(shape, np.int16)
        self._bu_sorted2, self._bv_sorted2 = np.empty(shape, np.float32), np.empty(shape, np.float32)
        for b, geo in enumerate(eng.geometry):
            self._fill_beam(geo, b)

    def _from_base(self, modifier, watch: Watch) -> bool:
        """The tables from those of the watch's base voxel set (:class:`WatchBase`, the
        session's target, OAR and normal-tissue sample: geometry only, kept on the modifier
        while the beams' geometry is the same), not built: the per-voxel BEV positions taken
        from the base's, the few extra voxels (the request's feature and guards, earlier
        features, pins) looked up. The row-sorted tables stay the base's
        (:meth:`_under_patches` searches them and the extra voxels, and drops the base voxels
        the watch left out): the same voxels as a fresh build. False when the watch has no
        base (then :meth:`_build`)."""
        comp = watch.__dict__.get("_composition")
        if comp is None:
            return False
        eng = modifier.engine
        base = _base_rows(modifier, comp.base)
        extra = comp.extra
        m = extra.size
        n_beams = len(eng.geometry)
        # Each beam's BEV look-up of the extra voxels.
        eu, ev, ew = (np.empty((n_beams, m), np.float32) for _ in range(3))
        for b, geo in enumerate(eng.geometry):
            eu[b], ev[b], ew[b], _ = _bev_lookup(geo.fine.host, extra)
        # Watch position i comes from comp.source[i] in [base voxels, extra voxels] (``mode="clip"``:
        # the extra voxels' source indices, nb and above, read a base entry then overwritten;
        # NumPy buffers ``out`` in the default mode).
        src, e_pos = comp.source, comp.extra_at
        self.index_zyx = np.take(base.index_zyx, src, axis=0, mode="clip")
        self.index_zyx[e_pos] = np.stack(np.unravel_index(extra, self.shape), axis=-1).reshape(m, 3)
        self.coords = self.index_zyx * self.spacing
        # The watch's own BEV tables are spliced only when read (__getattr__: the NumPy
        # paths); the compiled ones read the base's at the watch's sources (_bev_at).
        self._bev_source = (base, eu, ev, ew)
        # The row-sorted tables are the base's (indices into the base, see _under_patches).
        self._order2, self._rows2 = base._order2, base._rows2
        self._bu_sorted2, self._bv_sorted2 = base._bu_sorted2, base._bv_sorted2
        self._u_sorted, self._whole_rows, self._row_starts = base._u_sorted, base._whole_rows, base._row_starts
        self._split = (comp.base_at, base.vox.size, eu, ev, e_pos)
        return True

    def _fill_beam(self, geo, b: int) -> None:
        """Beam ``b``'s rows of the BEV blocks and its row order (host copies of the geometry:
        no device work)."""
        h = geo.fine.host
        bv = self.bev_v2[b]
        # A voxel not reached by this beam (u NaN, v +inf, w 0) is never under its patches.
        # w: dose per unit fluence on the ray (the primary's depth dose and inverse square):
        # how strongly a patch at this voxel's BEV position changes its dose.
        if _cpu.HAVE_NUMBA:
            out = _cpu.gather_bev(h.position, h.u_cells, h.v_cells, h.weights[0], self.vox, self.bev_u2[b], bv,
                                  self.bev_w2[b])
        else:
            self.bev_u2[b], bv[...], self.bev_w2[b], out = _bev_lookup(h, self.vox)
        # Ordered by whole BEV row (a stable sort of 16-bit keys): a patch's rows are one
        # slice of it, widened to whole rows and then filtered exactly.
        order = self._order2[b]
        if not (_cpu.HAVE_NUMBA and _cpu.sort_by_row(self.bev_u2[b], bv, out, order, self._rows2[b],
                                                     self._bu_sorted2[b], self._bv_sorted2[b])):
            row = np.where(out, np.iinfo(np.int16).max, np.clip(np.floor(bv), -32000, 32000)).astype(np.int16)
            order[...] = np.argsort(row, kind="stable")
            self._rows2[b] = row[order]
            self._bu_sorted2[b] = self.bev_u2[b][order]
            self._bv_sorted2[b] = bv[order]

    def ball(self, cols: np.ndarray, radius_mm: float) -> np.ndarray:
        """Watch positions (sorted) within ``radius_mm`` of the watched voxels ``cols``."""
        offs = self._balls.get(radius_mm)
        if offs is None:
            offs, self._ball_rows[radius_mm] = _ball_offsets(float(radius_mm), tuple(float(s) for s in self.spacing))
            self._balls[radius_mm] = offs
        if not self.vox.size:
            return np.zeros(0, np.int64)
        mark = np.zeros(self.vox.size, bool)
        if _cpu.HAVE_NUMBA and self.index_zyx.dtype == np.int64:
            # Compiled: the ball's rows along x, each one search of the sorted watch (the same
            # voxels); the marks read back in the span it set only (a ball is a few slices of
            # the watch).
            rows = self._ball_rows[radius_mm]
            if rows is not None:
                first, stop = _cpu_rows.ball_row_marks(self.index_zyx, cols, rows, self.shape, self.vox, mark)
                if first >= stop:
                    return np.zeros(0, np.int64)
                return np.flatnonzero(mark[first:stop]) + np.int64(first)
        pts = (self.index_zyx[np.asarray(cols, np.int64)][:, None, :] + offs[None]).reshape(-1, 3)
        pts = pts[np.all((pts >= 0) & (pts < self.shape), axis=1)]
        at, watched = self.watch.locate(np.ravel_multi_index(pts.T, self.shape))
        # Marked on the watch (sorted, unique), not sorted as grid indices: the same set.
        mark[at[watched]] = True
        return np.flatnonzero(mark).astype(np.int64)

    def select(self, cols: np.ndarray, dose: np.ndarray, viol: np.ndarray) -> np.ndarray:
        """Rows for columns ``cols`` (indices into the watch): the voxels near them (off ones
        first, priority ones, a sample of the rest), the at-risk voxels under their patches in
        any beam (a raise here can make a hot spot far away along the beams, in the entrance
        region; a compensating lowering a cold one), least room first, and the hard ones."""
        opts, w = self.opts, self.watch
        cols = np.asarray(cols, np.int64)
        near_idx = self.ball(cols, opts.rows_radius_mm)  # sorted: subsets of it are in watch order
        viol_near = viol[near_idx]
        off = near_idx[viol_near > 0]
        off = off[np.argsort(-(w.weight[off] * viol[off]), kind="stable")][: opts.max_rows_off]
        inband = near_idx[viol_near == 0]
        prio = inband[w.weight[inband] > 1.0]
        prio = prio[np.argsort(self._distance_mm(prio, cols), kind="stable")][: opts.max_rows_priority]
        keep = inband[w.weight[inband] <= 1.0]
        if keep.size > opts.max_rows_keep:
            keep = keep[np.linspace(0, keep.size - 1, opts.max_rows_keep).round().astype(int)]
        # The watched voxels under the columns' patches in any beam (each beam's voxels are
        # kept sorted by their BEV row, so the patch's rows are one slice), then those in
        # their band, not near, and with little room.
        mark = self._under_patches(cols)
        got = None
        if _cpu.HAVE_NUMBA and opts.max_rows_risk >= 1:
            # Only the least-room voxels and the capped ones, none of the (n,) outputs.
            got = _cpu_rows.in_band_risk(mark, near_idx, viol, dose, self.hi_solve, w.lo, self.capped,
                                         opts.risk_slack_gy, opts.max_rows_risk, self._index_scratch())
        if got is not None:
            risk, capped = got  # risk: the set of the lines below (its order is _sorted_unique's)
        elif _cpu.HAVE_NUMBA:
            touched_all, slack, capped = _cpu_rows.in_band_under(mark, near_idx, viol, dose, self.hi_solve, w.lo,
                                                                 self.capped, opts.risk_slack_gy)
        else:
            mark[near_idx] = False
            touched_all = np.flatnonzero(mark)
            slack = np.minimum(self.hi_solve[touched_all] - dose[touched_all], dose[touched_all] - w.lo[touched_all])
            pick = (viol[touched_all] == 0) & (slack < opts.risk_slack_gy)
            touched_all, slack = touched_all[pick], slack[pick]
            # Soft-capped voxels (far target, normal tissue) all have about the same room, so the
            # least-room order does not find where the patches will make a hot spot.
            capped = touched_all[self.capped[touched_all]]
        if got is None:
            risk = touched_all[_smallest(slack, opts.max_rows_risk)]
        if capped.size > opts.max_rows_capped:
            # Rank by how much a patch at the columns would raise each one (its dose per unit
            # fluence, times the narrow kernel's fall-off from the nearest column's
            # projection), per Gy of room left: the stripes along the beams' entrance are
            # a few mm wide, an even sample misses their peaks.
            # All beams at once ((beams, voxels) float32, the same operations per element; a
            # column off a beam's grid is skipped there by an infinite distance).
            capped = self._top_capped(capped, cols, dose, opts.max_rows_capped)
        return _sorted_unique([cols, off, prio, keep, risk, capped, self.always])

    def _index_scratch(self) -> np.ndarray:
        """(n,) int64 kept for the watch's compiled passes (:meth:`select`'s capped voxels):
        not allocated per step. One per row helper: two ``select`` calls on the same helper
        at once would share it (none do: a watch's steps run one after another)."""
        buf = self.__dict__.get("_scratch_idx")
        if buf is None or buf.shape[0] != self.vox.size:
            buf = self.__dict__["_scratch_idx"] = np.empty(self.vox.size, np.int64)
        return buf

    @property
    def _sens_s2(self) -> float:
        """The capped ranking's fall-off ``2 sigma^2`` (fine cells^2): the narrow kernel's
        sigma taken as a third of the patches' reach."""
        return 2.0 * (self.reach_cells / 3.0) ** 2

    def _capped_keys(self, capped: np.ndarray, cols: np.ndarray, dose: np.ndarray) -> np.ndarray:
        """(len(capped),) float64: the capped ranking's keys, ``-(sens / room)`` (least first)."""
        d2, w_capped = self._capped_distance2(capped, cols)
        sens = np.maximum(np.float32(0), (w_capped * np.exp(-d2 / self._sens_s2)).max(axis=0))
        room = np.maximum(self.hi_solve[capped] - dose[capped], 0.02)
        return -(sens / room)

    def _top_capped(self, capped: np.ndarray, cols: np.ndarray, dose: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` voxels of ``capped`` with the least keys (:meth:`_capped_keys`): the set
        ``capped[_smallest(keys, k)]``, in some order.

        Compiled (numba), with more than ``4 k`` voxels: bounds of the voxels' keys
        (:func:`kernels._cpu_rows.capped_sens_bounds`, one ``exp`` per voxel, within a relative
        1e-5) leave out the voxels whose upper bound lies a relative 1e-3 below the ``k``-th
        largest lower bound (their key cannot reach the ``k``-th); a voxel whose ceiling
        ``w / room``, or that times a bound of the fall-off at the columns' boxes, already lies
        below gets no bounds (:func:`kernels._cpu_rows.capped_candidates`; ``w`` NaN where the
        bounds would refuse, :func:`_w_ceiling`). Only the few left (about ``k``) get
        their exact keys: the same NumPy expression, whose float32 ``exp`` gives an element
        the same value wherever it sits in the array (tested). Their ``k`` least keys are
        ``_smallest``'s set unless the ``k``-th ties with the next (then ``argpartition``
        picks among the tied ones): then, as when the bounds do not apply, every key is
        computed."""
        if not (_cpu.HAVE_NUMBA and capped.size > 4 * k and k > 0):
            return capped[_smallest(self._capped_keys(capped, cols, dose), k)]
        if "_bev_source" in self.__dict__ and "bev_u2" not in self.__dict__:
            base, eu, ev, ew = self._bev_source
            tables, extra = (base.bev_u2, base.bev_v2, base.bev_w2), (eu, ev, ew)
            w_top = (_w_top(base), _w_ceiling(ew))
            source = self.watch.__dict__["_composition"].source
        else:
            tables = (self.bev_u2, self.bev_v2, self.bev_w2)
            extra = tuple(np.empty((len(self.bev_u2), 0), np.float32) for _ in range(3))
            # (read at the voxels: the tables of a row helper without a base are its own)
            w_top, source = (np.zeros(self.bev_w2.shape[1], np.float32), np.zeros(0, np.float32)), None
            w_top[0][capped] = _w_ceiling(self.bev_w2[:, capped])
        col_u, col_v = self._bev_at(cols)
        got = _cpu_rows.capped_candidates(tables, extra, w_top, source, capped, col_u, col_v, self._sens_s2,
                                          self.hi_solve, dose, k)
        if got is not None:
            at, kth = got
            if kth >= 1e-20:  # (with w < 1e15, the key's exp terms are far above float32's subnormals)
                cand = capped[at]  # at least the k with lower >= kth
                if cand.size == k:
                    return cand
                keys = self._capped_keys(cand, cols, dose)
                order = np.argsort(keys, kind="stable")
                if cand.size > k and keys[order[k]] > keys[order[k - 1]]:
                    return cand[order[:k]]
        return capped[_smallest(self._capped_keys(capped, cols, dose), k)]

    def _distance_mm(self, idx: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(len(idx),) float64: the distance (mm) from each watched voxel ``idx`` to the nearest
        of ``cols``: the same sums of squares in the same order as ``cKDTree.query`` (bit for
        bit, tested), without building a tree."""
        if not idx.size:
            return np.zeros(0)
        diff = self.coords[idx][:, None, :] - self.coords[cols][None, :, :]
        return np.sqrt((diff * diff).sum(axis=2).min(axis=1))

    def _under_patches(self, cols: np.ndarray) -> np.ndarray:
        """(n,) bool: the watched voxels under the patches of columns ``cols`` in any beam (each
        beam's voxels are sorted by BEV row, so a patch's rows are one slice of them, then
        filtered exactly). Compiled with numba when it is installed (the same voxels).

        A watch built on a base (:meth:`_from_base`) searches the base's sorted tables (the
        marks mapped to watch positions, the base voxels the watch left out dropped) and
        filters its few extra voxels directly with the same edges (a voxel passes the exact
        filter only if its row lies in the searched range, so the range adds nothing)."""
        split = getattr(self, "_split", None)
        reach = self.reach_cells
        out = None
        if _cpu.HAVE_NUMBA and self._u_sorted and split is not None:
            # The base's u-ordered tables marked at base indices, then copied run by run into
            # watch positions (the same marks as mapping the base's marks below).
            base_at, nb = split[0], split[1]
            runs = self.__dict__.get("_base_runs")
            if runs is None:  # once per watch
                runs = self.__dict__["_base_runs"] = _cpu.remap_runs(base_at)
            out = np.zeros(self.vox.size, bool)
            # The kernel reads the BEV tables at the columns only: the base's own where every
            # column is a base voxel (the same values as _bev_at's), else those given alone.
            base = self._bev_source[0]
            src = self.watch.__dict__["_composition"].source[cols]
            if src.size and src.max() < nb:
                tab_u, tab_v, at = base.bev_u2, base.bev_v2, src
            else:
                (tab_u, tab_v), at = self._bev_at(cols), np.arange(cols.size)
            _cpu.mark_under_patches(tab_u, tab_v, self._order2, self._rows2, self._bu_sorted2, self._bv_sorted2, at,
                                    reach, out, u_sorted=True, runs=runs, whole_rows=self._whole_rows,
                                    row_starts=self._row_starts)
        elif _cpu.HAVE_NUMBA:
            mark = np.zeros(self.vox.size if split is None else split[1], bool)
            _cpu.mark_under_patches(self.bev_u2, self.bev_v2, self._order2, self._rows2, self._bu_sorted2,
                                    self._bv_sorted2, cols, reach, mark, u_sorted=self._u_sorted,
                                    whole_rows=self._whole_rows if self._u_sorted else None,
                                    row_starts=self._row_starts if self._u_sorted else None)
        else:
            mark = np.zeros(self.vox.size if split is None else split[1], bool)
            for bu_all, bv_all, (order, rows_sorted), (bu_sorted, bv_sorted) in zip(self.bev_u, self.bev_v, self.by_v,
                                                                                     self._by_v_uv):
                cu, cv = bu_all[cols], bv_all[cols]
                ok = np.isfinite(cv)
                if not ok.any():
                    continue
                v_lo, v_hi = float(cv[ok].min()) - reach, float(cv[ok].max()) + reach
                a = np.searchsorted(rows_sorted, _row_key(math.floor(v_lo)), side="left")
                b = np.searchsorted(rows_sorted, _row_key(math.floor(v_hi)), side="right")
                bu, bv = bu_sorted[a:b], bv_sorted[a:b]
                mark[order[a:b][(bv >= v_lo) & (bv < v_hi) & (bu >= np.nanmin(cu) - reach) & (bu <= np.nanmax(cu) + reach)]] = True
        if split is None:
            return mark
        base_at, _, eu, ev, e_pos = split
        if out is None:
            out = np.zeros(self.vox.size, bool)
            at = base_at[np.flatnonzero(mark)]
            out[at[at >= 0]] = True
        if e_pos.size and cols.size:
            # All beams at once, with the edges as above: v's in float64, then cast to float32
            # for the comparison (NEP 50: what comparing with a Python float does); u's in float32.
            cu, cv = self._bev_at(cols)
            ok = np.isfinite(cv)
            beams = ok.any(axis=1)
            v_lo = (np.where(ok, cv, np.inf).min(axis=1).astype(np.float64) - reach).astype(np.float32)[:, None]
            v_hi = (np.where(ok, cv, -np.inf).max(axis=1).astype(np.float64) + reach).astype(np.float32)[:, None]
            nan_u = np.isnan(cu)
            u_lo = (np.where(nan_u, np.inf, cu).min(axis=1) - np.float32(reach))[:, None]
            u_hi = (np.where(nan_u, -np.inf, cu).max(axis=1) + np.float32(reach))[:, None]
            hit = (ev >= v_lo) & (ev < v_hi) & (eu >= u_lo) & (eu <= u_hi)
            out[e_pos[hit[beams].any(axis=0)]] = True
        return out

    def _capped_distance2(self, capped: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(beams, len(capped)) float32: each beam's squared BEV distance (fine cells^2) from the
        voxels ``capped`` to the nearest column (+inf where the beam misses the voxel or every
        column), and the voxels' dose per unit fluence ``bev_w2``. All beams at once; compiled
        with numba when it is installed (bit for bit the same)."""
        if _cpu.HAVE_NUMBA and "_bev_source" in self.__dict__ and "bev_u2" not in self.__dict__:
            base, eu, ev, ew = self._bev_source
            return _cpu_rows.capped_distance2_source((base.bev_u2, base.bev_v2, base.bev_w2), (eu, ev, ew),
                                                     self.watch.__dict__["_composition"].source, capped, cols)
        if _cpu.HAVE_NUMBA:
            return _cpu.capped_distance2(self.bev_u2, self.bev_v2, self.bev_w2, capped, cols)
        bu, bv = np.take(self.bev_u2, capped, axis=1), np.take(self.bev_v2, capped, axis=1)
        cu, cv = np.take(self.bev_u2, cols, axis=1), np.take(self.bev_v2, cols, axis=1)
        skip = ~np.isfinite(cv)
        d2 = np.full(bu.shape, np.inf, np.float32)
        for j in range(cols.size):
            dj = (bu - cu[:, j : j + 1]) ** 2 + (bv - cv[:, j : j + 1]) ** 2
            if skip[:, j].any():
                dj[skip[:, j]] = np.inf
            np.minimum(d2, dj, out=d2)
        return np.where(np.isfinite(d2), d2, np.inf), np.take(self.bev_w2, capped, axis=1)

    def solve(self, modifier, rows, cols, signs, dose, hard_weight: float = 1.0):
        """A guarded joint solve (:meth:`_solve`), checked on the whole watch's dose after it:
        when it pushed soft-capped voxels that were not rows above their cap (by more than
        ``cap_retry_margin_gy``, rising by as much in this step), the step is taken back and
        solved once more with the worst ``cap_retry_rows`` of them as rows; if that solve is
        rejected, the first step is applied again. The capped rows are ranked by a predicted
        sensitivity that misses the entrance stripes of per-beam steps (measured: a 57 Gy line
        drag raised a beam's entrance 177 mm away by 4.3 Gy in one step, its voxel ranked
        10 599th of 18 498); the dose read after the step does not miss them."""
        patches, res = self._solve(modifier, rows, cols, signs, dose, hard_weight)
        k = self.opts.cap_retry_rows
        if k <= 0 or not patches or not res.accepted or res.watch_after_gy is None:
            return patches, res
        after, m = res.watch_after_gy, self.opts.cap_retry_margin_gy
        over = self.capped & (after > self.hi_solve + m) & (after - dose > m)
        over[np.asarray(rows, np.int64)] = False
        idx = np.flatnonzero(over)
        if not idx.size:
            return patches, res
        idx = idx[_smallest(-(after[idx] - self.hi_solve[idx]), k)]
        first, n_first = res, len(patches)
        _take_back(modifier, patches, 0, None)
        got, res = self._solve(modifier, np.union1d(rows, idx), cols, signs, dose, hard_weight)
        if not res.accepted:  # the retry found nothing good enough: the first step stands
            # (clipped: on the round-off of the take-back, an amplitude the first step took to
            # zero could otherwise end a float32 ulp below it)
            again = modifier._clip_nonnegative(modifier._combine([(1.0, patches[:n_first])]))
            modifier.engine.apply_patches(again)
            return patches + got + again, first
        return patches + got, res

    def _solve(self, modifier, rows, cols, signs, dose, hard_weight: float = 1.0):
        """A guarded joint solve on these rows; a rejected one is tried again with per-beam
        columns (the beam mix solved too). ``dose``: the watch's dose just read; the result's
        ``watch_after_gy`` is the watch's dose after (one device read per solve).
        ``hard_weight``: the request's own voxels and the pins weigh this many times their
        watch weight (the request touch-up). Returns (patches applied, last StepResult)."""
        w, opts = self.watch, self.opts
        weight = w.weight[rows] if hard_weight == 1.0 else w.weight[rows] * np.where(self.hard[rows], hard_weight, 1.0)
        args = (self.vox[rows], w.lo[rows], self.hi_solve[rows], w.goal[rows], weight, self.vox[cols], list(signs))
        kw = dict(regularisation=opts.regularisation, keep_weight=opts.keep_weight, compensate=opts.max_compensate,
                  accept_hi=w.hi[rows])
        read = functools.partial(_watch_dose, modifier.engine, w)
        res = modifier.solve_step(*args, watch=(read, dose, rows), **kw)
        patches = list(res.patches)
        if not res.accepted and not modifier.per_beam:
            # A rejected step leaves the plan where it was (its dose is the one it started from).
            proposed = res.proposed
            res = modifier.solve_step(*args, per_beam=True, watch=(read, res.watch_after_gy, rows), **kw)
            patches.extend(res.patches)
            if proposed and not res.proposed:
                res = replace(res, proposed=True)
        return patches, res


def _bev_lookup(h, vox: np.ndarray) -> tuple:
    """Voxels ``vox``'s BEV position in a beam's fine level (host copy ``h``): ``(u, v, w,
    missing)``, u / v in fine fluence cells (NaN / +inf where the beam misses the voxel), w its
    dose per unit fluence there (0 where missed), float32; the NumPy twin of
    :func:`kernels._cpu.gather_bev`."""
    pos = h.position[vox]
    out = pos < 0
    return (np.where(out, np.nan, h.u_cells[pos]), np.where(out, np.inf, h.v_cells[pos]),
            np.where(out, 0.0, h.weights[0][pos]), out)


def _w_ceiling(w2: np.ndarray) -> np.ndarray:
    """(n,) float32: each voxel's largest dose per unit fluence over the beams (the column
    maximum of ``w2``, (beams, n) float32), the ceiling of its capped-ranking key per Gy of room
    (``_Rows._top_capped``); NaN where some beam's is NaN, infinite or not below 1e15 in
    magnitude (the ranking's bounds refuse such a voxel: :func:`kernels._cpu_rows.capped_candidates`
    refuses at once)."""
    top = w2.max(axis=0, initial=-np.inf)
    limit = np.float32(1e15)
    top[~((top < limit) & (w2.min(axis=0, initial=np.inf) > -limit))] = np.nan
    return top


def _w_top(base: "_BaseRows") -> np.ndarray:
    """:func:`_w_ceiling` of a base's voxels, kept on the base (geometry only)."""
    got = base.__dict__.get("_w_top")
    if got is None:
        got = base.__dict__["_w_top"] = _w_ceiling(base.bev_w2)
    return got


class _BaseRows:
    """A base's row tables (:class:`_Rows`'s grid positions and per-beam tables of
    ``base.voxels``, built as for a watch)."""

    def __init__(self, eng, base: WatchBase) -> None:
        self.vox = base.voxels
        self.shape = tuple(int(n) for n in eng.grid.shape_zyx)
        self.spacing = np.asarray(eng.grid.spacing_mm_zyx, float)
        _Rows._build(self, eng)
        # Each beam's rows ordered by u too (once per base, 10^5 voxels): the compiled search
        # under the patches then reads only the box's voxels of each row, not the whole rows
        # (measured: a third of the watch scanned per beam for a tenth marked).
        if _cpu.HAVE_NUMBA:
            self._whole_rows = np.array([_cpu.sort_rows_by_u(self._rows2[b], self._order2[b], self._bu_sorted2[b],
                                                             self._bv_sorted2[b]) for b in range(self._rows2.shape[0])])
            self._row_starts = _cpu.row_starts(self._rows2)  # (the rows themselves did not move)
            self._u_sorted = True

    _fill_beam = _Rows._fill_beam
    _u_sorted = False
    _whole_rows = None
    _row_starts = None


def modify_joint(modifier, watch: Watch, voxels, target_gy, *, max_passes: int = 3,
                 options: RecoveryOptions | None = None):
    """Modification of a line, surface or spot request: guarded joint solves with the request's
    voxels as columns (sign from the wanted change) and the watch's rows around them (the
    request's feature, its guards, the at-risk voxels under the patches), up to ``max_passes``
    passes while some column voxel is still outside its band."""
    from ._modify import ModificationResult

    opts = options or RecoveryOptions()
    eng = modifier.engine
    rs = _rows_for(modifier, watch, opts)
    cols_flat = np.asarray(voxels, np.int64)
    goal_c = np.asarray(target_gy, float)
    ci, watched = watch.locate(cols_flat)
    if not watch.voxels.size or not watched.all():
        raise ValueError("modify_joint: every request voxel must be in the watch list (Watch.voxels sorted, unique)")
    before = backend.asnumpy(eng.dose_at_voxels(cols_flat)).astype(np.float64)
    applied: list = []
    passes = 0
    proposed = False
    dose = _watch_dose(eng, watch)
    # The feature's and the guards' voxels are rows too (a sample), wherever they are (looked up
    # per group, not by comparing a string per watched voxel).
    kinds = np.asarray(watch.kinds, object)
    extra = [np.flatnonzero((kinds == k)[watch.group]) if kinds.size else np.zeros(0, np.int64)
             for k in ("request", "guard")]
    extra = [e[np.linspace(0, e.size - 1, min(e.size, 64)).round().astype(int)] if e.size else e for e in extra]
    for passes in range(1, max_passes + 1):
        viol = watch.violation(dose)
        off = viol[ci] > 0
        if not off.any():
            passes -= 1
            break
        rows = rs.select(ci[off], dose, viol)
        rows = np.unique(np.concatenate([rows, *extra]))
        got, res = rs.solve(modifier, rows, ci[off], np.sign(goal_c[off] - dose[ci[off]]), dose)
        applied.extend(got)
        proposed = proposed or res.proposed or bool(got)
        dose = res.watch_after_gy
        if not res.accepted:
            break
    after = backend.asnumpy(eng.dose_at_voxels(cols_flat)).astype(np.float64)
    return ModificationResult(cols_flat, goal_c, before, after, applied, max(passes, 1), proposed=proposed or bool(applied))


def recover(modifier, watch: Watch, *, steps: int = 25, options: RecoveryOptions | None = None,
            cancel=None, progress=None, focus: np.ndarray | None = None) -> RecoveryResult:
    """Run up to ``steps`` recovery steps on ``modifier.engine`` (see the module docstring).
    ``focus``: (n,) bool over the watch, only these voxels are chosen as a step's voxel and
    cluster (the rest of the watch are rows only; the side-effect repair)."""
    opts = options or RecoveryOptions()
    eng = modifier.engine
    if focus is not None:
        focus = np.asarray(focus)
        if focus.dtype != bool or focus.shape != watch.voxels.shape:
            raise ValueError(f"recover: focus must be a bool array over the watch's {watch.voxels.size} voxels, "
                             f"got {focus.dtype} {focus.shape}")
    timings = {"select_location": 0.0, "modify_step": 0.0, "return_to_best": 0.0}
    rs = _rows_for(modifier, watch, opts)
    vox, coords, hard = rs.vox, rs.coords, rs.hard
    chosen, accepted, patches, objective = [], [], [], []
    best_step, best_n_patches = 0, 0
    best_key = (np.inf, np.inf)
    low_j = (np.inf, 0, 0)  # the lowest J seen: (J, step, patches applied before it)
    hard_eps = max(1e-3 * float(np.nanmax(np.abs(np.where(np.isfinite(watch.goal), watch.goal, 0)))), 1e-6)
    n_done = 0

    hard_idx = np.flatnonzero(hard)

    def state_key(dose_gy, v=None, wv2=None):
        """(J, rank, violation) of a state: the best state has the request's own voxels and
        the pins in band first (their largest violation, ignoring round-off), then the lowest
        J. A state that keeps what the planner asked for beats one with a lower sum that gives
        it up. ``v`` and ``wv2``: the violation and ``weight * v**2`` when already computed."""
        if v is None:
            v = watch.violation(dose_gy)
            wv2 = watch.weight * v**2
        j = float(np.sum(wv2))
        return j, (round(float(v[hard_idx].max()) / hard_eps) if hard_idx.size else 0, j), v

    # The voxels not to be chosen: the rejected ones (tabu) and those out of focus.
    blocked = np.zeros(vox.size, bool) if focus is None else ~focus
    # The watch's dose: read once here, then carried by each solve (one device read per step).
    dose = _watch_dose(eng, watch)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        # The violation, the objective's terms, the score, its largest and the voxels off each way.
        viol, wv2, score, r, big, off_cold, off_hot = _cpu_rows.scan_watch(dose, watch.lo, watch.hi, watch.weight,
                                                                           blocked)
        obj, key, viol = state_key(dose, viol, wv2)
        objective.append(obj)
        if key < best_key:
            best_key, best_step, best_n_patches = key, step, len(patches)
        if obj < low_j[0]:
            low_j = (obj, step, len(patches))
        if step == steps or (cancel is not None and cancel()) or not big:
            timings["select_location"] += (time.perf_counter() - t0) * 1000
            break
        cold = dose[r] < watch.lo[r]
        direction = 1.0 if cold else -1.0
        # Columns: the cluster of voxels off in the same direction around r (the distance is
        # only needed, and computed, for the voxels off in that direction).
        idx = off_cold if cold else off_hot
        idx = idx[np.linalg.norm(coords[idx] - coords[r], axis=1) <= opts.cluster_radius_mm]
        order = idx[np.argsort(-score[idx], kind="stable")]
        cluster = _pick_spread(order, coords, opts.cluster_spacing_mm, opts.cluster_size)
        rows = rs.select(np.asarray(cluster, np.int64), dose, viol)
        timings["select_location"] += (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        got, res = rs.solve(modifier, rows, cluster, [direction] * len(cluster), dose)
        timings["modify_step"] += (time.perf_counter() - t0) * 1000
        patches.extend(got)
        dose = res.watch_after_gy
        chosen.append(int(vox[r]))
        accepted.append(bool(res.accepted))
        if not res.accepted:
            blocked[r] = True
        n_done = step + 1
        if progress:
            progress(n_done, steps, "recovery")
    if hard.any() and opts.touchup_steps > 0 and low_j[1] != best_step and low_j[0] < best_key[1] \
            and not (cancel is not None and cancel()):
        # Request touch-up: the lowest-J state missed the request's voxels or a pin (the best
        # state kept them but is worse elsewhere): from there, solve for them alone.
        t0 = time.perf_counter()
        if len(patches) > low_j[2]:
            dose = _take_back(modifier, patches, low_j[2], watch)
        for _ in range(opts.touchup_steps):
            viol = watch.violation(dose)
            off = np.flatnonzero(hard & (viol > hard_eps))
            if not off.size:
                break
            r = int(off[np.argmax(viol[off])])
            cold = dose[r] < watch.lo[r]
            same = off[(dose[off] < watch.lo[off]) if cold else (dose[off] > watch.hi[off])]
            cluster = _pick_spread(same[np.argsort(-viol[same], kind="stable")], coords, opts.cluster_spacing_mm,
                                   opts.cluster_size)
            rows = rs.select(np.asarray(cluster, np.int64), dose, viol)
            got, res = rs.solve(modifier, rows, cluster, [1.0 if cold else -1.0] * len(cluster), dose,
                                hard_weight=opts.touchup_weight)
            patches.extend(got)
            dose = res.watch_after_gy
            chosen.append(int(vox[r]))
            accepted.append(bool(res.accepted))
            n_done += 1
            if not res.accepted:
                break
        obj, key, viol = state_key(dose)
        objective.append(obj)
        if key < best_key:
            best_key, best_step, best_n_patches = key, len(objective) - 1, len(patches)
        timings["request_touchup"] = (time.perf_counter() - t0) * 1000
    if best_step < len(objective) - 1 and len(patches) > best_n_patches:
        # Back to the best state seen: take the tail of patches back in one patch per beam.
        t0 = time.perf_counter()
        dose = _take_back(modifier, patches, best_n_patches, watch)
        timings["return_to_best"] = (time.perf_counter() - t0) * 1000
    backend.synchronize()
    remaining = int(np.count_nonzero(watch.violation(dose) > 1e-6))
    return RecoveryResult(n_done, np.asarray(chosen, np.int64), np.asarray(accepted, bool), remaining, best_step,
                          np.asarray(objective), dose, patches, timings)

