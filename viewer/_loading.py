"""Building sessions for the viewer, off the GUI thread.

Sessions are built here (a case, a saved session, or the current patient with an edited beam
list) on a background thread and handed to the main window, which gives them to a new engine
worker. Nothing here runs while a worker owns a session.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PyQt6 import QtCore

from ids_engine.model import Beam, Patient
from ids_engine.planning import conformal_aperture
from ids_engine.session import Session, case_from_spec

from ._field import open_field_display_session
from ._meshes import SurfaceMesh, mask_mesh

__all__ = ["CaseDisplay", "DEFAULT_PRESCRIPTION_GY", "SessionLoader", "build_session", "case_display",
           "open_field_session", "reference_dose"]

DEFAULT_PRESCRIPTION_GY = 60.0
OPEN_FIELD_MARGIN_MM = 8.0  # as Session.open_field_plan


def build_session(case: dict, prescription_gy: float = DEFAULT_PRESCRIPTION_GY, progress=None) -> Session:
    """A session for a case description ({"phantom": .., "resolution": ..}, {"dicom": ..} or
    {"matrad": ..}), starting from the open-field plan (9 equispaced beams). A case without a
    target (the water and slab boxes) opens for dose display: one open field (see
    :func:`~ids_engine.viewer._field.open_field_display_session`)."""
    case = {k: v for k, v in case.items() if k != "prescription_gy"}
    patient = case_from_spec(case)
    if not patient.targets:
        return open_field_display_session(patient, prescription_gy, case, progress=progress)
    return Session.open_field_plan(patient, prescription_gy=prescription_gy, case=case, progress=progress)


def open_field_session(patient: Patient, beams: Sequence[Beam], prescription_gy: float, case: dict,
                       progress=None) -> Session:
    """A session with the given beams, starting from open fields conformed to the first target,
    equally weighted and normalised so the target's median dose is the prescription.

    This is :meth:`Session.open_field_plan` for a beam list of the planner's choosing
    (``open_field_plan`` always places equispaced beams).
    """
    if not patient.targets:
        raise ValueError("the patient has no target structure to conform the open fields to")
    if not beams:
        raise ValueError("a plan needs at least one beam")
    target = patient.targets[0]
    s = Session(patient, beams, prescription_gy=prescription_gy, case=case, progress=progress)
    maps = [conformal_aperture(g.beam, patient, target, OPEN_FIELD_MARGIN_MM).astype(np.float32)
            for g in s.engine.geometry]
    s.engine.set_fluences(maps)
    median = float(np.median(s.dose()[target.mask]))
    if median <= 0:
        raise ValueError("the target receives no dose from these beams")
    s.engine.set_fluences([m * np.float32(prescription_gy / median) for m in maps])
    s.initial_fluences = s.engine.fluences_host()
    return s


@dataclass(frozen=True, eq=False)
class CaseDisplay:
    """What the views need of a patient besides the dose (host values, built once per case).

    reference_gy : (z, y, x) float32 Gy on the CT grid, an RT Dose found beside a DICOM case
        (resampled onto the CT grid) to compare the plan with, or None.
    notes : what the planner should know about the case as opened (the reference dose read,
        or why an RT Dose could not be used), one line each.
    """

    structures: tuple  # (name, rgb, mask) for contours
    body_mesh: SurfaceMesh | None
    structure_meshes: tuple  # (name, rgb, SurfaceMesh) of the structures other than the body
    reference_gy: np.ndarray | None = None
    reference_name: str = ""
    notes: tuple[str, ...] = ()


def reference_dose(patient: Patient) -> tuple[np.ndarray | None, str, tuple[str, ...]]:
    """The first readable RT Dose of a DICOM case (``patient.meta["rtdose_files"]``) on the CT
    grid: (dose (z, y, x) float32 Gy or None, its file name, notes for the planner)."""
    from ids_engine.io import InputError, read_rtdose

    files = list(patient.meta.get("rtdose_files") or ())
    notes: list[str] = []
    for f in files:
        try:
            dose = read_rtdose(f, patient.grid, patient.frame_of_reference_uid or None)
        except (InputError, OSError, ValueError) as exc:
            notes.append(f"RT Dose {Path(f).name} not used: {exc}")
            continue
        notes.insert(0, f"Reference dose {Path(f).name} loaded (max {float(dose.max()):.3g} Gy): "
                        "Dose: Plan − reference shows the difference on the slices")
        if len(files) > 1:
            notes.append(f"{len(files)} RT Dose files in the folder; the first readable one is the reference")
        return dose.astype(np.float32, copy=False), Path(f).name, tuple(notes)
    return None, "", tuple(notes)


def case_display(session: Session) -> CaseDisplay:
    p = session.patient
    sp = p.grid.spacing_mm_zyx
    contours = tuple((s.name, tuple(s.colour), s.mask) for s in p.structures if s.mask.any())
    ext = p.external
    body = mask_mesh(ext.mask, sp) if ext.mask.any() else None
    meshes = tuple((s.name, tuple(s.colour), mask_mesh(s.mask, sp)) for s in p.structures
                   if s.mask.any() and s.name != ext.name)
    reference, name, notes = reference_dose(p)
    if not p.targets:
        notes = (f"{p.name} has no target: dose display of one open field (depth dose and profile in the "
                 "Open field panel); nothing to shape",) + notes
    return CaseDisplay(contours, body, meshes, reference, name, notes)


class SessionLoader(QtCore.QObject):
    """Runs a session builder on a background thread.

    ``done(session, CaseDisplay)``, ``failed(str)`` and ``progress(done, total, label)`` arrive
    in the GUI thread. The builder gets a ``progress`` callable to pass on.
    """

    done = QtCore.pyqtSignal(object, object)
    failed = QtCore.pyqtSignal(str)
    progress = QtCore.pyqtSignal(int, int, str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.busy = False

    def start(self, build: Callable[..., Session]) -> None:
        self.busy = True

        def run():
            try:
                session = build(progress=lambda d, t, label="": self.progress.emit(int(d), int(t), str(label)))
                display = case_display(session)
            except Exception as exc:  # shown to the planner; the open case stays open
                self.busy = False
                self.failed.emit(f"{type(exc).__name__}: {exc}")
                return
            self.busy = False
            self.done.emit(session, display)

        threading.Thread(target=run, name="ids-viewer-loader", daemon=True).start()
