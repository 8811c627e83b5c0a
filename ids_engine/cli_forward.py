"""``ids autoweight``: forward planning from a case file (seed 001; issue 12).

``ids autoweight CASE.json --out DIR [--method simplex|cimmino|downhill|annealing|all]``
builds the case (a built-in phantom plus structures and points named in the file), the plan
(beams with open jaw fields), computes each beam's dose per MU once, applies the file's
prescription (if any), solves the auto weight with each method asked for (and the seed's
binary search on an upper limit, if asked), installs each solution's whole MU in a plan of
its own, and writes the plan book, a physics summary per plan and the comparison table,
which it also prints.

Case file (see ``examples/forward/box.json``)::

    {
      "case": {"phantom": "water", "resolution": "coarse", "size_mm": [300, 200, 150]},
      "structures": [
        {"name": "PTV", "kind": "target", "box_mm": {"centre": [0, 0, 0], "size": [40, 40, 40]}},
        {"name": "RING", "kind": "oar", "from": "BODY", "subtract": ["PTV"], "subtract_margins_mm": [30]}
      ],
      "points": [{"label": "P1", "position_mm_xyz": [0, 30, 0]}],
      "plan": {"name": "box", "isocentre_mm_xyz": [0, 0, 0],
               "beams": [{"name": "AP", "gantry_deg": 0, "jaw_x_mm": [-30, 30], "jaw_y_mm": [-30, 30]}, ...],
               "normalisation": {"kind": "isocentre", "beam": 0},
               "prescription": {"mode": "dose_to_normalisation", "dose_gy": 2.0, "percent": 100,
                                "weights": [1, 1, 1, 1]}},
      "autoweight": {"volumes": [{"name": "PTV", "role": "target", "min_gy": 2.0, "penalty": 10},
                                 {"name": "BODY", "role": "oar", "importance": 1}],
                     "points_per_volume": 2000, "seed": 0,
                     "cimmino": {"stop_distance_mu": 0.01}, "annealing": {"iterations_per_step": 10},
                     "search_upper": {"volume": "RING"}}
    }

Structures are a box (``box_mm``: centre and size, patient mm), a sphere (``sphere_mm``:
centre and radius) or a new volume from an old one (``from``, ``margin_mm``, ``subtract``,
``subtract_margins_mm``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

__all__ = ["CaseFileError", "add_parser", "load_case_file", "run_autoweight"]

METHODS = ("simplex", "cimmino", "downhill", "annealing")
TOP_KEYS = ("case", "structures", "points", "plan", "autoweight")
BEAM_KEYS = ("name", "gantry_deg", "couch_deg", "collimator_deg", "energy_mv", "sad_mm", "jaw_x_mm", "jaw_y_mm")


class CaseFileError(ValueError):
    """A case file that cannot be used (names the file and the entry)."""


def _need(d: dict, key: str, where: str, kind=None):
    if not isinstance(d, dict) or key not in d:
        raise CaseFileError(f"{where}: missing '{key}'")
    v = d[key]
    if kind is not None and not isinstance(v, kind):
        raise CaseFileError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def _vec(v, n: int, where: str) -> tuple[float, ...]:
    ok = isinstance(v, (list, tuple)) and len(v) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v)
    if not ok:
        raise CaseFileError(f"{where}: expected {n} numbers, got {v!r}")
    return tuple(float(x) for x in v)


def _unknown(d: dict, allowed, where: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise CaseFileError(f"{where}: unknown field(s) {extra}; allowed: {sorted(allowed)}")


def load_case_file(path) -> dict:
    """Read and check the shape of a case file (values are checked when the case is built)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CaseFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise CaseFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CaseFileError(f"{path}: the case file must be a JSON object")
    w = str(path)
    _unknown(doc, TOP_KEYS, w)
    _need(doc, "case", w, dict)
    plan = _need(doc, "plan", w, dict)
    _unknown(plan, ("name", "isocentre_mm_xyz", "beams", "normalisation", "prescription"), f"{w}: plan")
    beams = _need(plan, "beams", f"{w}: plan", list)
    if not beams:
        raise CaseFileError(f"{w}: plan.beams is empty")
    for i, b in enumerate(beams):
        if not isinstance(b, dict):
            raise CaseFileError(f"{w}: plan.beams[{i}] must be an object")
        _unknown(b, BEAM_KEYS, f"{w}: plan.beams[{i}]")
    for i, s in enumerate(doc.get("structures") or []):
        _need(s, "name", f"{w}: structures[{i}]", str)
    if "autoweight" in doc:
        aw = _need(doc, "autoweight", w, dict)
        _unknown(aw, ("volumes", "points_per_volume", "seed", "search_upper") + METHODS, f"{w}: autoweight")
        vols = _need(aw, "volumes", f"{w}: autoweight", list)
        for i, v in enumerate(vols):
            if not isinstance(v, dict):
                raise CaseFileError(f"{w}: autoweight.volumes[{i}] must be an object")
            _unknown(v, ("name", "role", "min_gy", "max_gy", "importance", "penalty"),
                     f"{w}: autoweight.volumes[{i}]")
    doc["_path"] = str(path)
    return doc


def _build_patient(doc: dict, name: str):
    from ids_engine.model import PointOfInterest, Structure, StructureKind
    from ids_engine.phantoms import PHANTOMS
    from ids_engine.phantoms._boxes import broadcast_axes

    case = doc["case"]
    _unknown(case, ("phantom", "resolution", "size_mm"), f"{name}: case")
    ph = _need(case, "phantom", f"{name}: case", str)
    if ph not in PHANTOMS:
        raise CaseFileError(f"{name}: case.phantom {ph!r} is not one of {', '.join(PHANTOMS)}")
    kw = {"resolution": case.get("resolution", "coarse")}
    if "size_mm" in case:
        if ph not in ("water", "slab"):
            raise CaseFileError(f"{name}: case.size_mm applies to the water and slab phantoms only")
        kw["size_mm"] = _vec(case["size_mm"], 3, f"{name}: case.size_mm")
    try:
        patient = PHANTOMS[ph](**kw)
    except ValueError as exc:
        raise CaseFileError(f"{name}: case: {exc}") from None
    g = patient.grid
    x, y, z = broadcast_axes(g)
    for i, s in enumerate(doc.get("structures") or []):
        where = f"{name}: structures[{i}]"
        _unknown(s, ("name", "kind", "box_mm", "sphere_mm", "from", "margin_mm", "subtract", "subtract_margins_mm"), where)
        kind = s.get("kind", "target")
        if kind not in ("target", "oar", "external"):
            raise CaseFileError(f"{where}.kind must be target, oar or external, got {kind!r}")
        try:
            if "box_mm" in s:
                c = _vec(_need(s["box_mm"], "centre", f"{where}.box_mm"), 3, f"{where}.box_mm.centre")
                sz = _vec(_need(s["box_mm"], "size", f"{where}.box_mm"), 3, f"{where}.box_mm.size")
                mask = (np.abs(x - c[0]) <= sz[0] / 2 + 1e-6) & (np.abs(y - c[1]) <= sz[1] / 2 + 1e-6) & \
                    (np.abs(z - c[2]) <= sz[2] / 2 + 1e-6)
                patient = patient.with_structures(Structure(s["name"], StructureKind.parse(kind), mask, g))
            elif "sphere_mm" in s:
                c = _vec(_need(s["sphere_mm"], "centre", f"{where}.sphere_mm"), 3, f"{where}.sphere_mm.centre")
                r = float(_need(s["sphere_mm"], "radius", f"{where}.sphere_mm"))
                mask = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r * r + 1e-6
                patient = patient.with_structures(Structure(s["name"], StructureKind.parse(kind), mask, g))
            elif "from" in s:
                sub = s.get("subtract") or []
                patient = patient.new_structure_from(s["name"], s["from"], float(s.get("margin_mm", 0.0)),
                                                     subtract_names=sub,
                                                     subtract_margins_mm=s.get("subtract_margins_mm"), kind=kind)
            else:
                raise CaseFileError(f"{where}: give box_mm, sphere_mm or from")
        except CaseFileError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise CaseFileError(f"{where} ({s['name']!r}): {str(exc).strip(chr(34))}") from None
        if patient.structure(s["name"]).is_empty:
            raise CaseFileError(f"{where} ({s['name']!r}) holds no voxel")
    for i, p in enumerate(doc.get("points") or []):
        where = f"{name}: points[{i}]"
        label = _need(p, "label", where, str)
        patient = patient.with_points(PointOfInterest(label, _vec(_need(p, "position_mm_xyz", where), 3,
                                                                  f"{where}.position_mm_xyz")))
    return patient


def _build_plan(doc: dict, name: str, patient):
    from ids_engine.model import Beam
    from ids_engine.planning import BeamField, Plan, PointRef
    from ids_engine.planning._prescription import prescription_from_dict

    pd = doc["plan"]
    iso = _vec(pd.get("isocentre_mm_xyz", [0, 0, 0]), 3, f"{name}: plan.isocentre_mm_xyz")
    beams, fields = [], []
    for i, b in enumerate(pd["beams"]):
        where = f"{name}: plan.beams[{i}]"
        try:
            kw = {k: b[k] for k in ("gantry_deg", "couch_deg", "collimator_deg", "energy_mv", "sad_mm") if k in b}
            beams.append(Beam(name=str(b.get("name", f"B{i + 1}")), isocentre_mm_xyz=iso, **kw))
            fields.append(BeamField(_vec(b.get("jaw_x_mm", [-50, 50]), 2, f"{where}.jaw_x_mm"),
                                    _vec(b.get("jaw_y_mm", [-50, 50]), 2, f"{where}.jaw_y_mm")))
        except (TypeError, ValueError) as exc:
            raise CaseFileError(f"{where}: {exc}") from None
    try:
        norm = PointRef.from_dict(pd["normalisation"]) if "normalisation" in pd else PointRef("isocentre", 0)
        rx = prescription_from_dict(pd.get("prescription"))
        plan = Plan(str(pd.get("name", "plan")), tuple(beams), tuple(fields), normalisation=norm)
        norm.position_mm_xyz(plan, patient)
        if rx is not None:
            n = len(getattr(rx, "mu", getattr(rx, "doses_gy", getattr(rx, "weights", ()))))
            if n != plan.n_beams:
                raise ValueError(f"prescription has {n} values for {plan.n_beams} beams")
    except (TypeError, ValueError) as exc:
        raise CaseFileError(f"{name}: plan: {exc}") from None
    return plan, rx


def _build_goals(doc: dict, name: str, patient):
    from ids_engine.planning import VolumeGoal

    aw = doc.get("autoweight")
    if aw is None:
        return None
    goals = []
    for i, v in enumerate(aw["volumes"]):
        where = f"{name}: autoweight.volumes[{i}]"
        vn = _need(v, "name", where, str)
        if vn not in patient.structure_names:
            raise CaseFileError(f"{where}: no structure {vn!r}; structures: {', '.join(patient.structure_names)}")
        try:
            goals.append(VolumeGoal(vn, **{k: v[k] for k in v if k != "name"}))
        except (TypeError, ValueError) as exc:
            raise CaseFileError(f"{where}: {exc}") from None
    su = aw.get("search_upper")
    if su is not None:
        vol = _need(su, "volume", f"{name}: autoweight.search_upper", str)
        if vol not in patient.structure_names:
            raise CaseFileError(f"{name}: autoweight.search_upper.volume: no structure {vol!r}")
    return goals


def _metrics(dose, patient, goals) -> dict:
    out = {}
    for g in goals:
        m = patient.structure(g.name).mask
        d = dose[m]
        out[g.name] = {"min_gy": float(d.min()), "max_gy": float(d.max()), "mean_gy": float(d.mean())}
    return out


def run_autoweight(doc: dict, out, *, methods=METHODS, force: bool = False, progress=None, echo=print,
                   pdf: bool = False) -> dict:
    """Run a case file (see the module docstring) into the folder ``out``; returns the
    comparison (also written as ``comparison.json`` and ``comparison.md``). With ``pdf``
    each physics summary is written as PDF too."""
    from ids_engine._files import atomic_text
    from ids_engine.evaluation import physics_summary, write_physics_summary
    from ids_engine.planning import (
        AutoWeightInfeasible, AutoWeightProblem, BeamDoses, MonitorUnits, PlanBook, apply_prescription, auto_weight,
        search_upper_limit,
    )
    from ids_engine.scripting import _swap_in, check_out_folder

    name = str(doc.get("_path", "case.json"))
    out = check_out_folder(out, force=force)
    patient = _build_patient(doc, name)
    plan, rx = _build_plan(doc, name, patient)
    goals = _build_goals(doc, name, patient)
    aw = doc.get("autoweight") or {}
    params = {m: dict(aw.get(m) or {}) for m in METHODS}
    label = f"phantom {doc['case']['phantom']} ({doc['case'].get('resolution', 'coarse')})"

    t0 = time.perf_counter()
    doses = BeamDoses(patient, plan, progress=progress)
    t_doses = time.perf_counter() - t0
    echo(f"case: {label}; plan {plan.name!r}: {plan.n_beams} beams; dose per MU of each beam in {t_doses:.2f} s")
    book = PlanBook({"case_file": {k: v for k, v in doc.items() if k != "_path"}})
    book.add(plan)
    summaries = []
    rx_gy = max((g.min_gy for g in goals or () if g.role == "target"), default=None)
    if rx is not None:
        plan, res = apply_prescription(plan, patient, doses, rx)
        book.put(plan)
        echo(f"prescription: {rx.describe(plan)}\n  MU {', '.join(f'{b.name} {m:g}' for b, m in zip(plan.beams, plan.mu))}"
             f"; normalisation point {res.normalisation_gy:.4f} Gy (for the whole MU); plan ID {plan.plan_id}")
        summaries.append(physics_summary(plan, patient, doses, case_label=label, prescription_gy=rx_gy))
    rows, report_goals = [], []
    if goals:
        problem = AutoWeightProblem.from_doses(doses, patient, goals, max_points=aw.get("points_per_volume", 2000),
                                               seed=int(aw.get("seed", 0)))
        su = aw.get("search_upper")
        report_goals = list(goals)
        if su is not None and su["volume"] not in [g.name for g in goals]:
            report_goals.append(_oar(su["volume"]))
        for method in methods:
            kw = params[method]
            if method == "annealing":
                kw = {"seed": int(aw.get("seed", 0)), **kw}
            try:
                res = auto_weight(problem, method, **kw)
            except AutoWeightInfeasible as exc:
                rows.append({"method": method, "error": str(exc)})
                echo(f"{method}: {exc}")
                continue
            except TypeError as exc:
                raise CaseFileError(f"{name}: autoweight.{method}: {exc}") from None
            rows.append(_install(book, plan, patient, doses, res, method, f"{plan.name}-{method}", report_goals,
                                 MonitorUnits, apply_prescription))
            summaries.append(physics_summary(book.get(f"{plan.name}-{method}"), patient, doses, case_label=label,
                                             prescription_gy=rx_gy))
        if su is not None and "simplex" in methods:
            vol = su["volume"]
            full = problem if any(g.name == vol for g in goals) else AutoWeightProblem.from_doses(
                doses, patient, list(goals) + [_oar(vol)], max_points=aw.get("points_per_volume", 2000),
                seed=int(aw.get("seed", 0)))
            try:
                t1 = time.perf_counter()
                search = search_upper_limit(full, vol, tolerance_gy=float(su.get("tolerance_gy", 0.02)),
                                            start_gy=su.get("start_gy"))
                res = search.result
                res = replace(res, time_s=time.perf_counter() - t1)  # the whole search's time
                tag = f"simplex, {vol} max {search.limit_gy:.3g} Gy"
                pname = f"{plan.name}-simplex-{vol}"
                rows.append(_install(book, plan, patient, doses, res, tag, pname, report_goals, MonitorUnits,
                                     apply_prescription))
                rows[-1]["search_trials"] = [list(t) for t in search.trials]
                summaries.append(physics_summary(book.get(pname), patient, doses, case_label=label, prescription_gy=rx_gy))
                echo(f"binary search on the {vol} upper limit: " + ", ".join(
                    f"{lim:.3g} Gy {'feasible' if ok else 'infeasible'}" for lim, ok in search.trials))
            except AutoWeightInfeasible as exc:
                rows.append({"method": f"simplex, {vol} search", "error": str(exc)})
                echo(f"binary search on {vol}: {exc}")
    book.select(plan.name)
    dest = out.parent / f"{out.name}.partial-{os.getpid()}" if (out.exists() and any(out.iterdir())) else out
    dest.mkdir(parents=True, exist_ok=True)
    book.save(dest)
    for s in summaries:
        md, _ = write_physics_summary(dest, s)
        if pdf:
            from ids_engine.evaluation._physics_summary import write_physics_summary_pdf

            write_physics_summary_pdf(md.with_suffix(".pdf"), s)
    comparison = {"case": label, "plan": plan.name, "beams": [b.name for b in plan.beams],
                  "dose_per_mu_s": round(t_doses, 3), "rows": rows}
    atomic_text(dest / "comparison.json", json.dumps(comparison, indent=1) + "\n")
    text = comparison_text(comparison, report_goals if goals else [])
    atomic_text(dest / "comparison.md", f"# Auto weight comparison: {label}, plan {plan.name}\n\n```text\n{text}\n```\n")
    if dest != out:
        _swap_in(dest, out)
    if rows:
        echo("\n" + text)
    echo(f"\nwritten to {out}: planbook.json (+ .npz when plans hold arrays), comparison.md/.json, "
         f"{len(summaries)} physics summaries (physics_<plan>_id<ID>.md/.html{'/.pdf' if pdf else ''})")
    return comparison


def _oar(name):
    from ids_engine.planning import VolumeGoal

    return VolumeGoal(name, "oar", importance=0.0)


def _install(book, plan, patient, doses, res, method, pname, goals, MonitorUnits, apply_prescription) -> dict:
    """A plan ``pname`` (a copy of ``plan``) with the solution's whole MU, and its comparison row."""
    book.copy(plan.name, pname)
    new, _ = apply_prescription(book.get(pname), patient, doses, MonitorUnits(tuple(np.rint(res.mu))))
    book.put(new)
    dose = doses.dose(new.mu)
    return {"method": method, "plan": pname, "plan_id": new.plan_id, "mu": list(new.mu),
            "mu_exact": [round(m, 3) for m in res.mu], "objective": res.objective, "iterations": res.iterations,
            "time_s": res.time_s, "feasible_on_samples": res.feasible,
            "violations": [str(v) for v in res.violations], "message": res.message,
            "volumes": _metrics(dose, patient, goals)}


def comparison_text(comparison: dict, goals) -> str:
    """The comparison as an aligned text table (MU per beam, target min/max, OAR max, time)."""
    beams = comparison["beams"]
    targets = [g.name for g in goals if g.role == "target"]
    oars = [g.name for g in goals if g.role == "oar"]
    extra = sorted({n for r in comparison["rows"] for n in r.get("volumes", {})} - set(targets) - set(oars))
    head = ["method", "plan ID"] + [f"MU {b}" for b in beams] + [f"{t} min Gy" for t in targets] + \
        [f"{t} max Gy" for t in targets] + [f"{o} max Gy" for o in oars + extra] + ["objective", "limits met", "time s"]
    lines = [head]
    for r in comparison["rows"]:
        if "error" in r:
            lines.append([r["method"], "-", "no feasible solution (see comparison.json)"])
            continue
        v = r["volumes"]
        lines.append([r["method"], str(r["plan_id"])] + [f"{m:g}" for m in r["mu"]]
                     + [f"{v[t]['min_gy']:.3f}" for t in targets] + [f"{v[t]['max_gy']:.3f}" for t in targets]
                     + [f"{v[o]['max_gy']:.3f}" if o in v else "-" for o in oars + extra]
                     + [f"{r['objective']:.4g}", "yes" if r["feasible_on_samples"] else "no", f"{r['time_s']:.2f}"])
    widths = [max(len(row[i]) for row in lines if i < len(row)) for i in range(len(head))]
    out = []
    for j, row in enumerate(lines):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("Doses for the whole MU on every voxel of each volume; 'limits met' on the solver's sample points; "
               "objective: the seed's penalty objective (downhill/annealing).")
    return "\n".join(out)


def cmd_autoweight(args: argparse.Namespace) -> int:
    from ids_engine._files import FolderLockedError
    from ids_engine._progress import TextProgressBar
    from ids_engine.planning import PrescriptionError
    from ids_engine.scripting import ScriptError

    methods = METHODS if args.method == "all" else (args.method,)
    try:
        doc = load_case_file(args.case)
        comp = run_autoweight(doc, args.out, methods=methods, force=args.force, progress=TextProgressBar(),
                              pdf=args.pdf)
    except (CaseFileError, ScriptError, PrescriptionError, FolderLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r["method"] for r in comp["rows"] if "error" in r]
    return 1 if failed and len(failed) == len(comp["rows"]) else 0


def add_parser(sub) -> None:
    s = sub.add_parser(
        "autoweight", help="forward planning: prescription, MU and auto weight four ways from a case file",
        description="Build the case and plan of CASE (JSON, see examples/forward/box.json), compute each beam's dose "
                    "per MU, apply the prescription, solve the monitor units with the auto-weight method(s), and "
                    "write the plan book, physics summaries and the comparison (printed too).")
    s.add_argument("case", help="case file (JSON)")
    s.add_argument("--method", choices=METHODS + ("all",), default="all", help="auto-weight method (default: all four)")
    s.add_argument("--out", required=True, help="output folder (must be new or empty unless --force)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out once the new results are complete")
    s.add_argument("--pdf", action="store_true", help="also write each physics summary as PDF")
    s.set_defaults(func=cmd_autoweight)
