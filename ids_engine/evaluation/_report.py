"""The plan report: prescription, targets, OAR constraints, beams, metrics, goal checks, DVH plot.

What a plan record documents follows the overview of the planning workflow (seed 004,
"Required documentation"): the prescription (dose, fractionation, technique), the target
volumes, the OAR constraints, the plan parameters (beam arrangement) and the DVH metrics
(coverage, OAR doses). The report is written as Markdown and as one self-contained HTML
file (the DVH embedded as a base64 PNG), with the DVH PNG beside them. It names the case
by a label only: no patient name, identifier or DICOM UID goes in.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._dvh import dvh
from ._goals import GoalResult, StructureDoses, _as_goal, _check
from ._table import MetricRow, _index_rows, _metric_rows, default_metrics

__all__ = ["PlanReport", "Prescription", "dvh_png", "write_plan_report"]

PLOT_LEFT_OUT = "DVH plot left out: matplotlib is not installed (pip install 'ids-engine[bench]')."


@dataclass(frozen=True)
class Prescription:
    """The prescription of a plan.

    Parameters
    ----------
    dose_gy : total prescribed dose, Gy.
    fractions : number of fractions.
    target : the structure the dose is prescribed to ("" when not stated).
    technique : e.g. "IMRT", "3DCRT".
    normalisation : how the dose is normalised (e.g. "D95 of the target = 100 %").
    """

    dose_gy: float
    fractions: int = 1
    target: str = ""
    technique: str = "IMRT"
    normalisation: str = ""

    def __post_init__(self) -> None:
        try:
            d = float(self.dose_gy)
        except (TypeError, ValueError):
            raise ValueError(f"Prescription.dose_gy must be a number, got {self.dose_gy!r}") from None
        if not (np.isfinite(d) and d > 0):
            raise ValueError(f"Prescription.dose_gy must be positive, got {self.dose_gy!r}")
        if int(self.fractions) != self.fractions or int(self.fractions) < 1:
            raise ValueError(f"Prescription.fractions must be a positive integer, got {self.fractions!r}")
        object.__setattr__(self, "dose_gy", d)
        object.__setattr__(self, "fractions", int(self.fractions))

    @property
    def dose_per_fraction_gy(self) -> float:
        return self.dose_gy / self.fractions


@dataclass(frozen=True)
class PlanReport:
    """What :func:`write_plan_report` wrote and found."""

    markdown_path: Path
    html_path: Path
    png_path: Path | None
    metrics: tuple[MetricRow, ...]
    goals: tuple[GoalResult, ...]

    @property
    def all_goals_met(self) -> bool:
        return all(r.passed for r in self.goals)


def _load_matplotlib():
    """``(Figure, FigureCanvasAgg)``, or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def finish_dvh_axes(ax, *, legend_fontsize: float = 8) -> None:
    """The DVH plots' common axes: dose (Gy) against volume (%), 0-102 %, a light grid, a legend."""
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="best", fontsize=legend_fontsize)


def dvh_png(path, dose_gy, patient, *, prescription_gy: float | None = None, structures=None,
            title: str = "", bin_gy: float = 0.1) -> Path | None:
    """Plot the cumulative DVHs of a dose to a PNG (matplotlib, no pyplot state).

    Parameters
    ----------
    path : where to write the PNG.
    dose_gy : dose, Gy, float (z, y, x) on the patient's CT grid.
    patient : :class:`ids_engine.model.Patient`; each structure drawn in its colour.
    prescription_gy : drawn as a vertical line when given.
    structures : names to draw; all non-empty structures otherwise.
    title : the plot's title (a case label, never a patient identifier).
    bin_gy : DVH bin width, Gy.

    Returns
    -------
    The path written, or None when matplotlib is not installed.
    """
    mpl = _load_matplotlib()
    if mpl is None:
        return None
    Figure, FigureCanvasAgg = mpl
    doses = StructureDoses(dose_gy, patient)
    names = structures if structures is not None else [s.name for s in patient.structures if not s.is_empty]
    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in names:
        s = patient.structure(name)
        h = dvh(name, doses.dose_gy, s.mask, patient.grid.voxel_volume_cc, bin_gy=bin_gy)
        style = ":" if s.kind.value == "external" else "-"
        ax.plot(h.dose_gy, 100.0 * h.volume_fraction, style, color=s.colour, label=name, linewidth=1.5)
    if prescription_gy:
        ax.axvline(prescription_gy, color="0.4", linewidth=0.8, linestyle="--", label=f"Rx {prescription_gy:g} Gy")
    finish_dvh_axes(ax, legend_fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _beam_rows(beams) -> list[tuple[str, ...]]:
    keys = ("name", "gantry_deg", "couch_deg", "collimator_deg", "energy_mv", "sad_mm", "isocentre_mm_xyz")
    rows = []
    for i, b in enumerate(beams):
        get = b.get if isinstance(b, dict) else (lambda k, default=None, _b=b: getattr(_b, k, default))
        cells = []
        for k in keys:
            v = get(k, None)
            if k == "name" and v is None:
                v = f"beam {i + 1}"
            if v is None:
                cells.append("-")
            elif k == "isocentre_mm_xyz":
                cells.append("(" + ", ".join(f"{float(c):.1f}" for c in v) + ")")
            elif isinstance(v, (int, float)):
                cells.append(f"{float(v):g}")
            else:
                cells.append(str(v))
        weight = get("weight", None)
        cells.append("-" if weight is None else f"{float(weight):.4g}")
        rows.append(tuple(cells))
    return rows


_BEAM_HEADER = ("Beam", "Gantry (deg)", "Couch (deg)", "Collimator (deg)", "Energy (MV)", "SAD (mm)",
                "Isocentre x, y, z (mm)", "Weight")


def _sections(rx: Prescription | None, patient, beams, metrics, goal_results, png_note, dose_max):
    """The report as (heading, header, rows, paragraph) sections, shared by Markdown and HTML."""
    S = []
    if rx is not None:
        rows = [("Total dose", f"{rx.dose_gy:g} Gy"), ("Fractions", str(rx.fractions)),
                ("Dose per fraction", f"{rx.dose_per_fraction_gy:.4g} Gy"), ("Technique", rx.technique)]
        if rx.target:
            rows.append(("Prescribed to", rx.target))
        if rx.normalisation:
            rows.append(("Normalisation", rx.normalisation))
        S.append(("Prescription", ("Item", "Value"), rows, ""))
    else:
        S.append(("Prescription", None, [], "No prescription given."))
    vv = patient.grid.voxel_volume_cc
    def goal_text(r: GoalResult) -> str:
        return f"{r.goal.metric} {r.goal.comparator} {r.goal.value:g} {r.goal.unit}"

    targets = [(s.name, f"{s.volume_cc:.2f}", str(s.voxel_count),
                "; ".join(goal_text(r) for r in goal_results if r.goal.structure == s.name) or "-")
               for s in patient.targets]
    S.append(("Target volumes", ("Structure", "Volume (cc)", "Voxels", "Goals"), targets,
              "" if targets else "No target structure."))
    others = [(s.name, s.kind.value, f"{s.volume_cc:.2f}") for s in patient.structures if s.kind.value != "target"]
    S.append(("Other structures", ("Structure", "Kind", "Volume (cc)"), others, ""))
    target_names = {s.name for s in patient.targets}
    oar_goals = [(r.goal.structure, goal_text(r), r.goal.label or "-") for r in goal_results if r.goal.structure not in target_names]
    S.append(("OAR constraints", ("Structure", "Constraint", "Note"), oar_goals,
              "" if oar_goals else "No OAR constraint given."))
    brows = _beam_rows(beams)
    S.append(("Beams", _BEAM_HEADER, brows, f"{len(brows)} beam(s)." if brows else "No beams given."))
    mrows = [(m.structure or "plan", m.metric, f"{m.value:.4g}", m.unit or "-") for m in metrics]
    S.append(("DVH metrics", ("Structure", "Metric", "Value", "Unit"), mrows,
              f"Maximum dose in the cube {dose_max:.4g} Gy; voxel volume {vv:.4g} cc. Dmax is D0.03cc, "
              "Dmin D(V - 0.03cc); D<x> is the dose to x % of the volume; V<x>% is relative to the "
              "prescription; volumes counted in whole voxels. CI: Paddick (2000); HI: ICRU 83 "
              "(D2 - D98) / D50; GI: V50%Rx / V100%Rx (Paddick and Lippitz 2006), inside the body."))
    grows = [(r.goal.structure, goal_text(r) + (f" ({r.goal.label})" if r.goal.label else ""),
              f"{r.achieved:.3f} {r.goal.unit}" if r.state == "limit" else f"{r.achieved:.4g} {r.goal.unit}",
              r.state) for r in goal_results]
    n_pass = sum(r.passed for r in goal_results)
    n_limit = sum(r.state == "limit" for r in goal_results)
    note = f"{n_pass} of {len(grows)} goals met." if grows else "No goals given."
    if n_limit:
        note += (f" {n_limit} on the limit: missed by no more than {GoalResult.LIMIT_TOLERANCE:g} in the goal's unit "
                 "(the tolerance an optimiser meets constraints to).")
    S.append(("Goal checks", ("Structure", "Goal", "Achieved", "Result"), grows, note))
    S.append(("DVH", None, [], png_note))
    return S


def _markdown(title: str, S, png_name: str | None) -> str:
    out = [f"# {title}", ""]
    for heading, header, rows, para in S:
        out += [f"## {heading}", ""]
        if header and rows:
            out.append("| " + " | ".join(header) + " |")
            out.append("| " + " | ".join("---" for _ in header) + " |")
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            out.append("")
        if para:
            out += [para, ""]
        if heading == "DVH" and png_name:
            out += [f"![DVH]({png_name})", ""]
    return "\n".join(out)


def _html(title: str, S, png_bytes: bytes | None) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:1em auto}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #999;padding:.2em .6em}"
           "td.FAIL{color:#b00;font-weight:bold}td.pass{color:#070}td.limit{color:#a60}</style></head><body>",
           f"<h1>{e(title)}</h1>"]
    for heading, header, rows, para in S:
        out.append(f"<h2>{e(heading)}</h2>")
        if header and rows:
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            for r in rows:
                cells = []
                for c in r:
                    cls = f' class="{c}"' if c in ("pass", "FAIL", "limit") else ""
                    cells.append(f"<td{cls}>{e(str(c))}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        if para:
            out.append(f"<p>{e(para)}</p>")
        if heading == "DVH" and png_bytes:
            b64 = base64.b64encode(png_bytes).decode("ascii")
            out.append(f'<img alt="DVH" src="data:image/png;base64,{b64}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_plan_report(out_dir, dose_gy, patient, *, prescription=None, beams=(), goals=(),
                      case_label: str = "case", metrics: dict | None = None,
                      basename: str = "plan_report") -> PlanReport:
    """Write a plan report as Markdown, self-contained HTML and a DVH PNG.

    Parameters
    ----------
    out_dir : folder to write into (created).
    dose_gy : the plan's dose, Gy, float (z, y, x) on the patient's CT grid (NumPy or CuPy).
    patient : :class:`ids_engine.model.Patient`; its name and UIDs are never written.
    prescription : a :class:`Prescription`, a total dose in Gy, or None.
    beams : :class:`ids_engine.model.Beam` objects or dicts with the same field names
        (``name``, ``gantry_deg``, ``couch_deg``, ``collimator_deg``, ``energy_mv``,
        ``sad_mm``, ``isocentre_mm_xyz``) and optionally ``weight``.
    goals : :class:`Goal` objects or goal texts (``"PTV D95 >= 50 Gy"``).
    case_label : how the report names the case (not a patient identifier).
    metrics : structure name -> metric expressions; :func:`default_metrics` otherwise.
    basename : file name stem: ``<basename>.md``, ``<basename>.html``, ``<basename>_dvh.png``.

    Returns
    -------
    PlanReport
        the paths (``png_path`` None when matplotlib is missing; the report then says the
        plot was left out), the metrics and the goal checks.
    """
    rx = prescription if isinstance(prescription, Prescription) or prescription is None else Prescription(prescription)
    rx_gy = rx.dose_gy if rx is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doses = StructureDoses(dose_gy, patient)
    if metrics is None:
        metrics = default_metrics(patient, prescription_gy=rx_gy)
    rows = tuple(_metric_rows(doses, metrics, rx_gy) + _index_rows(doses, rx_gy))
    goal_results = _check(doses, [_as_goal(g) for g in goals], rx_gy)

    title = f"Plan report: {case_label}"
    png_path = dvh_png(out / f"{basename}_dvh.png", doses.dose_gy, patient, prescription_gy=rx_gy, title=case_label)
    png_note = (f"Cumulative DVH of every structure ({png_path.name})." if png_path is not None else PLOT_LEFT_OUT)
    S = _sections(rx, patient, beams, rows, goal_results, png_note, float(np.max(doses.dose_gy)))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    S.insert(0, ("Case", None, [], f"Case {case_label}; report written {stamp} by ids-engine."))

    md_path = out / f"{basename}.md"
    html_path = out / f"{basename}.html"
    md_path.write_text(_markdown(title, S, png_path.name if png_path else None), encoding="utf-8")
    png_bytes = png_path.read_bytes() if png_path is not None else None
    html_path.write_text(_html(title, S, png_bytes), encoding="utf-8")
    return PlanReport(md_path, html_path, png_path, rows, goal_results)
