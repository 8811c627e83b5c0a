"""Device-cost benchmark: kernel launches, device syncs and transfers per stage, counted without a GPU.

Runs the engine on the device-cost counting backend (``IDS_BACKEND=devicecost``: NumPy
underneath, CuPy's semantics on top, see ``ids_engine/_devicecost.py``) and reports, per
stage, what CuPy would launch, synchronise and copy, beside the budgets of issue 10. The
counts are deterministic: the same on every machine.

Stages (clinical horseshoe by default, 9 beams, the IDS paper's experiment):

* ``incremental_update``: one 25 x 25 fluence patch in each of the 9 beams (``apply_patches``);
* ``dmr_step``: one recovery step, the difference between a request with 25 recovery steps
  and the same request with none, divided by 25;
* ``whole_request``: SetVoxelDose of the OAR rim voxel to 55 % + 25 recovery steps;
* ``dose_readout``: the dose at 1,000 voxels (``dose_at_voxels``), read by the host;
* ``preview_snapshot``: what the viewer's worker copies to the host for one preview
  (the displayed slices and the DVH curves' numbers);
* ``full_dose``: a full recomputation (``set_fluences``), for scale.

Usage: ``python bench/bench_device_cost.py [--resolution coarse]``. Writes
``bench/results/device-cost-horseshoe-devicecost-cpu.json``; ``--top N`` lists the N call
sites with most launches per stage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ["IDS_BACKEND"] = "devicecost"

from _common import write_result  # noqa: E402

from ids_engine import backend  # noqa: E402
from ids_engine._devicecost import counting  # noqa: E402
from ids_engine.dmr import SetVoxelDose  # noqa: E402
from ids_engine.dose import FluencePatch  # noqa: E402
from ids_engine.session import Session  # noqa: E402

RX = 60.0
# Issue 10's budgets: (launches, syncs) per stage; None where the issue sets none.
BUDGETS = {"incremental_update": (20, 0), "dmr_step": (60, 2), "whole_request": (None, None),
           "dose_readout": (None, 1), "preview_snapshot": (None, None), "full_dose": (None, None)}


def oar_rim_voxel(s: Session) -> tuple[int, int, int]:
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    return (int(c[0]), j, int(c[2]))


def measure(resolution: str) -> tuple[dict, dict, Session]:
    backend.reset_backend()
    s = Session.from_phantom("horseshoe", resolution, prescription_gy=RX)
    eng = s.engine
    m = oar_rim_voxel(s)
    ledgers = {}
    patches = [FluencePatch(b, g.fluence_grid.shape_vu[0] // 2 - 12, g.fluence_grid.shape_vu[1] // 2 - 12,
                            np.full((25, 25), 0.01, np.float32)) for b, g in enumerate(eng.geometry)]
    with counting() as c:
        eng.apply_patches(patches)
    ledgers["incremental_update"] = c
    eng.apply_patches([FluencePatch(p.beam, p.row0, p.col0, -p.delta) for p in patches])

    with counting() as c0:
        s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=0)
    s.undo()
    with counting() as c25:
        res = s.run(SetVoxelDose(m, 0.55 * RX), recovery_steps=25)
    steps = max(res.recovery_steps, 1)
    ledgers["whole_request"] = c25
    s.undo()

    rng = np.random.default_rng(1)
    vox = rng.choice(eng.body_index, 1000, replace=False)
    with counting() as c:
        backend.asnumpy(eng.dose_at_voxels(vox))
    ledgers["dose_readout"] = c

    with counting() as c:
        snapshot_readout(s)
    ledgers["preview_snapshot"] = c

    fl = eng.fluences_host()
    with counting() as c:
        eng.set_fluences(fl)
    ledgers["full_dose"] = c

    rows = {}
    for name, led in ledgers.items():
        rows[name] = led.summary()
    step = {k: round((c25.summary()[k] - c0.summary()[k]) / steps, 1) for k in c25.summary()}
    rows = {"incremental_update": rows["incremental_update"], "dmr_step": step, **{k: v for k, v in rows.items() if k != "incremental_update"}}
    rows["whole_request"]["recovery_steps"] = int(res.recovery_steps)
    return rows, ledgers, s


def snapshot_readout(s: Session) -> None:
    """What a viewer preview reads from the engine (the worker's snapshot)."""
    reader = getattr(s, "display_readout", None)
    if reader is not None:
        g = s.patient.grid
        reader(tuple(n // 2 for n in g.shape_zyx))
    else:  # the whole cube, as the worker did before display read-outs existed
        s.dose()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="clinical", choices=["clinical", "coarse"])
    ap.add_argument("--top", type=int, default=0, help="list the N call sites with the most launches per stage")
    args = ap.parse_args(argv)
    rows, ledgers, s = measure(args.resolution)
    print(f"\nDevice cost per stage (horseshoe {args.resolution}, {s.engine.n_beams} beams; counted, no GPU)")
    print(f"{'stage':<20} {'launches':>9} {'budget':>7} {'syncs':>6} {'budget':>7} {'H2D':>6} {'D2H':>6} {'D2H bytes':>11}")
    print("-" * 80)
    for name, r in rows.items():
        bl, bs = BUDGETS.get(name, (None, None))
        print(f"{name:<20} {r['launches']:>9g} {('<=' + str(bl)) if bl is not None else '':>7} {r['syncs']:>6g} "
              f"{('<=' + str(bs)) if bs is not None else '':>7} {r['h2d']:>6g} {r['d2h']:>6g} {r['d2h_bytes']:>11g}")
    if args.top:
        for name, led in ledgers.items():
            print(f"\n{name}: top call sites by launches")
            for site, n in led.top("launches", args.top):
                print(f"  {n:>7}  {site}")
    case = {"phantom": "horseshoe", "resolution": args.resolution, **{k: v for k, v in s.engine.describe().items()
                                                                    if k in ("grid_shape_zyx", "beams", "body_voxels")}}
    stages = {name: {**r, "budget_launches": BUDGETS[name][0], "budget_syncs": BUDGETS[name][1]} for name, r in rows.items()}
    # Counts, not times: the BENCH.md "stages" carry counts here (median_ms is not meaningful).
    path = write_result("device-cost", case, stages, reference={"source": "issue 10 budgets"},
                        suffix=f"horseshoe{'' if args.resolution == 'clinical' else '-' + args.resolution}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
