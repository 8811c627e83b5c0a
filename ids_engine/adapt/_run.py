"""``ids adapt`` end to end: load, register, transfer, adapt, quantify, qualify, write.

Output folder::

    DIR/session/               the adapted plan (a session folder: ids view --session DIR/session)
    DIR/new_ct/                the new CT with the transferred contours (DICOM CT + RTSTRUCT;
                               the adapted session's case)
    DIR/registration/          the registration (ids_engine.registration save format)
    DIR/comparison.json        DVH metric deltas and gamma, recomputed and adapted plans
    DIR/qualification.json     the decision and every check
    DIR/adapt.json             the whole summary (inputs, registration, adaptation, timings)
    DIR/adapt_report.md/.html  the report; DIR/adapt_dvh.png, DIR/adapt_isodose.png

Nothing is written before every input has been read and checked; the folder is built beside
an existing one and swapped in at the end (``force``), so a failure leaves the old one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ids_engine.model import Structure

from ._adapt import AdaptOptions, adapt_plan
from ._approved import AdaptError, ApprovedPlan, load_approved_plan
from ._figures import adapt_dvh_png, isodose_slice_png
from ._report import write_adapt_report
from ._tolerance import ToleranceProfile, default_tolerance, read_tolerance

__all__ = ["REGISTRATIONS", "NewCT", "load_new_ct", "register", "run_adaptation"]

REGISTRATIONS = ("identity", "rigid", "deformable", "fiducial")


@dataclass(frozen=True, eq=False)
class NewCT:
    """The new CT as read: ``patient`` (its own structures, if any), ``label`` (no patient
    identifier), ``variant`` (a built-in test case with its known transform, or None),
    ``source`` (the folder or spec given)."""

    patient: object
    label: str
    variant: object = None
    source: str = ""


def load_new_ct(text: str, *, resolution: str | None = None) -> NewCT:
    """A DICOM folder (CT, RTSTRUCT optional) or a built-in test case spec
    (:func:`ids_engine.registration.variant_from_spec`, e.g. ``horseshoe:coarse;shift_mm=3,0,0``;
    ``resolution`` fills in a spec that names none)."""
    import hashlib

    path = Path(text)
    if path.is_dir():
        from ids_engine.io import read_dicom

        p = read_dicom(path)
        return NewCT(p, f"DICOM CT {hashlib.sha256(str(path).encode()).hexdigest()[:8]} ({p.grid.shape_zyx[0]} slices)",
                     None, str(path))
    from ids_engine.registration import variant_from_spec

    spec = str(text)
    head, sep, tail = spec.partition(";")
    if ":" not in head and resolution:
        spec = f"{head}:{resolution}{sep}{tail}"
    try:
        v = variant_from_spec(spec)
    except ValueError as exc:
        if not (":" in head or ";" in spec or "=" in spec):
            raise AdaptError(f"NEW_CT {text}: not a DICOM folder, nor a built-in test case spec "
                             f"such as 'horseshoe:coarse;shift_mm=3,0,0' ({exc})") from None
        raise AdaptError(f"NEW_CT {text}: {exc}") from None
    return NewCT(v.patient, f"test case {spec}", v, spec)


def _fiducial_points(fiducials, new_ct: NewCT):
    """(planning, new) marker positions (label -> (x, y, z) mm): from the two files given
    (:func:`ids_engine.registration.read_fiducials`, CSV ``label,x_mm,y_mm,z_mm``), else the
    test case's own markers."""
    from ids_engine.registration import read_fiducials

    if fiducials:
        files = [fiducials] if isinstance(fiducials, (str, Path)) else list(fiducials)
        if len(files) != 2:
            raise AdaptError(f"--fiducials: give two marker files (planning CT, new CT), got {len(files)}")
        return read_fiducials(files[0]), read_fiducials(files[1])
    if new_ct is not None and new_ct.variant is not None and new_ct.variant.fiducials_planning_xyz:
        return new_ct.variant.fiducials_planning_xyz, new_ct.variant.fiducials_new_xyz
    raise AdaptError("--registration fiducial needs --fiducials PLANNING.csv NEW.csv (the markers' positions on "
                     "the planning and the new CT)")


def register(kind: str, planning, new, *, fiducials=None, new_ct: NewCT | None = None, progress=None, cancel=None):
    """The planning -> new registration of ``kind`` (identity, rigid, deformable, fiducial).

    ``planning`` and ``new`` are the two CTs (:class:`~ids_engine.model.Patient`);
    ``fiducials`` two marker files for a fiducial registration (a test case's own markers
    otherwise).
    """
    import ids_engine.registration as reg

    if kind == "identity":
        return reg.identity_registration(planning.grid, new.grid)
    if kind == "rigid":
        return reg.register_rigid(planning, new, progress=progress, cancel=cancel)
    if kind == "deformable":
        return reg.register_deformable(planning, new, progress=progress, cancel=cancel)
    if kind == "fiducial":
        a, b = _fiducial_points(fiducials, new_ct)
        return reg.register_fiducials(a, b, planning_grid=planning.grid, new_grid=new.grid)
    raise AdaptError(f"--registration {kind!r}: expected one of {', '.join(REGISTRATIONS)}")


def _truth_error(registration, truth, planning) -> dict | None:
    """How far the registration maps the planning targets' voxels from the known transform."""
    if truth is None:
        return None
    mask = planning.kind_mask("target")
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    if len(idx) > 4000:
        idx = idx[np.random.default_rng(0).choice(len(idx), 4000, replace=False)]
    pts = planning.grid.index_to_world(idx.astype(float))
    err = np.linalg.norm(np.asarray(registration.map_points_xyz(pts)) - np.asarray(truth.map_points_xyz(pts)), axis=1)
    return {"mean_mm": float(err.mean()), "max_mm": float(err.max()), "points": int(len(idx))}


def _test_patient_id(nct: NewCT) -> str:
    if nct.variant is None:
        raise AdaptError("--store: give the patient's ID (--patient-id) to file the adapted plan under")
    return "TEST-" + nct.source.split(";")[0].split(":")[0]


_WRITER_DEFAULT_ID = "IDS-ENGINE"  # what write_dicom_ct writes when no PatientID is known: no ID


def _dicom_patient_ids(folder) -> set[str]:
    """The PatientIDs the CT slices in a DICOM folder carry (headers only; never logged;
    the writer's own placeholder counts as none)."""
    from ids_engine.io._dicom_common import modality_of, scan_folder

    ids = set()
    for _, ds in scan_folder(folder, stop_before_pixels=True):
        if modality_of(ds) == "CT":
            v = str(getattr(ds, "PatientID", "") or "").strip()
            if v and v != _WRITER_DEFAULT_ID:
                ids.add(v)
    return ids


def _check_same_patient(approved, nct: NewCT, *, store, patient_id: str | None) -> str | None:
    """A DICOM new CT must be the approved plan's patient (when the approved CT is DICOM too)
    and the one ``--patient-id`` names (when filing into a store). The IDs are compared, never
    printed (no identifier reaches logs). Returns the new CT's PatientID (None if it has none)."""
    if nct.variant is not None or not Path(nct.source).is_dir():
        return None
    new_ids = _dicom_patient_ids(nct.source)
    if not new_ids:
        return None
    if len(new_ids) > 1:
        raise AdaptError(f"new CT ({nct.label}): its CT slices carry {len(new_ids)} different PatientIDs; "
                         "give one patient's CT series (nothing computed)")
    case = approved.case or {}
    if "dicom" in case and Path(case["dicom"]).is_dir():
        old_ids = _dicom_patient_ids(case["dicom"])
        if old_ids and not (old_ids & new_ids):
            raise AdaptError(f"new CT ({nct.label}): its DICOM PatientID is not the one of the approved plan's CT "
                             f"({approved.label}); adaptation needs the same patient's new CT (nothing computed)")
    if store is not None and patient_id is not None and patient_id.strip() not in new_ids:
        raise AdaptError(f"--patient-id: not the DICOM PatientID of the new CT ({nct.label}); check that the "
                         "CT is this patient's (nothing computed or stored)")
    return next(iter(new_ids))


def _same_anatomy(a, b) -> bool:
    """Same structures (names and masks) on the same grid."""
    if a.grid != b.grid or a.structure_names != b.structure_names:
        return False
    return all(np.array_equal(x.mask, y.mask) for x, y in zip(a.structures, b.structures))


def _dice(a, b) -> float | None:
    s = int(a.sum()) + int(b.sum())
    return None if s == 0 else float(2.0 * np.count_nonzero(a & b) / s)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, Path):
        return str(v)
    return v


def _write_new_ct(patient, folder: Path, dicom_patient_id: str | None = None):
    """Write the new CT and its (transferred) structures as DICOM and read them back: the
    adapted session's case is this folder, so it is rebuilt exactly on reopening. A DICOM new
    CT's PatientID is kept (a later adaptation of this plan compares it)."""
    from ids_engine.io import read_dicom, write_dicom_ct, write_rtstruct

    folder.mkdir(parents=True, exist_ok=True)
    extra = {} if dicom_patient_id is None else {"patient_id": dicom_patient_id}
    files = write_dicom_ct(patient, folder, series_description="ids adapt: new CT", **extra)
    write_rtstruct(patient, folder / "RS_transferred.dcm", files, label="ADAPT")
    back = read_dicom(folder)
    # Keep the structures' colours and kinds as transferred (RTSTRUCT keeps names and kinds).
    colours = {s.name: s.colour for s in patient.structures}
    return replace(back, structures=tuple(replace(s, colour=colours.get(s.name, s.colour)) for s in back.structures),
                   name=patient.name)


def run_adaptation(approved, new_ct, out, *, registration: str = "rigid", fiducials=None,
                   tolerance: "ToleranceProfile | str | Path | None" = None, resolution: str | None = None,
                   protocol=None, options: AdaptOptions | None = None, force: bool = False, store=None,
                   progress=None, cancel=None, log=None, patient_id: str | None = None,
                   plan_name: str | None = None, contours: str = "transferred") -> dict:
    """Adapt an approved plan to a new CT and write the results to ``out`` (layout in the
    module docstring).

    Parameters
    ----------
    approved : an :class:`ApprovedPlan` or its folder (session folder or ``ids plan --out`` folder).
    new_ct : a DICOM folder or a built-in test case spec (see :func:`load_new_ct`).
    out : the output folder; must not exist or be empty unless ``force``.
    registration : identity, rigid (default), deformable or fiducial.
    fiducials : marker file(s) for a fiducial registration (see
        :func:`ids_engine.registration.read_fiducials`); a test case's own markers otherwise.
    tolerance : a profile, a TOML file, or None (the built-in default).
    resolution : for test case specs that name none.
    protocol : a TOML protocol to re-optimise for instead of the one kept with the plan.
    options : :class:`AdaptOptions`.
    store : a plan store folder (:mod:`ids_engine.store`): the adapted plan is added there
        too (its CT as a new image set of ``patient_id``), with its comparison and
        qualification as "adaptation" evidence; an auto-qualified plan gets the status
        "auto-qualified".
    patient_id, plan_name : the store's patient ID (needed for a DICOM new CT; a test case
        is filed under ``TEST-<phantom>``) and the plan's name (default "adapted <time> <output folder name>").
    contours : "transferred" (default): plan on the approved contours warped onto the new CT;
        "own": plan on the new CT's own contours where it has them (by name; e.g. the
        transferred contours of an earlier run, ``OUT/new_ct``, reviewed and edited in any
        DICOM contouring tool), the transferred ones for the rest.
    progress, cancel : ``progress(done, total, label)``; ``cancel()`` stops the optimiser.
    log : ``log(text)`` for one line per step (None: silent).

    Returns
    -------
    dict: the summary written to ``adapt.json``.
    """
    from ids_engine import __version__
    from ids_engine.registration import merge_limited_fov, transfer_structures
    from ids_engine.scripting import _swap_in, check_out_folder

    say = log or (lambda _text: None)
    t_all = time.perf_counter()
    timings = {}
    out = check_out_folder(out, force=force)
    if registration not in REGISTRATIONS:
        raise AdaptError(f"--registration {registration!r}: expected one of {', '.join(REGISTRATIONS)}")
    if contours not in ("transferred", "own"):
        raise AdaptError(f"--contours {contours!r}: expected 'transferred' or 'own'")
    if not isinstance(tolerance, ToleranceProfile):
        tolerance = default_tolerance() if tolerance is None else read_tolerance(tolerance)
    options = options or AdaptOptions()
    if store is not None and patient_id is not None and (not isinstance(patient_id, str) or not patient_id.strip()):
        raise AdaptError("--patient-id: give a non-empty patient ID")

    t0 = time.perf_counter()
    if not isinstance(approved, ApprovedPlan):
        approved = load_approved_plan(approved, protocol=protocol, progress=progress)
    timings["load_approved"] = time.perf_counter() - t0
    say(f"approved plan: {approved.label}, {len(approved.beams)} beams, Rx {approved.prescription_gy:g} Gy, "
        f"{len(approved.requests)} request(s), goals: {approved.summary()['protocol'] or 'none kept (derived)'}")
    t0 = time.perf_counter()
    nct = load_new_ct(str(new_ct), resolution=resolution)
    timings["load_new_ct"] = time.perf_counter() - t0
    if store is not None and patient_id is None:
        _test_patient_id(nct)  # refused before anything is computed
    dicom_patient_id = _check_same_patient(approved, nct, store=store, patient_id=patient_id)
    say(f"new CT: {nct.label} ({nct.patient.grid.describe()})")

    t0 = time.perf_counter()
    planning_image = approved.patient
    notes = []
    v = nct.variant
    if v is not None and v.planning.grid == approved.patient.grid and _same_anatomy(v.planning, approved.patient):
        # A built-in test case: its planning CT is the approved CT plus the markers and tissue
        # contrast its new CT carries too; register like with like (the dose stays on the approved CT).
        planning_image = v.planning
        notes.append("test case: registered from the test case's planning CT (the approved CT with its markers "
                     "and tissue contrast)")
    reg = register(registration, planning_image, nct.patient, fiducials=fiducials, new_ct=nct,
                   progress=progress, cancel=cancel)
    timings["register"] = time.perf_counter() - t0
    summ = reg.summary()
    say(f"registration ({reg.kind}): " + ", ".join(
        f"{k} {np.round(np.asarray(summ[k], float), 2).tolist()}" for k in ("rotation_deg_xyz", "translation_mm_xyz")
        if k in summ) + f" in {timings['register']:.1f} s")

    t0 = time.perf_counter()
    bare = replace(nct.patient, structures=())
    if isinstance(bare.meta, dict) and bare.meta.get("fov_box_mm_xyz") is not None:
        # A limited field of view around the target (claim 4): the registered planning CT
        # completes the new CT outside it, so the dose sees the whole patient.
        bare = merge_limited_fov(planning_image, bare, reg)
        m = bare.meta["merged_fov"]
        notes.append(f"the new CT covers a limited field of view: {m['voxels_from_new']} voxels from it, "
                     f"{m['voxels_from_planning']} from the registered planning CT")
        timings["merge_fov"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    transferred = transfer_structures(approved.patient, bare, reg)
    timings["transfer_contours"] = time.perf_counter() - t0
    if contours == "own":
        # The reviewed (edited) contours of the new CT replace the transferred ones by name.
        mine = {s.name: s for s in nct.patient.structures
                if s.mask.shape == transferred.grid.shape_zyx and not s.is_empty}
        if not any(n in mine for n in approved.patient.structure_names):
            raise AdaptError(f"--contours own: the new CT ({nct.label}) has none of the approved plan's structures "
                             f"({', '.join(approved.patient.structure_names)})")
        used = [replace(mine[s.name], grid=transferred.grid, kind=s.kind) if s.name in mine else s
                for s in transferred.structures]
        transferred = replace(transferred, structures=tuple(used))
        notes.append("planned on the new CT's own contours: " + ", ".join(n for n in approved.patient.structure_names
                                                                       if n in mine)
                     + "; transferred: " + (", ".join(n for n in approved.patient.structure_names if n not in mine)
                                            or "none"))

    dest = out.parent / f"{out.name}.partial-{os.getpid()}" if (out.exists() and any(out.iterdir())) else out
    dest.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        new_patient = _write_new_ct(transferred, dest / "new_ct", dicom_patient_id)
        timings["write_new_ct"] = time.perf_counter() - t0
        contours = []
        for s in approved.patient.structures:
            n = new_patient.structure(s.name) if s.name in new_patient.structure_names else None
            own = (nct.patient.structure(s.name).mask
                   if s.name in nct.patient.structure_names and nct.patient.structure(s.name).mask.shape == new_patient.grid.shape_zyx
                   else None)
            contours.append({"name": s.name, "kind": s.kind.value, "approved_cc": s.volume_cc,
                             "transferred_cc": None if n is None else n.volume_cc,
                             "dice": None if (own is None or n is None) else _dice(own, n.mask)})
        case = {"dicom": "../new_ct", "relative_to": "session"}  # the output folder can move
        own = [Structure(s.name, s.kind, s.mask, new_patient.grid, s.colour) for s in nct.patient.structures
               if s.name in approved.patient.structure_names and s.mask.shape == new_patient.grid.shape_zyx
               and not s.is_empty]
        own_patient = replace(new_patient, structures=tuple(own)) if own else None
        if own:
            whose = "the test case's true ones: " if nct.variant is not None else ""
            notes.append(f"the new CT has its own contours ({whose}{', '.join(s.name for s in own)}): the plans are "
                         "also compared on them and the qualification checks them too")
        result = adapt_plan(approved, new_patient, reg, case=case, tolerance=tolerance, options=options,
                            own_contours=own_patient, progress=progress, cancel=cancel)
        timings.update(result.timings_s)
        say(f"recomputed approved plan: {'within' if result.qualification_recomputed.auto_qualified else 'out of'} "
            f"tolerance; {result.why}")

        t0 = time.perf_counter()
        reg.save(dest / "registration")
        result.session.save(dest / "session")
        result.session.close()
        files = {"session": "session", "new_ct": "new_ct", "registration": "registration"}
        png = adapt_dvh_png(dest / "adapt_dvh.png", approved_dose_gy=result.approved_dose_gy,
                            approved_patient=approved.patient, recomputed_dose_gy=result.recomputed_dose_gy,
                            adapted_dose_gy=result.adapted_dose_gy, new_patient=new_patient,
                            prescription_gy=approved.prescription_gy)
        files["dvh_png"] = png.name if png else None
        png = isodose_slice_png(dest / "adapt_isodose.png", new_patient=new_patient, prescription_gy=approved.prescription_gy,
                                doses={"approved (warped)": result.approved_warped_gy,
                                       "recomputed": result.recomputed_dose_gy, "adapted": result.adapted_dose_gy})
        files["isodose_png"] = png.name if png else None
        comparison = {"recomputed": result.comparison_recomputed, "adapted": result.comparison_adapted}
        if result.own_contours is not None:
            comparison["own_contours"] = result.own_contours
        qual = result.qualification_adapted.to_dict()
        qual["recomputed"] = result.qualification_recomputed.to_dict()
        qual["reoptimised"] = result.reoptimised
        timings["write"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_all
        doc = {
            "format": "ids-engine adaptation 1", "version": __version__,
            "approved": approved.summary() | {"path": approved.path.name},
            "new_ct": {"label": nct.label, "grid": new_patient.grid.describe()},
            "registration": summ,
            "registration_error_vs_truth": _truth_error(reg, getattr(nct.variant, "truth", None), approved.patient),
            "contours": contours,
            "tolerance": {"name": tolerance.name, "source": tolerance.source},
            "adaptation": {"reoptimised": result.reoptimised, "why": result.why, "goals_source": result.goals_source,
                           "goals": result.goals, "optimiser": result.optimiser, "replay": result.replay,
                           "notes": notes + result.notes, "plan_id": result.session.plan_id},
            "comparison": comparison,
            "qualification": qual,
            "files": files,
            "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        }
        doc = _jsonable(doc)
        from ids_engine._files import atomic_text

        atomic_text(dest / "comparison.json", json.dumps(_jsonable(comparison), indent=1))
        atomic_text(dest / "qualification.json", json.dumps(_jsonable(qual), indent=1))
        atomic_text(dest / "adapt.json", json.dumps(doc, indent=1))
        write_adapt_report(dest, doc)
    except BaseException:
        if dest != out:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    if dest != out:
        _swap_in(dest, out)
    if store is not None:
        t0 = time.perf_counter()
        doc["store"] = _to_store(store, out, doc, new_patient, patient_id=patient_id or _test_patient_id(nct),
                                 plan_name=plan_name, approved_session=approved.session_folder)
        doc["timings_s"]["store"] = round(time.perf_counter() - t0, 3)
        from ids_engine._files import atomic_text

        atomic_text(out / "adapt.json", json.dumps(_jsonable(doc), indent=1))
    return doc


def _to_store(store, out: Path, doc: dict, new_patient, *, patient_id: str, plan_name: str | None,
              approved_session: Path) -> dict:
    """Put the adapted plan (``out/session``) into a plan store with its comparison and
    qualification as evidence; an auto-qualified plan gets the status "auto-qualified"."""
    from ids_engine.store import PlanStore

    with PlanStore.open(store) as st:
        pkey = st.add_patient(new_patient, patient_id=patient_id)
        # (the output folder's name too: batch tasks finishing in the same second differ)
        name = plan_name or f"adapted {time.strftime('%Y-%m-%d %H.%M.%S')} {Path(out).name}"
        # An approved plan opened from this store's own folder is the adapted plan's parent.
        parent = None
        try:
            rel = Path(approved_session).resolve().relative_to((Path(store) / "plans").resolve())
            if len(rel.parts) == 2 and rel.parts[1] == "session":
                parent = st.get(rel.parts[0])
        except (ValueError, KeyError, LookupError):
            parent = None
        if parent is not None and parent.patient_key != pkey:
            raise AdaptError(f"--patient-id: the approved plan {parent.name!r} belongs to another patient "
                             "of the store; the new CT must be the same patient's (nothing stored)")
        ref = st.import_session(out / "session", patient_key=pkey, plan_name=name, parent=parent)
        evidence = {k: doc[k] for k in ("format", "version", "approved", "new_ct", "registration",
                                        "registration_error_vs_truth", "contours", "tolerance", "adaptation",
                                        "comparison", "qualification")}
        ekey = st.attach_evidence(ref, "adaptation", _jsonable(evidence))
        qualified = bool(doc["qualification"]["auto_qualified_for_review"])
        if qualified:
            ref = st.set_status(ref, "auto-qualified", evidence_kind="adaptation")
        return {"path": str(Path(store)), "patient_key": pkey, "plan_key": ref.key, "plan_name": name,
                "evidence_key": ekey, "status": ref.status, "parent_key": ref.parent_key}
