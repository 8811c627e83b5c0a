"""Patient identifiers never reach the logs; an anonymised export holds none of them."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ids_engine.dmr import SetVoxelDose
from ids_engine.io import read_dicom
from ids_engine.session import Session
from ids_engine.store import PlanStore
from tests.io.test_dicom import write_case

RX = 60.0
NAME, PID = "Doe^John", "PID-QXZ-4711"  # what write_case puts in the DICOM files
IDENTIFIERS = (NAME, PID, "QXZ-4711", "Doe", "John")


@pytest.fixture
def dicom_case(tmp_path):
    # A case folder named after the patient, as clinics often do.
    folder = tmp_path / f"Doe_John {PID}"
    folder.mkdir()
    write_case(folder)
    return folder


def _workflow(root, folder) -> PlanStore:
    patient = read_dicom(folder)
    s = Session.open_field_plan(patient, n_beams=2, prescription_gy=RX, case={"dicom": str(folder)})
    st = PlanStore.open(root, user="planner")
    pk = st.add_patient(patient, patient_id=PID, name=NAME)
    ref = st.save_session(s, patient_key=pk, plan_name="plan 1", attach=True)
    target = np.argwhere(patient.targets[0].mask)
    s.run(SetVoxelDose(tuple(int(v) for v in target[len(target) // 2]), 0.95 * RX), recovery_steps=2)
    s.close()
    copy = st.copy_plan(ref, "plan 1 copy")
    st.attach_evidence(copy, "comparison", {"note": f"patient {PID} ({NAME}) checked", "gamma_pct": 98.5})
    st.approve(copy, "dr. approver")
    st.history(ref)
    st.load_session(ref, write=False)
    st.check()
    return st


def test_a_full_workflow_logs_no_patient_identifier(dicom_case, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    st = _workflow(tmp_path / "store", dicom_case)
    st.close()
    assert any(r.name.startswith("ids_engine.store") for r in caplog.records)  # the store does log
    for ident in IDENTIFIERS:
        assert ident not in caplog.text
    # The audit trail refers to patients by their random key only.
    with PlanStore.open(tmp_path / "store") as st:
        text = repr(st.audit())
        assert all(ident not in text for ident in IDENTIFIERS)


def test_an_anonymised_export_holds_no_identifier_in_any_file(dicom_case, tmp_path):
    st = _workflow(tmp_path / "store", dicom_case)
    # The original holds them (in the patients table, and the case path in session.json).
    raw = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert PID.encode() in raw and b"Doe_John" in raw
    dest = st.export_anonymised(tmp_path / "export", salt="fixed")
    st.close()
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert len(files) > 10
    for p in files:
        data = p.read_bytes()
        for ident in IDENTIFIERS + ("Doe_John", "dr. approver", "planner"):
            assert ident.encode() not in data, f"{ident!r} in {p}"
    # The export is a sound store: plans, history, approvals and evidence carried over.
    with PlanStore.open(dest) as ex:
        assert ex.check() == []
        assert sorted(p.name for p in ex.list_plans()) == ["plan 1", "plan 1 copy"]
        (pat,) = ex.patients()
        assert pat["patient_id"].startswith("ANON-") and pat["name"] == "ANONYMOUS"
        assert ex.get("plan 1 copy").status == "approved"
        assert ex.approvals("plan 1 copy")[0]["user"].startswith("user-")
        (ev,) = ex.evidence("plan 1 copy")
        assert ev["doc"]["gamma_pct"] == 98.5 and PID not in ev["doc"]["note"]
        assert len(ex.history("plan 1")) == 1
        np.testing.assert_array_equal(ex.load_patient(pat["key"]).ct_hu, read_dicom(dicom_case).ct_hu)


def test_an_export_with_short_identifiers_keeps_every_plan_replayable(tmp_path):
    """A one-digit patient ID and a two-letter login are replaced only where they are a whole
    string value (never inside numbers, keys or words), so the journals still parse and replay."""
    from ids_engine.phantoms import PHANTOMS

    patient = PHANTOMS["horseshoe"](resolution="coarse")
    s = Session.open_field_plan(patient, n_beams=2, prescription_gy=RX, case={"phantom": "horseshoe", "resolution": "coarse"})
    with PlanStore.open(tmp_path / "store", user="rt") as st:
        pk = st.add_patient(patient, patient_id="3", name="Li^Bo")
        ref = st.save_session(s, patient_key=pk, plan_name="plan 3", attach=True)
        target = np.argwhere(patient.targets[0].mask)
        for k in (0, 1, 2):
            s.run(SetVoxelDose(tuple(int(v) for v in target[(k + 1) * len(target) // 4]), 0.97 * RX), recovery_steps=1)
        s.close()
        n_lines = len(st.history(ref))
        dest = st.export_anonymised(tmp_path / "export", salt="fixed")
    with PlanStore.open(dest) as ex:
        assert ex.check() == []
        assert len(ex.history("plan 3")) == n_lines == 3
        (pat,) = ex.patients()
        assert pat["patient_id"].startswith("ANON-") and pat["name"] == "ANONYMOUS"
        reopened = ex.load_session("plan 3", write=False)
        assert len(reopened.journal) == 3
