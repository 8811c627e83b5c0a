"""kill -9 of a store writer at 100 random moments (seeded): after each kill the store opens,
passes its integrity check, has lost at most the operation in flight, and replaying the
killed writer's plan gives the dose recorded when it was written, bit for bit."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ids_engine.store import PlanStore

WRITER = Path(__file__).with_name("_crash_writer.py")
REPO = Path(__file__).resolve().parents[2]
KILLS = 100


def _read_lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line.split())
    q.put(None)


def _replay(root: Path, pending: tuple[int, str]) -> tuple[int, str, dict]:
    with PlanStore.open(root) as st:
        return (*pending, st.verify_replay(pending[1]))


# Trials whose kill waits for an operation of this kind to start (the others are random).
TARGETED = {1: "import", 2: "copy", 3: "evidence", 5: "line", 6: "import", 7: "copy"}


def test_kill_9_at_100_random_moments_loses_at_most_the_operation_in_flight(tmp_path):
    root, src = tmp_path / "store", tmp_path / "src-session"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(WRITER), str(root), str(src)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    rng = np.random.default_rng(20261206)
    must_exist, must_not_exist, approved = set(), set(), set()
    in_flight_kinds, lines_total, replays, pending = [], 0, [], None
    pool = ThreadPoolExecutor(max_workers=1)
    lines_q: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines_q), daemon=True).start()

    def next_line(timeout: float = 60.0, required: bool = True) -> list[str] | None:
        try:
            words = lines_q.get(timeout=timeout)
        except queue.Empty:
            assert not required, f"the writer said nothing for {timeout} s"
            return None
        assert words is not None, "the writer process ended"
        return words

    try:
        assert next_line() == ["ready"]
        for trial in range(KILLS):
            proc.stdin.write(f"go {trial}\n")
            proc.stdin.flush()
            events = []  # the child may print before its parent says its pid
            while (words := next_line())[0] != "child":
                events.append(words)
            pid = int(words[1])
            # Meanwhile replay the previous writer's plan (no writer touches it any more).
            replays.append(pool.submit(_replay, root, pending)) if pending else None
            # One kill in four early (in or before the writer's first save), the rest at a random
            # moment after it, while the writer shapes, copies, imports, approves, attaches
            # evidence and deletes (timed from its progress, so a busy machine only slows it).
            if trial % 4 == 0:
                time.sleep(float(rng.uniform(0.0, 0.12)))
            else:
                while ["done", "save", f"t{trial}", "2"] not in events:
                    events.append(next_line())
                target = TARGETED.get(trial)
                if target is not None:
                    # A few kills wait for an operation of a given kind to start (each kind is
                    # then hit at least once, whatever the machine's speed), then land in it.
                    deadline = time.perf_counter() + 20.0
                    while (left := deadline - time.perf_counter()) > 0:
                        words = next_line(timeout=left, required=False)
                        if words is not None:
                            events.append(words)
                            if words[:2] == ["start", target]:
                                break
                    time.sleep(float(rng.uniform(0.0, 0.002)))
                else:
                    deadline = time.perf_counter() + float(rng.uniform(0.0, 0.3))
                    while (left := deadline - time.perf_counter()) > 0:
                        words = next_line(timeout=left, required=False)
                        if words is not None:
                            events.append(words)
            os.kill(pid, signal.SIGKILL)
            proc.stdin.write(f"reap {pid}\n")
            proc.stdin.flush()
            while (words := next_line()) != ["reaped"]:
                events.append(words)
            flight = events[-1] if events and events[-1][0] == "start" else None
            in_flight_kinds.append(flight[1] if flight else "between operations")
            name = f"t{trial}"
            done_lines, evidence_done = None, 0
            for ev in events:
                if ev[0] != "done":
                    continue
                op = ev[1]
                if op in ("save", "line"):
                    done_lines = int(ev[3])
                if op in ("save", "copy", "import"):
                    must_exist.add(ev[2])
                elif op == "delete":
                    must_exist.discard(ev[2])
                    approved.discard(ev[2])
                    must_not_exist.add(ev[2])
                elif op == "approve":
                    approved.add(ev[2])
                elif op == "evidence":
                    evidence_done = int(ev[3])
            if flight is not None and flight[1] == "delete":
                must_exist.discard(flight[2])  # deleted or not: either is allowed
                approved.discard(flight[2])
            pending = None
            with PlanStore.open(root) as st:
                problems = st.check()
                assert problems == [], f"kill {trial} ({in_flight_kinds[-1]}): {problems}"
                names = {p.name for p in st.list_plans()}
                assert must_exist <= names, f"kill {trial}: lost {sorted(must_exist - names)}"
                assert not (must_not_exist & names), f"kill {trial}: deleted plans back {must_not_exist & names}"
                for a in approved:
                    assert st.get(a).status == "approved" and st.is_approval_valid(a), a
                if name not in names:
                    assert done_lines is None  # only a save in flight may be lost
                    continue
                # The history holds every journaled line and at most the one in flight more.
                n = len(st.history(name))
                in_flight_line = flight is not None and flight[1] == "line"
                lo = done_lines if done_lines is not None else 2
                assert lo <= n <= lo + int(in_flight_line), f"kill {trial}: {n} lines, {lo} done, in flight {flight}"
                lines_total += n - 2
                m = len(st.evidence(name))
                assert evidence_done <= m <= evidence_done + int(flight is not None and flight[1] == "evidence")
                pending = (trial, name)
                if trial % 10 == 0:  # the killed writer's lock is gone: the plan opens for writing
                    st.load_session(name).close()
        if pending:
            replays.append(pool.submit(_replay, root, pending))
        # Replaying each killed writer's plan gave the dose recorded when it was written, bit for bit.
        for f in replays:
            trial, name, r = f.result()
            assert r["match"] is True, f"kill {trial}: replay of {name}: {r}"
        replayed = len(replays)
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        pool.shutdown(wait=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    # The kills landed in every kind of operation, and the writers got real work done.
    kinds = set(in_flight_kinds)
    assert {"line", "copy", "save", "import", "evidence"} <= kinds, kinds
    assert replayed >= KILLS // 2 and lines_total >= KILLS // 4, (replayed, lines_total)
