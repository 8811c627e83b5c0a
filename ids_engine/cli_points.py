"""``ids points`` and ``ids dvh``: dose evaluation of a plan (issue 12, seed 001).

``ids points CASE --out DIR``
    Dose per point per beam at the patient's points, points read from a positions file
    (``<* label *> x y z``, patient mm), points given on the command line in patient
    coordinates (``--point LABEL=x,y,z``) or in a beam's BEV frame (``--bev-point
    LABEL=BEAM:x,y,z``, the seed's frame: z towards the source). Writes ``points.txt`` (the
    seed's point file, total dose in Gy), ``points.md`` (per-beam doses and BEV coordinates)
    and ``points.json``; with ``--measured FILE`` also ``comparison.md`` (matched by
    label, sorted by slice, row and column, differences in Gy and %).

``ids dvh CASE --out DIR [--sampled]``
    Exact DVHs (every voxel, partial volumes at the edges) of the chosen structures in one
    PNG (``dvh.png``, % or cc); with ``--sampled`` also the random-sampling DVHs (Niemierko
    and Goitein 1990) up to ``--density`` points per mm^3, dashed over the exact ones, and
    ``convergence.png``: the largest difference against the exact DVH after every round with
    the ``1/sqrt(n)`` (DKW) bound. Several ``--session`` folders draw several plans, one line
    style per plan.

The plan is either a saved session (``--session DIR``, e.g. from ``ids plan`` or ``ids
shape``) or, for a CASE, the open-field plan of ``ids demo`` (``--beams`` equispaced fields
conformed to the first target, normalised to the median target dose = ``--prescription-gy``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["add_parser"]


_PLAN_HELP = ("The plan: a saved session (--session DIR) or, for a CASE, the open-field plan of ids demo "
              "(--beams equispaced fields conformed to the first target, median target dose = --prescription-gy).")
_POINTS_HELP = ("Dose per point per beam at the patient's points, points from --positions ('<* label *> x y z', "
                "patient mm), --point LABEL=x,y,z (patient mm) and --bev-point LABEL=BEAM:x,y,z (the beam's "
                "beam's-eye view, z towards the source). Writes points.txt (the seed's point file, Gy), points.md "
                "and points.json; with --measured FILE also comparison.md (matched by label lower-cased without "
                "spaces, sorted by slice, row and column, differences in Gy and %).\n\n" + _PLAN_HELP)
_DVH_HELP = ("Exact DVHs (every voxel, partial volumes at structure edges) in dvh.png; with --sampled also DVHs "
             "by random sampling (Niemierko and Goitein 1990) up to --density points per mm^3, dashed, and "
             "convergence.png (largest difference against the exact DVH per round, with the 1/sqrt(n) bound). "
             "Repeat --session for several plans (one line style each).\n\n" + _PLAN_HELP)


class _UsageError(ValueError):
    pass


def _wrap(text: str) -> str:
    import textwrap

    return "\n\n".join(textwrap.fill(p, 79) for p in text.split("\n\n"))


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("case", nargs="?", help="built-in phantom name, DICOM folder or matRad .mat file "
                   "(not needed with --session)")
    s.add_argument("--resolution", choices=("coarse", "clinical"), default="coarse",
                   help="phantom resolution (default coarse)")
    s.add_argument("--beams", type=int, default=9, help="open-field plan: number of equispaced beams (default 9)")
    s.add_argument("--prescription-gy", type=float, default=60.0, help="open-field plan: median target dose")
    s.add_argument("--out", required=True, help="output folder (refused if not empty, unless --force)")
    s.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def add_parser(sub) -> None:
    s = sub.add_parser("points", help="dose per point per beam, the seed's point file, comparison with measured",
                       description=_wrap(_POINTS_HELP),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--session", help="a saved session folder (its plan; CASE is then not needed)")
    s.add_argument("--positions", help="point positions file: '<* label *> x y z' per line (patient mm), "
                   "'//' comments")
    s.add_argument("--point", action="append", default=[], metavar="LABEL=x,y,z",
                   help="a point in patient coordinates (mm); repeatable")
    s.add_argument("--bev-point", action="append", default=[], metavar="LABEL=BEAM:x,y,z",
                   help="a point in a beam's beam's-eye view (the beam's name or 0-based number; mm, z towards "
                   "the source); repeatable")
    s.add_argument("--no-patient-points", action="store_true", help="leave out the patient's own points")
    s.add_argument("--measured", help="measured point file ('<* label *> dose') to compare with")
    s.add_argument("--measured-unit", choices=("Gy", "cGy"), default="Gy", help="unit of the measured file")
    s.set_defaults(func=cmd_points)

    s = sub.add_parser("dvh", help="DVHs exact (partial volumes) and by random sampling, PNG",
                       description=_wrap(_DVH_HELP),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--session", action="append", default=[], help="a saved session folder; repeat for several "
                   "plans (one line style each)")
    s.add_argument("--structures", help="comma-separated structure names (default: every non-empty structure)")
    s.add_argument("--sampled", action="store_true", help="also DVHs by random sampling, with convergence.png")
    s.add_argument("--density", type=float, default=1.0, help="sampling stops at this many points per mm^3 "
                   "(default 1, the seed's)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    s.add_argument("--volume", choices=("%", "cc"), default="%", help="volume axis in %% or cc")
    s.add_argument("--bin-gy", type=float, default=0.1, help="dose bin width (Gy)")
    s.add_argument("--rounds", help="with --sampled: also draw the sampled curves after these rounds "
                   "(comma-separated, 0 = the first round's 2000 points), to show the convergence")
    s.add_argument("--dose-range", metavar="LO,HI", help="dose axis range in Gy (default 0 to the maximum)")
    s.add_argument("--supersample", type=int, default=4, help="exact DVH: sub-points per voxel and axis (default 4)")
    s.set_defaults(func=cmd_dvh)


# --------------------------------------------------------------------------- shared
def _out_folder(args) -> Path:
    from ids_engine.scripting import check_out_folder

    return check_out_folder(args.out, force=args.force)


def _plans(args, sessions: list[str]):
    """[(plan name, Session)], checked before the dose is computed where possible."""
    from ids_engine.session import Session

    if sessions:
        if args.case:
            raise _UsageError("give CASE or --session, not both")
        out = []
        for folder in sessions:
            if not Path(folder).is_dir():
                raise _UsageError(f"--session {folder}: not a folder")
            s = Session.load(folder, keep_journaling=False)
            out.append((Path(folder).name, s))
        return out
    if not args.case:
        raise _UsageError("give CASE (a phantom, DICOM folder or matRad file) or --session DIR")
    from ids_engine.cli import _case_spec
    from ids_engine.session import case_from_spec

    if args.beams < 1:
        raise _UsageError(f"--beams must be at least 1, got {args.beams}")
    if not args.prescription_gy > 0:
        raise _UsageError(f"--prescription-gy must be positive, got {args.prescription_gy}")
    spec = _case_spec(args.case, args.resolution)
    patient = case_from_spec(spec)
    s = Session.open_field_plan(patient, n_beams=args.beams, prescription_gy=args.prescription_gy, case=spec)
    return [("open fields", s)]


def _finish(dest: Path, out: Path) -> None:
    if dest != out:
        from ids_engine.scripting import _swap_in

        _swap_in(dest, out)


def _dest(out: Path) -> Path:
    dest = out.parent / f"{out.name}.partial-{os.getpid()}" if (out.exists() and any(out.iterdir())) else out
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _triple(text: str, what: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise _UsageError(f"{what}: {text!r} is not three numbers x,y,z") from None
    if len(v) != 3 or not all(np.isfinite(v)):
        raise _UsageError(f"{what}: {text!r} is not three finite numbers x,y,z")
    return v


def _cli_points(args, beams, patient_position: str):
    from ids_engine.evaluation import point_from_bev
    from ids_engine.model import PointOfInterest

    out = []
    for item in args.point:
        label, sep, xyz = item.rpartition("=")
        if not sep or not label.strip():
            raise _UsageError(f"--point {item!r}: expected LABEL=x,y,z")
        out.append(PointOfInterest(label.strip(), _triple(xyz, f"--point {label}")))
    names = [b.name for b in beams]
    for item in args.bev_point:
        label, sep, rest = item.rpartition("=")
        beam_name, colon, xyz = rest.partition(":")
        if not sep or not colon or not label.strip():
            raise _UsageError(f"--bev-point {item!r}: expected LABEL=BEAM:x,y,z")
        if beam_name in names:
            beam = beams[names.index(beam_name)]
        elif beam_name.isdigit() and int(beam_name) < len(beams):
            beam = beams[int(beam_name)]
        else:
            raise _UsageError(f"--bev-point {label}: no beam {beam_name!r}; beams: {', '.join(names)} "
                              f"(or 0-{len(beams) - 1})")
        p = point_from_bev(beam, _triple(xyz, f"--bev-point {label}"), patient_position)
        out.append(PointOfInterest(label.strip(), tuple(float(v) for v in p)))
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        v = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise _UsageError(f"{what}: {text!r} is not a comma-separated list of whole numbers") from None
    if any(k < 0 for k in v):
        raise _UsageError(f"{what}: rounds are numbered from 0")
    return v


def _floats(text: str, what: str, n: int) -> tuple[float, ...]:
    try:
        v = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise _UsageError(f"{what}: {text!r} is not {n} comma-separated numbers") from None
    if len(v) != n or not all(np.isfinite(v)) or (n == 2 and not v[0] < v[1]):
        raise _UsageError(f"{what}: {text!r} is not {n} finite numbers, low before high")
    return v


def _errors():
    from ids_engine._files import FolderLockedError
    from ids_engine.io import InputError
    from ids_engine.scripting import ScriptError

    return (_UsageError, ScriptError, InputError, FolderLockedError, ValueError, KeyError)


# --------------------------------------------------------------------------- ids points
def cmd_points(args) -> int:
    from ids_engine._files import atomic_text
    from ids_engine.evaluation import (compare_points, comparison_report, point_doses, point_doses_report,
                                       read_point_file, read_point_positions, write_point_file)

    try:
        out = _out_folder(args)
        positions = read_point_positions(args.positions) if args.positions else []
        measured = (read_point_file(args.measured, scale=0.01 if args.measured_unit == "cGy" else 1.0)
                    if args.measured else None)
        [(plan_name, session)] = _plans(args, [args.session] if args.session else [])
        patient = session.patient
        beams = [g.beam for g in session.engine.geometry]
        points = ([] if args.no_patient_points else list(patient.points)) + positions
        points += _cli_points(args, beams, patient.patient_position)
        if not points:
            raise _UsageError("no points: the case has none; give --positions, --point or --bev-point")
        doses = point_doses(session.engine, points, plan_id=session.plan_id)
        cmp = compare_points(doses.values(), measured) if measured is not None else None
    except _errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dest = _dest(out)
    write_point_file(dest / "points.txt", doses.values(), title=f"{plan_name} plan ID {session.plan_id}")
    atomic_text(dest / "points.md", point_doses_report(doses, title=f"Point doses ({plan_name})"))
    doc = {"plan": plan_name, "plan_id": session.plan_id, "beams": list(doses.beam_names),
           "points": [{"label": lab, "position_mm_xyz": [float(v) for v in doses.positions_mm_xyz[k]],
                       "per_beam_gy": [float(v) for v in doses.per_beam_gy[k]], "total_gy": float(doses.total_gy[k]),
                       "bev_mm_xyz": [[float(v) for v in doses.bev_mm_xyz[k, b]] for b in range(len(beams))]}
                      for k, lab in enumerate(doses.labels)]}
    if cmp is not None:
        atomic_text(dest / "comparison.md", comparison_report(cmp, plan_id=session.plan_id))
        doc["comparison"] = [{"label": r.label, "computed_gy": r.computed_gy, "measured_gy": r.measured_gy,
                              "difference_gy": r.difference_gy, "difference_pct": r.difference_pct} for r in cmp.rows]
        doc["computed_only"] = list(cmp.computed_only)
        doc["measured_only"] = list(cmp.measured_only)
    atomic_text(dest / "points.json", json.dumps(doc, indent=1))
    session.close()
    _finish(dest, out)
    print(f"plan: {plan_name}, plan ID {session.plan_id}; {len(doses.labels)} points, {len(beams)} beams")
    for k, lab in enumerate(doses.labels):
        print(f"  {lab:<24} {doses.total_gy[k]:9.4f} Gy")
    if cmp is not None:
        print(f"{len(cmp.rows)} matched with {args.measured}"
              + (f"; not matched: computed {', '.join(cmp.computed_only)}" if cmp.computed_only else "")
              + (f"; measured {', '.join(cmp.measured_only)}" if cmp.measured_only else ""))
    print(f"written to {out}: points.txt, points.md, points.json" + (", comparison.md" if cmp is not None else ""))
    return 0


# --------------------------------------------------------------------------- ids dvh
def _convergence_png(path, history: dict, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ids_engine.evaluation import dkw_bound

    fig = Figure(figsize=(6.5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_n = []
    for name, (colour, rows) in history.items():
        n = np.array([r[0] for r in rows], float)
        e = np.array([r[1] for r in rows], float)
        all_n += list(n)
        ax.loglog(n, 100 * np.maximum(e, 1e-6), "o-", color=colour, label=name, markersize=3)
    if all_n:
        n = np.geomspace(min(all_n), max(all_n), 50)
        ax.loglog(n, [100 * dkw_bound(int(k), 1e-6) for k in n], "k--", linewidth=0.8,
                  label="DKW bound (p = 1e-6), 1/sqrt(n)")
    ax.set_xlabel("points sampled in the structure")
    ax.set_ylabel("max |V sampled - V exact| (% of volume)")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def cmd_dvh(args) -> int:
    from ids_engine._files import atomic_text
    from ids_engine.evaluation import DVHCurve, dvh_max_difference, exact_dvh, plot_dvhs, sample_dvhs

    try:
        if not args.density > 0:
            raise _UsageError(f"--density must be positive, got {args.density}")
        if not args.bin_gy > 0:
            raise _UsageError(f"--bin-gy must be positive, got {args.bin_gy}")
        if args.supersample < 1:
            raise _UsageError(f"--supersample must be at least 1, got {args.supersample}")
        rounds = _ints(args.rounds, "--rounds") if args.rounds else []
        dose_range = _floats(args.dose_range, "--dose-range", 2) if args.dose_range else None
        out = _out_folder(args)
        plans = _plans(args, args.session)
        patient = plans[0][1].patient
        if args.structures:
            names = [n.strip() for n in args.structures.split(",") if n.strip()]
        else:
            names = [s.name for s in patient.structures if not s.is_empty]
        structures = [patient.structure(n) for n in names]
        for plan_name, s in plans[1:]:
            if s.patient.grid != patient.grid:
                raise _UsageError(f"plan {plan_name}: another grid than {plans[0][0]}'s; DVHs of one case only")
    except _errors() as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    g = patient.grid
    curves, doc = [], {"plans": [], "density_per_mm3": args.density if args.sampled else None}
    history: dict = {}
    for plan_name, session in plans:
        dose = session.dose()
        entry = {"plan": plan_name, "plan_id": session.plan_id, "structures": []}
        exact = {}
        for st in structures:
            t0 = time.perf_counter()
            ex = exact_dvh(st.name, dose, st.mask, g, supersample=args.supersample, bin_gy=args.bin_gy)
            t_exact = time.perf_counter() - t0
            exact[st.name] = ex
            curves.append(DVHCurve(f"{plan_name}" if not args.sampled else f"{plan_name} exact", ex, st.colour))
            entry["structures"].append({"name": st.name, "volume_cc": ex.volume_cc, "voxel_volume_cc": st.volume_cc,
                                        "exact_s": round(t_exact, 3)})
        if args.sampled:
            t0 = time.perf_counter()
            last = None
            round_curves = []  # drawn after the final sampled curves (line styles go by first appearance)
            for state in sample_dvhs(dose, structures, g, density_per_mm3=args.density, seed=args.seed,
                                     bin_gy=args.bin_gy):
                last = state
                if state.round in rounds:
                    for k, st in enumerate(structures):
                        round_curves.append(DVHCurve(f"{plan_name} sampled, round {state.round}", state.dvhs[k],
                                                     st.colour, f"{st.name} sampled, {state.points[k]} points"))
                errs = []
                for k, st in enumerate(structures):
                    e = dvh_max_difference(state.dvhs[k], exact[st.name])
                    errs.append(e)
                    history.setdefault(f"{st.name} ({plan_name})" if len(plans) > 1 else st.name,
                                       (st.colour, []))[1].append((state.points[k], e))
                print(f"  {plan_name}: round {state.round}: " + ", ".join(
                    f"{st.name} {n} points ({d:.2f}/mm3, max |dV| {100 * e:.2f} %)"
                    for st, n, d, e in zip(structures, state.points, state.density_per_mm3, errs)), flush=True)
            t_sample = time.perf_counter() - t0
            for k, st in enumerate(structures):
                curves.append(DVHCurve(f"{plan_name} sampled", last.dvhs[k], st.colour,
                                       f"{st.name} sampled, {last.points[k]} points"))
                entry["structures"][k].update({"sampled_points": last.points[k], "max_difference_pct": 100 *
                                               dvh_max_difference(last.dvhs[k], exact[st.name])})
            curves += round_curves
            entry["sampling_s"] = round(t_sample, 3)
        doc["plans"].append(entry)
        session.close()
    dest = _dest(out)
    title = ", ".join(f"{p} (plan ID {s.plan_id})" for p, s in plans)
    plot_dvhs(dest / "dvh.png", curves, volume=args.volume, title=title, dose_range_gy=dose_range)
    files = ["dvh.png"]
    if args.sampled:
        _convergence_png(dest / "convergence.png", history, f"DVH by random sampling: {title}")
        files.append("convergence.png")
    atomic_text(dest / "dvh.json", json.dumps(doc, indent=1))
    files.append("dvh.json")
    _finish(dest, out)
    for entry in doc["plans"]:
        for st in entry["structures"]:
            line = f"  {entry['plan']:<14} {st['name']:<14} {st['volume_cc']:9.2f} cc (voxels {st['voxel_volume_cc']:.2f} cc)"
            if "sampled_points" in st:
                line += f"  sampled {st['sampled_points']} points, max |dV| {st['max_difference_pct']:.2f} %"
            print(line)
    print(f"written to {out}: {', '.join(files)}")
    return 0

