"""Inverse planning on the engine: influence matrix, fluence optimisation with the cutoff's
tail corrected, the final dose from the engine itself.

The influence matrix is the engine's own model with a lateral cutoff (sparse); what the
cutoff drops is put back as a dose offset ``engine dose(w) - A w`` taken at the weights of
the previous round, so after a few rounds (warm-started) the optimiser works on the dose the
engine computes, and the plan's reported dose is the engine's dose (issue 11, "One dose
model everywhere").

Rows: a structure with more voxels than ``RowSampling.max_rows`` (the body, a ring) gets
weighted sampled rows (:func:`ids_engine.optimise.sample_rows`: every voxel near the
targets, one per block farther out), so that a goal on the whole body of a clinical case costs
about what goals on the target and organs do; the plan's goals are then evaluated on the
engine's dose at every voxel of their structures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ids_engine import backend
from ids_engine.dose import InfluenceMatrix, TwoLevelMatrix, influence_matrix
from ids_engine.optimise import (FluenceResult, Goal, ImportanceTuning, RowSampling, SampledRows, UnmetConstraint,
                                  evaluate_goals, optimise_fluence, sample_rows)
from ids_engine.optimise import tune_importance as _tune

__all__ = ["InversePlan", "goal_checks", "optimise_plan", "target_beamlets"]


@dataclass(frozen=True, eq=False)
class InversePlan:
    """An optimised plan.

    fluences : per beam, (nv, nu) float32 host fluence maps (MU per amplitude), set on the engine.
    result : the last optimiser round (goals evaluated on ``A w + offset``). With sampled
        rows its ``goals``, ``objective`` and ``unmet_constraints`` are those of the engine's
        dose at every voxel of the goals' structures (its ``dose_gy`` stays the rows' dose);
        ``sampled_goals`` keeps the optimiser's own evaluation on the weighted rows.
    influence : the matrix the optimiser worked on.
    tail_rounds : optimiser rounds after the first, each with a refreshed tail offset.
    tail_error_pct : max |engine dose - (A w + offset)| at the rows, % of the maximum dose,
        at the final weights with the last offset (how far the optimiser's dose was from the
        engine's).
    timings_s : influence matrix, optimisation, tail offsets (and importance tuning).
    iterations : L-BFGS-B iterations over all rounds (tuning's not included).
    tuning : the importance-factor tuning (:func:`~ids_engine.optimise.tune_importance`) when
        asked for; ``result.goals`` then carry the tuned importances.
    rows : how the rows were chosen (:class:`~ids_engine.optimise.SampledRows`; ``rows.summary()``
        for plan.json: mode exact or sampled, the rule, rows per structure).
    sampled_goals : with sampled rows, the goals evaluated on the rows (weighted), as the
        optimiser saw them; None with exact rows.
    max_dose_gy : per sampled structure, ``{"rows": max over its rows, "all_voxels": max over
        every voxel}`` of the engine's final dose (how far a maximum on the sample is from the
        true one).
    """

    fluences: list
    result: FluenceResult
    influence: InfluenceMatrix
    tail_rounds: int
    tail_error_pct: float
    timings_s: dict
    iterations: int = 0
    tuning: ImportanceTuning | None = None
    rows: SampledRows | None = None
    sampled_goals: tuple | None = None
    max_dose_gy: dict | None = None

    def rows_summary(self) -> dict:
        """The rows as plan.json reports them (mode, rule, rows per structure, the sampled
        structures' maximum dose on the rows and over every voxel)."""
        if self.rows is None:
            return {"mode": "exact", "rows": int(self.influence.shape[0])}
        out = self.rows.summary()
        for name, m in (self.max_dose_gy or {}).items():
            out["structures"][name]["max_dose_gy"] = m
        return out


_CHECK_TEXT = {
    "min_dvh": "{s} D{v:g} >= {d:g} Gy",
    "max_dvh": "{s} V{d:g}Gy <= {v:g} %",
    "min_dose": "{s} Dmin >= {d:g} Gy",
    "max_dose": "{s} Dmax <= {d:g} Gy",
    "min_mean_dose": "{s} Dmean >= {d:g} Gy",
    "max_mean_dose": "{s} Dmean <= {d:g} Gy",
}


def goal_checks(goals) -> tuple:
    """The optimisation goals that are DVH points, as :class:`ids_engine.evaluation.Goal`
    checks (for reports and the viewer's metrics); EUD and uniform-dose objectives have no
    DVH point and are left out."""
    from ids_engine.evaluation import parse_goal

    out = []
    for g in goals:
        fmt = _CHECK_TEXT.get(getattr(g, "kind", ""))
        if fmt is not None:
            out.append(parse_goal(fmt.format(s=g.structure, d=g.dose_gy, v=getattr(g, "volume_pct", 0.0))))
    return tuple(out)


def structure_rows(influence: InfluenceMatrix, patient, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Row indices of each named structure's voxels in ``influence`` (CT-grid rows)."""
    rows = {}
    ct = np.asarray(influence.ct_voxels)
    order = np.argsort(ct, kind="stable")
    for name in names:
        try:
            mask = patient.structure(name).mask
        except (KeyError, ValueError) as exc:
            raise ValueError(f"the protocol names structure {name!r}, which the case does not have "
                             f"(structures: {', '.join(patient.structure_names)})") from exc
        flat = np.flatnonzero(mask.ravel())
        pos = np.searchsorted(ct[order], flat)
        pos = np.minimum(pos, ct.size - 1)
        hit = ct[order][pos] == flat
        r = np.sort(order[pos[hit]])
        if r.size == 0:
            raise ValueError(f"structure {name!r} has no voxel among the influence matrix's rows (outside the body?)")
        rows[name] = r.astype(np.int64)
    return rows


def target_beamlets(engine, mask_zyx: np.ndarray, beamlet_cells: int, margin_mm: float = 10.0) -> list[np.ndarray]:
    """Per beam, the beamlets (bool (ceil(nv / bc), ceil(nu / bc))) whose block lies within
    ``margin_mm`` (isocentre plane) of the beam's-eye-view projection of ``mask_zyx``'s voxels:
    the beamlets that can reach the targets (the rest only add dose elsewhere)."""
    flat = np.flatnonzero(np.asarray(mask_zyx, bool).ravel() & engine.body_mask.ravel())
    out = []
    for geo in engine.geometry:
        h = geo.fine.host
        pos = h.position[flat]
        pos = pos[pos >= 0]
        nv, nu = geo.fluence_grid.shape_vu
        bc = int(beamlet_cells)
        nbr, nbc = -(-nv // bc), -(-nu // bc)
        m = np.zeros((nbr, nbc), bool)
        r = np.clip(np.floor(h.v_cells[pos]).astype(np.int64) // bc, 0, nbr - 1)
        c = np.clip(np.floor(h.u_cells[pos]).astype(np.int64) // bc, 0, nbc - 1)
        m[r, c] = True
        grow = int(np.ceil(margin_mm / (geo.fluence_grid.pitch_mm * bc)))
        if grow > 0:
            from scipy import ndimage

            m = ndimage.binary_dilation(m, iterations=grow)
        out.append(m)
    return out


def optimise_plan(engine, goals: Sequence[Goal], *, cutoff_mm: float | None = None, beamlet_cells: int | None = None,
                  beamlet_margin_mm: float | None = 10.0, tail_rounds: int = 2, initial_fluences=None,
                  max_iterations: int = 400, tune_importance: bool = False, score_goals: Sequence[Goal] | None = None,
                  tuning_evaluations: int = 30, tuning_margin_gy: float = 0.2,
                  row_sampling: RowSampling | None = RowSampling(), progress=None, cancel=None) -> InversePlan:
    """Optimise ``engine``'s fluence for ``goals`` and leave the result set on the engine.

    Parameters
    ----------
    engine : a :class:`~ids_engine.dose.DoseEngine`; its fluence is replaced by the result.
    goals : objectives and constraints (:mod:`ids_engine.optimise`) on the patient's structures.
    cutoff_mm, beamlet_cells : the influence matrix (see :func:`~ids_engine.dose.influence_matrix`):
        None (default) is the engine's exact two-level matrix (no tail, one round, the
        fastest: matRad's TG119.mat 2.2 s against 12.3 s with a 50 mm cutoff); a cutoff gives
        a sparse matrix whose dropped tail is put back over ``tail_rounds``.
    beamlet_margin_mm : only beamlets within this margin of the targets' projection in each
        beam are optimised (:func:`target_beamlets`); None optimises every beamlet of the
        fluence grids (which cover the whole body).
    tail_rounds : rounds after the first, each warm-started with the cutoff's tail offset
        taken at the previous round's weights (none without a cutoff: there is no tail).
    initial_fluences : a warm start (per beam fluence maps, e.g. an approved plan's); the
        beamlet weights start at each beamlet block's mean fluence.
    max_iterations : L-BFGS-B iterations of the first round; each later round (warm-started,
        absorbing a refreshed tail offset) and every round after importance tuning gets a
        quarter of it, at least 50 (measured on matRad's TG119.mat, 5 mm beamlets: 600
        iterations instead of 817, the same D95, D10 and core D10 to 0.01 Gy).
    tune_importance : first tune the objectives' importance factors with Powell's method
        (Xing et al. 1999; :func:`~ids_engine.optimise.tune_importance`) on the matrix
        without the tail offset, scoring ``score_goals`` (default: ``goals``); the rounds
        then start from the tuned plan with the tuned importances and its tail offset.
    score_goals : the goals the tuning scores (sum of squared shortfalls in Gy).
    tuning_evaluations : fluence optimisations the tuning may spend.
    tuning_margin_gy : score goals count as met with this much dose to spare (the tail
        rounds move the dose a little).
    row_sampling : rows of structures larger than ``row_sampling.max_rows`` voxels are
        sampled and weighted (:class:`~ids_engine.optimise.RowSampling`,
        :func:`~ids_engine.optimise.sample_rows`; default 150 000 rows, every voxel within
        10 mm of a target kept); None keeps every voxel (exact rows). Structures at most that
        large are never sampled: the default changes nothing for goals on targets and organs
        of up to 150 000 voxels (a liver or the lungs on a fine clinical grid can be larger and
        are then sampled away from the targets). Measured on the clinical horseshoe with a body maximum and mean
        (bench/bench_optimise_rows.py, 2 EPYC cores): 164 k rows instead of 1.0 M, 45 s and
        3.1 GB peak RSS against 80 s and 6.1 GB with exact rows (85 s, 9.8 GB before sampled
        rows existed), equal quality on the engine's full dose (body maximum 64.00 against
        64.02 Gy); the dense scatter part of the
        matrix (the body's coarse voxels x beamlets, 1.07 GB) is what remains.
    progress, cancel : ``progress(done, total, label)``; ``cancel()`` stops between iterations.
    """
    goals = tuple(goals)
    if row_sampling is not None and not isinstance(row_sampling, RowSampling):
        raise ValueError(f"optimise_plan: row_sampling must be a RowSampling or None (exact rows), "
                         f"got {row_sampling!r}")
    if cutoff_mm is None:
        tail_rounds = 0  # the two-level matrix is the engine's dose: no tail to put back
    t = {}
    t0 = time.perf_counter()
    # Rows: the voxels of the structures the goals are about (a goal on the body brings them all).
    score_goals = None if score_goals is None else tuple(score_goals)
    names = list(dict.fromkeys(g.structure for g in goals + (score_goals or ())))
    mask = np.zeros(engine.grid.shape_zyx, bool)
    for name in names:
        try:
            m = engine.patient.structure(name).mask
        except KeyError as exc:
            raise ValueError(f"the goals name structure {name!r}, which the case does not have "
                             f"(structures: {', '.join(engine.patient.structure_names)})") from exc
        if not np.any(m & engine.body_mask):  # before any matrix is built, sampled rows or not
            raise ValueError(f"structure {name!r} has no voxel among the influence matrix's rows (outside the body?)")
        mask |= m
    mask &= engine.body_mask
    targets = np.zeros(engine.grid.shape_zyx, bool)
    for st in engine.patient.targets:
        targets |= st.mask
    sampled = None
    if row_sampling is not None:
        body = engine.body_mask
        sampled = sample_rows({n: engine.patient.structure(n).mask & body for n in names}, targets & body,
                              engine.grid.spacing_mm_zyx, row_sampling)
        if sampled.sampled:
            mask = sampled.mask
        else:
            sampled = None  # no structure above max_rows: exact rows, as without sampling
    bc = int(beamlet_cells or engine.geometry[0].coarse_fluence_factor)
    masks = None
    if beamlet_margin_mm is not None and engine.patient.targets:
        masks = target_beamlets(engine, targets, bc, beamlet_margin_mm)
    A = influence_matrix(engine, voxel_mask=mask, cutoff_mm=cutoff_mm, beamlet_cells=bc, beamlet_masks=masks,
                         progress=progress)
    t["influence_matrix"] = time.perf_counter() - t0
    if sampled is None:
        rows = structure_rows(A, engine.patient, names)
        vweights = None
    else:
        rows = {n: _row_index(A.voxels, v) for n, v in sampled.voxels.items()}
        vweights = sampled.voxel_weights()
    w = None if initial_fluences is None else _weights_from_fluences(A, initial_fluences)
    offset = None
    t["optimise"] = t["tail_offset"] = 0.0
    res = None
    iterations = 0
    tuning = None
    if tune_importance:
        t0 = time.perf_counter()
        extra = {} if vweights is None else {"voxel_weights": vweights}
        tuning = _tune(A.matrix, goals, rows, score_goals=score_goals, initial_weights=w,
                       max_evaluations=tuning_evaluations, margin_gy=tuning_margin_gy,
                       max_iterations=max_iterations, progress=progress,
                       cancel=cancel, **extra)
        t["importance_tuning"] = time.perf_counter() - t0
        goals = tuning.goals
        w = tuning.result.beamlet_weights
        # The tuned plan's tail offset: every round below then works on the engine's dose.
        if cutoff_mm is not None:
            t0 = time.perf_counter()
            offset = A.tail_offset(engine, w)
            t["tail_offset"] += time.perf_counter() - t0
    for r in range(tail_rounds + 1):
        t0 = time.perf_counter()
        # Later rounds start from the previous round's plan and only absorb the refreshed
        # tail offset: a quarter of the budget.
        budget = max_iterations if r == 0 and not tune_importance else max(50, max_iterations // 4)
        res = optimise_fluence(A.matrix, goals, rows, initial_weights=w, dose_offset_gy=offset,
                               voxel_weights=_for_goals(vweights, goals),
                               max_iterations=budget, progress=progress, cancel=cancel)
        t["optimise"] += time.perf_counter() - t0
        w = res.beamlet_weights
        iterations += res.iterations
        if res.cancelled:
            break
        if r == tail_rounds:
            break
        t0 = time.perf_counter()
        offset = A.tail_offset(engine, w)
        t["tail_offset"] += time.perf_counter() - t0
    # Hot-spot rounds: far voxels the sample left hot become rows; re-optimise, warm-started.
    while sampled is not None and sampled.hot_rounds < row_sampling.hot_rounds and not res.cancelled:
        t0 = time.perf_counter()
        hot = _hot_voxels(engine, A, w, goals, sampled)
        if not hot:
            break
        new_sampled = sampled.with_hot(hot)
        added = np.flatnonzero(new_sampled.mask.ravel() & ~sampled.mask.ravel())
        sampled = new_sampled
        grown = _with_rows(engine, A, added, bc, masks)
        if grown is None:
            del A, rows  # free the old matrix before building the new one
            grown = influence_matrix(engine, voxel_mask=sampled.mask, cutoff_mm=cutoff_mm, beamlet_cells=bc,
                                     beamlet_masks=masks, progress=progress)
        A = grown
        rows = {n: _row_index(A.voxels, v) for n, v in sampled.voxels.items()}
        vweights = sampled.voxel_weights()
        offset = None if cutoff_mm is None else A.tail_offset(engine, w)
        t["hot_rows"] = t.get("hot_rows", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        res = optimise_fluence(A.matrix, goals, rows, initial_weights=w, dose_offset_gy=offset,
                               voxel_weights=_for_goals(vweights, goals),
                               max_iterations=max(50, max_iterations // 4), progress=progress, cancel=cancel)
        t["optimise"] += time.perf_counter() - t0
        w = res.beamlet_weights
        iterations += res.iterations
    # How far the optimiser's last dose model was from the engine at the final weights.
    engine_rows = backend.asnumpy(A.engine_dose(engine, w)).astype(np.float64)
    model = backend.asnumpy(A.dose(engine.xp.asarray(np.asarray(w, np.float32)),
                                   offset)).astype(np.float64)
    peak = max(float(np.abs(engine_rows).max()), 1e-12)
    fluences = A.fluence_maps(w)
    engine.set_fluences(fluences)
    sampled_goals = max_dose = None
    if sampled is not None:
        t0 = time.perf_counter()
        sampled_goals = res.goals
        res, max_dose = _full_evaluation(engine, res, sampled)
        t["full_evaluation"] = time.perf_counter() - t0
    return InversePlan(fluences, res, A, r, float(100.0 * np.abs(engine_rows - model).max() / peak), t, iterations,
                       tuning, sampled, sampled_goals, max_dose)


def _row_index(voxels: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Positions in ``voxels`` (the matrix's rows, flat indices, any order) of ``flat``."""
    order = np.argsort(voxels, kind="stable")
    return order[np.searchsorted(voxels[order], flat)].astype(np.int64)


def _with_rows(engine, A: InfluenceMatrix, added: np.ndarray, bc: int, masks) -> InfluenceMatrix | None:
    """``A`` with rows for the CT voxels ``added`` appended, without rebuilding ``A``: the new
    rows' narrow part stacked under ``A``'s, their trilinear upsampling onto ``A``'s coarse
    voxels (the scatter part ``C`` is shared, not copied). Host two-level matrices only, and
    only when ``A``'s coarse voxels cover the new rows' (they do for rows among sampled ones);
    otherwise None (the caller rebuilds)."""
    import scipy.sparse as sp

    M = A.matrix
    if not isinstance(M, TwoLevelMatrix) or M.xp is not np or A.grid != engine.grid or added.size == 0:
        return None
    mask = np.zeros(engine.grid.size, bool)
    mask[added] = True
    B = influence_matrix(engine, voxel_mask=mask.reshape(engine.grid.shape_zyx), cutoff_mm=None, beamlet_cells=bc,
                         beamlet_masks=masks)
    if not np.array_equal(A.beamlets, B.beamlets):
        return None
    # The coarse voxels each matrix's C holds, as influence_matrix chose them.
    ca = np.unique(engine._coarse_neighbours(np.maximum(A.ct_voxels, 0))[0])
    cb = np.unique(engine._coarse_neighbours(np.maximum(B.ct_voxels, 0))[0])
    if ca.size != M.coarse.shape[0] or cb.size != B.matrix.coarse.shape[0]:
        return None
    up_b = B.matrix.upsample.tocoo()
    pos = np.searchsorted(ca, cb[up_b.col])
    pos_c = np.minimum(pos, ca.size - 1)
    if np.any(ca[pos_c] != cb[up_b.col]):
        return None
    up_b = sp.csr_matrix((up_b.data, (up_b.row, pos_c)), shape=(B.shape[0], ca.size))
    fine = sp.vstack([M.fine, B.matrix.fine], format="csr")
    up = sp.vstack([M.upsample, up_b], format="csr")
    mat = TwoLevelMatrix(fine, fine.T.tocsr(), up, up.T.tocsr(), M.coarse)
    return replace(A, matrix=mat, voxels=np.concatenate([A.voxels, B.voxels]),
                   ct_voxels=np.concatenate([A.ct_voxels, B.ct_voxels]))


def _hot_voxels(engine, A: InfluenceMatrix, w, goals, sampled: SampledRows) -> dict:
    """Per sampled structure with a maximum-dose goal, its unsampled voxels whose engine dose
    at the weights ``w`` is within ``hot_margin_gy`` of the lowest such goal's dose or above,
    or of the structure's maximum on its rows when that is higher (the goal not met) (the
    hottest first, at most a quarter of ``max_rows`` per structure)."""
    opts = sampled.options
    levels: dict[str, float] = {}
    for g in goals:
        if g.kind == "max_dose" and g.structure in sampled.far:
            levels[g.structure] = min(levels.get(g.structure, np.inf), float(g.dose_gy))
    if not levels:
        return {}
    snap = engine.snapshot()
    out = {}
    try:
        engine.set_fluences(A.fluence_maps(w))
        for name, level in levels.items():
            u = sampled.unsampled(name)
            if u.size == 0:
                continue
            d = backend.asnumpy(engine.dose_at_voxels(u)).astype(np.float64)
            # The peaks the sample misses: above the level, or above what the rows already show
            # when the level is not met (an unreachable soft maximum would make every beam path
            # "hot" and add rows that change nothing).
            on_rows = float(np.max(backend.asnumpy(engine.dose_at_voxels(sampled.voxels[name]))))
            hot = np.flatnonzero(d > max(level, on_rows) - opts.hot_margin_gy)
            cap = max(1, opts.max_rows // 4)
            if hot.size > cap:
                hot = hot[np.argsort(-d[hot], kind="stable")[:cap]]
            if hot.size:
                out[name] = u[hot]
    finally:
        engine.restore(snap)
    return out


def _for_goals(vweights: dict | None, goals) -> dict | None:
    """The voxel weights of the structures ``goals`` are about (a structure only the score
    goals name is weighted for the scoring, not for the optimiser, which refuses unknown names)."""
    if vweights is None:
        return None
    names = {g.structure for g in goals}
    return {k: v for k, v in vweights.items() if k in names}


def _full_evaluation(engine, res: FluenceResult, sampled: SampledRows) -> tuple[FluenceResult, dict]:
    """``res`` with its goals evaluated on the engine's dose (set on ``engine``) at every voxel
    of their structures, and each sampled structure's maximum on its rows and over all voxels."""
    body = engine.body_mask
    voxels = {n: np.flatnonzero((engine.patient.structure(n).mask & body).ravel()) for n in sampled.voxels}
    all_vox = np.unique(np.concatenate(list(voxels.values())))
    dose = backend.asnumpy(engine.dose_at_voxels(all_vox)).astype(np.float64)
    local = {n: np.searchsorted(all_vox, v) for n, v in voxels.items()}
    goals = tuple(g.goal for g in res.goals)
    tol = 0.01  # optimise_fluence's default tolerance, which optimise_plan uses
    results = evaluate_goals(dose, goals, local, tolerance_gy=tol)
    unmet = tuple(UnmetConstraint(r.goal.label, r.goal, r.achieved, r.limit, r.shortfall, r.unit)
                  for r in results if r.goal.constraint and not r.met)
    objective = float(sum(r.value for r in results if not r.goal.constraint))
    max_dose = {}
    for n, info in sampled.structures.items():
        if info.sampled:
            on_rows = float(np.max(dose[np.searchsorted(all_vox, sampled.voxels[n])]))
            max_dose[n] = {"rows": round(on_rows, 4), "all_voxels": round(float(np.max(dose[local[n]])), 4)}
    return replace(res, goals=results, objective=objective, unmet_constraints=unmet), max_dose


def _weights_from_fluences(A: InfluenceMatrix, fluences) -> np.ndarray:
    bc = A.beamlet_cells
    maps = [np.asarray(backend.asnumpy(f), np.float32) for f in fluences]
    return np.array([float(maps[b][r0 : r0 + bc, c0 : c0 + bc].mean()) for b, r0, c0 in A.beamlets])
