"""``ids adapt`` end to end on the horseshoe: stage times and the qualification figures.

Set-up (not timed): an approved plan like ``ids plan horseshoe examples/adapt/horseshoe_protocol.toml``
(9 equispaced beams, prescription 60 Gy) with two shaping requests (an OAR spot lowered, the
coldest PTV voxel raised), saved as an ``ids plan --out`` folder. Timed: :func:`run_adaptation`
on a test case shifted and rotated (default ``shift_mm=5,-3,4;rotate_deg=0,0,3``: whole slices in z
on both grids, a half slice makes the coarse grid's DVH metrics jump), rigid
registration, re-optimisation always (so every stage runs), repeated ``--repeat`` times.

    python bench/bench_adapt.py --resolution coarse
    python bench/bench_adapt.py --resolution clinical --repeat 1

Writes ``bench/results/adapt-horseshoe-<resolution>-<backend>-<device>.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

PROTOCOL = Path(__file__).resolve().parents[1] / "examples" / "adapt" / "horseshoe_protocol.toml"


def make_approved(folder: Path, resolution: str, beams: int, **optimise) -> float:
    """An approved plan on the horseshoe (``beams`` equispaced beams optimised for PROTOCOL,
    ``optimise``: more :func:`optimise_plan` arguments) with two shaping requests, saved into
    ``folder`` as an ``ids plan --out`` folder (``session/`` + ``protocol.toml``); the seconds
    it took. The adaptive replanning tests use it too (tests/adapt/conftest.py)."""
    from ids_engine.dmr import EraseSpot, SetVoxelDose
    from ids_engine.optimise import read_protocol
    from ids_engine.planning import equispaced_beams, optimise_plan
    from ids_engine.session import Session, case_from_spec

    t0 = time.perf_counter()
    spec = {"phantom": "horseshoe", "resolution": resolution}
    p = case_from_spec(spec)
    s = Session(p, equispaced_beams(beams, p.targets[0].centroid_xyz()), prescription_gy=60.0, case=spec)
    plan = optimise_plan(s.engine, read_protocol(PROTOCOL).goals, **optimise)
    s.set_plan(plan.fluences)
    oar = p.structure("OAR").mask
    # The OAR's centre erased to 85 % of its hottest voxel there (whatever the optimiser left).
    centre = tuple(np.argwhere(oar).mean(axis=0))
    zyx = np.argwhere(oar)
    near = np.linalg.norm((zyx - np.asarray(centre)) * np.asarray(p.grid.spacing_mm_zyx), axis=1) <= 8.0
    hottest = float(s.dose()[tuple(zyx[near].T)].max()) if near.any() else float(s.dose()[oar].max())
    s.run(EraseSpot(centre, 8.0, 0.0, 0.85 * hottest, structure="OAR"))
    # The coldest PTV voxel up to 58 Gy (a request whose voxel the replay must move).
    ptv = p.structure("PTV").mask
    cold = np.argwhere(ptv)[np.argmin(s.dose()[ptv])]
    s.run(SetVoxelDose(tuple(int(v) for v in cold), 58.0))
    s.save(folder / "session")
    s.close()
    shutil.copy(PROTOCOL, folder / "protocol.toml")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", choices=["coarse", "clinical"], default="coarse")
    ap.add_argument("--case", default="shift_mm=5,-3,4;rotate_deg=0,0,3", help="test case keys after the phantom")
    ap.add_argument("--registration", default="rigid")
    ap.add_argument("--reoptimise", default="always", choices=["auto", "always", "never"])
    ap.add_argument("--rotate-beams", action="store_true")
    ap.add_argument("--beams", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from ids_engine import backend
    from ids_engine.adapt import AdaptOptions, load_approved_plan, run_adaptation

    work = Path(tempfile.mkdtemp(prefix="bench-adapt-"))
    try:
        setup_s = make_approved(work / "approved", args.resolution, args.beams)
        print(f"approved plan ({args.resolution}, {args.beams} beams) made in {setup_s:.1f} s (not timed)")
        spec = f"horseshoe:{args.resolution};{args.case}"
        options = AdaptOptions(reoptimise=args.reoptimise, rotate_beams=args.rotate_beams)
        runs = []
        for k in range(args.repeat):
            approved = load_approved_plan(work / "approved")  # outside the clock: the CLI's first step
            t0 = time.perf_counter()
            doc = run_adaptation(approved, spec, work / f"out{k}", registration=args.registration, options=options)
            wall = time.perf_counter() - t0
            runs.append((wall, doc))
            print(f"run {k + 1}: {wall:.1f} s, auto-qualified {doc['qualification']['auto_qualified_for_review']}")
        stage_names = [k for k in runs[0][1]["timings_s"] if k not in ("total", "load_approved")]
        stages = {}
        for name in stage_names + ["end_to_end"]:
            vals = np.array([(w if name == "end_to_end" else d["timings_s"].get(name, 0.0)) * 1000.0 for w, d in runs])
            stages[name] = {"median_ms": float(np.median(vals)), "p10_ms": float(np.percentile(vals, 10)),
                            "p90_ms": float(np.percentile(vals, 90)), "n": len(vals)}
        doc = runs[-1][1]
        ad = doc["comparison"]["adapted"]
        re_ = doc["comparison"]["recomputed"]
        quality = {
            "registration": doc["registration"],
            "registration_error_vs_truth_mm": doc["registration_error_vs_truth"],
            "reoptimised": doc["adaptation"]["reoptimised"],
            "optimiser_iterations": (doc["adaptation"]["optimiser"] or {}).get("iterations"),
            "replay": [{"kind": e["original"]["kind"], "replayed": e.get("replayed"), "note": e.get("note")}
                       for e in doc["adaptation"]["replay"]],
            "gamma_pass_pct": {"recomputed": {k: v["pass_rate_pct"] for k, v in re_["gamma"].items()},
                               "adapted": {k: v["pass_rate_pct"] for k, v in ad["gamma"].items()}},
            "ptv_D95_delta_pct_rx": {"recomputed": re_["structures"]["PTV"]["metrics"]["D95"]["delta_pct_rx"],
                                     "adapted": ad["structures"]["PTV"]["metrics"]["D95"]["delta_pct_rx"]},
            "oar_mean_delta_pct_rx": {"recomputed": re_["structures"]["OAR"]["metrics"]["mean"]["delta_pct_rx"],
                                      "adapted": ad["structures"]["OAR"]["metrics"]["mean"]["delta_pct_rx"]},
            "auto_qualified_for_review": doc["qualification"]["auto_qualified_for_review"],
            "reasons": doc["qualification"]["reasons"],
            "recomputed_reasons": doc["qualification"]["recomputed"]["reasons"],
        }
        case = {"phantom": "horseshoe", "resolution": args.resolution, "new_ct": spec, "beams": args.beams,
                "registration": args.registration, "reoptimise": args.reoptimise, "rotate_beams": args.rotate_beams,
                "grid": doc["new_ct"]["grid"], "cpu_threads": backend.backend_info().device}
        path = write_result("adapt", case, stages, quality=quality,
                            suffix=f"horseshoe-{args.resolution}" + ("-rotate-beams" if args.rotate_beams else ""))
        print(f"\nids adapt, horseshoe {args.resolution} ({doc['new_ct']['grid']}), {spec}, n={len(runs)}")
        print(f"{'stage':<22} {'median s':>9} {'p10':>7} {'p90':>7}")
        for name, st in stages.items():
            print(f"{name:<22} {st['median_ms'] / 1000:9.2f} {st['p10_ms'] / 1000:7.2f} {st['p90_ms'] / 1000:7.2f}")
        print(f"gamma 3%/3mm recomputed {quality['gamma_pass_pct']['recomputed']['3%/3mm']:.1f} %, adapted "
              f"{quality['gamma_pass_pct']['adapted']['3%/3mm']:.1f} %; PTV D95 delta (% Rx) recomputed "
              f"{quality['ptv_D95_delta_pct_rx']['recomputed']:+.2f}, adapted {quality['ptv_D95_delta_pct_rx']['adapted']:+.2f}")
        print(f"auto-qualified for review: {quality['auto_qualified_for_review']} {quality['reasons']}")
        print(f"written {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
