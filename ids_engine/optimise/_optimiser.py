"""Fluence-map optimisation: non-negative beamlet weights for goals on an influence matrix.

The dose at the matrix's voxels is ``d = A @ w + offset`` (``offset``: the engine's tail
correction, or zero). Objectives are summed (each with its importance) and minimised over
``w >= 0`` with L-BFGS-B (projected quasi-Newton, ``scipy.optimize.minimize``) using the
analytic gradient ``A.T @ (df/dd)``. Constraints ``g(d) <= 0`` enter through an augmented
Lagrangian (Powell-Hestenes-Rockafellar form, Nocedal & Wright 2006, eq. 17.65):

    L(w) = f(d) + 1 / (2 mu) * sum(max(0, lambda + mu g(d))**2 - lambda**2)

minimised in rounds; after each round the multipliers become ``max(0, lambda + mu g)`` and
``mu`` grows tenfold when the largest violation has not fallen below a quarter of the
last round's. The loop ends when every constraint is met within the tolerance, or after
``max_rounds``, or when the iteration budget is spent; constraints still unmet are then
reported by name and amount (never raised). DVH constraints bind the voxels of an active
set chosen from the dose at the start of each round (see :class:`~._goals.MaxDVH`).

The matrix may be dense (NumPy) or sparse (SciPy CSR/CSC; cupyx on a GPU) or the engine's
exact two-level form (:class:`~ids_engine.dose._influence.TwoLevelMatrix`, products only):
the array namespace comes from the matrix. Without a warm start the weights start uniform,
at the level that best meets the objectives (one product and a 1-D search;
:func:`_uniform_start`), and BLAS runs on one thread while optimising
(:func:`_one_blas_thread`). Each L-BFGS-B iteration costs about one evaluation (matRad's
TG119.mat: 406 evaluations for 400 iterations), so the products are the cost; an opt-in
stall rule (``stall_rtol``) ends a round whose objective has stopped falling.

On the host the dose and the gradients are float64; a large float32 matrix (at least
``_FLOAT32_PRODUCTS_NNZ`` stored entries) is multiplied by float32 vectors and the products
widened to float64, since SciPy would otherwise copy the whole matrix to float64 in every
product (measured on the clinical TG-119 matrix, 17 M entries, 2 cores: 21 ms per evaluation
instead of 75 ms); the products' rounding (about 1e-6 of the dose) is far below the dose
model's own accuracy. The weights live on the host in float64 (L-BFGS-B runs there; one
vector of n_beamlets crosses per evaluation); the dose stays with the matrix.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import scipy.optimize

from ids_engine._progress import Progress
from ids_engine.backend import array_module, asnumpy

from ._goals import Goal, GoalResult, evaluate_goals

__all__ = ["FluenceResult", "UnmetConstraint", "optimise_fluence"]

# Host float32 matrices with at least this many stored entries multiply float32 vectors.
_FLOAT32_PRODUCTS_NNZ = 1 << 20


@dataclass(frozen=True)
class UnmetConstraint:
    """A constraint the optimiser could not meet.

    Attributes
    ----------
    name : the goal's label (``goal.label``).
    goal : the constraint.
    achieved : what the final dose achieves (``unit``).
    limit : the constraint's level (``unit``).
    amount : by how much it is missed (``unit``, > 0).
    unit : ``"Gy"`` or ``"%"`` (of the structure's volume, for DVH constraints).
    """

    name: str
    goal: Goal
    achieved: float
    limit: float
    amount: float
    unit: str

    def __str__(self) -> str:
        return f"{self.name}: achieved {self.achieved:.4g} {self.unit}, missed by {self.amount:.4g} {self.unit}"


@dataclass(frozen=True)
class FluenceResult:
    """The outcome of :func:`optimise_fluence`.

    Attributes
    ----------
    beamlet_weights : array (n_beamlets,), float64, host: the optimised weights (>= 0).
    dose_gy : array (n_voxels,), Gy, on the matrix's backend: ``A @ w + offset``.
    objective : weighted sum of the objectives at the result (constraints not included).
    goals : one :class:`~._goals.GoalResult` per goal, in the order given.
    unmet_constraints : the constraints missed by more than the tolerance, by name and amount.
    iterations : L-BFGS-B iterations, all rounds together.
    evaluations : objective-and-gradient evaluations (each one ``A @ w`` and one ``A.T @ g``).
    rounds : augmented-Lagrangian rounds (1 without constraints).
    time_s : wall time in seconds.
    cancelled : ``True`` if ``cancel()`` stopped the optimisation.
    message : why it stopped.
    """

    beamlet_weights: np.ndarray
    dose_gy: Any
    objective: float
    goals: tuple[GoalResult, ...]
    unmet_constraints: tuple[UnmetConstraint, ...]
    iterations: int
    evaluations: int
    rounds: int
    time_s: float
    cancelled: bool
    message: str

    @property
    def feasible(self) -> bool:
        """Whether every constraint is met within the tolerance."""
        return not self.unmet_constraints


class _Cancelled(Exception):
    pass


def _namespace(influence):
    """The influence matrix's array namespace (a two-level matrix names its own)."""
    xp = getattr(influence, "xp", None)
    return xp if xp is not None else array_module(influence)


def _check_weights(voxel_weights: Mapping[str, Any] | None, voxels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host float64 voxel weights per structure, checked against its row indices."""
    if voxel_weights is None:
        return {}
    out: dict[str, np.ndarray] = {}
    for name, w in voxel_weights.items():
        if name not in voxels:
            raise ValueError(f"voxel_weights names structure {name!r}, which no goal is about "
                             f"(the goals' structures: {', '.join(sorted(voxels))})")
        w = np.asarray(asnumpy(w), dtype=np.float64)
        if w.shape != voxels[name].shape:
            raise ValueError(f"voxel_weights[{name!r}] must have shape {voxels[name].shape} (one weight per row "
                             f"of the structure), got {w.shape}")
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            raise ValueError(f"voxel_weights[{name!r}] must be finite and > 0")
        out[name] = w
    return out


def _check_voxels(goals: Sequence[Goal], structure_voxels: Mapping[str, Any], n_voxels: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, goal in enumerate(goals):
        if not isinstance(goal, Goal):
            raise TypeError(f"goals[{i}] must be a Goal, got {type(goal).__name__}")
        name = goal.structure
        if name in out:
            continue
        if name not in structure_voxels:
            raise ValueError(f"goals[{i}] ({goal.label}): structure {name!r} is not in structure_voxels "
                             f"(known: {sorted(structure_voxels)})")
        idx = np.asarray(asnumpy(structure_voxels[name]))
        if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
            raise ValueError(f"structure_voxels[{name!r}] must be a non-empty 1-D integer array of row indices, "
                             f"got shape {idx.shape} dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= n_voxels:
            raise ValueError(f"structure_voxels[{name!r}]: indices span {idx.min()}..{idx.max()}, outside the "
                             f"matrix rows 0..{n_voxels - 1}")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"structure_voxels[{name!r}]: repeated voxel indices")
        out[name] = idx
    return out


def optimise_fluence(
    influence,
    goals: Sequence[Goal],
    structure_voxels: Mapping[str, Any],
    *,
    initial_weights=None,
    dose_offset_gy=None,
    voxel_weights: Mapping[str, Any] | None = None,
    max_iterations: int = 1000,
    max_rounds: int = 20,
    tolerance_gy: float = 0.01,
    ftol: float = 1e-8,
    stall_rtol: float | None = None,
    stall_iterations: int = 20,
    progress: Progress = None,
    cancel: Callable[[], bool] | None = None,
) -> FluenceResult:
    """Optimise non-negative beamlet weights for objectives and constraints.

    Parameters
    ----------
    influence : (n_voxels, n_beamlets) matrix, Gy per unit weight: dense NumPy/CuPy or
        SciPy/cupyx sparse. Row i is the dose at voxel i.
    goals : the objectives and constraints (:class:`~._goals.Goal` instances).
    structure_voxels : structure name -> int array (n,) of row indices into ``influence``.
    initial_weights : array (n_beamlets,), a warm start (clipped at 0); default the best
        uniform weights for the objectives (:func:`_uniform_start`), zeros without objectives.
    dose_offset_gy : array (n_voxels,), Gy, added to ``influence @ w`` (the tail
        correction); default none.
    voxel_weights : optional structure name -> array (n,) > 0 aligned with
        ``structure_voxels[name]``: how many of the structure's voxels each row stands for
        (sampled rows, :func:`~._rows.sample_rows`); sums, means and DVH volumes of that
        structure's goals are then weighted. Default: every row counts once.
    max_iterations : L-BFGS-B iteration budget over all rounds.
    max_rounds : augmented-Lagrangian rounds at most.
    tolerance_gy : a constraint counts as met within this dose (Gy).
    ftol : L-BFGS-B's relative tolerance on the function value.
    stall_rtol : if given, a round also ends when its objective (the augmented Lagrangian
        L-BFGS-B minimises) has fallen by less than this fraction over the last
        ``stall_iterations`` iterations (a convergence test in place of the budget: L-BFGS-B's
        own ``ftol`` asks this of a single iteration, which large plans never meet); the
        message then says so. None: off (the budget or ``ftol`` ends a round).
    stall_iterations : the window of ``stall_rtol``, in iterations.
    progress : ``progress(done, total, label)``, called each iteration with the objective
        value in the label (``total`` is ``max_iterations``).
    cancel : called between iterations; returning ``True`` stops the optimisation
        (the result so far is returned, ``cancelled=True``).

    Returns
    -------
    :class:`FluenceResult`. Constraints that could not be met are listed in
    ``unmet_constraints`` by name and amount; nothing is raised for them.
    """
    t0 = time.perf_counter()
    goals = tuple(goals)
    shape = getattr(influence, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"influence must be a 2-D matrix (n_voxels, n_beamlets), got shape {shape}")
    n_vox, n_beam = int(shape[0]), int(shape[1])
    if getattr(influence, "format", "csr") not in ("csr", "csc", "two-level"):
        influence = influence.tocsr()
    xp = _namespace(influence)
    host_voxels = _check_voxels(goals, structure_voxels, n_vox)
    voxels = {k: xp.asarray(v) for k, v in host_voxels.items()}
    # On the host the dose and gradients are float64 whatever the matrix holds (SciPy
    # up-casts a float32 matrix times a float64 vector), so L-BFGS-B sees smooth values; on
    # a GPU they stay in the matrix's float32.
    dtype = np.float64 if xp is np or influence.dtype.kind != "f" else influence.dtype
    offset = None
    if dose_offset_gy is not None:
        offset = xp.asarray(dose_offset_gy, dtype=dtype)
        if offset.shape != (n_vox,):
            raise ValueError(f"dose_offset_gy must have shape ({n_vox},), got {offset.shape}")
    if initial_weights is None:
        w0 = np.zeros(n_beam)
    else:
        w0 = np.asarray(asnumpy(initial_weights), dtype=np.float64).ravel()
        if w0.shape != (n_beam,) or not np.all(np.isfinite(w0)):
            raise ValueError(f"initial_weights must be {n_beam} finite numbers, got shape {w0.shape}")
        w0 = np.maximum(w0, 0.0)
    if max_iterations < 1 or max_rounds < 1:
        raise ValueError("max_iterations and max_rounds must be at least 1")
    if stall_rtol is not None and not (math.isfinite(stall_rtol) and stall_rtol > 0.0):
        raise ValueError(f"stall_rtol must be a positive number or None, got {stall_rtol!r}")
    if stall_iterations < 1:
        raise ValueError(f"stall_iterations must be at least 1, got {stall_iterations!r}")

    weights = {k: xp.asarray(v, dtype=dtype) for k, v in _check_weights(voxel_weights, host_voxels).items()}
    problem = _Problem(influence, goals, voxels, offset, dtype, weights)
    with _one_blas_thread():
        return _optimise(problem, w0, initial_weights is None, max_iterations, max_rounds, tolerance_gy, ftol,
                         stall_rtol, stall_iterations, progress, cancel, t0)


def _one_blas_thread():
    """BLAS on one thread while optimising (``threadpoolctl``, when installed).

    L-BFGS-B's own vector operations and the dense part of a two-level matrix are BLAS calls
    on a few thousand numbers, too small to share: waking BLAS's second thread for each cost
    more than it saved, and far more while another process held the second core (matRad's
    TG119.mat, 300 iterations, the other core busy: 1.0 s on one thread instead of 3.2 s,
    L-BFGS-B's part 0.09 s instead of 0.82 s).
    """
    return _BLAS_ONE_THREAD


class _OneBlasThread:
    """The process-wide BLAS limit, shared by concurrent optimisations (threads of an
    ``adapt_batch``): the first to enter sets it, the last to leave restores it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limits = None

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                try:
                    from threadpoolctl import threadpool_limits
                except ImportError:  # pragma: no cover - threadpoolctl is a dependency
                    self._limits = None
                else:
                    self._limits = threadpool_limits(limits=1, user_api="blas")
            self._users += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._limits is not None:
                self._limits.restore_original_limits()
                self._limits = None


_BLAS_ONE_THREAD = _OneBlasThread()


def _uniform_start(problem: "_Problem", n_beam: int) -> np.ndarray:
    """The best uniform weights ``c * 1`` for the objectives (constraints left to the rounds).

    A cheap first solve in place of zeros: one product ``A @ 1``, then a bounded 1-D search
    over ``c`` on the dose ``c * A 1 + offset`` (no more products). Zeros when there are no
    objectives, when ``A @ 1`` is zero at their voxels, or when no ``c > 0`` beats ``c = 0``.
    On matRad's TG119.mat (9 beams, 5 mm beamlets, the TG-119 protocol) L-BFGS-B reaches in
    200 iterations from here an objective it did not reach in 800 from zeros.
    """
    zeros = np.zeros(n_beam)
    if not problem.objectives:
        return zeros
    xp = problem.xp
    d1 = problem.product(np.ones(n_beam))
    rows = xp.unique(xp.concatenate([problem.voxels[g.structure] for g in problem.objectives]))
    mean1 = float(xp.mean(d1[rows]))
    if not (mean1 > 0.0 and math.isfinite(mean1)):
        return zeros
    levels = [float(getattr(g, "dose_gy", getattr(g, "eud_gy", 0.0))) for g in problem.objectives]
    if problem.offset is not None:
        levels.append(float(xp.max(xp.abs(problem.offset))))
    c_hi = 4.0 * max(levels + [1.0]) / mean1
    off = problem.offset

    def phi(c: float) -> float:
        d = c * d1 if off is None else c * d1 + off
        return problem.objective_part(d)[0]

    res = scipy.optimize.minimize_scalar(phi, bounds=(0.0, c_hi), method="bounded",
                                         options={"xatol": 1e-5 * c_hi})
    c = float(res.x)
    if not (c > 0.0 and res.fun < phi(0.0)):
        return zeros
    return np.full(n_beam, c)


def _optimise(problem, w0, cold, max_iterations, max_rounds, tolerance_gy, ftol, stall_rtol, stall_iterations,
              progress, cancel, t0) -> FluenceResult:
    n_beam = int(problem.influence.shape[1])
    goals, voxels = problem.goals, problem.voxels
    if cold:
        w0 = _uniform_start(problem, n_beam)
    constraints = problem.constraints
    counts = {"nit": 0}
    accepted: dict[str, np.ndarray] = {}
    history: list[float] = []

    def callback(intermediate_result):
        counts["nit"] += 1
        accepted["x"] = np.array(intermediate_result.x, dtype=np.float64)
        if progress is not None:
            progress(min(counts["nit"], max_iterations), max_iterations,
                     f"objective {problem.objective_at(intermediate_result.x):.6g}")
        if cancel is not None and cancel():
            raise _Cancelled
        if counts["nit"] >= max_iterations:
            raise StopIteration
        if stall_rtol is not None:
            history.append(float(intermediate_result.fun))
            if len(history) > stall_iterations:
                old, new = history[-1 - stall_iterations], history[-1]
                if old - new <= stall_rtol * abs(new):
                    counts["stalled"] = True
                    raise StopIteration

    w = w0
    cancelled = False
    message = ""
    rounds = 0
    d = problem.dose(w)
    if constraints:
        problem.start(d)
    prev_violation = math.inf
    mu_max = problem.mu * 1e10
    bounds = [(0.0, None)] * n_beam
    while rounds < max_rounds:
        if cancel is not None and cancel():
            cancelled, message = True, "cancelled"
            break
        rounds += 1
        # L-BFGS-B stops when an iteration lowers f by less than ftol * max(|f|, 1): below 1
        # that is an absolute amount, which ends a warm start near a small optimum (a tuning
        # step, an already good plan) after one iteration. An objective below 1 at the
        # round's start is therefore scaled up to 1 (larger ones are left as they are).
        f_start = problem.lagrangian(w)[0]
        scale = 1.0 / f_start if 0.0 < f_start < 1.0 else 1.0

        def scaled(x, scale=scale):
            f, g = problem.lagrangian(x)
            return f * scale, g * scale

        history.clear()
        counts["stalled"] = False
        try:
            res = scipy.optimize.minimize(
                scaled, w, jac=True, method="L-BFGS-B", bounds=bounds, callback=callback,
                options={"maxiter": max_iterations - counts["nit"], "ftol": ftol, "gtol": 1e-12, "maxcor": 20},
            )
            w = np.maximum(res.x, 0.0)
            message = str(res.message)
        except _Cancelled:
            # The last accepted iterate (not a line-search trial point).
            w = np.maximum(accepted.get("x", w), 0.0)
            cancelled, message = True, "cancelled"
            break
        d = problem.dose(w)
        if counts["stalled"]:
            message = (f"converged: the objective fell by less than {stall_rtol:g} of itself over the last "
                       f"{stall_iterations} iterations")
        if counts["nit"] >= max_iterations:
            message = "iteration budget spent"
        if not constraints:
            break
        worst = max(problem.violations(d))
        problem.update_multipliers(d)
        if all(r.met for r in evaluate_goals(d, constraints, voxels, tolerance_gy=tolerance_gy,
                                             voxel_weights=problem.weights)):
            message = f"constraints met after {rounds} round(s)"
            break
        if counts["nit"] >= max_iterations:
            break
        if worst > 0.25 * prev_violation:
            problem.mu = min(problem.mu * 10.0, mu_max)
        prev_violation = worst
        problem.update_active_sets(d)
    else:
        message = f"stopped after {max_rounds} rounds"

    d = problem.dose(w)
    results = evaluate_goals(d, goals, voxels, tolerance_gy=tolerance_gy, voxel_weights=problem.weights)
    unmet = tuple(
        UnmetConstraint(r.goal.label, r.goal, r.achieved, r.limit, r.shortfall, r.unit)
        for r in results if r.goal.constraint and not r.met
    )
    objective = float(sum(r.value for r in results if not r.goal.constraint))
    if progress is not None:
        progress(max_iterations, max_iterations, f"objective {objective:.6g}")
    return FluenceResult(
        beamlet_weights=w,
        dose_gy=d,
        objective=objective,
        goals=results,
        unmet_constraints=unmet,
        iterations=counts["nit"],
        evaluations=problem.evaluations,
        rounds=rounds,
        time_s=time.perf_counter() - t0,
        cancelled=cancelled,
        message=message,
    )


class _Problem:
    """The augmented Lagrangian of one optimisation and its state (multipliers, active sets, mu).

    One ``A @ w`` and one ``A.T @ g`` per evaluation; the dose-space gradient of all goals
    is summed into one vector first (structures may overlap).
    """

    def __init__(self, influence, goals: tuple[Goal, ...], voxels: dict, offset, dtype, weights=None) -> None:
        self.goals = goals
        self.weights = dict(weights or {})
        self.influence = influence
        self.influence_t = influence.T
        self.xp = _namespace(influence)
        self.voxels = voxels
        self.offset = offset
        self.dtype = dtype
        # The dtype of the vectors the matrix multiplies (module docstring).
        nnz = getattr(influence, "nnz", None)
        if nnz is None:
            nnz = int(np.prod(influence.shape))
        big32 = self.xp is np and influence.dtype == np.float32 and nnz >= _FLOAT32_PRODUCTS_NNZ
        self.product_dtype = np.float32 if big32 else dtype
        self.n_voxels = int(influence.shape[0])
        self.objectives = [g for g in goals if not g.constraint]
        self.constraints = [g for g in goals if g.constraint]
        self.lam: list = [None] * len(self.constraints)
        self.active: list = [None] * len(self.constraints)
        self.mu = 1.0
        self.last_x: np.ndarray | None = None
        self.last_f = math.nan
        self.evaluations = 0

    def product(self, w: np.ndarray):
        """``A @ w`` (n_voxels,), Gy, on the matrix's backend, in the dose dtype."""
        d = self.influence @ self.xp.asarray(w, dtype=self.product_dtype)
        return d.astype(self.dtype) if d.dtype != self.dtype else d

    def dose(self, w: np.ndarray):
        """``A @ w + offset`` (n_voxels,), Gy, on the matrix's backend."""
        d = self.product(w)
        return d + self.offset if self.offset is not None else d

    def objective_part(self, d):
        """Weighted objective sum and its gradient with respect to the dose (n_voxels,)."""
        f = 0.0
        grad = self.xp.zeros(self.n_voxels, dtype=d.dtype)
        for g in self.objectives:
            idx = self.voxels[g.structure]
            v, gs = g.objective(d[idx], self.weights.get(g.structure))
            f += v
            grad[idx] += gs
        return f, grad

    def objective_at(self, w: np.ndarray) -> float:
        if self.last_x is not None and np.array_equal(self.last_x, w):
            return self.last_f
        return self.objective_part(self.dose(w))[0]

    def start(self, d) -> None:
        """Active sets and zero multipliers from the starting dose; the initial penalty."""
        xp = self.xp
        for k, c in enumerate(self.constraints):
            ds = d[self.voxels[c.structure]]
            vw = self.weights.get(c.structure)
            self.active[k] = c.active_set(ds, vw)
            self.lam[k] = xp.zeros_like(c.residual(ds, self.active[k], vw))
        # A violation of the goals' typical dose in every constrained voxel costs about 100
        # times the objectives at the start (objectives are voxel averages, residuals are not).
        f0 = self.objective_part(d)[0]
        levels = [getattr(g, "dose_gy", getattr(g, "eud_gy", 0.0)) for g in self.objectives + self.constraints]
        ref_gy = max(levels + [1.0])
        n_con = sum(int(self.voxels[c.structure].shape[0]) for c in self.constraints)
        self.mu = max(1.0, f0) / (ref_gy * ref_gy * n_con) * 100.0

    def lagrangian(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        """Augmented Lagrangian (module docstring) and its gradient (n_beamlets,), host float64."""
        xp = self.xp
        d = self.dose(w)
        f, grad = self.objective_part(d)
        self.last_x, self.last_f = np.array(w, dtype=np.float64), f
        total = f
        for k, c in enumerate(self.constraints):
            idx = self.voxels[c.structure]
            ds = d[idx]
            lam = self.lam[k]
            vw = self.weights.get(c.structure)
            shifted = xp.maximum(lam + self.mu * c.residual(ds, self.active[k], vw), 0)
            total += float(xp.sum(shifted * shifted - lam * lam)) / (2.0 * self.mu)
            grad[idx] += c.residual_vjp(ds, shifted, self.active[k], vw)
        self.evaluations += 1
        if grad.dtype != self.product_dtype:
            grad = grad.astype(self.product_dtype)
        return total, np.asarray(asnumpy(self.influence_t @ grad), dtype=np.float64)

    def violations(self, d) -> list[float]:
        """Largest residual of each constraint (Gy, >= 0) under the current active sets."""
        out = []
        for k, c in enumerate(self.constraints):
            r = c.residual(d[self.voxels[c.structure]], self.active[k], self.weights.get(c.structure))
            out.append(max(float(self.xp.max(r)), 0.0))
        return out

    def update_multipliers(self, d) -> None:
        for k, c in enumerate(self.constraints):
            ds = d[self.voxels[c.structure]]
            vw = self.weights.get(c.structure)
            self.lam[k] = self.xp.maximum(self.lam[k] + self.mu * c.residual(ds, self.active[k], vw), 0)

    def update_active_sets(self, d) -> None:
        """DVH constraints bind the voxels chosen from the new dose; multipliers of voxels
        that leave the set are dropped."""
        for k, c in enumerate(self.constraints):
            new = c.active_set(d[self.voxels[c.structure]], self.weights.get(c.structure))
            if new is not None:
                self.active[k] = new
                self.lam[k] = self.xp.where(new, self.lam[k], 0)
