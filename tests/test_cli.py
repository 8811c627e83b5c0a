"""The ``ids`` command line, driven through :func:`ids_engine.cli.main` with an argv list."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from ids_engine import __version__, backend
from ids_engine.cli import build_parser, main
from ids_engine.io import read_dicom, write_dicom_ct, write_rtstruct
from ids_engine.model import Grid, Patient, Structure, StructureKind
from ids_engine.phantoms import tg119

# Subcommand -> words its --help must contain (its purpose).
SUBCOMMANDS = {
    "info": ("version", "backend"),
    "demo": ("phantom", "DVH"),
    "inspect": ("DICOM", "matRad", "structures"),
    "shape": ("JSON", "requests", "report"),
    "view": ("viewer", "phantom", "session"),
    "plan": ("protocol", "goals", "session"),
    # Commands in their own modules (ids_engine/cli_*.py).
    "autoweight": ("case", "prescription", "monitor units"),
    "planbook": ("plan book", "copy", "opposed"),
    "conform": ("arc", "target", "margin"),
    "points": ("point", "measured", "beam"),
    "dvh": ("sampling", "partial volumes", "session"),
    "sequence": ("segments", "deliverable"),
    "export": ("DICOM", "research"),
    "import-plan": ("RT Plan", "dose"),
    "store": ("SQLite", "approve", "anonymised"),
    "adapt": ("approved plan", "register", "tolerance profile"),
}


@pytest.fixture(autouse=True)
def _fresh_backend():
    backend.reset_backend()
    yield
    backend.reset_backend()


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``ids argv``; return (exit code, stdout, stderr). ``--help`` exits via SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def table_rows(out: str, header_start: str) -> dict[str, list[str]]:
    """Rows of the aligned table whose header line starts with ``header_start``, by first cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert set(lines[start + 1].replace(" ", "")) == {"-"}, "no rule under the table header"
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


# ---------------------------------------------------------------- help and info
def test_top_level_help(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    assert out.startswith("usage: ids")
    assert "interactive dose shaping" in out
    for name in SUBCOMMANDS:
        assert name in out


def test_no_command_prints_help(capsys):
    rc, out, _ = run([], capsys)
    assert rc == 0
    assert "usage: ids" in out


def test_every_subcommand_is_covered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)


_HELP_XFAIL: dict = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=_HELP_XFAIL.get(n, ())) for n in sorted(SUBCOMMANDS)])
def test_subcommand_help(capsys, name):
    rc, out, err = run([name, "--help"], capsys)
    assert rc == 0, err
    assert out.startswith(f"usage: ids {name}")
    for word in SUBCOMMANDS[name]:
        assert word.lower() in out.lower(), f"`ids {name} --help` does not mention {word!r}"


def test_version(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"ids-engine {__version__}"
    assert any(line.startswith("backend: ") for line in lines)


def test_info(capsys, monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "numpy")
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    assert f"ids-engine {__version__}" in out
    assert f"backend: numpy on {backend.cpu_name()} (IDS_BACKEND=numpy)" in out
    assert f"numpy {np.__version__}" in out
    assert f"scipy {scipy.__version__}" in out


def test_info_with_a_bad_backend_says_so(capsys, monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "opencl")
    rc, out, err = run(["info"], capsys)
    assert rc == 0
    assert "backend: unavailable" in out and "'opencl'" in out
    assert "Traceback" not in out + err


def test_demo_with_unusable_gpu_backend_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "cupy")
    monkeypatch.setattr(backend, "_import_cupy", lambda: (None, "no device"))
    rc, out, err = run(["demo", "--phantom", "tg119", "--resolution", "coarse", "--beams", "1"], capsys)
    assert rc == 2
    assert err.startswith("error: IDS_BACKEND=cupy")
    assert "Traceback" not in out + err


def test_bad_arguments_exit_2(capsys):
    rc, _, err = run(["demo", "--phantom", "nope"], capsys)
    assert rc == 2
    assert "invalid choice" in err


# ---------------------------------------------------------------- demo
def test_demo_tg119_coarse(capsys):
    """Structures with volumes, then the dose engine's DVH table, normalised to the prescription."""
    rc, out, err = run(["demo", "--phantom", "tg119", "--resolution", "coarse", "--beams", "4"], capsys)
    assert rc == 0, err
    assert "Traceback" not in out + err
    assert "4 equispaced coplanar beams" in out

    expected = {r["name"]: r for r in tg119(resolution="coarse").summary()}
    structures = table_rows(out, "structure  ")
    assert set(structures) == set(expected)
    for name, (kind, voxels, volume) in structures.items():
        assert kind == expected[name]["kind"]
        assert int(voxels) == expected[name]["voxels"]
        assert float(volume) == pytest.approx(expected[name]["volume_cc"], abs=0.05)

    header = next(line for line in out.splitlines() if "mean Gy" in line)
    for col in ("D98 Gy", "D95 Gy", "D2 Gy", "max Gy", "V95 %", "V107 %"):
        assert col in header
    dvh = table_rows(out, header)
    assert set(dvh) == set(expected)
    for name, cells in dvh.items():
        kind, mean, d98, d95, d2, dmax, v95, v107 = cells
        mean, d98, d95, d2, dmax, v95, v107 = map(float, (mean, d98, d95, d2, dmax, v95, v107))
        assert 0.0 <= d98 <= d95 <= d2 <= dmax, name
        assert 0.0 <= mean <= dmax, name
        assert 0.0 <= v107 <= v95 <= 100.0, name
    # Normalised so the target's median dose is 60 Gy: its mean and near-minimum lie close.
    kind, mean, d98, *_ = dvh["OuterTarget"]
    assert kind == "target"
    assert float(mean) == pytest.approx(60.0, abs=3.0)
    assert float(d98) > 45.0
    assert float(dvh["BODY"][1]) < float(mean)


def test_demo_without_target_stops_after_structures(capsys):
    rc, out, err = run(["demo", "--phantom", "water", "--resolution", "coarse"], capsys)
    assert rc == 0, err
    assert "BODY" in table_rows(out, "structure  ")
    assert "no target structure" in out
    assert "mean Gy" not in out


# ---------------------------------------------------------------- inspect
def _tiny_patient() -> Patient:
    grid = Grid((6, 16, 16), (3.0, 2.0, 2.0), (-15.0, -15.0, -7.5))
    c = grid.voxel_centres_xyz()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    body = (x / 13.0) ** 2 + (y / 11.0) ** 2 < 1.0
    ptv = body & (np.hypot(x - 3.0, y) < 5.0) & (np.abs(z) < 5.0)
    cord = body & (np.abs(x + 7.0) < 2.5) & (np.abs(y) < 2.5)
    ct = np.where(body, 10.0, -1000.0).astype(np.float32)
    return Patient(grid, ct, (
        Structure("BODY", StructureKind.EXTERNAL, body, grid, (0.6, 0.6, 0.6)),
        Structure("PTV", StructureKind.TARGET, ptv, grid, (1.0, 0.0, 0.0)),
        Structure("SpinalCord", StructureKind.OAR, cord, grid, (0.0, 0.0, 1.0)),
    ), name="tiny")


def test_inspect_dicom_folder(tmp_path, capsys):
    patient = _tiny_patient()
    files = write_dicom_ct(patient, tmp_path, patient_name="Test^Tiny", patient_id="T1")
    write_rtstruct(patient, tmp_path / "RS.dcm", files)
    back = read_dicom(tmp_path)

    rc, out, err = run(["inspect", str(tmp_path)], capsys)
    assert rc == 0, err
    assert out.startswith(f"grid: {patient.grid.describe()}")
    rows = table_rows(out, "structure  ")
    assert set(rows) == {"BODY", "PTV", "SpinalCord"}
    for s in back.structures:
        kind, voxels, volume = rows[s.name]
        assert kind == s.kind.value
        assert int(voxels) == s.voxel_count
        assert float(volume) == pytest.approx(s.volume_cc, abs=0.05)
    for s in patient.structures:  # and the round trip kept the volumes
        assert float(rows[s.name][2]) == pytest.approx(s.volume_cc, rel=0.1)


def test_inspect_matrad_v5(tmp_path, capsys):
    """A 4 x 5 x 3 matRad phantom (MATLAB [y x z] cube, 1-based column-major indices)."""
    ny, nx, nz = 4, 5, 3
    cube = np.zeros((ny, nx, nz))
    cube_cell = np.empty((1, 1), dtype=object)
    cube_cell[0, 0] = cube
    ct = {
        "cubeHU": cube_cell,
        "resolution": {"x": 5.0, "y": 5.0, "z": 5.0},
        "x": 5.0 * np.arange(nx), "y": 5.0 * np.arange(ny), "z": 5.0 * np.arange(nz),
        "cubeDim": np.array([ny, nx, nz], dtype=np.float64),
        "numOfCtScen": 1.0,
    }

    def indices(n_voxels: int) -> np.ndarray:
        c = np.empty((1, 1), dtype=object)
        c[0, 0] = np.arange(1, n_voxels + 1, dtype=np.float64).reshape(-1, 1)
        return c

    props = {"Priority": 1.0, "alphaX": 0.1, "betaX": 0.05, "Visible": 1.0}
    rows = [(0.0, "Target", "TARGET", indices(8)), (1.0, "Rectum", "OAR", indices(3)),
            (2.0, "Skin", "OAR", indices(ny * nx * nz))]
    cst = np.empty((len(rows), 6), dtype=object)
    for r, row in enumerate(rows):
        cst[r, :4] = row
        cst[r, 4] = props
        cst[r, 5] = np.empty((1, 0), dtype=object)
    path = tmp_path / "tiny.mat"
    scipy.io.savemat(path, {"ct": ct, "cst": cst}, oned_as="row")

    rc, out, err = run(["inspect", str(path)], capsys)
    assert rc == 0, err
    assert out.startswith("grid: 5x4x3 voxels of 5x5x5 mm")
    table = table_rows(out, "structure  ")
    assert table["Target"] == ["target", "8", "1.0"]  # 8 voxels of 0.125 cm3
    assert table["Rectum"] == ["oar", "3", "0.4"]
    assert table["Skin"][1:] == [str(ny * nx * nz), "7.5"]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: d / "missing" / "case.mat", id="missing-mat"),
        pytest.param(lambda d: d / "missing-folder", id="missing-folder"),
        pytest.param(lambda d: _write(d / "junk.mat", b"\x00garbage" * 40), id="garbage-mat"),
        pytest.param(lambda d: _write(d / "junk" / "CT1.dcm", b"not dicom").parent, id="garbage-folder"),
        pytest.param(lambda d: (d / "empty").mkdir() or d / "empty", id="empty-folder"),
        pytest.param(lambda d: _write(d / "notes.txt", b"hello"), id="other-file"),
    ],
)
def test_inspect_bad_input_exits_2_naming_the_file(tmp_path, capsys, make):
    path = make(tmp_path)
    rc, out, err = run(["inspect", str(path)], capsys)
    assert rc == 2
    assert out == ""
    assert err.startswith("error: ")
    assert str(path) in err
    assert "Traceback" not in err


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_console_script_entry_point():
    """``ids`` is installed as ids_engine.cli:main."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ids"]
    assert ep.value == "ids_engine.cli:main"
    assert ep.load() is main
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)


# ---------------------------------------------------------------- shape
def test_shape_runs_a_script_and_writes_a_report(tmp_path, capsys):
    import json

    script = tmp_path / "s.json"
    script.write_text(json.dumps({
        "case": {"phantom": "horseshoe", "resolution": "coarse"}, "prescription_gy": 60, "beams": 5,
        "requests": [
            {"kind": "set_voxel_dose", "point_mm_xyz": [0.0, -23.4, 0.0], "dose_pct": 60, "recovery_steps": 5},
            {"kind": "set_voxel_dose", "index_zyx": [0, 0, 0], "dose_gy": 10},
            {"kind": "undo"},
        ],
    }))
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    assert (tmp_path / "out" / "session.json").exists() and (tmp_path / "out" / "report.md").exists()
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["requests"][0]["final_gy"][0] == pytest.approx(36.0, rel=0.05)
    assert "outside the body" in rep["requests"][1]["error"]
    assert rep["requests"][2] == {"n": 2, "kind": "undo", "done": True}
    assert "PTV" in out


def test_shape_reports_conflicts_on_the_terminal_and_in_the_report(tmp_path, capsys):
    """A pin around the OAR rim, then a request 2 voxels (8 mm) anterior of it, just outside the
    pin, down to 45 %: recovery cannot keep both, and says so instead of failing silently."""
    import json

    script = tmp_path / "s.json"
    script.write_text(json.dumps({
        "case": {"phantom": "horseshoe", "resolution": "coarse"}, "prescription_gy": 60, "beams": 9,
        "recovery_steps": 25,
        "requests": [
            {"kind": "pin", "name": "rim", "centre_zyx": [21, 22, 40], "radius_mm": 6},
            {"kind": "set_voxel_dose", "index_zyx": [21, 20, 40], "dose_pct": 45},
        ],
    }))
    rc, out, err = run(["shape", str(script), "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["requests"][0]["conflicts"] == []  # the pin itself
    conflicts = rep["requests"][1]["conflicts"]
    assert conflicts, "the request next to the pin reported no conflict"
    assert rep["conflicts"] == sum(1 for c in conflicts if c["kind"] != "rise")
    assert rep["side_effects"] == sum(1 for c in conflicts if c["kind"] == "rise")
    for c in conflicts:
        assert c["kind"] in ("pin", "feature", "request", "guard", "coverage", "rise")
        assert c["voxels"] >= 1 and c["worst_gy"] > 0
        assert "Gy" in c["message"] and "% of Rx" in c["message"]
    # One "conflict:" (or "side effect:") line per conflict on the terminal, in the order of the report.
    printed = [line.strip().split(":", 1)[1].strip() for line in out.splitlines()
               if line.strip().startswith(("conflict:", "side effect:"))]
    assert printed == [c["message"] for c in conflicts]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Conflicts" in md
    for c in conflicts:
        assert c["message"] in md


def test_shape_bad_script_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, _, err = run(["shape", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert "bad.json" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--dicom", "--matrad", "--session"])
def test_view_refuses_a_missing_case_before_opening_a_window(tmp_path, capsys, flag):
    missing = tmp_path / "nowhere"
    rc, _, err = run(["view", flag, str(missing)], capsys)
    assert rc == 2
    assert "nowhere" in err and flag in err and "Traceback" not in err
