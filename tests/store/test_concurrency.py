"""One writer per plan, any number of readers: two processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ids_engine.store import PlanOpenElsewhereError, PlanStore

REPO = Path(__file__).resolve().parents[2]

WRITER = """
import sys, time
from ids_engine.dmr import SetVoxelDose
from ids_engine.store import PlanStore
from tests.store.conftest import RX, target_voxel
st = PlanStore.open(sys.argv[1], user="writer")
s = st.load_session("A")
print("open", flush=True)
for k in range(int(sys.argv[2])):
    s.run(SetVoxelDose(target_voxel(s, k), (0.9 + 0.01 * (k % 10)) * RX), recovery_steps=2)
    print("request", k, flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
"""


@pytest.fixture
def stored_plan(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A")
    return store, ref


def _writer(root: Path, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)


def test_a_second_writer_is_told_who_holds_the_plan_while_readers_go_on(stored_plan):
    store, ref = stored_plan
    proc = _writer(store.root, 6)
    try:
        assert proc.stdout.readline().strip() == "open"
        # A second writer (this process) is refused, naming the holder.
        with pytest.raises(PlanOpenElsewhereError) as err:
            store.load_session(ref)
        msg = str(err.value)
        assert msg.startswith(f"plan 'A' is open elsewhere (pid {proc.pid}, host {socket.gethostname()}, since ")
        for op in (lambda: store.approve(ref, "dr"), lambda: store.delete_plan(ref)):
            with pytest.raises(PlanOpenElsewhereError, match="plan 'A' is open elsewhere"):
                op()
        # Readers go on while the writer works: list, history, read-only replays, copies.
        seen, reads = [], 0
        while True:
            line = proc.stdout.readline().split()
            assert line, "writer ended"
            with PlanStore.open(store.root, user="reader") as reader:
                n = len(reader.history(ref))
                assert int(line[1]) + 1 <= n if line[0] == "request" else True
                seen.append(n)
                reads += 1
                if line == ["request", "2"]:
                    ro = reader.load_session(ref, write=False)
                    assert len(ro.journal) >= 3 and ro.folder is None
                    copy = reader.copy_plan(ref, "A while written")
                    assert copy.n_requests >= 3
            if line == ["request", "5"]:
                break
        assert seen == sorted(seen) and seen[-1] == 6
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    # Closed: the plan opens for writing here now, with everything the writer did indexed.
    ref = store.get(ref)
    assert ref.n_requests == 6 and [h["indexed"] for h in store.history(ref)] == [True] * 6
    s = store.load_session(ref)
    assert len(s.journal) == 6
    s.close()
    assert store.verify_replay(ref)["match"] is True
    assert store.check() == []
    assert {a["user"] for a in store.audit(ref)} >= {"writer"}


def test_the_same_plan_twice_in_one_process_is_refused_too(stored_plan):
    store, ref = stored_plan
    s = store.load_session(ref)
    with PlanStore.open(store.root) as other:
        with pytest.raises(PlanOpenElsewhereError, match=rf"pid {os.getpid()}, host "):
            other.load_session(ref)
    s.close()
    store.load_session(ref).close()  # released by close()
