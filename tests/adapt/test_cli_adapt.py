"""`ids adapt` from the command line: outputs, refusals, errors naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from ids_engine.cli import main

SPEC = "horseshoe:coarse;shift_mm=4,-3,0"


def test_ids_adapt_end_to_end_with_fiducials(approved_dir, tmp_path, capsys):
    out = tmp_path / "out"
    store = tmp_path / "store"
    rc = main(["adapt", str(approved_dir), SPEC, "--out", str(out), "--registration", "fiducial",
               "--gamma-points", "5000", "--store", str(store), "--plan-name", "week 2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "registration (fiducial)" in text
    doc = json.loads((out / "adapt.json").read_text())
    assert doc["registration"]["kind"] == "fiducial"
    assert doc["registration"]["metrics"]["rms_residual_mm"] < 0.5
    assert doc["registration_error_vs_truth"]["max_mm"] < 0.5
    q = json.loads((out / "qualification.json").read_text())
    assert ("AUTO-QUALIFIED FOR REVIEW" in text) == q["auto_qualified_for_review"]
    report = (out / "adapt_report.md").read_text()
    assert "## Decision" in report and "## Gamma" in report and "adapt_dvh.png" in report
    assert "data:image/png;base64" in (out / "adapt_report.html").read_text()
    # The adapted plan is in the store, with its comparison and qualification as evidence.
    from ids_engine.store import PlanStore

    with PlanStore.open(store) as st:
        [ref] = st.list_plans()
        assert ref.name == "week 2" and ref.n_requests == len(doc["adaptation"]["replay"]) - sum(
            not e.get("replayed") for e in doc["adaptation"]["replay"])
        assert ref.status == ("auto-qualified" if q["auto_qualified_for_review"] else "draft")
        [ev] = st.evidence(ref, "adaptation")
        assert ev["doc"]["qualification"] == json.loads(json.dumps(q))
        assert ev["doc"]["comparison"]["adapted"]["gamma"]["3%/3mm"]["points"] == 5000
        assert st.check() == []
    # The stored plan carries its new CT (the case is ../new_ct beside its session): it reopens
    # from the store even after the output folder is gone.
    (out / "new_ct").rename(tmp_path / "new_ct_away")
    with PlanStore.open(store) as st:
        s = st.load_session(ref, write=False)
        assert s.patient.structure_names == ("PTV", "OAR", "BODY")
        s.close()
        # ... and so does a copy of it within the store.
        copy = st.copy_plan(ref, "week 2 copy")
        s = st.load_session(copy, write=False)
        assert s.patient.structure_names == ("PTV", "OAR", "BODY")
        s.close()
        # ... and a stored plan opened for writing and stored again under a new name.
        s = st.load_session(copy, write=True)
        again = st.save_session(s, patient_key=copy.patient_key, plan_name="week 2 again")
        s.close()
        s = st.load_session(again, write=False)
        assert s.patient.structure_names == ("PTV", "OAR", "BODY")
        s.close()
        assert st.check() == []
    (tmp_path / "new_ct_away").rename(out / "new_ct")
    assert doc["store"]["plan_name"] == "week 2" and "stored in" in text

    # The adapted session's case is the written new CT: it reopens from the folder.
    from ids_engine.session import Session

    s = Session.load(out / "session", keep_journaling=False)
    assert s.case == {"dicom": "../new_ct", "relative_to": "session"}  # the output folder can move
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert Session.load(moved / "session", keep_journaling=False).patient.structure_names == ("PTV", "OAR", "BODY")
    # Saved elsewhere ("save as"), the case is written absolute: the copy reopens on its own.
    s.save(tmp_path / "elsewhere" / "session")
    again = Session.load(tmp_path / "elsewhere" / "session", keep_journaling=False)
    assert again.case == {"dicom": str((out / "new_ct").resolve())}
    assert again.patient.structure_names == ("PTV", "OAR", "BODY")
    assert s.patient.structure_names == ("PTV", "OAR", "BODY")

    # A second run into the same folder is refused without --force, then replaces it with it.
    rc = main(["adapt", str(approved_dir), SPEC, "--out", str(out), "--registration", "identity"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    rc = main(["adapt", str(approved_dir), SPEC, "--out", str(out), "--registration", "identity",
               "--reoptimise", "never", "--gamma-points", "2000", "--force"])
    assert rc == 0
    assert json.loads((out / "adapt.json").read_text())["registration"]["kind"] == "identity"


@pytest.mark.parametrize("args, words", [
    (["horseshoe:coarse;shift_mm=1,2"], "shift_mm"),
    (["nosuchphantom:coarse"], "nosuchphantom"),
    (["horseshoe:coarse", "--tolerance", "{tmp}/bad.toml"], "bad.toml: limits.target.D95_percent"),
    (["horseshoe:coarse", "--registration", "fiducial", "--fiducials", "{tmp}/a.csv", "{tmp}/b.csv"], "a.csv"),
    (["horseshoe:coarse", "--fiducials", "{tmp}/a.csv", "{tmp}/b.csv"], "--fiducials is for --registration fiducial"),
])
def test_errors_name_the_input(approved_dir, tmp_path, capsys, args, words):
    (tmp_path / "bad.toml").write_text("[limits.target]\nD95_percent = 3\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(["adapt", str(approved_dir), *args, "--out", str(tmp_path / "out")])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_not_an_approved_plan_is_refused(tmp_path, capsys):
    rc = main(["adapt", str(tmp_path), "horseshoe:coarse", "--out", str(tmp_path / "out")])
    assert rc == 2 and "not an approved plan" in capsys.readouterr().err
