"""Points of interest: positions in a beam's-eye view, dose per point per beam, the seed's
point file, and comparison with measured doses (seed 001: "Specific Points", "Plan Points
Toolbar", "File Points", "Add Point In BEV", "Compare to Measured").

The seed's beam's-eye-view frame
--------------------------------
Seed 001 gives a point "in beam's eye view coordinates" as (x, y, z) mm with the origin at
the isocentre, z along the central ray towards the source, and x and y turning with the
collimator; at gantry and collimator 0 (beam pointing at the floor) x runs across the couch
from left to right for someone at the foot of the couch looking towards the gantry and y
points towards the gantry. That is the IEC 61217 beam limiting device frame (X_b, Y_b, Z_b)
of :mod:`ids_engine.model._beam` exactly (Cartesian, no divergence), so
:func:`point_from_bev` is :meth:`Beam.beam_to_patient` and :func:`point_to_bev` its inverse.

The point file
--------------
The seed's ASCII standard: lines starting with ``//`` are comments and are not read; a point
is ``<* label *> value``, the label between ``<*`` and ``*>`` (spaces around it trimmed), the
value a number set off by white space::

    //Test Square     12-Dec-2000-09:19:19(hr:min:sec)
    // Label          Dose in Gy
    <* Example Label *> 1.299286
    <* slice 10 row 4 column 7 *> 1.324436

Doses are written in Gy with six decimals (the seed's example); the unit is stated in a
comment, which a reader does not interpret (see ``scale`` of :func:`read_point_file`).
Positions use the same standard with three numbers, ``<* label *> x y z`` (patient mm).

Comparing with measured doses
-----------------------------
Points match by label after lower-casing and removing all white space (the seed's rule);
labels that become equal after that are refused, naming both. The report sorts by the
numbers in the labels (slice, row, column, as the seed's CompareRandoPoints does, for labels
such as ``10 4 7`` or ``slice 10 row 4 column 7``); other labels follow alphabetically.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ids_engine.model import Beam, Patient, PointOfInterest

__all__ = [
    "DuplicateLabelError",
    "PointComparison",
    "PointComparisonRow",
    "PointDoses",
    "PointFileError",
    "PointValue",
    "add_point_in_bev",
    "beam_dose_cubes",
    "compare_points",
    "comparison_report",
    "normalise_label",
    "point_doses",
    "point_doses_report",
    "point_from_bev",
    "point_to_bev",
    "rando_key",
    "read_point_file",
    "read_point_positions",
    "write_point_file",
]


class PointFileError(ValueError):
    """A point file that does not follow the seed's format (names the file and line)."""


class DuplicateLabelError(ValueError):
    """Two labels that are equal after lower-casing and removing spaces."""


# --------------------------------------------------------------------------- BEV
def point_from_bev(beam: Beam, bev_mm_xyz, patient_position: str = "HFS") -> np.ndarray:
    """Patient coordinates (x, y, z) mm of a point given in the seed's beam's-eye-view frame
    of ``beam`` (= IEC beam limiting device frame; origin at the isocentre, z towards the
    source). ``bev_mm_xyz`` (..., 3) -> (..., 3)."""
    return beam.beam_to_patient(np.asarray(bev_mm_xyz, dtype=np.float64), patient_position)


def point_to_bev(beam: Beam, points_mm_xyz, patient_position: str = "HFS") -> np.ndarray:
    """The seed's beam's-eye-view coordinates (x, y, z) mm of patient points (..., 3)."""
    return beam.patient_to_beam(points_mm_xyz, patient_position)


def normalise_label(label: str) -> str:
    """A label as the seed compares it: lower case, all white space removed."""
    return re.sub(r"\s+", "", str(label).lower())


def _check_unique(labels: Sequence[str], where: str) -> None:
    seen: dict[str, str] = {}
    for lab in labels:
        key = normalise_label(lab)
        if key in seen:
            raise DuplicateLabelError(f"{where}: labels {seen[key]!r} and {lab!r} are the same after lower-casing and "
                                      f"removing spaces ({key!r}); give the points distinct labels (e.g. leading "
                                      "zeros: '01 1 11' and '1 01 11')")
        seen[key] = lab


def add_point_in_bev(patient: Patient, beam: Beam, label: str, bev_mm_xyz) -> Patient:
    """A new patient with a point placed in ``beam``'s beam's-eye view (the seed's "Add Point
    In BEV"): the point is stored in patient coordinates and does not follow the beam later."""
    p = point_from_bev(beam, bev_mm_xyz, patient.patient_position)
    new = PointOfInterest(label, tuple(float(v) for v in p))
    _check_unique([q.label for q in patient.points] + [label], f"point {label!r}")
    return patient.with_points(new)


# --------------------------------------------------------------------------- doses
@dataclass(frozen=True, eq=False)
class PointDoses:
    """Dose per point per beam.

    labels : (n,) point labels.
    positions_mm_xyz : (n, 3) patient coordinates.
    beam_names : (b,) beam names.
    per_beam_gy : (n, b) float64 dose of each beam at each point.
    bev_mm_xyz : (n, b, 3) each point in each beam's BEV frame (seed's, = IEC BLD).
    plan_id : the plan's ID when known (printed on the outputs).
    """

    labels: tuple[str, ...]
    positions_mm_xyz: np.ndarray
    beam_names: tuple[str, ...]
    per_beam_gy: np.ndarray
    bev_mm_xyz: np.ndarray
    plan_id: int | None = None

    @property
    def total_gy(self) -> np.ndarray:
        """(n,) dose of all beams together."""
        return self.per_beam_gy.sum(axis=1)

    def values(self) -> list["PointValue"]:
        """(label, total dose) of each point, for :func:`write_point_file`."""
        return [PointValue(lab, float(v)) for lab, v in zip(self.labels, self.total_gy)]


def _beam_point_dose(engine, b: int, pts: np.ndarray) -> np.ndarray:
    from ids_engine import backend

    st = engine._state[b]
    # The engine evaluates each beam's point dose from its own convolved maps (what
    # DoseEngine.dose_at_points sums over beams); asking per beam gives the contributions.
    return np.asarray(backend.asnumpy(engine._point_dose_beam(b, pts, st.maps["fine"], st.maps["coarse"])),
                      dtype=np.float64).reshape(-1)


def point_doses(engine, points: Sequence[PointOfInterest] | None = None, *, plan_id: int | None = None) -> PointDoses:
    """Dose of each beam at each point (the engine's reference point dose: each point's own
    BEV position and radiological depth, :meth:`DoseEngine.dose_at_points`, beam by beam).

    ``points``: default the patient's points. Points outside the CT grid get 0 Gy.
    Labels must be unique after normalisation (:class:`DuplicateLabelError`).
    """
    pts_list = list(engine.patient.points if points is None else points)
    if not pts_list:
        raise ValueError("point_doses: no points (the patient has none and none were given)")
    labels = tuple(p.label for p in pts_list)
    _check_unique(labels, "points")
    pts = np.array([p.position_mm_xyz for p in pts_list], dtype=np.float64)
    pos = engine.patient.patient_position
    per_beam = np.stack([_beam_point_dose(engine, b, pts) for b in range(engine.n_beams)], axis=1)
    bev = np.stack([point_to_bev(g.beam, pts, pos) for g in engine.geometry], axis=1)
    return PointDoses(labels, pts, tuple(g.beam.name for g in engine.geometry), per_beam, bev, plan_id)


def beam_dose_cubes(engine) -> list[np.ndarray]:
    """Each beam's own dose cube (host float32 (z, y, x) Gy), computed one beam at a time
    from the engine's current fluences; the engine's state is restored afterwards (its sum
    equals the plan's dose to float32 round-off, by linearity)."""
    snap = engine.snapshot()
    maps = engine.fluences_host()
    out = []
    try:
        for b in range(engine.n_beams):
            engine.set_fluences([m if k == b else np.zeros_like(m) for k, m in enumerate(maps)])
            out.append(engine.dose_cube_host().copy())
    finally:
        engine.restore(snap)
    return out


def point_doses_report(doses: PointDoses, *, title: str = "Point doses") -> str:
    """A Markdown table: each point's patient coordinates, per-beam dose and total (Gy), then
    each point's coordinates in each beam's BEV frame."""
    lines = [f"# {title}", ""]
    if doses.plan_id is not None:
        lines += [f"Plan ID: {doses.plan_id}", ""]
    head = ["label", "x mm", "y mm", "z mm", *[f"{b} Gy" for b in doses.beam_names], "total Gy"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, lab in enumerate(doses.labels):
        x, y, z = doses.positions_mm_xyz[k]
        cells = [lab, f"{x:.1f}", f"{y:.1f}", f"{z:.1f}", *[f"{v:.4f}" for v in doses.per_beam_gy[k]],
                 f"{doses.total_gy[k]:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Beam's-eye-view coordinates (x, y, z mm; z towards the source, IEC 61217 beam limiting "
              "device frame)", ""]
    head = ["label", *doses.beam_names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, lab in enumerate(doses.labels):
        cells = [lab, *["(" + ", ".join(f"{v:.1f}" for v in doses.bev_mm_xyz[k, b]) + ")"
                        for b in range(len(doses.beam_names))]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the point file
@dataclass(frozen=True)
class PointValue:
    """One entry of a point file: a label and its value (a dose, Gy)."""

    label: str
    value: float
    line: int = 0


_ENTRY = re.compile(r"^\s*<\*(?P<label>.*?)\*>(?P<rest>.*)$")


def _read_entries(path, n_values: int) -> list[tuple[str, tuple[float, ...], int]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise PointFileError(f"{path}: not a text file ({exc.reason})") from exc
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        m = _ENTRY.match(line)
        if m is None:
            raise PointFileError(f"{path}, line {n}: expected '<* label *> value' or a '//' comment, got {raw!r}")
        label = m.group("label").strip()
        if not label:
            raise PointFileError(f"{path}, line {n}: the label between '<*' and '*>' is empty")
        if "<*" in label:
            raise PointFileError(f"{path}, line {n}: '<*' inside a label")
        fields = m.group("rest").split()
        if len(fields) != n_values:
            what = "one value" if n_values == 1 else f"{n_values} numbers (x y z mm)"
            raise PointFileError(f"{path}, line {n}: point {label!r} needs {what} after '*>', got {len(fields)}: "
                                 f"{m.group('rest').strip()!r}")
        vals = []
        for f in fields:
            try:
                v = float(f)
            except ValueError:
                raise PointFileError(f"{path}, line {n}: point {label!r}: {f!r} is not a number") from None
            if not math.isfinite(v):
                raise PointFileError(f"{path}, line {n}: point {label!r}: {f!r} is not finite")
            vals.append(v)
        out.append((label, tuple(vals), n))
    return out


def read_point_file(path, *, scale: float = 1.0) -> list[PointValue]:
    """Read a point file (seed format). ``scale`` converts the file's values to Gy (0.01 for a
    file in cGy). Labels must be unique after normalisation (:class:`DuplicateLabelError`
    naming the file, both labels and their lines)."""
    entries = _read_entries(path, 1)
    seen: dict[str, tuple[str, int]] = {}
    for label, _, n in entries:
        key = normalise_label(label)
        if key in seen:
            raise DuplicateLabelError(f"{path}: labels {seen[key][0]!r} (line {seen[key][1]}) and {label!r} (line {n}) "
                                      f"are the same after lower-casing and removing spaces ({key!r})")
        seen[key] = (label, n)
    return [PointValue(label, vals[0] * float(scale), n) for label, vals, n in entries]


def read_point_positions(path) -> list[PointOfInterest]:
    """Read point positions, ``<* label *> x y z`` (patient mm), one per line, ``//`` comments."""
    entries = _read_entries(path, 3)
    _check_unique([e[0] for e in entries], str(path))
    return [PointOfInterest(label, vals) for label, vals, _ in entries]


def write_point_file(path, values: Sequence, *, title: str = "", unit: str = "Gy", when: _dt.datetime | None = None,
                     decimals: int = 6) -> Path:
    """Write a point file in the seed's format: a ``//`` title line with the date
    (``12-Dec-2000-09:19:19(hr:min:sec)``), a ``//`` header naming the unit, then
    ``<* label *> value`` per point. ``values``: :class:`PointValue` or ``(label, value)``
    pairs. Labels must not contain ``*>`` or line breaks."""
    when = when or _dt.datetime.now()
    stamp = f"{when.day:02d}-{when.strftime('%b')}-{when.year}-{when.strftime('%H:%M:%S')}(hr:min:sec)"
    lines = [f"//{title}     {stamp}", f"// Label          Dose in {unit}"]
    for item in values:
        label, value = (item.label, item.value) if isinstance(item, PointValue) else item
        label = str(label).strip()
        if not label or "*>" in label or "<*" in label or "\n" in label or "\r" in label:
            raise ValueError(f"write_point_file: label {label!r} cannot be written (empty, or holds '<*', '*>' or a "
                             "line break)")
        if not math.isfinite(float(value)):
            raise ValueError(f"write_point_file: point {label!r} has no finite value ({value!r})")
        lines.append(f"<* {label} *> {float(value):.{int(decimals)}f}")
    out = Path(path)
    from ids_engine._files import atomic_text

    atomic_text(out, "\n".join(lines) + "\n")
    return out


# --------------------------------------------------------------------------- comparison
_INT = re.compile(r"\d+")


def rando_key(label: str) -> tuple[int, ...] | None:
    """(slice, row, column) from a label holding exactly three whole numbers (``10 4 7``,
    ``slice 10 row 4 column 7``), else None."""
    nums = _INT.findall(str(label))
    return tuple(int(v) for v in nums) if len(nums) == 3 else None


def _sort_key(label: str):
    k = rando_key(label)
    return (0, k, "") if k is not None else (1, (), normalise_label(label))


@dataclass(frozen=True)
class PointComparisonRow:
    """A computed point matched with a measured one (Gy; differences computed - measured)."""

    label: str
    measured_label: str
    computed_gy: float
    measured_gy: float

    @property
    def difference_gy(self) -> float:
        return self.computed_gy - self.measured_gy

    @property
    def difference_pct(self) -> float:
        """Difference in % of the measured dose (nan when it is 0)."""
        return 100.0 * self.difference_gy / self.measured_gy if self.measured_gy != 0 else float("nan")


@dataclass(frozen=True)
class PointComparison:
    """Computed against measured, matched by label; rows sorted by (slice, row, column)."""

    rows: tuple[PointComparisonRow, ...]
    computed_only: tuple[str, ...]
    measured_only: tuple[str, ...]


def _values(items) -> list[tuple[str, float]]:
    out = []
    for it in items:
        out.append((it.label, float(it.value)) if isinstance(it, PointValue) else (str(it[0]), float(it[1])))
    return out


def compare_points(computed, measured) -> PointComparison:
    """Match computed and measured doses by normalised label (:func:`normalise_label`).

    ``computed``, ``measured``: :class:`PointValue` or ``(label, Gy)`` pairs (e.g.
    ``PointDoses.values()`` and :func:`read_point_file`). Duplicate labels after
    normalisation on either side raise :class:`DuplicateLabelError` naming both.
    """
    comp = _values(computed)
    meas = _values(measured)
    _check_unique([c[0] for c in comp], "computed points")
    _check_unique([m[0] for m in meas], "measured points")
    by_key = {normalise_label(lab): (lab, v) for lab, v in meas}
    rows, only_c = [], []
    used = set()
    for lab, v in comp:
        key = normalise_label(lab)
        if key in by_key:
            mlab, mv = by_key[key]
            rows.append(PointComparisonRow(lab, mlab, v, mv))
            used.add(key)
        else:
            only_c.append(lab)
    only_m = [lab for lab, _ in meas if normalise_label(lab) not in used]
    rows.sort(key=lambda r: _sort_key(r.label))
    return PointComparison(tuple(rows), tuple(sorted(only_c, key=_sort_key)), tuple(sorted(only_m, key=_sort_key)))


def comparison_report(cmp: PointComparison, *, title: str = "Computed and measured point doses",
                      plan_id: int | None = None) -> str:
    """The comparison as Markdown: one row per matched point, sorted by slice, row and column
    (the seed's Rando-phantom report), differences in Gy and % of the measured dose, then a
    summary and the labels found on one side only."""
    lines = [f"# {title}", ""]
    if plan_id is not None:
        lines += [f"Plan ID: {plan_id}", ""]
    lines += ["| label | slice | row | column | computed Gy | measured Gy | difference Gy | difference % |",
              "|---|---|---|---|---|---|---|---|"]
    for r in cmp.rows:
        key = rando_key(r.label)
        src = ["", "", ""] if key is None else [str(v) for v in key]
        pct = "" if math.isnan(r.difference_pct) else f"{r.difference_pct:+.2f}"
        lines.append(f"| {r.label} | {src[0]} | {src[1]} | {src[2]} | {r.computed_gy:.4f} | {r.measured_gy:.4f} m "
                     f"| {r.difference_gy:+.4f} | {pct} |")
    lines.append("")
    if cmp.rows:
        d = np.array([r.difference_gy for r in cmp.rows])
        p = np.array([r.difference_pct for r in cmp.rows])
        p = p[np.isfinite(p)]
        lines.append(f"{len(cmp.rows)} points matched: mean difference {d.mean():+.4f} Gy "
                     f"(largest {d[np.argmax(np.abs(d))]:+.4f} Gy)"
                     + (f", mean {p.mean():+.2f} %, mean |difference| {np.abs(p).mean():.2f} %, largest "
                        f"{p[np.argmax(np.abs(p))]:+.2f} %" if p.size else "") + ".")
    else:
        lines.append("No point matched.")
    if cmp.computed_only:
        lines.append(f"\nComputed only (no measured value): {', '.join(cmp.computed_only)}")
    if cmp.measured_only:
        lines.append(f"\nMeasured only (no computed point): {', '.join(cmp.measured_only)}")
    return "\n".join(lines) + "\n"
