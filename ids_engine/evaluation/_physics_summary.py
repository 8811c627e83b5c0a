"""The physics summary of a forward plan (seed 001, "Print Physics Summary").

"This print out contains information about each beam and the dose to specific points, and
should be placed in the patient's chart and used as the definitive document for the plan."
It carries the plan ID, which increments with every change that affects the dose, so that
a print-out can be matched with the plan (and the screens) it belongs to.

Contents: the plan name and ID, the case label, the machine and its calibration, the
prescription and the normalisation point; per beam the angles (IEC 61217), isocentre,
energy, SAD, central-axis SSD, field and monitor units; per point (the normalisation point,
each beam's prescription point, the patient's points of interest) the patient coordinates,
the total dose and its percentage of the normalisation point's dose, and per beam the
point's beam's-eye-view coordinates (the seed's x, y, z = IEC beam limiting device frame,
origin at the isocentre, z towards the source; and u, v projected to the isocentre plane,
:meth:`~ids_engine.model.Beam.patient_to_bev`), the beam's dose per MU there and its
contribution; and the DVH metrics of every structure. Written as Markdown and HTML; the case
is named by a label only, never a patient identifier.

This module knows plans by their attributes (a :class:`ids_engine.planning.Plan` and its
:class:`ids_engine.planning.BeamDoses`), so that evaluation does not import planning.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ids_engine._files import atomic_text

from ._dvh import dvh_metrics

__all__ = ["PhysicsSummary", "SummaryPoint", "physics_summary", "write_physics_summary"]


@dataclass(frozen=True)
class SummaryPoint:
    """One point of the summary.

    position_mm_xyz : DICOM patient coordinates.
    total_gy : all beams' dose for the plan's MU.
    beam_gy_per_mu, beam_gy : (n_beams,) each beam's dose per MU and contribution.
    bev_mm_xyz : (n_beams, 3) the point in each beam's BEV frame (IEC beam limiting device).
    bev_iso_mm_uv : (n_beams, 2) projected to each beam's isocentre plane.
    """

    label: str
    position_mm_xyz: tuple[float, float, float]
    total_gy: float
    beam_gy_per_mu: tuple[float, ...]
    beam_gy: tuple[float, ...]
    bev_mm_xyz: tuple[tuple[float, float, float], ...]
    bev_iso_mm_uv: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class PhysicsSummary:
    """The summary's content, and its Markdown and HTML text."""

    plan_name: str
    plan_id: int
    normalisation_gy: float
    points: tuple[SummaryPoint, ...]
    dvh_rows: tuple[dict, ...]
    markdown: str
    html: str


def _f(v, nd=1) -> str:
    s = f"{v:.{nd}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.0"


def _xyz(p, nd=1) -> str:
    return "(" + ", ".join(_f(float(v), nd) for v in p) + ")"


def physics_summary(plan, patient, doses, *, case_label: str = "", prescription_gy: float | None = None,
                    extra_points=(), when: _dt.datetime | None = None) -> PhysicsSummary:
    """The physics summary of ``plan`` (its current MU).

    Parameters
    ----------
    plan : :class:`ids_engine.planning.Plan`.
    patient : the patient (its points of interest are listed).
    doses : :class:`ids_engine.planning.BeamDoses` of the plan's beams.
    case_label : how the case is named (e.g. "phantom water (coarse)"), never a patient ID.
    prescription_gy : the dose V95/V107 refer to (default: the normalisation point's dose).
    extra_points : more ``(label, (x, y, z))`` points to list.
    when : the time printed (default now, UTC).
    """
    if not doses.matches(plan):
        raise ValueError(f"physics summary: plan {plan.name!r} (plan ID {plan.plan_id}) has other beams than the "
                         "doses per MU; compute them again")
    pos = patient.patient_position
    mu = np.asarray(plan.mu, dtype=np.float64)
    norm_xyz = plan.normalisation.position_mm_xyz(plan, patient)
    norm_gy = float(doses.at_points(norm_xyz[None])[0] @ mu)
    # The points: normalisation, each beam's prescription point (unique), points of interest, extras.
    named: list[tuple[str, np.ndarray]] = [(f"normalisation ({plan.normalisation.describe(plan)})", norm_xyz)]
    rx_points = getattr(plan.prescription, "points", None) or ()
    for ref in rx_points:
        named.append((ref.describe(plan), ref.position_mm_xyz(plan, patient)))
    for p in patient.points:
        named.append((f"point {p.label}", np.asarray(p.position_mm_xyz, dtype=np.float64)))
    for label, xyz in extra_points:
        named.append((str(label), np.asarray(xyz, dtype=np.float64)))
    # One row per position: labels of the same point are joined.
    by_pos: dict[tuple, list] = {}
    for label, xyz in named:
        entry = by_pos.setdefault(tuple(np.round(xyz, 4)), [[], xyz])
        if label not in entry[0]:
            entry[0].append(label)
    unique = [("; ".join(labels), xyz) for labels, xyz in by_pos.values()]
    rates = doses.at_points(np.stack([xyz for _, xyz in unique]))
    points = []
    for (label, xyz), r in zip(unique, rates):
        bev = np.stack([b.patient_to_beam(xyz, pos) for b in plan.beams])
        uv = np.stack([b.patient_to_bev(xyz, pos)[:2] for b in plan.beams])
        points.append(SummaryPoint(label, tuple(float(v) for v in xyz), float(r @ mu), tuple(float(v) for v in r),
                                   tuple(float(v) for v in r * mu), tuple(tuple(float(v) for v in row) for row in bev),
                                   tuple(tuple(float(v) for v in row) for row in uv)))
    dose = doses.dose(mu)
    rx_gy = prescription_gy if prescription_gy is not None else (norm_gy if norm_gy > 0 else None)
    dvh_rows = []
    for s in patient.structures:
        if s.is_empty:
            continue
        m = dvh_metrics(dose, s.mask, rx_gy)
        dvh_rows.append({"structure": s.name, "kind": s.kind.value, "volume_cc": s.volume_cc, **m})
    engine = doses.engine
    machine = engine.machine
    ssd = [g.ssd_mm for g in engine.geometry]
    when = when or _dt.datetime.now(_dt.timezone.utc)
    S = _Sections(plan, patient, case_label, machine, norm_xyz, norm_gy, points, dvh_rows, rx_gy, ssd, when)
    return PhysicsSummary(plan.name, plan.plan_id, norm_gy, tuple(points), tuple(dvh_rows), S.markdown(), S.html())


class _Sections:
    """The summary as titled tables (one source for Markdown and HTML)."""

    def __init__(self, plan, patient, case_label, machine, norm_xyz, norm_gy, points, dvh_rows, rx_gy, ssd, when):
        self.title = f"Physics summary: plan {plan.name}, plan ID {plan.plan_id}"
        self.plan_id = plan.plan_id
        rx = plan.prescription
        self.head = [
            ("Plan", f"{plan.name}"),
            ("Plan ID", f"{plan.plan_id} (increments with every change that affects the dose)"),
            ("Case", case_label or patient.name),
            ("Printed", when.strftime("%Y-%m-%d %H:%M:%S %Z").strip()),
            ("Machine", f"{machine.name}; calibration factor gy_per_mu = {machine.gy_per_mu:.6g} Gy per unit fluence "
                        "(ids_engine.dose.calibrate: 1 cGy per MU at dmax, 10 x 10 cm, SSD = SAD, in water)"
                        if machine.gy_per_mu else machine.name),
            ("Prescription", rx.describe(plan) if rx is not None else "none (MU as set)"),
            ("Normalisation point", f"{plan.normalisation.describe(plan)} at {_xyz(norm_xyz)} mm (patient), "
                                    f"{norm_gy:.4f} Gy = 100 %"),
            ("Total MU", f"{sum(plan.mu):g}"),
        ]
        self.beam_cols = ("#", "beam", "gantry deg", "couch deg", "collimator deg", "isocentre x, y, z mm (patient)",
                          "energy MV", "SAD mm", "SSD mm", "field", "MU")
        self.beam_rows = [
            (str(i + 1), b.name, f"{b.gantry_deg:g}", f"{b.couch_deg:g}", f"{b.collimator_deg:g}", _xyz(b.isocentre_mm_xyz),
             f"{b.energy_mv:g}", f"{b.sad_mm:g}", "-" if s is None else _f(s), f.describe(), f"{m:g}")
            for i, (b, f, m, s) in enumerate(zip(plan.beams, plan.fields, plan.mu, ssd))
        ]
        self.point_cols = ("point", "x, y, z mm (patient)", "dose Gy", "% of norm.")
        self.point_rows = [(p.label, _xyz(p.position_mm_xyz), f"{p.total_gy:.4f}",
                            "-" if norm_gy <= 0 else f"{100 * p.total_gy / norm_gy:.1f}") for p in points]
        self.contrib_cols = ("point", "beam", "BEV x, y, z mm", "u, v mm at isocentre plane", "Gy per MU", "MU",
                             "dose Gy")
        self.contrib_rows = []
        for p in points:
            for b, beam in enumerate(plan.beams):
                self.contrib_rows.append((p.label, beam.name, _xyz(p.bev_mm_xyz[b]), _xyz(p.bev_iso_mm_uv[b]),
                                          f"{p.beam_gy_per_mu[b]:.6f}", f"{plan.mu[b]:g}", f"{p.beam_gy[b]:.4f}"))
        self.dvh_cols = ("structure", "kind", "volume cc", "mean Gy", "min Gy", "max Gy", "D98 Gy", "D95 Gy", "D50 Gy",
                         "D2 Gy") + (("V95 %", "V107 %") if rx_gy else ())
        self.dvh_rows = [
            (r["structure"], r["kind"], _f(r["volume_cc"]), *(f"{r[k]:.3f}" for k in
                                                               ("mean_gy", "min_gy", "max_gy", "D98_gy", "D95_gy", "D50_gy", "D2_gy")),
             *((_f(r["V95_pct"]), _f(r["V107_pct"])) if rx_gy else ()))
            for r in dvh_rows
        ]
        self.rx_gy = rx_gy
        self.notes = [
            "Doses are for the whole monitor units listed (MU are rounded to whole MU when a prescription is applied).",
            "BEV x, y, z: the seed's beam's-eye-view frame, the IEC 61217 beam limiting device frame (origin at the "
            "isocentre, z along the central ray towards the source, x and y turning with the collimator); u, v: the same "
            "point projected along the diverging ray to the isocentre plane.",
            f"DVH metrics over every voxel of each structure; V95/V107 relative to {rx_gy:.4g} Gy." if rx_gy else
            "DVH metrics over every voxel of each structure.",
        ]

    def _tables(self):
        return [("Beams", self.beam_cols, self.beam_rows), ("Point doses", self.point_cols, self.point_rows),
                ("Point doses per beam", self.contrib_cols, self.contrib_rows),
                ("DVH metrics", self.dvh_cols, self.dvh_rows)]

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        out += [f"- **{k}**: {v}" for k, v in self.head]
        for title, cols, rows in self._tables():
            out += ["", f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(r) + " |" for r in rows]
        out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        out += ["", f"*Plan ID {self.plan_id}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        e = html.escape
        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>",
                 "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0}"
                 "td,th{border:1px solid #999;padding:2px 6px;text-align:right}td:first-child,th:first-child"
                 "{text-align:left}.id{font-weight:bold}@media print{body{margin:0}}</style></head><body>",
                 f"<h1>{e(self.title)}</h1><ul>"]
        parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in self.head]
        parts.append("</ul>")
        for title, cols, rows in self._tables():
            parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in self.notes) + "</ul>")
        parts.append(f"<p class='id'>Plan ID {self.plan_id}</p></body></html>\n")
        return "\n".join(parts)


def write_physics_summary(out_dir, summary: PhysicsSummary, *, stem: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.html`` (default stem ``physics_<plan>_id<ID>``) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in summary.plan_name)
    stem = stem or f"physics_{safe}_id{summary.plan_id}"
    md, ht = out / f"{stem}.md", out / f"{stem}.html"
    atomic_text(md, summary.markdown)
    atomic_text(ht, summary.html)
    return md, ht
