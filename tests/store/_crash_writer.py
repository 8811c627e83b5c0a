"""A store writer for the kill -9 test, run as ``python tests/store/_crash_writer.py STORE SRC``.

It builds a small session once (with two requests, saved to SRC as an importable session
folder), then on each ``go SEED`` line of stdin forks a writer child (cheap: the session is
already built) and prints ``child PID``; on ``reap`` it waits for the killed child and
prints ``reaped``. The child writes to the store until it is killed, printing ``start OP
ARGS`` before and ``done OP ARGS`` after each operation: a new plan from the session
(journaling into the store), requests and undos on it, copies, imports, approvals of copies,
evidence, deletions of copies.
"""

from __future__ import annotations

import os
import sys


def _say(line: str) -> None:
    """One line in one write (atomic on a pipe: parent and child share stdout)."""
    os.write(1, (line + "\n").encode())


def main(store_path: str, src: str) -> None:
    import numpy as np

    import ids_engine.dose._engine as engine_module
    from ids_engine.dmr import RequestError, SetVoxelDose
    from ids_engine.store import PlanStore
    from tests.store.conftest import RX, small_session, target_voxel

    base = small_session(n_beams=1)  # one beam: a replay is quick to build
    # (1.04, not 0.9: with one beam a target voxel cannot fall 10 % below its neighbours along the
    # beam's axis, and such a request is refused up front)
    base.run(SetVoxelDose(target_voxel(base, 0), 1.04 * RX), recovery_steps=2)
    base.run(SetVoxelDose(target_voxel(base, 1), 0.95 * RX), recovery_steps=2)
    base.save(src)
    base.close()
    with PlanStore.open(store_path, user="crash-writer") as st:
        pk = st.add_patient(base.patient, patient_id="CRASH-0001", name="Crash^Test")
    _say("ready")

    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "go":
            seed = int(cmd[1])
            pid = os.fork()
            if pid == 0:
                engine_module._POOL = None  # the parent's worker threads do not exist in the child
                try:
                    _child(store_path, src, pk, base, seed, np, RequestError, SetVoxelDose, target_voxel, RX)
                finally:
                    os._exit(0)
            _say(f"child {pid}")
        elif cmd[0] == "reap":
            os.waitpid(int(cmd[1]), 0)
            _say("reaped")
        elif cmd[0] == "quit":
            return


def _child(store_path, src, pk, s, seed, np, RequestError, SetVoxelDose, target_voxel, RX) -> None:
    from ids_engine.store import PlanStore

    rng = np.random.default_rng(seed)

    def say(*words) -> None:
        _say(" ".join(str(w) for w in words))

    st = PlanStore.open(store_path, user="crash-writer")
    name = f"t{seed}"
    say("start", "save", name)
    st.save_session(s, patient_key=pk, plan_name=name, attach=True)
    lines = 2
    say("done", "save", name, lines)
    copies, k = [], 0
    ops = ["request", "request", "request", "undo", "copy", "import", "approve", "evidence", "delete"]
    while True:
        op = ops[int(rng.integers(len(ops)))]
        k += 1
        if op == "request":
            say("start", "line", name, lines + 1)
            try:
                s.run(SetVoxelDose(target_voxel(s, int(rng.integers(50))), float(rng.uniform(0.85, 1.05)) * RX),
                      recovery_steps=2)
            except RequestError:
                say("skip", "line", name, lines)
                continue
            lines += 1
            say("done", "line", name, lines)
        elif op == "undo" and s.can_undo:
            say("start", "line", name, lines + 1)
            s.undo()
            lines += 1
            say("done", "line", name, lines)
        elif op == "copy":
            new = f"{name}-c{k}"
            say("start", "copy", new)
            st.copy_plan(name, new)
            copies.append(new)
            say("done", "copy", new)
        elif op == "import":
            new = f"{name}-i{k}"
            say("start", "import", new)
            st.import_session(src, patient_key=pk, plan_name=new)
            say("done", "import", new)
        elif op == "approve" and copies:
            c = copies[-1]
            if st.get(c).status != "approved":
                say("start", "approve", c)
                st.approve(c, "dr. crash")
                say("done", "approve", c)
        elif op == "evidence":
            n = len(st.evidence(name))
            say("start", "evidence", name, n + 1)
            st.attach_evidence(name, "note", {"k": k}, {"a": np.arange(k)})
            say("done", "evidence", name, n + 1)
        elif op == "delete" and copies:
            c = copies.pop(int(rng.integers(len(copies))))
            say("start", "delete", c)
            st.delete_plan(c, force=True)
            say("done", "delete", c)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1], sys.argv[2])
