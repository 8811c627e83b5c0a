"""``ids conform``: the seed's "Make Conformed Beams" on a case, with the dose of the beams.

    ids conform CASE --target PTV --avoid Core:3 --arc-start 0 --arc-length 360 \\
        --increment 40 --leaf-mode centre --out DIR

writes to DIR:

* ``beams.json`` - the settings and, per beam, its angles, isocentre, MLC leaves and jaws,
  projected and aperture areas, and the monitor units used for the dose;
* ``apertures.png`` - each beam's BEV (isocentre plane, beam limiting device frame): the
  target's projection with its margin, the subtracted volumes' projections, the piece the
  beam conforms to, the leaves and the jaws (left out, with a note, without matplotlib);
* ``dose_summary.json`` and ``dose_summary.md`` - DVH metrics of every structure for equal
  monitor units per beam scaled so that the target's median dose is the prescription (the
  auto-weight tools set per-beam MU; this is only a first look at the dose).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "cmd_conform", "parse_avoid", "write_apertures_png"]


def parse_avoid(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:MARGIN_MM`` (the margin a number >= 0; a name may itself hold colons)."""
    name, sep, tail = text.rpartition(":")
    if sep:
        try:
            margin = float(tail)
        except ValueError:
            return text, 0.0
        if not np.isfinite(margin) or margin < 0:
            raise argparse.ArgumentTypeError(f"--avoid {text}: the margin must be a number >= 0 mm")
        if not name:
            raise argparse.ArgumentTypeError(f"--avoid {text}: no structure name before ':'")
        return name, margin
    return text, 0.0


def _number(positive: bool, upper: float | None = None):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not np.isfinite(v) or v < 0 or (positive and v == 0) or (upper is not None and v > upper):
            rule = "a positive number" if positive else "a number >= 0"
            raise argparse.ArgumentTypeError(f"must be {rule}{f' up to {upper:g}' if upper else ''}, got {text}")
        return v
    return parse


def _angle(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an angle in degrees, got {text!r}") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite angle, got {text}")
    return v


def _xyz(text: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be x,y,z in mm, got {text!r}") from None
    if len(v) != 3 or not all(np.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be three numbers x,y,z in mm, got {text!r}")
    return v


def add_parser(sub) -> None:
    s = sub.add_parser(
        "conform", help="static MLC beams on an arc conformed to a target's projection (Make Conformed Beams)",
        description="Generate static beams on an arc whose MLC apertures conform to the projection of the target "
                    "grown by a 3-D margin, minus the projections of other volumes each grown by its own margin "
                    "(a target split into pieces gives one beam per piece), then compute their dose. Writes "
                    "beams.json, apertures.png and dose_summary.{json,md} to --out.")
    s.add_argument("case", help="a built-in phantom (e.g. tg119, horseshoe), a DICOM folder or a matRad .mat file")
    s.add_argument("--target", required=True, help="the target structure's name")
    s.add_argument("--target-margin", type=_number(False), default=0.0, metavar="MM",
                   help="3-D margin of the target volume, mm (default 0)")
    s.add_argument("--avoid", type=parse_avoid, action="append", default=[], metavar="NAME[:MM]",
                   help="a volume whose projection is subtracted, with its own 3-D margin (repeat for several)")
    s.add_argument("--arc-start", type=_angle, default=0.0, metavar="DEG", help="gantry angle of the first beam")
    s.add_argument("--arc-length", type=_number(False, 360.0), default=360.0, metavar="DEG",
                   help="arc length, 0-360 degrees (default 360; 0 and 360 are not duplicated)")
    s.add_argument("--direction", choices=["CW", "CC"], default="CW",
                   help="CW: gantry angle increasing (IEC, clockwise seen from the foot of the couch); CC: decreasing")
    s.add_argument("--increment", type=_number(True), default=40.0, metavar="DEG",
                   help="degrees between beams along the arc (default 40)")
    s.add_argument("--leaf-mode", choices=["centre", "outside", "inside"], default="centre",
                   help="centre: leaf centre touches the projection; outside: whole leaf outside (covers); "
                        "inside: whole leaf inside")
    s.add_argument("--couch", type=_angle, default=0.0, metavar="DEG", help="couch angle of every beam (default 0)")
    s.add_argument("--collimator", type=_angle, default=0.0, metavar="DEG",
                   help="collimator angle of every beam (ignored with --optimise-collimator)")
    s.add_argument("--optimise-collimator", action="store_true",
                   help="try collimator angles 0, inc, 2 inc, ... below 180 and keep the one whose aperture differs "
                        "least from the projection (area of the symmetric difference)")
    s.add_argument("--collimator-increment", type=_number(True), default=5.0, metavar="DEG",
                   help="step of the collimator search (default 5)")
    s.add_argument("--min-area-cm2", type=_number(False), default=0.0, metavar="CM2",
                   help="no beam for a projected piece smaller than this at the isocentre plane (default 0)")
    s.add_argument("--isocentre", type=_xyz, metavar="X,Y,Z",
                   help="isocentre, DICOM patient mm (default: the target's centroid)")
    s.add_argument("--prescription-gy", type=_number(True), default=60.0,
                   help="target median dose for the dose summary (default 60 Gy)")
    s.add_argument("--resolution", choices=["clinical", "coarse"], default="clinical", help="built-in phantoms' grid")
    s.add_argument("--out", required=True, help="output folder; must not exist or be empty")
    s.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    s.set_defaults(func=cmd_conform)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.absolute().parent} does not exist")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out}: the folder exists and is not empty; choose another or pass --force")


def write_apertures_png(path, conformed, *, title: str = "") -> Path | None:
    """One panel per conformed beam (BEV at the isocentre plane, beam limiting device frame,
    mm): the target's projection with margin (light), the subtracted volumes' projections
    (blue), the piece the beam conforms to (red), leaves (grey) and jaws (black). Returns
    the path, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        return None
    n = len(conformed)
    cols = min(n, 4) or 1
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3.2 * cols, 3.3 * rows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, cb in enumerate(conformed):
        ax = fig.add_subplot(rows, cols, i + 1)
        t = cb.target_projection
        layers = [(t, (1.0, 0.8, 0.8, 1.0)), (cb.avoid_projection, (0.4, 0.6, 1.0, 0.8)), (cb.projection, (0.9, 0.2, 0.2, 0.8))]
        for proj, colour in layers:
            if proj.mask.any():
                ax.imshow(np.where(proj.mask, 1.0, np.nan), origin="lower", extent=proj.extent_mm(),
                          cmap=ListedColormap([colour]), interpolation="nearest", vmin=0, vmax=1)
        u0, u1, v0, v1 = t.extent_mm()
        pad = 10.0
        ulo, uhi, vlo, vhi = u0 - pad, u1 + pad, v0 - pad, v1 + pad
        edges = cb.mlc.leaf_boundaries_mm()
        ap = cb.aperture
        for k in range(cb.mlc.n_pairs):
            lo, hi = edges[k], edges[k + 1]
            if hi < vlo or lo > vhi:
                continue
            x1, x2 = ap.leaf_x1_mm[k], ap.leaf_x2_mm[k]
            ax.add_patch(Rectangle((ulo, lo), max(x1 - ulo, 0), hi - lo, facecolor="0.55", alpha=0.35,
                                   edgecolor="0.3", linewidth=0.3))
            ax.add_patch(Rectangle((x2, lo), max(uhi - x2, 0), hi - lo, facecolor="0.55", alpha=0.35,
                                   edgecolor="0.3", linewidth=0.3))
        jx, jy = ap.jaw_x_mm, ap.jaw_y_mm
        ax.add_patch(Rectangle((jx[0], jy[0]), jx[1] - jx[0], jy[1] - jy[0], fill=False, edgecolor="k", linewidth=1.0))
        ax.set_xlim(ulo, uhi)
        ax.set_ylim(vlo, vhi)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        b = cb.beam
        ax.set_title(f"{b.name}: G{b.gantry_deg:g} C{b.collimator_deg:g}\n{cb.area_mm2 / 100:.1f} cm2 projected, "
                     f"{cb.aperture_area_mm2 / 100:.1f} cm2 open", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("Y_b (mm)", fontsize=7)
        if i >= n - cols:
            ax.set_xlabel("X_b (mm, leaves move along it)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()) if title else None)
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _summary_md(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# ids conform: {doc['case']}", "",
             f"Target {s['target']} + {s['target_margin_mm']:g} mm; subtracted: "
             + (", ".join(f"{a['name']} + {a['margin_mm']:g} mm" for a in s["avoid"]) or "none")
             + f"; arc start {s['arc_start_deg']:g}, {s['direction']}, length {s['arc_length_deg']:g}, increment "
             f"{s['increment_deg']:g} deg; leaf mode {s['leaf_mode']}; MLC {s['mlc']}.", "",
             f"Dose: {doc['dose']['mu_per_beam']:.1f} MU per beam (equal), the target's median dose scaled to "
             f"{doc['dose']['prescription_gy']:g} Gy.", "",
             "## Beams", "", "| beam | gantry | collimator | couch | projected cm2 | aperture cm2 | piece |",
             "|---|---|---|---|---|---|---|"]
    for b in doc["beams"]:
        lines.append(f"| {b['name']} | {b['gantry_deg']:g} | {b['collimator_deg']:g} | {b['couch_deg']:g} | "
                     f"{b['projected_area_mm2'] / 100:.1f} | {b['aperture_area_mm2'] / 100:.1f} | "
                     f"{b['piece']}/{b['pieces']} |")
    lines += ["", "## Dose", "", "| structure | mean Gy | D98 Gy | D95 Gy | D50 Gy | D2 Gy | max Gy | V95 % |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in doc["dose"]["structures"].items():
        lines.append(f"| {name} | {m['mean_gy']:.2f} | {m['D98_gy']:.2f} | {m['D95_gy']:.2f} | {m['D50_gy']:.2f} | "
                     f"{m['D2_gy']:.2f} | {m['max_gy']:.2f} | {m.get('V95_pct', 0):.1f} |")
    return "\n".join(lines) + "\n"


def cmd_conform(args: argparse.Namespace) -> int:
    from ids_engine import __version__
    from ids_engine._files import atomic_text
    from ids_engine._progress import TextProgressBar
    from ids_engine.cli import _backend_line, _case_spec, _print_table
    from ids_engine.dose import DoseEngine
    from ids_engine.evaluation import dvh_metrics
    from ids_engine.io import InputError
    from ids_engine.model import default_6mv
    from ids_engine.planning._conformal import conformed_fluences, make_conformed_beams
    from ids_engine.session import case_from_spec, case_label

    out = Path(args.out)
    try:
        _check_out(out, args.force)
        spec = _case_spec(args.case, args.resolution)
        label = case_label(spec)
        patient = case_from_spec(spec)
        names = [args.target] + [a for a, _ in args.avoid]
        missing = [n for n in names if n not in patient.structure_names]
        if missing:
            raise ValueError(f"case ({label}) has no structure {', '.join(missing)} "
                             f"(structures: {', '.join(patient.structure_names)})")
        machine = default_6mv()
        t0 = time.perf_counter()
        conformed = make_conformed_beams(
            patient, args.target, target_margin_mm=args.target_margin, avoid=list(args.avoid),
            start_deg=args.arc_start, length_deg=args.arc_length, increment_deg=args.increment,
            direction=args.direction, isocentre_mm_xyz=args.isocentre, couch_deg=args.couch,
            collimator_deg=args.collimator, leaf_mode=args.leaf_mode, optimise_collimator=args.optimise_collimator,
            collimator_increment_deg=args.collimator_increment, min_area_mm2=100.0 * args.min_area_cm2,
            machine=machine)
        t_conform = time.perf_counter() - t0
    except (InputError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"ids-engine {__version__} | {_backend_line()}")
    print(f"case: {label}; {len(conformed)} conformed beam(s) in {t_conform:.2f} s")
    if not conformed:
        print("error: no beam made (every projected piece is empty or below --min-area-cm2)", file=sys.stderr)
        return 1
    engine = DoseEngine(patient, [cb.beam for cb in conformed], machine, progress=TextProgressBar())
    fluences = conformed_fluences(conformed, engine.beams)
    engine.set_fluences(fluences)
    dose = engine.dose_cube_host()
    target = patient.structure(args.target)
    median = float(np.median(dose[target.mask]))
    if median <= 0:
        print("error: the target receives no dose", file=sys.stderr)
        return 1
    mu = args.prescription_gy / median
    dose = dose * mu
    metrics = {s.name: dvh_metrics(dose, s.mask, args.prescription_gy) for s in patient.structures if not s.is_empty}
    settings = {
        "target": args.target, "target_margin_mm": args.target_margin,
        "avoid": [{"name": a, "margin_mm": m} for a, m in args.avoid],
        "arc_start_deg": args.arc_start, "arc_length_deg": args.arc_length, "direction": args.direction,
        "increment_deg": args.increment, "leaf_mode": args.leaf_mode, "couch_deg": args.couch,
        "collimator_deg": None if args.optimise_collimator else args.collimator,
        "optimise_collimator": args.optimise_collimator,
        "collimator_increment_deg": args.collimator_increment if args.optimise_collimator else None,
        "min_area_cm2": args.min_area_cm2, "mlc": conformed[0].mlc.name, "machine": machine.name,
    }
    beams = [{**cb.to_dict(), "mu": round(mu, 3)} for cb in conformed]
    doc = {"case": label, "settings": settings, "beams": beams,
           "dose": {"prescription_gy": args.prescription_gy, "mu_per_beam": mu, "normalisation": "target median",
                    "structures": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in metrics.items()}}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_text(out / "beams.json", json.dumps({k: doc[k] for k in ("case", "settings", "beams")}, indent=1))
    atomic_text(out / "dose_summary.json", json.dumps({"case": label, **doc["dose"]}, indent=1))
    atomic_text(out / "dose_summary.md", _summary_md(doc))
    png = write_apertures_png(out / "apertures.png", conformed, title=f"{label}: {args.target} ({args.leaf_mode})")
    _print_table([{"name": b["name"], "g": b["gantry_deg"], "c": b["collimator_deg"],
                   "area": b["projected_area_mm2"] / 100, "open": b["aperture_area_mm2"] / 100} for b in beams],
                 [("name", "beam", "s"), ("g", "gantry", "g"), ("c", "collimator", "g"),
                  ("area", "projected cm2", ".1f"), ("open", "aperture cm2", ".1f")])
    print()
    _print_table([{"name": k, **v} for k, v in metrics.items()],
                 [("name", "structure", "s"), ("mean_gy", "mean Gy", ".2f"), ("D95_gy", "D95 Gy", ".2f"),
                  ("D2_gy", "D2 Gy", ".2f"), ("max_gy", "max Gy", ".2f")])
    written = "beams.json, dose_summary.json, dose_summary.md" + (", apertures.png" if png else
                                                                    " (apertures.png left out: matplotlib is not installed)")
    print(f"\n{mu:.1f} MU per beam; written to {out}: {written}")
    return 0
