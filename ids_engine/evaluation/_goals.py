"""Planning goals (``PTV D95 >= 50 Gy``) and their pass/fail checks."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ._metrics import Metric, StructureDose, parse_metric

__all__ = ["Goal", "GoalResult", "check_goals", "parse_goal", "tg119_goals"]

COMPARATORS = ("<=", ">=", "<", ">")
_DOSE_UNITS = ("Gy", "%")  # % of the prescription
_VOLUME_UNITS = ("%", "cc")  # % of the structure


@dataclass(frozen=True)
class Goal:
    """One planning goal: ``structure metric comparator value unit``.

    Parameters
    ----------
    structure : the structure's name.
    metric : a metric expression (see :func:`parse_metric`), e.g. ``"D95"``, ``"V20Gy"``.
    comparator : ``"<="``, ``">="``, ``"<"`` or ``">"``.
    value : the limit.
    unit : for a dose metric ``"Gy"`` or ``"%"`` (of the prescription); for a volume
        metric ``"%"`` (of the structure) or ``"cc"``.
    label : an optional note (e.g. ``"harder"``), shown beside the goal.
    """

    structure: str
    metric: str
    comparator: str
    value: float
    unit: str = "Gy"
    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.structure, str) or not self.structure.strip():
            raise ValueError(f"Goal.structure must be a non-empty string, got {self.structure!r}")
        try:
            parsed = parse_metric(self.metric)
        except ValueError as exc:
            raise ValueError(f"Goal.metric: {exc}") from None
        if self.comparator not in COMPARATORS:
            raise ValueError(f"Goal.comparator {self.comparator!r} is not one of {', '.join(COMPARATORS)}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise ValueError(f"Goal.value must be a number, got {self.value!r}") from None
        if not np.isfinite(value):
            raise ValueError(f"Goal.value must be finite, got {self.value!r}")
        units = _DOSE_UNITS if parsed.is_dose else _VOLUME_UNITS
        unit = {"gy": "Gy", "%": "%", "cc": "cc"}.get(str(self.unit).strip().lower(), self.unit)
        if unit not in units:
            kind = "dose" if parsed.is_dose else "volume"
            raise ValueError(f"Goal.unit {self.unit!r} does not fit the {kind} metric {self.metric!r}: "
                             f"use {' or '.join(units)}")
        object.__setattr__(self, "structure", self.structure.strip())
        object.__setattr__(self, "metric", parsed.expression)
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "unit", unit)

    @property
    def parsed_metric(self) -> Metric:
        return parse_metric(self.metric)

    @property
    def needs_prescription(self) -> bool:
        m = self.parsed_metric
        return m.needs_prescription or (m.is_dose and self.unit == "%")

    def __str__(self) -> str:
        text = f"{self.structure} {self.metric} {self.comparator} {self.value:g} {self.unit}"
        return f"{text} ({self.label})" if self.label else text

    def achieved(self, sd: StructureDose, *, prescription_gy: float | None = None) -> float:
        """The metric's value in this goal's unit."""
        m = self.parsed_metric
        if self.needs_prescription and not (prescription_gy and prescription_gy > 0):
            raise ValueError(f"goal {str(self)!r} is relative to the prescription: give prescription_gy")
        if m.is_dose:
            v = m.evaluate(sd, prescription_gy=prescription_gy)
            return 100.0 * v / prescription_gy if self.unit == "%" else v
        return m.evaluate(sd, prescription_gy=prescription_gy, volume_unit=self.unit)

    def passes(self, achieved: float) -> bool:
        c = self.comparator
        return bool({"<=": achieved <= self.value, ">=": achieved >= self.value,
                     "<": achieved < self.value, ">": achieved > self.value}[c])


_GOAL_RE = re.compile(
    r"^\s*(?P<structure>.+?)\s+(?P<metric>[^\s<>=]+)\s*(?P<comparator><=|>=|=<|=>|<|>|=)\s*"
    r"(?P<value>\S+?)\s*(?P<unit>Gy|%|cc)?\s*(?:\((?P<label>[^)]*)\))?\s*$",
    re.IGNORECASE,
)


def parse_goal(text: str) -> Goal:
    """A goal from text: ``"PTV D95 >= 50 Gy"``, ``"Lung V20Gy <= 30 %"``, ``"Core D10 <= 10 Gy (harder)"``.

    The structure is everything before the metric (names may hold spaces); the unit
    defaults to Gy for a dose metric and % for a volume metric; a trailing ``(...)`` is the
    label. Errors name the field that is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"goal must be text such as 'PTV D95 >= 50 Gy', got {text!r}")
    m = _GOAL_RE.match(text)
    if not m:
        what = "structure or metric missing" if re.search(r"[<>=]", text) else "comparator missing"
        raise ValueError(f"goal {text!r} is not 'STRUCTURE METRIC COMPARATOR VALUE [UNIT]' "
                         f"(e.g. 'PTV D95 >= 50 Gy'): {what}")
    comparator = m["comparator"]
    if comparator in ("=<", "=>"):
        comparator = comparator[::-1]
    if comparator == "=":
        raise ValueError(f"goal {text!r}: comparator '=' is not one of {', '.join(COMPARATORS)}")
    try:
        value = float(m["value"])
    except ValueError:
        raise ValueError(f"goal {text!r}: value {m['value']!r} is not a number") from None
    try:
        metric = parse_metric(m["metric"])
    except ValueError as exc:
        raise ValueError(f"goal {text!r}: metric: {exc}") from None
    unit = m["unit"] or ("Gy" if metric.is_dose else "%")
    try:
        return Goal(m["structure"], m["metric"], comparator, value, unit, (m["label"] or "").strip())
    except ValueError as exc:
        raise ValueError(f"goal {text!r}: {exc}") from None


@dataclass(frozen=True)
class GoalResult:
    """A goal checked against a dose: the achieved value (in the goal's unit) and pass/fail."""

    goal: Goal
    achieved: float
    passed: bool

    # An optimiser meets its constraints to this tolerance, in the goal's unit (Gy, %, cc).
    LIMIT_TOLERANCE = 0.01

    @property
    def state(self) -> str:
        """"pass", "FAIL", or "limit": missed by no more than ``LIMIT_TOLERANCE`` in the goal's
        unit (0.01 Gy, %, or cc: what an optimised plan's constraints are met to, so such a miss
        is not a failure of the plan; shown to the third decimal)."""
        if self.passed:
            return "pass"
        return "limit" if abs(self.achieved - self.goal.value) <= self.LIMIT_TOLERANCE else "FAIL"


def _as_goal(g) -> Goal:
    return g if isinstance(g, Goal) else parse_goal(g)


def check_goals(dose_gy, patient, goals, *, prescription_gy: float | None = None) -> tuple[GoalResult, ...]:
    """Check goals against a dose.

    Parameters
    ----------
    dose_gy : dose, Gy, float (z, y, x) on the patient's CT grid (NumPy or CuPy).
    patient : :class:`ids_engine.model.Patient` holding the goals' structures.
    goals : :class:`Goal` objects or goal texts (see :func:`parse_goal`).
    prescription_gy : needed by goals relative to the prescription (``V95%``, unit ``%``
        on a dose).

    Returns
    -------
    tuple of GoalResult, in the order of ``goals``.

    Raises
    ------
    KeyError
        when a goal's structure is not in the patient (naming the known ones).
    """
    return _check(StructureDoses(dose_gy, patient), [_as_goal(g) for g in goals], prescription_gy)


def _check(doses: "StructureDoses", goals, prescription_gy) -> tuple[GoalResult, ...]:
    out = []
    for g in goals:
        a = g.achieved(doses[g.structure], prescription_gy=prescription_gy)
        out.append(GoalResult(g, a, g.passes(a)))
    return tuple(out)


class StructureDoses:
    """The :class:`StructureDose` of each structure of a patient, sorted once when first asked for."""

    def __init__(self, dose_gy, patient) -> None:
        from ._metrics import _host

        dose = _host(dose_gy)
        if dose.shape != patient.grid.shape_zyx:
            raise ValueError(f"dose_gy shape {dose.shape} does not match the patient's grid {patient.grid.shape_zyx}")
        self.dose_gy = dose
        self.patient = patient
        self._cache: dict[str, StructureDose] = {}

    def __getitem__(self, name: str) -> StructureDose:
        sd = self._cache.get(name)
        if sd is None:
            s = self.patient.structure(name)
            sd = self._cache[name] = StructureDose(self.dose_gy, s.mask, self.patient.grid.voxel_volume_cc, s.name)
        return sd


def tg119_goals(level: str = "harder", *, target: str = "OuterTarget", core: str = "Core") -> tuple[Goal, ...]:
    """The AAPM TG-119 C-shape goals (Ezzell et al. 2009, Med. Phys. 36, 5359).

    Target D95 >= 50 Gy, target D10 <= 55 Gy, core D10 <= 25 Gy (``"easier"``) or
    <= 10 Gy (``"harder"``); prescription 50 Gy. The structure names default to those of
    :func:`ids_engine.phantoms.tg119`; pass ``target``/``core`` for other data sets.
    """
    limits = {"easier": 25.0, "harder": 10.0}
    if level not in limits:
        raise ValueError(f"tg119_goals: level {level!r} is not 'easier' or 'harder'")
    return (
        Goal(target, "D95", ">=", 50.0, "Gy"),
        Goal(target, "D10", "<=", 55.0, "Gy"),
        Goal(core, "D10", "<=", limits[level], "Gy", level),
    )
