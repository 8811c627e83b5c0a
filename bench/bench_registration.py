"""Registration benchmark: speed and accuracy against known transforms (seed 003, claims 3-6, 9-12).

Cases, made with ``ids_engine.registration.make_variant`` from the horseshoe phantom
(clinical: 161 x 113 x 85 voxels of 1.952 x 1.952 x 2 mm; ``--resolution coarse`` for a
quick run):

- ``moved``: shifted by (3, -2, 1.5) mm and rotated by (1, -2, 4) degrees about x, y, z;
- ``deformed``: shifted by (2, 1, 0) mm, rotated 2 degrees about z, OAR grown and target
  shrunk by 4 mm (smooth known displacement field);
- ``limited FOV``: ``moved`` seen only in a 150 x 150 x 90 mm box around the target.

Timed stages (set-up outside the timed part; median of ``--repeats`` after one warm-up):
``rigid`` (register_rigid on ``moved``), ``rigid_limited_fov``, ``deformable`` (the demons
stage of register_deformable on ``deformed`` after a given rigid start, inverse field
included), ``fiducial`` (4 markers), ``warp_ct`` (the planning CT onto the new grid through
the deformable registration), ``transfer_structures`` (3 structures, deformable).

Quality against the truth: translation error (mm, the mapping error at the target's
centroid, and the worst over the target), rotation error (degrees), Dice of the
transferred PTV / OAR before (rigid only) and after the deformable stage, mean and
maximum point error over target and OAR, fiducial residuals with 0.5 mm marker noise.

Usage: ``python bench/bench_registration.py [--resolution clinical|coarse] [--repeats 3]``;
writes ``bench/results/registration-horseshoe[-coarse]-numpy-cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, time_stage, write_result  # noqa: E402

from ids_engine.phantoms import horseshoe  # noqa: E402
from ids_engine.registration import (  # noqa: E402
    make_variant,
    register_deformable,
    register_fiducials,
    register_rigid,
    transfer_structures,
)
from ids_engine.registration._registration import rotation_angle_deg  # noqa: E402


def dice(a, b) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def rigid_accuracy(reg, truth, planning) -> dict:
    """Errors of the rigid part against the truth's rigid part, at the target."""
    target = planning.structure("PTV")
    pts = planning.grid.index_to_world(np.argwhere(target.mask))
    true_rigid = pts @ truth.rotation.T + truth.translation_mm_xyz
    err = np.linalg.norm(reg.map_points_xyz(pts) - true_rigid, axis=1)
    c = target.centroid_xyz()
    c_err = np.linalg.norm(reg.map_points_xyz(c) - (truth.rotation @ c + truth.translation_mm_xyz))
    return {"translation_error_mm": round(float(c_err), 4), "max_error_over_target_mm": round(float(err.max()), 4),
            "rotation_error_deg": round(rotation_angle_deg(reg.rotation @ truth.rotation.T), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", choices=("clinical", "coarse"), default="clinical")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    n = max(1, args.repeats)

    hs = horseshoe(args.resolution)
    moved = make_variant(hs, shift_mm_xyz=(3.0, -2.0, 1.5), rotation_deg_xyz=(1.0, -2.0, 4.0), seed=3)
    fov = make_variant(hs, shift_mm_xyz=(3.0, -2.0, 1.5), rotation_deg_xyz=(1.0, -2.0, 4.0), seed=3,
                       fov_mm=(150.0, 150.0, 90.0))
    deformed = make_variant(hs, shift_mm_xyz=(2.0, 1.0, 0.0), rotation_deg_xyz=(0.0, 0.0, 2.0),
                            oar_grow_mm=4.0, target_shrink_mm=4.0, seed=5)

    stages = {}
    out: dict = {}
    stages["rigid"] = time_stage(lambda: out.__setitem__("rigid", register_rigid(moved.planning, moved.patient)), n=n)
    stages["rigid_limited_fov"] = time_stage(
        lambda: out.__setitem__("fov", register_rigid(fov.planning, fov.patient)), n=n)
    rigid_d = register_rigid(deformed.planning, deformed.patient)
    stages["deformable"] = time_stage(
        lambda: out.__setitem__("def", register_deformable(deformed.planning, deformed.patient, initial=rigid_d)), n=n)
    rng = np.random.default_rng(7)
    noisy = {k: tuple(np.asarray(p) + rng.normal(0.0, 0.5, 3)) for k, p in moved.fiducials_new_xyz.items()}
    stages["fiducial"] = time_stage(lambda: out.__setitem__("fid", register_fiducials(
        moved.fiducials_planning_xyz, noisy, planning_grid=moved.planning.grid, new_grid=moved.patient.grid)), n=max(n, 7))
    deform = out["def"]
    stages["warp_ct"] = time_stage(lambda: deform.warp_to_new(deformed.planning.ct_hu, fill=-1000.0), n=n)
    bare = deformed.patient.without_structures(*deformed.patient.structure_names)
    stages["transfer_structures"] = time_stage(lambda: transfer_structures(deformed.planning, bare, deform), n=n)

    quality: dict = {"rigid": rigid_accuracy(out["rigid"], moved.truth, moved.planning),
                     "rigid_limited_fov": rigid_accuracy(out["fov"], fov.truth, fov.planning),
                     "deformed_case_rigid_stage": rigid_accuracy(rigid_d, deformed.truth, deformed.planning)}
    dices = {}
    for name in ("PTV", "OAR"):
        truth = deformed.patient.structure(name).mask
        plan = deformed.planning.structure(name).mask
        dices[name] = {"none": round(dice(plan, truth), 4),
                       "rigid": round(dice(rigid_d.warp_mask_to_new(plan), truth), 4),
                       "deformable": round(dice(deform.warp_mask_to_new(plan), truth), 4)}
    quality["dice_deformed_case"] = dices
    near = deformed.planning.structure("PTV").mask | deformed.planning.structure("OAR").mask
    pts = deformed.planning.grid.index_to_world(np.argwhere(near))
    true_pts = deformed.truth.map_points_xyz(pts)
    for key, reg in (("rigid", rigid_d), ("deformable", deform)):
        err = np.linalg.norm(reg.map_points_xyz(pts) - true_pts, axis=1)
        quality[f"point_error_{key}_mm"] = {"mean": round(float(err.mean()), 4), "max": round(float(err.max()), 4)}
    back = deform.map_points_to_planning_xyz(deform.map_points_xyz(pts))
    quality["deformable_round_trip_max_mm"] = round(float(np.linalg.norm(back - pts, axis=1).max()), 4)
    quality["deformable_inverse_residual_max_mm"] = round(deform.metrics["inverse_residual_max_mm"], 5)
    fid = out["fid"]
    quality["fiducial_noise_0.5mm"] = {
        "rms_residual_mm": round(fid.metrics["rms_residual_mm"], 4),
        **{k: v for k, v in rigid_accuracy(fid, moved.truth, moved.planning).items()}}

    g = hs.grid
    case = {"phantom": "horseshoe", "resolution": args.resolution, "grid_shape_zyx": list(g.shape_zyx),
            "spacing_mm": list(g.spacing_mm_zyx), "voxels": g.size,
            "moved": moved.spec["shift_mm_xyz"] and {"shift_mm_xyz": moved.spec["shift_mm_xyz"],
                                                      "rotation_deg_xyz": moved.spec["rotation_deg_xyz"]},
            "deformed": {"oar_grow_mm": 4.0, "target_shrink_mm": 4.0, "shift_mm_xyz": [2.0, 1.0, 0.0],
                         "rotation_deg_xyz": [0.0, 0.0, 2.0]},
            "limited_fov_mm": [150.0, 150.0, 90.0],
            "rigid": "SimpleITK Euler3D, Mattes MI, 3 levels, 30000 samples/level",
            "deformable": "SimpleITK fast symmetric forces demons, 3 levels, field smoothing 1 voxel"}
    print_table(f"Registration, horseshoe {args.resolution} ({g.describe()})", stages)
    print("\nquality against the known transforms:")
    for k, v in quality.items():
        print(f"  {k}: {v}")
    suffix = "horseshoe" if args.resolution == "clinical" else "horseshoe-coarse"
    path = write_result("registration", case, stages, quality=quality, suffix=suffix)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
