"""The ``ids`` command line: ``ids demo``, ``ids info``, ``ids inspect``.

Every subcommand has ``--help``. Long work shows a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from ids_engine import __version__, backend
from ids_engine._progress import TextProgressBar

__all__ = ["main"]


def _backend_line() -> str:
    try:
        info = backend.backend_info()
    except backend.BackendError as exc:
        return f"backend: unavailable ({exc})"
    return f"backend: {info.name} on {info.device} ({info.reason})"


def _print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as an aligned table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, c in enumerate(cells):
        print("  ".join(s.rjust(w) if j and i else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _print_structures(patient) -> None:
    print(f"grid: {patient.grid.describe()}, origin {tuple(round(v, 2) for v in patient.grid.origin_mm_xyz)} mm")
    _print_table(patient.summary(), [("name", "structure", "s"), ("kind", "kind", "s"), ("voxels", "voxels", "d"), ("volume_cc", "volume (cm3)", ".1f")])


# ------------------------------------------------------------------ commands
# What ``ids info`` reports: (name shown, distribution names, what it is for). Versions come
# from the installed distributions' metadata, so nothing (CUDA, Qt) is initialised to print them.
LIBRARIES = (
    ("numpy", ("numpy",), "required"),
    ("scipy", ("scipy",), "required"),
    ("pydicom", ("pydicom",), "required"),
    ("h5py", ("h5py",), "required"),
    ("cupy", ("cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x", "cupy"), "gpu extra"),
    ("vispy", ("vispy",), "viewer extra"),
    ("PyQt6", ("PyQt6",), "viewer extra"),
    ("matplotlib", ("matplotlib",), "bench extra"),
    ("numba", ("numba",), "fast extra"),
)


def library_versions() -> dict[str, str | None]:
    """Installed version of each library of :data:`LIBRARIES` (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dists, _ in LIBRARIES:
        out[name] = None
        for d in dists:
            try:
                out[name] = version(d)
                break
            except PackageNotFoundError:
                continue
    return out


def cmd_info(args: argparse.Namespace) -> int:
    print(f"ids-engine {__version__}")
    print(_backend_line())
    print(f"python {sys.version.split()[0]}")
    versions = library_versions()
    for name, _, role in LIBRARIES:
        v = versions[name]
        print(f"{name} {v}" if v else f"{name} not installed ({role})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ids_engine.io import InputError, read_dicom, read_matrad_phantom

    path = Path(args.path)
    try:
        if not path.exists():
            print(f"error: {path}: no such file or folder", file=sys.stderr)
            return 2
        if path.suffix.lower() == ".mat":
            patient = read_matrad_phantom(path)
        elif path.is_dir():
            patient = read_dicom(path)
        else:
            print(f"error: {path}: expected a DICOM folder or a matRad .mat file", file=sys.stderr)
            return 2
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_structures(patient)
    _print_inputs_and_warnings(patient)
    return 0


def _print_inputs_and_warnings(patient) -> None:
    """For ``ids inspect``: the structure set used (or its absence), RT Doses found, the reader's warnings.

    Files are named without their folder (a DICOM folder is often named after the patient).
    """
    from ids_engine.io import InputError, read_rtdose

    meta = patient.meta or {}
    if "rtstruct_file" in meta:  # a DICOM folder
        if meta["rtstruct_file"]:
            print(f"\nstructure set: {Path(meta['rtstruct_file']).name}")
        else:
            print("\nstructure set: none (no RTSTRUCT in the folder): no structures, the body is a CT threshold")
        for f in meta.get("rtdose_files") or []:
            try:
                dose = read_rtdose(f, patient.grid, patient.frame_of_reference_uid)
                summary = f"max {float(dose.max()):.2f} Gy on the CT grid"
            except InputError as exc:
                summary = f"cannot be read ({exc.field + ': ' if exc.field else ''}{exc.message})"
            print(f"RT Dose: {Path(f).name}: {summary} (not used by inspect)")
    for warning in meta.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from ids_engine.dose import DoseEngine, EngineOptions
    from ids_engine.evaluation import dvh_metrics
    from ids_engine.phantoms import PHANTOMS
    from ids_engine.planning import conformal_aperture, equispaced_beams

    print(f"ids-engine {__version__} | {_backend_line()}")
    t0 = time.perf_counter()
    patient = PHANTOMS[args.phantom](resolution=args.resolution)
    print(f"phantom: {args.phantom} ({args.resolution}), built in {time.perf_counter() - t0:.2f} s")
    _print_structures(patient)
    if not patient.targets:
        print("no target structure: nothing to plan")
        return 0
    target = patient.targets[0]
    iso = target.centroid_xyz()
    beams = equispaced_beams(args.beams, iso)
    print(f"\n{args.beams} equispaced coplanar beams, isocentre at the centroid of {target.name} "
          f"({iso[0]:.1f}, {iso[1]:.1f}, {iso[2]:.1f}) mm")
    t0 = time.perf_counter()
    engine = DoseEngine(patient, beams, options=EngineOptions(), progress=TextProgressBar())
    t_cache = time.perf_counter() - t0
    fluences = [conformal_aperture(g.beam, patient, target, margin_mm=args.margin_mm).astype(np.float32)
                for g in engine.geometry]
    t0 = time.perf_counter()
    engine.set_fluences(fluences)
    backend.synchronize()
    t_full = time.perf_counter() - t0
    dose = engine.dose_cube_host()
    # Normalise: the target's median dose equals the prescription (MU scale the fluence).
    median = float(np.median(dose[target.mask]))
    if median <= 0:
        print("error: the target receives no dose", file=sys.stderr)
        return 1
    scale = args.prescription_gy / median
    engine.set_fluences([f * scale for f in fluences])
    dose = engine.dose_cube_host()
    mu = [float(f.max() * scale) for f in fluences]
    print(f"open fields conformed to {target.name} + {args.margin_mm:g} mm, "
          f"normalised to median {target.name} dose = {args.prescription_gy:g} Gy: {np.mean(mu):.0f} MU per beam")
    print(f"geometry cache {t_cache:.2f} s, full dose {t_full * 1000:.0f} ms "
          f"({engine.describe()['body_voxels']} body voxels, {backend.backend_name()})\n")
    rows = []
    for s in patient.structures:
        if s.is_empty:
            continue
        m = dvh_metrics(dose, s.mask, args.prescription_gy)
        rows.append({"name": s.name, "kind": s.kind.value, **m})
    _print_table(rows, [("name", "structure", "s"), ("kind", "kind", "s"), ("mean_gy", "mean Gy", ".2f"),
                        ("D98_gy", "D98 Gy", ".2f"), ("D95_gy", "D95 Gy", ".2f"), ("D2_gy", "D2 Gy", ".2f"),
                        ("max_gy", "max Gy", ".2f"), ("V95_pct", "V95 %", ".1f"), ("V107_pct", "V107 %", ".1f")])
    return 0


def cmd_shape(args: argparse.Namespace) -> int:
    from ids_engine._files import FolderLockedError
    from ids_engine.io import InputError
    from ids_engine.scripting import ScriptError, ScriptInterrupted, load_script, run_script

    try:
        doc = load_script(args.script)
        rep = run_script(doc, args.out, force=args.force, progress=TextProgressBar())
    except (ScriptError, InputError, FolderLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ScriptInterrupted as exc:
        print(f"\n{exc} (reopen with ids view --session {exc.folder}); no report was written", file=sys.stderr)
        return 130
    print(f"session saved to {args.out} (reopen with ids view --session {args.out}); report: {Path(args.out) / 'report.md'}")
    if rep.get("conflicts"):
        print(f"{rep['conflicts']} conflict(s): recovery could not keep everything (see the report's Conflicts section)")
    if rep.get("side_effects"):
        print(f"{rep['side_effects']} side effect(s): tissue far from a request rose unasked (see the report's "
              "Conflicts section)")
    for name, a in rep["metrics_after"].items():
        b = rep["metrics_before"][name]
        print(f"  {name:<14} mean {b['mean_gy']:6.2f} -> {a['mean_gy']:6.2f} Gy   V95 {b.get('V95_pct', 0):5.1f} -> {a.get('V95_pct', 0):5.1f} %")
    return 0


def _case_spec(text: str, resolution: str) -> dict:
    """A case description from the command line: a built-in phantom's name, a DICOM folder or
    a matRad .mat file."""
    from ids_engine.phantoms import PHANTOMS

    if text in PHANTOMS:
        return {"phantom": text, "resolution": resolution}
    path = Path(text)
    if path.is_dir():
        return {"dicom": str(path)}
    if path.suffix.lower() == ".mat" and path.is_file():
        return {"matrad": str(path)}
    raise ValueError(f"CASE {text}: not a built-in phantom ({', '.join(PHANTOMS)}), a DICOM folder or a matRad .mat file")


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from ids_engine._files import FolderLockedError, atomic_text
    from ids_engine.evaluation import check_goals, tg119_goals, write_plan_report
    from ids_engine.io import InputError
    from ids_engine.optimise import RowSampling, read_protocol, score_goals_from_checks
    from ids_engine.planning import equispaced_beams, goal_checks, optimise_plan
    from ids_engine.scripting import ScriptError, _swap_in, check_out_folder
    from ids_engine.session import Session, case_from_spec, case_label

    # Everything that can be checked is checked before anything is computed.
    try:
        out = check_out_folder(args.out, force=args.force)
        spec = _case_spec(args.case, args.resolution)
        protocol = read_protocol(args.protocol)
        label = case_label(spec)
        patient = case_from_spec(spec)
        missing = [n for n in protocol.structures if n not in patient.structure_names]
        if missing:
            raise ValueError(f"{args.protocol}: the protocol names {', '.join(missing)}, which the case ({label}) "
                             f"does not have (structures: {', '.join(patient.structure_names)})")
        if not patient.targets:
            raise ValueError(f"case ({label}) has no target structure: the beams are aimed at the first target")
        published = tuple(tg119_goals(args.check.split("-", 1)[1])) if args.check else ()
        checks = list(goal_checks(protocol.goals)) + list(published)
    except (ScriptError, InputError, ValueError, FolderLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ids-engine {__version__} | {_backend_line()}")
    print(f"case: {label}; protocol: {protocol.name or Path(args.protocol).name} ({len(protocol.goals)} goals)")
    target = patient.targets[0]
    beams = equispaced_beams(args.beams, target.centroid_xyz())
    t0 = time.perf_counter()
    session = Session(patient, beams, prescription_gy=args.prescription_gy, case=spec, progress=TextProgressBar())
    cancelled = {"flag": False}
    try:
        score = score_goals_from_checks(published) if published else None
        plan = optimise_plan(session.engine, protocol.goals, progress=TextProgressBar(),
                             tune_importance=args.tune_importance, score_goals=score,
                             row_sampling=None if args.exact_rows else RowSampling())
    except KeyboardInterrupt:  # pragma: no cover - interactive
        print("\ninterrupted: no plan written", file=sys.stderr)
        return 130
    session.set_plan(plan.fluences)
    total_s = time.perf_counter() - t0
    dose = session.dose()
    results = check_goals(dose, patient, checks, prescription_gy=args.prescription_gy) if checks else ()
    dest = out.parent / f"{out.name}.partial-{os.getpid()}" if (out.exists() and any(out.iterdir())) else out
    dest.mkdir(parents=True, exist_ok=True)
    session.save(dest / "session")
    session.close()
    write_plan_report(dest, dose, patient, prescription=args.prescription_gy, beams=beams, goals=checks, case_label=label)
    res = plan.result
    doc = {
        "case": label, "protocol": protocol.name, "prescription_gy": args.prescription_gy, "beams": args.beams,
        "influence": {"shape": list(plan.influence.shape), "cutoff_mm": plan.influence.cutoff_mm,
                      "beamlet_cells": plan.influence.beamlet_cells},
        "rows": plan.rows_summary(),
        "optimiser": {"objective": res.objective, "iterations": plan.iterations, "evaluations": res.evaluations,
                      "rounds": res.rounds, "tail_rounds": plan.tail_rounds, "message": res.message,
                      "tail_error_pct_of_max": plan.tail_error_pct, "cancelled": cancelled["flag"] or res.cancelled},
        "protocol_goals": [{"goal": g.goal.label, "achieved": g.achieved, "limit": g.limit, "unit": g.unit, "met": g.met}
                           for g in res.goals],
        "unmet_constraints": [str(u) for u in res.unmet_constraints],
        "checks": [{"goal": f"{r.goal.structure} {r.goal.metric} {r.goal.comparator} {r.goal.value:g} {r.goal.unit}",
                    "achieved": r.achieved, "passed": r.passed} for r in results],
        "timings_s": {**{k: round(v, 3) for k, v in plan.timings_s.items()}, "total": round(total_s, 3)},
        "importance_tuning": plan.tuning.summary() if plan.tuning is not None else None,
    }
    atomic_text(dest / "plan.json", json.dumps(doc, indent=1))
    # The protocol travels with the plan: adaptive replanning re-optimises for the approved goals.
    atomic_text(dest / "protocol.toml", Path(args.protocol).read_text())
    if dest != out:
        _swap_in(dest, out)
    print(f"\noptimised in {total_s:.1f} s (influence matrix {plan.timings_s['influence_matrix']:.1f} s, "
          f"{plan.iterations} iterations); the optimiser's dose is within {plan.tail_error_pct:.2g} % of the engine's")
    if plan.tuning is not None:
        print(plan.tuning.text())
    for u in res.unmet_constraints:
        print(f"  constraint not met: {u}")
    lines = [_check_line(r) for r in results]
    for _, text in lines:
        print(text)
    at_limit = sum(1 for state, _ in lines if state == "limit")
    if at_limit:
        print(f"  ({at_limit} on the limit: met to the optimiser's tolerance of 0.01 Gy or 0.01 %, not strictly)")
    print(f"plan saved to {out}: session/ (reopen with ids view --session {out / 'session'}), plan_report.md, "
          f"plan_report.html, plan.json")
    return 0


def _check_line(r) -> tuple[str, str]:
    """``ids plan``'s line for one goal check: "pass", "FAIL", or "limit" for a value that
    misses by no more than the optimiser's tolerance (0.01 Gy or 0.01 %: constraints are met
    to it), then shown to the third decimal."""
    state = r.state
    value = f"{r.achieved:.3f}" if state == "limit" else f"{r.achieved:.2f}"
    g = r.goal
    return state, f"  {state:<5} {g.structure} {g.metric} {g.comparator} {g.value:g} {g.unit}: {value}"


def cmd_view(args: argparse.Namespace) -> int:
    import os

    try:
        from ids_engine.viewer import launch
    except ImportError as exc:
        print(f"error: the viewer needs the 'viewer' extra (pip install 'ids-engine[viewer]'): {exc}", file=sys.stderr)
        return 2
    for flag, value in (("--dicom", args.dicom), ("--matrad", args.matrad), ("--session", args.session)):
        if value and not Path(value).exists():
            print(f"error: {flag} {value}: no such file or folder", file=sys.stderr)
            return 2
    # Without a display Qt aborts the process with a page of plugin advice; say it in one line.
    # (X11 and Wayland desktops set one of these; macOS and Windows need neither.)
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if (sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY")
            and not platform.startswith(("eglfs", "linuxfb", "vnc"))):
        print("error: ids view needs a display: neither DISPLAY nor WAYLAND_DISPLAY is set (run it in a desktop "
              "session, over ssh -X, or headless under xvfb-run -a ids view ...)", file=sys.stderr)
        return 2
    case = None
    if args.dicom:
        case = {"dicom": args.dicom}
    elif args.matrad:
        case = {"matrad": args.matrad}
    elif not args.session:
        case = {"phantom": args.phantom, "resolution": args.resolution}
    return int(launch(case, args.session) or 0)


# ------------------------------------------------------------------ parser
def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, {minimum} or more, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be a whole number, {minimum} or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole(text, 0)


def _float(text: str, *, positive: bool) -> float:
    rule = "a positive number" if positive else "a number, 0 or more"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _float(text, positive=True)


def _non_negative_float(text: str) -> float:
    return _float(text, positive=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ids", description="ids-engine: interactive dose shaping for IMRT planning.")
    p.add_argument("--version", action="store_true", help="print the version and the array backend, then exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="version, array backend (IDS_BACKEND) and device",
                       description="Print the version, the array backend chosen by IDS_BACKEND "
                                   "(auto|cupy|numpy), its device and the versions of Python and of the libraries "
                                   "(numpy, scipy, pydicom, h5py; cupy, vispy, PyQt6, matplotlib and numba when installed).")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("demo", help="load a built-in phantom and plan it with open fields",
                       description="Load a built-in phantom, print its structures and volumes, compute an "
                                   "open-field plan (9 equispaced beams by default) and report DVH metrics.")
    s.add_argument("--phantom", choices=["horseshoe", "tg119", "water", "slab"], default="horseshoe")
    s.add_argument("--resolution", choices=["clinical", "coarse"], default="clinical")
    s.add_argument("--beams", type=_positive_int, default=9, help="number of equispaced coplanar beams (default 9)")
    s.add_argument("--prescription-gy", type=_positive_float, default=60.0, help="target median dose (default 60 Gy)")
    s.add_argument("--margin-mm", type=_non_negative_float, default=8.0,
                   help="aperture margin around the target (default 8 mm)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("shape", help="run a scripted sequence of dose shaping requests",
                       description="Run the requests of a JSON script (see ids_engine.scripting) on an open-field "
                                   "plan, save the session and write report.json and report.md. The whole script "
                                   "is checked before anything is computed; the session is journaled as each "
                                   "request completes, so an interruption loses at most the request in flight.")
    s.add_argument("script", help="JSON script of requests")
    s.add_argument("--out", required=True,
                   help="folder for the session (journaled request by request) and the report; "
                        "must not exist or be empty")
    s.add_argument("--force", action="store_true",
                   help="replace an existing --out folder, once the new session is complete")
    s.set_defaults(func=cmd_shape)

    s = sub.add_parser("plan", help="optimise a plan for a protocol of goals (inverse planning)",
                       description="Optimise the fluence of equispaced coplanar beams for the goals of a TOML "
                                   "protocol (see ids_engine.optimise) on the engine's own dose model, then write "
                                   "the plan as a session folder (open it in the viewer to shape it), a report "
                                   "(Markdown, HTML, DVH PNG) and plan.json.")
    s.add_argument("case", help="a built-in phantom (e.g. tg119, horseshoe), a DICOM folder or a matRad .mat file")
    s.add_argument("protocol", help="TOML protocol of goals (e.g. examples/protocols/tg119_harder.toml)")
    s.add_argument("--out", required=True, help="folder for the plan; must not exist or be empty")
    s.add_argument("--force", action="store_true", help="replace an existing --out folder once the new plan is complete")
    s.add_argument("--beams", type=_positive_int, default=9, help="number of equispaced coplanar beams (default 9)")
    s.add_argument("--prescription-gy", type=_positive_float, default=60.0, help="prescription (default 60 Gy)")
    s.add_argument("--resolution", choices=["clinical", "coarse"], default="clinical", help="built-in phantoms' grid")
    s.add_argument("--check", choices=["tg119-easier", "tg119-harder"],
                   help="also check the published TG-119 goals in the report")
    s.add_argument("--tune-importance", action="store_true",
                   help="tune the objectives' importance factors (Powell's method, Xing et al. 1999) until the plan "
                        "meets the --check goals (else the protocol's own goals), re-optimising for each")
    s.add_argument("--exact-rows", action="store_true",
                   help="every voxel of each goal's structure a row of the influence matrix (default: structures "
                        "over 150 000 voxels, e.g. the body, are sampled away from the targets; the reported goals "
                        "use every voxel either way)")
    s.set_defaults(func=cmd_plan)

    from ids_engine.phantoms import PHANTOMS

    s = sub.add_parser("view", help="open the desktop viewer (needs the 'viewer' extra and a display)",
                       description="Open the vispy + PyQt6 viewer on a built-in phantom (default: horseshoe), "
                                   "a DICOM folder, a matRad file or a saved session. Phantoms without a target "
                                   "(water, slab) open for dose display: one open field with its depth dose and "
                                   "profile.")
    s.add_argument("--phantom", choices=list(PHANTOMS), default="horseshoe",
                   help="built-in phantom (the list File > Open phantom offers)")
    s.add_argument("--resolution", choices=["clinical", "coarse"], default="clinical")
    s.add_argument("--dicom", help="DICOM folder (CT + RTSTRUCT)")
    s.add_argument("--matrad", help="matRad .mat phantom")
    s.add_argument("--session", help="a saved session folder")
    s.set_defaults(func=cmd_view)

    s = sub.add_parser("inspect", help="read a DICOM folder (CT + RTSTRUCT) or a matRad .mat phantom",
                       description="Read a case and print its grid, structures and volumes.")
    s.add_argument("path", help="DICOM folder or matRad .mat file")
    s.set_defaults(func=cmd_inspect)

    # Commands that live in their own modules: each has add_parser(sub), which adds its
    # subcommand(s) with set_defaults(func=...).
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # pragma: no cover - a module not yet built
        module.add_parser(sub)
    return p


_COMMAND_MODULES = (
    "ids_engine.cli_forward",   # plans, prescription, MU, auto weight, physics summary
    "ids_engine.cli_planbook",  # a saved plan book's plans and beams
    "ids_engine.cli_beams",     # beams, arcs, conformal MLC beams
    "ids_engine.cli_points",    # points, point files, DVH by sampling
    "ids_engine.cli_sequence",  # MLC leaf sequencing, deliverable-dose check
    "ids_engine.cli_export",    # DICOM RT export/import, Transa, anonymisation
    "ids_engine.cli_store",     # the plan store: patients, plans, approvals, history
    "ids_engine.cli_adapt",     # adaptive replanning on a new CT, comparison, qualification
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"ids-engine {__version__}")
        print(_backend_line())
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (ids inspect ... | head) shows here, not at exit
        return rc
    except BrokenPipeError:
        # The reader went away: stop quietly, as a shell tool does (128 + SIGPIPE), and point
        # stdout at devnull so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout has no file descriptor (e.g. captured)
            pass
        return 141
    except backend.BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable or unwritable files the commands did not name themselves
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
