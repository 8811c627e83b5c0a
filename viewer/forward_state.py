"""What the forward-planning dialog edits, without Qt: a plan book on one patient, the doses
per MU of each plan's beams, and the auto-weight results (seed 001, issue 12).

:class:`ForwardState` keeps the window's patient (plus the points the user adds), its own
:class:`~ids_engine.planning.PlanBook` and a cache of
:class:`~ids_engine.planning.BeamDoses` by the plans' beams (so that point doses, a new
prescription or a new auto weight do not run the engine again). Every plan change goes
through the library (:meth:`Plan.changed` via the book), so the plan ID rules are the
library's. The slow parts (:meth:`doses`, :meth:`conform`, :meth:`point_table`,
:meth:`run_auto_weight`, :meth:`write_summary`) are plain functions of the state that the
dialog runs off the GUI thread, one at a time; the quick edits run on the GUI thread.

The auto-weight comparison rows and their whole-MU installation are those of ``ids
autoweight`` (:mod:`ids_engine.cli_forward`): the same volume metrics, MU rounded with
``np.rint`` and installed as a :class:`~ids_engine.planning.MonitorUnits` prescription.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ids_engine.cli_forward import _metrics
from ids_engine.evaluation import add_point_in_bev, physics_summary, write_physics_summary
from ids_engine.evaluation._physics_summary import write_physics_summary_pdf
from ids_engine.model import Beam, PointOfInterest
from ids_engine.planning import (
    AutoWeightInfeasible, AutoWeightProblem, BeamDoses, BeamField, MonitorUnits, Plan, PlanBook,
    apply_prescription, auto_weight, copy_beam, make_conformed_beams, mirror_field,
    move_isocentres, new_beam, parallel_opposed,
)

from ._shown import ShownPlan

__all__ = ["AutoWeightRow", "ForwardState", "ForwardStateError", "PointRow"]

METHODS = ("simplex", "cimmino", "downhill", "annealing")
KEEP_DOSES = 4  # BeamDoses kept (plans' beam sets)


class ForwardStateError(ValueError):
    """An edit the forward-planning state refuses (names the plan, beam or point)."""


@dataclass(frozen=True)
class PointRow:
    """One point's dose for the plan's MU: ``beam_gy`` (n_beams,) and ``total_gy``."""

    label: str
    position_mm_xyz: tuple[float, float, float]
    beam_gy: tuple[float, ...]
    total_gy: float


@dataclass(frozen=True)
class AutoWeightRow:
    """One method's result: whole MU per beam (``mu``), the exact solution (``mu_exact``),
    the volumes' min/max/mean dose (Gy, every voxel, for the whole MU), or ``error``."""

    method: str
    mu: tuple[float, ...] = ()
    mu_exact: tuple[float, ...] = ()
    volumes: dict | None = None
    limits_met: bool = False
    violations: tuple[str, ...] = ()
    time_s: float = 0.0
    error: str = ""
    beams_key: str = ""


def _open_field(width_mm: float, height_mm: float) -> BeamField:
    return BeamField((-width_mm / 2, width_mm / 2), (-height_mm / 2, height_mm / 2))


class ForwardState:
    """Parameters
    ----------
    patient : the window's patient (frozen; points added here make new patients).
    machine : the beam model (the window's engine's), or None for the default.
    case_label : how outputs name the case (never a patient identifier).
    case_spec : the case description the session was built from (e.g. ``{"phantom":
        "horseshoe", "resolution": "coarse"}``), saved in the plan book so that ``ids planbook
        FOLDER dvh|summary`` can rebuild the patient; None: not saved.
    """

    def __init__(self, patient, machine=None, case_label: str = "", case_spec: dict | None = None) -> None:
        self.patient = patient
        self.machine = machine
        self.case_label = case_label
        self.book = PlanBook({"viewer": case_label, **({"spec": dict(case_spec)} if case_spec else {})})
        self._doses: dict[str, BeamDoses] = {}
        # Each plan's normalisation point dose per MU, by (beams, point position): the 100 %
        # of a displayed plan, without running the engine again.
        self._norm_rates: dict[tuple, np.ndarray] = {}
        self.auto_rows: list[AutoWeightRow] = []
        self.auto_goals: list = []

    # ------------------------------------------------------------------ plans
    @property
    def plan(self) -> Plan:
        return self.book.current

    def default_isocentre_mm_xyz(self) -> tuple[float, float, float]:
        """The first target's centroid (the origin without a target)."""
        for s in self.patient.targets:
            if not s.is_empty:
                return tuple(float(v) for v in s.centroid_xyz())
        return (0.0, 0.0, 0.0)

    def new_plan(self, name: str) -> Plan:
        return self.book.create(name)

    def copy_plan(self, new_name: str) -> Plan:
        return self.book.copy(self.book.selected, new_name)

    def rename_plan(self, new_name: str) -> Plan:
        return self.book.rename(self.book.selected, new_name)

    def delete_plan(self) -> None:
        self.book.delete(self.book.selected)

    def select_plan(self, name: str) -> Plan:
        return self.book.select(name)

    def _put(self, plan: Plan) -> Plan:
        return self.book.put(plan)

    def save_book(self, folder) -> Path:
        """Write the plan book (``planbook.json`` + ``.npz``) into ``folder``, with the
        patient's points in its case record (``ids planbook FOLDER dvh|summary`` rebuild the
        case from it)."""
        self.book.case["points"] = [{"label": q.label, "position_mm_xyz": list(q.position_mm_xyz)}
                                    for q in self.patient.points]
        return self.book.save(folder)

    def load_book(self, folder) -> None:
        """Replace the plans by a saved book's. A book saved for another case is refused
        (its ``case`` names the case it was made on)."""
        book = PlanBook.load(folder)
        if book.case.get("viewer") not in (None, self.case_label):
            raise ForwardStateError(f"{folder}: the plan book is for {book.case.get('viewer')!r}, "
                                    f"not for {self.case_label!r}")
        if book.selected is None and len(book):
            book.select(book.names[0])
        self.book = book
        self.auto_rows, self.auto_goals = [], []

    # ------------------------------------------------------------------ beams
    def add_beam(self, *, gantry_deg: float = 0.0, couch_deg: float = 0.0, collimator_deg: float = 0.0,
                 width_mm: float = 100.0, height_mm: float = 100.0, name: str | None = None) -> Plan:
        """A new beam with an open field (jaws ``width_mm`` x ``height_mm`` at the isocentre
        plane); it takes the prior beam's isocentre (the first: :meth:`default_isocentre_mm_xyz`)."""
        p = self.plan
        iso = None if p.beams else self.default_isocentre_mm_xyz()
        b = new_beam(p.beams, name, isocentre_mm_xyz=iso, gantry_deg=float(gantry_deg) % 360.0,
                     couch_deg=float(couch_deg) % 360.0, collimator_deg=float(collimator_deg) % 360.0)
        return self._put(p.add_beam(b, _open_field(width_mm, height_mm)))

    def copy_beam(self, index: int) -> Plan:
        p = self.plan
        return self._put(p.add_beam(copy_beam(p.beams, index), p.fields[index]))

    def opposed_beam(self, index: int) -> Plan:
        p = self.plan
        return self._put(p.add_beam(parallel_opposed(p.beams, index), mirror_field(p.fields[index])))

    def delete_beam(self, index: int) -> Plan:
        return self._put(self.plan.remove_beam(index))

    def move_isocentres(self, index: int) -> Plan:
        p = self.plan
        return self._put(p.with_beams(move_isocentres(p.beams, index), p.fields, p.mu))

    def set_isocentre(self, index: int, position_mm_xyz) -> Plan:
        """Move one beam's isocentre (patient mm); its fluence grid is reset, as
        :func:`~ids_engine.planning.move_isocentres` does. New beams then take it from the
        prior beam, and "move isocentres" spreads it to the others."""
        xyz = tuple(float(v) for v in position_mm_xyz)
        if len(xyz) != 3 or not all(np.isfinite(xyz)):
            raise ForwardStateError(f"isocentre: give three finite coordinates (x, y, z) mm, got {position_mm_xyz!r}")
        p = self.plan
        i = p.beam_index(index)
        beams = list(p.beams)
        beams[i] = replace(beams[i], isocentre_mm_xyz=xyz, fluence_grid=None)
        return self._put(p.with_beams(beams, p.fields, p.mu))

    def set_normalisation(self, ref) -> Plan:
        return self._put(self.plan.changed(normalisation=ref))

    def conformed_beams(self, *, target: str, target_margin_mm: float = 0.0, avoid: dict | None = None,
                        start_deg: float = 0.0, length_deg: float = 360.0, increment_deg: float = 40.0,
                        direction: str = "CW", leaf_mode: str = "centre", min_area_mm2: float = 0.0):
        """Make Conformed Beams for the selected plan (slow: run off the GUI thread); returns
        the :class:`~ids_engine.planning.ConformedBeam` list for :meth:`add_conformed`."""
        return make_conformed_beams(self.patient, target, target_margin_mm=target_margin_mm, avoid=avoid or {},
                                    start_deg=start_deg, length_deg=length_deg, increment_deg=increment_deg,
                                    direction=direction, leaf_mode=leaf_mode, min_area_mm2=min_area_mm2,
                                    machine=self.machine, existing=self.plan.beams)

    def add_conformed(self, conformed: Sequence) -> Plan:
        """Add conformed beams (MLC aperture fields) to the selected plan: one plan change."""
        p = self.plan
        names = {b.name for b in p.beams}
        clash = [cb.beam.name for cb in conformed if cb.beam.name in names]
        if clash:
            raise ForwardStateError(f"plan {p.name!r}: beams {clash} exist already (the plan changed meanwhile)")
        beams = p.beams + tuple(cb.beam for cb in conformed)
        fields_ = p.fields + tuple(BeamField(tuple(cb.aperture.jaw_x_mm), tuple(cb.aperture.jaw_y_mm),
                                             aperture=cb.aperture) for cb in conformed)
        return self._put(p.with_beams(beams, fields_, p.mu + (0.0,) * len(conformed)))

    # ------------------------------------------------------------------ points
    def add_point(self, label: str, position_mm_xyz) -> None:
        label = str(label).strip()
        if not label:
            raise ForwardStateError("a point needs a label")
        if label in [q.label for q in self.patient.points]:
            raise ForwardStateError(f"a point {label!r} exists already")
        xyz = tuple(float(v) for v in position_mm_xyz)
        if len(xyz) != 3 or not all(np.isfinite(xyz)):
            raise ForwardStateError(f"point {label!r}: give three finite coordinates (x, y, z) mm")
        self.patient = self.patient.with_points(PointOfInterest(label, xyz))

    def add_point_bev(self, beam_index: int, label: str, bev_mm_xyz) -> None:
        """A point given in beam ``beam_index``'s BEV frame (IEC beam limiting device: origin at
        the isocentre, z towards the source), stored in patient coordinates."""
        label = str(label).strip()
        if not label:
            raise ForwardStateError("a point needs a label")
        beam = self.plan.beams[self.plan.beam_index(beam_index)]
        self.patient = add_point_in_bev(self.patient, beam, label, [float(v) for v in bev_mm_xyz])

    def point_users(self, label: str) -> list[str]:
        """Which plans use the point ``label`` (as normalisation or prescription point)."""
        users = []
        for name in self.book.names:
            p = self.book.get(name)
            if p.normalisation.kind == "point" and p.normalisation.label == label:
                users.append(f"the normalisation point of plan {name!r}")
            if any(r is not None and r.kind == "point" and r.label == label
                   for r in getattr(p.prescription, "points", None) or ()):
                users.append(f"a prescription point of plan {name!r}")
        return users

    def _point_index(self, label: str) -> int:
        labels = [q.label for q in self.patient.points]
        if label not in labels:
            raise ForwardStateError(f"no point {label!r}; points: {', '.join(labels) or 'none'}")
        return labels.index(label)

    def remove_point(self, label: str) -> None:
        """Remove a point (refused while a plan uses it as its normalisation or
        prescription point: its MU would then refer to a point that is gone)."""
        k = self._point_index(label)
        users = self.point_users(label)
        if users:
            raise ForwardStateError(f"point {label!r} is {' and '.join(users)}: choose another point there first")
        pts = self.patient.points
        self.patient = replace(self.patient, points=pts[:k] + pts[k + 1:])

    def edit_point(self, label: str, new_label: str | None = None, position_mm_xyz=None) -> None:
        """Rename a point and/or move it (patient mm); refused for a point a plan uses, as
        :meth:`remove_point` is (its plans' doses would change under the same plan ID)."""
        k = self._point_index(label)
        q = self.patient.points[k]
        new_label = q.label if new_label is None else str(new_label).strip()
        if not new_label:
            raise ForwardStateError("a point needs a label")
        if new_label != label and new_label in [p.label for p in self.patient.points]:
            raise ForwardStateError(f"a point {new_label!r} exists already")
        xyz = q.position_mm_xyz if position_mm_xyz is None else tuple(float(v) for v in position_mm_xyz)
        if len(xyz) != 3 or not all(np.isfinite(xyz)):
            raise ForwardStateError(f"point {new_label!r}: give three finite coordinates (x, y, z) mm")
        if (new_label, tuple(xyz)) == (q.label, tuple(q.position_mm_xyz)):
            return
        users = self.point_users(label)
        if users:
            raise ForwardStateError(f"point {label!r} is {' and '.join(users)}: choose another point there first")
        pts = list(self.patient.points)
        pts[k] = replace(q, label=new_label, position_mm_xyz=tuple(xyz))
        self.patient = replace(self.patient, points=tuple(pts))

    # ------------------------------------------------------------------ doses (slow)
    def cached_doses(self, plan: Plan | None = None) -> BeamDoses | None:
        plan = plan or self.plan
        return self._doses.get(plan.beams_key())

    def doses(self, plan: Plan | None = None, progress=None) -> BeamDoses:
        """Each beam's dose per MU for ``plan`` (cached by its beams and fields)."""
        plan = plan or self.plan
        key = plan.beams_key()
        if key not in self._doses:
            d = BeamDoses(self.patient, plan, self.machine, progress=progress)
            while len(self._doses) >= KEEP_DOSES:  # each holds a dose cube per beam: keep the newest few
                self._doses.pop(next(iter(self._doses)))
            self._doses[key] = d
        return self._doses[key]

    def shown_plan(self, plan: Plan | None = None, progress=None, *, compute: bool = True) -> ShownPlan | None:
        """The plan as the main window displays it (:class:`~._shown.ShownPlan`): its dose
        for its MU, 100 % = its normalisation point's dose. With ``compute`` False, None
        unless the doses per MU and the normalisation point's dose are cached (no engine run:
        safe on the GUI thread); otherwise slow (run it off the GUI thread)."""
        plan = plan or self.plan
        if plan.n_beams == 0:
            raise ForwardStateError(f"plan {plan.name!r} has no beams")
        d = self.cached_doses(plan)
        if d is None:
            if not compute:
                return None
            d = self.doses(plan, progress)
        xyz = np.asarray(plan.normalisation.position_mm_xyz(plan, self.patient), dtype=np.float64)
        key = (plan.beams_key(), tuple(np.round(xyz, 4)))
        rates = self._norm_rates.get(key)
        if rates is None:
            if not compute:
                return None
            rates = self._norm_rates[key] = d.at_points(xyz[None])[0]
        mu = tuple(plan.mu)
        ref = float(rates @ np.asarray(mu, dtype=np.float64))
        note = f"{plan.normalisation.describe(plan)}, {ref:.4g} Gy"
        if not ref > 0:  # e.g. the normalisation point lies outside every field
            top = float(d.dose(mu).max())
            ref, note = (top, "the plan's maximum: its normalisation point gets no dose") if top > 0 else \
                (1.0, "1 Gy: the plan gives no dose")
        return ShownPlan(plan.name, plan.plan_id, ref, functools.partial(d.dose, mu), self.patient, note)

    def plan_dose(self, name: str, progress=None) -> np.ndarray:
        """A book plan's dose for its MU (host (z, y, x) Gy; slow when its doses per MU are
        not cached)."""
        plan = self.book.get(name)
        if plan.n_beams == 0:
            raise ForwardStateError(f"plan {name!r} has no beams")
        return self.doses(plan, progress).dose(plan.mu)

    def point_table(self, plan: Plan, progress=None) -> list[PointRow]:
        """Dose per point per beam for the plan's MU (every point of the patient)."""
        d = self.doses(plan, progress)
        pts = list(self.patient.points)
        if not pts:
            return []
        rates = d.at_points(np.array([p.position_mm_xyz for p in pts], dtype=np.float64))
        mu = np.asarray(plan.mu, dtype=np.float64)
        return [PointRow(p.label, tuple(p.position_mm_xyz), tuple(float(v) for v in r * mu), float(r @ mu))
                for p, r in zip(pts, rates)]

    def prescribe(self, plan: Plan, prescription, progress=None):
        """The plan with ``prescription`` applied (whole MU) and the MUResult; not yet in the book."""
        d = self.doses(plan, progress)
        return apply_prescription(plan, self.patient, d, prescription)

    def run_auto_weight(self, plan: Plan, goals: Sequence, methods: Sequence[str], *,
                        points_per_volume: int = 2000, seed: int = 0, progress=None) -> list[AutoWeightRow]:
        """Solve the MU with each method; rows as ``ids autoweight``'s comparison."""
        d = self.doses(plan, progress)
        problem = AutoWeightProblem.from_doses(d, self.patient, list(goals), max_points=points_per_volume, seed=seed)
        rows = []
        for m in methods:
            kw = {"seed": seed} if m == "annealing" else {}
            t0 = time.perf_counter()
            try:
                res = auto_weight(problem, m, **kw)
            except AutoWeightInfeasible as exc:
                rows.append(AutoWeightRow(m, error=str(exc), time_s=time.perf_counter() - t0,
                                          beams_key=plan.beams_key()))
                continue
            mu = tuple(float(v) for v in np.rint(res.mu))
            rows.append(AutoWeightRow(m, mu, tuple(float(v) for v in res.mu), _metrics(d.dose(mu), self.patient, goals),
                                      res.feasible, tuple(str(v) for v in res.violations), res.time_s,
                                      beams_key=plan.beams_key()))
        return rows

    def apply_auto_weight(self, row: AutoWeightRow) -> Plan:
        """Install a result's whole MU in the selected plan (a MonitorUnits prescription)."""
        p = self.plan
        if row.error:
            raise ForwardStateError(f"{row.method} found no solution: nothing to apply")
        if row.beams_key != p.beams_key():
            raise ForwardStateError(f"plan {p.name!r}: its beams changed since the auto weight ran; run it again")
        d = self.cached_doses(p)
        if d is None:
            raise ForwardStateError(f"plan {p.name!r}: no doses per MU; run the auto weight again")
        new, _ = apply_prescription(p, self.patient, d, MonitorUnits(row.mu))
        return self._put(new)

    def write_summary(self, plan: Plan, folder, prescription_gy: float | None = None,
                      progress=None, *, pdf: bool = True) -> tuple[Path, ...]:
        """The plan's physics summary in ``folder``: Markdown and HTML, and PDF with ``pdf``
        (same stem, ``physics_<plan>_id<ID>``); returns the paths written."""
        if plan.n_beams == 0:
            raise ForwardStateError(f"plan {plan.name!r} has no beams")
        d = self.doses(plan, progress)
        s = physics_summary(plan, self.patient, d, case_label=self.case_label, prescription_gy=prescription_gy)
        md, html = write_physics_summary(folder, s)
        if not pdf:
            return md, html
        return md, html, write_physics_summary_pdf(md.with_suffix(".pdf"), s)


def beam_row(b: Beam, f: BeamField, mu: float) -> list[str]:
    """The beam table's cells: name, gantry, couch, collimator, isocentre, field, MU."""
    iso = ", ".join(f"{v:.1f}" for v in b.isocentre_mm_xyz)
    return [b.name, f"{b.gantry_deg:g}", f"{b.couch_deg:g}", f"{b.collimator_deg:g}", f"({iso})", f.describe(),
            f"{mu:g}"]

