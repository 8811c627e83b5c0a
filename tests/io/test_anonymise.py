"""Anonymisation: identifiers gone from every byte of an export, UIDs, IDs and dates remapped
consistently across its files (the set still reads back whole), well-known UIDs kept."""

from __future__ import annotations

import datetime

import numpy as np
import pydicom
import pytest

from ids_engine.deliver import Aperture, DeliverablePlan, Segment, SequencedBeam
from ids_engine.io import Anonymiser, anonymise_files, export_rt_set, missing_required_attributes, read_rt_set
from ids_engine.model import Beam, Structure, StructureKind, default_mlc
from ids_engine.phantoms import water_box

NAME, PID = "Doe^Johnathan^Q", "MRN-98765"


def small_case():
    """A 40 x 40 x 20 mm water box with a target, a one-segment plan and a made-up dose (no engine)."""
    p = water_box("coarse", size_mm=(40.0, 40.0, 20.0))
    body = p.structures[0].mask
    target = np.zeros_like(body)
    target[1:-1, 3:-3, 3:-3] = True
    p = type(p)(p.grid, p.ct_hu, (p.structures[0], Structure("PTV", StructureKind.TARGET, target, p.grid)),
                name="water")
    mlc = default_mlc()
    ap = Aperture(np.full(mlc.n_pairs, -10.0), np.full(mlc.n_pairs, 10.0), (-10, 10), (-10, 10))
    plan = DeliverablePlan("p", (SequencedBeam(Beam("AP"), mlc, (Segment(ap, 100.0),)),), 2.0, 1)
    dose = np.where(body, 2.0, 0.0).astype(np.float32)
    return p, plan, dose


@pytest.fixture
def plain(tmp_path):
    p, plan, dose = small_case()
    return export_rt_set(p, plan, tmp_path / "plain", dose_gy=dose, patient_name=NAME, patient_id=PID)


def _files(ex):
    return [*ex.ct_files, ex.rtstruct, ex.rtplan, ex.rtdose]


def _texts(ds, out=None):
    """Every value of a dataset but its UIDs and binary data, as text."""
    out = [] if out is None else out
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _texts(item, out)
        elif elem.VR not in ("UI", "OB", "OW", "OF", "OD", "UN"):
            out.append(str(elem.value))
    return out


def _uids(ds, out=None):
    out = set() if out is None else out
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _uids(item, out)
        elif elem.VR == "UI" and elem.value:
            out.add(str(elem.value))
    return out


def test_identifiers_leave_no_byte_behind_and_links_survive(plain, tmp_path):
    an = Anonymiser(salt="test", date_shift_days=-100)
    out = anonymise_files(_files(plain), an, out_folder=tmp_path / "anon")
    raw = b"".join(p.read_bytes() for p in out)
    for secret in (b"Doe", b"Johnathan", PID.encode()):
        assert secret not in raw
    # The ID's digits alone may turn up by chance inside the new random decimal UIDs (a few
    # per cent of runs): they must not be anywhere else.
    texts = [t for p in out for t in _texts(pydicom.dcmread(p))]
    assert texts and not any("98765" in t for t in texts)
    before = {p.name: pydicom.dcmread(p) for p in _files(plain)}
    after = {p.name: pydicom.dcmread(p) for p in out}
    for name, ds in after.items():
        old = before[name]
        assert ds.PatientID == an.patient_id(PID) and str(ds.PatientName) == "ANONYMOUS"
        assert ds.SOPClassUID == old.SOPClassUID  # a registered UID is kept
        assert ds.SOPInstanceUID == an.uid(old.SOPInstanceUID) != old.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert missing_required_attributes(ds) == []
        # Every UID that is not a well-known one is new; none of the old instance UIDs remain.
        assert not (_uids(ds) & {u for u in _uids(old) if an.uid(u) != u})
        shifted = datetime.datetime.strptime(old.StudyDate, "%Y%m%d") - datetime.timedelta(days=100)
        assert ds.StudyDate == shifted.strftime("%Y%m%d")
    rp, rs, rd = after["RP.dcm"], after["RS.dcm"], after["RD.dcm"]
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == rp.SOPInstanceUID
    # The anonymised folder is still one set: CT, structures, plan and dose read back together.
    rt = read_rt_set(tmp_path / "anon")
    assert rt.plan.plan.beams[0].mu == pytest.approx(100.0)
    assert float(rt.dose_gy.max()) == pytest.approx(2.0, rel=1e-6)
    assert [s.name for s in rt.patient.structures] == ["BODY", "PTV"]


def test_the_mapping_is_consistent_per_anonymiser_and_differs_between_them():
    a, b = Anonymiser(salt="one"), Anonymiser(salt="two")
    uid = "1.2.3.4.5.6"
    assert a.uid(uid) == a.uid(uid) == Anonymiser(salt="one").uid(uid)
    assert a.uid(uid) != b.uid(uid)
    assert a.uid("1.2.840.10008.5.1.4.1.1.481.5") == "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan Storage
    assert a.patient_id("X") == a.patient_id("X") != b.patient_id("X")
    assert a.date("20240301") == (datetime.date(2024, 3, 1) + datetime.timedelta(days=a.date_shift_days)).strftime("%Y%m%d")
    assert a.date_shift_days < 0 and Anonymiser().salt != Anonymiser().salt


def test_private_tags_and_identifying_text_are_removed():
    ds = pydicom.Dataset()
    ds.PatientName = NAME
    ds.PatientID = PID
    ds.PatientBirthDate = "19600101"
    ds.InstitutionName = "General Hospital"
    ds.OtherPatientIDs = "OLD-1"
    ds.add_new(0x00091001, "LO", "private secret")
    ds.OperatorsName = "Smith^Jane"
    Anonymiser(salt="s").dataset(ds)
    assert 0x00091001 not in ds and "OtherPatientIDs" not in ds
    assert ds.PatientBirthDate == "" and ds.InstitutionName == "" and ds.OperatorsName == ""


def test_export_rt_set_anonymises_the_whole_set(tmp_path):
    p, plan, dose = small_case()
    ex = export_rt_set(p, plan, tmp_path / "anon", dose_gy=dose, patient_name=NAME, patient_id=PID, anonymise=True)
    raw = b"".join(f.read_bytes() for f in _files(ex))
    assert b"Doe" not in raw and b"98765" not in raw
    rt = read_rt_set(tmp_path / "anon")
    assert rt.patient.frame_of_reference_uid == ex.frame_of_reference_uid
    assert "anonymised" in ex.summary.read_text()
