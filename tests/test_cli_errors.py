"""Bad input to the ``ids`` command line: one clear line on stderr, exit code 2, no traceback.

``ids shape`` checks a whole script before computing anything (every case here fails in
milliseconds: the open-field plan is never built), journals the session as it goes, and
never destroys an existing ``--out`` folder. Reports and logs name the case, not its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ids_engine import session as session_module
from ids_engine.cli import LIBRARIES, main
from ids_engine.io import write_dicom_ct, write_rtstruct
from ids_engine.model import Grid, Patient, Structure, StructureKind
from ids_engine.session import Session
from tests.test_cli import _fresh_backend, run

# test_cli's autouse fixture (each CLI call resolves IDS_BACKEND afresh) applies here too.
_fresh_backend = _fresh_backend

COARSE = {"phantom": "horseshoe", "resolution": "coarse"}


def assert_one_line_error(rc: int, out: str, err: str, *expected: str) -> str:
    """Exit code 2, a single ``error: ...`` line holding every ``expected`` text, no traceback."""
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    for leak in ("np.float64", "np.int64", "__init__()", "unexpected keyword"):
        assert leak not in lines[0]
    return lines[0]


def write_script(folder: Path, name: str = "s.json", **fields) -> Path:
    doc = {"case": COARSE, "prescription_gy": 60, "beams": 3, "recovery_steps": 0, "requests": []}
    doc.update(fields)
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def coarse_patient():
    return session_module.case_from_spec(COARSE)


@pytest.fixture
def no_computing(monkeypatch, coarse_patient):
    """The phantom is built once per module, and building a plan fails the test."""
    real = session_module.case_from_spec
    monkeypatch.setattr(session_module, "case_from_spec",
                        lambda spec: coarse_patient if spec == COARSE else real(spec))

    def computed(*a, **k):
        raise AssertionError("ids shape started computing before it found the error")

    monkeypatch.setattr(Session, "open_field_plan", computed)


def _line(**over):
    r = {"kind": "move_isodose_line", "axis": "z", "slice_index": 21, "level_pct": 95,
         "start_rc": [30, 40], "end_rc": [26, 40]}
    return {**r, **over}


def _voxel(**over):
    return {"kind": "set_voxel_dose", "index_zyx": [21, 22, 40], "dose_pct": 55, **over}


GOOD = _voxel()

# (script fields, texts the error line must hold). Every bad entry comes after a good one:
# nothing may run before the whole script is checked.
BAD_SCRIPTS = {
    "prescription 0": ({"prescription_gy": 0}, ["prescription_gy must be a positive number, got 0"]),
    "prescription negative": ({"prescription_gy": -5}, ["prescription_gy", "got -5"]),
    "prescription string": ({"prescription_gy": "60"}, ["prescription_gy", "got '60'"]),
    "prescription NaN": ({"prescription_gy": float("nan")}, ["prescription_gy", "got nan"]),
    "beams 0": ({"beams": 0}, ["beams must be a whole number, 1 or more, got 0"]),
    "beams string": ({"beams": "nine"}, ["beams", "got 'nine'"]),
    "beams fraction": ({"beams": 2.5}, ["beams", "got 2.5"]),
    "margin negative": ({"margin_mm": -3}, ["margin_mm", "got -3"]),
    "recovery steps": ({"recovery_steps": -1}, ["recovery_steps", "got -1"]),
    "unknown key": ({"prescription": 60}, ["unknown key 'prescription'", "prescription_gy"]),
    "case string": ({"case": "horseshoe"}, ["case must be an object", "got 'horseshoe'"]),
    "unknown phantom": ({"case": {"phantom": "nope"}}, ["case.phantom must be one of", "got 'nope'"]),
    "bad resolution": ({"case": {"phantom": "horseshoe", "resolution": "fine"}}, ["case.resolution", "got 'fine'"]),
    "two cases": ({"case": {"phantom": "horseshoe", "dicom": "x"}}, ["exactly one of"]),
    "missing dicom": ({"case": {"dicom": "/nowhere/at/all"}}, ["case.dicom: no such folder"]),
    "no target": ({"case": {"phantom": "water", "resolution": "coarse"}}, ["has no target structure", "BODY"]),
    "request not an object": ({"requests": [GOOD, 3]}, ["requests[1]", "got 3"]),
    "unknown kind": ({"requests": [GOOD, {"kind": "teleport"}]}, ["requests[1]", "unknown request kind 'teleport'"]),
    "unknown field": ({"requests": [GOOD, _voxel(x=1)]},
                      ["requests[1]: unknown field 'x' for a set_voxel_dose request; expected: index_zyx, dose_gy"]),
    "missing field": ({"requests": [GOOD, {"kind": "pin", "name": "a"}]}, ["requests[1]", "needs the fields", "centre_zyx"]),
    "dose string": ({"requests": [GOOD, _voxel(dose_pct="x")]}, ["requests[1].dose_pct must be a number, got 'x'"]),
    "dose negative": ({"requests": [GOOD, _voxel(dose_pct=-5)]}, ["requests[1].dose_pct must be non-negative, got -5"]),
    "dose gy and pct": ({"requests": [GOOD, _voxel(dose_gy=3)]}, ["requests[1]", "not both"]),
    "index too short": ({"requests": [GOOD, _voxel(index_zyx=[21, 22])]},
                        ["requests[1].index_zyx must be 3 integers, got [21, 22]"]),
    "index fraction": ({"requests": [GOOD, _voxel(index_zyx=[21, 22, 40.5])]}, ["requests[1].index_zyx", "got [21, 22, 40.5]"]),
    "index outside": ({"requests": [GOOD, _voxel(index_zyx=[50, 0, 0])]}, ["requests[1].index_zyx [50, 0, 0] lies outside the grid"]),
    "point outside": ({"requests": [GOOD, {"kind": "set_voxel_dose", "point_mm_xyz": [0, 1000, 0], "dose_gy": 3}]},
                      ["requests[1].point_mm_xyz [0, 1000, 0] mm lies outside the grid"]),
    "slice out of range": ({"requests": [GOOD, _line(slice_index=43)]}, ["requests[1].slice_index 43 is outside 0..42"]),
    "slice string": ({"requests": [GOOD, _line(slice_index="a")]}, ["requests[1].slice_index must be an integer, got 'a'"]),
    "axis": ({"requests": [GOOD, _line(axis="w")]}, ["requests[1].axis must be 'z', 'y' or 'x', got 'w'"]),
    "drag start too long": ({"requests": [GOOD, _line(start_rc=[30, 40, 1])]}, ["requests[1].start_rc must be 2 numbers"]),
    "drag end off the slice": ({"requests": [GOOD, _line(end_rc=[26, 400])]}, ["requests[1].end_rc [26, 400] lies outside"]),
    "width negative": ({"requests": [GOOD, _line(width_mm=-6)]}, ["requests[1].width_mm must be positive, got -6"]),
    "unknown structure": ({"requests": [GOOD, {"kind": "erase_spot", "centre_zyx": [21, 30, 40], "radius_mm": 6,
                                               "low_pct": 95, "high_pct": 107, "structure": "NOPE"}]},
                          ["requests[1].structure: no structure called 'NOPE'; known: PTV, OAR, BODY"]),
    "erase bounds": ({"requests": [GOOD, {"kind": "erase_spot", "centre_zyx": [21, 30, 40], "radius_mm": 6,
                                          "low_pct": 107, "high_pct": 95}]}, ["requests[1].high_pct", "low <= high"]),
    "pin radius 0": ({"requests": [GOOD, {"kind": "pin", "name": "a", "centre_zyx": [21, 22, 40], "radius_mm": 0}]},
                     ["requests[1].radius_mm must be positive, got 0"]),
    "pin radius NaN": ({"requests": [GOOD, {"kind": "pin", "name": "a", "centre_zyx": [21, 22, 40], "radius_mm": float("nan")}]},
                       ["requests[1].radius_mm must be a finite number, got nan"]),
    "pin without a name": ({"requests": [GOOD, {"kind": "pin", "name": "", "centre_zyx": [21, 22, 40], "radius_mm": 4}]},
                           ["requests[1].name must be a non-empty name"]),
    "undo with fields": ({"requests": [GOOD, {"kind": "undo", "steps": 2}]}, ["requests[1]: unknown field 'steps' for undo"]),
    "request steps": ({"requests": [GOOD, _voxel(recovery_steps="many")]}, ["requests[1].recovery_steps", "got 'many'"]),
}


@pytest.mark.parametrize("name", list(BAD_SCRIPTS))
def test_bad_script_is_one_line_naming_file_entry_and_value(name, tmp_path, capsys, no_computing):
    fields, expected = BAD_SCRIPTS[name]
    script = write_script(tmp_path, **fields)
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, out, err, str(script), *expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON (line 1"),
    ("[1, 2]", "a script needs a 'case' object and a 'requests' list"),
    (b"\xff\xfe{}", "not a text file"),
])
def test_unreadable_script_text(text, expected, tmp_path, capsys):
    script = tmp_path / "s.json"
    script.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, out, err, str(script), expected)


def test_unreadable_script_file(tmp_path, capsys, monkeypatch):
    script = write_script(tmp_path)
    real = Path.read_text

    def denied(self, *a, **k):
        if self == script:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, out, err, str(script), "cannot read (Permission denied)")


@pytest.mark.parametrize("make_out, expected", [
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "a file, not a folder"),
    (lambda p: p / "missing" / "out", "does not exist"),
])
def test_bad_out_is_refused_before_computing(make_out, expected, tmp_path, capsys, no_computing):
    script = write_script(tmp_path, requests=[GOOD])
    out_dir = make_out(tmp_path)
    rc, out, err = run(["shape", str(script), "--out", str(out_dir)], capsys)
    assert_one_line_error(rc, out, err, "--out", expected)


def test_unwritable_out_is_refused(tmp_path, capsys, monkeypatch, no_computing):
    import ids_engine.scripting as scripting

    script = write_script(tmp_path, requests=[GOOD])
    monkeypatch.setattr(scripting.os, "access", lambda *a, **k: False)
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, out, err, "--out", "permission denied")


# ---------------------------------------------------------------- work is never lost
def _session_folder(tmp_path: Path, requests: list) -> tuple[Path, Path]:
    script = write_script(tmp_path, requests=requests)
    return script, tmp_path / "out"


def test_existing_out_is_refused_and_left_intact(tmp_path, capsys):
    script, out_dir = _session_folder(tmp_path, [GOOD])
    rc, _, err = run(["shape", str(script), "--out", str(out_dir)], capsys)
    assert rc == 0, err
    before = {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    rc, out, err = run(["shape", str(script), "--out", str(out_dir)], capsys)
    assert_one_line_error(rc, out, err, "exists and is not empty", "--force")
    after = {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    assert after == before


def test_force_replaces_out_only_when_the_new_session_is_complete(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("the previous run")
    script = write_script(tmp_path, requests=[GOOD, _voxel(index_zyx=[21, 22, 41]), {"kind": "undo"}])
    # Interrupted half-way: the old folder is untouched, the partial session beside it reopens.
    calls = {"n": 0}
    real_run = Session.run

    def stop_on_second(self, req, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(self, req, **kw)

    monkeypatch.setattr(Session, "run", stop_on_second)
    rc, _, err = run(["shape", str(script), "--out", str(out_dir), "--force"], capsys)
    assert rc == 130 and "Traceback" not in err
    assert "interrupted after 1 of 3 requests" in err
    assert (out_dir / "old.txt").read_text() == "the previous run"
    (partial,) = tmp_path.glob("out.partial-*")
    assert str(partial) in err
    with Session.load(partial, keep_journaling=False) as s:
        assert len(s.journal) == 1
    # Run to the end: the old folder is gone, the new one is complete, nothing left beside it.
    monkeypatch.setattr(Session, "run", real_run)
    rc, _, err = run(["shape", str(script), "--out", str(out_dir), "--force"], capsys)
    assert rc == 0, err
    assert not (out_dir / "old.txt").exists()
    assert (out_dir / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.")) == [partial.name]
    with Session.load(out_dir, keep_journaling=False) as s:
        assert len(s.journal) == 1 and s.can_redo  # two requests, then one undone


def test_a_kill_mid_script_leaves_a_session_with_the_completed_requests(tmp_path, capsys, monkeypatch):
    requests = [GOOD, _voxel(index_zyx=[21, 22, 41], dose_pct=60), _voxel(index_zyx=[21, 22, 42])]
    script, out_dir = _session_folder(tmp_path, requests)
    calls = {"n": 0}
    real_run = Session.run
    doses = []

    def stop_on_third(self, req, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            doses.append(self.dose())
            raise KeyboardInterrupt
        return real_run(self, req, **kw)

    monkeypatch.setattr(Session, "run", stop_on_third)
    rc, _, err = run(["shape", str(script), "--out", str(out_dir)], capsys)
    assert rc == 130 and "Traceback" not in err
    assert "interrupted after 2 of 3 requests" in err and "no report" in err
    assert not (out_dir / "report.md").exists()
    with Session.load(out_dir, keep_journaling=False) as s:
        assert [r.request.index_zyx for r in s.journal] == [(21, 22, 40), (21, 22, 41)]
        np.testing.assert_allclose(s.dose(), doses[0], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- demo, info, pipes, permissions
@pytest.mark.parametrize("argv, expected", [
    (["--beams", "0"], "--beams: must be a whole number, 1 or more, got 0"),
    (["--beams", "x"], "--beams: must be a whole number"),
    (["--prescription-gy", "-5"], "--prescription-gy: must be a positive number, got -5"),
    (["--prescription-gy", "nan"], "--prescription-gy: must be a positive number, got nan"),
    (["--margin-mm", "-1"], "--margin-mm: must be a number, 0 or more, got -1"),
])
def test_demo_refuses_bad_numbers(argv, expected, capsys):
    rc, out, err = run(["demo", "--phantom", "tg119", "--resolution", "coarse", *argv], capsys)
    assert rc == 2 and "Traceback" not in out + err
    assert expected in err.strip().splitlines()[-1]
    assert out == ""  # refused before anything ran


def test_info_prints_every_library_it_promises(capsys, monkeypatch):
    from importlib import metadata

    import pydicom
    import scipy

    real = metadata.version

    def without_cupy(name):
        if name.startswith("cupy"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", without_cupy)
    monkeypatch.setenv("IDS_BACKEND", "numpy")
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    lines = out.splitlines()
    for name, _, _ in LIBRARIES:
        assert sum(line.startswith(f"{name} ") for line in lines) == 1, name
    assert f"numpy {np.__version__}" in lines and f"scipy {scipy.__version__}" in lines
    assert f"pydicom {pydicom.__version__}" in lines
    assert "cupy not installed (gpu extra)" in lines
    rc, out, _ = run(["info", "--help"], capsys)
    for name in ("numpy", "scipy", "pydicom", "cupy", "vispy", "PyQt6"):
        assert name in out


class _ClosedPipe:
    """A stdout whose reader has gone away."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise ValueError("no file descriptor")


def test_a_closed_pipe_ends_quietly(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    rc = main(["info"])
    err = capsys.readouterr().err
    assert rc == 141
    assert err == ""


def test_a_closed_pipe_in_a_real_process_prints_no_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "ids_engine.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "IDS_BACKEND": "numpy"})
    proc.stdout.close()  # like `ids info | head -0`
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_an_unreadable_input_is_one_line(tmp_path, capsys, monkeypatch):
    import ids_engine.io

    def denied(path, **kw):
        raise PermissionError(13, "Permission denied", str(Path(path) / "CT1.dcm"))

    monkeypatch.setattr(ids_engine.io, "read_dicom", denied)
    rc, out, err = run(["inspect", str(tmp_path)], capsys)
    assert_one_line_error(rc, out, err, "CT1.dcm", "Permission denied")


# ---------------------------------------------------------------- reports name a case, not a path
PATIENT_FOLDER = "DOE^JOHN_12345"


def _tiny_dicom_case(folder: Path, *, target: bool = True) -> Path:
    grid = Grid((6, 16, 16), (3.0, 2.0, 2.0), (-15.0, -15.0, -7.5))
    c = grid.voxel_centres_xyz()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    body = (x / 13.0) ** 2 + (y / 11.0) ** 2 < 1.0
    ptv = body & (np.hypot(x - 3.0, y) < 5.0) & (np.abs(z) < 5.0)
    structures = [Structure("BODY", StructureKind.EXTERNAL, body, grid, (0.6, 0.6, 0.6))]
    if target:
        structures.append(Structure("PTV", StructureKind.TARGET, ptv, grid, (1.0, 0.0, 0.0)))
    patient = Patient(grid, np.where(body, 10.0, -1000.0).astype(np.float32), tuple(structures), name="tiny")
    folder.mkdir()
    files = write_dicom_ct(patient, folder, patient_name="Doe^John", patient_id="12345")
    write_rtstruct(patient, folder / "RS.dcm", files)
    return folder


def test_reports_and_logs_name_the_case_not_the_dicom_folder(tmp_path, capsys):
    from ids_engine.session import case_label

    case = {"dicom": str(_tiny_dicom_case(tmp_path / PATIENT_FOLDER))}
    script = write_script(tmp_path, case=case, beams=3, requests=[
        {"kind": "set_voxel_dose", "index_zyx": [3, 8, 9], "dose_pct": 90}, {"kind": "undo"}])
    out_dir = tmp_path / "out"
    rc, out, err = run(["shape", str(script), "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert PATIENT_FOLDER not in out + err
    label = case_label(case)
    for name in ("report.md", "report.json"):
        text = (out_dir / name).read_text()
        assert PATIENT_FOLDER not in text and "DOE" not in text
        assert label in text
    # session.json keeps the path: reopening needs it.
    assert json.loads((out_dir / "session.json").read_text())["case"] == case


def test_errors_name_the_case_not_the_dicom_folder(tmp_path, capsys):
    folder = _tiny_dicom_case(tmp_path / PATIENT_FOLDER, target=False)
    script = write_script(tmp_path, case={"dicom": str(folder)})
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(rc, out, err, "DICOM case", "has no target structure")
    assert PATIENT_FOLDER not in err
    # A reader error names the damaged file inside the case, not the folder.
    (folder / "CT_junk.dcm").write_bytes(b"DICM" * 10)
    for f in folder.glob("*.dcm"):
        if f.name != "RS.dcm" and f.name != "CT_junk.dcm":
            f.write_bytes(f.read_bytes()[:300])
            break
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    line = assert_one_line_error(rc, out, err, "DICOM case")
    assert PATIENT_FOLDER not in line


def test_an_unreadable_dicom_folder_is_one_line_without_its_path(tmp_path, capsys, monkeypatch):
    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()

    def denied(spec):
        raise PermissionError(13, "Permission denied", str(folder / "CT1.dcm"))

    monkeypatch.setattr(session_module, "case_from_spec", denied)
    script = write_script(tmp_path, case={"dicom": str(folder)})
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    line = assert_one_line_error(rc, out, err, "case: cannot read DICOM case", "CT1.dcm: Permission denied")
    assert PATIENT_FOLDER not in line
