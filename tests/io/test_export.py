"""A complete DICOM RT set for a shaped plan: written, checked for required attributes and
cross-references, read back by us and by dicompyler-core, re-imported to the same dose;
``ids export`` on a saved session and its refusals."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from ids_engine.cli import main
from ids_engine.cli_export import deliverable_plan, export_session
from ids_engine.io import (
    InputError,
    dose_agreement,
    export_rt_set,
    missing_required_attributes,
    plan_dose,
    read_dicom,
    read_rt_set,
    read_rtdose,
    write_dicom_ct,
    write_rtdose,
)
from ids_engine.phantoms import water_box
from ids_engine.session import Session

from .test_rtplan import dicomparser

FRACTIONS = 2


def wedged(session: Session) -> list[np.ndarray]:
    """The open-field maps modulated by a linear wedge along u (0.5 to 1.5): a shaped plan."""
    out = []
    for g, f in zip(session.engine.geometry, session.engine.fluences_host()):
        u = g.fluence_grid.u_mm()
        w = 1.0 + 0.5 * u / np.abs(u).max()
        out.append((f * w[None, :]).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    session = Session.from_phantom("horseshoe", "coarse", n_beams=3)
    session.set_plan(wedged(session))
    folder = tmp_path_factory.mktemp("export")
    ex, plan, agreement = export_session(session, folder, fractions=FRACTIONS, case_label="horseshoe test",
                                         patient_name="Test^Phantom", patient_id="T-1")
    yield session, ex, plan, agreement
    session.close()


def _read(path):
    return pydicom.dcmread(path)


def test_the_set_is_complete_and_every_file_has_its_required_attributes(exported):
    _, ex, plan, _ = exported
    names = sorted(p.name for p in ex.folder.iterdir())
    assert {"RS.dcm", "RP.dcm", "RD.dcm", "summary.md"} <= set(names)
    assert len(ex.ct_files) == 43 and all(p.is_file() for p in ex.ct_files)
    for path in (*ex.ct_files[:2], ex.rtstruct, ex.rtplan, ex.rtdose):
        assert missing_required_attributes(_read(path)) == [], path.name
    # The sequencer made several segments per beam of the wedged fluence.
    assert all(len(sb.segments) > 1 for sb in plan.beams)
    summary = ex.summary.read_text()
    assert "Research use only" in summary and "Deliverable dose against the fluence dose" in summary


def test_pydicom_strict_validation_accepts_every_value(exported, tmp_path, monkeypatch):
    """pydicom's own validation, set to raise: every value's VR (length, characters, format) on
    reading each file and on writing it again."""
    from pydicom import config

    _, ex, _, _ = exported
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.RAISE)
    for path in (ex.ct_files[0], ex.rtstruct, ex.rtplan, ex.rtdose):
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            _ = elem.value  # converts (and so validates) every value, nested ones included
        ds.save_as(tmp_path / path.name, enforce_file_format=True)


def test_every_file_references_the_ct_study_frame_and_each_other(exported):
    _, ex, _, _ = exported
    ct, rs, rp, rd = (_read(p) for p in (ex.ct_files[0], ex.rtstruct, ex.rtplan, ex.rtdose))
    for ds in (rs, rp, rd):
        assert ds.StudyInstanceUID == ct.StudyInstanceUID
        assert ds.PatientID == "T-1" and str(ds.PatientName) == "Test^Phantom"
    assert ct.FrameOfReferenceUID == rp.FrameOfReferenceUID == rd.FrameOfReferenceUID == ex.frame_of_reference_uid
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0] \
        .SeriesInstanceUID == ct.SeriesInstanceUID
    assert rp.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == rp.SOPInstanceUID
    assert rp.ApprovalStatus == "UNAPPROVED" and rd.DoseSummationType == "PLAN"
    uids = {ds.SOPInstanceUID for ds in (ct, rs, rp, rd)}
    assert len(uids) == 4 and all(u.startswith("1.2.826.0.1.3680043.8.498.") for u in uids)  # pydicom's root
    # The prescription goes to the target ROI of the structure set.
    target = rp.DoseReferenceSequence[0].ReferencedROINumber
    roi = {r.ROINumber: r.ROIName for r in rs.StructureSetROISequence}
    assert roi[target] == "PTV"


def test_the_rt_dose_holds_the_exported_dose(exported):
    _, ex, _, _ = exported
    rd = _read(ex.rtdose)
    stored = rd.pixel_array.astype(np.float64) * float(rd.DoseGridScaling)
    assert stored.max() == pytest.approx(float(ex.dose_gy.max()), rel=1e-6)
    np.testing.assert_allclose(stored, ex.dose_gy, rtol=0, atol=1e-6 * float(ex.dose_gy.max()))


def test_reimport_recomputes_the_same_dose_within_1_pct_1_mm(exported):
    session, ex, plan, _ = exported
    rt = read_rt_set(ex.folder)
    assert rt.patient.grid == session.patient.grid
    for a in session.patient.structures:
        assert np.array_equal(rt.patient.structure(a.name).mask, a.mask), a.name
    assert rt.plan is not None and rt.plan.research_export and rt.plan.plan.fractions == FRACTIONS
    assert [len(sb.segments) for sb in rt.plan.plan.beams] == [sum(1 for s in sb.segments if s.mu > 0) for sb in plan.beams]
    np.testing.assert_allclose(rt.dose_gy, ex.dose_gy, rtol=0, atol=1e-5 * float(ex.dose_gy.max()))
    again = plan_dose(rt.patient, rt.plan.plan)
    g = dose_agreement(rt.dose_gy, again, rt.patient.grid, dose_pct=1.0, distance_mm=1.0, max_points=None)
    assert g["pass_rate_pct"] == 100.0 and g["max_diff_pct"] < 1.0 and g["points"] > 10000
    # The check can fail: the dose shifted by one voxel (4 mm) does not pass 1 %/1 mm.
    shifted = np.roll(again, 1, axis=2)
    assert dose_agreement(rt.dose_gy, shifted, rt.patient.grid, dose_pct=1.0, distance_mm=1.0,
                          max_points=300)["pass_rate_pct"] < 90.0
    # The deliverable dose is the plan's: the target's median within 3 % of the prescription.
    median = float(np.median(again[rt.patient.structure("PTV").mask]))
    assert median == pytest.approx(session.prescription_gy, rel=0.03)


def test_dicompyler_core_reads_the_set(exported):
    parser = dicomparser()
    _, ex, _, _ = exported
    rs = parser.DicomParser(str(ex.rtstruct))
    assert sorted(s["name"] for s in rs.GetStructures().values()) == ["BODY", "OAR", "PTV"]
    rd = parser.DicomParser(str(ex.rtdose))
    info = rd.GetDoseData()
    assert info["dosesummationtype"] == "PLAN" and info["doseunits"] == "GY" and info["frames"] == 43
    peak = rd.GetDoseGrid(float(_read(ex.ct_files[20]).ImagePositionPatient[2]))
    assert float(peak.max()) * float(info["dosegridscaling"]) == pytest.approx(float(ex.dose_gy[20].max()), rel=1e-6)
    assert rd.GetReferencedRTPlan() == _read(ex.rtplan).SOPInstanceUID
    assert parser.DicomParser(str(ex.rtplan)).GetPlan()["rxdose"] == 6000


def test_a_dicom_case_is_exported_with_its_own_ct_and_frame(exported, tmp_path):
    _, ex, _, _ = exported
    rt = read_rt_set(ex.folder)
    again = export_rt_set(rt.patient, rt.plan.plan, tmp_path / "again", dose_gy=rt.dose_gy)
    assert again.frame_of_reference_uid == ex.frame_of_reference_uid
    assert [p.name for p in again.ct_files] == [p.name for p in ex.ct_files]
    assert _read(again.ct_files[5]).SOPInstanceUID == _read(ex.ct_files[5]).SOPInstanceUID
    with pytest.raises(ValueError, match="own CT"):
        export_rt_set(rt.patient, rt.plan.plan, ex.folder, dose_gy=rt.dose_gy)
    back = read_rt_set(tmp_path / "again")
    np.testing.assert_allclose(back.dose_gy, rt.dose_gy, rtol=0, atol=1e-5 * float(rt.dose_gy.max()))


def test_rtdose_for_a_phantom_takes_the_frame_of_its_written_ct(tmp_path):
    patient = water_box("coarse", size_mm=(40.0, 40.0, 20.0))
    assert patient.frame_of_reference_uid == ""
    dose = np.linspace(0, 2, patient.grid.size, dtype=np.float32).reshape(patient.grid.shape_zyx)
    with pytest.raises(ValueError, match="write_dicom_ct"):
        write_rtdose(dose, patient.grid, tmp_path / "RD.dcm")
    ct = write_dicom_ct(patient, tmp_path)
    write_rtdose(dose, patient.grid, tmp_path / "RD.dcm", ct_files=ct)
    back = read_dicom(tmp_path)
    assert read_rtdose(tmp_path / "RD.dcm", back.grid, back.frame_of_reference_uid) == pytest.approx(dose, abs=1e-6)
    with pytest.raises(InputError, match="FrameOfReferenceUID"):
        write_rtdose(dose, patient.grid, tmp_path / "RD2.dcm", "1.2.3", ct_files=ct)


def test_without_a_sequencer_a_modulated_map_is_refused_and_open_fields_pass(monkeypatch):
    import ids_engine.deliver as deliver

    session = Session.from_phantom("horseshoe", "coarse", n_beams=1)
    try:
        monkeypatch.delattr(deliver, "sequence_plan")
        engine = session.engine
        plan = deliverable_plan([g.beam for g in engine.geometry], engine.fluences_host(), prescription_gy=60.0,
                                fractions=3)
        assert len(plan.beams[0].segments) == 1
        assert plan.beams[0].mu * 3 == pytest.approx(float(session.engine.fluences_host()[0].max()), rel=1e-6)
        session.set_plan(wedged(session))
        with pytest.raises(ValueError, match="modulated"):
            deliverable_plan([g.beam for g in engine.geometry], engine.fluences_host(), prescription_gy=60.0)
    finally:
        session.close()


# ------------------------------------------------------------------ ids import-plan
def test_ids_import_plan_recomputes_the_exported_dose(exported, tmp_path, capsys):
    _, ex, _, _ = exported
    out = tmp_path / "imported"
    assert main(["import-plan", str(ex.folder), "--out", str(out)]) == 0
    assert "gamma 1 %/1 mm 100.0 % pass" in capsys.readouterr().out
    back = read_rtdose(out / "RD_ids.dcm", read_dicom(ex.folder).grid)
    np.testing.assert_allclose(back, ex.dose_gy, rtol=0, atol=0.01 * float(ex.dose_gy.max()))
    assert "horseshoe test" in (out / "summary.md").read_text()


def test_ids_import_plan_without_a_plan_is_refused(tmp_path, capsys):
    patient = water_box("coarse", size_mm=(20.0, 20.0, 10.0))
    write_dicom_ct(patient, tmp_path / "ct")
    assert main(["import-plan", str(tmp_path / "ct"), "--out", str(tmp_path / "out")]) == 2
    assert "no RTPLAN" in capsys.readouterr().err


# ------------------------------------------------------------------ ids export
def test_ids_export_of_a_saved_session(tmp_path, capsys):
    session = Session.from_phantom("horseshoe", "coarse", n_beams=2)
    session.set_plan(wedged(session))
    session.save(tmp_path / "session")
    session.close()
    out = tmp_path / "dicom"
    assert main(["export", str(tmp_path / "session"), "--out", str(out), "--fractions", "5"]) == 0
    text = capsys.readouterr().out
    assert "2 beams" in text and "research use only" in text
    rt = read_rt_set(out)
    assert rt.plan.plan.fractions == 5 and len(rt.plan.plan.beams) == 2
    # A non-empty folder is refused without --force, and nothing in it changes.
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", str(tmp_path / "session"), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_ids_export_of_an_rt_plan_folder_to_transa(exported, tmp_path, capsys):
    """Another system's set (here ours) re-exported: its plan, fractions and CT frame kept, the
    Transa patient ID from the CT's PatientID (T-1) and name (Test^Phantom)."""
    from ids_engine.io import read_transa_plan

    _, ex, plan, _ = exported
    config = tmp_path / "ElektaTransa.loc"
    config.write_text("/* file format version this file */ 1\n/* limit of number of plans per patient directory */ 3\n"
                      "/* limit of number of beams per plan */ 8\n/* name of machine to put in the file */MLC_01\n"
                      "/* number of characters of patient dept. id # to use */ 7\n"
                      "/* number of characters of last name of patient to use */ 3\n"
                      "/* number of characters of first name of patient to use */ 1\n"
                      "/* number of characters of middle name of patient to use */ 0\n")
    out = tmp_path / "again"
    assert main(["export", str(ex.folder), "--out", str(out), "--transa", str(config)]) == 0
    assert "transa" in capsys.readouterr().out.lower()
    rt = read_rt_set(out)
    assert rt.plan.plan.fractions == FRACTIONS and rt.patient.frame_of_reference_uid == ex.frame_of_reference_uid
    files = sorted((out / "transa").rglob("PLAN*.TXT"))
    assert files and all(f.parent.name.startswith("T1TESP") for f in files)
    fields = [f for path in files for f in read_transa_plan(path)["fields"]]
    assert len(fields) == sum(1 for sb in plan.beams for s in sb.segments if s.mu > 0)
    # Anonymised, the Transa IDs come from the pseudonyms too.
    assert main(["export", str(ex.folder), "--out", str(tmp_path / "anon"), "--anonymise", "--transa", str(config)]) == 0
    ids = {p.name for p in (tmp_path / "anon" / "transa").iterdir()}
    assert ids and all(i.startswith("ANON") and "T1" not in i for i in ids)


def test_ids_export_refusals(tmp_path, capsys):
    assert main(["export", "nowhere", "--out", str(tmp_path / "a")]) == 2
    assert "not a saved session folder" in capsys.readouterr().err
    assert main(["export", "horseshoe", "--resolution", "coarse", "--beams", "1", "--out", str(tmp_path / "c"),
                 "--transa", str(tmp_path / "missing.loc")]) == 2
    assert "missing.loc" in capsys.readouterr().err
    assert main(["export", "water", "--resolution", "coarse", "--out", str(tmp_path / "b")]) == 2
    assert "no target" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
