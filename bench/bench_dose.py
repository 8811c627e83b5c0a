"""Dose engine benchmark: geometry cache, full dose, patch convolution, incremental update,
point doses, influence matrix and its tail offset, on the horseshoe (clinical grid, 9 beams) and TG-119 phantoms.

Usage: ``python bench/bench_dose.py [--phantom horseshoe tg119] [--resolution clinical] [--repeats 7]``
Prints a table beside the IDS paper's Table 1 and writes ``bench/results/dose-<phantom>-<backend>-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, time_stage, write_result  # noqa: E402

from ids_engine import backend  # noqa: E402
from ids_engine.dose import DoseEngine, FluencePatch, influence_matrix  # noqa: E402
from ids_engine.kernels.pencil import convolve_full  # noqa: E402
from ids_engine.model import Grid  # noqa: E402
from ids_engine.phantoms import PHANTOMS  # noqa: E402
from ids_engine.planning import conformal_aperture, equispaced_beams  # noqa: E402

PAPER_MS = {"convolution": 10.0, "incremental_update": 60.0}
CP_CELLS = 5  # control point = 5 x 5 fluence amplitudes (the paper)
PATCH_CPS = 5  # the benchmark patch: 5 x 5 control points in every beam


def bench_phantom(name: str, resolution: str, repeats: int) -> dict:
    patient = PHANTOMS[name](resolution=resolution)
    target = patient.targets[0]
    beams = equispaced_beams(9, target.centroid_xyz())
    stages = {}
    # Geometry cache (the thing measured): fewer repeats, it is the slow one.
    holder = {}

    def build():
        holder["engine"] = DoseEngine(patient, beams)

    stages["geometry_cache"] = time_stage(build, n=max(2, repeats // 3), warmup=0)
    eng = holder["engine"]
    maps = [conformal_aperture(g.beam, patient, target, 8.0).astype(np.float32) for g in eng.geometry]
    eng.set_fluences(maps)
    stages["full_dose"] = time_stage(eng.recompute, n=repeats)
    stages["dose_cube"] = time_stage(eng.dose_cube, n=repeats)

    # A patch of 5 x 5 control points (25 x 25 amplitudes) centred on the target in every beam.
    xp = eng.xp
    side = PATCH_CPS * CP_CELLS
    rng = np.random.default_rng(0)
    patches_pos, patches_neg = [], []
    for b in range(eng.n_beams):
        rows, cols = np.nonzero(maps[b])
        r0 = int(np.median(rows)) - side // 2
        c0 = int(np.median(cols)) - side // 2
        delta = (0.05 * rng.random((side, side))).astype(np.float32)
        patches_pos.append(FluencePatch(b, r0, c0, delta))
        patches_neg.append(FluencePatch(b, r0, c0, -delta))
    dev_patches = [xp.asarray(p.delta) for p in patches_pos]

    def convolution():
        for b, g in enumerate(eng.geometry):
            for lvl in (g.fine, g.coarse):
                for i in range(len(lvl.components)):
                    convolve_full(dev_patches[b], lvl.kernels[i])

    stages["convolution"] = time_stage(convolution, n=repeats)
    flip = {"sign": 1}

    def incremental():
        eng.apply_patches(patches_pos if flip["sign"] > 0 else patches_neg)
        flip["sign"] *= -1

    stages["incremental_update"] = time_stage(incremental, n=max(repeats, 11) | 1)
    body_pts = eng.grid.index_to_world(np.stack(np.unravel_index(rng.choice(eng.body_index, 30, replace=False), eng.grid.shape_zyx), axis=-1))
    vox30 = xp.asarray(rng.choice(eng.body_index, 30, replace=False))
    stages["dose_at_30_voxels"] = time_stage(lambda: eng.dose_at_voxels(vox30), n=repeats)
    stages["dose_at_30_points"] = time_stage(lambda: eng.dose_at_points(body_pts), n=repeats)

    # Influence matrix on a 3 mm grid over target and OARs (plus 10 mm), 4 mm beamlets.
    g3 = _grid_3mm(eng.grid)
    mask = _structures_on(patient, g3, margin_mm=10.0)
    info = {}

    # Beamlets over the target's aperture (what an optimiser uses), 4 x 4 amplitudes each.
    bc = eng.geometry[0].coarse_fluence_factor
    bmasks = []
    for b in range(eng.n_beams):
        ap = maps[b] > 0
        nbr, nbc = -(-ap.shape[0] // bc), -(-ap.shape[1] // bc)
        pad = np.zeros((nbr * bc, nbc * bc), bool)
        pad[: ap.shape[0], : ap.shape[1]] = ap
        bmasks.append(pad.reshape(nbr, bc, nbc, bc).any(axis=(1, 3)))

    def build_dij():
        info["dij"] = influence_matrix(eng, g3, mask, beamlet_masks=bmasks, cutoff_mm=50.0)

    stages["influence_matrix"] = time_stage(build_dij, n=max(1, repeats // 7), warmup=0)
    dij = info["dij"]
    w = np.ones(dij.shape[1], np.float32)
    stages["influence_tail_offset"] = time_stage(lambda: dij.tail_offset(eng, w), n=3)
    # Quality: incremental == full, and the matrix vs the engine's dose cube at its rows (the
    # nearest CT voxels), without and with the tail offset of the 50 mm cutoff: taken at the
    # same weights, and stale (taken at w, used at the next round's weights w2).
    eng.apply_patches(patches_pos)
    inc = backend.asnumpy(eng.dose_cube())
    eng.recompute()
    full = backend.asnumpy(eng.dose_cube())
    ref = backend.asnumpy(dij.engine_dose(eng, w))
    got = backend.asnumpy(dij.dose(backend.to_device(w)))
    off = dij.tail_offset(eng, w)
    with_off = backend.asnumpy(dij.dose(backend.to_device(w), off))
    w2 = (w * rng.uniform(0.8, 1.2, w.size)).astype(np.float32)
    ref2 = backend.asnumpy(dij.engine_dose(eng, w2))
    stale = backend.asnumpy(dij.dose(backend.to_device(w2), off))

    def rel(a, r):
        scale = max(float(r.max()), 1e-12)
        return float(np.abs(a - r).max() / scale), float(np.abs(a - r).mean() / scale)

    quality = {
        "incremental_vs_full_max_abs_gy_per_max": float(np.abs(inc - full).max() / max(np.abs(full).max(), 1e-12)),
        "influence_nnz": int(dij.matrix.nnz),
        "influence_shape": list(dij.shape),
    }
    for label, (a, r) in {"50mm_cutoff": (got, ref), "50mm_cutoff_tail_offset": (with_off, ref),
                          "50mm_cutoff_stale_tail_offset": (stale, ref2)}.items():
        mx, mean = rel(a, r)
        quality[f"influence_vs_engine_max_rel_err_{label}"] = mx
        quality[f"influence_vs_engine_mean_rel_err_{label}"] = mean
    case = {"phantom": name, "resolution": resolution, **{k: v for k, v in eng.describe().items() if k != "backend"},
            "patch": f"{PATCH_CPS}x{PATCH_CPS} control points ({side}x{side} amplitudes) in each of 9 beams",
            "influence_grid_shape_zyx": list(g3.shape_zyx), "beamlet_mm": 4.0}
    path = write_result(f"dose-{name}", case, stages,
                        reference={"source": "IDS paper Table 1", "stages_ms": PAPER_MS}, quality=quality)
    print_table(f"dose engine, {name} ({resolution}), {eng.describe()['body_voxels']} body voxels, 9 beams, "
                f"{backend.backend_info().name} on {backend.backend_info().device}", stages, PAPER_MS)
    for k, v in quality.items():
        print(f"  {k}: {v}")
    print(f"  -> {path}")
    return stages


def _grid_3mm(grid: Grid) -> Grid:
    ext = grid.extent_mm_xyz()
    shape = tuple(int(np.floor((hi - lo) / 3.0)) + 1 for lo, hi in (ext[2], ext[1], ext[0]))
    return Grid(shape, (3.0, 3.0, 3.0), (ext[0][0], ext[1][0], ext[2][0]))


def _structures_on(patient, g3: Grid, margin_mm: float) -> np.ndarray:
    from scipy import ndimage

    m = np.zeros(patient.grid.shape_zyx, bool)
    for s in patient.targets + patient.oars:
        m |= s.mask
    m = ndimage.distance_transform_edt(~m, sampling=patient.grid.spacing_mm_zyx) <= margin_mm
    m &= patient.body_mask()
    pts = g3.voxel_centres_xyz().reshape(-1, 3)
    idx = np.rint(patient.grid.world_to_index(pts)).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(patient.grid.shape_zyx)), axis=1)
    out = np.zeros(g3.size, bool)
    out[ok] = m[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return out.reshape(g3.shape_zyx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantom", nargs="+", default=["horseshoe", "tg119"], choices=sorted(PHANTOMS))
    ap.add_argument("--resolution", default="clinical", choices=["clinical", "coarse"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    for name in args.phantom:
        bench_phantom(name, args.resolution, args.repeats)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
