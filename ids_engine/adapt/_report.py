"""The adaptation report: Markdown and one self-contained HTML file (pictures embedded)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from pathlib import Path

__all__ = ["write_adapt_report"]


def _f(v, fmt=".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _blocks(doc: dict) -> list:
    """The report as blocks: ('h2', text), ('p', text), ('table', header, rows), ('img', file, alt)."""
    B = []
    q = doc["qualification"]
    verdict = ("**AUTO-QUALIFIED FOR REVIEW**: every difference is within the tolerance profile "
               f"({q['profile']['name'] or q['profile']['source']}); a person still approves the plan."
               if q["auto_qualified_for_review"] else
               f"**NOT QUALIFIED**: {len(q['reasons'])} check(s) outside the tolerance profile "
               f"({q['profile']['name'] or q['profile']['source']}); the plan needs a full review.")
    B.append(("h2", "Decision"))
    B.append(("p", verdict))
    if q["reasons"]:
        B.append(("table", ("Reason",), [(r,) for r in q["reasons"]]))
    a, n = doc["approved"], doc["new_ct"]
    B.append(("h2", "Inputs"))
    B.append(("table", ("Item", "Value"), [
        ("Approved plan", f"{a['case']}, plan ID {a['plan_id']}, {a['beams']} beams, Rx {a['prescription_gy']:g} Gy, "
                          f"{a['requests']} shaping request(s), goals: {a['protocol'] or 'none kept'}"),
        ("New CT", n["label"]),
        ("Tolerance profile", f"{doc['tolerance']['name'] or '-'} ({doc['tolerance']['source']})"),
    ]))
    r = doc["registration"]
    B.append(("h2", "Registration"))
    rows = [("Kind", r.get("kind", "-"))]
    if r.get("rotation_deg_xyz") is not None:
        rows.append(("Rotation about x, y, z (deg)", ", ".join(f"{v:.2f}" for v in r["rotation_deg_xyz"])))
    if r.get("translation_mm_xyz") is not None:
        rows.append(("Translation x, y, z (mm)", ", ".join(f"{v:.2f}" for v in r["translation_mm_xyz"])))
    for k, v in (r.get("metrics") or {}).items():
        if isinstance(v, (int, float)):
            rows.append((k, _f(float(v), ".4g")))
    te = doc.get("registration_error_vs_truth")
    if te:
        rows.append(("Error vs the known transform (target voxels)", f"mean {te['mean_mm']:.2f} mm, max {te['max_mm']:.2f} mm"))
    B.append(("table", ("Item", "Value"), rows))
    B.append(("h2", "Contours transferred"))
    B.append(("table", ("Structure", "Kind", "Approved (cc)", "Transferred (cc)", "Dice vs the new CT's own"),
              [(c["name"], c["kind"], _f(c["approved_cc"]), _f(c["transferred_cc"]), _f(c.get("dice"), ".3f"))
               for c in doc["contours"]]))
    ad = doc["adaptation"]
    B.append(("h2", "Adaptation"))
    para = ad["why"] + "."
    if ad["reoptimised"]:
        para += f" Goals: {ad['goals_source']}."
        o = ad.get("optimiser") or {}
        if o:
            para += (f" Warm-started optimiser: {o['iterations']} iterations, objective {o['objective']:.4g}"
                     + (f", unmet constraints: {'; '.join(o['unmet_constraints'])}" if o["unmet_constraints"] else "") + ".")
    for note in ad["notes"]:
        para += f" Note: {note}."
    B.append(("p", para))
    if ad["replay"]:
        B.append(("table", ("#", "Request", "Moved (mm)", "Replayed", "Note"),
                  [(e["n"], e["original"]["kind"], _f(e.get("shift_mm")), "yes" if e.get("replayed") else "no",
                    e.get("note", "")) for e in ad["replay"]]))
    B.append(("h2", "DVH metrics"))
    rc, ac = doc["comparison"]["recomputed"], doc["comparison"]["adapted"]
    checks = {c["item"]: c for c in q["checks"]}
    rows = []
    for name, e in ac["structures"].items():
        for metric, m in e["metrics"].items():
            c = checks.get(f"{name} {metric}")
            if not m["reported"] and c is None:
                continue
            mr = rc["structures"].get(name, {}).get("metrics", {}).get(metric, {})
            rows.append((name, metric, m["unit"], _f(m["approved"]), _f(mr.get("new")), _f(m["new"]),
                         _f(mr.get("delta"), "+.2f"), _f(m["delta"], "+.2f"),
                         "-" if c is None else f"{c['limit']:g} {c['unit']}",
                         "-" if c is None else ("pass" if c["passed"] else "FAIL")))
    B.append(("p", "Approved: the approved dose on the planning anatomy. Recomputed: the approved plan on the new "
                   "anatomy (isocentres moved with the registration). Adapted: the adapted plan on the new anatomy. "
                   "Deltas are against the approved column; the check is on the adapted plan."))
    B.append(("table", ("Structure", "Metric", "Unit", "Approved", "Recomputed", "Adapted", "Delta recomputed",
                        "Delta adapted", "Limit", "Check"), rows))
    own = doc["comparison"].get("own_contours")
    if own:
        B.append(("h2", "DVH metrics on the new CT's own contours"))
        B.append(("p", "The new CT came with contours of its own (drawn on it, or a test case's true ones): the same "
                       "metrics on them, an independent check of the transferred contours."))
        orows = []
        for name, e in own["adapted"]["structures"].items():
            for metric, m in e["metrics"].items():
                c = checks.get(f"own contours: {name} {metric}")
                if not m["reported"] and c is None:
                    continue
                mr = own["recomputed"]["structures"].get(name, {}).get("metrics", {}).get(metric, {})
                orows.append((name, metric, m["unit"], _f(m["approved"]), _f(mr.get("new")), _f(m["new"]),
                              _f(mr.get("delta"), "+.2f"), _f(m["delta"], "+.2f"),
                              "-" if c is None else ("pass" if c["passed"] else "FAIL")))
        B.append(("table", ("Structure", "Metric", "Unit", "Approved", "Recomputed", "Adapted", "Delta recomputed",
                            "Delta adapted", "Check"), orows))
    B.append(("h2", "Gamma"))
    grows = []
    for crit, g in ac["gamma"].items():
        gr = rc["gamma"].get(crit, {})
        c = checks.get(f"gamma {crit}")
        grows.append((crit, _f(gr.get("pass_rate_pct"), ".1f"), _f(g["pass_rate_pct"], ".1f"),
                      "-" if c is None else f"{c['limit']:g}", str(g["points"]),
                      "-" if c is None else ("pass" if c["passed"] else "FAIL")))
    B.append(("p", "Global gamma; reference: the approved dose warped onto the new CT through the registration; "
                   f"points below {next(iter(ac['gamma'].values()))['low_dose_threshold_pct']:g} % of its maximum "
                   "are not evaluated (a seeded random subset when there are more than the points column)."))
    B.append(("table", ("Criterion", "Recomputed pass (%)", "Adapted pass (%)", "Minimum (%)", "Points", "Check"),
              grows))
    for key, alt in (("dvh_png", "DVH: approved, recomputed, adapted"), ("isodose_png", "Isodose slices")):
        if doc["files"].get(key):
            B.append(("img", doc["files"][key], alt))
    B.append(("h2", "Timings"))
    B.append(("table", ("Step", "Seconds"), [(k, f"{v:.2f}") for k, v in doc["timings_s"].items()]))
    return B


def _markdown(title: str, B) -> str:
    out = [f"# {title}", ""]
    for b in B:
        if b[0] == "h2":
            out += [f"## {b[1]}", ""]
        elif b[0] == "p":
            out += [b[1], ""]
        elif b[0] == "table":
            if not b[2]:
                out += ["(none)", ""]
                continue
            out.append("| " + " | ".join(b[1]) + " |")
            out.append("| " + " | ".join("---" for _ in b[1]) + " |")
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in b[2]]
            out.append("")
        elif b[0] == "img":
            out += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(out)


def _html(title: str, B, folder: Path) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:70em;margin:1em auto}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #999;padding:.2em .6em}"
           "td.FAIL{color:#b00;font-weight:bold}td.pass{color:#070}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for b in B:
        if b[0] == "h2":
            out.append(f"<h2>{e(b[1])}</h2>")
        elif b[0] == "p":
            text = e(b[1])
            while text.count("**") >= 2:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            out.append(f"<p>{text}</p>")
        elif b[0] == "table" and b[2]:
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
            for r in b[2]:
                out.append("<tr>" + "".join(
                    f"<td{' class=' + chr(34) + str(c) + chr(34) if c in ('pass', 'FAIL') else ''}>{e(str(c))}</td>"
                    for c in r) + "</tr>")
            out.append("</table>")
        elif b[0] == "img":
            p = folder / b[1]
            if p.is_file():
                b64 = base64.b64encode(p.read_bytes()).decode("ascii")
                out.append(f'<p><img alt="{e(b[2])}" src="data:image/png;base64,{b64}" style="max-width:100%"></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_adapt_report(folder, doc: dict) -> tuple[Path, Path]:
    """Write ``adapt_report.md`` and ``adapt_report.html`` into ``folder`` from the
    adaptation summary ``doc`` (see :func:`ids_engine.adapt.run_adaptation`). Names the
    cases by label only (no patient identifier)."""
    folder = Path(folder)
    title = f"Adaptive replanning: {doc['approved']['case']} on {doc['new_ct']['label']}"
    B = _blocks(doc)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    B.append(("p", f"Written {stamp} by ids-engine {doc.get('version', '')}."))
    md, ht = folder / "adapt_report.md", folder / "adapt_report.html"
    from ids_engine._files import atomic_text

    atomic_text(md, _markdown(title, B))
    atomic_text(ht, _html(title, B, folder))
    return md, ht
