"""MLC leaf sequencing benchmark: segments, MU and the deliverable-dose gap, with timings.

Cases (coarse grids: horseshoe 43 x 57 x 81 voxels of 4 x 3.9 x 3.9 mm, TG-119 likewise coarse):

- ``horseshoe``: the IDS paper's open-field plan (9 equispaced beams conformed to the PTV + 8 mm,
  60 Gy median), sequenced with the pair fluence as the mean over each pair (2.5 mm bixels) and
  along the pair's centre line (1 mm bixels; an open field is then one segment);
- ``tg119``: an optimised TG-119 C-shape plan (``ids plan``'s optimiser on
  ``examples/protocols/tg119_harder.toml``, 9 beams, 50 Gy), sequenced at 5, 10 and 20 levels.

For each: segments per beam, MU per beam and the lower bound (the leaf matrix's complexity
times the level), gamma 3 %/3 mm and 2 %/2 mm (global, 10 % cutoff, 20000 seeded points) and
DVH metric deltas of the deliverable dose (transmission 1.5 %, tongue and groove 0.5 mm) against
the fluence dose, before and after re-optimising the segment MU (segments held at the 1 MU
minimum removed when the fit loses at most 1 %). Timed stages: sequencing
(all beams), deliverable dose (fluences + dose cube), segment influence + re-optimisation,
one gamma (3 %/3 mm, 20000 points).

Usage: ``python bench/bench_sequencing.py [--case horseshoe tg119] [--repeats 5]``; writes
``bench/results/sequencing-<case>-<backend>-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, time_stage, write_result  # noqa: E402

from ids_engine.deliver import (  # noqa: E402
    check_deliverable,
    complexity,
    deliverable_fluences,
    reoptimise_weights,
    sequence_fluence,
    sequence_plan,
)
from ids_engine.evaluation import gamma_index, grid_axes_mm  # noqa: E402
from ids_engine.model import default_mlc  # noqa: E402
from ids_engine.session import Session  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY_METRICS = {("PTV", "D95"), ("PTV", "D2"), ("PTV", "Dmean"), ("OAR", "Dmean"), ("OAR", "Dmax"),
               ("OuterTarget", "D95"), ("OuterTarget", "D10"), ("OuterTarget", "D98"), ("OuterTarget", "D2"),
               ("Core", "D10"), ("Core", "Dmax"), ("Core", "Dmean")}


def _session(case: str) -> tuple[Session, dict]:
    if case == "horseshoe":
        s = Session.from_phantom("horseshoe", "coarse", prescription_gy=60.0)
        return s, {"phantom": "horseshoe", "resolution": "coarse", "plan": "open fields, PTV + 8 mm", "beams": 9,
                   "prescription_gy": 60.0}
    from ids_engine.optimise import read_protocol
    from ids_engine.planning import equispaced_beams, optimise_plan
    from ids_engine.session import case_from_spec

    spec = {"phantom": "tg119", "resolution": "coarse"}
    p = case_from_spec(spec)
    s = Session(p, equispaced_beams(9, p.targets[0].centroid_xyz()), prescription_gy=50.0, case=spec)
    protocol = read_protocol(ROOT / "examples" / "protocols" / "tg119_harder.toml")
    t0 = time.perf_counter()
    plan = optimise_plan(s.engine, protocol.goals)
    s.set_plan(plan.fluences)
    return s, {"phantom": "tg119", "resolution": "coarse", "plan": "optimised, tg119_harder.toml", "beams": 9,
               "prescription_gy": 50.0, "optimisation_s": round(time.perf_counter() - t0, 1)}


def _variant(engine, fluences, settings: dict, label: str) -> dict:
    mlc = engine.machine.mlc or default_mlc()
    beams = [g.beam for g in engine.geometry]
    plan = sequence_plan(beams, fluences, mlc, prescription_gy=1.0, min_mu=1.0, **settings)
    bound = []
    for b, f in zip(beams, fluences):
        sf = sequence_fluence(f, b.fluence_grid, mlc, min_mu=1.0, **settings)
        bound.append(complexity(sf.levels) * sf.step_mu)
    chk = check_deliverable(engine, plan, gamma_points=20000, options={**settings, "min_mu": 1.0})
    rows = {}
    for stage, comp in chk.comparison.items():
        for s, m, u, a, b, d in comp.rows:
            if (s, m) in KEY_METRICS:
                rows.setdefault(f"{s} {m} ({u})", {"fluence": round(a, 3)})[stage] = round(b, 3)
    q = {
        "settings": settings,
        "segments_per_beam": [len(b.segments) for b in plan.beams],
        "mu_per_beam": [round(b.mu, 1) for b in plan.beams],
        "mu_lower_bound_per_beam": [round(v, 1) for v in bound],
        "mu_reoptimised_per_beam": [round(b.mu, 1) for b in chk.reoptimised.beams],
        "segments_reoptimised_per_beam": [len(b.segments) for b in chk.reoptimised.beams],
        "total_segments": sum(len(b.segments) for b in plan.beams),
        "total_mu": round(sum(b.mu for b in plan.beams), 1),
        "total_mu_reoptimised": round(sum(b.mu for b in chk.reoptimised.beams), 1),
        "total_segments_reoptimised": sum(len(b.segments) for b in chk.reoptimised.beams),
        "gamma": {st: {c: {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()} for c, s in cr.items()}
                  for st, cr in chk.gamma.items()},
        "max_dose_difference_gy": {"sequenced": round(float(np.abs(chk.sequenced_gy - chk.reference_gy).max()), 3),
                                   "reoptimised": round(float(np.abs(chk.reoptimised_gy - chk.reference_gy).max()), 3)},
        "reoptimisation_rms_gy": {"before": round(chk.reoptimisation["rms_before_gy"], 4),
                                  "after": round(chk.reoptimisation["rms_after_gy"], 4)},
        "dvh_metrics": rows,
    }
    g = q["gamma"]
    print(f"  {label:<22} segments {q['total_segments']:4d} -> {q['total_segments_reoptimised']:4d}  MU {q['total_mu']:8.1f} (bound {sum(bound):8.1f}) -> "
          f"{q['total_mu_reoptimised']:8.1f}  gamma 3/3 {g['sequenced']['3%/3mm']['pass_rate_pct']:5.1f} -> "
          f"{g['re-optimised']['3%/3mm']['pass_rate_pct']:5.1f} %, 2/2 {g['sequenced']['2%/2mm']['pass_rate_pct']:5.1f} -> "
          f"{g['re-optimised']['2%/2mm']['pass_rate_pct']:5.1f} %")
    return q, plan


def run(case: str, repeats: int) -> Path:
    t0 = time.perf_counter()
    session, info = _session(case)
    engine = session.engine
    fluences = engine.fluences_host()
    print(f"\n{case}: set-up {time.perf_counter() - t0:.1f} s; grid {engine.grid.shape_zyx} "
          f"({', '.join(f'{v:g}' for v in engine.grid.spacing_mm_zyx)} mm)")
    if case == "horseshoe":
        variants = {"mean-2.5mm-10levels": {"levels": 10, "bixel_mm": 2.5, "pair_sampling": "mean"},
                    "centre-1mm-10levels": {"levels": 10, "bixel_mm": 1.0, "pair_sampling": "centre"}}
    else:
        variants = {f"mean-2.5mm-{n}levels": {"levels": n, "bixel_mm": 2.5, "pair_sampling": "mean"} for n in (5, 10, 20)}
    quality, plans = {}, {}
    for label, settings in variants.items():
        quality[label], plans[label] = _variant(engine, fluences, settings, label)
    # Timings on the first variant.
    settings = next(iter(variants.values()))
    plan = plans[next(iter(variants))]
    mlc = engine.machine.mlc or default_mlc()
    beams = [g.beam for g in engine.geometry]
    ref = engine.dose_cube_host()
    stages = {"sequencing": time_stage(lambda: sequence_plan(beams, fluences, mlc, min_mu=1.0, **settings), n=repeats)}

    def deliverable_dose():
        engine.set_fluences(deliverable_fluences(plan))
        engine.dose_cube_host()

    stages["deliverable_dose"] = time_stage(deliverable_dose, n=max(2, repeats // 2))
    engine.set_fluences(fluences)
    stages["reoptimisation"] = time_stage(lambda: reoptimise_weights(engine, plan, ref), n=2, warmup=0)
    engine.set_fluences(deliverable_fluences(plan))
    seq = engine.dose_cube_host()
    engine.set_fluences(fluences)
    axes = grid_axes_mm(engine.grid)
    body = engine.patient.body_mask()
    r, e = np.where(body, ref, 0.0), np.where(body, seq, 0.0)
    stages["gamma_3mm_20k_points"] = time_stage(
        lambda: gamma_index(axes, r, axes, e, dose_percent=3, dta_mm=3, cutoff_percent=10, max_gamma=2.0,
                            max_points=20000), n=max(2, repeats // 2))
    session.close()
    print_table(f"sequencing benchmark, {case} (coarse)", stages)
    case_doc = {**info, "grid_shape_zyx": list(engine.grid.shape_zyx), "spacing_mm": list(engine.grid.spacing_mm_zyx),
                "body_voxels": int(body.sum()), "mlc": mlc.name, "transmission": mlc.transmission,
                "tongue_groove_mm": 0.5, "min_mu": 1.0, "fractions": 1}
    return write_result("sequencing", case_doc, stages, quality=quality, suffix=case)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", nargs="+", choices=("horseshoe", "tg119"), default=["horseshoe", "tg119"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    for c in args.case:
        print(f"written {run(c, args.repeats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
