"""``ids store``: the plan store from the command line.

``ids store [--store PATH] ACTION ...`` with ACTION one of init, list, import-session, copy,
rename, delete, approve, history, show, status, check, export-anonymised. The store is
``--store``, else ``$IDS_STORE``, else the per-user default (``~/.local/share/ids-engine/store``,
``$XDG_DATA_HOME`` respected). A plan is named by its name (unique per patient), by
``PATIENT_KEY:NAME`` or by its key. Patient identifiers are printed only by ``list
--patients`` (on the terminal, never in a log).
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parser", "cmd_store"]


def add_parser(sub) -> None:
    p = sub.add_parser("store", help="the plan store: patients, plans, approvals, history",
                       description="The plan store (SQLite + session folders): import sessions as plans, copy, "
                                   "delete, approve, show history, check integrity, export anonymised.")
    p.add_argument("--store", help="the store folder (default: $IDS_STORE, else ~/.local/share/ids-engine/store)")
    p.add_argument("--user", help="who is acting (recorded in the audit trail; default: the login name)")
    acts = p.add_subparsers(dest="store_action", metavar="ACTION")
    acts.required = True
    acts.add_parser("init", help="create the store (if it does not exist) and say where it is")
    a = acts.add_parser("list", help="list the plans")
    a.add_argument("--patients", action="store_true", help="list the patients (with their identifiers) instead")
    a = acts.add_parser("import-session", help="import a saved session folder (ids shape/plan --out) as a plan")
    a.add_argument("folder", help="a session folder, or an ids plan --out folder (its session/ is taken)")
    a.add_argument("--plan", required=True, help="the new plan's name")
    who = a.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient-id", help="the patient's ID (added to the store with the session's CT if new)")
    who.add_argument("--patient-key", help="a patient already in the store, by key")
    a.add_argument("--patient-name", help="the patient's name (stored with a new patient)")
    a.add_argument("--parent", help="the plan this one was made from")
    a = acts.add_parser("copy", help="copy a plan under a new name (the old one stays; the copy is unapproved)")
    a.add_argument("plan")
    a.add_argument("new_name")
    a = acts.add_parser("rename", help="rename a plan (plan ID kept)")
    a.add_argument("plan")
    a.add_argument("new_name")
    a = acts.add_parser("delete", help="delete a plan")
    a.add_argument("plan")
    a.add_argument("--force", action="store_true", help="delete an approved plan too")
    a = acts.add_parser("approve", help="approve a plan (records who, when, plan ID and content hash)")
    a.add_argument("plan")
    a.add_argument("--user", dest="approver", help="the approving user (default: --user, else the login name)")
    a = acts.add_parser("status", help="set a plan's status (draft, for-review, auto-qualified, rejected, retired)")
    a.add_argument("plan")
    a.add_argument("status")
    a.add_argument("--evidence", help="the kind of evidence the status rests on")
    a = acts.add_parser("history", help="a plan's shaping history and audit trail")
    a.add_argument("plan")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = acts.add_parser("show", help="a plan's record: beams, plan ID, status, approvals, evidence")
    a.add_argument("plan")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = acts.add_parser("check", help="integrity check (SQLite, every indexed file and its hash)")
    a.add_argument("--replay", action="store_true", help="also replay every plan and compare its recorded dose")
    a = acts.add_parser("export-anonymised", help="write an anonymised copy of the store")
    a.add_argument("dest", help="the folder for the copy; must not exist or be empty")
    a.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    p.set_defaults(func=cmd_store)


def _err(msg) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_store(args: argparse.Namespace) -> int:
    from ids_engine._files import FolderLockedError
    from ids_engine.store import PlanStore, StoreError

    act = args.store_action
    try:
        with PlanStore.open(args.store, user=args.user) as store:
            return _ACTIONS[act](store, args)
    except (StoreError, FolderLockedError, ValueError, OSError) as exc:
        return _err(exc)


def _init(store, args) -> int:
    print(f"plan store at {store.root} ({len(store.list_plans())} plans)")
    return 0


def _list(store, args) -> int:
    if args.patients:
        print(f"{'patient key':18} {'patient ID':16} {'image sets':>10}  name")
        for p in store.patients():
            print(f"{p['key']:18} {p['patient_id']:16} {p['image_sets']:>10}  {p['name'] or ''}")
        return 0
    plans = store.list_plans()
    if not plans:
        print(f"no plans in {store.root}")
        return 0
    names = {p.key: p.name for p in plans}
    print(f"{'plan':24} {'plan ID':>7} {'status':15} {'requests':>8}  {'patient key':17} {'modified':24} parent")
    for p in plans:
        parent = names.get(p.parent_key, p.parent_key or "")
        print(f"{p.name:24} {p.plan_id:>7} {p.status:15} {p.n_requests:>8}  {p.patient_key:17} {p.modified:24} {parent}")
    return 0


def _import(store, args) -> int:
    from pathlib import Path

    from ids_engine.session import case_from_spec, resolve_case

    pk = args.patient_key
    if pk is None:
        folder = Path(args.folder)
        sj = folder / "session.json" if (folder / "session.json").is_file() else folder / "session" / "session.json"
        try:
            doc = json.loads(sj.read_text(encoding="utf-8"))
            case = doc["case"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{sj}: not a readable session file ({type(exc).__name__}: {exc})") from None
        pk = store.add_patient(case_from_spec(resolve_case(case, sj.parent)), patient_id=args.patient_id,
                               name=args.patient_name)
    ref = store.import_session(args.folder, patient_key=pk, plan_name=args.plan, parent=args.parent)
    print(f"imported as {ref} ({ref.n_requests} requests; key {ref.key})")
    return 0


def _copy(store, args) -> int:
    ref = store.copy_plan(args.plan, args.new_name)
    print(f"copied to {ref}")
    return 0


def _rename(store, args) -> int:
    print(f"renamed to {store.rename_plan(args.plan, args.new_name)}")
    return 0


def _delete(store, args) -> int:
    ref = store.get(args.plan)
    store.delete_plan(ref, force=args.force)
    print(f"deleted {ref}")
    return 0


def _approve(store, args) -> int:
    ref = store.approve(args.plan, args.approver or store.user)
    a = store.approvals(ref)[-1]
    print(f"{ref} approved by {a['user']} at {a['time']}; content hash {a['content_sha256'][:16]}")
    return 0


def _status(store, args) -> int:
    print(f"{store.set_status(args.plan, args.status, evidence_kind=args.evidence)}")
    return 0


def _history(store, args) -> int:
    ref = store.get(args.plan)
    hist, audit = store.history(ref), store.audit(ref)
    if args.json:
        print(json.dumps({"plan": ref.name, "history": hist, "audit": audit}, indent=1))
        return 0
    print(f"{ref}: {len(hist)} history line(s)")
    print(f"{'line':>4} {'op':10} {'request':>7} {'kind':22} {'plan ID':>7}")
    for h in hist:
        pid = "" if h["plan_id"] is None else h["plan_id"]
        rid = "" if h["request_id"] is None else h["request_id"]
        print(f"{h['line'] + 1:>4} {h['op']:10} {rid:>7} {h['kind'] or '':22} {pid:>7}"
              + ("" if h["indexed"] else "  (not yet indexed)"))
    print("\naudit trail:")
    for a in audit:
        print(f"  {a['time']}  {a['user']:12} {a['action']:16} {json.dumps(a['detail'], sort_keys=True)}")
    return 0


def _show(store, args) -> int:
    doc = store.show(args.plan)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"plan {doc['name']!r} (key {doc['key']}), patient {doc['patient_key']}")
    print(f"  plan ID {doc['plan_id']}, status {doc['status']}"
          + (f" (evidence: {doc['status_evidence']})" if doc["status_evidence"] else ""))
    print(f"  prescription {doc['prescription_gy']:g} Gy; {doc['requests']} requests in its history; "
          f"parent {doc['parent'] or '-'}")
    print(f"  content hash {doc['content_sha256'] or '(not recorded yet)'}")
    for b in doc["beams"]:
        iso = " ".join(f"{v:.1f}" for v in b["isocentre_mm_xyz"])
        print(f"  beam {b['name']:12} gantry {b['gantry_deg']:6.1f}  couch {b['couch_deg']:5.1f}  "
              f"coll {b['collimator_deg']:5.1f}  isocentre {iso} mm")
    for a in doc["approvals"]:
        print(f"  approved by {a['user']} at {a['time']} (plan ID {a['plan_id']}, content {a['content_sha256'][:16]})")
    for e in doc["evidence"]:
        print(f"  evidence {e['kind']} ({e['key']}) at {e['time']}")
    return 0


def _check(store, args) -> int:
    problems = store.check()
    if args.replay and not problems:
        for ref in store.list_plans():
            r = store.verify_replay(ref)
            if r["match"] is False:
                problems.append(f"{ref}: replaying its history does not give the recorded dose")
            else:
                print(f"{ref}: replay {'identical' if r['match'] else 'not recorded'} ({r['requests']} requests)")
    for p in problems:
        print(f"problem: {p}")
    if problems:
        return _err(f"{store.root}: {len(problems)} problem(s)")
    print(f"{store.root}: sound ({len(store.list_plans())} plans)")
    return 0


def _export(store, args) -> int:
    dest = store.export_anonymised(args.dest, force=args.force)
    print(f"anonymised copy written to {dest}")
    return 0


_ACTIONS = {"init": _init, "list": _list, "import-session": _import, "copy": _copy, "rename": _rename,
            "delete": _delete, "approve": _approve, "status": _status, "history": _history, "show": _show,
            "check": _check, "export-anonymised": _export}
