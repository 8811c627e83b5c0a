"""``ids planbook``: the plans of a saved plan book, from the command line.

A plan book folder (``planbook.json`` + ``planbook.npz``, written by ``ids autoweight``, the
viewer's Plan > Forward planning dialog or :meth:`ids_engine.planning.PlanBook.save`) holds
several plans of one patient. This command lists them and copies, renames, deletes and
selects plans, and adds copied or parallel-opposed beams, deletes beams and moves every
isocentre to one beam's. Every change is written back atomically; a change to the beams
goes through :meth:`~ids_engine.planning.Plan.changed`, so the plan ID goes up.

Two actions evaluate plans on the book's case (rebuilt from what the book records: the case
file of ``ids autoweight`` or the viewer's case description and points):

``dvh [PLAN ...] --out DIR``
    The DVHs of several plans together in ``dvh.png`` (seed 001's DVH popup: colour per
    structure, line style per plan), exact (every voxel, partial volumes at the edges) or
    ``--sampled`` (random points to ``--density`` per mm^3), ``--volume %|cc``; the curves in
    ``dvh.json``. Without PLAN: every plan that has monitor units.
``summary PLAN --out DIR [--pdf]``
    The plan's physics summary (Markdown and HTML; with ``--pdf`` also PDF).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "cmd_planbook"]

ACTIONS = {
    "list": (),
    "beams": ("PLAN",),
    "copy": ("SOURCE", "NEW_NAME"),
    "rename": ("OLD_NAME", "NEW_NAME"),
    "delete": ("PLAN",),
    "select": ("PLAN",),
    "copy-beam": ("PLAN", "BEAM"),
    "opposed": ("PLAN", "BEAM"),
    "delete-beam": ("PLAN", "BEAM"),
    "move-isocentres": ("PLAN", "BEAM"),
    "dvh": ("[PLAN ...]",),
    "summary": ("PLAN",),
}
_EVALUATE = ("dvh", "summary")


def _beam_ref(text: str):
    """A beam by name, or by its 1-based number in the plan (as listed)."""
    return int(text) - 1 if text.isdigit() else text


def _list(book) -> str:
    lines = [f"{'':2}{'plan':24} {'plan ID':>7} {'beams':>5}  MU"]
    for name in book.names:
        p = book.get(name)
        mark = "*" if name == book.selected else " "
        mu = ", ".join(f"{m:g}" for m in p.mu) or "-"
        lines.append(f"{mark} {name:24} {p.plan_id:>7} {p.n_beams:>5}  {mu}")
    return "\n".join(lines)


def _beams(plan) -> str:
    lines = [f"plan {plan.name!r} (plan ID {plan.plan_id})",
             f"{'#':>3} {'beam':16} {'gantry':>7} {'couch':>6} {'coll':>6}  {'isocentre (mm, DICOM x y z)':28} {'field':9} {'MU':>7}"]
    for k, (b, f) in enumerate(zip(plan.beams, plan.fields)):
        iso = " ".join(f"{v:.1f}" for v in b.isocentre_mm_xyz)
        mu = f"{plan.mu[k]:g}" if k < len(plan.mu) else "-"
        lines.append(f"{k + 1:>3} {b.name:16} {b.gantry_deg:7.1f} {b.couch_deg:6.1f} {b.collimator_deg:6.1f}  "
                     f"{iso:28} {f.kind:9} {mu:>7}")
    return "\n".join(lines)


def cmd_planbook(args: argparse.Namespace) -> int:
    from ids_engine.planning import (
        PlanBook, PlanBookError, copy_beam, find_beam, mirror_field, move_isocentres, parallel_opposed,
    )

    folder = Path(args.folder)
    want = ACTIONS[args.action]
    if args.action in _EVALUATE:
        return _evaluate(args, folder)
    if len(args.names) != len(want):
        given = " ".join(args.names) or "nothing"
        print(f"error: ids planbook {args.action} takes {' '.join(want) or 'no more arguments'}, got {given}",
              file=sys.stderr)
        return 2
    try:
        book = PlanBook.load(folder)
        if args.action == "list":
            print(_list(book))
            return 0
        if args.action == "beams":
            print(_beams(book.get(args.names[0])))
            return 0
        if args.action == "copy":
            book.copy(*args.names)
            what = f"copied plan {args.names[0]!r} to {args.names[1]!r} (selected)"
        elif args.action == "rename":
            book.rename(*args.names)
            what = f"renamed plan {args.names[0]!r} to {args.names[1]!r}"
        elif args.action == "delete":
            book.delete(args.names[0])
            what = f"deleted plan {args.names[0]!r}"
        elif args.action == "select":
            book.select(args.names[0])
            what = f"selected plan {args.names[0]!r}"
        else:
            plan = book.get(args.names[0])
            try:
                k = find_beam(plan.beams, _beam_ref(args.names[1]))
            except (ValueError, IndexError) as exc:
                raise PlanBookError(f"plan {plan.name!r}: {exc}") from None
            if args.action == "copy-beam":
                new = plan.add_beam(copy_beam(plan.beams, k), plan.fields[k], plan.mu[k] if k < len(plan.mu) else 0.0)
            elif args.action == "opposed":
                new = plan.add_beam(parallel_opposed(plan.beams, k), mirror_field(plan.fields[k]),
                                    plan.mu[k] if k < len(plan.mu) else 0.0)
            elif args.action == "delete-beam":
                new = plan.remove_beam(k)
            else:  # move-isocentres
                new = plan.with_beams(move_isocentres(plan.beams, k), plan.fields, plan.mu)
            book.put(new)
            what = f"plan {new.name!r}: {args.action} {plan.beams[k].name!r}; plan ID {plan.plan_id} -> {new.plan_id}"
        book.save(folder)
    except PlanBookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{what}; written to {folder}")
    print(_list(book))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser(
        "planbook", help="list, copy, rename, delete and select the plans of a saved plan book; beam operations",
        description="Work on a plan book folder (planbook.json, e.g. from ids autoweight or the viewer's Plan > "
                    "Forward planning dialog): 'list' the plans (* marks the selected one) with their plan IDs, "
                    "'beams PLAN' their beams, 'copy SOURCE NEW_NAME' (the source stays), 'rename OLD NEW', "
                    "'delete PLAN', 'select PLAN'; on a plan's beams (BEAM: a name or its number in 'beams'): "
                    "'copy-beam', 'opposed' (parallel-opposed: gantry + 180, collimator mirrored, the field "
                    "mirrored), 'delete-beam', 'move-isocentres' (every beam to BEAM's isocentre). Changes are "
                    "written back atomically; a beam change increments the plan ID. Evaluation on the book's case: "
                    "'dvh [PLAN ...] --out DIR' (several plans' DVHs in one PNG, line style per plan, colour per "
                    "structure; --sampled, --volume cc) and 'summary PLAN --out DIR [--pdf]' (the physics summary).")
    s.add_argument("folder", help="plan book folder (holds planbook.json)")
    s.add_argument("action", choices=list(ACTIONS))
    s.add_argument("names", nargs="*", help="the action's plan / beam names (see the description)")
    g = s.add_argument_group("dvh and summary (evaluate plans on the book's case)")
    g.add_argument("--out", help="output folder (refused if not empty, unless --force)")
    g.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    g.add_argument("--pdf", action="store_true", help="summary: also the PDF")
    g.add_argument("--structures", help="dvh: comma-separated structures (default: all but the external)")
    g.add_argument("--sampled", action="store_true", help="dvh: random sampling instead of every voxel")
    g.add_argument("--density", type=float, default=1.0, help="dvh --sampled: points per mm^3 (default 1)")
    g.add_argument("--seed", type=int, default=0, help="dvh --sampled: random seed")
    g.add_argument("--volume", choices=("%", "cc"), default="%", help="dvh: volume axis in %% or cc")
    g.add_argument("--bin-gy", type=float, default=None, help="dvh: dose bin (default: 1/500 of the highest dose)")
    s.set_defaults(func=cmd_planbook)


# --------------------------------------------------------------------------- dvh, summary
def book_patient(book, folder: Path):
    """The patient a plan book was made on, rebuilt from its ``case`` record, and the case's
    label: ``case_file`` (``ids autoweight``) or ``spec`` and ``points`` (the viewer)."""
    from dataclasses import replace

    from ids_engine.planning import PlanBookError

    case = book.case or {}
    where = f"{folder}: the plan book's case"
    if "case_file" in case:
        from ids_engine.cli_forward import _build_patient

        doc = case["case_file"]
        patient = _build_patient(doc, where)
        c = doc.get("case", {})
        return patient, f"phantom {c.get('phantom')} ({c.get('resolution', 'coarse')})"
    if "spec" in case:
        from ids_engine.model import PointOfInterest
        from ids_engine.session import case_from_spec, case_label

        try:
            patient = case_from_spec(dict(case["spec"]))
            if "points" in case:
                patient = replace(patient, points=tuple(PointOfInterest(str(d["label"]), tuple(d["position_mm_xyz"]))
                                                        for d in case["points"]))
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise PlanBookError(f"{where} cannot be rebuilt: {exc}") from None
        return patient, case_label(dict(case["spec"]))
    raise PlanBookError(f"{where} is not recorded (books written by ids autoweight, or by the viewer on a case it can "
                        "reopen, record it)")


def _evaluate(args, folder: Path) -> int:
    from ids_engine._files import FolderLockedError
    from ids_engine.cli_points import _dest, _finish
    from ids_engine.planning import BeamDoses, PlanBook, PlanBookError
    from ids_engine.scripting import ScriptError, check_out_folder

    try:
        if not args.out:
            raise PlanBookError(f"ids planbook {args.action} needs --out DIR")
        if args.action == "summary" and len(args.names) != 1:
            raise PlanBookError(f"ids planbook summary takes one PLAN, got {' '.join(args.names) or 'nothing'}")
        if not args.density > 0:
            raise PlanBookError(f"--density must be positive, got {args.density}")
        book = PlanBook.load(folder)
        names = list(args.names) or [n for n in book.names if any(m > 0 for m in book.get(n).mu)]
        if not names:
            raise PlanBookError(f"{folder}: no plan has monitor units; name the plans to show")
        plans = [book.get(n) for n in names]
        for p in plans:
            if p.n_beams == 0 or not any(m > 0 for m in p.mu):
                raise PlanBookError(f"plan {p.name!r} (plan ID {p.plan_id}) has no monitor units: nothing to evaluate")
        out = check_out_folder(args.out, force=args.force)
        patient, label = book_patient(book, folder)
        structures = None
        if args.action == "dvh":
            wanted = [n.strip() for n in args.structures.split(",") if n.strip()] if args.structures else \
                [s.name for s in patient.structures if not s.is_empty and s.kind.value != "external"]
            structures = [patient.structure(n) for n in wanted]
    except (PlanBookError, ScriptError, FolderLockedError, ValueError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    cache: dict[str, BeamDoses] = {}

    def doses_of(p):
        if p.beams_key() not in cache:
            cache[p.beams_key()] = BeamDoses(patient, p)
        return cache[p.beams_key()]

    dest = _dest(out)
    if args.action == "summary":
        from ids_engine.evaluation import physics_summary, write_physics_summary
        from ids_engine.evaluation._physics_summary import write_physics_summary_pdf

        p = plans[0]
        summary = physics_summary(p, patient, doses_of(p), case_label=label)
        written = list(write_physics_summary(dest, summary))
        if args.pdf:
            written.append(write_physics_summary_pdf(written[0].with_suffix(".pdf"), summary))
        _finish(dest, out)
        print(f"physics summary of plan {p.name!r} (plan ID {p.plan_id}) written to {out}: "
              + ", ".join(w.name for w in written))
        return 0
    from ids_engine._files import atomic_text
    from ids_engine.evaluation._dvh_plot import plan_dvh_curves, plans_dvh_png

    cubes = {f"{p.name} (plan ID {p.plan_id})": doses_of(p).dose(p.mu) for p in plans}
    bin_gy = args.bin_gy or max(max(float(d.max()) for d in cubes.values()) / 500.0, 1e-4)
    method = "sampled" if args.sampled else "exact"
    curves = plan_dvh_curves(cubes, structures, patient.grid, method=method, bin_gy=bin_gy,
                             density_per_mm3=args.density, seed=args.seed)
    plans_dvh_png(dest / "dvh.png", curves, volume=args.volume,
                  title=f"{label}: DVHs ({method}) of " + ", ".join(cubes))
    doc = {"case": label, "method": method, "volume": args.volume, "bin_gy": bin_gy,
           "curves": [{"plan": c.plan, "structure": c.dvh.name, "volume_cc": round(float(c.dvh.volume_cc), 4),
                       "dose_gy": [round(float(v), 6) for v in c.dvh.dose_gy],
                       "volume_pct": [round(100.0 * float(v), 4) for v in c.dvh.volume_fraction]} for c in curves]}
    atomic_text(dest / "dvh.json", json.dumps(doc, indent=1) + "\n")
    _finish(dest, out)
    for c in curves:
        d50 = float(np.interp(0.5, c.dvh.volume_fraction[::-1], c.dvh.dose_gy[::-1]))
        print(f"  {c.plan:<28} {c.dvh.name:<12} {c.dvh.volume_cc:9.2f} cc   D50 {d50:.3f} Gy")
    print(f"written to {out}: dvh.png, dvh.json ({method}, line style per plan, colour per structure)")
    return 0
