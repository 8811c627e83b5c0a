"""Scripted dose shaping (``ids shape``): a JSON file of requests run on a session, with a report.

Script format::

    {
      "case": {"phantom": "horseshoe", "resolution": "coarse"},   # or {"dicom": folder} / {"matrad": file}
      "prescription_gy": 60, "beams": 9, "margin_mm": 8,           # the open-field starting plan
      "recovery_steps": 25,                                        # optional default for every request
      "requests": [
        {"kind": "set_voxel_dose", "index_zyx": [21, 22, 40], "dose_pct": 55},
        {"kind": "set_voxel_dose", "point_mm_xyz": [0, -25, 0], "dose_gy": 40},
        {"kind": "move_isodose_line", "axis": "z", "slice_index": 21, "level_pct": 95,
         "start_rc": [30, 40], "end_rc": [26, 40]},
        {"kind": "erase_spot", "centre_zyx": [21, 30, 40], "radius_mm": 6, "low_pct": 95, "high_pct": 107},
        {"kind": "pin", "name": "rim", "centre_zyx": [21, 22, 40], "radius_mm": 5},
        {"kind": "undo"}
      ]
    }

Doses may be given in Gy (``dose_gy``, ``level_gy``, ``low_gy``/``high_gy``) or in % of the
prescription (``dose_pct``, ``level_pct``, ``low_pct``/``high_pct``); a request may carry its
own ``recovery_steps``.

A request whose recovery could not keep a pin, an earlier request's feature, its own voxels
or an isodose guard has *conflicts* (:class:`ids_engine.session.Conflict`): each is logged as
a ``conflict:`` line while the script runs, kept in ``report.json`` (the request's
``"conflicts"`` list) and listed in ``report.md``.

The whole script is checked before any dose is computed (:func:`load_script`,
:func:`check_out_folder`, :func:`prepare_script`): a mistake is a :class:`ScriptError` naming
the file, the entry (``requests[3].slice_index``) and the value as written. The session is
journaled to the output folder as each request completes (see :func:`run_script`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ids_engine._files import FolderLock, FolderLockedError, atomic_text, fsync_folder
from ids_engine.dmr import RequestError, request_fields, request_from_dict
from ids_engine.dmr._requests import plain
from ids_engine.evaluation import dvh_metrics

__all__ = ["PreparedScript", "ScriptError", "ScriptInterrupted", "check_out_folder", "load_script", "plan_metrics",
           "prepare_script", "run_script"]

# Top-level keys of a script, and the percent-of-prescription fields with their Gy twins.
SCRIPT_KEYS = ("case", "prescription_gy", "beams", "margin_mm", "recovery_steps", "requests")
PCT_FIELDS = {"dose_pct": "dose_gy", "level_pct": "level_gy", "low_pct": "low_gy", "high_pct": "high_gy"}
RESOLUTIONS = ("clinical", "coarse")


class ScriptError(ValueError):
    """A shaping script that cannot be used (names the file and the entry)."""


class ScriptInterrupted(KeyboardInterrupt):
    """``run_script`` stopped by Ctrl+C; ``folder`` holds the session journaled so far."""

    def __init__(self, folder: Path, done: int, total: int) -> None:
        super().__init__(f"interrupted after {done} of {total} requests; the session so far is journaled in {folder}")
        self.folder, self.done, self.total = folder, done, total


# ---------------------------------------------------------------------------- reading and checking
def _number(where: str, value, *, positive: bool = False, non_negative: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
    if not ok or (positive and value <= 0) or (non_negative and value < 0):
        rule = "a positive number" if positive else "a number, 0 or more" if non_negative else "a number"
        raise ScriptError(f"{where} must be {rule}, got {plain(value)}")
    return float(value)


def _count(where: str, value, *, least: int) -> int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
    if not ok or float(value) != int(value) or value < least:
        raise ScriptError(f"{where} must be a whole number, {least} or more, got {plain(value)}")
    return int(value)


def load_script(path: "str | Path") -> dict:
    """Read a script and check its settings and the shape of its case and requests (no
    computing, nothing read but the script). ScriptError names the file and the entry."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScriptError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ScriptError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from exc
    except json.JSONDecodeError as exc:
        raise ScriptError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(doc, dict) or "case" not in doc or not isinstance(doc.get("requests"), list):
        raise ScriptError(f"{path}: a script needs a 'case' object and a 'requests' list")
    unknown = [k for k in doc if k not in SCRIPT_KEYS]
    if unknown:
        raise ScriptError(f"{path}: unknown key {plain(unknown[0])}; a script has: {', '.join(SCRIPT_KEYS)}")
    _number(f"{path}: prescription_gy", doc.get("prescription_gy", 60.0), positive=True)
    _count(f"{path}: beams", doc.get("beams", 9), least=1)
    _number(f"{path}: margin_mm", doc.get("margin_mm", 8.0), non_negative=True)
    if doc.get("recovery_steps") is not None:
        _count(f"{path}: recovery_steps", doc["recovery_steps"], least=0)
    _check_case(f"{path}: case", doc["case"])
    for n, entry in enumerate(doc["requests"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise ScriptError(f"{path}: requests[{n}]: each request is an object with a 'kind', got {plain(entry)}")
    doc["_path"] = str(path)
    return doc


def _check_case(where: str, case) -> None:
    from ids_engine.phantoms import PHANTOMS

    if not isinstance(case, dict):
        raise ScriptError(f"{where} must be an object such as {{\"phantom\": \"horseshoe\"}}, {{\"dicom\": folder}} "
                          f"or {{\"matrad\": file}}, got {plain(case)}")
    kinds = [k for k in ("phantom", "dicom", "matrad") if k in case]
    if len(kinds) != 1:
        raise ScriptError(f"{where} must name exactly one of 'phantom', 'dicom' or 'matrad', got keys "
                          f"{', '.join(map(plain, case)) or 'none'}")
    kind = kinds[0]
    allowed = ("phantom", "resolution") if kind == "phantom" else (kind,)
    unknown = [k for k in case if k not in allowed]
    if unknown:
        raise ScriptError(f"{where}: unknown key {plain(unknown[0])} for a {kind} case; expected: {', '.join(allowed)}")
    if kind == "phantom":
        if case["phantom"] not in PHANTOMS:
            raise ScriptError(f"{where}.phantom must be one of {', '.join(PHANTOMS)}, got {plain(case['phantom'])}")
        if case.get("resolution", "clinical") not in RESOLUTIONS:
            raise ScriptError(f"{where}.resolution must be one of {', '.join(RESOLUTIONS)}, got {plain(case['resolution'])}")
        return
    value = case[kind]
    if not isinstance(value, str) or not value:
        raise ScriptError(f"{where}.{kind} must be a {'folder' if kind == 'dicom' else 'file'} path, got {plain(value)}")
    # The path itself is not repeated: a DICOM folder is often named after the patient.
    p = Path(value)
    try:
        if kind == "dicom" and not p.is_dir():
            raise ScriptError(f"{where}.dicom: {'not a folder' if p.exists() else 'no such folder'}")
        if kind == "matrad" and not p.is_file():
            raise ScriptError(f"{where}.matrad: {'not a file' if p.exists() else 'no such file'}")
    except OSError as exc:  # e.g. a parent folder that may not be listed
        raise ScriptError(f"{where}.{kind}: cannot be read ({exc.strerror or exc})") from None


def check_out_folder(out: "str | Path", *, force: bool = False) -> Path:
    """Check the output folder before anything is computed: its parent must exist and be
    writable; the folder itself must not exist, or be empty, or (with ``force``) be a folder
    that is then replaced once the new session is complete."""
    out = Path(out)
    parent = out.absolute().parent
    if out.exists() and not out.is_dir():
        raise ScriptError(f"--out {out}: a file, not a folder")
    if not parent.is_dir():
        raise ScriptError(f"--out {out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScriptError(f"--out {out}: cannot write in {parent} (permission denied)")
    if out.is_dir():
        try:
            empty = not any(out.iterdir())
        except OSError as exc:
            raise ScriptError(f"--out {out}: cannot read the folder ({exc.strerror or exc})") from exc
        if not empty and not force:
            raise ScriptError(f"--out {out}: the folder exists and is not empty; choose another folder, or pass --force "
                              "to replace it once the new session is complete")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ScriptError(f"--out {out}: cannot write in the folder (permission denied)")
        if not empty:
            try:
                FolderLock(out).acquire().release()
            except FolderLockedError as exc:
                raise ScriptError(f"--out {exc}; close it there first") from None
    return out


@dataclass(frozen=True)
class _Step:
    """One checked script entry: a request, or an undo/redo (``request`` None)."""

    n: int
    kind: str
    request: object = None
    recovery_steps: int | None = None


@dataclass(frozen=True)
class PreparedScript:
    """A checked script: the patient, the settings and every request, ready to run."""

    path: str
    case: dict
    label: str
    patient: object
    prescription_gy: float
    beams: int
    margin_mm: float
    steps: tuple


def _scrub(text: str, case: dict, label: str) -> str:
    """``text`` with the case's input path replaced by its label (errors from the readers name files)."""
    for key in ("dicom", "matrad"):
        if key in case:
            for form in sorted({str(case[key]), str(Path(case[key])), str(Path(case[key]).resolve())}, key=len, reverse=True):
                text = text.replace(form, label)
    return text


def _case_error(where: str, message: str, case: dict, label: str) -> str:
    text = _scrub(message, case, label)
    return f"{where}: case: {text}" if label in text else f"{where}: case ({label}): {text}"


def prepare_script(doc: dict) -> PreparedScript:
    """Read the case and check every request against its grid and structures, before any dose
    is computed. ScriptError names the file, the entry (``requests[3].slice_index``) and the value."""
    from ids_engine.io import InputError
    from ids_engine.session import case_from_spec, case_label

    where0 = doc.get("_path", "script")
    case = doc["case"]
    label = case_label(case)
    try:
        patient = case_from_spec(case)
    except (InputError, ValueError, KeyError) as exc:
        raise ScriptError(_case_error(where0, str(exc), case, label)) from exc
    except OSError as exc:
        what = f"{exc.filename}: " if exc.filename else ""
        raise ScriptError(_case_error(where0, f"cannot read {what}{exc.strerror or exc}", case, label)) from exc
    if not patient.targets:
        names = ", ".join(s.name for s in patient.structures) or "none"
        raise ScriptError(f"{where0}: case ({label}) has no target structure (structures: {names}); "
                          "ids shape needs a target for its open-field starting plan")
    rx = float(doc.get("prescription_gy", 60.0))
    default_steps = doc.get("recovery_steps")
    steps = []
    for n, entry in enumerate(doc["requests"]):
        steps.append(_prepare_entry(f"{where0}: requests[{n}]", n, entry, rx, patient, default_steps))
    return PreparedScript(where0, case, label, patient, rx, int(doc.get("beams", 9)), float(doc.get("margin_mm", 8.0)),
                          tuple(steps))


def _prepare_entry(where: str, n: int, entry: dict, rx: float, patient, default_steps) -> _Step:
    kind = entry["kind"]
    steps = entry.get("recovery_steps", default_steps)
    if steps is not None:
        steps = _count(f"{where}.recovery_steps", steps, least=0)
    if kind in ("undo", "redo"):
        extra = [k for k in entry if k not in ("kind", "recovery_steps")]
        if extra:
            raise ScriptError(f"{where}: unknown field {plain(extra[0])} for {kind}; it takes no fields")
        return _Step(n, kind)
    try:
        required, optional = request_fields(kind)
    except KeyError:
        raise ScriptError(f"{where}: unknown request kind {plain(kind)}; known: set_voxel_dose, move_isodose_line, "
                          "move_isodose_surface, erase_spot, pin, unpin, undo, redo") from None
    e = {k: v for k, v in entry.items() if k != "recovery_steps"}
    source = {}  # request field -> (script field, value as written)
    for pct, gy in PCT_FIELDS.items():
        if pct in e:
            if gy in e:
                raise ScriptError(f"{where}: give {gy} or {pct}, not both")
            if gy in required + optional:
                source[gy] = (pct, e[pct])
                e[gy] = _number(f"{where}.{pct}", e.pop(pct)) * rx / 100.0
    if "point_mm_xyz" in e and "index_zyx" in required:
        if "index_zyx" in e:
            raise ScriptError(f"{where}: give index_zyx or point_mm_xyz, not both")
        point = e.pop("point_mm_xyz")
        source["index_zyx"] = ("point_mm_xyz", point)
        ok = isinstance(point, list) and len(point) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in point)
        if not ok:
            raise ScriptError(f"{where}.point_mm_xyz must be 3 numbers (x, y, z in mm), got {plain(point)}")
        if not patient.grid.contains(np.asarray(point, float)):
            raise ScriptError(f"{where}.point_mm_xyz {plain(point)} mm lies outside the grid ({_extent(patient.grid)})")
        e["index_zyx"] = [int(v) for v in patient.grid.nearest_index(np.asarray(point, float))]
    try:
        req = request_from_dict(e)
    except RequestError as exc:
        if exc.field is not None and exc.rule is not None:
            name, value = source.get(exc.field, (exc.field, entry.get(exc.field)))
            raise ScriptError(f"{where}.{name} {exc.rule}, got {plain(value)}") from None
        raise ScriptError(f"{where}: {exc}") from None
    _check_on_grid(where, req, patient)
    return _Step(n, kind, req, steps)


def _extent(grid) -> str:
    (x0, x1), (y0, y1), (z0, z1) = grid.extent_mm_xyz()
    return f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, z {z0:g}..{z1:g} mm"


def _check_on_grid(where: str, req, patient) -> None:
    """Positions inside the grid, slices that exist, structures that exist (what can be
    checked without a dose; the rest is checked when the request runs)."""
    shape = tuple(int(v) for v in patient.grid.shape_zyx)
    size = " x ".join(map(str, shape))

    def inside(field: str, zyx) -> None:
        if any(not (-0.5 < v < n - 0.5) for v, n in zip(zyx, shape)):
            raise ScriptError(f"{where}.{field} {plain(zyx)} lies outside the grid ({size} voxels, z y x)")

    kind = req.kind
    if kind == "set_voxel_dose":
        inside("index_zyx", req.index_zyx)
    elif kind == "move_isodose_line":
        ax = "zyx".index(req.axis)
        if not 0 <= req.slice_index < shape[ax]:
            raise ScriptError(f"{where}.slice_index {req.slice_index} is outside 0..{shape[ax] - 1} "
                              f"(axis {req.axis!r} of a {size} grid, z y x)")
        rest = [n for a, n in enumerate(shape) if a != ax]
        for field in ("start_rc", "end_rc"):
            rc = getattr(req, field)
            if any(not (-0.5 < v < n - 0.5) for v, n in zip(rc, rest)):
                raise ScriptError(f"{where}.{field} {plain(rc)} lies outside the slice ({rest[0]} x {rest[1]} voxels)")
    elif kind == "move_isodose_surface":
        inside("start_zyx", req.start_zyx)
        inside("end_zyx", req.end_zyx)
    elif kind in ("erase_spot", "pin"):
        inside("centre_zyx", req.centre_zyx)
    if kind == "erase_spot" and req.structure and req.structure not in patient.structure_names:
        raise ScriptError(f"{where}.structure: no structure called {req.structure!r}; "
                          f"known: {', '.join(patient.structure_names)}")


def plan_metrics(session) -> dict:
    """DVH metrics of every structure of the session's current plan."""
    dose = session.dose()
    out = {}
    for s in session.patient.structures:
        if not s.is_empty:
            out[s.name] = dvh_metrics(dose, s.mask, session.prescription_gy)
    return out


# ---------------------------------------------------------------------------- running
def run_script(doc: dict, out_dir: "str | Path", *, force: bool = False, progress=None, log=print) -> dict:
    """Run a script: check it, build the session, journal every request as it runs, write a report.

    Everything is checked before any dose is computed (:func:`check_out_folder`,
    :func:`prepare_script`). The session is journaled to ``out_dir`` from the moment the
    open-field plan exists, one request at a time, so a crash or Ctrl+C loses at most the
    request in flight (:class:`ScriptInterrupted` says where the rest is). An existing
    non-empty ``out_dir`` is refused unless ``force``: then the session is journaled into a
    new sibling folder that replaces ``out_dir`` only once it is complete, report included.

    Writes ``out_dir/session.json``, ``journal.jsonl`` and ``requests/`` (reopen with
    ``Session.load``), ``report.json`` and ``report.md``. Returns the report dict. Reports and
    log lines name the case by its label (:func:`ids_engine.session.case_label`), never by
    its input path; ``session.json`` keeps the path, which reopening needs.
    """
    from ids_engine.session import Session

    out = check_out_folder(out_dir, force=force)
    prep = prepare_script(doc)
    t0 = time.perf_counter()
    try:
        session = Session.open_field_plan(prep.patient, n_beams=prep.beams, prescription_gy=prep.prescription_gy,
                                          margin_mm=prep.margin_mm, case=prep.case, progress=progress)
    except ValueError as exc:  # e.g. a target no beam reaches
        raise ScriptError(_case_error(prep.path, str(exc), prep.case, prep.label)) from exc
    setup_s = time.perf_counter() - t0
    replace = out.is_dir() and any(out.iterdir())
    dest = out.parent / f"{out.name}.partial-{secrets.token_hex(3)}" if replace else out
    dest.mkdir(exist_ok=True)
    try:
        session.attach_journal(dest)
        report = _run_steps(session, prep, setup_s, dest, log)
    finally:
        session.close()  # stop journaling, release the folder
    if replace:
        _swap_in(dest, out)
    return report


def _run_steps(session, prep: PreparedScript, setup_s: float, folder: Path, log) -> dict:
    before = plan_metrics(session)
    entries = []
    done = 0
    try:
        for step in prep.steps:
            n, kind = step.n, step.kind
            if step.request is None:
                r = session.undo() if kind == "undo" else session.redo()
                entries.append({"n": n, "kind": kind, "done": r is not None})
                log(f"[{n}] {kind}: {'done' if r else 'nothing to ' + kind}")
                done += 1
                continue
            t1 = time.perf_counter()
            try:
                res = session.run(step.request, recovery_steps=step.recovery_steps)
            except RequestError as exc:
                entries.append({"n": n, "kind": kind, "error": str(exc)})
                log(f"[{n}] {kind}: refused: {exc}")
                done += 1
                continue
            wall = (time.perf_counter() - t1) * 1000
            summ = res.summary()
            summ["wall_ms"] = round(wall, 1)
            entries.append({"n": n, **summ})
            done += 1
            if res.voxels.size:
                log(f"[{n}] {kind}: {res.voxels.size} voxel(s), requested {np.mean(res.requested_gy):.2f} Gy, "
                    f"before {np.mean(res.before_gy):.2f}, after modification {np.mean(res.after_modification_gy):.2f}, "
                    f"after {res.recovery_steps} recovery steps {np.mean(res.final_gy):.2f} Gy; {wall:.0f} ms")
            else:
                log(f"[{n}] {kind}: done")
            for c in res.conflicts:
                log(f"    {'side effect' if c.kind == 'rise' else 'conflict'}: {c.message}")
            if res.repair_limits:
                log(f"    the side-effect repair's LP stopped at {', '.join(dict.fromkeys(res.repair_limits))}: "
                    "its repair may be weaker than it could be")
    except KeyboardInterrupt:
        raise ScriptInterrupted(folder, done, len(prep.steps)) from None
    after = plan_metrics(session)
    n_conflicts = sum(1 for e in entries for c in e.get("conflicts", ()) if c["kind"] != "rise")
    n_side = sum(1 for e in entries for c in e.get("conflicts", ()) if c["kind"] == "rise")
    report = {"script": Path(prep.path).name, "case": prep.label, "prescription_gy": prep.prescription_gy,
              "setup_s": round(setup_s, 2), "plan_id": session.plan_id, "requests": entries, "conflicts": n_conflicts,
              "side_effects": n_side,
              "metrics_before": before, "metrics_after": after}
    atomic_text(folder / "report.json", json.dumps(report, indent=1))
    atomic_text(folder / "report.md", _markdown(report))
    return report


def _swap_in(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` in the place of ``out``; the old one is removed last.

    Two renames: a crash between them leaves the old folder as ``<out>.replaced-*`` and the
    new one as ``<out>.partial-*``, both whole. A session another process journals to in
    ``out`` is never replaced (FolderLockedError)."""
    old = out.parent / f"{out.name}.replaced-{secrets.token_hex(3)}"
    guard = FolderLock(out).acquire()
    try:
        os.replace(out, old)
        os.replace(new, out)
    finally:
        guard.release()
    fsync_folder(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _markdown(rep: dict) -> str:
    lines = ["# ids shape report", "", f"Script: `{rep['script']}`; case: {rep['case']}; "
             f"prescription {rep['prescription_gy']:g} Gy; plan ID {rep['plan_id']}.", "", "## Requests", "",
             "| # | kind | voxels | requested Gy | before Gy | after modification Gy | final Gy | recovery steps | conflicts | ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in rep["requests"]:
        if "error" in e:
            lines.append(f"| {e['n']} | {e['kind']} | refused: {e['error']} | | | | | | | |")
        elif "voxels" in e:
            f = lambda k: f"{np.mean(e[k]):.2f}" if e[k] else ""  # noqa: E731
            lines.append(f"| {e['n']} | {e['request']['kind']} | {e['voxels']} | {f('requested_gy')} | {f('before_gy')} | "
                         f"{f('after_modification_gy')} | {f('final_gy')} | {e['recovery_steps']} | "
                         f"{len(e.get('conflicts', ()))} | {e['wall_ms']:.0f} |")
        else:
            lines.append(f"| {e['n']} | {e['kind']} | | | | | | | | |")
    conflicted = [e for e in rep["requests"] if e.get("conflicts")]
    lines += ["", "## Conflicts", ""]
    if conflicted:
        lines += ["What recovery could not keep (a pin, an earlier request's feature, the request's own voxels "
                  "or an isodose guard), and side effects (tissue more than 10 mm from a request that rose by more "
                  "than `report_rise_pct` of Rx unasked):", ""]
        for e in conflicted:
            for c in e["conflicts"]:
                lines.append(f"- [{e['n']}] {e['request']['kind']}: {c['message']}")
    else:
        lines.append("None: recovery kept every pin, earlier feature, requested voxel and isodose guard, and nothing "
                     "far from a request rose unasked.")
    lines += ["", "## DVH metrics (before -> after)", "", "| structure | mean Gy | D95 Gy | D2 Gy | V95 % |", "|---|---|---|---|---|"]
    for name, b in rep["metrics_before"].items():
        a = rep["metrics_after"][name]
        lines.append(f"| {name} | {b['mean_gy']:.2f} -> {a['mean_gy']:.2f} | {b['D95_gy']:.2f} -> {a['D95_gy']:.2f} | "
                     f"{b['D2_gy']:.2f} -> {a['D2_gy']:.2f} | {b.get('V95_pct', 0):.1f} -> {a.get('V95_pct', 0):.1f} |")
    return "\n".join(lines) + "\n"
