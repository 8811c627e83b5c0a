"""Plan store benchmark: what the store adds to a planner's work.

Horseshoe phantom (coarse by default), 9 equispaced open fields, a session with 5 shaping
requests saved as a folder. Stages:

* ``import_session``: copy the folder into the store, fsync, rename, index its requests in
  one transaction (a new plan name each time).
* ``append_request`` / ``append_request_plain``: a pin request (no DMR work: the time is the
  journal's) on a session journaling into the store (request file + journal line fsync'ed,
  then the index transaction with the fluence and dose hashes) and on the same session
  journaling to a plain folder; the difference is the store's index.
* ``open_plan_write`` / ``open_plan_read``: reopen a stored plan (replay of its 5 requests,
  hash check), for writing (lock, index catch-up) and read-only.
* ``list_plans``: list a store of 200 plans.
* ``check``: the integrity check of that store (every indexed file hashed).

Usage: ``python bench/bench_store.py [--resolution clinical] [--repeats 7]``.
Writes ``bench/results/store-<backend>-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, time_stage, write_result  # noqa: E402

from ids_engine.dmr import Pin, SetVoxelDose  # noqa: E402
from ids_engine.session import Session  # noqa: E402
from ids_engine.store import PlanStore  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="coarse", choices=("coarse", "clinical"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--plans", type=int, default=200, help="plans in the store for list_plans and check")
    args = ap.parse_args(argv)
    n = args.repeats
    tmp = Path(tempfile.mkdtemp(prefix="ids-bench-store-"))
    s = Session.from_phantom("horseshoe", args.resolution, prescription_gy=60.0)
    target = s.patient.targets[0].mask
    import numpy as np

    vox = np.argwhere(target)
    mid = vox[vox[:, 0] == int(np.median(vox[:, 0]))]
    for k in range(5):
        s.run(SetVoxelDose(tuple(int(v) for v in mid[(k * 53) % len(mid)]), (0.92 + 0.02 * k) * 60.0),
              recovery_steps=3)
    src = tmp / "session"
    s.save(src)
    s.close()
    st = PlanStore.open(tmp / "store", user="bench")
    pk = st.add_patient(s.patient, patient_id="BENCH-1")
    stages = {}

    count = iter(range(10**6))
    stages["import_session"] = time_stage(
        lambda: st.import_session(src, patient_key=pk, plan_name=f"imported {next(count)}"), n=n)

    ref = st.import_session(src, patient_key=pk, plan_name="shaped")
    live = st.load_session(ref)
    centre = tuple(int(v) for v in mid[0])
    pins = iter(range(10**6))
    stages["append_request"] = time_stage(lambda: live.run(Pin(f"p{next(pins)}", centre, 2.0)), n=n)
    live.close()
    plain = Session.load(src)  # journals to the plain folder
    stages["append_request_plain"] = time_stage(lambda: plain.run(Pin(f"q{next(pins)}", centre, 2.0)), n=n)
    plain.close()

    stages["open_plan_write"] = time_stage(lambda: st.load_session(ref).close(), n=n)
    stages["open_plan_read"] = time_stage(lambda: st.load_session(ref, write=False), n=n)

    while len(st.list_plans()) < args.plans:
        st.copy_plan(ref, f"copy {len(st.list_plans())}")
    stages["list_plans"] = time_stage(lambda: st.list_plans(), n=n)
    stages["check"] = time_stage(lambda: st.check(), n=max(3, n // 2))
    st.close()

    title = f"plan store, horseshoe {args.resolution}, 9 beams, 5 requests per plan, {args.plans} plans listed"
    print_table(title, stages)
    overhead = stages["append_request"]["median_ms"] - stages["append_request_plain"]["median_ms"]
    print(f"\nthe store's index adds {overhead:.1f} ms to a journaled request")
    g = s.patient.grid
    path = write_result("store", {"phantom": "horseshoe", "resolution": args.resolution,
                                  "grid_shape_zyx": list(g.shape_zyx), "beams": 9, "requests_per_plan": 5,
                                  "plans_listed": args.plans},
                        stages, quality={"index_overhead_ms": round(overhead, 2)})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
