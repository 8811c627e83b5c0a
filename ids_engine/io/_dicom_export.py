"""A complete DICOM RT set for a deliverable plan (CT, RT Structure Set, RT Plan, RT Dose and a
Markdown summary), read back; the dose of a deliverable plan; a required-attribute check.

Layout of an export folder (every file directly in it, so :func:`~ids_engine.io.read_dicom`
reads it as a case)::

    CT_0000.dcm ...   the CT series (written for phantoms; copied for DICOM cases)
    RS.dcm            RT Structure Set (every structure of the patient)
    RP.dcm            RT Plan (research use only: ApprovalStatus UNAPPROVED)
    RD.dcm            RT Dose (DoseSummationType PLAN, on the CT grid)
    summary.md        what was exported, per beam segments and MU, the dose check

All files share the CT's study and frame of reference; a built-in phantom (no DICOM origin)
gets a new frame of reference and study, written with its CT.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ..deliver import DEFAULT_TONGUE_GROOVE_MM, Aperture, DeliverablePlan, Segment, segment_fluence
from ..model import MLC, FluenceGrid, Patient, StructureKind
from ._anonymise import Anonymiser, anonymise_files
from ._dicom import read_dicom
from ._dicom_common import get_str, modality_of, read_dataset, scan_folder
from ._dicom_ct import write_dicom_ct
from ._dicom_rtdose import read_rtdose, write_rtdose
from ._dicom_rtplan import ImportedRTPlan, read_rtplan, write_rtplan
from ._dicom_rtstruct import write_rtstruct
from ._errors import InputError

__all__ = [
    "ExportedSet",
    "RTSet",
    "dose_agreement",
    "export_rt_set",
    "missing_required_attributes",
    "open_field_segments",
    "plan_dose",
    "plan_fluences",
    "read_rt_set",
]


# ------------------------------------------------------------------ plan -> fluence -> dose
def plan_fluences(plan: DeliverablePlan, fluence_grids: Sequence[FluenceGrid], *,
                  tongue_groove_mm: float = DEFAULT_TONGUE_GROOVE_MM) -> list[np.ndarray]:
    """Each beam's fluence over the whole course (MU per amplitude, (nv, nu) float32 on its
    grid, as the dose engine takes it): ``plan.fractions`` times the sum over its segments of
    ``mu`` (per fraction) times :func:`~ids_engine.deliver.segment_fluence` (open-area
    fractions, leaf transmission inside the jaws, jaws opaque, a tongue-and-groove strip of
    ``tongue_groove_mm`` along each leaf-pair boundary: the model of the deliverable-dose check,
    so the exported RT Dose is the dose ``ids sequence`` reports)."""
    if len(fluence_grids) != len(plan.beams):
        raise ValueError(f"plan_fluences: {len(fluence_grids)} fluence grids for {len(plan.beams)} beams")
    out = []
    for sb, grid in zip(plan.beams, fluence_grids):
        f = np.zeros(grid.shape_vu, dtype=np.float64)
        for seg in sb.segments:
            if seg.mu > 0:
                f += seg.mu * segment_fluence(seg.aperture, sb.mlc, grid, tongue_groove_mm=tongue_groove_mm)
        out.append((f * plan.fractions).astype(np.float32))
    return out


def plan_dose(patient: Patient, plan: DeliverablePlan, *, machine=None, engine_options=None,
              tongue_groove_mm: float = DEFAULT_TONGUE_GROOVE_MM, progress=None) -> np.ndarray:
    """The dose of a deliverable plan with our engine: (z, y, x) float32 Gy on the patient's grid.

    The engine is built for the plan's beams (a beam without a fluence grid gets the
    engine's automatic one, which covers the body's projection) and given
    :func:`plan_fluences`.
    """
    from ..dose import DoseEngine

    engine = DoseEngine(patient, [sb.beam for sb in plan.beams], machine, options=engine_options, progress=progress)
    engine.set_fluences(plan_fluences(plan, [g.fluence_grid for g in engine.geometry],
                                      tongue_groove_mm=tongue_groove_mm))
    return engine.dose_cube_host()


def open_field_segments(fluence: np.ndarray, grid: FluenceGrid, mlc: MLC, *, fractions: int = 1,
                        rel_tol: float = 1e-3) -> tuple[Segment, ...]:
    """One segment for a uniform (open-field) fluence map: the MLC aperture of its non-zero
    cells and their common level divided by ``fractions`` as MU per fraction.

    Each leaf pair opens from the lowest to the highest ``u`` edge of the non-zero cells whose
    centre lies within the pair's ``v`` range; the jaws frame the open cells. For modulated
    maps use the sequencer (:func:`ids_engine.deliver.sequence_plan`).

    Parameters
    ----------
    fluence : (nv, nu) MU per amplitude over the course on ``grid``, >= 0, one non-zero level.

    Raises
    ------
    ValueError
        The map is modulated (more than one non-zero level within ``rel_tol``) or negative.
    """
    f = np.asarray(fluence, dtype=np.float64)
    if f.shape != grid.shape_vu:
        raise ValueError(f"open_field_segments: fluence shape {f.shape} != grid {grid.shape_vu}")
    if np.any(f < 0):
        raise ValueError("open_field_segments: the fluence has negative values")
    on = f > 0
    if not on.any():
        return ()
    level = float(np.median(f[on]))
    if np.any(np.abs(f[on] - level) > rel_tol * level):
        raise ValueError(f"open_field_segments: the fluence is modulated ({f[on].min():.4g} to {f[on].max():.4g} MU); "
                         "sequence it with ids_engine.deliver.sequence_plan")
    p = grid.pitch_mm
    u, v = grid.u_mm(), grid.v_mm()
    edges = mlc.leaf_boundaries_mm()
    x1 = np.zeros(mlc.n_pairs)
    x2 = np.zeros(mlc.n_pairs)
    rows, cols = np.nonzero(on)
    for k in range(mlc.n_pairs):
        sel = (v[rows] >= edges[k]) & (v[rows] < edges[k + 1])
        if sel.any():
            x1[k] = u[cols[sel]].min() - p / 2
            x2[k] = u[cols[sel]].max() + p / 2
    lim = mlc.max_field_mm[0] / 2
    x1, x2 = np.clip(x1, -lim, lim), np.clip(x2, -lim, lim)
    jaw_x = (float(x1[x2 > x1].min()), float(x2[x2 > x1].max())) if np.any(x2 > x1) else (0.0, 0.0)
    jaw_y = (float(v[rows].min() - p / 2), float(v[rows].max() + p / 2))
    # Closed pairs park under the jaw at the field's centre line (no gap in the open field).
    mid = 0.5 * (jaw_x[0] + jaw_x[1])
    closed = x2 <= x1
    x1[closed] = mid
    x2[closed] = mid
    return (Segment(Aperture(x1, x2, jaw_x, jaw_y), level / int(fractions)),)


def dose_agreement(reference_gy: np.ndarray, evaluated_gy: np.ndarray, grid, *, dose_pct: float = 1.0,
                   distance_mm: float = 1.0, cutoff_pct: float = 10.0, max_points: int | None = 5000,
                   seed: int = 0) -> dict:
    """Global gamma (``dose_pct`` % of the reference maximum / ``distance_mm``) of two doses on
    ``grid`` (:func:`ids_engine.evaluation.gamma_index`, interpolated search, capped at 2),
    over the voxels above ``cutoff_pct`` % of the reference maximum (a seeded subset of
    ``max_points`` of them; None: all), and the largest dose difference over the whole grid.

    Returns
    -------
    dict
        ``pass_rate_pct``, ``max_gamma``, ``points`` (evaluated), ``max_diff_pct`` (% of the
        reference maximum).
    """
    from ..evaluation import gamma_index, gamma_summary, grid_axes_mm

    ref = np.asarray(reference_gy, dtype=np.float64)
    ev = np.asarray(evaluated_gy, dtype=np.float64)
    if ref.shape != ev.shape or ref.shape != grid.shape_zyx:
        raise ValueError(f"dose_agreement: shapes {ref.shape} and {ev.shape} must both be the grid's {grid.shape_zyx}")
    peak = float(ref.max())
    if peak <= 0:
        raise ValueError("dose_agreement: the reference dose is zero everywhere")
    axes = grid_axes_mm(grid)
    g = gamma_summary(gamma_index(axes, ref, axes, ev, dose_percent=dose_pct, dta_mm=distance_mm,
                                  cutoff_percent=cutoff_pct, max_gamma=2.0, max_points=max_points, seed=seed))
    return {"pass_rate_pct": g["pass_rate_pct"], "max_gamma": g["max"], "points": g["points"],
            "max_diff_pct": float(100.0 * np.abs(ev - ref).max() / peak)}


# ------------------------------------------------------------------ required attributes
# (keyword, type) of the modules written, per modality: type "1" present and not empty,
# "2" present (may be empty). Nested rules: keyword -> rules of each of its items.
_PATIENT = [("PatientName", "2"), ("PatientID", "2"), ("PatientBirthDate", "2"), ("PatientSex", "2")]
_STUDY = [("StudyInstanceUID", "1"), ("StudyDate", "2"), ("StudyTime", "2"), ("ReferringPhysicianName", "2"),
          ("StudyID", "2"), ("AccessionNumber", "2")]
_SOP = [("SOPClassUID", "1"), ("SOPInstanceUID", "1")]
_RT_SERIES = [("Modality", "1"), ("SeriesInstanceUID", "1"), ("SeriesNumber", "2"), ("OperatorsName", "2")]
_EQUIPMENT = [("Manufacturer", "2")]
_FRAME = [("FrameOfReferenceUID", "1"), ("PositionReferenceIndicator", "2")]
_IMAGE_PLANE = [("PixelSpacing", "1"), ("ImageOrientationPatient", "1"), ("ImagePositionPatient", "1"),
                ("SliceThickness", "2")]
_PIXELS = [("SamplesPerPixel", "1"), ("PhotometricInterpretation", "1"), ("Rows", "1"), ("Columns", "1"),
           ("BitsAllocated", "1"), ("BitsStored", "1"), ("HighBit", "1"), ("PixelRepresentation", "1"),
           ("PixelData", "1")]
_CP_DEVICE = [("RTBeamLimitingDeviceType", "1"), ("LeafJawPositions", "1")]
# Type 1C sequences ("1C"): checked item by item when present.
_CONTROL_POINT = [("ControlPointIndex", "1"), ("CumulativeMetersetWeight", "2"),
                  ("BeamLimitingDevicePositionSequence", ("1C", _CP_DEVICE))]
_FIRST_CONTROL_POINT = _CONTROL_POINT[:2] + [("BeamLimitingDevicePositionSequence", _CP_DEVICE),
    ("NominalBeamEnergy", "1"), ("GantryAngle", "1"), ("GantryRotationDirection", "1"),
    ("BeamLimitingDeviceAngle", "1"), ("BeamLimitingDeviceRotationDirection", "1"), ("PatientSupportAngle", "1"),
    ("PatientSupportRotationDirection", "1"), ("TableTopEccentricAngle", "1"),
    ("TableTopEccentricRotationDirection", "1"), ("TableTopVerticalPosition", "2"),
    ("TableTopLongitudinalPosition", "2"), ("TableTopLateralPosition", "2"), ("IsocenterPosition", "2")]
_BEAM = [("BeamNumber", "1"), ("BeamType", "1"), ("RadiationType", "2"), ("TreatmentMachineName", "2"),
         ("PrimaryDosimeterUnit", "3"), ("SourceAxisDistance", "3"), ("NumberOfWedges", "1"),
         ("NumberOfCompensators", "1"), ("NumberOfBoli", "1"), ("NumberOfBlocks", "1"),
         ("FinalCumulativeMetersetWeight", "1"), ("NumberOfControlPoints", "1"),
         ("BeamLimitingDeviceSequence", [("RTBeamLimitingDeviceType", "1"), ("NumberOfLeafJawPairs", "1")]),
         ("ControlPointSequence", _CONTROL_POINT)]
REQUIRED = {
    "CT": _PATIENT + _STUDY + _SOP + _RT_SERIES[:3] + _EQUIPMENT + _FRAME + _IMAGE_PLANE + _PIXELS + [
        ("ImageType", "1"), ("RescaleIntercept", "1"), ("RescaleSlope", "1"), ("KVP", "2"),
        ("AcquisitionNumber", "2"), ("InstanceNumber", "2"), ("PatientPosition", "2")],
    "RTSTRUCT": _PATIENT + _STUDY + _SOP + _RT_SERIES + _EQUIPMENT + [
        ("StructureSetLabel", "1"), ("StructureSetDate", "2"), ("StructureSetTime", "2"),
        ("ReferencedFrameOfReferenceSequence", [("FrameOfReferenceUID", "1")]),
        ("StructureSetROISequence", [("ROINumber", "1"), ("ReferencedFrameOfReferenceUID", "1"), ("ROIName", "2"),
                                     ("ROIGenerationAlgorithm", "2")]),
        ("ROIContourSequence", [("ReferencedROINumber", "1")]),
        ("RTROIObservationsSequence", [("ObservationNumber", "1"), ("ReferencedROINumber", "1"),
                                       ("RTROIInterpretedType", "2"), ("ROIInterpreter", "2")])],
    "RTPLAN": _PATIENT + _STUDY + _SOP + _RT_SERIES + _EQUIPMENT + [
        ("RTPlanLabel", "1"), ("RTPlanDate", "2"), ("RTPlanTime", "2"), ("RTPlanGeometry", "1"),
        ("ApprovalStatus", "1"),
        ("DoseReferenceSequence", [("DoseReferenceNumber", "1"), ("DoseReferenceStructureType", "1"),
                                   ("DoseReferenceType", "1")]),
        ("FractionGroupSequence", [("FractionGroupNumber", "1"), ("NumberOfFractionsPlanned", "2"),
                                   ("NumberOfBeams", "1"), ("NumberOfBrachyApplicationSetups", "1"),
                                   ("ReferencedBeamSequence", [("ReferencedBeamNumber", "1"),
                                                               ("BeamMeterset", "3")])]),
        ("BeamSequence", _BEAM),
        ("PatientSetupSequence", [("PatientSetupNumber", "1"), ("PatientPosition", "1")])],
    "RTDOSE": _PATIENT + _STUDY + _SOP + _RT_SERIES[:3] + _EQUIPMENT + _FRAME + _IMAGE_PLANE + _PIXELS + [
        ("NumberOfFrames", "1"), ("FrameIncrementPointer", "1"), ("GridFrameOffsetVector", "1"),
        ("DoseUnits", "1"), ("DoseType", "1"), ("DoseSummationType", "1"), ("DoseGridScaling", "1"),
        ("InstanceNumber", "2")],
}


def _missing(ds: Dataset, rules, where: str) -> list[str]:
    out = []
    for kw, rule in rules:
        present = kw in ds
        value = ds[kw].value if present else None
        empty = value is None or (hasattr(value, "__len__") and len(value) == 0)
        name = f"{where}{kw}"
        if isinstance(rule, tuple):  # 1C sequence: its items when present
            for i, item in enumerate(value if present and not empty else []):
                out.extend(_missing(item, rule[1], f"{name}[{i}]."))
        elif isinstance(rule, list):
            if not present or empty:
                out.append(f"{name} (Type 1 sequence) is missing or empty")
                continue
            for i, item in enumerate(value):
                out.extend(_missing(item, rule, f"{name}[{i}]."))
        elif rule == "1" and (not present or empty):
            out.append(f"{name} (Type 1) is missing or empty")
        elif rule == "2" and not present:
            out.append(f"{name} (Type 2) is missing")
    return out


def missing_required_attributes(ds: Dataset) -> list[str]:
    """Type 1 attributes that are missing or empty and Type 2 attributes that are missing, in
    the modules this package writes (Patient, General Study, RT/CT Series, Frame of Reference,
    General Equipment, Image Plane/Pixel, SOP Common, and the RT Plan, RT Structure Set and RT
    Dose modules, nested sequences included). The RT Plan's first control point of each beam
    is checked against the attributes required there (PS3.3 C.8.8.14). Empty list: complete.
    """
    modality = str(ds.get("Modality", "")).upper()
    if modality not in REQUIRED:
        return [f"Modality {modality!r} is not one of {sorted(REQUIRED)}"]
    out = _missing(ds, REQUIRED[modality], "")
    if modality == "RTPLAN":
        for b, beam in enumerate(ds.get("BeamSequence", [])):
            cps = beam.get("ControlPointSequence", [])
            if cps:
                out.extend(_missing(cps[0], _FIRST_CONTROL_POINT, f"BeamSequence[{b}].ControlPointSequence[0]."))
            devices = {d.get("RTBeamLimitingDeviceType", "") for d in beam.get("BeamLimitingDeviceSequence", [])}
            for d in beam.get("BeamLimitingDeviceSequence", []):
                if d.get("RTBeamLimitingDeviceType", "") in ("MLCX", "MLCY") and "LeafPositionBoundaries" not in d:
                    out.append(f"BeamSequence[{b}].BeamLimitingDeviceSequence: LeafPositionBoundaries (Type 1C for "
                               f"an MLC) is missing")
            if not devices:
                out.append(f"BeamSequence[{b}].BeamLimitingDeviceSequence is empty")
    return out


# ------------------------------------------------------------------ export
@dataclass(frozen=True)
class ExportedSet:
    """What :func:`export_rt_set` wrote (paths) and the dose written (Gy, (z, y, x))."""

    folder: Path
    ct_files: tuple[Path, ...]
    rtstruct: Path
    rtplan: Path
    rtdose: Path
    summary: Path
    dose_gy: np.ndarray
    frame_of_reference_uid: str


def _target_roi_number(patient: Patient) -> int | None:
    for n, s in enumerate(patient.structures, start=1):
        if s.kind is StructureKind.TARGET and not s.is_empty:
            return n
    return None


def export_rt_set(
    patient: Patient,
    plan: DeliverablePlan,
    folder: "str | Path",
    *,
    dose_gy: np.ndarray | None = None,
    machine=None,
    engine_options=None,
    anonymise: bool | Anonymiser = False,
    patient_name: str | None = None,
    patient_id: str | None = None,
    machine_name: str = "ids-engine",
    case_label: str = "",
    progress=None,
) -> ExportedSet:
    """Write a complete, self-consistent DICOM RT set for ``plan`` on ``patient`` into ``folder``.

    A patient read from DICOM (``patient.meta["files"]`` and a frame of reference) has its
    CT slices copied; any other patient (a built-in phantom) gets a CT series written with a
    new frame of reference and study, which every other file then references. The RT
    Structure Set holds all the patient's structures; the RT Plan references it and carries
    the prescription to the first target; the RT Dose (DoseSummationType PLAN) references
    the plan.

    Parameters
    ----------
    patient : the patient.
    plan : the deliverable plan (segments' ``mu`` are MU per fraction).
    folder : where to write (created; files of the same names are replaced; not the case's own
        DICOM folder).
    dose_gy : the plan's dose on the patient's grid; None computes it with :func:`plan_dose`.
    machine, engine_options : for :func:`plan_dose`.
    anonymise : True (or an :class:`Anonymiser` to share its mapping) anonymises every file
        of the set with one mapping (see :mod:`ids_engine.io._anonymise`).
    patient_name, patient_id : PatientName (DICOM ``Last^First^Middle``) and PatientID for a
        written CT (defaults: the patient's display name and ``IDS-ENGINE``); ignored for
        copied DICOM CT, whose patient module is kept.
    machine_name : TreatmentMachineName.
    case_label : how the summary names the case.
    progress : optional ``progress(done, total, label)``.

    Returns
    -------
    ExportedSet
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    steps = 6

    def tick(k: int, label: str) -> None:
        if progress:
            progress(k, steps, label)

    tick(0, "CT")
    src = [Path(p) for p in (patient.meta or {}).get("files", [])]
    if patient.frame_of_reference_uid and src and all(p.is_file() for p in src):
        if any(p.resolve().parent == folder.resolve() for p in src):
            raise ValueError(f"export_rt_set: {folder} holds the case's own CT; export into another folder")
        ct_files = []
        for k, p in enumerate(src):  # in slice order; renamed (source names may carry identifiers)
            target = folder / f"CT_{k:04d}.dcm"
            if target.resolve() != p.resolve():
                shutil.copyfile(p, target)
            ct_files.append(target)
    else:
        ct_files = write_dicom_ct(patient, folder, patient_id=patient_id or "IDS-ENGINE", patient_name=patient_name)
    frame = get_str(read_dataset(ct_files[0], stop_before_pixels=True), "FrameOfReferenceUID", ct_files[0])
    patient = dataclasses.replace(patient, frame_of_reference_uid=frame)

    tick(1, "structures")
    rtstruct = write_rtstruct(patient, folder / "RS.dcm", ct_files)
    rtstruct_uid = get_str(read_dataset(rtstruct, stop_before_pixels=True), "SOPInstanceUID", rtstruct)

    tick(2, "plan")
    plan_uid = generate_uid()
    rtplan = write_rtplan(plan, folder / "RP.dcm", frame_of_reference_uid=frame,
                          patient_position=patient.patient_position, ct_files=ct_files,
                          rtstruct_sop_instance_uid=rtstruct_uid, target_roi_number=_target_roi_number(patient),
                          machine_name=machine_name, sop_instance_uid=plan_uid)

    tick(3, "dose")
    if dose_gy is None:
        dose_gy = plan_dose(patient, plan, machine=machine, engine_options=engine_options)
    dose_gy = np.asarray(dose_gy, dtype=np.float64)
    rtdose = write_rtdose(np.clip(dose_gy, 0.0, None), patient.grid, folder / "RD.dcm", frame, ct_files=ct_files,
                          rtplan_sop_instance_uid=plan_uid, dose_summation_type="PLAN")

    tick(4, "anonymise" if anonymise else "summary")
    files = [*ct_files, rtstruct, rtplan, rtdose]
    if anonymise:
        anonymiser = anonymise if isinstance(anonymise, Anonymiser) else Anonymiser()
        anonymise_files(files, anonymiser)
        frame = anonymiser.uid(frame)
    summary = folder / "summary.md"
    summary.write_text(_summary(patient, plan, dose_gy, len(ct_files), case_label=case_label, anonymised=bool(anonymise),
                                machine_name=machine_name), encoding="utf-8")
    tick(steps, "done")
    return ExportedSet(folder, tuple(ct_files), rtstruct, rtplan, rtdose, summary, dose_gy.astype(np.float32), frame)


def _summary(patient: Patient, plan: DeliverablePlan, dose_gy: np.ndarray, n_ct: int, *, case_label: str,
             anonymised: bool, machine_name: str) -> str:
    from ..evaluation import dvh_metrics

    lines = ["# ids-engine DICOM RT export", "",
             "**Research use only.** The RT Plan is UNAPPROVED and has not been validated for treatment.", "",
             f"Case: {case_label or patient.name}; plan {plan.name!r}; prescription {plan.prescription_gy:g} Gy in "
             f"{plan.fractions} fraction(s); machine name {machine_name}; "
             f"{'anonymised' if anonymised else 'not anonymised'}.", "",
             "## Beams", "",
             "| # | name | gantry deg | collimator deg | couch deg | energy MV | segments | MU / fraction | MU (course) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, sb in enumerate(plan.beams, start=1):
        b = sb.beam
        segs = sum(1 for s in sb.segments if s.mu > 0)
        lines.append(f"| {n} | {b.name} | {b.gantry_deg:g} | {b.collimator_deg:g} | {b.couch_deg:g} | {b.energy_mv:g} | "
                     f"{segs} | {sb.mu:.1f} | {sb.mu * plan.fractions:.1f} |")
    total = sum(sb.mu for sb in plan.beams)
    lines += ["", f"Total {total:.1f} MU per fraction ({total * plan.fractions:.1f} over the course), "
              f"{sum(sum(1 for s in sb.segments if s.mu > 0) for sb in plan.beams)} segments.", "",
              "## Dose (RT Dose, deliverable segments recomputed with the ids-engine pencil beam)", "",
              f"Maximum {float(dose_gy.max()):.2f} Gy.", "",
              "| structure | kind | mean Gy | D98 Gy | D95 Gy | D2 Gy | max Gy |", "|---|---|---|---|---|---|---|"]
    for s in patient.structures:
        if s.is_empty:
            continue
        m = dvh_metrics(dose_gy, s.mask, plan.prescription_gy or None)
        lines.append(f"| {s.name} | {s.kind.value} | {m['mean_gy']:.2f} | {m['D98_gy']:.2f} | {m['D95_gy']:.2f} | "
                     f"{m['D2_gy']:.2f} | {m['max_gy']:.2f} |")
    lines += ["", "## Files", "", f"- CT_0000.dcm ...: CT, {n_ct} slices", "- RS.dcm: RT Structure Set", "- RP.dcm: RT Plan",
              "- RD.dcm: RT Dose (DoseSummationType PLAN)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ read back
@dataclass(frozen=True)
class RTSet:
    """A DICOM RT set read from a folder: the patient (CT + RT Structure Set), the RT Plan and
    the RT Dose on the CT grid (None when the folder has none)."""

    patient: Patient
    plan: ImportedRTPlan | None
    dose_gy: np.ndarray | None
    rtdose_file: str | None


def read_rt_set(folder: "str | Path") -> RTSet:
    """Read a folder holding a CT series, an RT Structure Set, at most one RT Plan and at most
    one RT Dose (e.g. one :func:`export_rt_set` wrote, or another system's).

    Raises
    ------
    InputError
        As :func:`read_dicom` and :func:`read_rtplan` do; several RT Plans or RT Doses; a
        plan or dose in another frame of reference than the CT's.
    """
    folder = Path(folder)
    patient = read_dicom(folder)
    items = scan_folder(folder, stop_before_pixels=True)
    plans = [p for p, ds in items if modality_of(ds) == "RTPLAN"]
    doses = [p for p, ds in items if modality_of(ds) == "RTDOSE"]
    for kind, found in (("RTPLAN", plans), ("RTDOSE", doses)):
        if len(found) > 1:
            raise InputError(f"{len(found)} {kind} files ({', '.join(p.name for p in found)}); keep one per folder",
                             folder, "Modality")
    plan = read_rtplan(plans[0]) if plans else None
    if plan is not None and plan.frame_of_reference_uid and plan.frame_of_reference_uid != patient.frame_of_reference_uid:
        raise InputError(f"the plan is in frame of reference {plan.frame_of_reference_uid}, the CT in "
                         f"{patient.frame_of_reference_uid}", plans[0], "FrameOfReferenceUID")
    dose = read_rtdose(doses[0], patient.grid, patient.frame_of_reference_uid) if doses else None
    return RTSet(patient, plan, dose, str(doses[0]) if doses else None)
