"""Session folders under damage: torn journal lines, missing or damaged request files, two
writers, a changed case, overwrites, durable writes and file permissions."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ids_engine import _files
from ids_engine.dmr import Pin, SetVoxelDose
from ids_engine.session import (
    CaseChangedError,
    FolderLockedError,
    Session,
    case_fingerprint,
    case_from_spec,
    case_label,
)
from ids_engine.session import fingerprint_differences

RX = 60.0


@pytest.fixture
def session(shaping_session):
    return shaping_session


def _target_voxel(s: Session) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.argwhere(s.patient.targets[0].mask).mean(axis=0).round())


def _three_requests(s: Session, folder) -> np.ndarray:
    """Journal a pin, a dose request and a second pin to ``folder``; returns the dose after the dose request."""
    s.attach_journal(folder)
    v = _target_voxel(s)
    s.run(Pin("a", (v[0], v[1] - 4, v[2]), 3.0))
    s.run(SetVoxelDose(v, 0.99 * RX), recovery_steps=1)
    d = s.dose()
    s.run(Pin("b", (v[0], v[1] + 4, v[2]), 3.0))
    return d


def test_a_torn_tail_is_cut_before_the_next_request_is_appended(session, tmp_path):
    folder = tmp_path / "s"
    _three_requests(session, folder)
    session.close()
    with open(folder / "journal.jsonl", "ab") as f:
        f.write(b'{"op": "request", "summ')  # power cut in the middle of the next line
    again = Session.load(folder)
    assert len(again.journal) == 3
    assert any("torn last line" in w for w in again.load_warnings)
    again.run(Pin("c", _target_voxel(again), 2.0))  # appended after the cut, not after the torn bytes
    again.run(Pin("d", _target_voxel(again), 2.0))
    again.close()
    third = Session.load(folder, keep_journaling=False)
    assert [r.request.name for r in third.journal if isinstance(r.request, Pin)] == ["a", "b", "c", "d"]
    assert third.load_warnings == []
    np.testing.assert_allclose(third.dose(), again.dose(), atol=1e-5 * RX)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_a_damaged_request_file_opens_the_session_up_to_the_last_good_request(session, tmp_path, damage):
    folder = tmp_path / "s"
    d_after_second = _three_requests(session, folder)
    session.close()
    path = folder / "requests" / f"r{session.journal[-1].id}.npz"
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"not an npz file")
    journal_before = (folder / "journal.jsonl").read_text()
    again = Session.load(folder)
    assert len(again.journal) == 2
    assert "b" not in again.pins and "a" in again.pins
    np.testing.assert_allclose(again.dose(), d_after_second, atol=1e-5 * RX)
    text = " ".join(again.load_warnings)
    assert path.name in text and ("missing" if damage == "missing" else "damaged") in text
    assert "opens with the 2 request(s)" in text
    # Nothing is thrown away: the line that could not be replayed is kept beside the journal.
    kept = (folder / "journal-damaged-1.jsonl").read_text()
    assert kept and journal_before.endswith(kept)
    # The session goes on from the last good request, and reopens to the same plan.
    again.run(Pin("c", _target_voxel(again), 2.0))
    again.close()
    third = Session.load(folder, keep_journaling=False)
    assert sorted(third.pins) == ["a", "c"]
    np.testing.assert_allclose(third.dose(), again.dose(), atol=1e-5 * RX)


def test_a_second_writer_is_refused_until_the_first_closes(session, tmp_path):
    folder = tmp_path / "s"
    session.attach_journal(folder)
    with pytest.raises(FolderLockedError, match=rf"session is open elsewhere \(pid {os.getpid()} on "):
        Session.load(folder)
    # Readers are welcome.
    Session.load(folder, keep_journaling=False)
    # Saving another session into the live folder does not wipe it.
    other = Session.load(folder, keep_journaling=False)
    with pytest.raises(FolderLockedError):
        other.save(folder, overwrite=True)
    assert (folder / "session.json").exists()
    session.close()
    with Session.load(folder) as again:
        assert again.load_warnings == []


def test_another_process_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    code = ("import sys, time; from ids_engine._files import FolderLock; "
            "lock = FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=rf"pid {holder.pid} on "):
            _files.FolderLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    lock = _files.FolderLock(folder).acquire()  # the kernel dropped the dead holder's lock
    assert lock.path.read_text().split()[0] == str(os.getpid())
    lock.release()


def test_save_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(session, tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        session.save(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    session.run(Pin("p", _target_voxel(session), 3.0))
    session.save(folder, overwrite=True)
    assert not (folder / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".work.")]  # no staging left behind
    # The session journals to the replaced folder and holds its lock there.
    session.run(Pin("q", _target_voxel(session), 2.0))
    with pytest.raises(FolderLockedError):
        Session.load(folder)
    session.close()
    assert sorted(Session.load(folder, keep_journaling=False).pins) == ["p", "q"]
    with pytest.raises(ValueError, match="is a file"):
        session.save(folder / "session.json")


def test_a_changed_case_is_refused_with_the_differences(session, tmp_path):
    folder = tmp_path / "s"
    session.run(Pin("p", _target_voxel(session), 3.0))
    session.save(folder)
    session.close()
    doc = json.loads((folder / "session.json").read_text())
    fp = doc["case_fingerprint"]
    fp["ct_sha256"] = "0" * 64
    fp["structures"]["OAR"]["voxels"] += 7
    (folder / "session.json").write_text(json.dumps(doc))
    with pytest.raises(CaseChangedError, match=r"the CT values differ; structure 'OAR' had \d+ voxels, has \d+"):
        Session.load(folder)
    again = Session.load(folder, keep_journaling=False, accept_changed_case=True)
    assert any("the CT values differ" in w for w in again.load_warnings)
    assert "p" in again.pins


def test_fingerprint_sees_a_changed_ct_grid_and_structures(session):
    p = session.patient
    fp = case_fingerprint(p)
    assert fingerprint_differences(fp, case_fingerprint(p)) == []
    ct = p.ct_hu.copy()
    ct[3, 4, 5] += 50.0
    assert fingerprint_differences(fp, case_fingerprint(dataclasses.replace(p, ct_hu=ct))) == ["the CT values differ"]
    fewer = p.without_structures("OAR")
    assert fingerprint_differences(fp, case_fingerprint(fewer)) == ["structure 'OAR' is missing"]
    moved = dataclasses.replace(p.grid, origin_mm_xyz=tuple(v + 1.0 for v in p.grid.origin_mm_xyz))
    assert any(d.startswith("grid origin_mm_xyz") for d in fingerprint_differences(fp, {**fp, "grid": case_fingerprint(
        dataclasses.replace(p, grid=moved, structures=()))["grid"]}))


def test_case_labels_do_not_repeat_the_input_path():
    label = case_label({"dicom": "/data/DOE^JOHN_12345"})
    assert "DOE" not in label and label.startswith("DICOM case ")
    assert case_label({"phantom": "horseshoe", "resolution": "coarse"}) == "phantom horseshoe (coarse)"


def test_session_files_are_durable_and_follow_the_umask(session, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists("/proc/self/fd") else fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folder = tmp_path / "s"
    session.attach_journal(folder)
    synced.clear()
    session.run(Pin("p", _target_voxel(session), 3.0))
    # The request file is fsync'ed, then its folder (the rename), then the journal line.
    names = [str(n) for n in synced]
    assert any(n.startswith(".r") and n.endswith(".npz") for n in names), names
    assert "requests" in names and names[-1] == "journal.jsonl", names
    mask = os.umask(0o022)
    os.umask(mask)
    for f in (folder / "session.json", folder / "initial_fluences.npz", next((folder / "requests").glob("*.npz"))):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_kill_9_while_journaling_loses_at_most_the_request_in_flight(tmp_path):
    """A writer killed at random moments: the folder always reopens, to a prefix of its requests."""
    code = f"""
import sys
from ids_engine.session import Session
from ids_engine.dmr import Pin
s = Session.from_phantom("horseshoe", "coarse", prescription_gy={RX})
s.attach_journal(sys.argv[1])
print("ready", flush=True)
for k in range(10000):
    s.run(Pin(f"p{{k}}", (10, 20 + k % 5, 30), 2.0))
"""
    rng = np.random.default_rng(7)
    counts = []
    for trial in range(3):
        folder = tmp_path / f"s{trial}"
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        s = Session.load(folder, keep_journaling=False)
        names = [r.request.name for r in s.journal]
        assert names == [f"p{k}" for k in range(len(names))]  # a prefix, nothing reordered or lost in between
        counts.append(len(names))
    assert max(counts) > 0


def test_a_dicom_folder_changed_since_the_session_was_saved_is_refused(tmp_path):
    """The issue's case: the input folder is replaced by another CT (same patient, different
    values); replaying onto it would put the requests on other anatomy."""
    import os as _os

    from tests.io.test_dicom import make_patient, write_case

    case_dir = tmp_path / "case"
    case_dir.mkdir()
    patient, _, _ = write_case(case_dir)
    s = Session.open_field_plan(case_from_spec({"dicom": str(case_dir)}), n_beams=3, prescription_gy=RX,
                                case={"dicom": str(case_dir)})
    s.run(Pin("p", tuple(int(v) for v in np.argwhere(s.patient.targets[0].mask)[0]), 2.0))
    s.save(tmp_path / "sess")
    s.close()
    # The same patient re-scanned: the CT values differ in the body.
    other = tmp_path / "other"
    other.mkdir()
    changed = make_patient()
    ct = changed.ct_hu.copy()
    ct[changed.structure("BODY").mask] += 40.0
    write_case(other, dataclasses.replace(changed, ct_hu=ct))
    _os.rename(case_dir, tmp_path / "case-old")
    _os.rename(other, case_dir)
    with pytest.raises(CaseChangedError, match="the CT values differ"):
        Session.load(tmp_path / "sess")
    # Put back, it opens again.
    _os.rename(case_dir, tmp_path / "other")
    _os.rename(tmp_path / "case-old", case_dir)
    assert "p" in Session.load(tmp_path / "sess", keep_journaling=False).pins


def test_reopening_rebuilds_the_plan_bit_for_bit(tmp_path):
    """A fresh session's requests (with rejected steps and take-backs) replayed from its folder
    give the very same fluence and dose: the patches are applied in the calls they first were."""
    s = Session.from_phantom("horseshoe", "coarse", prescription_gy=RX)
    s.attach_journal(tmp_path / "s")
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    r1 = s.run(SetVoxelDose((int(c[0]), j, int(c[2])), 0.55 * RX), recovery_steps=6)
    s.run(SetVoxelDose(_target_voxel(s), 1.04 * RX), recovery_steps=4)
    assert len(r1.patch_groups) > 1 and sum(r1.patch_groups) == len(r1.patches)
    s.close()
    again = Session.load(tmp_path / "s", keep_journaling=False)
    for a, b in zip(again.engine.fluences_host(), s.engine.fluences_host()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.dose(), s.dose())


def test_bad_display_readout_and_set_plan_calls_are_refused(session):
    with pytest.raises(ValueError, match=r"display_readout: index_zyx \(0, 0, 999\) is outside the grid"):
        session.display_readout((0, 0, 999))
    session.run(Pin("p", _target_voxel(session), 2.0))
    before = session.engine.fluences_host()
    with pytest.raises(ValueError, match="set_plan: the session already has requests"):
        session.set_plan([f * 2 for f in before])
    for a, b in zip(session.engine.fluences_host(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field, value, match", [
    ("oar_rise_pct", -1.0, "DMROptions.oar_rise_pct must be a finite number"),
    ("max_rise_pct", float("nan"), "DMROptions.max_rise_pct must be a finite number"),
    ("drag_max_rise_pct", -1.0, "DMROptions.drag_max_rise_pct must be a finite number"),
    ("drag_max_rise_pct", float("inf"), "DMROptions.drag_max_rise_pct must be a finite number"),
    ("recovery_steps", -3, "DMROptions.recovery_steps must be a whole number, 0 or more"),
    ("cp_cells", 2.5, "DMROptions.cp_cells must be a whole number, 1 or more"),
    ("target_min_pct", 110.0, "target_min_pct 110.0 must be below target_max_pct"),
])
def test_bad_dmr_options_are_refused_naming_the_field(field, value, match):
    from ids_engine.session import DMROptions

    with pytest.raises(ValueError, match=match):
        DMROptions(**{field: value})


def test_a_session_file_with_bad_dmr_options_is_refused_naming_the_file(session, tmp_path):
    folder = tmp_path / "s"
    session.save(folder)
    session.close()
    doc = json.loads((folder / "session.json").read_text())
    doc["dmr_options"]["oar_rise_pct"] = -2.0
    (folder / "session.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"session\.json: field 'dmr_options': DMROptions\.oar_rise_pct"):
        Session.load(folder, keep_journaling=False)


def test_a_session_relative_case_needs_its_session_folder(tmp_path):
    from ids_engine.session import case_from_spec, resolve_case

    spec = {"dicom": "../new_ct", "relative_to": "session"}
    with pytest.raises(ValueError, match="relative to its session folder"):
        case_from_spec(spec)
    assert resolve_case(spec, tmp_path / "out" / "session") == {"dicom": str((tmp_path / "out" / "new_ct").resolve())}
    assert resolve_case({"dicom": "ct"}, tmp_path) == {"dicom": "ct"}  # not marked: as it was given


def test_the_store_refuses_a_relative_case_in_the_session_or_outside_the_plan(tmp_path):
    from ids_engine.store import StoreError
    from ids_engine.store._store import PlanStore

    src = tmp_path / "out" / "session"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for rel in ("sub", "../../elsewhere"):
        with pytest.raises(StoreError, match="must lie beside the session folder"):
            PlanStore._copy_relative_case(src, tmp_path / "staging", {"case": {"dicom": rel, "relative_to": "session"}})


@pytest.mark.parametrize("limits", [["LPRepairOptions.max_call_iterations"], "LPRepairOptions", [3]])
def test_the_repair_limits_a_request_reached_are_journaled_and_checked_on_reopening(session, tmp_path, limits):
    """``RequestResult.repair_limits`` (the LP repair's limits that request reached) is kept in
    the journal's summary and read back on reopening; a value that is not a list of strings
    makes that line damaged (the warning names the field), and the session opens with the
    requests before it."""
    folder = tmp_path / "s"
    _three_requests(session, folder)
    session.close()
    path = folder / "journal.jsonl"
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if '"set_voxel_dose"' in line)
    entry = json.loads(lines[at])
    assert "repair_limits" not in entry["summary"]  # a request that reached no limit: as before
    entry["summary"]["repair_limits"] = limits
    lines[at] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    again = Session.load(folder, keep_journaling=False)
    if limits == ["LPRepairOptions.max_call_iterations"]:
        assert again.load_warnings == []
        assert [r.repair_limits for r in again.journal] == [(), tuple(limits), ()]
    else:
        assert len(again.journal) == 1  # the pin before the damaged line
        assert "repair_limits must be a list of strings" in " ".join(again.load_warnings)
