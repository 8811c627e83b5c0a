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
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ids_engine.dmr import RequestError, request_from_dict
from ids_engine.evaluation import dvh_metrics

__all__ = ["ScriptError", "load_script", "plan_metrics", "run_script"]


class ScriptError(ValueError):
    """A shaping script that cannot be used (names the file and the entry)."""


def load_script(path: "str | Path") -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ScriptError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ScriptError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(doc, dict) or "case" not in doc or not isinstance(doc.get("requests"), list):
        raise ScriptError(f"{path}: a script needs a 'case' object and a 'requests' list")
    doc["_path"] = str(path)
    return doc


def _to_request(entry: dict, rx: float, grid, where: str):
    e = dict(entry)
    kind = e.get("kind")
    pct = {"dose_pct": "dose_gy", "level_pct": "level_gy", "low_pct": "low_gy", "high_pct": "high_gy"}
    for k, g in pct.items():
        if k in e:
            e[g] = float(e.pop(k)) * rx / 100.0
    if "point_mm_xyz" in e:
        try:
            e["index_zyx"] = [int(v) for v in grid.nearest_index(e.pop("point_mm_xyz"))]
        except ValueError as exc:
            raise ScriptError(f"{where}: point_mm_xyz: {exc}") from exc
    e.pop("recovery_steps", None)
    try:
        return request_from_dict(e)
    except TypeError as exc:
        raise ScriptError(f"{where}: fields do not fit a {kind!r} request ({exc})") from exc
    except RequestError as exc:
        raise ScriptError(f"{where}: {exc}") from exc


def plan_metrics(session) -> dict:
    """DVH metrics of every structure of the session's current plan."""
    dose = session.dose()
    out = {}
    for s in session.patient.structures:
        if not s.is_empty:
            out[s.name] = dvh_metrics(dose, s.mask, session.prescription_gy)
    return out


def run_script(doc: dict, out_dir: "str | Path", *, progress=None, log=print) -> dict:
    """Run a script: build the session, run its requests in order, save the session and a report.

    Writes ``out_dir/session.json`` + ``arrays.npz`` (reopen with ``Session.load``),
    ``report.json`` and ``report.md``. Returns the report dict.
    """
    from ids_engine.session import Session, case_from_spec

    where0 = doc.get("_path", "script")
    case = doc["case"]
    try:
        patient = case_from_spec(case)
    except (ValueError, KeyError) as exc:
        raise ScriptError(f"{where0}: case: {exc}") from exc
    rx = float(doc.get("prescription_gy", 60.0))
    t0 = time.perf_counter()
    session = Session.open_field_plan(patient, n_beams=int(doc.get("beams", 9)), prescription_gy=rx,
                                      margin_mm=float(doc.get("margin_mm", 8.0)), case=case, progress=progress)
    setup_s = time.perf_counter() - t0
    before = plan_metrics(session)
    default_steps = doc.get("recovery_steps")
    entries = []
    for n, entry in enumerate(doc["requests"]):
        where = f"{where0}: requests[{n}]"
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ScriptError(f"{where}: each request is an object with a 'kind'")
        if entry["kind"] in ("undo", "redo"):
            r = session.undo() if entry["kind"] == "undo" else session.redo()
            entries.append({"n": n, "kind": entry["kind"], "done": r is not None})
            log(f"[{n}] {entry['kind']}: {'done' if r else 'nothing to ' + entry['kind']}")
            continue
        req = _to_request(entry, rx, session.patient.grid, where)
        steps = entry.get("recovery_steps", default_steps)
        t1 = time.perf_counter()
        try:
            res = session.run(req, recovery_steps=steps)
        except RequestError as exc:
            entries.append({"n": n, "kind": entry["kind"], "error": str(exc)})
            log(f"[{n}] {entry['kind']}: refused: {exc}")
            continue
        wall = (time.perf_counter() - t1) * 1000
        summ = res.summary()
        summ["wall_ms"] = round(wall, 1)
        entries.append({"n": n, **summ})
        if res.voxels.size:
            log(f"[{n}] {entry['kind']}: {res.voxels.size} voxel(s), requested {np.mean(res.requested_gy):.2f} Gy, "
                f"before {np.mean(res.before_gy):.2f}, after modification {np.mean(res.after_modification_gy):.2f}, "
                f"after {res.recovery_steps} recovery steps {np.mean(res.final_gy):.2f} Gy; {wall:.0f} ms")
        else:
            log(f"[{n}] {entry['kind']}: done")
        for c in res.conflicts:
            log(f"    conflict: {c.message}")
    after = plan_metrics(session)
    out = Path(out_dir)
    session.save(out)
    n_conflicts = sum(len(e.get("conflicts", ())) for e in entries)
    report = {"script": where0, "case": case, "prescription_gy": rx, "setup_s": round(setup_s, 2),
              "plan_id": session.plan_id, "requests": entries, "conflicts": n_conflicts,
              "metrics_before": before, "metrics_after": after}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(rep: dict) -> str:
    lines = ["# ids shape report", "", f"Script: `{rep['script']}`; case: `{json.dumps(rep['case'])}`; "
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
                  "or an isodose guard):", ""]
        for e in conflicted:
            for c in e["conflicts"]:
                lines.append(f"- [{e['n']}] {e['request']['kind']}: {c['message']}")
    else:
        lines.append("None: recovery kept every pin, earlier feature, requested voxel and isodose guard.")
    lines += ["", "## DVH metrics (before -> after)", "", "| structure | mean Gy | D95 Gy | D2 Gy | V95 % |", "|---|---|---|---|---|"]
    for name, b in rep["metrics_before"].items():
        a = rep["metrics_after"][name]
        lines.append(f"| {name} | {b['mean_gy']:.2f} -> {a['mean_gy']:.2f} | {b['D95_gy']:.2f} -> {a['D95_gy']:.2f} | "
                     f"{b['D2_gy']:.2f} -> {a['D2_gy']:.2f} | {b.get('V95_pct', 0):.1f} -> {a.get('V95_pct', 0):.1f} |")
    return "\n".join(lines) + "\n"
