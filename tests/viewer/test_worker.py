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
    # Voxels as scripts give them: index_zyx, 0-based.
    assert [h.text for h in snap.history] == [f"Set dose at voxel (z={idx[0]}, y={idx[1]}, x={idx[2]}) to 45 Gy"]

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
    messages = tuple(c.message for c in res.conflicts if c.kind != "rise")
    side = tuple(c.message for c in res.conflicts if c.kind == "rise")
    assert messages, "the request beside the pin reported only side effects"
    assert [c["message"] for c in snap.outcome["conflicts"]] == [c.message for c in res.conflicts]
    assert snap.history[-1].conflicts == messages and snap.history[-1].side_effects == side
    # Undone, the entry keeps its conflicts (the history shows them greyed).
    snap = rec.wait_for(worker.undo())
    assert snap.undone[-1].conflicts == messages and snap.undone[-1].side_effects == side


def test_conflict_status_text():
    assert conflict_status_text([]) == ""
    one = "pin 'rim': 3 voxels off its pinned dose, by up to 1.20 Gy (2.0 % of Rx)"
    assert conflict_status_text([one]) == f"⚠ Conflict: {one}"
    text = conflict_status_text([one, "request 2 (this request): 1 voxel short of what was asked, by up to 4.00 Gy "
                                      "(6.7 % of Rx)", "guard 57 Gy: 2 voxels across the dragged level"])
    assert text.startswith(f"⚠ Conflict: {one}") and "+2 more" in text and "request 2" not in text
    rise = "normal tissue 97 mm from the request: 63 voxels rose by more than 3.00 Gy (5 % of Rx) unasked"
    assert conflict_status_text([], [rise]) == f"⚠ Side effect: {rise}"
    assert conflict_status_text([one], [rise]).endswith("+1 more (see the history)")


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


def test_history_numbers_run_on_although_previews_consume_ids(worker, session):
    """Previews taken back on release use up session ids; the history counts its own entries."""
    rec = worker.recorder
    idx = _interior_voxel(session)
    other = (idx[0], idx[1], idx[2] - 2)
    for v in (52.0, 54.0):
        rec.wait_for(worker.preview(SetVoxelDose(other, v), group=7))
    worker.commit(SetVoxelDose(other, 55.0), group=7)
    snap = rec.wait_for(worker.submit(SetVoxelDose(idx, 48.0)))
    assert [e.number for e in snap.history] == [1, 2]
    assert snap.history[0].id > 1  # the session's ids did skip
    snap = rec.wait_for(worker.undo())
    assert [e.number for e in snap.history] == [1] and [e.number for e in snap.undone] == [2]


def test_save_creates_the_folder_and_refuses_a_foreign_non_empty_one(worker, session, tmp_path):
    rec = worker.recorder
    new = tmp_path / "new" / "session"
    snap = rec.wait_for(worker.save(str(new)))
    assert snap.save_refused is None and (new / "session.json").is_file()
    snap = rec.wait_for(worker.save(str(new)))  # its own folder: saved again, not refused
    assert snap.save_refused is None

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    snap = rec.wait_for(worker.save(str(foreign)))
    assert snap.save_refused == str(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert any("not empty" in text and error for text, error in rec.messages)
    snap = rec.wait_for(worker.save(str(foreign), overwrite=True))
    assert snap.save_refused is None and (foreign / "session.json").is_file()
    assert not (foreign / "notes.txt").exists()
    session.close()


def test_a_phantom_without_target_opens_as_one_open_field_with_depth_dose_and_profile():
    """Water box (coarse): one 10 x 10 cm field at SSD 85 cm; the worker's curves are physics:
    100 % at d_max in the build-up region, a falling depth dose, and a profile whose 50 %
    points sit at the field edge projected to the profile depth."""
    from ids_engine.viewer._field import FIELD_SIZE_MM
    from ids_engine.viewer._loading import build_session, case_display

    s = build_session({"phantom": "water", "resolution": "coarse"}, 60.0)
    assert len(s.engine.geometry) == 1 and not s.patient.targets
    display = case_display(s)
    assert any("no target" in n for n in display.notes)
    rec = Recorder()
    w = EngineWorker(s, rec.snapshot, rec.message).start()
    try:
        snap = rec.wait_for(1)
    finally:
        w.stop()
    c = snap.field
    assert c is not None
    assert c.ssd_mm == pytest.approx(850.0, abs=1.0)  # 300 mm box centred on the isocentre, SAD 1000 mm
    assert c.max_gy == pytest.approx(60.0, rel=1e-3)  # normalised: 100 % = the prescription
    assert 5.0 <= c.dmax_mm <= 30.0
    pdd = c.depth_dose_pct()
    at = lambda d: float(np.interp(d, c.depth_mm, pdd))  # noqa: E731
    assert 55.0 < at(100.0) < 80.0 and at(200.0) < at(100.0) < at(50.0)
    prof = c.profile_gy / float(np.interp(0.0, c.offaxis_mm, c.profile_gy))
    half = FIELD_SIZE_MM / 2.0 * (c.ssd_mm + c.profile_depth_mm) / 1000.0
    right = c.offaxis_mm[c.offaxis_mm > 0][np.argmax(prof[c.offaxis_mm > 0] < 0.5)]
    left = c.offaxis_mm[c.offaxis_mm < 0][::-1][np.argmax(prof[c.offaxis_mm < 0][::-1] < 0.5)]
    assert right == pytest.approx(half, abs=4.0) and left == pytest.approx(-half, abs=4.0)
    assert float(snap.dose_gy.max()) == pytest.approx(60.0, rel=0.05)


def test_a_preview_snapshot_carries_the_displayed_slices_not_the_cube(worker, session):
    rec = worker.recorder
    level = 0.95 * session.prescription_gy
    k = session.patient.grid.shape_zyx[0] // 2
    rows, cols = np.nonzero(session.dose()[k] >= level)
    j = int(rows[np.argmax(cols)])
    start = (float(j), float(cols.max()))
    shown = (k, j, int(cols.max()) - 1)  # not the grid's centre: the slices follow the GUI's index
    snap = rec.wait_for(worker.preview(MoveIsodoseLine("z", k, level, start, (start[0], start[1] + 3.0)), group=3,
                                       display_index_zyx=shown))
    try:
        assert snap.job_kind == "preview" and not snap.final
        assert snap.dose_gy is None and snap.surface is None
        r = snap.readout
        assert r.index_zyx == shown and r.plan_id == snap.plan_id == session.plan_id
        dose = session.dose()  # the worker is idle: the plan the preview showed
        np.testing.assert_array_equal(r.axial_gy, dose[shown[0]])
        np.testing.assert_array_equal(r.coronal_gy, dose[:, shown[1]])
        np.testing.assert_array_equal(r.sagittal_gy, dose[:, :, shown[2]])
        assert r.max_gy == pytest.approx(float(dose.max()))
        assert snap.dvhs is r.dvhs and {d.name for d in snap.dvhs} == {s.name for s in session.patient.structures}
    finally:
        rec.wait_for(worker.commit(None, group=3))


def test_display_index_is_clipped_to_the_grid(worker, session):
    nz, ny, nx = session.patient.grid.shape_zyx
    worker.set_display_index((-4, ny + 7, 2))
    assert worker.display_index_zyx == (0, ny - 1, 2)


def test_history_entries_keep_conflicts_and_side_effects_apart():
    from types import SimpleNamespace

    from ids_engine.session import Conflict
    from ids_engine.viewer.worker import _entry

    pin = Conflict("pin", "pin 'rim'", 3, 1.2, 60.0)
    rise = Conflict("rise", "normal tissue 97 mm from the request", 63, 4.98, 60.0, 3.0)
    res = SimpleNamespace(id=4, request=SetVoxelDose((1, 2, 3), 30.0), timings_ms={"modify": 5.0, "side_effects": 2.0},
                          conflicts=(pin, rise))
    e = _entry(res, 2)
    assert e.conflicts == (pin.message,) and e.side_effects == (rise.message,) and e.engine_ms == 7.0
    assert _entry(res, 2, preview=True).side_effects == ()
