"""The engine worker without a window: it takes requests, coalesces them and emits snapshots."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from .conftest import build_coarse_session, conflicting_requests, require_viewer_packages, rewind

require_viewer_packages()

from ids_engine.dmr import MoveIsodoseLine, SetVoxelDose  # noqa: E402
from ids_engine.viewer.worker import EngineWorker, QtEngineWorker, Snapshot, conflict_status_text  # noqa: E402

pytestmark = pytest.mark.viewer


class Recorder:
    """Collects what a worker reports, and lets a test wait for a job's snapshot."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []
        self.messages: list[tuple[str, bool]] = []
        self._cv = threading.Condition()

    def snapshot(self, snap: Snapshot) -> None:
        with self._cv:
            self.snapshots.append(snap)
            self._cv.notify_all()

    def message(self, text: str, error: bool) -> None:
        self.messages.append((text, error))

    def wait_for(self, job_id: int, timeout: float = 30.0) -> Snapshot:
        with self._cv:
            ok = self._cv.wait_for(lambda: self.snapshots and self.snapshots[-1].job_id >= job_id, timeout)
        assert ok, f"no snapshot for job {job_id} within {timeout} s (messages: {self.messages})"
        return self.snapshots[-1]


@pytest.fixture(scope="module")
def session():
    return build_coarse_session()


@pytest.fixture
def worker(session):
    rec = Recorder()
    w = EngineWorker(session, rec.snapshot, rec.message).start()
    w.recorder = rec
    rec.wait_for(1)  # the start-up refresh
    yield w
    w.stop()
    rewind(session)


def _interior_voxel(session) -> tuple[int, int, int]:
    """A target voxel far from the target's edge (deep inside the horseshoe's arm)."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(session.target_mask)
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth), depth.shape))


def test_start_up_snapshot_is_a_host_copy_with_dvhs_and_surface(worker, session):
    snap = worker.recorder.snapshots[0]
    assert snap.job_kind == "refresh" and snap.final
    assert snap.dose_gy.shape == session.patient.grid.shape_zyx
    assert isinstance(snap.dose_gy, np.ndarray)
    np.testing.assert_allclose(snap.dose_gy, session.dose())
    assert {d.name for d in snap.dvhs} == {s.name for s in session.patient.structures}
    assert not snap.surface.empty
    assert snap.history == () and snap.undone == ()


def test_request_runs_and_undo_redo_goto(worker, session):
    rec = worker.recorder
    idx = _interior_voxel(session)
    before = session.dose_at(idx)
    snap = rec.wait_for(worker.submit(SetVoxelDose(idx, 45.0)))
    assert len(session.journal) == 1
    assert abs(float(snap.dose_gy[idx]) - 45.0) < 2.0 < abs(before - 45.0)
    assert [h.text for h in snap.history] == [f"Set dose at ({idx[2]}, {idx[1]}, {idx[0]}) to 45 Gy"]

    snap = rec.wait_for(worker.undo())
    assert len(session.journal) == 0 and len(snap.undone) == 1
    assert float(snap.dose_gy[idx]) == pytest.approx(before, abs=1e-3)
    snap = rec.wait_for(worker.redo())
    assert len(session.journal) == 1 and snap.undone == ()
    snap = rec.wait_for(worker.goto(0))
    assert len(session.journal) == 0 and len(snap.undone) == 1
    snap = rec.wait_for(worker.goto(1))
    assert len(session.journal) == 1 and abs(float(snap.dose_gy[idx]) - 45.0) < 2.0


def test_queued_set_dose_requests_for_one_voxel_coalesce(worker, session):
    rec = worker.recorder
    idx = _interior_voxel(session)
    other = (idx[0], idx[1], idx[2] - 3)
    # Keep the worker busy so the next jobs queue up behind this one.
    worker.submit(SetVoxelDose(other, 50.0))
    ids = [worker.submit(SetVoxelDose(idx, v)) for v in (58.0, 55.0, 52.0, 49.0, 46.0)]
    snap = rec.wait_for(ids[-1])
    assert worker.dropped >= 1
    assert len(session.journal) <= 1 + 5 - worker.dropped
    assert session.journal[-1].request == SetVoxelDose(idx, 46.0)
    assert abs(float(snap.dose_gy[idx]) - 46.0) < 2.0


def test_drag_previews_coalesce_and_commit_leaves_one_entry(worker, session):
    rec = worker.recorder
    rx = session.prescription_gy
    level = 0.95 * rx
    k = session.patient.grid.shape_zyx[0] // 2
    dose = session.dose()[k]
    # The right-most point of the level's region on this slice, dragged outwards along the row.
    rows, cols = np.nonzero(dose >= level)
    j = int(rows[np.argmax(cols)])
    start = (float(j), float(cols.max()))
    # Occupy the worker, then fire a burst of previews faster than it can run them.
    worker.submit(SetVoxelDose(_interior_voxel(session), 50.0))
    n_before = len(session.journal) + 1
    for step in range(1, 11):
        worker.preview(MoveIsodoseLine("z", k, level, start, (start[0], start[1] + 0.4 * step)), group=1)
    final = MoveIsodoseLine("z", k, level, start, (start[0], start[1] + 4.0))
    snap = rec.wait_for(worker.commit(final, group=1))
    previews = [s for s in rec.snapshots if s.job_kind == "preview"]
    assert len(previews) < 10, "stale previews were not dropped"
    assert snap.dropped >= 1
    assert len(session.journal) == n_before + 1
    assert session.journal[-1].request == final
    assert not any(h.preview for h in snap.history)
    assert snap.undone == ()  # the undone previews are not offered for redo
    # The isodose moved: the swept voxel halfway along the drag now lies inside it.
    assert float(snap.dose_gy[k, j, int(start[1]) + 2]) >= level


def test_request_error_is_reported_and_plan_untouched(worker, session):
    rec = worker.recorder
    before = session.dose()
    snap = rec.wait_for(worker.submit(SetVoxelDose((0, 0, 0), 10.0)))  # air: outside the body
    assert snap.outcome is None and snap.history == ()
    assert rec.messages and rec.messages[-1][1] is True
    assert "outside the body" in rec.messages[-1][0]
    assert len(session.journal) == 0
    np.testing.assert_array_equal(session.dose(), before)


def test_conflicts_reach_the_snapshot_and_the_history_entry(worker, session):
    rec = worker.recorder
    pin, near = conflicting_requests(session)
    snap = rec.wait_for(worker.submit(pin))
    assert snap.history[-1].conflicts == ()
    snap = rec.wait_for(worker.submit(near))
    res = session.journal[-1]
    assert res.conflicts, "the request beside the pin reported no conflict"
    messages = tuple(c.message for c in res.conflicts)
    assert [c["message"] for c in snap.outcome["conflicts"]] == list(messages)
    assert snap.history[-1].conflicts == messages
    # Undone, the entry keeps its conflicts (the history shows them greyed).
    snap = rec.wait_for(worker.undo())
    assert snap.undone[-1].conflicts == messages


def test_conflict_status_text():
    assert conflict_status_text([]) == ""
    one = "pin 'rim': 3 voxels off its pinned dose, by up to 1.20 Gy (2.0 % of Rx)"
    assert conflict_status_text([one]) == f"⚠ Conflict: {one}"
    text = conflict_status_text([one, "request 2 (this request): 1 voxel short of what was asked, by up to 4.00 Gy "
                                      "(6.7 % of Rx)", "guard 57 Gy: 2 voxels across the dragged level"])
    assert text.startswith(f"⚠ Conflict: {one}") and "+2 more" in text and "request 2" not in text


def test_qt_worker_delivers_snapshots_in_the_gui_thread(qtbot, session):
    from PyQt6 import QtCore

    w = QtEngineWorker(session)
    threads = []
    w.snapshot.connect(lambda snap: threads.append(QtCore.QThread.currentThread()))
    try:
        with qtbot.waitSignal(w.snapshot, timeout=30000) as blocker:
            w.engine.start()
        assert isinstance(blocker.args[0], Snapshot)
        assert threads and threads[0] == QtCore.QCoreApplication.instance().thread()
        with qtbot.waitSignal(w.message, timeout=30000) as blocker:
            w.engine.submit(SetVoxelDose((0, 0, 0), 10.0))
        assert blocker.args[1] is True
    finally:
        w.engine.stop()
        rewind(session)
