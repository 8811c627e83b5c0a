"""``ids export``: a shaped plan as a deliverable DICOM RT set (and optionally Elekta Transa files);
``ids import-plan``: the dose of a DICOM RT Plan recomputed with our engine.

``ids export SESSION_OR_PHANTOM --out DIR`` sequences the plan's fluence into MLC segments,
recomputes the deliverable dose from the segments, and writes CT (for phantoms), RT
Structure Set, RT Plan (research use only), RT Dose and ``summary.md``.

:func:`plan_state` and :func:`export_state` are what the viewer's File > Export runs (the copy
under the session's lock, the rest on a background thread).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PlanState", "add_parser", "deliverable_plan", "export_session", "export_state", "plan_state"]


@dataclass(frozen=True, eq=False)
class PlanState:
    """A consistent host copy of what an export needs from a session: the patient, the beams
    (with their fluence grids), the fluence maps (MU over the course, one per beam), the dose
    the session shows (Gy, (z, y, x)), the machine, the engine options and the prescription."""

    patient: object
    beams: tuple
    fluences: tuple
    dose_gy: np.ndarray
    machine: object
    engine_options: object
    prescription_gy: float


def plan_state(session) -> PlanState:
    """Copy a session's current plan. Taken under the session's own lock, which every request
    holds, so the copy is one plan even while another thread (the viewer's worker) shapes it."""
    with session._lock:
        engine = session.engine
        return PlanState(session.patient, tuple(g.beam for g in engine.geometry), tuple(engine.fluences_host()),
                         session.dose(), engine.machine, engine.options, float(session.prescription_gy))


def deliverable_plan(beams, fluences, mlc=None, *, prescription_gy: float, fractions: int = 1,
                     name: str = "ids plan"):
    """Fluence maps as a :class:`~ids_engine.deliver.DeliverablePlan`.

    Sequenced with :func:`ids_engine.deliver.sequence_plan` when the package has it; without
    it, uniform (open-field) maps become one segment each (:func:`ids_engine.io.open_field_segments`)
    and modulated maps are refused.

    Parameters
    ----------
    beams : the beams, with their fluence grids (``[g.beam for g in engine.geometry]``).
    fluences : one (nv, nu) map per beam, MU over the course (``engine.fluences_host()``).
    mlc : the MLC (default :func:`~ids_engine.model.default_mlc`).
    prescription_gy, fractions, name : of the plan (segment MU are per fraction).
    """
    import dataclasses

    from ids_engine import deliver
    from ids_engine.deliver import DeliverablePlan, SequencedBeam
    from ids_engine.io import open_field_segments
    from ids_engine.model import default_mlc

    mlc = mlc or default_mlc()
    beams, fluences = list(beams), list(fluences)
    sequencer = getattr(deliver, "sequence_plan", None)
    if sequencer is not None:
        kwargs = {}
        params = inspect.signature(sequencer).parameters
        for key, value in (("prescription_gy", prescription_gy), ("fractions", fractions), ("name", name)):
            if key in params:
                kwargs[key] = value
        plan = sequencer(beams, fluences, mlc, **kwargs)
        return dataclasses.replace(plan, name=name, prescription_gy=float(prescription_gy), fractions=int(fractions))
    out = []
    for b, (beam, f) in enumerate(zip(beams, fluences)):
        try:
            segments = open_field_segments(f, beam.fluence_grid, mlc, fractions=fractions)
        except ValueError as exc:
            raise ValueError(f"beam {b + 1} ({beam.name}): {exc}; this installation has no MLC sequencer "
                             "(ids_engine.deliver.sequence_plan)") from None
        out.append(SequencedBeam(beam, mlc, segments))
    return DeliverablePlan(name, tuple(out), float(prescription_gy), int(fractions))


def export_state(state: PlanState, out: "str | Path", *, fractions: int = 1, anonymise: bool = False,
                 patient_name: str | None = None, patient_id: str | None = None, machine_name: str = "ids-engine",
                 case_label: str = "", progress=None):
    """Sequence a plan and write its DICOM RT set into ``out`` (see
    :func:`ids_engine.io.export_rt_set`); the summary also compares the deliverable dose
    with the fluence dose the session shows.

    Returns
    -------
    (ExportedSet, DeliverablePlan, dict)
        What was written, the plan, and the agreement of the deliverable dose with the
        session's (:func:`ids_engine.io.dose_agreement`, 3 % / 3 mm).
    """
    from ids_engine.io import dose_agreement, export_rt_set, plan_dose

    if progress:
        progress(0, 3, "sequencing")
    mlc = getattr(state.machine, "mlc", None)
    plan = deliverable_plan(state.beams, state.fluences, mlc, prescription_gy=state.prescription_gy,
                            fractions=fractions, name=(case_label or "ids plan")[:64])
    if progress:
        progress(1, 3, "deliverable dose")
    dose = plan_dose(state.patient, plan, machine=state.machine, engine_options=state.engine_options)
    agreement = dose_agreement(state.dose_gy, dose, state.patient.grid, dose_pct=3.0, distance_mm=3.0)
    if progress:
        progress(2, 3, "writing DICOM")
    exported = export_rt_set(state.patient, plan, out, dose_gy=dose, anonymise=anonymise, patient_name=patient_name,
                             patient_id=patient_id, machine_name=machine_name, case_label=case_label)
    with open(exported.summary, "a", encoding="utf-8") as fh:
        fh.write("\n## Deliverable dose against the fluence dose\n\n"
                 f"Global gamma 3 % / 3 mm (interpolated search) at {agreement['points']} voxels drawn from those "
                 f"above 10 % of the maximum: {agreement['pass_rate_pct']:.1f} % pass, largest dose difference "
                 f"{agreement['max_diff_pct']:.1f} % of the fluence dose's maximum.\n")
    if progress:
        progress(3, 3, "done")
    return exported, plan, agreement


def export_session(session, out: "str | Path", **kwargs):
    """:func:`export_state` of :func:`plan_state` ``(session)``."""
    return export_state(plan_state(session), out, **kwargs)


def _split_name(text: str) -> tuple[str, str, str]:
    parts = (text or "").split("^") + ["", "", ""]
    return parts[0], parts[1], parts[2]


def _dicom_patient_module(patient) -> tuple[str, str]:
    """(PatientName, PatientID) of a DICOM case's CT (empty for other cases)."""
    from ids_engine.io._dicom_common import read_dataset

    files = (patient.meta or {}).get("files") or []
    if not files:
        return "", ""
    ds = read_dataset(files[0], stop_before_pixels=True)
    return str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")


def _has_rtplan(folder: Path) -> bool:
    from ids_engine.io._dicom_common import modality_of, scan_folder

    return any(modality_of(ds) == "RTPLAN" for _, ds in scan_folder(folder, stop_before_pixels=True))


def cmd_export(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil

    from ids_engine import __version__
    from ids_engine._files import FolderLockedError
    from ids_engine._progress import TextProgressBar
    from ids_engine.io import InputError, export_rt_set, read_rt_set, read_transa_config, write_transa
    from ids_engine.phantoms import PHANTOMS
    from ids_engine.scripting import ScriptError, _swap_in, check_out_folder
    from ids_engine.session import Session, case_label

    session = rt = None
    try:
        out = check_out_folder(args.out, force=args.force)
        config = read_transa_config(args.transa) if args.transa else None
        source = Path(args.plan)
        if args.plan in PHANTOMS and not source.exists():
            spec = {"phantom": args.plan, "resolution": args.resolution}
            session = Session.from_phantom(args.plan, args.resolution, n_beams=args.beams,
                                           prescription_gy=args.prescription_gy, progress=TextProgressBar())
        elif source.is_dir() and (source / "session.json").is_file():
            session = Session.load(source, keep_journaling=False, progress=TextProgressBar())
            spec = session.case
        elif source.is_dir() and _has_rtplan(source):
            rt = read_rt_set(source)
            spec = {"dicom": str(source)}
        else:
            raise ValueError(f"{args.plan}: not a saved session folder (with session.json), a DICOM folder with an "
                             f"RT Plan, or a built-in phantom ({', '.join(PHANTOMS)})")
        label = case_label(spec)
    except (ScriptError, InputError, ValueError, FolderLockedError) as exc:
        if session is not None:
            session.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    patient = session.patient if session is not None else rt.patient
    name, pid = _dicom_patient_module(patient)
    if rt is not None:
        plan = rt.plan.plan
        if args.fractions is not None:
            plan = dataclasses.replace(plan, fractions=args.fractions)
        for note in rt.plan.notes:
            print(f"note: {note}")
        what = f"the RT Plan {Path(rt.plan.path).name} ({len(plan.beams)} beams)"
    else:
        what = f"the plan, prescription {session.prescription_gy:g} Gy"
    fractions = args.fractions or (plan.fractions if rt is not None else 1)
    print(f"ids-engine {__version__} | exporting {what} of {label} in {fractions} fraction(s)")
    dest = out.parent / f"{out.name}.partial-{os.getpid()}" if (out.exists() and any(out.iterdir())) else out
    created = not out.exists()
    try:
        if session is not None:
            exported, plan, agreement = export_session(
                session, dest, fractions=fractions, anonymise=args.anonymise, patient_name=args.patient_name,
                patient_id=args.patient_id, machine_name=args.machine_name, case_label=label,
                progress=TextProgressBar())
        else:
            exported = export_rt_set(patient, plan, dest, anonymise=args.anonymise, machine_name=args.machine_name,
                                     case_label=label, progress=TextProgressBar())
            agreement = None
        transa_files = []
        if config is not None:
            department = args.department_number or args.patient_id or pid
            name = args.patient_name or name
            if args.anonymise:  # the pseudonyms the DICOM files carry, never the real identifiers
                from ids_engine.io._dicom_common import read_dataset

                ct = read_dataset(exported.ct_files[0], stop_before_pixels=True)
                name, department = str(ct.get("PatientName", "")), str(ct.get("PatientID", ""))
            last, first, middle = _split_name(name)
            transa_dir = (Path(args.transa_dir) if args.transa_dir
                          else Path(config.directory) if config.directory else dest / "transa")
            transa_files = write_transa(plan, config, directory=transa_dir, department_number=department,
                                        last_name=last, first_name=first, middle_name=middle)
    except (InputError, ValueError) as exc:
        if dest != out or created:
            shutil.rmtree(dest, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if session is not None:
            session.close()
    if dest != out:
        _swap_in(dest, out)
    segs = sum(1 for sb in plan.beams for s in sb.segments if s.mu > 0)
    mu = sum(sb.mu for sb in plan.beams)
    line = f"{len(plan.beams)} beams, {segs} segments, {mu:.0f} MU per fraction ({mu * plan.fractions:.0f} over the course)"
    if agreement is not None:
        line += f"; deliverable dose vs fluence dose: gamma 3 %/3 mm {agreement['pass_rate_pct']:.1f} % pass"
    print(line)
    print(f"written to {out}: {len(exported.ct_files)} CT slices, RS.dcm, RP.dcm (research use only), RD.dcm, "
          f"summary.md{' (anonymised)' if args.anonymise else ''}")
    if transa_files:
        where = out / "transa" if transa_dir == dest / "transa" else transa_dir
        print(f"Transa: {len(transa_files)} plan file(s) under {where}")
    return 0


def cmd_import_plan(args: argparse.Namespace) -> int:
    from ids_engine._files import atomic_text
    from ids_engine.dose import default_6mv
    from ids_engine.evaluation import dvh_metrics
    from ids_engine.io import InputError, dose_agreement, plan_dose, read_rt_set, write_rtdose
    from ids_engine.scripting import ScriptError, check_out_folder

    try:
        out = check_out_folder(args.out, force=args.force)
        rt = read_rt_set(args.folder)
        if rt.plan is None:
            raise InputError("no RTPLAN file in the folder", args.folder, "Modality")
        if not rt.plan.plan.beams:
            raise InputError("the plan has no treatment beams to recompute", rt.plan.path, "BeamSequence")
    except (ScriptError, InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    imported = rt.plan
    plan = imported.plan
    for note in imported.notes:
        print(f"note: {note}")
    dose = plan_dose(rt.patient, plan)
    out.mkdir(parents=True, exist_ok=True)
    ct = rt.patient.meta["files"]
    rd = write_rtdose(dose, rt.patient.grid, out / "RD_ids.dcm", rt.patient.frame_of_reference_uid, ct_files=ct,
                      rtplan_sop_instance_uid=imported.sop_instance_uid, dose_summation_type="PLAN")
    machine = default_6mv()
    lines = ["# ids-engine dose of an imported RT Plan", "",
             f"Plan {plan.name!r} ({Path(imported.path).name}): {len(plan.beams)} treatment beams, "
             f"{plan.fractions} fraction(s), prescription {plan.prescription_gy:g} Gy; recomputed with the "
             f"ids-engine pencil beam ({machine.name}) on the CT grid; RD_ids.dcm references the plan.", "",
             "| beam | gantry deg | collimator deg | couch deg | energy MV | segments | MU / fraction |",
             "|---|---|---|---|---|---|---|"]
    for sb in plan.beams:
        b = sb.beam
        lines.append(f"| {b.name} | {b.gantry_deg:g} | {b.collimator_deg:g} | {b.couch_deg:g} | {b.energy_mv:g} | "
                     f"{len(sb.segments)} | {sb.mu:.1f} |")
    energies = sorted({sb.beam.energy_mv for sb in plan.beams} - {machine.energy_mv})
    notes = list(imported.notes) + ([f"beams of {', '.join(f'{e:g}' for e in energies)} MV computed with the "
                                     f"{machine.energy_mv:g} MV machine model"] if energies else [])
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += ["", f"Dose maximum {float(dose.max()):.2f} Gy.", "",
              "| structure | mean Gy | D95 Gy | max Gy |", "|---|---|---|---|"]
    for st in rt.patient.structures:
        if not st.is_empty:
            m = dvh_metrics(dose, st.mask)
            lines.append(f"| {st.name} | {m['mean_gy']:.2f} | {m['D95_gy']:.2f} | {m['max_gy']:.2f} |")
    agreement = None
    if rt.dose_gy is not None and float(rt.dose_gy.max()) > 0:
        agreement = {k: dose_agreement(rt.dose_gy, dose, rt.patient.grid, dose_pct=k, distance_mm=k)
                     for k in (1.0, 3.0)}
        lines += ["", f"## Against the folder's RT Dose ({Path(rt.rtdose_file).name})", "",
                  "| criterion | gamma pass % | largest difference % of max |", "|---|---|---|"]
        lines += [f"| {k:g} % / {k:g} mm | {a['pass_rate_pct']:.1f} | {a['max_diff_pct']:.2f} |"
                  for k, a in agreement.items()]
    atomic_text(out / "summary.md", "\n".join(lines) + "\n")
    print(f"{len(plan.beams)} beams, {sum(len(sb.segments) for sb in plan.beams)} segments, "
          f"{sum(sb.mu for sb in plan.beams):.0f} MU per fraction; dose maximum {float(dose.max()):.2f} Gy")
    if agreement:
        print(f"against the folder's RT Dose: gamma 1 %/1 mm {agreement[1.0]['pass_rate_pct']:.1f} % pass, "
              f"3 %/3 mm {agreement[3.0]['pass_rate_pct']:.1f} % pass")
    print(f"written to {out}: {rd.name}, summary.md")
    return 0


def add_parser(sub) -> None:
    from ids_engine.cli import _positive_float, _positive_int

    s = sub.add_parser(
        "export", help="write a plan as a deliverable DICOM RT set (CT, RTSTRUCT, RTPLAN, RTDOSE)",
        description="Sequence a shaped plan into MLC segments and write a DICOM RT set: CT (for built-in phantoms, "
                    "with a new frame of reference), RT Structure Set, RT Plan (marked research use only, "
                    "UNAPPROVED), RT Dose of the deliverable segments and summary.md. Optionally anonymised, and "
                    "Elekta Transa-style field shapes.")
    s.add_argument("plan", metavar="SESSION_OR_PLAN",
                   help="a saved session folder (ids shape / ids plan / the viewer), a DICOM folder with CT, "
                        "RTSTRUCT and an RT Plan (re-exported, e.g. to Transa), or a built-in phantom name (its "
                        "open-field plan)")
    s.add_argument("--out", required=True, help="folder for the DICOM files; must not exist or be empty")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out folder once the export is complete")
    s.add_argument("--anonymise", action="store_true",
                   help="remap names, IDs, dates and UIDs consistently across the files of the export (Transa "
                        "patient IDs are then built from the pseudonyms)")
    s.add_argument("--fractions", type=_positive_int, default=None,
                   help="NumberOfFractionsPlanned: the plan's fluence (MU over the course) is shared among "
                        "them, BeamMeterset is MU per fraction (default 1; an RT Plan keeps its own)")
    s.add_argument("--resolution", choices=["clinical", "coarse"], default="clinical", help="a phantom's grid")
    s.add_argument("--beams", type=_positive_int, default=9, help="a phantom's open-field beams (default 9)")
    s.add_argument("--prescription-gy", type=_positive_float, default=60.0, help="a phantom's prescription (60 Gy)")
    s.add_argument("--patient-name", default=None,
                   help="PatientName for a written CT, DICOM style Last^First^Middle (also the Transa names; "
                        "default for a DICOM case: its CT's)")
    s.add_argument("--patient-id", default=None, help="PatientID for a written CT (default IDS-ENGINE)")
    s.add_argument("--machine-name", default="ids-engine", help="TreatmentMachineName (default ids-engine)")
    s.add_argument("--transa", metavar="CONFIG", help="also write Elekta Transa-style files configured by this "
                                                      "ElektaTransa.loc file")
    s.add_argument("--transa-dir", help="Transa export directory (default: the configuration's, else OUT/transa)")
    s.add_argument("--department-number", default="",
                   help="department number for the Transa patient ID (default: --patient-id, else the DICOM "
                        "case's PatientID)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "import-plan", help="recompute the dose of a DICOM RT Plan (CT + RTSTRUCT + RTPLAN folder)",
        description="Read a folder holding a CT series, its RT Structure Set and an RT Plan (ours or another "
                    "system's: beams and MLC control points become step-and-shoot segments), recompute the plan's "
                    "dose with the ids-engine pencil beam and write it as RD_ids.dcm with summary.md; an RT Dose "
                    "in the folder is compared (gamma 1 %/1 mm and 3 %/3 mm). A truncated or inconsistent plan is "
                    "refused naming the file and the field.")
    s.add_argument("folder", help="DICOM folder with CT, RTSTRUCT and one RTPLAN (and optionally one RTDOSE)")
    s.add_argument("--out", required=True, help="folder for RD_ids.dcm and summary.md; must not exist or be empty")
    s.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    s.set_defaults(func=cmd_import_plan)
