"""``ids inspect`` says what it read beyond the grid: the structure set or its absence, RT
Doses found, reader warnings; bad input is one error line naming the file."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

import ids_engine.io
from ids_engine import backend
from ids_engine.cli import build_parser, main
from ids_engine.io import write_rtdose
from tests.io.test_dicom import GRID, write_case
from tests.io.test_matrad import _encoded_cube, _phantom_vars, cell, write_mat


@pytest.fixture(autouse=True)
def _fresh_backend():
    backend.reset_backend()
    yield
    backend.reset_backend()


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect_case")
    patient, _, _ = write_case(folder)
    return patient, folder


def _inspect(path: Path, capsys) -> tuple[int, str, str]:
    rc = main(["inspect", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_names_the_structure_set_and_an_rtdose(dicom_case, tmp_path, capsys):
    patient, folder = dicom_case
    case = tmp_path / "Doe_John"
    shutil.copytree(folder, case)
    write_rtdose(np.full(GRID.shape_zyx, 2.5), GRID, case / "RD.dcm", patient.frame_of_reference_uid)
    rc, out, err = _inspect(case, capsys)
    assert rc == 0, err
    assert "structure set: RS.dcm" in out
    assert "RT Dose: RD.dcm: max 2.50 Gy on the CT grid (not used by inspect)" in out
    assert "Doe_John" not in out + err
    assert err == ""


def test_inspect_says_when_there_is_no_rtstruct(dicom_case, tmp_path, capsys):
    _, folder = dicom_case
    case = tmp_path / "ct_only"
    shutil.copytree(folder, case)
    (case / "RS.dcm").unlink()
    rc, out, err = _inspect(case, capsys)
    assert rc == 0, err
    assert "structure set: none (no RTSTRUCT in the folder)" in out
    assert "RT Dose" not in out


def test_inspect_prints_reader_warnings(dicom_case, tmp_path, capsys):
    _, folder = dicom_case
    case = tmp_path / "no_rescale"
    shutil.copytree(folder, case)
    for f in sorted(case.glob("CT_*.dcm")):
        ds = pydicom.dcmread(f)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(f, enforce_file_format=True)
    rc, out, err = _inspect(case, capsys)
    assert rc == 0, err
    assert err.startswith("warning: no RescaleSlope or RescaleIntercept in any of the 20 CT slices")


def test_inspect_refuses_a_truncated_structure_set(dicom_case, tmp_path, capsys):
    _, folder = dicom_case
    case = tmp_path / "cut"
    shutil.copytree(folder, case)
    data = (case / "RS.dcm").read_bytes()
    (case / "RS.dcm").write_bytes(data[: len(data) // 2])
    rc, out, err = _inspect(case, capsys)
    assert rc == 2
    assert err.startswith("error: ") and "RS.dcm" in err and "truncated" in err


def test_inspect_refuses_a_nan_ct_voxel(tmp_path, capsys):
    cube = _encoded_cube()
    cube[0, 0, 0] = np.nan
    path = write_mat(tmp_path / "nan.mat", _phantom_vars(ct_changes={"cubeHU": cell(cube)}), "v5")
    rc, out, err = _inspect(path, capsys)
    assert rc == 2
    assert "nan.mat: ct.cubeHU: 1 of 60 voxels are not finite" in err


def _string_constants(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)]


def test_options_suggested_by_reader_errors_exist():
    """Every ``--option`` that an input error message mentions is an option of some ``ids`` command."""
    parser = build_parser()
    options = set()
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values():
            if hasattr(sub, "_actions"):
                options.update(s for a in sub._actions for s in a.option_strings)
    assert "--out" in options
    mentioned = set()
    for source in Path(ids_engine.io.__file__).parent.glob("*.py"):
        for text in _string_constants(source):
            mentioned.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    assert mentioned <= options, sorted(mentioned - options)
    # Python keywords are not offered as if they were options.
    for source in Path(ids_engine.io.__file__).parent.glob("*.py"):
        for text in _string_constants(source):
            assert not re.search(r"\bpass \w+=", text), text
