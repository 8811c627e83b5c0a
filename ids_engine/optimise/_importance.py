"""Importance-factor tuning: the two-step scheme of Xing et al. (1999).

Xing, Li, Donaldson, Le and Boyer, "Optimization of importance factors in inverse
planning", Phys. Med. Biol. 44 (1999) 2525 (the exhibit in seed 003): the beamlet weights
are optimised for an objective function with given importance factors (step 1); the plan is
then ranked by a separate score of its dose-volume histograms and the importance factors
are adjusted to improve that score (step 2), re-optimising the fluence for every change,
until the score saturates.

Here step 1 is :func:`~._optimiser.optimise_fluence`, warm-started from the best plan so
far; step 2 is Powell's method (``scipy.optimize.minimize(method="Powell")``, derivative
free, as the score is only piecewise smooth in the factors) over the natural logarithms of
the tuned objectives' importances, bounded to ``log_range`` either side of their start (so
factors stay positive and a step means a ratio). The score is the sum of squared
shortfalls, in Gy, of score goals (by default the optimisation goals themselves; pass e.g.
the published TG-119 goals): a plan meeting every score goal scores 0, which Powell cannot
improve, so the loop ends there.

Shortfalls are measured in dose for every goal kind, so that DVH points and dose bounds
add up in one unit: ``D95 >= 50 Gy`` falls short by ``50 - D95``; ``V20Gy <= 30 %`` by
``D30 - 20`` (the dose above which 30 % of the volume lies, minus 20 Gy); min / max dose,
mean dose and EUD goals by the distance of the achieved dose from the level;
``UniformDose`` by its largest deviation.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.optimize

from ids_engine._progress import Progress
from ids_engine.backend import asnumpy

from ._goals import Goal, MaxDVH, MinDVH
from ._optimiser import FluenceResult, _check_voxels, _namespace, optimise_fluence

__all__ = ["ImportanceTuning", "TuningStep", "dvh_score", "goal_shortfall_gy", "score_goals_from_checks",
           "tune_importance"]


def _tightened(goal: Goal, margin_gy: float) -> Goal:
    """``goal`` with its dose level moved ``margin_gy`` towards the safe side."""
    if margin_gy == 0.0 or goal.kind == "uniform_dose":
        return goal
    sign = 1.0 if goal.kind.startswith("min_") else -1.0
    field = "eud_gy" if goal.kind.endswith("_eud") else "dose_gy"
    return replace(goal, **{field: max(getattr(goal, field) + sign * margin_gy, 0.0)})


def goal_shortfall_gy(goal: Goal, dose_gy, margin_gy: float = 0.0, voxel_weights=None) -> float:
    """By how much ``dose_gy`` misses ``goal``, in Gy (0 when met).

    Parameters
    ----------
    goal : an optimisation goal (its ``constraint`` flag and importance are ignored).
    dose_gy : array (n,), Gy: the dose at the goal's structure's voxels (NumPy or CuPy).
    margin_gy : the goal counts as met only with this much dose to spare (lower bounds
        raised, upper bounds lowered by it).
    voxel_weights : optional array (n,) > 0, how many voxels each stands for (sampled rows):
        DVH volumes and means are then weighted.
    """
    goal = _tightened(goal, float(margin_gy))
    if voxel_weights is not None:
        return _weighted_shortfall_gy(goal, dose_gy, voxel_weights)
    d = np.sort(np.asarray(asnumpy(dose_gy), dtype=np.float64).ravel())[::-1]  # hottest first
    n = d.size
    if n == 0:
        raise ValueError(f"goal_shortfall_gy: no voxels for {goal.label}")
    if isinstance(goal, MinDVH):
        # The dose that volume_pct of the structure receives: the k-th hottest voxel.
        k = max(1, int(math.ceil(goal.volume_pct / 100.0 * n - 1e-9)))
        return max(goal.dose_gy - float(d[min(k, n) - 1]), 0.0)
    if isinstance(goal, MaxDVH):
        # At most k voxels may exceed dose_gy: the (k+1)-th hottest must not.
        k = int(math.floor(goal.volume_pct / 100.0 * n + 1e-9))
        return 0.0 if k >= n else max(float(d[k]) - goal.dose_gy, 0.0)
    achieved, limit, met = goal.achieved(np.asarray(d), 0.0)
    return 0.0 if met else abs(float(achieved) - float(limit))


def _weighted_shortfall_gy(goal: Goal, dose_gy, voxel_weights) -> float:
    """:func:`goal_shortfall_gy` (``goal`` already tightened) with weighted volumes."""
    d = np.asarray(asnumpy(dose_gy), dtype=np.float64).ravel()
    w = np.asarray(asnumpy(voxel_weights), dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError(f"goal_shortfall_gy: no voxels for {goal.label}")
    order = np.argsort(-d, kind="stable")
    d, w = d[order], w[order]
    upto = np.cumsum(w)
    total = float(upto[-1])
    if isinstance(goal, (MinDVH, MaxDVH)):
        vol = goal.volume_pct / 100.0 * total
        if isinstance(goal, MinDVH):
            # The dose the hottest volume_pct receives: the first voxel that completes it.
            k = min(int(np.searchsorted(upto, vol - 1e-9 * total, side="left")), d.size - 1)
            return max(goal.dose_gy - float(d[k]), 0.0)
        # The first voxel beyond the volume allowed above dose_gy must not exceed it.
        k = int(np.searchsorted(upto, vol + 1e-9 * total, side="right"))
        return 0.0 if k >= d.size else max(float(d[k]) - goal.dose_gy, 0.0)
    achieved, limit, met = goal.achieved(d, 0.0, w)
    return 0.0 if met else abs(float(achieved) - float(limit))


def dvh_score(dose_gy, score_goals: Sequence[Goal], structure_voxels: Mapping[str, Any], *,
              margin_gy: float = 0.0, voxel_weights: Mapping[str, Any] | None = None) -> tuple[float, tuple]:
    """The plan score of the tuning loop: the sum of squared shortfalls (Gy^2) of ``score_goals``.

    Parameters
    ----------
    dose_gy : array (n_voxels,), Gy, at the influence matrix's rows.
    score_goals : goals whose shortfalls are scored (see :func:`goal_shortfall_gy`).
    structure_voxels : structure name -> row indices into ``dose_gy``.
    margin_gy : see :func:`goal_shortfall_gy`.
    voxel_weights : optional structure name -> weights aligned with ``structure_voxels``
        (sampled rows).

    Returns
    -------
    (score, shortfalls) : the score (0 when every goal is met) and each goal's shortfall in Gy.
    """
    vw = voxel_weights or {}
    short = tuple(goal_shortfall_gy(g, dose_gy[structure_voxels[g.structure]], margin_gy, vw.get(g.structure))
                  for g in score_goals)
    return float(sum(s * s for s in short)), short


def score_goals_from_checks(checks) -> tuple[Goal, ...]:
    """Score goals from :class:`ids_engine.evaluation.Goal` checks (``PTV D95 >= 50 Gy``).

    Dose-at-volume checks (``Dv`` in Gy, v in % of the volume) become DVH goals, ``Dmax``
    and ``Dmin`` dose bounds, ``Dmean`` mean-dose goals; other checks (volumes, cc, % of the
    prescription) raise ``ValueError`` naming the check.
    """
    from ._goals import MaxDose, MaxMeanDose, MinDose, MinMeanDose

    out = []
    for c in checks:
        text = str(c)
        if c.unit != "Gy":
            raise ValueError(f"score goal {text!r}: only doses in Gy can be scored")
        upper = c.comparator in ("<=", "<")
        metric = c.metric
        if metric in ("Dmax", "D0.03cc") and upper:
            out.append(MaxDose(c.structure, c.value))
        elif metric == "Dmin" and not upper:
            out.append(MinDose(c.structure, c.value))
        elif metric == "Dmean":
            out.append((MaxMeanDose if upper else MinMeanDose)(c.structure, c.value))
        elif re.fullmatch(r"D\d+(\.\d*)?%?", metric):
            v = float(metric[1:].rstrip("%"))
            out.append((MaxDVH if upper else MinDVH)(c.structure, c.value, v))
        else:
            raise ValueError(f"score goal {text!r}: metric {metric!r} cannot be scored")
    return tuple(out)


@dataclass(frozen=True)
class TuningStep:
    """One evaluation of the tuning loop: the importances tried and the plan's score.

    importances : the tuned goals' importances (in ``ImportanceTuning.tuned`` order).
    score : sum of squared shortfalls, Gy^2.
    shortfalls_gy : each score goal's shortfall, Gy.
    iterations : L-BFGS-B iterations of the fluence re-optimisation.
    objective : the optimiser's objective at its result (these importances).
    """

    importances: tuple[float, ...]
    score: float
    shortfalls_gy: tuple[float, ...]
    iterations: int
    objective: float


@dataclass(frozen=True)
class ImportanceTuning:
    """The outcome of :func:`tune_importance`.

    goals : all goals, the tuned ones with the best importances found.
    result : the fluence optimisation at the best importances.
    tuned : indices (into ``goals``) of the tuned objectives.
    score_goals : the goals the score is made of.
    path : every evaluation in order (the first is the starting importances).
    best : index into ``path`` of the best (lowest score; the earliest of equals).
    time_s : wall time.
    message : why it stopped.
    margin_gy : the dose the score goals had to spare to count as met.
    """

    goals: tuple[Goal, ...]
    result: FluenceResult
    tuned: tuple[int, ...]
    score_goals: tuple[Goal, ...]
    path: tuple[TuningStep, ...]
    best: int
    time_s: float
    message: str
    margin_gy: float = 0.0

    @property
    def initial_score(self) -> float:
        return self.path[0].score

    @property
    def best_score(self) -> float:
        return self.path[self.best].score

    @property
    def iterations(self) -> int:
        """L-BFGS-B iterations over all evaluations."""
        return sum(s.iterations for s in self.path)

    def text(self) -> str:
        """The path as lines for a terminal: each evaluation's importances and score."""
        names = [self.goals[i].name or f"{self.goals[i].structure} {self.goals[i]._describe()}" for i in self.tuned]
        lines = [f"importance tuning ({len(self.path)} evaluations, {self.time_s:.1f} s): {self.message}; "
                 f"score {self.initial_score:.4g} -> {self.best_score:.4g} Gy^2",
                 "  step  " + "  ".join(f"{n[:16]:>16}" for n in names) + "       score"]
        for k, s in enumerate(self.path):
            mark = " *" if k == self.best else ""
            lines.append(f"  {k:>4}  " + "  ".join(f"{v:>16.4g}" for v in s.importances) + f"  {s.score:>10.4g}{mark}")
        return "\n".join(lines)

    def summary(self) -> dict:
        """A JSON-ready record: tuned goals, score goals, the path and the best step."""
        return {
            "method": "Powell over log importances (Xing et al. 1999)",
            "tuned_goals": [self.goals[i].label for i in self.tuned],
            "score_goals": [f"{g.structure}: {g._describe()}" for g in self.score_goals],
            "score": "sum of squared shortfalls, Gy^2",
            "margin_gy": self.margin_gy,
            "initial_score": self.initial_score,
            "best_score": self.best_score,
            "best_step": self.best,
            "best_importances": list(self.path[self.best].importances),
            "evaluations": len(self.path),
            "iterations": self.iterations,
            "time_s": round(self.time_s, 3),
            "message": self.message,
            "path": [{"importances": list(s.importances), "score": s.score, "shortfalls_gy": list(s.shortfalls_gy),
                      "iterations": s.iterations} for s in self.path],
        }


class _Stop(Exception):
    pass


def tune_importance(
    influence,
    goals: Sequence[Goal],
    structure_voxels: Mapping[str, Any],
    *,
    score_goals: Sequence[Goal] | None = None,
    tune: Sequence[int] | None = None,
    initial_weights=None,
    dose_offset_gy=None,
    margin_gy: float = 0.0,
    max_evaluations: int = 40,
    log_range: float = math.log(100.0),
    xtol: float = 0.05,
    max_iterations: int = 300,
    progress: Progress = None,
    cancel: Callable[[], bool] | None = None,
    **optimiser_options,
) -> ImportanceTuning:
    """Tune objectives' importance factors with Powell's method to improve a DVH score.

    Parameters
    ----------
    influence, structure_voxels, dose_offset_gy : as :func:`~._optimiser.optimise_fluence`.
    goals : the optimisation goals (objectives and constraints).
    score_goals : goals whose squared shortfalls (Gy) make the score; default ``goals``.
        Their structures must be in ``structure_voxels``.
    margin_gy : score goals count as met only with this much dose to spare (so that the
        plan keeps them after small changes, e.g. the engine's tail correction).
    tune : indices into ``goals`` of the objectives whose importances are tuned; default
        every objective. Constraints have no importance and cannot be tuned.
    initial_weights : warm start of the first fluence optimisation; each later one starts
        from the best plan so far.
    max_evaluations : fluence optimisations at most (each is one step of the path).
    log_range : each tuned importance stays within ``exp(+-log_range)`` times its start.
    xtol : Powell's tolerance on the log importances.
    max_iterations : L-BFGS-B iterations per fluence optimisation.
    progress : ``progress(done, total, label)`` after each evaluation, with the score.
    cancel : called before each evaluation and inside it; ``True`` stops (the best so far is
        returned).
    **optimiser_options : passed on to :func:`~._optimiser.optimise_fluence`.

    Returns
    -------
    :class:`ImportanceTuning` with the best goals, their fluence and the path.
    """
    t0 = time.perf_counter()
    goals = tuple(goals)
    score_goals = goals if score_goals is None else tuple(score_goals)
    if not score_goals:
        raise ValueError("tune_importance: no score goals")
    n_vox = int(getattr(influence, "shape", (0,))[0])
    voxels = _check_voxels(goals + score_goals, structure_voxels, n_vox)
    objectives = [i for i, g in enumerate(goals) if not g.constraint]
    if tune is None:
        tune = objectives
    tune = tuple(int(i) for i in tune)
    for i in tune:
        if not 0 <= i < len(goals):
            raise ValueError(f"tune_importance: tune index {i} is outside the {len(goals)} goals")
        if goals[i].constraint:
            raise ValueError(f"tune_importance: goal {i} ({goals[i].label}) is a constraint; only objectives' "
                             f"importances can be tuned")
    if len(set(tune)) != len(tune) or not tune:
        raise ValueError(f"tune_importance: tune must name distinct objectives, got {list(tune)}")
    if max_evaluations < 1:
        raise ValueError("tune_importance: max_evaluations must be at least 1")
    if not (math.isfinite(margin_gy) and margin_gy >= 0.0):
        raise ValueError(f"tune_importance: margin_gy must be >= 0, got {margin_gy!r}")
    if not log_range > 0:
        raise ValueError("tune_importance: log_range must be positive")
    start = np.array([math.log(goals[i].importance) for i in tune])
    # The optimiser weighs only the goals' structures (it refuses other names); the score
    # uses the weights of every score goal's structure.
    fluence_options = dict(optimiser_options)
    if fluence_options.get("voxel_weights") is not None:
        names = {g.structure for g in goals}
        fluence_options["voxel_weights"] = {k: v for k, v in fluence_options["voxel_weights"].items() if k in names}

    path: list[TuningStep] = []
    results: list[FluenceResult] = []
    cache: dict[tuple, float] = {}
    best = {"i": -1}

    def goals_at(x: np.ndarray) -> tuple[Goal, ...]:
        out = list(goals)
        for i, xi, x0 in zip(tune, x, start):
            out[i] = replace(goals[i], importance=goals[i].importance * math.exp(xi - x0))
        return tuple(out)

    def score(x: np.ndarray) -> float:
        x = np.clip(np.asarray(x, dtype=np.float64), start - log_range, start + log_range)
        key = tuple(np.round(x, 12))
        if key in cache:
            return cache[key]
        if len(path) >= max_evaluations or (path and cancel is not None and cancel()):
            raise _Stop
        w0 = results[best["i"]].beamlet_weights if results else initial_weights
        trial = goals_at(x)
        res = optimise_fluence(influence, trial, structure_voxels, initial_weights=w0, dose_offset_gy=dose_offset_gy,
                               max_iterations=max_iterations, cancel=cancel, **fluence_options)
        s, short = dvh_score(res.dose_gy, score_goals, voxels_xp, margin_gy=margin_gy,
                             voxel_weights=optimiser_options.get("voxel_weights"))
        path.append(TuningStep(tuple(trial[i].importance for i in tune), s, short, res.iterations, res.objective))
        results.append(res)
        if best["i"] < 0 or s < path[best["i"]].score:
            best["i"] = len(path) - 1
        cache[key] = s
        if progress is not None:
            progress(len(path), max_evaluations, f"score {s:.4g} Gy^2 (best {path[best['i']].score:.4g})")
        if res.cancelled:
            raise _Stop
        if s <= 0.0:
            raise _Stop  # every score goal met: the score cannot improve
        return s

    xp = _namespace(influence)
    voxels_xp = {k: xp.asarray(v) for k, v in voxels.items()}
    message = ""
    try:
        score(start)
        out = scipy.optimize.minimize(score, start, method="Powell",
                                      bounds=list(zip(start - log_range, start + log_range)),
                                      options={"xtol": xtol, "ftol": 1e-4, "maxfev": 10 * max_evaluations})
        message = f"Powell: {out.message}"
    except _Stop:
        if results[-1].cancelled or (cancel is not None and cancel()):
            message = "cancelled"
        elif path and path[best["i"]].score <= 0.0:
            message = "every score goal met"
        else:
            message = f"evaluation budget spent ({max_evaluations})"
    b = best["i"]
    tuned_goals = list(goals)
    for i, imp in zip(tune, path[b].importances):
        tuned_goals[i] = replace(goals[i], importance=imp)
    return ImportanceTuning(tuple(tuned_goals), results[b], tune, score_goals, tuple(path), b,
                            time.perf_counter() - t0, message, float(margin_gy))
