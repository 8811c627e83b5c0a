"""RT Plan: write a :class:`~ids_engine.deliver.DeliverablePlan` as a DICOM RT Plan, read one
back (ours or another system's) into beams and step-and-shoot segments.

Frames: leaf and jaw positions are IEC 61217 beam-limiting-device coordinates projected to
the isocentre plane, mm (DICOM's own convention for ``LeafJawPositions``); angles are IEC
61217 degrees; the isocentre is in DICOM patient coordinates, mm.

Meterset convention (the sequencer's, :func:`ids_engine.deliver.sequence_beam`):
:class:`~ids_engine.deliver.Segment` ``mu`` is MU per fraction, as DICOM's ``BeamMeterset``
is, so ``BeamMeterset = sum(mu)`` of the beam's segments; the whole plan delivers
``fractions`` times that (the dose engine's fluence is MU over the course).

Step-and-shoot encoding: segment k of a beam is two control points with the same aperture,
cumulative meterset weights ``W_k`` and ``W_{k+1}`` (``FinalCumulativeMetersetWeight`` 1).
On reading, the meterset between two control points is given to their aperture when both
are equal (a static segment), and to the mean of the two apertures when the leaves or
jaws move (dynamic delivery, approximated; stated in the import's ``notes``). Arcs
(gantry rotation between control points) are refused.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RTPlanStorage, RTStructureSetStorage, generate_uid

from ..deliver import Aperture, DeliverablePlan, Segment, SequencedBeam
from ..model import MLC, Beam, default_mlc
from ._dicom_common import (
    check_modality,
    copy_patient_and_study,
    ds_number,
    ds_numbers,
    get_float,
    get_floats,
    get_int,
    get_sequence,
    get_str,
    new_dataset,
    read_dataset,
    save_atomic,
    set_patient_and_study,
)
from ._errors import InputError

__all__ = ["ImportedRTPlan", "RESEARCH_USE_ONLY", "read_rtplan", "write_rtplan"]

RESEARCH_USE_ONLY = "ids-engine research export: NOT FOR CLINICAL USE (unapproved, unvalidated)"

# Relative tolerance on meterset weights (DS strings carry ~10 significant digits).
_WEIGHT_TOL = 1e-6
# Two control points whose leaves and jaws agree within this (mm) hold one static aperture.
_SAME_POSITION_MM = 1e-3


# ------------------------------------------------------------------ writing
def _device_positions(aperture: Aperture) -> DicomSequence:
    items = []
    for kind, values in (("ASYMX", aperture.jaw_x_mm), ("ASYMY", aperture.jaw_y_mm),
                         ("MLCX", np.concatenate([aperture.leaf_x1_mm, aperture.leaf_x2_mm]))):
        it = Dataset()
        it.RTBeamLimitingDeviceType = kind
        it.LeafJawPositions = ds_numbers(values)
        items.append(it)
    return DicomSequence(items)


def _beam_item(number: int, sb: SequencedBeam, *, machine_name: str, patient_setup_number: int) -> Dataset:
    beam, mlc = sb.beam, sb.mlc
    segments = [s for s in sb.segments if s.mu > 0] or list(sb.segments[:1])
    if not segments:
        raise ValueError(f"beam {beam.name!r} has no segments")
    for s in segments:
        if s.aperture.leaf_x1_mm.size != mlc.n_pairs:
            raise ValueError(f"beam {beam.name!r}: an aperture has {s.aperture.leaf_x1_mm.size} leaf pairs, "
                             f"the MLC {mlc.name!r} {mlc.n_pairs}")
    total = float(sum(s.mu for s in segments))
    fractions = (np.cumsum([0.0] + [s.mu for s in segments]) / total if total > 0
                 else np.linspace(0.0, 1.0, len(segments) + 1))
    fractions[-1] = 1.0

    it = Dataset()
    it.Manufacturer = "ids-engine"
    it.TreatmentMachineName = machine_name[:16]
    it.PrimaryDosimeterUnit = "MU"
    it.SourceAxisDistance = ds_number(beam.sad_mm)
    devices = []
    for kind, n in (("ASYMX", 1), ("ASYMY", 1), ("MLCX", mlc.n_pairs)):
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind
        d.NumberOfLeafJawPairs = n
        if kind == "MLCX":
            d.LeafPositionBoundaries = ds_numbers(mlc.leaf_boundaries_mm())
        devices.append(d)
    it.BeamLimitingDeviceSequence = DicomSequence(devices)
    it.BeamNumber = number
    it.BeamName = beam.name[:64]
    it.BeamDescription = f"step-and-shoot, {len(segments)} segments; MLC {mlc.name}"[:64]
    it.BeamType = "STATIC"
    it.RadiationType = "PHOTON"
    it.TreatmentDeliveryType = "TREATMENT"
    it.NumberOfWedges = 0
    it.NumberOfCompensators = 0
    it.NumberOfBoli = 0
    it.NumberOfBlocks = 0
    it.FinalCumulativeMetersetWeight = "1"
    cps = []
    for k, seg in enumerate(segments):
        for j, weight in enumerate((fractions[k], fractions[k + 1])):
            cp = Dataset()
            cp.ControlPointIndex = len(cps)
            if not cps:
                cp.NominalBeamEnergy = ds_number(beam.energy_mv)
                cp.GantryAngle = ds_number(beam.gantry_deg)
                cp.GantryRotationDirection = "NONE"
                cp.BeamLimitingDeviceAngle = ds_number(beam.collimator_deg)
                cp.BeamLimitingDeviceRotationDirection = "NONE"
                cp.PatientSupportAngle = ds_number(beam.couch_deg)
                cp.PatientSupportRotationDirection = "NONE"
                cp.TableTopEccentricAngle = "0"
                cp.TableTopEccentricRotationDirection = "NONE"
                cp.TableTopVerticalPosition = ""
                cp.TableTopLongitudinalPosition = ""
                cp.TableTopLateralPosition = ""
                cp.IsocenterPosition = ds_numbers(beam.isocentre_mm_xyz)
            if j == 0:
                cp.BeamLimitingDevicePositionSequence = _device_positions(seg.aperture)
            cp.CumulativeMetersetWeight = ds_number(weight)
            cps.append(cp)
    it.NumberOfControlPoints = len(cps)
    it.ControlPointSequence = DicomSequence(cps)
    it.ReferencedPatientSetupNumber = patient_setup_number
    return it


def write_rtplan(
    plan: DeliverablePlan,
    path: "str | Path",
    *,
    frame_of_reference_uid: str,
    patient_position: str = "HFS",
    ct_files: Sequence["str | Path"] | None = None,
    rtstruct_sop_instance_uid: str | None = None,
    target_roi_number: int | None = None,
    machine_name: str = "ids-engine",
    sop_instance_uid: str | None = None,
    label: str | None = None,
) -> Path:
    """Write a deliverable plan as a DICOM RT Plan (RT General Plan, Prescription, Fraction
    Scheme, Beams, Patient Setup and Approval modules), marked for research use only.

    Each beam is STATIC with an ASYMX and an ASYMY jaw pair and an MLCX device whose
    ``LeafPositionBoundaries`` are the MLC's; each segment is a pair of control points (see
    the module docstring). Segments of 0 MU are left out. The plan's ``ApprovalStatus`` is
    UNAPPROVED and ``RTPlanDescription`` says "NOT FOR CLINICAL USE". The file is written
    atomically.

    Parameters
    ----------
    plan : the plan; ``Segment.mu`` are MU per fraction.
    path : the file to write.
    frame_of_reference_uid : the CT's FrameOfReferenceUID.
    patient_position : PatientSetupSequence's PatientPosition (the CT's).
    ct_files : CT slices to copy the patient and study modules from (a new study when None).
    rtstruct_sop_instance_uid : the structure set the plan refers to (RTPlanGeometry PATIENT
        then, else TREATMENT_DEVICE).
    target_roi_number : the structure set's ROI the prescription is to (DoseReference
        VOLUME); None gives a SITE dose reference.
    machine_name : TreatmentMachineName (at most 16 characters).
    sop_instance_uid : the plan's SOPInstanceUID (a new one by default), so that an RT Dose
        written before or after can reference it.
    label : RTPlanLabel (default: the plan's name), at most 16 characters.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if not plan.beams:
        raise ValueError("write_rtplan: the plan has no beams")
    if not frame_of_reference_uid:
        raise ValueError("write_rtplan: frame_of_reference_uid must be given (the CT's)")
    if int(plan.fractions) < 1:
        raise ValueError(f"write_rtplan: plan.fractions must be >= 1, got {plan.fractions}")
    ds = new_dataset(RTPlanStorage, "RTPLAN", sop_instance_uid=sop_instance_uid)
    if ct_files:
        ct = read_dataset(ct_files[0], stop_before_pixels=True)
        check_modality(ct, ct_files[0], "CT")
        copy_patient_and_study(ds, ct)
    if "StudyInstanceUID" not in ds:
        set_patient_and_study(ds, patient_name="", patient_id="IDS-ENGINE", study_instance_uid=generate_uid())
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
               "ReferringPhysicianName", "AccessionNumber"):
        if kw not in ds:
            setattr(ds, kw, "")
    now = datetime.datetime.now()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 4
    ds.SeriesDescription = "ids-engine plan (research use only)"
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.RTPlanLabel = (label or plan.name or "ids plan")[:16]
    ds.RTPlanName = (plan.name or "ids plan")[:64]
    ds.RTPlanDescription = RESEARCH_USE_ONLY
    ds.RTPlanDate = now.strftime("%Y%m%d")
    ds.RTPlanTime = now.strftime("%H%M%S")
    if rtstruct_sop_instance_uid:
        ds.RTPlanGeometry = "PATIENT"
        ref = Dataset()
        ref.ReferencedSOPClassUID = RTStructureSetStorage
        ref.ReferencedSOPInstanceUID = rtstruct_sop_instance_uid
        ds.ReferencedStructureSetSequence = DicomSequence([ref])
    else:
        ds.RTPlanGeometry = "TREATMENT_DEVICE"
    dose_ref = Dataset()
    dose_ref.DoseReferenceNumber = 1
    dose_ref.DoseReferenceUID = generate_uid()
    if target_roi_number is not None:
        dose_ref.DoseReferenceStructureType = "VOLUME"
        dose_ref.ReferencedROINumber = int(target_roi_number)
    else:
        dose_ref.DoseReferenceStructureType = "SITE"
    dose_ref.DoseReferenceDescription = "target prescription"
    dose_ref.DoseReferenceType = "TARGET"
    dose_ref.TargetPrescriptionDose = ds_number(plan.prescription_gy)
    ds.DoseReferenceSequence = DicomSequence([dose_ref])

    fractions = int(plan.fractions)
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = fractions
    group.NumberOfBeams = len(plan.beams)
    group.NumberOfBrachyApplicationSetups = 0
    refs = []
    beams = []
    for n, sb in enumerate(plan.beams, start=1):
        beams.append(_beam_item(n, sb, machine_name=machine_name, patient_setup_number=1))
        r = Dataset()
        r.ReferencedBeamNumber = n
        r.BeamMeterset = ds_number(sb.mu)
        refs.append(r)
    group.ReferencedBeamSequence = DicomSequence(refs)
    ds.FractionGroupSequence = DicomSequence([group])
    ds.BeamSequence = DicomSequence(beams)
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = patient_position
    ds.PatientSetupSequence = DicomSequence([setup])
    ds.ApprovalStatus = "UNAPPROVED"
    return save_atomic(ds, path)


# ------------------------------------------------------------------ reading
@dataclass(frozen=True)
class ImportedRTPlan:
    """An RT Plan read back: the deliverable plan and what locates it.

    ``plan.beams[i].beam.fluence_grid`` is None (the dose engine chooses one). ``notes``
    lists what was approximated or left out (setup beams, dynamic control points, a
    missing MLC), in plain words.
    """

    plan: DeliverablePlan
    path: str
    sop_instance_uid: str
    frame_of_reference_uid: str
    study_instance_uid: str
    patient_position: str
    machine_names: tuple[str, ...]
    referenced_structure_set_uid: str
    research_export: bool
    notes: tuple[str, ...] = field(default_factory=tuple)


def _at(*parts: "str | tuple[str, int]") -> str:
    """A field path, e.g. ``BeamSequence[0].ControlPointSequence[2].CumulativeMetersetWeight``."""
    return ".".join(p if isinstance(p, str) else f"{p[0]}[{p[1]}]" for p in parts)


def _mlc_from_boundaries(boundaries: np.ndarray, name: str, path: Path, where: str) -> MLC:
    widths = np.diff(boundaries)
    if np.any(widths <= 0):
        raise InputError("boundaries must be strictly increasing", path, where)
    if abs(boundaries[0] + boundaries[-1]) > 0.05:
        raise InputError(f"the leaf bank spans {boundaries[0]:g} to {boundaries[-1]:g} mm, not symmetric about the "
                         "axis; only symmetric MLCs are modelled", path, where)
    return MLC(name=name, leaf_widths_mm=tuple(float(w) for w in widths),
               max_field_mm=(400.0, float(boundaries[-1] - boundaries[0])))


def _positions(cp: Dataset, path: Path, where: str, devices: dict[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for i, it in enumerate(get_sequence(cp, "BeamLimitingDevicePositionSequence", path, required=False)):
        here = _at(where, ("BeamLimitingDevicePositionSequence", i))
        kind = get_str(it, "RTBeamLimitingDeviceType", path, default="").upper()
        if not kind:
            raise InputError("required tag is missing or empty", path, _at(here, "RTBeamLimitingDeviceType"))
        if kind not in devices:
            raise InputError(f"device {kind} is not in the beam's BeamLimitingDeviceSequence "
                             f"({', '.join(devices) or 'none'})", path, _at(here, "RTBeamLimitingDeviceType"))
        try:
            values = get_floats(it, "LeafJawPositions", path)
        except InputError as exc:
            raise InputError(exc.message, path, _at(here, "LeafJawPositions")) from None
        if values.size != 2 * devices[kind]:
            raise InputError(f"{values.size} positions for {kind}, expected 2 x NumberOfLeafJawPairs = "
                             f"{2 * devices[kind]}", path, _at(here, "LeafJawPositions"))
        n = devices[kind]
        if np.any(values[:n] > values[n:] + 1e-6):
            i_bad = int(np.argmax(values[:n] > values[n:] + 1e-6))
            raise InputError(f"{kind} pair {i_bad + 1}: {values[i_bad]:g} mm is beyond its opposite "
                             f"{values[n + i_bad]:g} mm", path, _at(here, "LeafJawPositions"))
        out[kind] = values
    return out


def _aperture(pos: dict[str, np.ndarray], mlc: MLC, has_mlc: bool) -> Aperture:
    half_x, half_y = mlc.max_field_mm[0] / 2.0, mlc.max_field_mm[1] / 2.0
    jx = pos.get("ASYMX", pos.get("X", np.array([-half_x, half_x])))
    jy = pos.get("ASYMY", pos.get("Y", np.array([-half_y, half_y])))
    n = mlc.n_pairs
    if has_mlc:
        leaves = pos["MLCX"]
        x1, x2 = leaves[:n], leaves[n:]
    else:  # jaws only: the leaves stand open at the X jaws
        x1, x2 = np.full(n, jx[0]), np.full(n, jx[1])
    return Aperture(x1, x2, (float(jx[0]), float(jx[1])), (float(jy[0]), float(jy[1])))


def _same(a: Aperture, b: Aperture) -> bool:
    return (np.allclose(a.leaf_x1_mm, b.leaf_x1_mm, atol=_SAME_POSITION_MM, rtol=0)
            and np.allclose(a.leaf_x2_mm, b.leaf_x2_mm, atol=_SAME_POSITION_MM, rtol=0)
            and np.allclose(a.jaw_x_mm + a.jaw_y_mm, b.jaw_x_mm + b.jaw_y_mm, atol=_SAME_POSITION_MM, rtol=0))


def _mean(a: Aperture, b: Aperture) -> Aperture:
    return Aperture((a.leaf_x1_mm + b.leaf_x1_mm) / 2, (a.leaf_x2_mm + b.leaf_x2_mm) / 2,
                    tuple((np.add(a.jaw_x_mm, b.jaw_x_mm) / 2).tolist()),
                    tuple((np.add(a.jaw_y_mm, b.jaw_y_mm) / 2).tolist()))


def _read_beam(item: Dataset, b: int, path: Path, meterset_total_mu: float, default: MLC | None,
               notes: list[str]) -> tuple[SequencedBeam, str]:
    where = _at(("BeamSequence", b))

    def f(keyword: str, ds: Dataset = item, here: str = where, **kw):
        try:
            return get_float(ds, keyword, path, **kw)
        except InputError as exc:
            raise InputError(exc.message, path, _at(here, keyword)) from None

    name = get_str(item, "BeamName", path, default="") or f"beam {get_str(item, 'BeamNumber', path, default=b + 1)}"
    radiation = get_str(item, "RadiationType", path, default="PHOTON").upper()
    if radiation != "PHOTON":
        raise InputError(f"{radiation} beams are not supported; only PHOTON", path, _at(where, "RadiationType"))
    sad = f("SourceAxisDistance", default=1000.0)
    devices: dict[str, int] = {}
    boundaries = None
    for i, d in enumerate(get_sequence(item, "BeamLimitingDeviceSequence", path, required=False)):
        here = _at(where, ("BeamLimitingDeviceSequence", i))
        kind = get_str(d, "RTBeamLimitingDeviceType", path, default="").upper()
        if not kind:
            raise InputError("required tag is missing or empty", path, _at(here, "RTBeamLimitingDeviceType"))
        if kind == "MLCY":
            raise InputError("an MLC whose leaves move along Y (MLCY) is not supported; only MLCX", path,
                             _at(here, "RTBeamLimitingDeviceType"))
        try:
            n = get_int(d, "NumberOfLeafJawPairs", path)
        except InputError as exc:
            raise InputError(exc.message, path, _at(here, "NumberOfLeafJawPairs")) from None
        if n < 1:
            raise InputError(f"must be >= 1, got {n}", path, _at(here, "NumberOfLeafJawPairs"))
        devices[kind] = n
        if kind == "MLCX":
            try:
                boundaries = get_floats(d, "LeafPositionBoundaries", path)
            except InputError as exc:
                raise InputError(exc.message, path, _at(here, "LeafPositionBoundaries")) from None
            if boundaries.size != n + 1:
                raise InputError(f"{boundaries.size} boundaries for {n} leaf pairs (NumberOfLeafJawPairs + 1 = "
                                 f"{n + 1} expected)", path, _at(here, "LeafPositionBoundaries"))
            mlc_name = get_str(d, "DeviceSerialNumber", path, default="") or f"MLCX-{n}"
            mlc = _mlc_from_boundaries(boundaries, mlc_name, path, _at(here, "LeafPositionBoundaries"))
    has_mlc = boundaries is not None
    if not has_mlc:
        mlc = default or default_mlc()
        notes.append(f"beam {name!r}: no MLC in the plan; the leaves stand open at the X jaws of the "
                     f"{mlc.name} MLC")

    cps = get_sequence(item, "ControlPointSequence", path)
    declared = get_int(item, "NumberOfControlPoints", path, default=None)
    if declared is not None and declared != len(cps):
        raise InputError(f"{declared} declared, {len(cps)} items in ControlPointSequence: the plan is truncated "
                         "or inconsistent", path, _at(where, "NumberOfControlPoints"))
    if len(cps) < 2:
        raise InputError(f"{len(cps)} control point(s); a beam needs at least 2", path,
                         _at(where, "ControlPointSequence"))
    final = f("FinalCumulativeMetersetWeight", default=None)

    state: dict = {}
    apertures: list[Aperture] = []
    weights: list[float] = []
    for i, cp in enumerate(cps):
        here = _at(where, ("ControlPointSequence", i))
        index = get_int(cp, "ControlPointIndex", path, default=i)
        if index != i:
            raise InputError(f"{index} at position {i}: control points are missing or out of order", path,
                             _at(here, "ControlPointIndex"))
        for kw, key in (("NominalBeamEnergy", "energy"), ("GantryAngle", "gantry"),
                        ("BeamLimitingDeviceAngle", "collimator"), ("PatientSupportAngle", "couch")):
            if kw in cp and cp[kw].value not in (None, ""):
                value = f(kw, cp, here)
                if key == "gantry" and "gantry" in state and abs((value - state["gantry"] + 180) % 360 - 180) > 1e-3:
                    raise InputError(f"the gantry turns from {state['gantry']:g} to {value:g} deg between control "
                                     "points (an arc); only static-gantry beams are supported", path,
                                     _at(here, "GantryAngle"))
                state[key] = value
        if "IsocenterPosition" in cp and cp.IsocenterPosition not in (None, ""):
            try:
                state["iso"] = get_floats(cp, "IsocenterPosition", path, count=3)
            except InputError as exc:
                raise InputError(exc.message, path, _at(here, "IsocenterPosition")) from None
        pos = _positions(cp, path, here, devices)
        state.setdefault("pos", {}).update(pos)
        if i == 0:
            for kw, key in (("NominalBeamEnergy", "energy"), ("GantryAngle", "gantry"), ("IsocenterPosition", "iso")):
                if key not in state:
                    raise InputError("required in the first control point", path, _at(here, kw))
            if has_mlc and "MLCX" not in state["pos"]:
                raise InputError("the first control point gives no MLCX leaf positions", path,
                                 _at(here, "BeamLimitingDevicePositionSequence"))
        w = f("CumulativeMetersetWeight", cp, here)
        if weights and w < weights[-1] - _WEIGHT_TOL * max(1.0, abs(weights[-1])):
            raise InputError(f"{w:g} after {weights[-1]:g}: cumulative meterset weights must not decrease", path,
                             _at(here, "CumulativeMetersetWeight"))
        weights.append(w)
        apertures.append(_aperture(state["pos"], mlc, has_mlc))
    if weights[0] != 0:
        raise InputError(f"the first control point's weight is {weights[0]:g}, not 0", path,
                         _at(where, ("ControlPointSequence", 0), "CumulativeMetersetWeight"))
    last = weights[-1]
    if final is not None and abs(last - final) > _WEIGHT_TOL * max(1.0, abs(final)):
        raise InputError(f"{final:g}, but the last control point's CumulativeMetersetWeight is {last:g}: the plan is "
                         "truncated or inconsistent", path, _at(where, "FinalCumulativeMetersetWeight"))
    if last <= 0 and meterset_total_mu > 0:
        raise InputError(f"the beam has a meterset of {meterset_total_mu:g} MU but its weights never rise above 0",
                         path, _at(where, ("ControlPointSequence", len(cps) - 1), "CumulativeMetersetWeight"))

    segments: list[Segment] = []
    dynamic = 0
    for i in range(len(cps) - 1):
        dw = weights[i + 1] - weights[i]
        if dw <= 0:
            continue
        mu = meterset_total_mu * dw / last
        if _same(apertures[i], apertures[i + 1]):
            ap = apertures[i]
        else:
            ap = _mean(apertures[i], apertures[i + 1])
            dynamic += 1
        if segments and _same(segments[-1].aperture, ap):
            segments[-1] = Segment(ap, segments[-1].mu + mu)
        else:
            segments.append(Segment(ap, mu))
    if dynamic:
        notes.append(f"beam {name!r}: {dynamic} dynamic control-point interval(s) (leaves or jaws moving while "
                     "the beam is on) approximated by the mean aperture")
    if not segments:
        segments.append(Segment(apertures[0], 0.0))
    iso = state["iso"]
    beam = Beam(name=name, gantry_deg=state["gantry"], couch_deg=state.get("couch", 0.0),
                collimator_deg=state.get("collimator", 0.0), isocentre_mm_xyz=tuple(float(v) for v in iso),
                sad_mm=sad, energy_mv=state["energy"])
    machine = get_str(item, "TreatmentMachineName", path, default="")
    return SequencedBeam(beam, mlc, tuple(segments)), machine


def read_rtplan(path: "str | Path", *, mlc: MLC | None = None) -> ImportedRTPlan:
    """Read a DICOM RT Plan (ours or another system's) into beams and step-and-shoot segments.

    Only the treatment beams of the first fraction group are read, their ``BeamMeterset``
    (MU per fraction) shared among the segments (see the module docstring); setup beams and beams the fraction group does not list are skipped (noted).
    Values a control point does not repeat carry over from the previous one. A plan
    without an MLC (jaws only) gets ``mlc`` (default :func:`~ids_engine.model.default_mlc`)
    with its leaves open at the X jaws.

    Parameters
    ----------
    path : the RTPLAN file.
    mlc : the MLC for beams that have none in the plan.

    Returns
    -------
    ImportedRTPlan

    Raises
    ------
    InputError
        Naming the file and the field (a path such as
        ``BeamSequence[0].ControlPointSequence[3].CumulativeMetersetWeight``): not an RT
        Plan; no fraction group or beams; a beam the fraction group references that is
        missing; fewer control points than ``NumberOfControlPoints`` declares, or fewer than
        2; ``ControlPointIndex`` out of order; the first control point without energy,
        gantry angle, isocentre or MLC positions; leaf or jaw positions whose count does not
        match ``NumberOfLeafJawPairs``; ``LeafPositionBoundaries`` whose count does not
        match or that do not increase; a leaf beyond its opposite; cumulative meterset
        weights that decrease, do not start at 0 or do not end at
        ``FinalCumulativeMetersetWeight``; arcs; MLCY devices; non-photon beams.
    """
    path = Path(path)
    ds = read_dataset(path)
    check_modality(ds, path, "RTPLAN")
    groups = get_sequence(ds, "FractionGroupSequence", path)
    group = groups[0]
    try:
        fractions = get_int(group, "NumberOfFractionsPlanned", path, default=1)
    except InputError as exc:
        raise InputError(exc.message, path, _at(("FractionGroupSequence", 0), "NumberOfFractionsPlanned")) from None
    if fractions < 1:
        raise InputError(f"must be >= 1, got {fractions}", path,
                         _at(("FractionGroupSequence", 0), "NumberOfFractionsPlanned"))
    meterset: dict[int, float] = {}
    for i, r in enumerate(get_sequence(group, "ReferencedBeamSequence", path, required=False)):
        here = _at(("FractionGroupSequence", 0), ("ReferencedBeamSequence", i))
        try:
            number = get_int(r, "ReferencedBeamNumber", path)
            mu = get_float(r, "BeamMeterset", path)
        except InputError as exc:
            raise InputError(exc.message, path, _at(here, exc.field or "")) from None
        if mu < 0:
            raise InputError(f"must be >= 0, got {mu:g}", path, _at(here, "BeamMeterset"))
        meterset[number] = mu
    if not meterset:
        raise InputError("the first fraction group references no beams with a BeamMeterset", path,
                         _at(("FractionGroupSequence", 0), "ReferencedBeamSequence"))
    items = get_sequence(ds, "BeamSequence", path)
    by_number = {}
    for b, item in enumerate(items):
        try:
            number = get_int(item, "BeamNumber", path)
        except InputError as exc:
            raise InputError(exc.message, path, _at(("BeamSequence", b), "BeamNumber")) from None
        by_number[number] = (b, item)
    missing = sorted(set(meterset) - set(by_number))
    if missing:
        raise InputError(f"the fraction group references beam number(s) {missing}, which BeamSequence lacks "
                         f"(it has {sorted(by_number)}): the plan is truncated or inconsistent", path, "BeamSequence")
    notes: list[str] = []
    beams, machines = [], []
    for number in sorted(by_number):
        b, item = by_number[number]
        kind = get_str(item, "TreatmentDeliveryType", path, default="TREATMENT").upper()
        if number not in meterset or kind != "TREATMENT":
            why = "a setup beam" if kind != "TREATMENT" else "not in the fraction group"
            notes.append(f"beam number {number} skipped: {why}")
            continue
        sb, machine = _read_beam(item, b, path, meterset[number], mlc, notes)
        beams.append(sb)
        machines.append(machine)

    prescription = 0.0
    for i, ref in enumerate(get_sequence(ds, "DoseReferenceSequence", path, required=False)):
        if get_str(ref, "DoseReferenceType", path, default="").upper() == "TARGET" and "TargetPrescriptionDose" in ref:
            try:
                prescription = get_float(ref, "TargetPrescriptionDose", path)
            except InputError as exc:
                raise InputError(exc.message, path, _at(("DoseReferenceSequence", i), "TargetPrescriptionDose")) from None
            break
    positions = [get_str(s, "PatientPosition", path, default="") for s in
                 get_sequence(ds, "PatientSetupSequence", path, required=False)]
    structure_refs = get_sequence(ds, "ReferencedStructureSetSequence", path, required=False)
    name = get_str(ds, "RTPlanName", path, default="") or get_str(ds, "RTPlanLabel", path, default="") or path.stem
    plan = DeliverablePlan(name=name, beams=tuple(beams), prescription_gy=prescription, fractions=fractions)
    return ImportedRTPlan(
        plan=plan,
        path=str(path),
        sop_instance_uid=get_str(ds, "SOPInstanceUID", path),
        frame_of_reference_uid=get_str(ds, "FrameOfReferenceUID", path, default=""),
        study_instance_uid=get_str(ds, "StudyInstanceUID", path, default=""),
        patient_position=(next((p for p in positions if p), "HFS")).upper(),
        machine_names=tuple(machines),
        referenced_structure_set_uid=(get_str(structure_refs[0], "ReferencedSOPInstanceUID", path, default="")
                                      if structure_refs else ""),
        research_export=get_str(ds, "RTPlanDescription", path, default="") == RESEARCH_USE_ONLY,
        notes=tuple(notes),
    )
