"""The approved plan: what adaptive replanning starts from (claim 2 of seed 003: its goals,
beams, prescription and fluence are the pre-set values)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ids_engine.io import InputError

__all__ = ["AdaptError", "ApprovedPlan", "load_approved_plan"]


class AdaptError(ValueError):
    """Input or state adaptive replanning cannot use; the message names the file or field."""


@dataclass(frozen=True, eq=False)
class ApprovedPlan:
    """An approved plan, read from a session folder or an ``ids plan --out`` folder.

    Attributes
    ----------
    path : the folder given.
    session_folder : its session folder.
    patient : the planning anatomy (CT and structures, (z, y, x)).
    case : the session's case description (see :func:`ids_engine.session.case_from_spec`).
    label : a case label for reports (no patient identifier).
    beams : the beams, each with the fluence grid its fluence lives on.
    fluences : per beam (nv, nu) float32 fluence maps (MU per amplitude): the approved plan,
        shaping requests included.
    prescription_gy : the prescription.
    dose_gy : the approved dose, float32 (z, y, x) Gy on the planning grid.
    protocol : the approved goals (:class:`ids_engine.optimise.Protocol`) or None when the
        folder keeps none.
    protocol_path : where the goals came from (None without).
    requests : the shaping requests of the plan's journal, in order (undone ones left out),
        with planning-grid voxel positions.
    engine_options, dmr_options : the session's settings (the adapted plan keeps them).
    plan_id : the session's plan ID.
    plan_info : ``plan.json`` of an ``ids plan`` folder ({} otherwise).
    """

    path: Path
    session_folder: Path
    patient: object
    case: dict
    label: str
    beams: tuple
    fluences: tuple
    prescription_gy: float
    dose_gy: np.ndarray
    protocol: object
    protocol_path: Path | None
    requests: tuple
    engine_options: object
    dmr_options: object
    plan_id: int
    plan_info: dict

    def summary(self) -> dict:
        return {"path": str(self.path), "case": self.label, "prescription_gy": self.prescription_gy,
                "beams": len(self.beams), "plan_id": self.plan_id, "requests": len(self.requests),
                "protocol": None if self.protocol is None else (self.protocol.name or str(self.protocol_path)),
                "goals": 0 if self.protocol is None else len(self.protocol.goals)}


def _session_folder(path: Path) -> Path:
    if (path / "session.json").is_file():
        return path
    if (path / "session" / "session.json").is_file():
        return path / "session"
    raise AdaptError(f"{path}: not an approved plan: expected a session folder (session.json) or an `ids plan --out` "
                     "folder (session/, plan.json, protocol.toml)")


def load_approved_plan(path: "str | Path", *, protocol: "str | Path | None" = None, progress=None) -> ApprovedPlan:
    """Read an approved plan.

    Parameters
    ----------
    path : a session folder (``session.json``, ``journal.jsonl``, ...) or an ``ids plan --out``
        folder (``session/``, ``plan.json``, ``protocol.toml``).
    protocol : a TOML protocol with the approved goals; default: ``protocol.toml`` in
        ``path`` (or beside the session folder), if there is one.
    progress : ``progress(done, total, label)`` while the session's dose engine is built.

    Raises
    ------
    AdaptError / InputError naming the folder or file: no session, a session that cannot be
    replayed, a protocol that cannot be read or names structures the plan does not have.
    """
    from ids_engine.optimise import read_protocol
    from ids_engine.session import Session, case_label, resolve_case

    path = Path(path)
    if not path.is_dir():
        raise AdaptError(f"{path}: no such folder (the approved plan is a session folder or an `ids plan --out` folder)")
    folder = _session_folder(path)
    try:
        s = Session.load(folder, keep_journaling=False, progress=progress)
    except (InputError, AdaptError):
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise AdaptError(f"{folder}: the approved plan's session cannot be opened: {exc}") from exc
    for w in s.load_warnings:
        if "torn last line" not in w:
            raise AdaptError(f"{folder}: the approved plan's session is not intact: {w}")
    if protocol is None:
        # an `ids plan` folder, the session's parent, or a stored plan (plans/<key>/files/)
        for cand in (path / "protocol.toml", folder.parent / "protocol.toml", folder.parent / "files" / "protocol.toml"):
            if cand.is_file():
                protocol = cand
                break
    proto = None
    if protocol is not None:
        proto = read_protocol(protocol)
        missing = [n for n in proto.structures if n not in s.patient.structure_names]
        if missing:
            raise InputError(f"the protocol names {', '.join(missing)}, which the approved plan's case does not have "
                             f"(structures: {', '.join(s.patient.structure_names)})", protocol, "structure")
    info = {}
    for cand in (path / "plan.json", folder.parent / "plan.json", folder.parent / "files" / "plan.json"):
        if cand.is_file():
            try:
                info = json.loads(cand.read_text())
            except (OSError, ValueError) as exc:
                raise AdaptError(f"{cand}: not readable JSON ({exc})") from None
            break
    case = resolve_case(s.case, folder)
    try:
        return ApprovedPlan(
            path=path, session_folder=folder, patient=s.patient, case=case, label=case_label(case),
            beams=tuple(g.beam for g in s.engine.geometry), fluences=tuple(s.engine.fluences_host()),
            prescription_gy=s.prescription_gy, dose_gy=s.dose(), protocol=proto,
            protocol_path=None if protocol is None else Path(protocol),
            requests=tuple(r.request for r in s.journal), engine_options=s.engine.options, dmr_options=s.options,
            plan_id=s.plan_id, plan_info=info)
    finally:
        s.close()
