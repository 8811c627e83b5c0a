"""Forward plans and the plan book (seed 001, "Plans Toolbar" and "Print Physics Summary").

A :class:`Plan` keeps its beams (plain :class:`~ids_engine.model.Beam` values), one
:class:`BeamField` per beam (an open jaw rectangle, an MLC aperture or a fluence map per
MU), the prescription, the normalisation point, the monitor units per beam and a plan ID.

**The plan ID increments in exactly one place**, :meth:`Plan.changed`: every change of a
plan goes through it, and it adds one to the ID when a dose-affecting field (beams, fields,
monitor units, prescription, normalisation point) differs. Renaming and copying do not
change the dose and keep the ID. The ID is printed on every output (physics summary,
comparison tables) so that a print-out can be matched to the plan it belongs to.

A :class:`PlanBook` holds the plans of one patient: create, copy under a new name (the old
plan stays), rename, delete, select; saved as ``planbook.json`` plus ``planbook.npz`` for
the arrays (apertures' leaves, fluence maps), both written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ids_engine._files import atomic_npz, atomic_text
from ids_engine.deliver import Aperture, aperture_fluence
from ids_engine.model import Beam, FluenceGrid
from ids_engine.model._mlc import MLC, default_mlc

from ._prescription import (
    DoseToNormalisation,
    DoseToPoints,
    MonitorUnits,
    PointRef,
    prescription_from_dict,
    prescription_to_dict,
)

__all__ = ["BeamField", "Plan", "PlanBook", "PlanBookError", "PLANBOOK_JSON", "PLANBOOK_NPZ"]

PLANBOOK_JSON = "planbook.json"
PLANBOOK_NPZ = "planbook.npz"
FORMAT_VERSION = 1

# The fields of a Plan whose change changes the dose (or how it is prescribed and
# normalised, which the physics summary prints): a change of any of them increments the ID.
DOSE_FIELDS = ("beams", "fields", "mu", "prescription", "normalisation")


class PlanBookError(ValueError):
    """A plan-book operation that cannot be done, or a plan-book file that cannot be read
    (names the plan, the file and the field)."""


@dataclass(frozen=True, eq=False)
class BeamField:
    """What a beam delivers per monitor unit: an open jaw rectangle, an MLC aperture, or a
    fluence map.

    Parameters
    ----------
    jaw_x_mm, jaw_y_mm : (lower, upper) jaw positions along X_b and Y_b at the isocentre
        plane (IEC 61217 beam limiting device frame, mm); an open field when neither
        ``aperture`` nor ``fluence_per_mu`` is given.
    aperture : an MLC aperture (its own jaws are used); delivered through ``mlc`` (the
        machine's, or :func:`~ids_engine.model.default_mlc`).
    fluence_per_mu : (nv, nu) float32 fluence of one MU on the beam's own
        ``fluence_grid`` (which must then be set).
    """

    jaw_x_mm: tuple[float, float] = (-50.0, 50.0)
    jaw_y_mm: tuple[float, float] = (-50.0, 50.0)
    aperture: Aperture | None = None
    fluence_per_mu: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("jaw_x_mm", "jaw_y_mm"):
            j = tuple(float(v) for v in getattr(self, name))
            if len(j) != 2 or not all(np.isfinite(j)) or j[0] >= j[1]:
                raise ValueError(f"BeamField.{name} must be (lower, upper) with lower < upper, got {getattr(self, name)!r}")
            object.__setattr__(self, name, j)
        if self.aperture is not None and self.fluence_per_mu is not None:
            raise ValueError("BeamField: give an aperture or a fluence map, not both")
        if self.fluence_per_mu is not None:
            f = np.array(self.fluence_per_mu, dtype=np.float32)
            if f.ndim != 2 or not np.all(np.isfinite(f)) or np.any(f < 0):
                raise ValueError("BeamField.fluence_per_mu must be a 2-D map of finite values >= 0")
            f.setflags(write=False)
            object.__setattr__(self, "fluence_per_mu", f)

    @property
    def kind(self) -> str:
        return "aperture" if self.aperture is not None else "fluence" if self.fluence_per_mu is not None else "open"

    def fluence(self, grid: FluenceGrid, mlc: MLC | None = None) -> np.ndarray:
        """(nv, nu) float32 fluence of one MU on ``grid`` (the beam's fluence grid)."""
        if self.fluence_per_mu is not None:
            if self.fluence_per_mu.shape != grid.shape_vu:
                raise ValueError(f"BeamField: fluence map shape {self.fluence_per_mu.shape} is not the beam's "
                                 f"fluence grid {grid.shape_vu}")
            return self.fluence_per_mu.copy()
        if self.aperture is not None:
            return aperture_fluence(self.aperture, mlc or default_mlc(), grid)
        return aperture_fluence(_open_aperture(self.jaw_x_mm, self.jaw_y_mm, mlc or default_mlc()), mlc or default_mlc(),
                                grid, transmission=0.0)

    def describe(self) -> str:
        if self.kind == "open":
            w, h = self.jaw_x_mm[1] - self.jaw_x_mm[0], self.jaw_y_mm[1] - self.jaw_y_mm[0]
            return f"open {w:g} x {h:g} mm"
        if self.kind == "aperture":
            return "MLC aperture"
        return "fluence map"

    def key(self) -> str:
        """A content hash: equal keys deliver equal fluence."""
        h = hashlib.sha1(f"{self.kind}|{self.jaw_x_mm}|{self.jaw_y_mm}".encode())
        if self.aperture is not None:
            a = self.aperture
            h.update(np.ascontiguousarray(a.leaf_x1_mm).tobytes() + np.ascontiguousarray(a.leaf_x2_mm).tobytes())
            h.update(f"{a.jaw_x_mm}{a.jaw_y_mm}".encode())
        if self.fluence_per_mu is not None:
            h.update(str(self.fluence_per_mu.shape).encode() + self.fluence_per_mu.tobytes())
        return h.hexdigest()


def _open_aperture(jaw_x, jaw_y, mlc: MLC) -> Aperture:
    n = mlc.n_pairs
    return Aperture(np.full(n, jaw_x[0]), np.full(n, jaw_x[1]), jaw_x, jaw_y)


@dataclass(frozen=True, eq=False)
class Plan:
    """One forward plan.

    Parameters
    ----------
    name : the plan's name (unique in its :class:`PlanBook`).
    beams : the beams (IEC 61217 angles, isocentre in DICOM patient coordinates).
    fields : one :class:`BeamField` per beam (default: open 100 x 100 mm).
    mu : monitor units per beam (whole MU once a prescription is applied).
    prescription : :class:`~ids_engine.planning.DoseToPoints`,
        :class:`~ids_engine.planning.MonitorUnits` or
        :class:`~ids_engine.planning.DoseToNormalisation`; None until set.
    normalisation : the normalisation point (:class:`~ids_engine.planning.PointRef`);
        default the first beam's isocentre.
    plan_id : incremented by :meth:`changed` on every dose-affecting change.
    """

    name: str
    beams: tuple[Beam, ...] = ()
    fields: tuple[BeamField, ...] = ()
    mu: tuple[float, ...] = ()
    prescription: "DoseToPoints | MonitorUnits | DoseToNormalisation | None" = None
    normalisation: PointRef = field(default_factory=lambda: PointRef("isocentre", beam=0))
    plan_id: int = 1

    def __post_init__(self) -> None:
        if not str(self.name).strip():
            raise ValueError("Plan.name must be non-empty")
        beams = tuple(self.beams)
        for i, b in enumerate(beams):
            if not isinstance(b, Beam):
                raise ValueError(f"Plan {self.name!r}: beams[{i}] is not a Beam")
        fields_ = tuple(self.fields) if self.fields else tuple(BeamField() for _ in beams)
        if len(fields_) != len(beams):
            raise ValueError(f"Plan {self.name!r}: {len(fields_)} fields for {len(beams)} beams")
        mu = tuple(float(m) for m in self.mu) if self.mu else (0.0,) * len(beams)
        if len(mu) != len(beams):
            raise ValueError(f"Plan {self.name!r}: {len(mu)} MU values for {len(beams)} beams")
        for i, m in enumerate(mu):
            if not (np.isfinite(m) and m >= 0):
                raise ValueError(f"Plan {self.name!r}: mu[{i}] must be finite and >= 0, got {m!r}")
        names = [b.name for b in beams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Plan {self.name!r}: duplicate beam names {dupes}")
        if int(self.plan_id) < 1:
            raise ValueError(f"Plan {self.name!r}: plan_id must be >= 1, got {self.plan_id!r}")
        object.__setattr__(self, "beams", beams)
        object.__setattr__(self, "fields", fields_)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "plan_id", int(self.plan_id))

    @property
    def n_beams(self) -> int:
        return len(self.beams)

    def beam_index(self, name_or_index: "str | int") -> int:
        """The index of a beam given by name or index (ValueError naming the beams otherwise)."""
        if isinstance(name_or_index, (int, np.integer)):
            i = int(name_or_index)
            if not 0 <= i < self.n_beams:
                raise ValueError(f"plan {self.name!r}: beam index {i} outside 0..{self.n_beams - 1}")
            return i
        for i, b in enumerate(self.beams):
            if b.name == name_or_index:
                return i
        raise ValueError(f"plan {self.name!r}: no beam {name_or_index!r}; beams: {', '.join(b.name for b in self.beams) or 'none'}")

    def _dose_key(self) -> tuple:
        return (self.beams, tuple(f.key() for f in self.fields), self.mu,
                prescription_to_dict(self.prescription), self.normalisation)

    def beams_key(self) -> str:
        """A hash of the beams and fields (what per-MU dose depends on; MU excluded)."""
        h = hashlib.sha1(repr(self.beams).encode())
        for f in self.fields:
            h.update(f.key().encode())
        return h.hexdigest()

    def changed(self, **changes) -> "Plan":
        """The plan with ``changes`` applied; THE place where the plan ID increments: by one
        when any dose-affecting field (:data:`DOSE_FIELDS`) differs, unchanged otherwise."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)} | ({"plan_id"} & set(changes)))
        if unknown:
            raise ValueError(f"Plan.changed: cannot change {unknown}")
        new = replace(self, **changes)
        if new._dose_key() != self._dose_key():
            new = replace(new, plan_id=self.plan_id + 1)
        return new

    # -- beam editing (each a dose-affecting change through changed())
    def with_beams(self, beams: Sequence[Beam], fields_: Sequence[BeamField] | None = None,
                   mu: Sequence[float] | None = None) -> "Plan":
        """The plan with a new beam list (fields default to open 100 x 100 mm, MU to 0)."""
        beams = tuple(beams)
        fields_ = tuple(fields_) if fields_ is not None else tuple(BeamField() for _ in beams)
        mu = tuple(mu) if mu is not None else (0.0,) * len(beams)
        return self.changed(beams=beams, fields=fields_, mu=mu)

    def add_beam(self, beam: Beam, field_: BeamField | None = None, mu: float = 0.0) -> "Plan":
        return self.with_beams(self.beams + (beam,), self.fields + (field_ or BeamField(),), self.mu + (float(mu),))

    def remove_beam(self, name_or_index: "str | int") -> "Plan":
        i = self.beam_index(name_or_index)
        keep = [k for k in range(self.n_beams) if k != i]
        return self.with_beams([self.beams[k] for k in keep], [self.fields[k] for k in keep], [self.mu[k] for k in keep])

    def with_mu(self, mu: Sequence[float]) -> "Plan":
        return self.changed(mu=tuple(float(m) for m in mu))

    def summary_line(self) -> str:
        mu = ", ".join(f"{b.name} {m:g}" for b, m in zip(self.beams, self.mu))
        return f"plan {self.name!r} (plan ID {self.plan_id}): {self.n_beams} beams; MU {mu or '-'}"


class PlanBook:
    """The plans of one patient, and which one is selected (a small state object).

    Plans are frozen values; the book replaces them. ``case`` is a free description of the
    patient the plans belong to (e.g. ``{"phantom": "water", "resolution": "coarse"}``),
    saved with the book.
    """

    def __init__(self, case: dict | None = None) -> None:
        self.case: dict = dict(case or {})
        self._plans: dict[str, Plan] = {}
        self.selected: str | None = None

    # -- queries
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._plans)

    def __len__(self) -> int:
        return len(self._plans)

    def __contains__(self, name: str) -> bool:
        return name in self._plans

    def get(self, name: str | None = None) -> Plan:
        """The plan called ``name`` (the selected one by default)."""
        name = self.selected if name is None else name
        if name is None:
            raise PlanBookError("no plan is selected")
        try:
            return self._plans[name]
        except KeyError:
            raise PlanBookError(f"no plan {name!r}; plans: {', '.join(self._plans) or 'none'}") from None

    @property
    def current(self) -> Plan:
        return self.get()

    # -- operations
    def _check_new_name(self, name: str) -> str:
        name = str(name).strip()
        if not name:
            raise PlanBookError("a plan needs a non-empty name")
        if name in self._plans:
            raise PlanBookError(f"a plan called {name!r} exists already; choose another name")
        return name

    def create(self, name: str, beams: Sequence[Beam] = (), fields_: Sequence[BeamField] | None = None, **kw) -> Plan:
        """A new plan (selected)."""
        name = self._check_new_name(name)
        plan = Plan(name, tuple(beams), tuple(fields_) if fields_ is not None else (), **kw)
        self._plans[name] = plan
        self.selected = name
        return plan

    def add(self, plan: Plan, *, select: bool = True) -> Plan:
        self._check_new_name(plan.name)
        self._plans[plan.name] = plan
        if select:
            self.selected = plan.name
        return plan

    def copy(self, source: str, new_name: str) -> Plan:
        """A copy of ``source`` under ``new_name`` (selected); the source stays unchanged.
        The copy keeps the plan ID (same dose); its name tells it apart."""
        plan = self.get(source)
        new_name = self._check_new_name(new_name)
        self._plans[new_name] = replace(plan, name=new_name)
        self.selected = new_name
        return self._plans[new_name]

    def rename(self, old: str, new: str) -> Plan:
        plan = self.get(old)
        new = self._check_new_name(new)
        self._plans = {(new if k == old else k): (replace(plan, name=new) if k == old else v) for k, v in self._plans.items()}
        if self.selected == old:
            self.selected = new
        return self._plans[new]

    def delete(self, name: str) -> None:
        self.get(name)
        del self._plans[name]
        if self.selected == name:
            self.selected = next(iter(self._plans), None)

    def select(self, name: str) -> Plan:
        plan = self.get(name)
        self.selected = name
        return plan

    def update(self, plan_name: str | None = None, /, **changes) -> Plan:
        """Change a plan (the selected one by default) through :meth:`Plan.changed`."""
        plan = self.get(plan_name)
        if "name" in changes:
            raise PlanBookError("use rename() to rename a plan")
        new = plan.changed(**changes)
        self._plans[plan.name] = new
        return new

    def put(self, plan: Plan) -> Plan:
        """Replace the plan of the same name by ``plan`` (a value derived from it through
        :meth:`Plan.changed`, so its ID is already right)."""
        old = self.get(plan.name)
        if plan.plan_id < old.plan_id:
            raise PlanBookError(f"plan {plan.name!r}: plan ID {plan.plan_id} is older than the book's {old.plan_id}")
        self._plans[plan.name] = plan
        return plan

    # -- files
    def save(self, folder: "str | Path") -> Path:
        """Write ``planbook.json`` (and ``planbook.npz`` for arrays) into ``folder``, atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        plans = [_plan_to_dict(p, f"p{k}", arrays) for k, p in enumerate(self._plans.values())]
        doc = {"format": "ids-engine plan book", "version": FORMAT_VERSION, "case": self.case,
               "selected": self.selected, "plans": plans}
        if arrays:
            atomic_npz(folder / PLANBOOK_NPZ, arrays)
        else:
            (folder / PLANBOOK_NPZ).unlink(missing_ok=True)
        atomic_text(folder / PLANBOOK_JSON, json.dumps(doc, indent=1) + "\n")
        return folder / PLANBOOK_JSON

    @classmethod
    def load(cls, folder: "str | Path") -> "PlanBook":
        folder = Path(folder)
        path = folder / PLANBOOK_JSON if folder.is_dir() else folder
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PlanBookError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise PlanBookError(f"{path}: not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != "ids-engine plan book":
            raise PlanBookError(f"{path}: not an ids-engine plan book (field 'format')")
        if doc.get("version") != FORMAT_VERSION:
            raise PlanBookError(f"{path}: version {doc.get('version')!r} is not {FORMAT_VERSION}")
        npz = path.parent / PLANBOOK_NPZ
        arrays = {}
        if npz.exists():
            with np.load(npz) as z:
                arrays = {k: z[k] for k in z.files}
        book = cls(doc.get("case") or {})
        for k, d in enumerate(doc.get("plans") or []):
            try:
                plan = _plan_from_dict(d, arrays)
            except (KeyError, TypeError, ValueError) as exc:
                raise PlanBookError(f"{path}: plans[{k}]: {exc}") from None
            book.add(plan, select=False)
        sel = doc.get("selected")
        if sel is not None and sel not in book:
            raise PlanBookError(f"{path}: selected plan {sel!r} is not in the book")
        book.selected = sel
        return book


# ----------------------------------------------------------------------------- serialisation
def beam_to_dict(b: Beam) -> dict:
    d = {f.name: getattr(b, f.name) for f in fields(b) if f.name != "fluence_grid"}
    d["isocentre_mm_xyz"] = list(b.isocentre_mm_xyz)
    if b.fluence_grid is not None:
        g = b.fluence_grid
        d["fluence_grid"] = {"shape_vu": list(g.shape_vu), "pitch_mm": g.pitch_mm, "origin_mm_uv": list(g.origin_mm_uv)}
    return d


def beam_from_dict(d: dict) -> Beam:
    d = dict(d)
    g = d.pop("fluence_grid", None)
    fg = FluenceGrid(tuple(g["shape_vu"]), g["pitch_mm"], tuple(g["origin_mm_uv"])) if g else None
    return Beam(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}, fluence_grid=fg)


def _plan_to_dict(p: Plan, tag: str, arrays: dict) -> dict:
    fields_out = []
    for j, f in enumerate(p.fields):
        fd = {"kind": f.kind, "jaw_x_mm": list(f.jaw_x_mm), "jaw_y_mm": list(f.jaw_y_mm)}
        if f.aperture is not None:
            a = f.aperture
            arrays[f"{tag}_b{j}_leaf_x1_mm"] = np.asarray(a.leaf_x1_mm)
            arrays[f"{tag}_b{j}_leaf_x2_mm"] = np.asarray(a.leaf_x2_mm)
            fd["aperture"] = {"leaf_x1_mm": f"{tag}_b{j}_leaf_x1_mm", "leaf_x2_mm": f"{tag}_b{j}_leaf_x2_mm",
                              "jaw_x_mm": list(a.jaw_x_mm), "jaw_y_mm": list(a.jaw_y_mm)}
        if f.fluence_per_mu is not None:
            arrays[f"{tag}_b{j}_fluence"] = f.fluence_per_mu
            fd["fluence_per_mu"] = f"{tag}_b{j}_fluence"
        fields_out.append(fd)
    return {"name": p.name, "plan_id": p.plan_id, "beams": [beam_to_dict(b) for b in p.beams], "fields": fields_out,
            "mu": list(p.mu), "prescription": prescription_to_dict(p.prescription),
            "normalisation": p.normalisation.to_dict()}


def _array(arrays: dict, key: str) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"array {key!r} is missing from {PLANBOOK_NPZ}")
    return arrays[key]


def _plan_from_dict(d: dict, arrays: dict) -> Plan:
    beams = tuple(beam_from_dict(b) for b in d["beams"])
    fields_ = []
    for fd in d["fields"]:
        ap = None
        if "aperture" in fd:
            a = fd["aperture"]
            ap = Aperture(_array(arrays, a["leaf_x1_mm"]), _array(arrays, a["leaf_x2_mm"]), tuple(a["jaw_x_mm"]),
                          tuple(a["jaw_y_mm"]))
        fl = _array(arrays, fd["fluence_per_mu"]) if "fluence_per_mu" in fd else None
        fields_.append(BeamField(tuple(fd["jaw_x_mm"]), tuple(fd["jaw_y_mm"]), ap, fl))
    return Plan(d["name"], beams, tuple(fields_), tuple(d["mu"]), prescription_from_dict(d.get("prescription")),
                PointRef.from_dict(d["normalisation"]), int(d["plan_id"]))
