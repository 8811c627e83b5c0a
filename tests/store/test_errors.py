"""Bad input: a folder that is not a store, a corrupt database, missing files, unknown plans,
a session made on another CT."""

from __future__ import annotations

import pytest

from ids_engine.dmr import SetVoxelDose
from ids_engine.store import NotAStoreError, PlanNotFoundError, PlanStore, StoreError, StoreIntegrityError
from tests.store.conftest import RX, target_voxel


def test_a_folder_that_is_not_a_store_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotAStoreError, match=rf"{tmp_path}: not an ids-engine plan store \(no ids-store.json\); "
                                              "it holds notes.txt"):
        PlanStore.open(tmp_path)
    with pytest.raises(NotAStoreError, match="is a file, not a plan store folder"):
        PlanStore.open(tmp_path / "notes.txt")
    with pytest.raises(NotAStoreError, match="no plan store here"):
        PlanStore.open(tmp_path / "new", create=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ids-store.json").write_text('{"format": "something else"}')
    with pytest.raises(NotAStoreError, match=r"ids-store.json: field 'format' is not 'ids-engine plan store'"):
        PlanStore.open(bad)


def test_a_corrupt_database_is_refused_naming_the_file(tmp_path):
    PlanStore.open(tmp_path / "s").close()
    db = tmp_path / "s" / "store.sqlite"
    db.write_bytes(b"this is not SQLite at all" * 100)
    for extra in ("store.sqlite-wal", "store.sqlite-shm"):
        (tmp_path / "s" / extra).unlink(missing_ok=True)
    with pytest.raises(StoreError, match=rf"{db}: not a readable SQLite database \(file is not a database\)"):
        PlanStore.open(tmp_path / "s")
    db.unlink()
    with pytest.raises(StoreError, match=rf"{db}: the store's database is missing"):
        PlanStore.open(tmp_path / "s")


def test_missing_and_damaged_files_are_found_and_named(store, patient_key, session):
    ref = store.save_session(session, patient_key=patient_key, plan_name="A", attach=True)
    session.run(SetVoxelDose(target_voxel(session, 0), 0.9 * RX), recovery_steps=2)
    session.run(SetVoxelDose(target_voxel(session, 1), 0.95 * RX), recovery_steps=2)
    session.close()
    folder = store.session_folder(ref)
    assert store.check() == []
    request = folder / "requests" / "r2.npz"
    data = request.read_bytes()
    request.write_bytes(data[:-10] + b"0123456789")
    assert store.check() == [f"{request}: plan 'A': request file differs from the one indexed (hash mismatch)"]
    request.unlink()
    assert store.check() == [f"{request}: plan 'A': request file is missing"]
    with pytest.raises(StoreIntegrityError, match=rf"plan 'A': {request} \(request of history line 2\) is missing"):
        store.load_session(ref)
    with pytest.raises(StoreIntegrityError, match="1 problem"):
        store.verify()
    ct = next((store.root / "patients").rglob("ct_hu.npy"))
    ct.unlink()
    assert any(p == f"{ct}: image set file is missing" for p in store.check())
    with pytest.raises(StoreError, match=rf"{ct}: image set file of patient {patient_key} is missing"):
        store.load_patient(patient_key)


def test_unknown_plans_and_patients_and_bad_names_are_refused(store, patient_key, session, tmp_path):
    with pytest.raises(PlanNotFoundError, match=r"no plan 'nope' in the store .* \(it has no plans\)"):
        store.get("nope")
    store.save_session(session, patient_key=patient_key, plan_name="A")
    with pytest.raises(PlanNotFoundError, match=r"no plan 'nope' in the store .* \(plans: A\)"):
        store.load_session("nope")
    for op in (store.copy_plan, store.rename_plan):
        with pytest.raises(PlanNotFoundError, match="no plan 'B'"):
            op("B", "C")
    with pytest.raises(PlanNotFoundError, match="no plan 'B'"):
        store.delete_plan("B")
    with pytest.raises(StoreError, match="no patient with key 'nobody'"):
        store.save_session(session, patient_key="nobody", plan_name="X")
    with pytest.raises(StoreError, match="plan name ' A': give a non-empty name"):
        store.copy_plan("A", " A")
    with pytest.raises(StoreError, match="patient_id must be a non-empty string"):
        store.add_patient(session.patient, patient_id="")
    with pytest.raises(StoreError, match=rf"{tmp_path / 'none'}: no such session folder"):
        store.import_session(tmp_path / "none", patient_key=patient_key, plan_name="B")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "session.json").write_text("{}")
    with pytest.raises(StoreError, match=r"half: not a session folder \(initial_fluences.npz, journal.jsonl missing\)"):
        store.import_session(tmp_path / "half", patient_key=patient_key, plan_name="B")


def test_a_session_made_on_another_ct_is_not_filed_under_the_patient(store, session, tmp_path):
    import dataclasses

    other = dataclasses.replace(session.patient, ct_hu=session.patient.ct_hu + 1.0)
    pk = store.add_patient(other, patient_id="PID-2")
    session.save(tmp_path / "s")
    session.close()
    with pytest.raises(StoreError, match=r"session.json: the session was made on a CT that is not an image set of "
                                         f"patient {pk}"):
        store.import_session(tmp_path / "s", patient_key=pk, plan_name="A")
    with pytest.raises(StoreError, match=f"the session's CT is not an image set of patient {pk}"):
        store.save_session(session, patient_key=pk, plan_name="A")
    assert store.list_plans() == [] and store.check() == []
