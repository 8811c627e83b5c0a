"""Auto weight: the monitor units of each beam, four ways (seed 001, "Auto Weight").

A problem is a list of volumes (:class:`VolumeGoal`): targets with a minimum dose and an
optional maximum, OARs with an optional maximum, each with an importance and a penalty, and
per volume the dose per MU of every beam at the volume's sample points (a matrix
``A_v``, (n_v points, n_beams), Gy/MU, from :meth:`BeamDoses.samples`, cached: re-solving
with new parameters does not run the dose engine). Doses are ``d_v = A_v mu``, MU >= 0.
Every volume's contribution is divided by its number of points ``n_v``, so that a large
volume does not dominate (seed: "normalized by the number of points in the volume").

The four methods, each as the seed specifies it:

* **simplex** (:func:`solve_simplex`): linear programming, ``scipy.optimize.linprog``
  (HiGHS). Minimise ``sum_v importance_v / n_v * sum_p d_p`` over targets and OARs subject
  to ``d_p >= min`` in targets and ``d_p <= max`` wherever a maximum is set; the penalty is
  not used. No feasible solution raises :class:`AutoWeightInfeasible`, which names each
  limit that has to move and by how much (from an elastic LP that relaxes the limits
  least).
* **cimmino** (:func:`solve_cimmino`): Cimmino's simultaneous projections (Censor,
  Altschuler and Powlis, Inverse Problems 4 (1988) 607; Xiao et al., Med. Phys. 27 (2000)
  2093, pp. 2094-2095). Every violated inequality is projected on, each weighted by
  ``importance_v / n_v``, and the MU move by the weighted mean of the projections (then
  clipped at 0 MU). No objective; OARs without a maximum are ignored; the penalty is not
  used. Stops when the distance moved (MU) falls below ``stop_distance_mu`` divided by the
  total weight, or after ``max_iterations``; when no feasible point exists the result is a
  compromise.
* **downhill** (:func:`solve_downhill`): a downhill search (Nelder-Mead's downhill
  simplex, scipy) on the penalty objective :func:`objective`, term by term as the seed
  gives it, for each volume ``v`` with ``n_v`` points:

  - target, lower limit: ``importance * (d_p - min)^2`` at every point, plus ``penalty``
    at each point below ``min``, all divided by ``n_v``;
  - any volume with a maximum: ``penalty * importance`` at each point above the maximum,
    divided by ``n_v``;
  - OAR: ``importance * d_p^2`` at every point, divided by ``n_v`` (penalty not used).

  Doses in Gy, so the objective is in Gy^2 and a penalty is on the same scale.
* **annealing** (:func:`solve_annealing`): simulated annealing (Kirkpatrick, Gelatt and
  Vecchi, Science 220 (1983) 671) on the same objective, with the seed's cooling schedule:
  MU of every beam drawn at random around the current ones with standard deviation
  ``sd = sd_fraction * sd0``; after every ``iterations_per_step`` iterations a sum (from 0)
  grows by ``increment`` and ``sd_fraction = exp(-sum)``; an increase of the objective is
  accepted with probability ``exp(-0.5 * variance) * sd_fraction``, where ``variance`` is
  the variance of the objective over the previous step's candidates (recomputed every step);
  it stops when ``sd`` falls below 0.5 MU and returns the best solution seen. Seeded RNG.

:func:`search_upper_limit` is the seed's binary search on an upper limit (the body outside
the target plus margin, to make the simplex spread the dose over all beams): start at a
feasible limit (the target dose), halve it, and on an infeasible limit go midway between
it and the last feasible one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "AUTO_WEIGHT_METHODS",
    "AutoWeightInfeasible",
    "AutoWeightProblem",
    "AutoWeightResult",
    "UpperLimitSearch",
    "VolumeGoal",
    "Violation",
    "auto_weight",
    "objective",
    "objective_terms",
    "search_upper_limit",
    "solve_annealing",
    "solve_cimmino",
    "solve_downhill",
    "solve_simplex",
]

ROLES = ("target", "oar")
FEASIBILITY_TOL_GY = 1e-6  # a limit counts as met within this (LP round-off)


@dataclass(frozen=True)
class VolumeGoal:
    """One volume of an auto-weight problem (the seed's "Select Target and OAR" popup).

    Parameters
    ----------
    name : the structure's name.
    role : "target" (needs ``min_gy``) or "oar" (no minimum).
    min_gy : target minimum dose, Gy.
    max_gy : optional maximum dose, Gy (None: no upper limit; 0 is a limit of zero dose).
    importance : weight of the volume (>= 0).
    penalty : penalty value (downhill search and annealing only), Gy^2 scale.
    """

    name: str
    role: str = "target"
    min_gy: float | None = None
    max_gy: float | None = None
    importance: float = 1.0
    penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"volume {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        for f in ("min_gy", "max_gy"):
            v = getattr(self, f)
            if v is not None:
                v = float(v)
                if not (np.isfinite(v) and v >= 0):
                    raise ValueError(f"volume {self.name!r}: {f} must be a dose >= 0, got {getattr(self, f)!r}")
                object.__setattr__(self, f, v)
        if self.role == "target" and self.min_gy is None:
            raise ValueError(f"target {self.name!r} needs a minimum dose (min_gy)")
        if self.role == "oar" and self.min_gy is not None:
            raise ValueError(f"OAR {self.name!r}: an OAR has no minimum dose (min_gy)")
        if self.min_gy is not None and self.max_gy is not None and self.max_gy < self.min_gy:
            raise ValueError(f"target {self.name!r}: max_gy {self.max_gy:g} is below min_gy {self.min_gy:g}")
        for f in ("importance", "penalty"):
            v = float(getattr(self, f))
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"volume {self.name!r}: {f} must be >= 0, got {getattr(self, f)!r}")
            object.__setattr__(self, f, v)


@dataclass(frozen=True, eq=False)
class AutoWeightProblem:
    """Volumes and their dose-per-MU sample matrices.

    goals : the volumes.
    rates : per volume, (n_v, n_beams) float64 Gy/MU at its sample points.
    beam_names : the beams, in column order.
    """

    goals: tuple[VolumeGoal, ...]
    rates: tuple[np.ndarray, ...]
    beam_names: tuple[str, ...]

    def __post_init__(self) -> None:
        goals, rates = tuple(self.goals), tuple(np.asarray(r, dtype=np.float64) for r in self.rates)
        if not goals:
            raise ValueError("an auto-weight problem needs at least one volume")
        if not any(g.role == "target" for g in goals):
            raise ValueError("an auto-weight problem needs a target (a volume with a minimum dose)")
        if len(rates) != len(goals):
            raise ValueError(f"{len(rates)} sample matrices for {len(goals)} volumes")
        nb = len(self.beam_names)
        for g, r in zip(goals, rates):
            if r.ndim != 2 or r.shape[1] != nb or r.shape[0] == 0:
                raise ValueError(f"volume {g.name!r}: sample matrix shape {r.shape}, expected (points > 0, {nb})")
        object.__setattr__(self, "goals", goals)
        object.__setattr__(self, "rates", rates)
        object.__setattr__(self, "beam_names", tuple(self.beam_names))

    @classmethod
    def from_doses(cls, doses, patient, goals: Sequence[VolumeGoal], *, max_points: int | None = None,
                   seed: int = 0) -> "AutoWeightProblem":
        """The problem of ``goals`` on a :class:`~ids_engine.planning.BeamDoses` (samples
        cached there: building it again with other limits does not run the engine)."""
        rates = []
        for g in goals:
            try:
                s = patient.structure(g.name)
            except KeyError as exc:
                raise ValueError(str(exc).strip('"')) from None
            rates.append(doses.samples(g.name, s.mask, max_points=max_points, seed=seed))
        return cls(tuple(goals), tuple(rates), tuple(b.name for b in doses.beams))

    def with_goals(self, goals: Sequence[VolumeGoal]) -> "AutoWeightProblem":
        """The same sample matrices with new limits, importances or penalties (volumes
        matched by name; no dose is computed)."""
        by_name = {g.name: r for g, r in zip(self.goals, self.rates)}
        missing = [g.name for g in goals if g.name not in by_name]
        if missing:
            raise ValueError(f"with_goals: no samples for {missing}; build the problem with these volumes")
        return AutoWeightProblem(tuple(goals), tuple(by_name[g.name] for g in goals), self.beam_names)

    def goal(self, name: str) -> VolumeGoal:
        for g in self.goals:
            if g.name == name:
                return g
        raise ValueError(f"no volume {name!r} in the problem; volumes: {', '.join(g.name for g in self.goals)}")

    @property
    def n_beams(self) -> int:
        return len(self.beam_names)

    def doses(self, mu) -> list[np.ndarray]:
        mu = np.asarray(mu, dtype=np.float64)
        return [r @ mu for r in self.rates]

    def target_dose_gy(self) -> float:
        return max(g.min_gy for g in self.goals if g.role == "target")

    def start_mu(self) -> np.ndarray:
        """Equal MU for every beam, scaled so that every target point reaches its minimum."""
        ratios = [g.min_gy / max(r.sum(axis=1).min(), 1e-30) for g, r in zip(self.goals, self.rates) if g.role == "target"]
        return np.full(self.n_beams, max(ratios))


@dataclass(frozen=True)
class Violation:
    """A limit not met: ``amount_gy`` beyond it (the largest over the volume's points)."""

    volume: str
    limit: str  # "minimum" or "maximum"
    limit_gy: float
    amount_gy: float
    points: int  # how many sample points violate it

    def __str__(self) -> str:
        side = "short of" if self.limit == "minimum" else "above"
        return (f"{self.volume} {self.limit} {self.limit_gy:g} Gy: {self.amount_gy:.3g} Gy {side} it "
                f"at worst ({self.points} points)")


class AutoWeightInfeasible(ValueError):
    """No MU meet every limit (simplex). ``violations`` lists the limits that must move, by
    the least total relaxation (each relative to the limit)."""

    def __init__(self, message: str, violations: Sequence[Violation]) -> None:
        super().__init__(message)
        self.violations = tuple(violations)


@dataclass(frozen=True)
class AutoWeightResult:
    """One solution: ``mu`` (exact, MU >= 0) per beam, its objective, the limits it leaves
    unmet on the sample points, and how it was found."""

    method: str
    mu: tuple[float, ...]
    objective: float
    violations: tuple[Violation, ...]
    iterations: int
    time_s: float
    message: str = ""
    parameters: dict = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return not self.violations


def violations(problem: AutoWeightProblem, mu, tol_gy: float = FEASIBILITY_TOL_GY) -> tuple[Violation, ...]:
    """The limits ``mu`` leaves unmet on the sample points (beyond ``tol_gy``)."""
    out = []
    for g, d in zip(problem.goals, problem.doses(mu)):
        if g.min_gy is not None:
            short = g.min_gy - d
            n = int(np.sum(short > tol_gy))
            if n:
                out.append(Violation(g.name, "minimum", g.min_gy, float(short.max()), n))
        if g.max_gy is not None:
            over = d - g.max_gy
            n = int(np.sum(over > tol_gy))
            if n:
                out.append(Violation(g.name, "maximum", g.max_gy, float(over.max()), n))
    return tuple(out)


# ----------------------------------------------------------------------------- objective (downhill, annealing)
def objective_terms(problem: AutoWeightProblem, mu) -> list[tuple[str, str, float]]:
    """The seed's penalty objective term by term: ``(volume, term, value)`` with terms
    "target (d - min)^2", "target below min" (penalty), "above max" (penalty x importance),
    "OAR d^2"; each already divided by the volume's number of points."""
    out = []
    for g, d in zip(problem.goals, problem.doses(mu)):
        n = d.size
        if g.role == "target":
            out.append((g.name, "target (d - min)^2", g.importance * float(np.sum((d - g.min_gy) ** 2)) / n))
            out.append((g.name, "target below min", g.penalty * float(np.sum(d < g.min_gy)) / n))
        if g.max_gy is not None:
            out.append((g.name, "above max", g.penalty * g.importance * float(np.sum(d > g.max_gy)) / n))
        if g.role == "oar":
            out.append((g.name, "OAR d^2", g.importance * float(np.sum(d * d)) / n))
    return out


def _objective_fn(problem: AutoWeightProblem) -> Callable[[np.ndarray], float]:
    """A fast closure of :func:`objective` (one stacked product per evaluation)."""
    A = np.concatenate(problem.rates)
    bounds = np.cumsum([0] + [r.shape[0] for r in problem.rates])
    parts = []
    for k, g in enumerate(problem.goals):
        s = slice(bounds[k], bounds[k + 1])
        parts.append((s, g, float(bounds[k + 1] - bounds[k])))

    def f(mu: np.ndarray) -> float:
        d = A @ mu
        total = 0.0
        for s, g, n in parts:
            dv = d[s]
            if g.role == "target":
                diff = dv - g.min_gy
                total += (g.importance * float(diff @ diff) + g.penalty * float(np.count_nonzero(diff < 0))) / n
            if g.max_gy is not None:
                total += g.penalty * g.importance * float(np.count_nonzero(dv > g.max_gy)) / n
            if g.role == "oar":
                total += g.importance * float(dv @ dv) / n
        return total

    return f


def objective(problem: AutoWeightProblem, mu) -> float:
    """The downhill search's and annealing's objective (sum of :func:`objective_terms`)."""
    return float(sum(v for _, _, v in objective_terms(problem, mu)))


def _result(method: str, problem, mu, it: int, t0: float, message: str = "", **params) -> AutoWeightResult:
    mu = np.maximum(np.asarray(mu, dtype=np.float64), 0.0)
    return AutoWeightResult(method, tuple(float(v) for v in mu), objective(problem, mu), violations(problem, mu), int(it),
                            time.perf_counter() - t0, message, params)


# ----------------------------------------------------------------------------- simplex
def _lp_rows(problem: AutoWeightProblem):
    """Inequality rows ``G mu <= h`` of every limit, with the (goal index, limit) of each row."""
    G, h, tags = [], [], []
    for k, (g, r) in enumerate(zip(problem.goals, problem.rates)):
        if g.min_gy is not None:
            G.append(-r)
            h.append(np.full(r.shape[0], -g.min_gy))
            tags.append((k, "minimum", r.shape[0]))
        if g.max_gy is not None:
            G.append(r)
            h.append(np.full(r.shape[0], g.max_gy))
            tags.append((k, "maximum", r.shape[0]))
    return G, h, tags


def solve_simplex(problem: AutoWeightProblem) -> AutoWeightResult:
    """Linear programming (HiGHS): minimise the importance-weighted, point-normalised sum of
    dose in targets and OARs with the targets' minima and every maximum as hard limits.

    Raises :class:`AutoWeightInfeasible` when no MU meet every limit, naming them."""
    from scipy.optimize import linprog

    t0 = time.perf_counter()
    c = np.zeros(problem.n_beams)
    for g, r in zip(problem.goals, problem.rates):
        c += g.importance / r.shape[0] * r.sum(axis=0)
    G, h, tags = _lp_rows(problem)
    res = linprog(c, A_ub=np.concatenate(G), b_ub=np.concatenate(h), bounds=[(0, None)] * problem.n_beams,
                  method="highs")
    if res.status == 2:
        raise _infeasible(problem, G, h, tags)
    if res.status != 0:
        raise RuntimeError(f"simplex: linprog stopped without a solution (status {res.status}: {res.message})")
    return _result("simplex", problem, res.x, int(getattr(res, "nit", 0) or 0), t0, "optimal")


def _infeasible(problem: AutoWeightProblem, G, h, tags) -> AutoWeightInfeasible:
    """The least relaxation of the limits that makes the problem feasible: one slack per limit
    (in Gy, weighted by 1/limit so that limits of different size compare), minimised by LP."""
    from scipy.optimize import linprog

    nb, ns = problem.n_beams, len(tags)
    rows, rhs = [], []
    scale = problem.target_dose_gy()
    for j, (Gi, hi) in enumerate(zip(G, h)):
        s = np.zeros((Gi.shape[0], ns))
        s[:, j] = -1.0
        rows.append(np.hstack([Gi, s]))
        rhs.append(hi)
    cost = np.concatenate([np.zeros(nb), np.ones(ns) / scale])
    res = linprog(cost, A_ub=np.concatenate(rows), b_ub=np.concatenate(rhs), bounds=[(0, None)] * (nb + ns),
                  method="highs")
    found = []
    if res.status == 0:
        mu = res.x[:nb]
        for (k, limit, _), slack in zip(tags, res.x[nb:]):
            if slack > 1e-6 * max(scale, 1.0):
                g = problem.goals[k]
                d = problem.rates[k] @ mu
                lim = g.min_gy if limit == "minimum" else g.max_gy
                n = int(np.sum((lim - d if limit == "minimum" else d - lim) > 1e-6 * max(scale, 1.0)))
                found.append(Violation(g.name, limit, lim, float(slack), n))
    if found:
        what = "; ".join(f"{v.volume} {v.limit} {v.limit_gy:g} Gy (needs {'lowering' if v.limit == 'minimum' else 'raising'}"
                         f" by {v.amount_gy:.3g} Gy)" for v in found)
    else:
        what = "the limits contradict each other"
    return AutoWeightInfeasible(f"simplex: no feasible solution; the least change of the limits that makes one: {what}. "
                                "Raise the upper limit (or lower the minimum) and solve again.", found)


# ----------------------------------------------------------------------------- Cimmino
def solve_cimmino(problem: AutoWeightProblem, *, stop_distance_mu: float = 0.01, max_iterations: int = 5000,
                  relaxation: float = 1.0, start_mu=None, progress=None, cancel=None) -> AutoWeightResult:
    """Cimmino's simultaneous projections (see the module docstring).

    Parameters
    ----------
    stop_distance_mu : stop when the MU move less than this divided by the total weight
        (Euclidean distance over the beams, MU).
    max_iterations : iteration limit.
    relaxation : the step's relaxation parameter, in (0, 2) (1: the weighted mean of the
        projections).
    start_mu : starting MU (default 0 for every beam).
    progress, cancel : optional ``progress(done, total, label)`` and ``cancel() -> bool``
        callables (checked every 100 iterations; a cancelled run returns where it got to).
    """
    if not 0 < relaxation < 2:
        raise ValueError(f"cimmino: relaxation must lie in (0, 2), got {relaxation!r}")
    if not stop_distance_mu > 0 or int(max_iterations) < 1:
        raise ValueError("cimmino: stop_distance_mu must be positive and max_iterations >= 1")
    t0 = time.perf_counter()
    rows, rhs, w = [], [], []
    for g, r in zip(problem.goals, problem.rates):
        # An OAR without an upper limit is not considered (seed).
        wi = g.importance / r.shape[0]
        if g.min_gy is not None:
            rows.append(-r)
            rhs.append(np.full(r.shape[0], -g.min_gy))
            w.append(np.full(r.shape[0], wi))
        if g.max_gy is not None:
            rows.append(r)
            rhs.append(np.full(r.shape[0], g.max_gy))
            w.append(np.full(r.shape[0], wi))
    A, b, w = np.concatenate(rows), np.concatenate(rhs), np.concatenate(w)
    norm2 = np.einsum("ij,ij->i", A, A)
    keep = norm2 > 0  # a point no beam reaches cannot be projected on
    A, b, w, norm2 = A[keep], b[keep], w[keep], norm2[keep]
    total_weight = float(w.sum())
    if total_weight <= 0:
        raise ValueError("cimmino: every volume has importance 0")
    threshold = stop_distance_mu / total_weight
    x = np.zeros(problem.n_beams) if start_mu is None else np.maximum(np.asarray(start_mu, dtype=np.float64), 0.0)
    coef = w / norm2 / total_weight
    it, message = 0, f"iteration limit {max_iterations} reached"
    for it in range(1, int(max_iterations) + 1):
        excess = A @ x - b
        step = -relaxation * ((np.maximum(excess, 0.0) * coef) @ A)
        new = np.maximum(x + step, 0.0)
        moved = float(np.linalg.norm(new - x))
        x = new
        if moved < threshold:
            message = f"converged: moved {moved:.3g} MU < {stop_distance_mu:g} MU / total weight {total_weight:g}"
            break
        if it % 100 == 0:
            if progress:
                progress(it, int(max_iterations), "cimmino")
            if cancel and cancel():
                message = f"cancelled after {it} iterations"
                break
    return _result("cimmino", problem, x, it, t0, message, stop_distance_mu=stop_distance_mu,
                   max_iterations=int(max_iterations), relaxation=relaxation, total_weight=total_weight)


# ----------------------------------------------------------------------------- downhill search
def solve_downhill(problem: AutoWeightProblem, *, start_mu=None, max_iterations: int = 4000,
                   tolerance_mu: float = 0.05, progress=None, cancel=None) -> AutoWeightResult:
    """Downhill search (Nelder-Mead downhill simplex, MU >= 0) on :func:`objective`.

    Parameters
    ----------
    start_mu : starting MU (default :meth:`AutoWeightProblem.start_mu`: equal MU that cover
        the targets); the first simplex steps by 20 % of it along each beam.
    max_iterations : iteration limit.
    tolerance_mu : stop when the simplex is smaller than this (MU) and the objective flat.
    progress, cancel : optional ``progress(done, total, label)`` and ``cancel() -> bool``
        callables (every iteration; a cancelled run returns its best point so far).
    """
    from scipy.optimize import minimize

    t0 = time.perf_counter()
    x0 = problem.start_mu() if start_mu is None else np.maximum(np.asarray(start_mu, dtype=np.float64), 0.0)
    f = _objective_fn(problem)
    nb = problem.n_beams
    step = np.maximum(0.2 * x0, 1.0)
    simplex = np.vstack([x0] + [x0 + step[i] * np.eye(nb)[i] for i in range(nb)])
    count = [0]

    def callback(intermediate_result):
        count[0] += 1
        if progress:
            progress(count[0], int(max_iterations), "downhill")
        if cancel and cancel():
            count.append("cancelled")
            raise StopIteration

    res = minimize(f, x0, method="Nelder-Mead", bounds=[(0, None)] * nb, callback=callback,
                   options={"initial_simplex": simplex, "maxiter": int(max_iterations), "xatol": tolerance_mu,
                            "fatol": 1e-12, "adaptive": nb > 4})
    message = f"cancelled after {res.nit} iterations" if "cancelled" in count else str(res.message)
    return _result("downhill", problem, res.x, int(res.nit), t0, message, max_iterations=int(max_iterations),
                   tolerance_mu=tolerance_mu)


# ----------------------------------------------------------------------------- simulated annealing
def annealing_steps(sd0_mu: float, increment: float = 0.01, min_sd_mu: float = 0.5) -> int:
    """How many cooling steps run: those with ``sd0 * exp(-k * increment) >= min_sd``, k = 0, 1, ..."""
    if sd0_mu < min_sd_mu:
        return 0
    return int(np.floor(np.log(sd0_mu / min_sd_mu) / increment + 1e-12)) + 1


def solve_annealing(problem: AutoWeightProblem, *, start_mu=None, sd0_mu: float | None = None,
                    iterations_per_step: int = 10, increment: float = 0.01, min_sd_mu: float = 0.5,
                    seed: int = 0, progress=None, cancel=None) -> AutoWeightResult:
    """Simulated annealing with the seed's cooling schedule (see the module docstring).

    Parameters
    ----------
    start_mu : starting MU (default :meth:`AutoWeightProblem.start_mu`).
    sd0_mu : initial standard deviation of the random MU (default half the mean start MU).
    iterations_per_step : iterations between two decreases of the standard deviation (10).
    increment : added to the sum after each step; ``sd_fraction = exp(-sum)`` (0.01).
    min_sd_mu : stop when the standard deviation falls below this (0.5 MU).
    seed : the random generator's seed (the result is reproducible).
    progress, cancel : optional ``progress(done, total, label)`` (cooling steps) and
        ``cancel() -> bool`` callables, called every step; a cancelled run returns the best seen.
    """
    if int(iterations_per_step) < 1 or not increment > 0 or not min_sd_mu > 0:
        raise ValueError("annealing: iterations_per_step >= 1, increment > 0 and min_sd_mu > 0 are needed")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    f = _objective_fn(problem)
    x = problem.start_mu() if start_mu is None else np.maximum(np.asarray(start_mu, dtype=np.float64), 0.0)
    sd0 = float(sd0_mu) if sd0_mu is not None else 0.5 * float(np.mean(x))
    cost = f(x)
    best_x, best_cost = x.copy(), cost
    total, sd_fraction, variance = 0.0, 1.0, 0.0
    it = 0
    accepted_up = 0
    n_steps, step = annealing_steps(sd0, increment, min_sd_mu), 0
    stopped = ""
    while sd0 * sd_fraction >= min_sd_mu:
        if cancel and cancel():
            stopped = "cancelled; "
            break
        sd = sd0 * sd_fraction
        costs = np.empty(int(iterations_per_step))
        for k in range(int(iterations_per_step)):
            cand = np.maximum(x + rng.normal(0.0, sd, size=x.size), 0.0)
            c = f(cand)
            costs[k] = c
            it += 1
            if c <= cost:
                x, cost = cand, c
            elif rng.random() < np.exp(-0.5 * variance) * sd_fraction:
                x, cost = cand, c
                accepted_up += 1
            if cost < best_cost:
                best_x, best_cost = x.copy(), cost
        variance = float(np.var(costs))
        total += increment
        sd_fraction = float(np.exp(-total))
        step += 1
        if progress:
            progress(step, n_steps, "annealing")
    return _result("annealing", problem, best_x, it, t0,
                   f"{stopped or 'standard deviation below ' + format(min_sd_mu, 'g') + ' MU '}after {it} iterations "
                   f"({accepted_up} increases accepted)",
                   sd0_mu=sd0, iterations_per_step=int(iterations_per_step), increment=increment, min_sd_mu=min_sd_mu,
                   seed=seed)


AUTO_WEIGHT_METHODS: dict[str, Callable[..., AutoWeightResult]] = {
    "simplex": solve_simplex,
    "cimmino": solve_cimmino,
    "downhill": solve_downhill,
    "annealing": solve_annealing,
}


def auto_weight(problem: AutoWeightProblem, method: str = "simplex", **params) -> AutoWeightResult:
    """Solve ``problem`` with one of :data:`AUTO_WEIGHT_METHODS` (parameters as that method's)."""
    try:
        fn = AUTO_WEIGHT_METHODS[method]
    except KeyError:
        raise ValueError(f"auto weight: unknown method {method!r}; methods: {', '.join(AUTO_WEIGHT_METHODS)}") from None
    return fn(problem, **params)


# ----------------------------------------------------------------------------- binary search on an upper limit
@dataclass(frozen=True)
class UpperLimitSearch:
    """The lowest feasible upper limit found for a volume, its solution, and every trial
    ``(limit_gy, feasible)`` in order."""

    volume: str
    limit_gy: float
    result: AutoWeightResult
    trials: tuple[tuple[float, bool], ...]


def search_upper_limit(problem: AutoWeightProblem, volume: str, *, start_gy: float | None = None,
                       tolerance_gy: float = 0.01, max_solves: int = 20, method: str = "simplex",
                       **params) -> UpperLimitSearch:
    """The seed's binary search on an upper limit (e.g. on the body outside the target plus a
    2-4 cm margin, so that the simplex spreads the dose over all beams).

    Start with ``start_gy`` (default the target dose): it must be feasible. Then halve it;
    when a limit is infeasible take the dose midway between it and the last feasible one;
    stop when the feasible and infeasible limits are within ``tolerance_gy``, or after
    ``max_solves`` solutions. Returns the lowest feasible limit and its solution.
    """
    problem.goal(volume)  # the volume must be in the problem
    limit = float(start_gy) if start_gy is not None else problem.target_dose_gy()
    trials: list[tuple[float, bool]] = []

    def solve(lim: float):
        goals = [replace(x, max_gy=lim) if x.name == volume else x for x in problem.goals]
        try:
            r = auto_weight(problem.with_goals(goals), method, **params)
        except AutoWeightInfeasible:
            r = None
        ok = r is not None and r.feasible
        trials.append((lim, ok))
        return r if ok else None

    best = solve(limit)
    if best is None:
        raise AutoWeightInfeasible(f"search_upper_limit: {volume} maximum {limit:g} Gy (the start) is not feasible; "
                                   "start from a higher limit", ())
    hi, lo = limit, None  # lowest feasible, highest infeasible
    while len(trials) < max_solves:
        nxt = hi / 2.0 if lo is None else 0.5 * (lo + hi)
        if (lo is not None and hi - lo <= tolerance_gy) or (lo is None and hi <= tolerance_gy):
            break
        r = solve(nxt)
        if r is not None:
            hi, best = nxt, r
        else:
            lo = nxt
    return UpperLimitSearch(volume, hi, best, tuple(trials))
