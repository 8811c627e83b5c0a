"""Tables of plan metrics: one plan, or two side by side with their differences."""

from __future__ import annotations

from dataclasses import dataclass

from ._goals import GoalResult, StructureDoses, _as_goal, _check
from ._metrics import conformity_index, gradient_index, homogeneity_index, parse_metric

__all__ = ["MetricRow", "PlanComparison", "compare_plans", "default_metrics", "plan_metrics"]

_TARGET_METRICS = ("D98", "D95", "D50", "D2", "Dmax", "Dmean", "Dmin")
_TARGET_RX_METRICS = ("V95%", "V107%")
_OAR_METRICS = ("Dmean", "Dmax", "D2cc")
_EXTERNAL_METRICS = ("Dmax",)


@dataclass(frozen=True)
class MetricRow:
    """One value of a metrics table: ``structure`` (empty for plan-wide indices), metric, value, unit."""

    structure: str
    metric: str
    value: float
    unit: str


def default_metrics(patient, *, prescription_gy: float | None = None) -> dict[str, tuple[str, ...]]:
    """The metrics reported per structure: targets D98, D95, D50, D2, Dmax, Dmean, Dmin (and
    V95%, V107% of the prescription); organs at risk Dmean, Dmax, D2cc; the external Dmax."""
    out = {}
    for s in patient.structures:
        if s.is_empty:
            continue
        if s.kind.value == "target":
            out[s.name] = _TARGET_METRICS + (_TARGET_RX_METRICS if prescription_gy else ())
        elif s.kind.value == "oar":
            out[s.name] = _OAR_METRICS
        else:
            out[s.name] = _EXTERNAL_METRICS
    return out


def _metric_rows(doses: StructureDoses, metrics: dict, prescription_gy) -> list[MetricRow]:
    rows = []
    for name, exprs in metrics.items():
        sd = doses[name]
        for e in exprs:
            m = parse_metric(e)
            rows.append(MetricRow(name, m.expression, m.evaluate(sd, prescription_gy=prescription_gy),
                                  "Gy" if m.is_dose else "%"))
    return rows


def _index_rows(doses: StructureDoses, prescription_gy) -> list[MetricRow]:
    """CI, HI and GI of each target; the isodose volumes are counted inside the body."""
    if not prescription_gy:
        return []
    p = doses.patient
    body = p.body_mask()
    rows = [MetricRow("", "GI", gradient_index(doses.dose_gy, prescription_gy, region=body), "")]
    for t in p.targets:
        if t.is_empty:
            continue
        rows.append(MetricRow(t.name, "CI (Paddick)",
                              conformity_index(doses.dose_gy, t.mask, prescription_gy, region=body), ""))
        rows.append(MetricRow(t.name, "HI (ICRU 83)", homogeneity_index(doses.dose_gy, t.mask), ""))
    return rows


def plan_metrics(dose_gy, patient, *, prescription_gy: float | None = None,
                 metrics: dict[str, tuple[str, ...]] | None = None) -> tuple[MetricRow, ...]:
    """The metrics of one plan.

    Parameters
    ----------
    dose_gy : dose, Gy, float (z, y, x) on the patient's CT grid.
    patient : :class:`ids_engine.model.Patient`.
    prescription_gy : the prescription dose; adds V95%/V107% of each target, and the
        Paddick CI, ICRU 83 HI of each target and the gradient index (isodose volumes inside
        the body).
    metrics : structure name -> metric expressions; :func:`default_metrics` otherwise.

    Returns
    -------
    tuple of MetricRow: doses in Gy, volumes in % of the structure, indices unitless.
    """
    doses = StructureDoses(dose_gy, patient)
    if metrics is None:
        metrics = default_metrics(patient, prescription_gy=prescription_gy)
    return tuple(_metric_rows(doses, metrics, prescription_gy) + _index_rows(doses, prescription_gy))


@dataclass(frozen=True)
class PlanComparison:
    """Two plans' metrics side by side.

    ``rows`` hold ``(structure, metric, unit, value_a, value_b, difference)`` with the
    difference ``b - a``; ``goals_a``/``goals_b`` the goal checks of each plan.
    """

    labels: tuple[str, str]
    rows: tuple[tuple[str, str, str, float, float, float], ...]
    goals_a: tuple[GoalResult, ...] = ()
    goals_b: tuple[GoalResult, ...] = ()

    def to_markdown(self) -> str:
        """A Markdown table of the metrics, then one of the goals when there are any."""
        a, b = self.labels
        lines = [f"| Structure | Metric | {a} | {b} | {b} - {a} |", "| --- | --- | ---: | ---: | ---: |"]
        for s, m, u, va, vb, dv in self.rows:
            unit = f" {u}" if u else ""
            lines.append(f"| {s or 'plan'} | {m} | {_fmt(va)}{unit} | {_fmt(vb)}{unit} | {_fmt(dv, signed=True)}{unit} |")
        if self.goals_a:
            lines += ["", f"| Goal | {a} | {b} |", "| --- | --- | --- |"]
            for ra, rb in zip(self.goals_a, self.goals_b):
                lines.append(f"| {ra.goal} | {_fmt(ra.achieved)} {_pf(ra)} | {_fmt(rb.achieved)} {_pf(rb)} |")
        return "\n".join(lines) + "\n"


def _pf(r: GoalResult) -> str:
    return "pass" if r.passed else "FAIL"


def _fmt(v: float, signed: bool = False) -> str:
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def compare_plans(dose_a_gy, dose_b_gy, patient, *, prescription_gy: float | None = None,
                  metrics: dict[str, tuple[str, ...]] | None = None, goals=(),
                  labels: tuple[str, str] = ("A", "B")) -> PlanComparison:
    """Metrics and goal checks of two doses on the same patient, with their differences.

    Parameters
    ----------
    dose_a_gy, dose_b_gy : the two doses, Gy, float (z, y, x) on the patient's CT grid.
    patient : :class:`ids_engine.model.Patient`.
    prescription_gy, metrics : as :func:`plan_metrics`.
    goals : :class:`Goal` objects or goal texts, checked on both.
    labels : the plans' names in the table.
    """
    ra = plan_metrics(dose_a_gy, patient, prescription_gy=prescription_gy, metrics=metrics)
    rb = plan_metrics(dose_b_gy, patient, prescription_gy=prescription_gy, metrics=metrics)
    rows = tuple((x.structure, x.metric, x.unit, x.value, y.value, y.value - x.value) for x, y in zip(ra, rb))
    goals = [_as_goal(g) for g in goals]
    ga = _check(StructureDoses(dose_a_gy, patient), goals, prescription_gy) if goals else ()
    gb = _check(StructureDoses(dose_b_gy, patient), goals, prescription_gy) if goals else ()
    return PlanComparison(tuple(str(s) for s in labels), rows, ga, gb)
