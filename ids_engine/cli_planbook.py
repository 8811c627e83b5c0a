"""``ids planbook``: the plans of a saved plan book, from the command line.

A plan book folder (``planbook.json`` + ``planbook.npz``, written by ``ids autoweight``, the
viewer's Plan > Forward planning dialog or :meth:`ids_engine.planning.PlanBook.save`) holds
several plans of one patient. This command lists them and copies, renames, deletes and
selects plans, and adds copied or parallel-opposed beams, deletes beams and moves every
isocentre to one beam's. Every change is written back atomically; a change to the beams
goes through :meth:`~ids_engine.planning.Plan.changed`, so the plan ID goes up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
}


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
                    "written back atomically; a beam change increments the plan ID.")
    s.add_argument("folder", help="plan book folder (holds planbook.json)")
    s.add_argument("action", choices=list(ACTIONS))
    s.add_argument("names", nargs="*", help="the action's plan / beam names (see the description)")
    s.set_defaults(func=cmd_planbook)
