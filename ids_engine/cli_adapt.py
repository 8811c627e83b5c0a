"""``ids adapt``: adaptive replanning of an approved plan on a new CT (issue 14, seed 003).

``ids adapt APPROVED_PLAN NEW_CT --out DIR`` registers the new CT to the approved plan's CT,
transfers the approved contours, recomputes the approved plan on the new anatomy, adapts it
(warm-started re-optimisation for the approved goals and replay of its shaping requests),
quantifies the difference (DVH metric deltas, gamma) and qualifies it against a tolerance
profile. With several NEW_CTs the adaptations run as Dask tasks (a local cluster, or
``--scheduler tcp://...``), one sub-folder each and ``batch_summary.json``.
See :mod:`ids_engine.adapt`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ids_engine.cli import _non_negative_int, _positive_int

__all__ = ["add_parser", "cmd_adapt"]


def _print_result(doc: dict) -> None:
    q = doc["qualification"]
    ad = doc["adaptation"]
    print(f"  {ad['why']}")
    for e in ad["replay"]:
        state = "replayed" if e.get("replayed") else e.get("note", "skipped")
        print(f"  request {e['n']} ({e['original']['kind']}): {state}")
    comp = doc["comparison"]["adapted"]
    for name, crit in comp["gamma"].items():
        print(f"  gamma {name}: {crit['pass_rate_pct']:.1f} % pass ({crit['points']} points)")
    for name, e in comp["structures"].items():
        shown = [f"{m} {r['delta']:+.2f} {r['unit']}" for m, r in e["metrics"].items() if r["reported"]]
        if e["kind"] != "external":
            print(f"  {name:<12} " + ", ".join(shown))
    if q["auto_qualified_for_review"]:
        print("AUTO-QUALIFIED FOR REVIEW: every difference is within the tolerance profile")
    else:
        print(f"NOT QUALIFIED: {len(q['reasons'])} check(s) out of tolerance:")
        for r in q["reasons"]:
            print(f"  - {r}")


def cmd_adapt(args: argparse.Namespace) -> int:
    from ids_engine import __version__
    from ids_engine._files import FolderLockedError
    from ids_engine._progress import TextProgressBar
    from ids_engine.adapt import AdaptError, AdaptOptions, adapt_batch, read_tolerance, run_adaptation
    from ids_engine.io import InputError
    from ids_engine.scripting import ScriptError

    try:
        from ids_engine.registration import RegistrationError
    except ImportError:  # pragma: no cover - the registration package is part of the build
        RegistrationError = AdaptError
    errors = (AdaptError, InputError, ScriptError, FolderLockedError, RegistrationError, ValueError)
    try:
        if args.fiducials and args.registration != "fiducial":
            raise AdaptError("--fiducials is for --registration fiducial")
        if (args.patient_id or args.plan_name) and not args.store:
            raise AdaptError("--patient-id and --plan-name are for --store")
        if args.plan_name and (len(args.new_ct) > 1 or args.scheduler):
            raise AdaptError("--plan-name names one plan; a batch names its plans 'adapted <date time> <sub-folder>'")
        tolerance = read_tolerance(args.tolerance) if args.tolerance else None
        options = AdaptOptions(reoptimise=args.reoptimise, max_iterations=args.max_iterations,
                               replay=not args.no_replay, gamma_max_points=args.gamma_points or None,
                               rotate_beams=args.rotate_beams)
        common = dict(registration=args.registration, fiducials=args.fiducials, tolerance=tolerance,
                      resolution=args.resolution, protocol=args.protocol, options=options, store=args.store,
                      patient_id=args.patient_id, plan_name=args.plan_name, contours=args.contours)
        print(f"ids-engine {__version__}")
        if len(args.new_ct) > 1 or args.scheduler:
            approved = str(Path(args.approved).absolute())
            doc = adapt_batch(approved, args.new_ct, out=args.out, scheduler=args.scheduler, n_workers=args.workers,
                              processes=args.processes, force=args.force, progress=TextProgressBar(), log=print,
                              **common)
            print(f"batch of {doc['tasks']} on {doc['scheduler']}: {doc['succeeded']} done, "
                  f"{doc['auto_qualified']} auto-qualified for review, {doc['wall_s']:.1f} s; "
                  f"summary: {Path(args.out) / 'batch_summary.json'}")
            failed = [r for r in doc["results"] if not r["ok"]]
            for r in failed:
                print(f"error: {r['new_ct']}: {r['error']}", file=sys.stderr)
            return 1 if failed else 0
        doc = run_adaptation(args.approved, args.new_ct[0], args.out, force=args.force, progress=TextProgressBar(),
                             log=print, **common)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    _print_result(doc)
    if "store" in doc:
        st = doc["store"]
        print(f"stored in {st['path']} as plan {st['plan_name']!r} ({st['status']}), with the comparison and "
              "qualification as evidence")
    t = doc["timings_s"]
    print(f"written to {args.out} in {t['total']:.1f} s: session/ (ids view --session {Path(args.out) / 'session'}), "
          "new_ct/, registration/, comparison.json, qualification.json, adapt_report.md, adapt_report.html")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser(
        "adapt", help="adapt an approved plan to a new CT: register, transfer contours, re-optimise, compare, qualify",
        description="Carry an approved plan (a session folder or an `ids plan --out` folder) onto a new CT of the same "
                    "patient: register the new CT, transfer the approved contours, recompute the approved plan on the "
                    "new anatomy, adapt it (warm-started re-optimisation for the approved goals, then the approved "
                    "shaping requests replayed at their mapped positions), quantify the difference (DVH metric deltas, "
                    "gamma 3%/3mm and 2%/2mm) and qualify it against a tolerance profile. Writes DIR/session/, "
                    "DIR/new_ct/, DIR/registration/, comparison.json, qualification.json and adapt_report.md/.html. "
                    "Several NEW_CTs run as Dask tasks (a local cluster, or --scheduler).")
    s.add_argument("approved", metavar="APPROVED_PLAN", help="the approved plan: a session folder or an `ids plan --out` folder")
    s.add_argument("new_ct", metavar="NEW_CT", nargs="+",
                   help="a DICOM folder (CT, RTSTRUCT optional) or a built-in test case, e.g. "
                        "'horseshoe:coarse;shift_mm=3,0,0;rotate_deg=0,0,2' (keys: shift_mm, rotate_deg, oar_grow_mm, "
                        "target_shrink_mm, fov_mm, markers, seed, noise_hu)")
    s.add_argument("--out", required=True, help="output folder; must not exist or be empty")
    s.add_argument("--force", action="store_true", help="replace an existing --out folder once the new one is complete")
    s.add_argument("--registration", choices=["identity", "rigid", "deformable", "fiducial"], default="rigid",
                   help="how the new CT is registered to the planning CT (default rigid)")
    s.add_argument("--fiducials", nargs=2, metavar=("PLANNING_CSV", "NEW_CSV"),
                   help="marker files (CSV label,x_mm,y_mm,z_mm) on the planning and the new CT, for "
                        "--registration fiducial (a built-in test case brings its own markers)")
    s.add_argument("--tolerance", metavar="FILE",
                   help="tolerance profile (TOML; default: the built-in profile, see examples/adapt/tolerance_default.toml)")
    s.add_argument("--protocol", metavar="FILE",
                   help="goals to re-optimise for (TOML protocol); default: protocol.toml kept with the approved plan")
    s.add_argument("--resolution", choices=["clinical", "coarse"], help="grid of a built-in test case that names none")
    s.add_argument("--contours", choices=["transferred", "own"], default="transferred",
                   help="plan on the approved contours warped onto the new CT (default), or on the new CT's own "
                        "contours where it has them (e.g. OUT/new_ct of an earlier run, reviewed and edited in a "
                        "contouring tool)")
    s.add_argument("--reoptimise", choices=["auto", "always", "never"], default="auto",
                   help="auto (default): re-optimise only when the approved plan recomputed on the new anatomy is out "
                        "of tolerance; always; never")
    s.add_argument("--max-iterations", type=_positive_int, default=200,
                   help="optimiser iterations of the warm-started re-optimisation (default 200)")
    s.add_argument("--rotate-beams", action="store_true",
                   help="turn the beams with the registered rotation (gantry, couch and collimator angles, as a "
                        "6-degree-of-freedom couch correction would); default: only the isocentres move")
    s.add_argument("--no-replay", action="store_true", help="do not replay the approved plan's shaping requests")
    s.add_argument("--gamma-points", type=_non_negative_int, default=30000,
                   help="gamma on at most this many points (seeded subset; 0: all points; default 30000)")
    s.add_argument("--store", metavar="PATH", help="also put the adapted plan and its evidence into this plan store")
    s.add_argument("--patient-id", help="with --store: the patient's ID the adapted plan is filed under (a built-in "
                                        "test case: TEST-<phantom>)")
    s.add_argument("--plan-name", help="with --store: the adapted plan's name (default 'adapted <date time> <output folder>')")
    s.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address (tcp://host:8786) for the adaptations; default: a local cluster "
                        "when several NEW_CTs are given")
    s.add_argument("--workers", type=_positive_int, default=2, help="workers of the local Dask cluster (default 2)")
    s.add_argument("--processes", action="store_true", help="local Dask workers as processes instead of threads")
    s.set_defaults(func=cmd_adapt)
