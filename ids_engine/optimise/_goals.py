"""Planning goals per structure: what each one costs, its gradient, and whether it is met.

A goal is a frozen dataclass naming a structure (``structure``), its parameters (doses in
Gy, volumes in percent of the structure), an ``importance`` (the weight of an objective)
and ``constraint`` (``True``: must be met; ``False``: an objective, met as far as the
importances allow). All functions here work on the dose at the structure's voxels,
``dose_gy`` of shape ``(n,)`` (any float dtype, NumPy or CuPy: the namespace comes from
the array), and return values as Python floats.

Objectives are normalised by the number of voxels, as matRad's are (so importances and
matRad penalties are interchangeable): for ``MaxDose`` the value is
``importance / n * sum(max(d_i - dose_gy, 0)**2)``. DVH objectives follow Wu & Mohan
(Med. Phys. 27, 2000): only the voxels that make the DVH point fail are penalised, towards
the goal's dose.

Voxel weights (``voxel_weights``, optional, shape ``(n,)``, > 0): each voxel stands for
that many voxels of the structure, as the sampled rows of a large structure do
(:mod:`._rows`). Sums and means are then weighted (``n`` becomes ``sum(voxel_weights)``),
DVH volumes are weighted volumes; minima and maxima are over the voxels given. Without
weights every function computes exactly what it did before they existed.

Constraints are written as residuals ``g(d) <= 0`` (one per voxel for dose bounds, one per
structure for mean dose and EUD, one per voxel of the current active set for DVH bounds)
for the augmented Lagrangian in :mod:`._optimiser`.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import numpy as np

from ids_engine.backend import array_module

__all__ = [
    "GOAL_KINDS",
    "Goal",
    "GoalResult",
    "MaxDVH",
    "MaxDose",
    "MaxEUD",
    "MaxMeanDose",
    "MinDVH",
    "MinDose",
    "MinEUD",
    "MinMeanDose",
    "UniformDose",
    "evaluate_goals",
]

def _squared(importance: float, r, sign: float, voxel_weights):
    """``importance / n * sum(r**2)`` and its gradient ``sign * 2 importance / n * r``,
    weighted when ``voxel_weights`` is given (``n`` then the weights' sum)."""
    xp = array_module(r)
    if voxel_weights is None:
        n = r.shape[0]
        return importance * float(xp.sum(r * r)) / n, (2.0 * importance * sign / n) * r
    wr = voxel_weights * r
    total = float(xp.sum(voxel_weights))
    return importance * float(xp.sum(wr * r)) / total, (2.0 * importance * sign / total) * wr


def _mean(dose_gy, voxel_weights) -> float:
    xp = array_module(dose_gy)
    if voxel_weights is None:
        return float(xp.mean(dose_gy))
    return float(xp.sum(voxel_weights * dose_gy)) / float(xp.sum(voxel_weights))


def _mean_gradient(dose_gy, voxel_weights):
    """Gradient of the (weighted) mean with respect to ``dose_gy``."""
    xp = array_module(dose_gy)
    if voxel_weights is None:
        return xp.full_like(dose_gy, 1.0 / dose_gy.shape[0])
    return (voxel_weights / float(xp.sum(voxel_weights))).astype(dose_gy.dtype, copy=False)


# Doses below this are raised to it before a power with a < 1 (the EUD of a voxel at 0 Gy
# would otherwise have an infinite gradient).
_EUD_FLOOR_GY = 1e-3


def _check_number(owner: str, name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{owner}.{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{owner}.{name} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{owner}.{name} must be <= {hi:g}, got {value!r}")
    return v


@dataclass(frozen=True)
class Goal:
    """Base of all goals: a structure's name, an importance, objective or constraint.

    Parameters
    ----------
    structure : name of the structure the goal is about.
    importance : weight of the goal as an objective (> 0); constraints ignore it.
    constraint : ``True`` if the goal must be met (a hard constraint), ``False`` for an
        objective.
    name : a label for reports; empty gives one made from the kind and parameters.
    """

    structure: str
    _: KW_ONLY
    importance: float = 1.0
    constraint: bool = False
    name: str = ""

    kind: ClassVar[str] = ""
    can_be_constraint: ClassVar[bool] = True
    unit: ClassVar[str] = "Gy"

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if not isinstance(self.structure, str) or not self.structure.strip():
            raise ValueError(f"{cls}.structure must be a non-empty string, got {self.structure!r}")
        object.__setattr__(self, "importance", _check_number(cls, "importance", self.importance, lo=0.0,
                                                              lo_open=True))
        if not isinstance(self.constraint, (bool, np.bool_)):
            raise ValueError(f"{cls}.constraint must be true or false, got {self.constraint!r}")
        object.__setattr__(self, "constraint", bool(self.constraint))
        if self.constraint and not self.can_be_constraint:
            raise ValueError(f"{cls}.constraint: a {self.kind} goal can only be an objective "
                             f"(use min_dose / max_dose constraints for hard bounds)")
        if not isinstance(self.name, str):
            raise ValueError(f"{cls}.name must be a string, got {self.name!r}")
        self._validate(cls)

    def _validate(self, cls: str) -> None:  # pragma: no cover - overridden
        pass

    # ---------------------------------------------------------------- naming
    @property
    def label(self) -> str:
        """The goal as a planner would say it, e.g. ``"PTV: D95% >= 50 Gy (constraint)"``."""
        if self.name:
            return self.name
        role = "constraint" if self.constraint else f"objective, importance {self.importance:g}"
        return f"{self.structure}: {self._describe()} ({role})"

    def _describe(self) -> str:  # pragma: no cover - overridden
        return self.kind

    # ------------------------------------------------------------ objective
    def objective(self, dose_gy, voxel_weights=None) -> tuple[float, Any]:
        """Objective value (importance included) and its gradient with respect to ``dose_gy``.

        Parameters
        ----------
        dose_gy : array (n,), float, Gy: dose at the structure's voxels.
        voxel_weights : optional array (n,), > 0: how many of the structure's voxels each
            stands for (module docstring).

        Returns
        -------
        value : float.
        gradient : array (n,), same namespace and dtype as ``dose_gy``.
        """
        raise NotImplementedError  # pragma: no cover

    # ----------------------------------------------------------- constraint
    def active_set(self, dose_gy, voxel_weights=None):
        """Voxels a DVH constraint binds at this dose (boolean (n,)); ``None`` for other kinds."""
        return None

    def residual(self, dose_gy, active=None, voxel_weights=None):
        """Constraint residuals ``g(d)``, met where ``g <= 0`` (Gy).

        Voxel-wise kinds return shape (n,) (``-inf`` outside ``active`` for DVH bounds);
        mean dose and EUD return shape (1,).
        """
        raise NotImplementedError  # pragma: no cover

    def residual_vjp(self, dose_gy, weights, active=None, voxel_weights=None):
        """``J^T weights``: the gradient of ``sum(weights * g(d))`` with respect to ``dose_gy``."""
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------ evaluation
    def achieved(self, dose_gy, tolerance_gy: float = 0.0, voxel_weights=None) -> tuple[float, float, bool]:
        """What the dose achieves for this goal: (achieved, limit, met), in :attr:`unit`."""
        raise NotImplementedError  # pragma: no cover


# ---------------------------------------------------------------- dose bounds
@dataclass(frozen=True)
class _DoseLevel(Goal):
    dose_gy: float

    def _validate(self, cls: str) -> None:
        object.__setattr__(self, "dose_gy", _check_number(cls, "dose_gy", self.dose_gy, lo=0.0))


@dataclass(frozen=True)
class MinDose(_DoseLevel):
    """Every voxel at least ``dose_gy``.

    As an objective, the squared underdose ``importance / n * sum(max(dose_gy - d_i, 0)**2)``
    (matRad's SquaredUnderdosing); as a constraint, ``d_i >= dose_gy`` in every voxel.
    """

    kind: ClassVar[str] = "min_dose"

    def _describe(self) -> str:
        return f"min dose {self.dose_gy:g} Gy"

    def objective(self, dose_gy, voxel_weights=None):
        r = array_module(dose_gy).maximum(self.dose_gy - dose_gy, 0)
        return _squared(self.importance, r, -1.0, voxel_weights)

    def residual(self, dose_gy, active=None, voxel_weights=None):
        return self.dose_gy - dose_gy

    def residual_vjp(self, dose_gy, weights, active=None, voxel_weights=None):
        return -weights

    def achieved(self, dose_gy, tolerance_gy=0.0, voxel_weights=None):
        low = float(array_module(dose_gy).min(dose_gy))
        return low, self.dose_gy, low >= self.dose_gy - tolerance_gy


@dataclass(frozen=True)
class MaxDose(_DoseLevel):
    """Every voxel at most ``dose_gy``.

    As an objective, the squared overdose ``importance / n * sum(max(d_i - dose_gy, 0)**2)``
    (matRad's SquaredOverdosing); as a constraint, ``d_i <= dose_gy`` in every voxel.
    """

    kind: ClassVar[str] = "max_dose"

    def _describe(self) -> str:
        return f"max dose {self.dose_gy:g} Gy"

    def objective(self, dose_gy, voxel_weights=None):
        r = array_module(dose_gy).maximum(dose_gy - self.dose_gy, 0)
        return _squared(self.importance, r, 1.0, voxel_weights)

    def residual(self, dose_gy, active=None, voxel_weights=None):
        return dose_gy - self.dose_gy

    def residual_vjp(self, dose_gy, weights, active=None, voxel_weights=None):
        return weights

    def achieved(self, dose_gy, tolerance_gy=0.0, voxel_weights=None):
        high = float(array_module(dose_gy).max(dose_gy))
        return high, self.dose_gy, high <= self.dose_gy + tolerance_gy


@dataclass(frozen=True)
class UniformDose(_DoseLevel):
    """Every voxel at ``dose_gy``: the squared deviation ``importance / n * sum((d_i - dose_gy)**2)``.

    matRad's SquaredDeviation; an objective only. :meth:`achieved` gives the largest
    deviation in Gy (met when within the tolerance).
    """

    kind: ClassVar[str] = "uniform_dose"
    can_be_constraint: ClassVar[bool] = False

    def _describe(self) -> str:
        return f"uniform dose {self.dose_gy:g} Gy"

    def objective(self, dose_gy, voxel_weights=None):
        return _squared(self.importance, dose_gy - self.dose_gy, 1.0, voxel_weights)

    def achieved(self, dose_gy, tolerance_gy=0.0, voxel_weights=None):
        dev = float(array_module(dose_gy).max(abs(dose_gy - self.dose_gy)))
        return dev, 0.0, dev <= tolerance_gy


# ------------------------------------------------------------------ mean dose
@dataclass(frozen=True)
class MaxMeanDose(_DoseLevel):
    """Mean dose at most ``dose_gy``: objective ``importance * max(mean - dose_gy, 0)**2``."""

    kind: ClassVar[str] = "max_mean_dose"
    _sign: ClassVar[float] = 1.0

    def _describe(self) -> str:
        return f"mean dose <= {self.dose_gy:g} Gy"

    def _excess(self, dose_gy, voxel_weights=None) -> float:
        return self._sign * (_mean(dose_gy, voxel_weights) - self.dose_gy)

    def objective(self, dose_gy, voxel_weights=None):
        xp = array_module(dose_gy)
        r = max(self._excess(dose_gy, voxel_weights), 0.0)
        if voxel_weights is None:
            n = dose_gy.shape[0]
            return self.importance * r * r, xp.full_like(dose_gy, 2.0 * self.importance * r * self._sign / n)
        grad = (2.0 * self.importance * r * self._sign) * _mean_gradient(dose_gy, voxel_weights)
        return self.importance * r * r, grad

    def residual(self, dose_gy, active=None, voxel_weights=None):
        return array_module(dose_gy).asarray([self._excess(dose_gy, voxel_weights)], dtype=dose_gy.dtype)

    def residual_vjp(self, dose_gy, weights, active=None, voxel_weights=None):
        xp = array_module(dose_gy)
        if voxel_weights is None:
            return xp.full_like(dose_gy, float(weights[0]) * self._sign / dose_gy.shape[0])
        return (float(weights[0]) * self._sign) * _mean_gradient(dose_gy, voxel_weights)

    def achieved(self, dose_gy, tolerance_gy=0.0, voxel_weights=None):
        mean = _mean(dose_gy, voxel_weights)
        return mean, self.dose_gy, self._excess(dose_gy, voxel_weights) <= tolerance_gy


@dataclass(frozen=True)
class MinMeanDose(MaxMeanDose):
    """Mean dose at least ``dose_gy``: objective ``importance * max(dose_gy - mean, 0)**2``."""

    kind: ClassVar[str] = "min_mean_dose"
    _sign: ClassVar[float] = -1.0

    def _describe(self) -> str:
        return f"mean dose >= {self.dose_gy:g} Gy"


# ------------------------------------------------------------------------ EUD
def _eud_and_gradient(dose_gy, a: float, voxel_weights=None):
    """Generalised EUD ``mean(d**a)**(1/a)`` (Gy) and its gradient (n,), scaled against
    overflow; the mean weighted by ``voxel_weights`` when given."""
    xp = array_module(dose_gy)
    d = xp.maximum(dose_gy, _EUD_FLOOR_GY if a < 1 else 0.0)
    scale = float(xp.max(d))
    if scale <= 0.0:
        return 0.0, _mean_gradient(dose_gy, voxel_weights)
    x = d / scale
    xa = x ** a
    m = _mean(xa, voxel_weights)
    eud = scale * m ** (1.0 / a)
    # E is homogeneous of degree 1, so differentiating with the scale held fixed is exact.
    if voxel_weights is None:
        grad = (m ** (1.0 / a - 1.0) / dose_gy.shape[0]) * x ** (a - 1.0)
    else:
        grad = (m ** (1.0 / a - 1.0)) * _mean_gradient(dose_gy, voxel_weights) * x ** (a - 1.0)
    return eud, grad


@dataclass(frozen=True)
class MaxEUD(Goal):
    """Generalised EUD ``(mean(d_i**a))**(1/a)`` at most ``eud_gy``.

    Objective ``importance * max(EUD - eud_gy, 0)**2``. ``a >= 1`` for organs at risk
    (1: mean dose, large: towards the maximum); a constraint with ``a >= 1`` is convex.
    """

    eud_gy: float
    a: float

    kind: ClassVar[str] = "max_eud"
    _sign: ClassVar[float] = 1.0

    def _validate(self, cls: str) -> None:
        object.__setattr__(self, "eud_gy", _check_number(cls, "eud_gy", self.eud_gy, lo=0.0))
        a = _check_number(cls, "a", self.a)
        if a == 0.0:
            raise ValueError(f"{cls}.a must not be 0 (the EUD parameter is a power)")
        object.__setattr__(self, "a", a)

    def _describe(self) -> str:
        op = "<=" if self._sign > 0 else ">="
        return f"EUD(a={self.a:g}) {op} {self.eud_gy:g} Gy"

    def objective(self, dose_gy, voxel_weights=None):
        eud, grad = _eud_and_gradient(dose_gy, self.a, voxel_weights)
        r = max(self._sign * (eud - self.eud_gy), 0.0)
        return self.importance * r * r, (2.0 * self.importance * r * self._sign) * grad

    def residual(self, dose_gy, active=None, voxel_weights=None):
        eud, _ = _eud_and_gradient(dose_gy, self.a, voxel_weights)
        return array_module(dose_gy).asarray([self._sign * (eud - self.eud_gy)], dtype=dose_gy.dtype)

    def residual_vjp(self, dose_gy, weights, active=None, voxel_weights=None):
        _, grad = _eud_and_gradient(dose_gy, self.a, voxel_weights)
        return (float(weights[0]) * self._sign) * grad

    def achieved(self, dose_gy, tolerance_gy=0.0, voxel_weights=None):
        eud, _ = _eud_and_gradient(dose_gy, self.a, voxel_weights)
        return eud, self.eud_gy, self._sign * (eud - self.eud_gy) <= tolerance_gy


@dataclass(frozen=True)
class MinEUD(MaxEUD):
    """Generalised EUD at least ``eud_gy`` (targets: ``a < 1``, e.g. -10).

    Objective ``importance * max(eud_gy - EUD, 0)**2``; a constraint with ``a <= 1`` is convex.
    """

    kind: ClassVar[str] = "min_eud"
    _sign: ClassVar[float] = -1.0


# ------------------------------------------------------------------------ DVH
@dataclass(frozen=True)
class MaxDVH(Goal):
    """At most ``volume_pct`` of the structure above ``dose_gy`` (``V20Gy <= 30 %``; ``D10 <= 55 Gy``).

    Objective (Wu & Mohan): with ``k = floor(volume_pct / 100 * n)`` voxels allowed above
    ``dose_gy``, the voxels above ``dose_gy`` that are not among the ``k`` hottest cost
    ``importance / n * sum((d_i - dose_gy)**2)``. Constraint: those voxels (the active
    set, chosen from the dose at the start of each optimiser round) at most ``dose_gy``.
    Met when at most ``volume_pct`` of the voxels exceed ``dose_gy`` plus the tolerance.
    """

    dose_gy: float
    volume_pct: float

    kind: ClassVar[str] = "max_dvh"
    unit: ClassVar[str] = "%"
    _sign: ClassVar[float] = 1.0

    def _validate(self, cls: str) -> None:
        object.__setattr__(self, "dose_gy", _check_number(cls, "dose_gy", self.dose_gy, lo=0.0))
        object.__setattr__(self, "volume_pct", _check_number(cls, "volume_pct", self.volume_pct, lo=0.0, hi=100.0))

    def _describe(self) -> str:
        if self._sign > 0:
            return f"V{self.dose_gy:g}Gy <= {self.volume_pct:g} % (D{self.volume_pct:g}% <= {self.dose_gy:g} Gy)"
        return f"D{self.volume_pct:g}% >= {self.dose_gy:g} Gy (V{self.dose_gy:g}Gy >= {self.volume_pct:g} %)"

    def _count(self, n: int) -> int:
        # Voxels allowed above the dose (max) or required at it (min), whole voxels.
        frac = self.volume_pct / 100.0 * n
        return int(math.floor(frac + 1e-9)) if self._sign > 0 else int(math.ceil(frac - 1e-9))

    def active_set(self, dose_gy, voxel_weights=None):
        """Voxels that must satisfy the bound: all but the k hottest (max), the k hottest (min).

        With ``voxel_weights``, volumes are weighted: the hottest voxels whose weights add up
        to at most ``volume_pct`` of the total (max), or the fewest hottest that reach it (min).
        """
        xp = array_module(dose_gy)
        n = dose_gy.shape[0]
        hottest = xp.zeros(n, dtype=bool)
        if voxel_weights is None:
            k = self._count(n)
            if k > 0:
                hottest[xp.argsort(-dose_gy)[:k]] = True
        else:
            order = xp.argsort(-dose_gy)
            w = voxel_weights[order]
            upto = xp.cumsum(w)  # weight of the voxels at least as hot, inclusive
            total = float(upto[-1])
            vol = self.volume_pct / 100.0 * total
            if self._sign > 0:
                hottest[order] = upto <= vol + 1e-9 * total
            else:
                hottest[order] = (upto - w) < vol - 1e-9 * total
        return ~hottest if self._sign > 0 else hottest

    def _violating(self, dose_gy, voxel_weights=None):
        xp = array_module(dose_gy)
        r = self._sign * (dose_gy - self.dose_gy)
        return xp.where(self.active_set(dose_gy, voxel_weights) & (r > 0), r, 0)

    def objective(self, dose_gy, voxel_weights=None):
        return _squared(self.importance, self._violating(dose_gy, voxel_weights), self._sign, voxel_weights)

    def residual(self, dose_gy, active=None, voxel_weights=None):
        xp = array_module(dose_gy)
        active = self.active_set(dose_gy, voxel_weights) if active is None else active
        return xp.where(active, self._sign * (dose_gy - self.dose_gy), -xp.inf)

    def residual_vjp(self, dose_gy, weights, active=None, voxel_weights=None):
        xp = array_module(dose_gy)
        active = self.active_set(dose_gy, voxel_weights) if active is None else active
        return xp.where(active, self._sign * weights, 0)

    def achieved(self, dose_gy, tolerance_gy=0.0, voxel_weights=None):
        """Volume (%) above ``dose_gy + tolerance`` (max) or at least ``dose_gy - tolerance`` (min)
        (weighted volume with ``voxel_weights``)."""
        xp = array_module(dose_gy)
        if self._sign > 0:
            hit = dose_gy > self.dose_gy + tolerance_gy
        else:
            hit = dose_gy >= self.dose_gy - tolerance_gy
        if voxel_weights is None:
            pct = 100.0 * float(xp.mean(hit))
        else:
            pct = 100.0 * float(xp.sum(xp.where(hit, voxel_weights, 0))) / float(xp.sum(voxel_weights))
        return pct, self.volume_pct, self._count_ok(pct)

    def _count_ok(self, pct: float) -> bool:
        # Compared in whole voxels' worth of volume, so round-off in the percentages cannot flip it.
        return self._sign * (pct - self.volume_pct) <= 1e-9 * 100.0


@dataclass(frozen=True)
class MinDVH(MaxDVH):
    """At least ``volume_pct`` of the structure at ``dose_gy`` or more (``D95 >= 50 Gy``).

    Objective (Wu & Mohan): of the ``k = ceil(volume_pct / 100 * n)`` hottest voxels, those
    below ``dose_gy`` cost ``importance / n * sum((dose_gy - d_i)**2)``. Constraint: those
    ``k`` voxels (the active set of each round) at least ``dose_gy``.
    """

    kind: ClassVar[str] = "min_dvh"
    _sign: ClassVar[float] = -1.0


GOAL_KINDS: dict[str, type[Goal]] = {
    cls.kind: cls
    for cls in (MinDose, MaxDose, UniformDose, MinMeanDose, MaxMeanDose, MinEUD, MaxEUD, MinDVH, MaxDVH)
}


# ------------------------------------------------------------------ evaluation
@dataclass(frozen=True)
class GoalResult:
    """How a dose does on one goal.

    Attributes
    ----------
    goal : the goal.
    value : objective value (importance included) for objectives; for constraints the
        amount by which it is missed (0 when met), in ``unit``.
    achieved : what the dose achieves: min / max / mean dose or EUD in Gy, the largest
        deviation for ``UniformDose``, the volume in % for DVH goals.
    limit : the goal's level in the same unit.
    met : whether the goal is met (within the tolerance).
    unit : ``"Gy"`` or ``"%"``.
    """

    goal: Goal
    value: float
    achieved: float
    limit: float
    met: bool
    unit: str

    @property
    def shortfall(self) -> float:
        """By how much the goal is missed (0 when met), in ``unit``."""
        if self.met:
            return 0.0
        return abs(self.achieved - self.limit)

    def __str__(self) -> str:
        state = "met" if self.met else f"missed by {self.shortfall:.4g} {self.unit}"
        return f"{self.goal.label}: achieved {self.achieved:.4g} {self.unit} ({state})"


def evaluate_goals(dose_gy, goals, structure_voxels, *, tolerance_gy: float = 0.01,
                   voxel_weights=None) -> tuple[GoalResult, ...]:
    """Evaluate goals on a dose.

    Parameters
    ----------
    dose_gy : array (n_voxels,), float, Gy: dose at the influence matrix's voxels.
    goals : sequence of :class:`Goal`.
    structure_voxels : mapping from structure name to int array of row indices into ``dose_gy``.
    tolerance_gy : dose tolerance for "met" (Gy).
    voxel_weights : optional mapping from structure name to weights (n,) aligned with
        ``structure_voxels[name]`` (sampled rows; module docstring); structures not in it
        are unweighted.

    Returns
    -------
    One :class:`GoalResult` per goal, in order.
    """
    out = []
    for goal in goals:
        d = dose_gy[structure_voxels[goal.structure]]
        vw = None if voxel_weights is None else voxel_weights.get(goal.structure)
        achieved, limit, met = goal.achieved(d, tolerance_gy, vw)
        if goal.constraint:
            value = 0.0 if met else abs(achieved - limit)
        else:
            value = goal.objective(d, vw)[0]
        out.append(GoalResult(goal, float(value), float(achieved), float(limit), bool(met), goal.unit))
    return tuple(out)
