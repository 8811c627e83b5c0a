"""Live plan metrics for the viewer's metrics panel (computed on the worker thread, no Qt).

Per structure the DVH points a planner reads first (D98, D95, D50, D2, Dmax = D0.03cc, V95 %,
V107 % of the prescription, mean), the first target's Paddick CI and ICRU 83 HI, and the
protocol's goals with pass/fail: all from :mod:`ids_engine.evaluation` on the host dose cube
of a final snapshot, so the panel shows exactly what a plan report would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ids_engine.evaluation import Goal, StructureDose, conformity_index, homogeneity_index, parse_metric

__all__ = ["METRIC_COLUMNS", "GoalCheck", "LiveMetrics", "StructureMetrics", "live_metrics", "protocol_checks"]

#: The panel's columns: (heading, metric expression, unit). Volumes are % of the structure;
#: V95 and V107 are relative to the session's prescription.
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("D98", "D98", "Gy"), ("D95", "D95", "Gy"), ("D50", "D50", "Gy"), ("D2", "D2", "Gy"),
    ("Dmax", "Dmax", "Gy"), ("V95", "V95%", "%"), ("V107", "V107%", "%"), ("Mean", "Dmean", "Gy"),
)


@dataclass(frozen=True)
class StructureMetrics:
    """One structure's row: ``values`` in the order of :data:`METRIC_COLUMNS` (Gy or %)."""

    name: str
    values: tuple[float, ...]


@dataclass(frozen=True)
class GoalCheck:
    """A protocol goal checked on the dose: achieved in the goal's unit, and pass/fail."""

    goal: Goal
    achieved: float
    passed: bool

    @property
    def text(self) -> str:
        g = self.goal
        return f"{g.structure} {g.metric} {g.comparator} {g.value:g} {g.unit}"


@dataclass(frozen=True)
class LiveMetrics:
    """What the metrics panel shows for one final snapshot.

    target : the first target's name, or None (a case without a target: no CI/HI).
    ci, hi : Paddick CI at the prescription isodose and ICRU 83 HI of the target, or None.
    goals : the protocol's goals checked on this dose (empty without a protocol).
    """

    prescription_gy: float
    structures: tuple[StructureMetrics, ...]
    target: str | None = None
    ci: float | None = None
    hi: float | None = None
    goals: tuple[GoalCheck, ...] = ()

    def structure(self, name: str) -> StructureMetrics:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(name)


def _metric_value(sd: StructureDose, expression: str, prescription_gy: float) -> float:
    return float(parse_metric(expression).evaluate(sd, prescription_gy=prescription_gy))


def live_metrics(dose_gy: np.ndarray, patient, prescription_gy: float, goals=()) -> LiveMetrics:
    """The metrics panel's numbers for a dose.

    Parameters
    ----------
    dose_gy : (z, y, x) float, Gy, host, on the patient's grid.
    patient : the session's :class:`~ids_engine.model.Patient`.
    prescription_gy : the session's prescription (V95/V107 and the CI's isodose refer to it).
    goals : :class:`~ids_engine.evaluation.Goal` objects (see :func:`protocol_checks`).

    Raises
    ------
    KeyError
        when a goal names a structure the patient does not have.
    """
    vcc = patient.grid.voxel_volume_cc
    sds: dict[str, StructureDose] = {}
    rows = []
    for st in patient.structures:
        if not st.mask.any():
            continue
        sd = sds[st.name] = StructureDose(dose_gy, st.mask, vcc, st.name)
        rows.append(StructureMetrics(st.name, tuple(_metric_value(sd, expr, prescription_gy)
                                                    for _, expr, _ in METRIC_COLUMNS)))
    target = ci = hi = None
    targets = [t for t in patient.targets if t.mask.any()]
    if targets:
        t = targets[0]
        target = t.name
        ci = float(conformity_index(dose_gy, t.mask, prescription_gy))
        try:
            hi = float(homogeneity_index(dose_gy, t.mask))
        except ValueError:  # D50 of the target is 0 Gy (no dose yet): no HI to show
            hi = None
    checks = []
    for g in goals:
        sd = sds.get(g.structure)
        if sd is None:
            s = patient.structure(g.structure)  # KeyError naming the known structures
            sd = sds[s.name] = StructureDose(dose_gy, s.mask, vcc, s.name)
        a = float(g.achieved(sd, prescription_gy=prescription_gy))
        checks.append(GoalCheck(g, a, g.passes(a)))
    return LiveMetrics(float(prescription_gy), tuple(rows), target, ci, hi, tuple(checks))


def protocol_checks(goals) -> tuple[Goal, ...]:
    """The goals of an optimisation protocol that are DVH points, as checks (see
    :func:`ids_engine.planning.goal_checks`)."""
    from ids_engine.planning import goal_checks

    return goal_checks(goals)
