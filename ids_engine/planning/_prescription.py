"""Prescription, normalisation point and monitor units (seed 001, "Dose Prescription and
Normalization Point").

Normalisation point (:class:`PointRef`): a beam's isocentre, a beam's nominal dmax point on
its central axis (the axis's entry into the body plus the nominal dmax depth, 15 mm at
6 MV), or a named point of interest of the patient.

Three prescription modes, as the seed gives them:

* :class:`DoseToPoints`: each beam gives a stated dose to its own point (default its
  isocentre); ``MU_b = D_b / r_b(p_b)`` with ``r_b(p)`` beam ``b``'s dose per MU at ``p``.
* :class:`MonitorUnits`: the MU of each beam are given; the doses follow.
* :class:`DoseToNormalisation`: ``dose_gy`` at ``percent`` of the normalisation point's dose
  ("180 cGy at 95 %" means 95 % of the normalisation point's dose is 180 cGy, so the point
  gets 180 / 0.95 cGy), shared among beams by relative weights: beam ``b`` gives its weight
  point ``p_b`` a dose proportional to ``w_b``, ``MU_b = k w_b / r_b(p_b)`` with ``k`` such
  that ``sum_b MU_b r_b(norm) = dose_gy / (percent / 100)``.

MU are rounded to whole MU and every dose reported (:class:`MUResult`) is the dose of the
rounded MU, which is why it differs slightly from the dose asked for (seed: "the dose is
shown for the monitor units rounded off to a whole number").

Doses per MU come from :class:`BeamDoses`: the dose engine run once per beam with one MU of
that beam's field (``machine.gy_per_mu``, the engine's calibration, 1 cGy/MU at dmax for
10 x 10 cm at SSD 100 cm), kept as per-beam dose cubes and point doses, so that any MU
vector's dose is a weighted sum without running the engine again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ids_engine.model import Patient, PhotonMachine
from ids_engine.model._mlc import default_mlc

if TYPE_CHECKING:  # pragma: no cover
    from ._plan import Plan

__all__ = [
    "BeamDoses",
    "DoseToNormalisation",
    "DoseToPoints",
    "MUResult",
    "MonitorUnits",
    "NOMINAL_DMAX_MM",
    "PointRef",
    "PrescriptionError",
    "apply_prescription",
    "compute_mu",
    "nominal_dmax_mm",
    "normalisation_dose_gy",
]

# Nominal depth of maximum dose on the central axis by nominal energy (MV), mm: typical
# values for clinical linac beams (10 x 10 cm, SSD 100 cm); the seed's example is 1.5 cm at
# 6 MV, which is also the default ids-engine 6 MV model's dmax (15.0 mm).
NOMINAL_DMAX_MM = {4.0: 10.0, 6.0: 15.0, 8.0: 20.0, 10.0: 23.0, 15.0: 29.0, 18.0: 32.0, 20.0: 35.0, 25.0: 38.0}

POINT_KINDS = ("isocentre", "dmax", "point")


class PrescriptionError(ValueError):
    """A prescription that cannot be applied (names the beam, the point or the field)."""


def nominal_dmax_mm(energy_mv: float) -> float:
    """Nominal dmax depth (mm) of a photon beam, linear between the table's energies."""
    e = np.array(sorted(NOMINAL_DMAX_MM))
    return float(np.interp(float(energy_mv), e, [NOMINAL_DMAX_MM[k] for k in e]))


@dataclass(frozen=True)
class PointRef:
    """A point of a plan: a beam's isocentre, a beam's nominal dmax point, or a named point.

    Parameters
    ----------
    kind : "isocentre", "dmax" or "point".
    beam : the beam's index in the plan (isocentre, dmax).
    label : the point of interest's label (point).
    """

    kind: str = "isocentre"
    beam: int | None = 0
    label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in POINT_KINDS:
            raise ValueError(f"PointRef.kind must be one of {POINT_KINDS}, got {self.kind!r}")
        if self.kind == "point":
            if not self.label or not str(self.label).strip():
                raise ValueError("PointRef: a 'point' needs the label of a point of interest")
            object.__setattr__(self, "beam", None)
        else:
            if self.beam is None or int(self.beam) < 0:
                raise ValueError(f"PointRef: a {self.kind!r} point needs a beam index >= 0, got {self.beam!r}")
            object.__setattr__(self, "beam", int(self.beam))
            object.__setattr__(self, "label", None)

    def describe(self, plan: "Plan | None" = None) -> str:
        if self.kind == "point":
            return f"point {self.label}"
        name = plan.beams[self.beam].name if plan is not None and self.beam < plan.n_beams else f"beam {self.beam}"
        return f"{'isocentre' if self.kind == 'isocentre' else 'dmax'} of {name}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "beam": self.beam, "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> "PointRef":
        if not isinstance(d, dict):
            raise ValueError(f"a point must be an object with 'kind', got {d!r}")
        unknown = set(d) - {"kind", "beam", "label"}
        if unknown:
            raise ValueError(f"point: unknown fields {sorted(unknown)}")
        return cls(d.get("kind", "isocentre"), d.get("beam"), d.get("label"))

    def position_mm_xyz(self, plan: "Plan", patient: Patient) -> np.ndarray:
        """The point in DICOM patient coordinates (x, y, z) mm."""
        if self.kind == "point":
            for p in patient.points:
                if p.label == self.label:
                    return np.asarray(p.position_mm_xyz, dtype=np.float64)
            known = ", ".join(p.label for p in patient.points) or "none"
            raise PrescriptionError(f"no point of interest {self.label!r}; the patient's points: {known}")
        if self.beam >= plan.n_beams:
            raise PrescriptionError(f"plan {plan.name!r}: {self.describe()} - the plan has {plan.n_beams} beams")
        beam = plan.beams[self.beam]
        if self.kind == "isocentre":
            return np.asarray(beam.isocentre_mm_xyz, dtype=np.float64)
        return dmax_point_mm_xyz(beam, patient)


def dmax_point_mm_xyz(beam, patient: Patient) -> np.ndarray:
    """The beam's nominal dmax point: on the central axis, the nominal dmax depth
    (:func:`nominal_dmax_mm`) beyond where the axis enters the body."""
    from ids_engine.dose import central_axis_ssd_mm

    dens = patient.relative_electron_density().copy()
    dens[~patient.body_mask()] = 0.0
    ssd = central_axis_ssd_mm(dens, patient.grid, beam, patient.patient_position)
    if ssd is None:
        raise PrescriptionError(f"beam {beam.name!r}: the central axis misses the body, so it has no dmax point")
    d = ssd + nominal_dmax_mm(beam.energy_mv)
    return beam.source_mm_xyz(patient.patient_position) + d * beam.direction_xyz(patient.patient_position)


def _beam_name(plan, b: int) -> str:
    return plan.beams[b].name if plan is not None and b < plan.n_beams else f"beam {b}"


def _points(refs, n: int, where: str) -> tuple[PointRef, ...]:
    if refs is None or len(refs) == 0:
        return tuple(PointRef("isocentre", b) for b in range(n))
    refs = tuple(PointRef("isocentre", b) if r is None else r for b, r in enumerate(refs))
    if len(refs) != n:
        raise ValueError(f"{where}: {len(refs)} points for {n} beams")
    for r in refs:
        if not isinstance(r, PointRef):
            raise ValueError(f"{where}: points must be PointRef values, got {r!r}")
    return refs


def _values(values, where: str, *, positive: bool) -> tuple[float, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}[{i}] must be a number, got {v!r}") from None
        if not np.isfinite(f) or f < 0:
            raise ValueError(f"{where}[{i}] must be finite and >= 0, got {v!r}")
        out.append(f)
    if positive and not any(out):
        raise ValueError(f"{where}: at least one value must be positive")
    return tuple(out)


@dataclass(frozen=True)
class DoseToPoints:
    """Each beam gives ``doses_gy[b]`` to its point ``points[b]`` (default its isocentre)."""

    doses_gy: tuple[float, ...]
    points: tuple[PointRef, ...] = ()

    def __post_init__(self) -> None:
        d = _values(self.doses_gy, "DoseToPoints.doses_gy", positive=True)
        object.__setattr__(self, "doses_gy", d)
        object.__setattr__(self, "points", _points(self.points, len(d), "DoseToPoints.points"))

    def describe(self, plan: "Plan | None" = None) -> str:
        parts = [f"{_beam_name(plan, b)} {d:g} Gy to {p.describe(plan)}" for b, (d, p) in enumerate(zip(self.doses_gy, self.points))]
        return "dose to a point per beam: " + "; ".join(parts)


@dataclass(frozen=True)
class MonitorUnits:
    """The monitor units of each beam (rounded to whole MU when applied); ``points[b]`` is
    where beam ``b``'s dose is reported (default its isocentre)."""

    mu: tuple[float, ...]
    points: tuple[PointRef, ...] = ()

    def __post_init__(self) -> None:
        mu = _values(self.mu, "MonitorUnits.mu", positive=False)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "points", _points(self.points, len(mu), "MonitorUnits.points"))

    def describe(self, plan: "Plan | None" = None) -> str:
        return "monitor units per beam: " + "; ".join(f"{_beam_name(plan, b)} {m:g} MU" for b, m in enumerate(self.mu))


@dataclass(frozen=True)
class DoseToNormalisation:
    """``dose_gy`` at ``percent`` % of the normalisation point's dose; beams weighted by
    ``weights`` (relative dose each gives to its weight point ``points[b]``, default its
    isocentre)."""

    dose_gy: float
    weights: tuple[float, ...]
    percent: float = 100.0
    points: tuple[PointRef, ...] = ()

    def __post_init__(self) -> None:
        d = float(self.dose_gy)
        if not (np.isfinite(d) and d > 0):
            raise ValueError(f"DoseToNormalisation.dose_gy must be positive, got {self.dose_gy!r}")
        p = float(self.percent)
        if not (np.isfinite(p) and p > 0):
            raise ValueError(f"DoseToNormalisation.percent must be positive, got {self.percent!r}")
        w = _values(self.weights, "DoseToNormalisation.weights", positive=True)
        object.__setattr__(self, "dose_gy", d)
        object.__setattr__(self, "percent", p)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "points", _points(self.points, len(w), "DoseToNormalisation.points"))

    def describe(self, plan: "Plan | None" = None) -> str:
        w = "; ".join(f"{_beam_name(plan, b)} weight {w:g} at {p.describe(plan)}"
                      for b, (w, p) in enumerate(zip(self.weights, self.points)))
        return (f"dose to the normalisation point: {self.dose_gy:g} Gy at {self.percent:g} % "
                f"(the point gets {self.normalisation_dose_gy:.4g} Gy); {w}")

    @property
    def normalisation_dose_gy(self) -> float:
        """The dose the normalisation point is to get: ``dose_gy / (percent / 100)``."""
        return self.dose_gy * 100.0 / self.percent


PRESCRIPTIONS = {"dose_to_points": DoseToPoints, "monitor_units": MonitorUnits, "dose_to_normalisation": DoseToNormalisation}


def prescription_to_dict(rx) -> dict | None:
    if rx is None:
        return None
    for mode, cls in PRESCRIPTIONS.items():
        if isinstance(rx, cls):
            d = {"mode": mode}
            for k, v in rx.__dict__.items():
                d[k] = [p.to_dict() for p in v] if k == "points" else (list(v) if isinstance(v, tuple) else v)
            return d
    raise ValueError(f"not a prescription: {rx!r}")


def prescription_from_dict(d: dict | None):
    """A prescription from its dictionary (``{"mode": "dose_to_points", "doses_gy": [...]}`` ...)."""
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("mode") not in PRESCRIPTIONS:
        raise ValueError(f"prescription: 'mode' must be one of {sorted(PRESCRIPTIONS)}, got {d!r}")
    cls = PRESCRIPTIONS[d["mode"]]
    kw = {k: v for k, v in d.items() if k != "mode"}
    allowed = set(cls.__dataclass_fields__)
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"prescription ({d['mode']}): unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "points" in kw:
        kw["points"] = tuple(None if p is None else PointRef.from_dict(p) for p in kw["points"])
    for k in ("doses_gy", "mu", "weights"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return cls(**kw)


# ----------------------------------------------------------------------------- dose per MU
class BeamDoses:
    """Each beam's dose per MU: dose cubes and point doses (the auto weight's dose-rate cache).

    The engine runs once per beam with one MU of that beam's field and nothing else; the
    per-beam cubes are kept on the host, so the dose of any MU vector is a weighted sum, and
    sample matrices of volumes (:meth:`samples`) and point doses (:meth:`at_points`) are
    cached: re-solving an auto weight with new parameters or applying a new prescription does
    not run the engine. Only a change of the plan's beams or fields needs a new
    :class:`BeamDoses` (:meth:`matches` says whether a plan still fits).

    Parameters
    ----------
    patient : the patient.
    plan : the plan (its beams and fields; MU are ignored).
    machine : the beam model (default 6 MV, calibrated by the engine).
    options : :class:`~ids_engine.dose.EngineOptions`.
    engine : an existing :class:`~ids_engine.dose.DoseEngine` built for exactly these beams
        (its fluence is overwritten).

    Attributes
    ----------
    cubes_gy_per_mu : (n_beams, nz, ny, nx) float32, Gy per MU, zero outside the body.
    engine_passes : how many full dose computations the engine has done for this object.
    """

    def __init__(self, patient: Patient, plan: "Plan", machine: PhotonMachine | None = None, *, options=None,
                 engine=None, progress=None) -> None:
        from ids_engine.dose import DoseEngine

        if plan.n_beams == 0:
            raise PrescriptionError(f"plan {plan.name!r} has no beams")
        self.patient = patient
        self.plan_key = plan.beams_key()
        self.plan_name = plan.name
        self.engine = engine or DoseEngine(patient, list(plan.beams), machine, options=options, progress=progress)
        if self.engine.n_beams != plan.n_beams:
            raise ValueError("BeamDoses: the engine's beams are not the plan's")
        self.beams = tuple(self.engine.beams)  # with the fluence grids the engine chose
        mlc = self.engine.machine.mlc or default_mlc()
        self.unit_fluences = [f.fluence(g.fluence_grid, mlc) for f, g in zip(plan.fields, self.engine.geometry)]
        self.engine_passes = 0
        self._point_cache: dict[tuple, np.ndarray] = {}
        self._sample_cache: dict[tuple, np.ndarray] = {}
        # Points a prescription may name: every beam's isocentre and dmax point, every point of interest.
        refs = [plan.beams[b].isocentre_mm_xyz for b in range(plan.n_beams)]
        for b in range(plan.n_beams):
            try:
                refs.append(tuple(dmax_point_mm_xyz(plan.beams[b], patient)))
            except PrescriptionError:
                pass
        refs += [p.position_mm_xyz for p in patient.points]
        refs = np.asarray(refs, dtype=np.float64).reshape(-1, 3)
        cubes, point_rows = [], []
        for b in range(plan.n_beams):
            if progress:
                progress(b, plan.n_beams, "dose per MU")
            self._only(b)
            cubes.append(self.engine.dose_cube_host().astype(np.float32))
            point_rows.append(np.asarray(_host(self.engine.dose_at_points(refs)), dtype=np.float64))
        self.cubes_gy_per_mu = np.stack(cubes)
        rates = np.stack(point_rows, axis=1)
        for p, r in zip(refs, rates):
            self._point_cache[_pkey(p)] = r
        if progress:
            progress(plan.n_beams, plan.n_beams, "dose per MU")

    @property
    def n_beams(self) -> int:
        return len(self.beams)

    def matches(self, plan: "Plan") -> bool:
        """Whether ``plan`` has the beams and fields these doses were computed for."""
        return plan.beams_key() == self.plan_key

    def _only(self, b: int) -> None:
        maps = [f if k == b else np.zeros_like(f) for k, f in enumerate(self.unit_fluences)]
        self.engine.set_fluences(maps)
        self.engine_passes += 1

    def dose(self, mu: Sequence[float]) -> np.ndarray:
        """Dose (Gy) of the MU vector, (nz, ny, nx) float32 on the CT grid."""
        mu = np.asarray(mu, dtype=np.float64).reshape(-1)
        if mu.size != self.n_beams:
            raise ValueError(f"dose: {mu.size} MU values for {self.n_beams} beams")
        return np.tensordot(mu, self.cubes_gy_per_mu, axes=1).astype(np.float32)

    def at_points(self, points_mm_xyz) -> np.ndarray:
        """Dose per MU of each beam at patient points: (n_points, n_beams) float64, Gy/MU
        (the engine's direct point evaluation, each point at its own depth)."""
        pts = np.asarray(points_mm_xyz, dtype=np.float64).reshape(-1, 3)
        missing = [p for p in pts if _pkey(p) not in self._point_cache]
        if missing:
            miss = np.unique(np.asarray(missing), axis=0)
            cols = []
            for b in range(self.n_beams):
                self._only(b)
                cols.append(np.asarray(_host(self.engine.dose_at_points(miss)), dtype=np.float64))
            for p, r in zip(miss, np.stack(cols, axis=1)):
                self._point_cache[_pkey(p)] = r
        return np.stack([self._point_cache[_pkey(p)] for p in pts]) if len(pts) else np.zeros((0, self.n_beams))

    def samples(self, name: str, mask: np.ndarray, *, max_points: int | None = None, seed: int = 0) -> np.ndarray:
        """Dose per MU of each beam at the sample points of a volume: (n_points, n_beams)
        float64, Gy/MU. The points are the volume's voxel centres, all of them or, with
        ``max_points``, that many drawn at random (seeded). Cached per volume and sampling."""
        mask = np.asarray(mask, dtype=bool)
        key = (name, int(mask.sum()), max_points, seed)
        if key not in self._sample_cache:
            idx = np.flatnonzero(mask.ravel())
            if idx.size == 0:
                raise PrescriptionError(f"volume {name!r} is empty")
            if max_points is not None and idx.size > max_points:
                idx = np.sort(np.random.default_rng(seed).choice(idx, size=int(max_points), replace=False))
            flat = self.cubes_gy_per_mu.reshape(self.n_beams, -1)
            self._sample_cache[key] = flat[:, idx].T.astype(np.float64)
        return self._sample_cache[key]


def _host(a) -> np.ndarray:
    from ids_engine import backend

    return backend.asnumpy(a)


def _pkey(p) -> tuple:
    return tuple(round(float(v), 6) for v in p)


# ----------------------------------------------------------------------------- monitor units
@dataclass(frozen=True)
class MUResult:
    """Monitor units of a prescription and the doses they give.

    mu_exact : MU before rounding; mu : whole MU (what the plan gets).
    points : each beam's point (its dose or weight point; its isocentre for MonitorUnits).
    beam_dose_gy : (n_beams,) each beam's own dose at its point, for the rounded MU.
    point_total_gy : (n_beams,) all beams' dose at each beam's point, for the rounded MU.
    normalisation_gy : the normalisation point's dose for the rounded MU.
    """

    mu_exact: tuple[float, ...]
    mu: tuple[float, ...]
    points: tuple[PointRef, ...]
    beam_dose_gy: tuple[float, ...]
    point_total_gy: tuple[float, ...]
    normalisation_gy: float


def compute_mu(plan: "Plan", patient: Patient, doses: BeamDoses, prescription=None) -> MUResult:
    """The MU of a prescription (default the plan's own), rounded to whole MU, and the doses
    of the rounded MU (see the module docstring for the three modes)."""
    rx = prescription if prescription is not None else plan.prescription
    if rx is None:
        raise PrescriptionError(f"plan {plan.name!r} has no prescription")
    if not doses.matches(plan):
        raise PrescriptionError(f"plan {plan.name!r}: its beams changed since the doses per MU were computed")
    n = plan.n_beams
    points = rx.points
    values = rx.mu if isinstance(rx, MonitorUnits) else rx.doses_gy if isinstance(rx, DoseToPoints) else rx.weights
    if len(values) != n:
        raise PrescriptionError(f"plan {plan.name!r}: the prescription has {len(values)} values for {n} beams")
    pos = np.stack([p.position_mm_xyz(plan, patient) for p in points])
    rate = doses.at_points(pos)  # (n points, n beams)
    own = rate[np.arange(n), np.arange(n)]  # r_b(p_b)
    norm_rate = doses.at_points(plan.normalisation.position_mm_xyz(plan, patient)[None])[0]

    def need_own(b: int) -> None:
        if not own[b] > 0:
            raise PrescriptionError(f"plan {plan.name!r}: beam {plan.beams[b].name!r} gives no dose to its point "
                                    f"({points[b].describe(plan)}); choose another point")

    if isinstance(rx, MonitorUnits):
        exact = np.asarray(rx.mu, dtype=np.float64)
    elif isinstance(rx, DoseToPoints):
        exact = np.zeros(n)
        for b in range(n):
            if rx.doses_gy[b] > 0:
                need_own(b)
                exact[b] = rx.doses_gy[b] / own[b]
    else:
        shape = np.zeros(n)  # MU per unit k
        for b in range(n):
            if rx.weights[b] > 0:
                need_own(b)
                shape[b] = rx.weights[b] / own[b]
        at_norm = float(shape @ norm_rate)
        if not at_norm > 0:
            raise PrescriptionError(f"plan {plan.name!r}: the weighted beams give no dose to the normalisation point "
                                    f"({plan.normalisation.describe(plan)})")
        exact = shape * rx.normalisation_dose_gy / at_norm
    mu = np.rint(exact)
    return MUResult(tuple(float(v) for v in exact), tuple(float(v) for v in mu), points,
                    tuple(float(v) for v in own * mu), tuple(float(v) for v in rate @ mu), float(norm_rate @ mu))


def normalisation_dose_gy(plan: "Plan", patient: Patient, doses: BeamDoses) -> float:
    """The dose (Gy) of the plan's MU at its normalisation point: 100 % when doses are shown
    in percent (seed: "Show Dose or Percent")."""
    if not doses.matches(plan):
        raise PrescriptionError(f"plan {plan.name!r}: its beams changed since the doses per MU were computed")
    xyz = plan.normalisation.position_mm_xyz(plan, patient)
    return float(doses.at_points(xyz[None])[0] @ np.asarray(plan.mu, dtype=np.float64))


def apply_prescription(plan: "Plan", patient: Patient, doses: BeamDoses, prescription=None) -> tuple["Plan", MUResult]:
    """The plan with the prescription set and its whole MU installed (one dose-affecting
    change: the plan ID increments once), and the :class:`MUResult`."""
    rx = prescription if prescription is not None else plan.prescription
    res = compute_mu(plan, patient, doses, rx)
    return plan.changed(prescription=rx, mu=res.mu), res
