"""``ids sequence``: MLC leaf sequencing of a plan and its deliverable-dose check (issue 13).

``ids sequence SOURCE --out DIR`` takes a saved session folder (its current plan, e.g. from
``ids plan`` or ``ids shape``) or a built-in phantom's open-field plan, sequences every beam's
fluence into step-and-shoot segments on the machine's MLC (:func:`ids_engine.deliver.sequence_plan`),
recomputes the dose from the segments, compares it with the fluence dose (gamma, DVH
metrics), re-optimises the segment MU and writes:

- ``segments.json``: per beam its angles and segments (leaf and jaw positions, IEC 61217
  beam-limiting-device frame at the isocentre plane, mm; MU per fraction, sequenced and
  re-optimised);
- ``segments_<n>_<beam>.png``: per beam the fluence, the deliverable fluence and each segment;
- ``deliverable_report.md``: segments and MU per beam, gamma 3 %/3 mm and 2 %/2 mm, DVH
  metric deltas, before and after the re-optimisation;
- ``deliverable.json``: the figures of the report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "cmd_sequence", "plan_to_dict", "segments_png"]


def plan_to_dict(plan, reoptimised=None, options: dict | None = None) -> dict:
    """A :class:`~ids_engine.deliver.DeliverablePlan` as JSON-ready data (MU per fraction)."""
    beams = []
    for i, sb in enumerate(plan.beams):
        b = sb.beam
        re_sb = reoptimised.beams[i] if reoptimised is not None else None
        # Re-optimised segments keep their Aperture objects; pruned ones are absent (0 MU).
        re_mu = {id(s.aperture): s.mu for s in re_sb.segments} if re_sb is not None else {}
        segs = []
        for s in sb.segments:
            d = {"mu": round(s.mu, 4), "jaw_x_mm": list(s.aperture.jaw_x_mm), "jaw_y_mm": list(s.aperture.jaw_y_mm),
                 "leaf_x1_mm": [round(float(v), 3) for v in s.aperture.leaf_x1_mm],
                 "leaf_x2_mm": [round(float(v), 3) for v in s.aperture.leaf_x2_mm]}
            if re_sb is not None:
                d["mu_reoptimised"] = round(re_mu.get(id(s.aperture), 0.0), 4)
            segs.append(d)
        entry = {"name": b.name, "gantry_deg": b.gantry_deg, "collimator_deg": b.collimator_deg,
                 "couch_deg": b.couch_deg, "isocentre_mm_xyz": list(b.isocentre_mm_xyz), "energy_mv": b.energy_mv,
                 "mu": round(sb.mu, 3), "segments": segs}
        if re_sb is not None:
            entry["mu_reoptimised"] = round(re_sb.mu, 3)
        beams.append(entry)
    mlc = plan.beams[0].mlc if plan.beams else None
    return {
        "name": plan.name, "prescription_gy": plan.prescription_gy, "fractions": plan.fractions,
        "frame": "IEC 61217 beam limiting device (X_b: leaf motion, Y_b: across the pairs), isocentre plane, mm; "
                 "MU per fraction",
        "mlc": None if mlc is None else {
            "name": mlc.name, "leaf_boundaries_mm": [float(v) for v in mlc.leaf_boundaries_mm()],
            "min_gap_mm": mlc.min_gap_mm, "interdigitation": mlc.interdigitation, "transmission": mlc.transmission},
        "sequencing": dict(options or {}),
        "beams": beams,
    }


def segments_png(path, sequenced_beam, fluence_mu, deliverable_mu, *, fractions: int = 1,
                 reoptimised_beam=None, max_segments: int = 48) -> bool:
    """One beam's picture: the fluence (MU over the course), the deliverable fluence and each
    segment's aperture (open leaf pairs white, jaws as a dashed box) with its MU per fraction.
    Returns False when matplotlib is not installed."""
    from ids_engine.evaluation._report import _load_matplotlib

    mpl = _load_matplotlib()
    if mpl is None:
        return False
    Figure, Canvas = mpl
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Rectangle

    sb = sequenced_beam
    g = sb.beam.fluence_grid
    edges = sb.mlc.leaf_boundaries_mm()
    segs = sb.segments[:max_segments]
    # The view: the fluence's nonzero extent and every segment's jaws, plus a margin.
    rows, cols = np.nonzero(np.asarray(fluence_mu) > 0)
    u, v = g.u_mm(), g.v_mm()
    boxes = [(s.aperture.jaw_x_mm, s.aperture.jaw_y_mm) for s in segs]
    xs = [u[cols].min(), u[cols].max()] if cols.size else [u[0], u[-1]]
    ys = [v[rows].min(), v[rows].max()] if rows.size else [v[0], v[-1]]
    for jx, jy in boxes:
        xs += list(jx)
        ys += list(jy)
    x0, x1, y0, y1 = min(xs) - 10, max(xs) + 10, min(ys) - 10, max(ys) + 10
    n_panels = 2 + len(segs)
    ncol = min(6, n_panels)
    nrow = -(-n_panels // ncol)
    fig = Figure(figsize=(2.6 * ncol, 2.6 * nrow + 0.4))
    Canvas(fig)
    ext = (u[0] - g.pitch_mm / 2, u[-1] + g.pitch_mm / 2, v[0] - g.pitch_mm / 2, v[-1] + g.pitch_mm / 2)
    vmax = float(max(np.max(fluence_mu), np.max(deliverable_mu), 1e-9))
    for k, (img, title) in enumerate(((fluence_mu, "fluence (MU, course)"), (deliverable_mu, "deliverable (MU, course)"))):
        ax = fig.add_subplot(nrow, ncol, k + 1)
        ax.imshow(img, origin="lower", extent=ext, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
    for k, s in enumerate(segs):
        ax = fig.add_subplot(nrow, ncol, k + 3)
        ax.set_facecolor("0.25")
        ap = s.aperture
        polys = []
        for p in range(sb.mlc.n_pairs):
            a, b = max(ap.leaf_x1_mm[p], ap.jaw_x_mm[0]), min(ap.leaf_x2_mm[p], ap.jaw_x_mm[1])
            lo, hi = max(edges[p], ap.jaw_y_mm[0]), min(edges[p + 1], ap.jaw_y_mm[1])
            if b > a and hi > lo:
                polys.append([(a, lo), (b, lo), (b, hi), (a, hi)])
        ax.add_collection(PolyCollection(polys, facecolors="white", edgecolors="none"))
        ax.add_patch(Rectangle((ap.jaw_x_mm[0], ap.jaw_y_mm[0]), ap.jaw_x_mm[1] - ap.jaw_x_mm[0],
                               ap.jaw_y_mm[1] - ap.jaw_y_mm[0], fill=False, edgecolor="orange", linestyle="--", lw=0.8))
        mu = f"{s.mu:.1f} MU"
        if reoptimised_beam is not None:
            re_mu = {id(r.aperture): r.mu for r in reoptimised_beam.segments}
            mu += f" -> {re_mu[id(ap)]:.1f}" if id(ap) in re_mu else " -> removed"
        ax.set_title(f"segment {k + 1}: {mu}", fontsize=8)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    more = f" (first {max_segments} of {len(sb.segments)} segments)" if len(sb.segments) > max_segments else ""
    fig.suptitle(f"{sb.beam.name}: {len(sb.segments)} segments, {sb.mu:.1f} MU per fraction"
                 f" ({fractions} fraction(s)){more}; BEV X_b (mm) across, Y_b (mm) up", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    return True


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "beam"


def cmd_sequence(args: argparse.Namespace) -> int:
    from ids_engine._files import FolderLockedError, atomic_text
    from ids_engine._progress import TextProgressBar
    from ids_engine.deliver import SequencingError, check_deliverable, deliverable_fluences, sequence_plan
    from ids_engine.io import InputError
    from ids_engine.model import default_mlc
    from ids_engine.phantoms import PHANTOMS
    from ids_engine.scripting import ScriptError, _swap_in, check_out_folder
    from ids_engine.session import Session

    try:
        out = check_out_folder(args.out, force=args.force)
        source = args.source
        if source not in PHANTOMS and not Path(source).is_dir():
            raise ValueError(f"SOURCE {source}: not a session folder nor a built-in phantom ({', '.join(PHANTOMS)})")
        if source in PHANTOMS:
            session = Session.from_phantom(source, args.resolution, prescription_gy=args.prescription_gy,
                                           n_beams=args.beams, progress=TextProgressBar())
            label = f"{source} ({args.resolution}) open-field plan, {args.beams} beams"
        else:
            session = Session.load(source, keep_journaling=False, progress=TextProgressBar())
            label = f"session {source}"
    except (ScriptError, InputError, ValueError, FolderLockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = session.engine
        mlc = engine.machine.mlc or default_mlc()
        beams = [g.beam for g in engine.geometry]
        fluences = engine.fluences_host()
        opts = {"levels": args.levels, "min_mu": args.min_mu, "bixel_mm": args.bixel_mm, "pair_sampling": args.pair_sampling,
                "method": args.method if args.method != "auto" else ("engel" if mlc.interdigitation else "sweep")}
        t0 = time.perf_counter()
        try:
            plan = sequence_plan(beams, fluences, mlc, levels=args.levels, min_mu=args.min_mu, fractions=args.fractions,
                                 bixel_mm=args.bixel_mm, method=args.method, pair_sampling=args.pair_sampling,
                                 prescription_gy=session.prescription_gy,
                                 name=label)
        except SequencingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        t_seq = time.perf_counter() - t0
        print(f"{label}: {sum(len(b.segments) for b in plan.beams)} segments, {sum(b.mu for b in plan.beams):.1f} MU "
              f"per fraction over {len(plan.beams)} beams (sequenced in {t_seq:.2f} s, {opts['method']})")
        t0 = time.perf_counter()
        chk = check_deliverable(engine, plan, tongue_groove_mm=args.tongue_groove_mm, leaf_gap_mm=args.leaf_gap_mm,
                                reoptimise=not args.no_reoptimise,
                                min_mu=args.min_mu, prune_tolerance=None if args.keep_segments else 0.01,
                                gamma_points=args.gamma_points, options=opts,
                                progress=TextProgressBar())
        t_chk = time.perf_counter() - t0
        dest = out.parent / f"{out.name}.partial-{os.getpid()}" if (out.exists() and any(out.iterdir())) else out
        dest.mkdir(parents=True, exist_ok=True)
        atomic_text(dest / "segments.json", json.dumps(plan_to_dict(plan, chk.reoptimised, {
            **opts, "fractions": args.fractions, "tongue_groove_mm": args.tongue_groove_mm,
            "leaf_gap_mm": args.leaf_gap_mm}), indent=1))
        atomic_text(dest / "deliverable_report.md", chk.to_markdown(f"Deliverable dose check: {label}"))
        doc = {"source": label, "beams": chk.beam_rows(), "gamma": chk.gamma, "reoptimisation": chk.reoptimisation,
               "options": chk.options, "timings_s": {"sequencing": round(t_seq, 3), "check": round(t_chk, 3)},
               "max_dose_difference_gy": {k: float(np.abs(v - chk.reference_gy).max())
                                          for k, v in (("sequenced", chk.sequenced_gy), ("re-optimised", chk.reoptimised_gy))
                                          if v is not None}}
        atomic_text(dest / "deliverable.json", json.dumps(doc, indent=1))
        final = chk.reoptimised or plan
        delivered = deliverable_fluences(final, tongue_groove_mm=args.tongue_groove_mm, leaf_gap_mm=args.leaf_gap_mm)
        pngs = 0
        for i, sb in enumerate(plan.beams):
            pngs += segments_png(dest / f"segments_{i + 1:02d}_{_safe(sb.beam.name)}.png", sb, fluences[i], delivered[i],
                                 fractions=plan.fractions,
                                 reoptimised_beam=chk.reoptimised.beams[i] if chk.reoptimised else None)
        if dest != out:
            _swap_in(dest, out)
    finally:
        session.close()
    for stage, crit in chk.gamma.items():
        print(f"  {stage:<13} gamma pass " + ", ".join(f"{c} {s['pass_rate_pct']:.1f} %" for c, s in crit.items()))
    if chk.reoptimisation:
        r = chk.reoptimisation
        print(f"  segment MU re-optimised: RMS dose difference at {r['voxels']} voxels {r['rms_before_gy']:.3f} -> "
              f"{r['rms_after_gy']:.3f} Gy; {sum(len(b.segments) for b in chk.reoptimised.beams)} segments "
              f"({r['segments_removed']} removed), {sum(b.mu for b in chk.reoptimised.beams):.1f} MU per fraction")
    print(f"written to {out}: segments.json, deliverable_report.md, deliverable.json"
          + (f", {pngs} segment picture(s)" if pngs else " (no pictures: matplotlib is not installed)"))
    return 0


def add_parser(sub) -> None:
    from ids_engine.cli import _non_negative_float, _positive_float, _positive_int
    from ids_engine.phantoms import PHANTOMS

    s = sub.add_parser(
        "sequence", help="MLC leaf sequencing and the deliverable-dose check",
        description="Sequence a plan's fluence into step-and-shoot MLC segments (Engel 2005 where the MLC allows "
                    "interdigitation, a sweep with rod pushing where it does not), recompute the dose from the "
                    "segments (leaf transmission, tongue and groove), compare it with the fluence dose (gamma "
                    "3%%/3mm and 2%%/2mm, DVH metrics), re-optimise the segment MU, and write segments.json, one "
                    "picture per beam and deliverable_report.md.")
    s.add_argument("source", help=f"a saved session folder, or a built-in phantom ({', '.join(PHANTOMS)}) for its "
                                  "open-field plan")
    s.add_argument("--out", required=True, help="output folder; must not exist or be empty")
    s.add_argument("--force", action="store_true", help="replace an existing --out folder once the new one is complete")
    s.add_argument("--levels", type=_positive_int, default=10, help="intensity levels of each beam's maximum (default 10)")
    s.add_argument("--min-mu", type=_non_negative_float, default=1.0,
                   help="least MU per segment and fraction (default 1)")
    s.add_argument("--fractions", type=_positive_int, default=1, help="fractions; segment MU are per fraction (default 1)")
    s.add_argument("--bixel-mm", type=_positive_float, default=2.5,
                   help="leaf position resolution along the leaf motion, mm (default 2.5)")
    s.add_argument("--pair-sampling", choices=("mean", "centre"), default="mean",
                   help="a leaf pair's fluence: the mean over its width (default; modulated plans) or the value on its "
                        "centre line (open fields stay one segment; use with --bixel-mm 1)")
    s.add_argument("--method", choices=("auto", "engel", "sweep"), default="auto",
                   help="segmentation (default auto: engel, or sweep when the MLC forbids interdigitation)")
    s.add_argument("--tongue-groove-mm", type=_non_negative_float, default=0.5,
                   help="tongue-and-groove strip width along leaf-pair boundaries, mm (default 0.5; 0: none)")
    s.add_argument("--leaf-gap-mm", type=_non_negative_float, default=0.0,
                   help="rounded leaf ends as a dosimetric leaf gap, mm (default 0: not modelled; commissioned "
                        "values are typically 1-2)")
    s.add_argument("--no-reoptimise", action="store_true", help="skip the re-optimisation of the segment MU")
    s.add_argument("--keep-segments", action="store_true",
                   help="keep the segments the re-optimisation holds at the minimum MU (default: removed when the "
                        "fit loses at most 1 %%)")
    s.add_argument("--gamma-points", type=_positive_int, default=20000,
                   help="reference voxels evaluated per gamma (seeded subset; default 20000)")
    s.add_argument("--resolution", choices=("clinical", "coarse"), default="coarse",
                   help="a built-in phantom's grid (default coarse)")
    s.add_argument("--beams", type=_positive_int, default=9, help="a built-in phantom's open-field beams (default 9)")
    s.add_argument("--prescription-gy", type=_positive_float, default=60.0,
                   help="a built-in phantom's prescription (default 60 Gy)")
    s.set_defaults(func=cmd_sequence)
