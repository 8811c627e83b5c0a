"""Inverse planning on the engine: influence matrix, fluence optimisation with the cutoff's
tail corrected, the final dose from the engine itself.

The influence matrix is the engine's own model with a lateral cutoff (sparse); what the
cutoff drops is put back as a dose offset ``engine dose(w) - A w`` taken at the weights of
the previous round, so after a few rounds (warm-started) the optimiser works on the dose the
engine computes, and the plan's reported dose is the engine's dose (issue 11, "One dose
model everywhere").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ids_engine import backend
from ids_engine.dose import InfluenceMatrix, influence_matrix
from ids_engine.optimise import FluenceResult, Goal, ImportanceTuning, optimise_fluence
from ids_engine.optimise import tune_importance as _tune

__all__ = ["InversePlan", "goal_checks", "optimise_plan", "target_beamlets"]


@dataclass(frozen=True, eq=False)
class InversePlan:
    """An optimised plan.

    fluences : per beam, (nv, nu) float32 host fluence maps (MU per amplitude), set on the engine.
    result : the last optimiser round (goals evaluated on ``A w + offset``).
    influence : the matrix the optimiser worked on.
    tail_rounds : optimiser rounds after the first, each with a refreshed tail offset.
    tail_error_pct : max |engine dose - (A w + offset)| at the rows, % of the maximum dose,
        at the final weights with the last offset (how far the optimiser's dose was from the
        engine's).
    timings_s : influence matrix, optimisation, tail offsets (and importance tuning).
    iterations : L-BFGS-B iterations over all rounds (tuning's not included).
    tuning : the importance-factor tuning (:func:`~ids_engine.optimise.tune_importance`) when
        asked for; ``result.goals`` then carry the tuned importances.
    """

    fluences: list
    result: FluenceResult
    influence: InfluenceMatrix
    tail_rounds: int
    tail_error_pct: float
    timings_s: dict
    iterations: int = 0
    tuning: ImportanceTuning | None = None


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
                  tuning_evaluations: int = 30, tuning_margin_gy: float = 0.2, progress=None,
                  cancel=None) -> InversePlan:
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
    progress, cancel : ``progress(done, total, label)``; ``cancel()`` stops between iterations.
    """
    goals = tuple(goals)
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
            mask |= engine.patient.structure(name).mask
        except KeyError as exc:
            raise ValueError(f"the goals name structure {name!r}, which the case does not have "
                             f"(structures: {', '.join(engine.patient.structure_names)})") from exc
    mask &= engine.body_mask
    bc = int(beamlet_cells or engine.geometry[0].coarse_fluence_factor)
    masks = None
    if beamlet_margin_mm is not None and engine.patient.targets:
        targets = np.zeros(engine.grid.shape_zyx, bool)
        for st in engine.patient.targets:
            targets |= st.mask
        masks = target_beamlets(engine, targets, bc, beamlet_margin_mm)
    A = influence_matrix(engine, voxel_mask=mask, cutoff_mm=cutoff_mm, beamlet_cells=bc, beamlet_masks=masks,
                         progress=progress)
    t["influence_matrix"] = time.perf_counter() - t0
    rows = structure_rows(A, engine.patient, names)
    w = None if initial_fluences is None else _weights_from_fluences(A, initial_fluences)
    offset = None
    t["optimise"] = t["tail_offset"] = 0.0
    res = None
    iterations = 0
    tuning = None
    if tune_importance:
        t0 = time.perf_counter()
        tuning = _tune(A.matrix, goals, rows, score_goals=score_goals, initial_weights=w,
                       max_evaluations=tuning_evaluations, margin_gy=tuning_margin_gy,
                       max_iterations=max_iterations, progress=progress,
                       cancel=cancel)
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
    # How far the optimiser's last dose model was from the engine at the final weights.
    engine_rows = backend.asnumpy(A.engine_dose(engine, w)).astype(np.float64)
    model = backend.asnumpy(A.dose(engine.xp.asarray(np.asarray(w, np.float32)),
                                   offset)).astype(np.float64)
    peak = max(float(np.abs(engine_rows).max()), 1e-12)
    fluences = A.fluence_maps(w)
    engine.set_fluences(fluences)
    return InversePlan(fluences, res, A, r, float(100.0 * np.abs(engine_rows - model).max() / peak), t, iterations,
                       tuning)


def _weights_from_fluences(A: InfluenceMatrix, fluences) -> np.ndarray:
    bc = A.beamlet_cells
    maps = [np.asarray(backend.asnumpy(f), np.float32) for f in fluences]
    return np.array([float(maps[b][r0 : r0 + bc, c0 : c0 + bc].mean()) for b, r0, c0 in A.beamlets])
