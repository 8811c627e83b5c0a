"""The plan store's behaviour: plans from sessions, the history, plan IDs, copies, approvals,
evidence, status, locations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ids_engine.dmr import Pin, SetVoxelDose
from ids_engine.session import Session
from ids_engine.store import (
    ApprovedPlanError,
    PlanStore,
    StoreError,
    content_hash,
    default_store_path,
    dose_hash,
)
from tests.store.conftest import RX, target_voxel


def _shape(s: Session, k: int = 0, pct: float = 0.9) -> None:
    s.run(SetVoxelDose(target_voxel(s, k), pct * RX), recovery_steps=2)


def test_a_saved_session_reopens_from_the_store_bit_for_bit(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A", attach=True)
    assert ref.plan_id == session.plan_id and ref.status == "draft" and ref.n_requests == 0
    _shape(session, 0)
    _shape(session, 1, 0.95)
    session.run(Pin("keep", target_voxel(session, 2), 3.0))
    session.undo()
    now = store.get(ref)
    # Indexed as journaled: three requests and an undo, each with its hashes.
    hist = store.history(ref)
    assert [h["op"] for h in hist] == ["request", "request", "request", "undo"]
    assert all(h["indexed"] for h in hist)
    assert now.content_sha256 == content_hash(session)
    session.close()
    again = store.load_session(ref, write=False)
    for a, b in zip(again.engine.fluences_host(), session.engine.fluences_host()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.dose(), session.dose())
    assert dose_hash(again) == dose_hash(session)
    assert store.verify_replay(ref) == {"line": 3, "requests": 2, "match": True}


def test_the_plan_id_goes_up_on_dose_changes_only(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A", attach=True)
    ids = [store.get(ref).plan_id]
    _shape(session, 0)                                          # fluence changes: +1
    ids.append(store.get(ref).plan_id)
    session.run(Pin("keep", target_voxel(session, 3), 3.0))    # a pin changes no fluence
    ids.append(store.get(ref).plan_id)
    session.undo()                                              # undoing the pin: no change
    ids.append(store.get(ref).plan_id)
    session.undo()                                              # undoing the request: +1
    ids.append(store.get(ref).plan_id)
    session.redo()                                              # +1
    ids.append(store.get(ref).plan_id)
    assert ids[0] == session.plan_id - 3  # the session's own plan ID when it was stored
    assert [i - ids[0] for i in ids] == [0, 1, 1, 1, 2, 3]
    session.close()
    # Renaming and copying keep it.
    assert store.rename_plan(ref, "A2").plan_id == ids[-1]
    copy = store.copy_plan("A2", "B")
    assert copy.plan_id == ids[-1] and copy.parent_key == ref.key
    assert [h["plan_id"] for h in store.history(copy)] == [h["plan_id"] for h in store.history(ref)]


def test_copy_keeps_the_source_and_delete_removes_only_the_copy(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A", attach=True)
    _shape(session)
    session.close()
    copy = store.copy_plan(ref, "A copy")
    assert {p.name for p in store.list_plans()} == {"A", "A copy"}
    assert store.verify_replay(copy)["match"] is True
    assert store.get(copy).content_sha256 == store.get(ref).content_sha256
    with pytest.raises(StoreError, match="plan 'A copy' exists already"):
        store.copy_plan(ref, "A copy")
    folder = store.plan_folder(copy)
    store.delete_plan(copy)
    assert [p.name for p in store.list_plans(patient_key)] == ["A"]
    assert not folder.exists()
    assert store.check() == []
    assert [a["action"] for a in store.audit()][-2:] == ["copy plan", "delete plan"]


def test_an_approval_records_who_when_and_the_content_and_the_plan_never_changes_in_place(store, patient_key,
                                                                                           session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A", attach=True)
    _shape(session)
    expected = content_hash(session)
    approved = store.approve(ref, "dr. approver", session=session)
    assert session.folder is None  # the approved plan's session stops journaling
    assert approved.status == "approved"
    (a,) = store.approvals(ref)
    assert a["user"] == "dr. approver" and a["content_sha256"] == expected and a["plan_id"] == approved.plan_id
    assert a["time"].endswith("Z") and store.is_approval_valid(ref)
    # Writing to it is refused; it opens read-only; changes go to a copy, which is unapproved.
    with pytest.raises(ApprovedPlanError, match="plan 'A' is approved and is never changed in place: copy it"):
        store.load_session(ref, write=True)
    with pytest.raises(ApprovedPlanError, match="approved"):
        store.set_status(ref, "draft")
    with pytest.raises(ApprovedPlanError, match="force"):
        store.delete_plan(ref)
    ro = store.load_session(ref)
    assert ro.folder is None
    copy = store.copy_plan(ref, "A rev 2")
    assert copy.status == "draft" and copy.content_sha256 == expected
    s2 = store.load_session(copy)
    _shape(s2, 4, 1.02)
    changed = store.get(copy)
    assert changed.plan_id == approved.plan_id + 1 and changed.content_sha256 != expected
    assert store.get(ref).content_sha256 == expected and store.is_approval_valid(ref)
    # Approving the plan this store has open takes its session (which stops journaling).
    assert store.approve(copy, "dr. b").status == "approved" and s2.folder is None
    assert store.approvals(copy)[0]["content_sha256"] == changed.content_sha256
    with pytest.raises(ApprovedPlanError, match="approved already"):
        store.approve(copy, "dr. b")


def test_a_status_resting_on_evidence_is_dropped_by_a_dose_change(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="adapted", attach=True)
    report = {"gamma_3mm_3pct": 99.1, "metrics": {"PTV": {"D95_gy": 57.2}}, "decision": "within tolerance"}
    key = store.attach_evidence(ref, "comparison", report, {"dvh_gy": np.linspace(0, 60, 7)})
    with pytest.raises(StoreError, match="no evidence of kind 'qualification'"):
        store.set_status(ref, "auto-qualified", evidence_kind="qualification")
    assert store.set_status(ref, "auto-qualified", evidence_kind="comparison").status == "auto-qualified"
    (ev,) = store.evidence(ref, "comparison")
    assert ev["key"] == key and ev["doc"] == report and ev["user"] == "planner"
    np.testing.assert_array_equal(ev["arrays"]["dvh_gy"], np.linspace(0, 60, 7))
    session.run(Pin("p", target_voxel(session, 1), 2.0))       # no dose change: status kept
    assert store.get(ref).status == "auto-qualified"
    _shape(session, 2)                                          # a dose change: back to draft
    assert store.get(ref).status == "draft"
    assert store.show(ref)["status_evidence"] is None
    # The evidence was made at the earlier plan ID: the status cannot rest on it any more.
    with pytest.raises(StoreError, match=r"made at plan ID \d+; the plan is at plan ID \d+ now"):
        store.set_status(ref, "auto-qualified", evidence_kind="comparison")
    store.attach_evidence(ref, "comparison", report)
    assert store.set_status(ref, "auto-qualified", evidence_kind="comparison").status == "auto-qualified"
    store.set_status(ref, "rejected")
    with pytest.raises(StoreError, match="is rejected; approve a copy"):
        store.approve(ref, "dr. approver")
    with pytest.raises(StoreError, match=r"status .approved. is not one of .*use approve"):
        store.set_status(ref, "approved")
    with pytest.raises(StoreError, match="kind 'Bad Kind'"):
        store.attach_evidence(ref, "Bad Kind", {})
    with pytest.raises(StoreError, match="not plain JSON"):
        store.attach_evidence(ref, "x", {"a": object()})


def test_importing_session_folders_of_ids_shape_and_ids_plan(store, patient_key, session, tmp_path):
    _shape(session)
    session.save(tmp_path / "shaped")
    session.close()
    ref = store.import_session(tmp_path / "shaped", patient_key=patient_key, plan_name="shaped")
    assert ref.n_requests == 1 and ref.plan_id == 2
    # An ids plan --out folder: session/ plus the protocol beside it.
    out = tmp_path / "planned"
    (out / "session").mkdir(parents=True)
    for f in (tmp_path / "shaped").rglob("*"):
        if f.is_file() and f.name != ".lock":
            dst = out / "session" / f.relative_to(tmp_path / "shaped")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    (out / "protocol.toml").write_text('name = "test"\n')
    ref2 = store.import_session(out, patient_key=patient_key, plan_name="planned", parent=ref)
    assert store.plan_file(ref2, "protocol.toml").read_text() == 'name = "test"\n'
    assert store.plan_file(ref2, "plan.json") is None
    assert store.get(ref2).parent_key == ref.key
    # The index catches up with a session that journals into the plan without the store.
    s = Session.load(store.session_folder(ref2))
    _shape(s, 3, 0.97)
    s.close()
    assert [h["indexed"] for h in store.history(ref2)] == [True, False]
    assert store.sync(ref2).n_requests == 2
    assert store.get(ref2).plan_id == 3
    assert store.verify_replay(ref2)["match"] is None  # nothing recorded: no session was at hand
    store.load_session(ref2).close()                  # opened for writing: its hashes are recorded
    assert store.verify_replay(ref2) == {"line": 1, "requests": 2, "match": True}
    assert store.check() == []


def test_a_plan_opened_for_writing_indexes_its_requests_and_reopens_identically(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A")
    assert session.folder is None  # not attached: left as it was
    s = store.load_session(ref)
    assert s.folder == store.session_folder(ref)
    _shape(s, 5)
    s.close()
    ref = store.get(ref)
    assert ref.n_requests == 1 and ref.content_sha256 == content_hash(s)
    s2 = store.load_session(ref, write=False)
    assert content_hash(s2) == ref.content_sha256


def test_store_location_explicit_env_and_per_user_default(tmp_path, monkeypatch):
    monkeypatch.setenv("IDS_STORE", str(tmp_path / "env-store"))
    assert default_store_path() == tmp_path / "env-store"
    with PlanStore.open() as st:
        assert st.root == tmp_path / "env-store"
    assert (tmp_path / "env-store" / "ids-store.json").is_file()
    monkeypatch.delenv("IDS_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_store_path() == tmp_path / "xdg" / "ids-engine" / "store"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / ".local" / "share" / "ids-engine" / "store"
    with PlanStore.open(tmp_path / "explicit") as st:
        assert st.root == tmp_path / "explicit"
        assert st.list_plans() == []
    doc = json.loads((tmp_path / "explicit" / "ids-store.json").read_text())
    assert doc["format"] == "ids-engine plan store"
    journal_mode = __import__("sqlite3").connect(tmp_path / "explicit" / "store.sqlite").execute(
        "PRAGMA journal_mode").fetchone()[0]
    assert journal_mode == "wal"


def test_patients_keep_their_image_sets_and_come_back_as_arrays(store, base_session):
    p = base_session.patient
    k1 = store.add_patient(p, patient_id="PID-1")
    assert store.add_patient(p, patient_id="PID-1") == k1  # the same CT is not stored twice
    assert len(store.image_sets(k1)) == 1
    back = store.load_patient(k1)
    np.testing.assert_array_equal(back.ct_hu, p.ct_hu)
    assert back.grid == p.grid
    for a, b in zip(back.structures, p.structures):
        assert (a.name, a.kind) == (b.name, b.kind)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert k1 not in ("PID-1",) and "PID" not in k1
    assert store.find_patient("PID-1") == k1 and store.find_patient("nobody") is None
    assert os.path.basename(store.root) == "store"


def test_a_session_with_undone_and_dropped_requests_is_stored_so_it_replays_to_itself(store, patient_key,
                                                                                        session):
    """Undo then a new request drops the undone one: its history written afresh replays to
    the plan up to float32 rounding; the store makes the session and the stored plan agree."""
    _shape(session, 0)
    _shape(session, 1, 0.95)
    session.undo()
    _shape(session, 2, 1.0)  # drops the undone request from the history
    session.undo()
    session.redo()
    ref = store.save_session(session, patient_key=patient_key, plan_name="A")
    assert store.verify_replay(ref)["match"] is True
    again = store.load_session(ref, write=False)  # verifies: raises if the bits differ
    np.testing.assert_array_equal(again.dose(), session.dose())
    # A session of the store saved under a new name copies its exact journal (undos included).
    s = store.load_session(ref)
    s.undo()
    _shape(s, 3, 0.93)
    ref2 = store.save_session(s, patient_key=patient_key, plan_name="B", attach=True)
    assert s.folder == store.session_folder(ref2)
    assert [h["op"] for h in store.history(ref2)][-2:] == ["undo", "request"]
    _shape(s, 4, 0.97)
    s.close()
    # A keeps what was done before "save as"; B has that and what came after.
    assert store.get(ref).n_requests == 3 and store.get(ref2).n_requests == 4
    assert store.verify_replay(ref)["match"] is True and store.verify_replay(ref2)["match"] is True


def test_a_new_starting_plan_set_in_the_store_raises_the_plan_id_and_reopens(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A", attach=True)
    before = store.get(ref)
    session.set_plan([f * np.float32(1.1) for f in session.engine.fluences_host()])  # e.g. re-optimised
    _shape(session, 0)
    now = store.get(ref)
    assert now.plan_id == before.plan_id + 2 and now.n_requests == 1
    assert now.content_sha256 == content_hash(session)
    session.close()
    again = store.load_session(ref, write=False)
    np.testing.assert_array_equal(again.dose(), session.dose())


def test_after_the_store_adopts_the_replayed_plan_an_undo_still_replays_to_itself(store, patient_key, session):
    """Two requests undone, a new one, then save with attach: the session takes the replay's
    exact state (float32 rounding of the undone requests) and with it the replay's snapshot
    for the exact undo, so undoing the new request keeps live and stored plan identical."""
    _shape(session, 0)
    _shape(session, 1, 0.95)
    session.undo()
    session.undo()
    session.clear_redo()
    _shape(session, 2, 0.92)
    ref = store.save_session(session, patient_key=patient_key, plan_name="A", attach=True)
    assert store.verify_replay(ref)["match"] is True
    session.undo()
    assert store.verify_replay(ref)["match"] is True
