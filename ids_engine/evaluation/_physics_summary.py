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
contribution; and the DVH metrics of every structure. Written as Markdown and HTML, and as
PDF (:func:`write_physics_summary_pdf`: matplotlib's PdfPages, the tables as text with the
plan name and ID on every page, and a page with the DVH picture); the case is named by a
label only, never a patient identifier.

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

from ._dvh import DVH, dvh, dvh_metrics

__all__ = ["PhysicsSummary", "SummaryPoint", "physics_summary", "write_physics_summary", "write_physics_summary_pdf"]


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


@dataclass(frozen=True, eq=False)
class PhysicsSummary:
    """The summary's content, and its Markdown and HTML text.

    title, head, tables, notes : the printed content (one source for Markdown, HTML and
        PDF): ``head`` (label, text) pairs, ``tables`` (title, column heads, rows of text).
    dvhs : ((DVH, rgb), ...) every structure's exact DVH (voxel doses) with its colour, for
        the PDF's DVH picture.
    prescription_gy : the dose V95/V107 refer to (None without one).
    """

    plan_name: str
    plan_id: int
    normalisation_gy: float
    points: tuple[SummaryPoint, ...]
    dvh_rows: tuple[dict, ...]
    markdown: str
    html: str
    title: str = ""
    head: tuple[tuple[str, str], ...] = ()
    tables: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = ()
    notes: tuple[str, ...] = ()
    dvhs: tuple[tuple[DVH, tuple[float, float, float]], ...] = ()
    prescription_gy: float | None = None


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
    dvh_rows, curves = [], []
    vcc = patient.grid.voxel_volume_cc
    for s in patient.structures:
        if s.is_empty:
            continue
        m = dvh_metrics(dose, s.mask, rx_gy)
        dvh_rows.append({"structure": s.name, "kind": s.kind.value, "volume_cc": s.volume_cc, **m})
        curves.append((dvh(s.name, dose, s.mask, vcc, bin_gy=_dvh_bin_gy(dose)),
                       tuple(float(c) for c in s.colour)))
    engine = doses.engine
    machine = engine.machine
    ssd = [g.ssd_mm for g in engine.geometry]
    when = when or _dt.datetime.now(_dt.timezone.utc)
    S = _Sections(plan, patient, case_label, machine, norm_xyz, norm_gy, points, dvh_rows, rx_gy, ssd, when)
    tables = tuple((t, tuple(c), tuple(tuple(r) for r in rows)) for t, c, rows in S._tables())
    return PhysicsSummary(plan.name, plan.plan_id, norm_gy, tuple(points), tuple(dvh_rows), S.markdown(), S.html(),
                          S.title, tuple(S.head), tables, tuple(S.notes), tuple(curves), rx_gy)


def _dvh_bin_gy(dose: np.ndarray) -> float:
    """A DVH bin of about 1/500 of the highest dose (0.1 Gy for 50 Gy, 4 mGy for 2 Gy)."""
    top = float(np.max(dose)) if dose.size else 0.0
    return max(top / 500.0, 1e-4) if top > 0 else 0.1


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


# --------------------------------------------------------------------------- PDF
_PAGE_IN = (11.69, 8.27)  # A4 landscape
_FONT_PT = 6.6
_LINE_PT = _FONT_PT * 1.38
_MARGIN_PT = 36.0
_MAX_CELL = 64  # a cell wider than this wraps onto the next lines of its row


def _table_lines(cols, rows) -> list[str]:
    """A table as fixed-width text lines; long cells wrap within their column."""
    import textwrap

    widths = [min(max([len(c)] + [len(r[i]) for r in rows]), _MAX_CELL) for i, c in enumerate(cols)]

    def emit(cells) -> list[str]:
        wrapped = [textwrap.wrap(c, w) or [""] for c, w in zip(cells, widths)]
        out = []
        for k in range(max(len(w) for w in wrapped)):
            parts = [(w[k] if k < len(w) else "") for w in wrapped]
            out.append("  ".join(p.ljust(wd) if i == 0 or not p.replace(".", "").replace("-", "").isdigit()
                                 else p.rjust(wd) for i, (p, wd) in enumerate(zip(parts, widths))).rstrip())
        return out

    lines = emit(cols)
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines += emit(r)
    return lines


def _summary_lines(summary: PhysicsSummary) -> list[tuple[str, str]]:
    """(style, text) lines: 'title', 'h2', 'text'."""
    import textwrap

    out = [("title", summary.title), ("text", "")]
    for k, v in summary.head:
        for j, line in enumerate(textwrap.wrap(f"{k}: {v}", 170) or [""]):
            out.append(("text", line if j == 0 else "    " + line))
    for title, cols, rows in summary.tables:
        out += [("text", ""), ("h2", title)]
        out += [("text", line) for line in _table_lines(cols, rows)]
    out += [("text", ""), ("h2", "Notes")]
    for n in summary.notes:
        for j, line in enumerate(textwrap.wrap(n, 170)):
            out.append(("text", ("- " if j == 0 else "  ") + line))
    return out


def write_physics_summary_pdf(path, summary: PhysicsSummary) -> Path:
    """The physics summary as a printable PDF (A4 landscape; matplotlib's PdfPages).

    The head, the tables (beams, point doses, each beam's contribution with BEV and patient
    coordinates, DVH metrics) and the notes as text pages, then a page with the DVH of every
    structure (colour per structure, % of volume). Every page's header and footer name the
    plan and its plan ID (seed 001: the ID matches a print-out to the screens); the PDF's
    title says the same. Written atomically (a temporary file renamed into place).
    """
    import os

    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = _summary_lines(summary)
    w_pt, h_pt = _PAGE_IN[0] * 72.0, _PAGE_IN[1] * 72.0
    per_page = int((h_pt - 2 * _MARGIN_PT - 3 * _LINE_PT) // _LINE_PT)
    pages = [lines[i:i + per_page] for i in range(0, len(lines), per_page)] or [[]]
    n_pages = len(pages) + (1 if summary.dvhs else 0)
    ident = f"Plan {summary.plan_name}, plan ID {summary.plan_id}"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"Title": summary.title or f"Physics summary: {ident}", "Subject": ident, "Creator": "ids-engine"}

    def frame(fig, k: int) -> None:
        fig.text(_MARGIN_PT / w_pt, 1 - 0.6 * _MARGIN_PT / h_pt, ident, fontsize=7, family="DejaVu Sans",
                 va="top", weight="bold")
        fig.text(1 - _MARGIN_PT / w_pt, 0.5 * _MARGIN_PT / h_pt, f"{ident}  ·  page {k} of {n_pages}",
                 fontsize=7, family="DejaVu Sans", ha="right", va="bottom")

    try:
        with PdfPages(tmp, metadata=meta) as pdf:
            for k, page in enumerate(pages, 1):
                fig = Figure(figsize=_PAGE_IN)
                frame(fig, k)
                y = h_pt - _MARGIN_PT - 1.5 * _LINE_PT
                for style, text in page:
                    size = {"title": 11.0, "h2": 8.5}.get(style, _FONT_PT)
                    family = "DejaVu Sans Mono" if style == "text" else "DejaVu Sans"
                    if style != "text":
                        y -= 0.4 * _LINE_PT
                    if text:
                        fig.text(_MARGIN_PT / w_pt, y / h_pt, text, fontsize=size, family=family, va="top",
                                 weight="bold" if style != "text" else "normal")
                    y -= _LINE_PT * (1.6 if style == "title" else 1.25 if style == "h2" else 1.0)
                pdf.savefig(fig)
            if summary.dvhs:
                fig = Figure(figsize=_PAGE_IN)
                frame(fig, n_pages)
                ax = fig.add_axes((0.08, 0.1, 0.62, 0.78))
                for h, colour in summary.dvhs:
                    ax.plot(h.dose_gy, 100.0 * np.asarray(h.volume_fraction), color=colour, linewidth=1.4,
                            drawstyle="steps-post", label=f"{h.name} ({h.volume_cc:.1f} cc)")
                if summary.prescription_gy:
                    ax.axvline(summary.prescription_gy, color="0.4", linewidth=0.8, linestyle="--",
                               label=f"{summary.prescription_gy:.4g} Gy (V95/V107 reference)")
                ax.set_xlim(left=0)
                ax.set_ylim(0, 102)
                ax.set_xlabel("Dose (Gy)")
                ax.set_ylabel("Volume (%)")
                ax.grid(True, linewidth=0.3)
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
                ax.set_title(f"Dose-volume histograms: {ident} (every voxel of each structure)", fontsize=9)
                pdf.savefig(fig)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
