"""Inverse planning with goals on the whole body: exact rows against sampled rows.

The horseshoe phantom (9 equispaced beams, 60 Gy) with ``examples/protocols/horseshoe_body.toml``
(the horseshoe protocol plus a body maximum and a body mean): :func:`optimise_plan` with every
body voxel a row (``row_sampling=None``) and with sampled, weighted rows (:class:`RowSampling`:
the default and variants). Each configuration runs in its own process, so that its peak
resident memory (``ru_maxrss``) is its own; set-up (phantom, engine) is not timed. Plan
quality is the protocol's goals evaluated on the engine's full dose cube (every voxel of each
structure), and, for the body, the maximum over the rows against the maximum over every voxel.

    python bench/bench_optimise_rows.py                          # clinical: exact once + sampled
    python bench/bench_optimise_rows.py --resolution coarse --max-rows 30000
    python bench/bench_optimise_rows.py --configs sampled,sampled-5mm   # skip the exact run
    git archive 870a573 | (mkdir -p /tmp/before && tar -x -C /tmp/before)  # the code before
    python bench/bench_optimise_rows.py --configs before,exact,sampled --before-src /tmp/before

Writes ``bench/results/optimise-rows-horseshoe-<resolution>-<backend>-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402

PROTOCOL = Path(__file__).resolve().parents[1] / "examples" / "protocols" / "horseshoe_body.toml"

# name -> RowSampling arguments (None: exact rows); max_rows None takes --max-rows.
CONFIGS = {
    "before": None,  # the code before sampled rows (--before-src), its default: exact rows
    "exact": None,
    "sampled": {},
    "sampled-no-hot": {"hot_rounds": 0},
    "sampled-5mm": {"dense_margin_mm": 5.0},
    "sampled-300k": {"max_rows": 300_000},
}


def run_one(name: str, resolution: str, max_rows: int | None) -> dict:
    """One configuration, in this process: timings, rows, quality, peak RSS."""
    import numpy as np

    from ids_engine.optimise import evaluate_goals, read_protocol
    from ids_engine.phantoms import horseshoe
    from ids_engine.planning import equispaced_beams, optimise_plan
    from ids_engine.session import Session

    p = horseshoe(resolution)
    s = Session(p, equispaced_beams(9, p.targets[0].centroid_xyz()), prescription_gy=60.0)
    eng = s.engine
    goals = read_protocol(PROTOCOL).goals
    args = CONFIGS[name]
    sampling = None
    kwargs = {} if name == "before" else {"row_sampling": None}
    if args is not None:
        from ids_engine.optimise import RowSampling

        args = dict(args)
        if max_rows is not None and "max_rows" not in args:
            args["max_rows"] = max_rows
        sampling = RowSampling(**args)
        kwargs = {"row_sampling": sampling}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    plan = optimise_plan(eng, goals, **kwargs)
    total_s = time.perf_counter() - t0
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    eng.set_fluences(plan.fluences)
    dose = np.asarray(eng.dose_cube_host(), np.float64).ravel()
    vox = {n: np.flatnonzero((p.structure(n).mask & eng.body_mask).ravel()) for n in p.structure_names}
    full = evaluate_goals(dose, goals, vox)
    body = dose[vox["BODY"]]
    on_rows = float(dose[plan.influence.ct_voxels].max())
    out = {
        "name": name,
        "row_sampling": None if sampling is None else {"max_rows": sampling.max_rows,
                                                       "dense_margin_mm": sampling.dense_margin_mm,
                                                       "hot_rounds": sampling.hot_rounds,
                                                       "hot_margin_gy": sampling.hot_margin_gy},
        "rows": int(plan.influence.shape[0]),
        "beamlets": int(plan.influence.shape[1]),
        "rows_summary": plan.rows_summary() if hasattr(plan, "rows_summary") else {"mode": "exact (before)"},
        "timings_s": {k: round(v, 3) for k, v in plan.timings_s.items()} | {"total": round(total_s, 3)},
        "iterations": plan.iterations,
        "peak_rss_mb": round(rss_peak, 1),
        "rss_before_optimise_mb": round(rss_before, 1),
        "goals_full_dose": [{"goal": r.goal.name or r.goal.label, "achieved": round(r.achieved, 4), "limit": r.limit,
                             "unit": r.unit, "met": r.met} for r in full],
        "all_met": all(r.met for r in full),
        "objective_full_dose": float(sum(r.value for r in full)),
        "body_max_gy": {"all_voxels": round(float(body.max()), 4), "on_rows": round(on_rows, 4)},
        "body_mean_gy": round(float(body.mean()), 4),
        "tail_error_pct": plan.tail_error_pct,
        "case": {"grid_shape_zyx": list(p.grid.shape_zyx), "spacing_mm": [round(v, 3) for v in p.grid.spacing_mm_zyx],
                 "body_voxels": int(vox["BODY"].size)},
    }
    s.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="clinical", choices=("clinical", "coarse"))
    ap.add_argument("--configs", default="sampled,sampled-no-hot,sampled-5mm,sampled-300k,exact",
                    help=f"comma-separated, of {', '.join(CONFIGS)}; each runs once, in its own process")
    ap.add_argument("--max-rows", type=int, default=None, help="RowSampling.max_rows (default: its default)")
    ap.add_argument("--before-src", default=None,
                    help="for the 'before' config: a source tree of the code before sampled rows "
                         "(e.g. git archive 870a573 | tar -x -C /tmp/before), put first on PYTHONPATH")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: one config, JSON on stdout
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.resolution, args.max_rows)))
        return 0
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        print(f"error: --configs: unknown {', '.join(bad)} (known: {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--resolution", args.resolution]
        if args.max_rows is not None:
            cmd += ["--max-rows", str(args.max_rows)]
        env = None
        if name == "before":
            if not args.before_src:
                print("error: the 'before' config needs --before-src", file=sys.stderr)
                return 2
            env = {**os.environ, "PYTHONPATH": str(Path(args.before_src).resolve())}
        print(f"running {name} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"  {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[-1][7:])
        results[name] = r
        t = r["timings_s"]
        print(f"  {name}: {r['rows']} rows, {t['total']:.1f} s (matrix {t['influence_matrix']:.1f} s, optimise "
              f"{t['optimise']:.1f} s, hot rows {t.get('hot_rows', 0.0):.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"body max {r['body_max_gy']['all_voxels']:.2f} Gy (rows {r['body_max_gy']['on_rows']:.2f}), "
              f"mean {r['body_mean_gy']:.2f} Gy; all goals met: {r['all_met']}", flush=True)
    if not results:
        return 1
    print(f"\n{'config':<16} {'rows':>9} {'total s':>8} {'peak MB':>8} {'body max':>9} {'on rows':>8} "
          f"{'body mean':>9} {'met':>4}")
    for name, r in results.items():
        print(f"{name:<16} {r['rows']:>9} {r['timings_s']['total']:>8.1f} {r['peak_rss_mb']:>8.0f} "
              f"{r['body_max_gy']['all_voxels']:>9.2f} {r['body_max_gy']['on_rows']:>8.2f} {r['body_mean_gy']:>9.2f} "
              f"{str(r['all_met']):>4}")
    stages = {}
    for name, r in results.items():
        for k, v in r["timings_s"].items():
            stages[f"{name}:{k}"] = {"median_ms": v * 1000.0, "p10_ms": v * 1000.0, "p90_ms": v * 1000.0, "n": 1}
    reference = {}
    base = "before" if "before" in results else "exact" if "exact" in results else None
    if base is not None:
        ex = results[base]
        reference = {"source": f"{base} ({'the code before sampled rows' if base == 'before' else 'row_sampling=None'}"
                               f", exact rows), same script run, same machine",
                     "stages_ms": {f"{n}:total": ex["timings_s"]["total"] * 1000.0 for n in results if n != base}}
        for n, r in results.items():
            if n != base:
                print(f"{n}: {ex['timings_s']['total'] / r['timings_s']['total']:.2f}x faster, "
                      f"{ex['peak_rss_mb'] / r['peak_rss_mb']:.2f}x less peak memory than {base}")
    any_r = next(iter(results.values()))
    case = {"phantom": "horseshoe", "resolution": args.resolution, "beams": 9, "protocol": PROTOCOL.name,
            **any_r["case"], "beamlets": any_r["beamlets"]}
    quality = {n: {k: r[k] for k in ("rows", "peak_rss_mb", "iterations", "all_met", "objective_full_dose",
                                     "body_max_gy", "body_mean_gy", "tail_error_pct", "goals_full_dose",
                                     "row_sampling", "rows_summary")} for n, r in results.items()}
    quality["note"] = ("one run per configuration (n=1; the exact run takes minutes), each in its own process "
                       "(peak_rss_mb its own ru_maxrss); 2-core machine shared with other jobs: compare ratios")
    path = write_result(f"optimise-rows-horseshoe-{args.resolution}", case, stages, reference, quality)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
