"""DMR benchmark: the IDS paper's experiment (section 3.1) with per-stage latency.

Horseshoe phantom, 9 equispaced beams, an open-field plan that fills the target; the voxel at
the anterior rim of the OAR is set to 55 % of the prescription, then 25 recovery steps. The
request is repeated (undone in between) for median and spread.

Usage: ``python bench/bench_dmr.py [--resolution clinical] [--repeats 5]`` (needs matplotlib for the PNG).
Writes ``bench/results/dmr-horseshoe-<backend>-<device>.json`` and ``.png``.

Stage names follow the paper's Table 1: ``select_location`` (per recovery step: dose at the
candidates, deviation, choice), ``create_patch`` (per DMR step, all 9 beams: Algorithm 1
lines 3-9, scaling, clipping), ``convolution`` (per step: the patch's dose at the voxel,
convolving the patches without touching the cube), ``update_dose_cube`` (per step: the
incremental update of all 9 beams, which convolves again and updates only the voxels under
the patches), ``create_tpi_map`` (both tissues, all beams,
once per geometry), ``distance_grid`` (once per request; only where the recovery reports it:
the band-based recovery orders by violation and computes no distance transform, so the
stage is left out), ``whole_request``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, device_slug, print_table, time_stage, write_result  # noqa: E402

from ids_engine import backend  # noqa: E402
from ids_engine.dmr import SetVoxelDose, tpi_maps  # noqa: E402
from ids_engine.evaluation import dvh_metrics  # noqa: E402
from ids_engine.session import Session  # noqa: E402

PAPER_MS = {"select_location": 40.0, "create_patch": 1.0, "convolution": 10.0, "update_dose_cube": 60.0,
            "create_tpi_map": 45.0, "distance_grid": 89.0, "whole_request": 5000.0}
RX = 60.0


def oar_rim_voxel(s: Session) -> tuple[int, int, int]:
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    return (int(c[0]), j, int(c[2]))


def stats(values_ms) -> dict:
    t = np.asarray(values_ms, float)
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "n": int(t.size)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="clinical", choices=["clinical", "coarse"])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one untimed warm-up (at least 1)")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    t0 = time.perf_counter()
    s = Session.from_phantom("horseshoe", args.resolution, prescription_gy=RX)
    setup_s = time.perf_counter() - t0
    ptv = s.patient.structure("PTV").mask
    oar = s.patient.structure("OAR").mask
    m = oar_rim_voxel(s)
    stages = {"create_tpi_map": time_stage(lambda: (tpi_maps(s.engine, s.target_mask), tpi_maps(s.engine, s.oar_mask)), n=5)}

    dose_before = s.dose()
    runs = []
    per = {k: [] for k in ("select_location", "create_patch", "convolution", "update_dose_cube", "distance_grid", "whole_request")}
    mod = s.modifier
    # The whole request is timed with no synchronisation inside (as a user runs it): one
    # untimed warm-up (first CUDA calls compile), then ``--repeats`` timed runs. The stage
    # split comes from separate runs with the GPU synchronised at each stage boundary
    # (``Modifier.profile``), which costs a little, so those runs are not the whole-request figure.
    for i in range(args.repeats + 1):
        mod.profile = False
        backend.synchronize()
        t1 = time.perf_counter()
        res = s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=args.steps)
        backend.synchronize()
        if i > 0:
            per["whole_request"].append((time.perf_counter() - t1) * 1000)
        s.undo()
    for i in range(args.repeats):
        for k in mod.timings_ms:
            mod.timings_ms[k] = 0.0
        mod.profile = True
        res = s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=args.steps)
        mod.profile = False
        n_patches = res.recovery_steps + 1  # DMR steps: one modification plus the recovery steps
        if "recovery_distance_grid" in res.timings_ms:
            per["distance_grid"].append(res.timings_ms["recovery_distance_grid"])
        per["select_location"].append(res.timings_ms.get("recovery_select_location", 0.0) / max(res.recovery_steps, 1))
        per["create_patch"].append(mod.timings_ms["create_patch"] / n_patches)
        per["convolution"].append(mod.timings_ms["convolution"] / n_patches)
        per["update_dose_cube"].append(mod.timings_ms["update_dose_cube"] / n_patches)
        runs.append(res)
        if i < args.repeats - 1:
            s.undo()
    for k, v in per.items():
        if v:  # a stage the request did not report is left out, not shown as 0 ms
            stages[k] = stats(v)
    res = runs[-1]
    dose_after = s.dose()
    # The dose after modification alone, for the picture: redo the request without recovery.
    s.undo()
    s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=0)
    dose_mod = s.dose()
    s.undo()

    before = dvh_metrics(dose_before, ptv, RX)
    after = dvh_metrics(dose_after, ptv, RX)
    quality = {
        "voxel_zyx": list(m), "requested_gy": 0.55 * RX, "voxel_before_gy": float(dose_before[m]),
        "voxel_after_modification_gy": float(dose_mod[m]), "voxel_after_recovery_gy": float(dose_after[m]),
        "voxel_error_pct_of_request": float(100 * abs(dose_after[m] - 0.55 * RX) / (0.55 * RX)),
        "target_V95_before_pct": before["V95_pct"], "target_V95_after_modification_pct": dvh_metrics(dose_mod, ptv, RX)["V95_pct"],
        "target_V95_after_pct": after["V95_pct"], "target_min_after_pct": 100 * after["min_gy"] / RX,
        "oar_mean_before_gy": float(dose_before[oar].mean()), "oar_mean_after_gy": float(dose_after[oar].mean()),
        "recovery_steps": res.recovery_steps, "remaining_candidates": res.remaining_candidates,
        "setup_s": round(setup_s, 2),
    }
    case = {"phantom": "horseshoe", "resolution": args.resolution, **{k: v for k, v in s.engine.describe().items() if k != "backend"},
            "prescription_gy": RX, "request": "voxel at the anterior OAR rim to 55 %", "recovery_steps": args.steps}
    path = write_result("dmr-horseshoe", case, stages, reference={"source": "IDS paper Table 1 and section 3.1", "stages_ms": PAPER_MS},
                        quality=quality)
    info = backend.backend_info()
    print_table(f"DMR, horseshoe ({args.resolution}), 9 beams, {info.name} on {info.device}", stages, PAPER_MS)
    for k, v in quality.items():
        print(f"  {k}: {v}")
    png = _picture(s, m, dose_before, dose_mod, dose_after)
    bars = _stage_plot(stages)
    print(f"  -> {path}\n  -> {png}\n  -> {bars}")
    return 0


def _stage_plot(stages: dict) -> Path | None:
    """Bars of our per-stage medians beside the paper's Table 1 (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [k for k in PAPER_MS if k in stages and stages[k]["median_ms"] > 0]
    ours = [stages[k]["median_ms"] for k in names]
    paper = [PAPER_MS[k] for k in names]
    y = np.arange(len(names))
    info = backend.backend_info()
    fig, ax = plt.subplots(figsize=(8, 4.6), constrained_layout=True)
    ax.barh(y - 0.2, paper, height=0.4, color="tab:gray", label="IDS paper, Table 1 (CPU, 2016)")
    ax.barh(y + 0.2, ours, height=0.4, color="tab:blue", label=f"ids-engine, {info.name} on {info.device}")
    for yi, (o, pp) in enumerate(zip(ours, paper)):
        ax.text(max(o, pp) * 1.15, yi, f"{pp / o:.1f}x", va="center", fontsize=8)
    ax.set_yticks(y, [n.replace("_", " ") for n in names])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(ours + paper) * 4)
    ax.set_xlabel("milliseconds (median; per DMR step where the paper's column is per step)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    ax.set_title("DMR latency, horseshoe phantom, 9 beams")
    out = RESULTS / f"dmr-horseshoe-stages-{info.name}-{device_slug(info.device if info.name == 'cupy' else 'cpu')}.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _picture(s: Session, m, before, modified, after) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no PNG; pip install 'ids-engine[bench]')")
        return None
    k = m[0]
    g = s.patient.grid
    x = g.axis_mm("x")
    y = g.axis_mm("y")
    ext = (x[0], x[-1], y[-1], y[0])
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), constrained_layout=True)
    titles = ("before the request", "after modification (no recovery)", f"after {s.options.recovery_steps} recovery steps")
    for ax, d, title in zip(axes, (before, modified, after), titles):
        ax.imshow(s.patient.ct_hu[k], cmap="gray", vmin=-200, vmax=200, extent=ext)
        for st, col in ((s.patient.structure("PTV"), "tab:red"), (s.patient.structure("OAR"), "tab:cyan")):
            ax.contour(x, y, st.mask[k].astype(float), levels=[0.5], colors=[col], linewidths=1.0)
        cs = ax.contour(x, y, d[k] / RX * 100, levels=[55, 95, 107], colors=["tab:blue", "tab:green", "tab:orange"], linewidths=1.4)
        ax.clabel(cs, fmt="%d%%", fontsize=8)
        xm, ym, _ = g.index_to_world(m)
        ax.plot([xm], [ym], marker="o", mfc="white", mec="black", ms=6)
        ax.set_title(f"{title}\nvoxel m: {d[m]:.1f} Gy ({100 * d[m] / RX:.0f} %)")
        ax.set_xlim(-90, 90)
        ax.set_ylim(70, -90)
        ax.set_xlabel("x (mm)")
    axes[0].set_ylabel("y (mm, anterior up)")
    fig.suptitle("Horseshoe phantom, 9 beams: voxel m at the OAR rim set to 55 %; isodoses 55 / 95 / 107 % of 60 Gy")
    info = backend.backend_info()
    out = RESULTS / f"dmr-horseshoe-{info.name}-{device_slug(info.device if info.name == 'cupy' else 'cpu')}.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":
    sys.exit(main())
