"""Packaging: ``pip install .`` gives one ``ids_engine`` namespace; ``pip install -e .`` too.

The repository keeps ``kernels/`` and ``viewer/`` at the top level and ``setup.py`` maps
them to ``ids_engine.kernels`` and ``ids_engine.viewer``. The wheel test builds from a
copy of the source tree, not the checkout itself: an in-tree build writes ``build/`` and
rewrites ``ids_engine.egg-info``, which would disturb the working tree under the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ids_engine

REPO = Path(__file__).resolve().parents[1]

# What a wheel must hold (package data included) and what it must not.
REQUIRED = (
    "ids_engine/__init__.py",
    "ids_engine/backend.py",
    "ids_engine/cli.py",
    "ids_engine/kernels/__init__.py",
    "ids_engine/kernels/pencil.py",
    "ids_engine/kernels/cuda/accumulate_segments.cu",
    "ids_engine/viewer/__init__.py",
)
FORBIDDEN_TOP = ("kernels", "viewer", "tests", "bench", "docs")

_PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_DEFAULT_TIMEOUT": "15", "PIP_RETRIES": "0"}


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, **_PIP_ENV}
    env.pop("PYTHONPATH", None)  # nothing may leak the checkout onto the path
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _source_copy(dest: Path) -> Path:
    junk = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
                                  ".hypothesis", ".benchmarks")

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(junk(folder, names))
        if Path(folder) == REPO / "bench":
            skip.add("out")  # benchmark results
        return skip

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    out = tmp / "dist"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, "."], src)
    if build.returncode != 0:
        # No setuptools/wheel in this interpreter: let pip fetch them into an isolated env.
        isolated = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, "."], src)
        if isolated.returncode != 0:
            pytest.skip("cannot build a wheel here (no build backend installed and none can be fetched):\n"
                        + build.stderr[-1500:] + "\n" + isolated.stderr[-1500:])
    (whl,) = out.glob("ids_engine-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for path in REQUIRED:
        assert path in names, f"{path} missing from {wheel.name}"
    tops = {n.split("/", 1)[0] for n in names}
    assert not tops & set(FORBIDDEN_TOP), f"top-level entries that must not be installed: {sorted(tops & set(FORBIDDEN_TOP))}"
    assert {t for t in tops if not t.endswith(".dist-info")} == {"ids_engine"}
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["ids_engine"]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "ids = ids_engine.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # Every .py in the repository's package folders made it in, under its mapped name.
    for folder, package in (("ids_engine", "ids_engine"), ("kernels", "ids_engine/kernels"),
                            ("viewer", "ids_engine/viewer")):
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert f"{package}/{path.relative_to(REPO / folder).as_posix()}" in names


_CHECK = """
import importlib.resources, sys
import ids_engine, ids_engine.cli, ids_engine.kernels.pencil, ids_engine.viewer
cu = importlib.resources.files("ids_engine.kernels") / "cuda" / "accumulate_segments.cu"
assert cu.is_file() and "accumulate" in cu.read_text(), cu
try:
    import kernels
except ImportError:
    pass
else:
    raise SystemExit("a top-level `kernels` package is importable: " + kernels.__file__)
print(ids_engine.__file__)
print(ids_engine.kernels.pencil.__file__)
print(ids_engine.viewer.__file__)
"""


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path, timeout=120)
    if made.returncode != 0:  # no ensurepip (e.g. Debian without python3-venv): the base pip still works
        shutil.rmtree(venv, ignore_errors=True)
        made = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
        if made.returncode != 0:
            pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()[-500:]}")
    python = venv / "bin" / "python"
    # `python -m pip` and not bin/pip: it works with or without a pip of the venv's own.
    inst = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    res = _run([python, "-c", _CHECK], outside)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = [Path(p).resolve() for p in res.stdout.split()]
    assert len(paths) == 3
    for p in paths:
        assert p.is_relative_to(venv.resolve()), f"{p} is not inside the venv"
        assert not p.is_relative_to(REPO), f"{p} comes from the checkout"

    ids = _run([venv / "bin" / "ids", "--version"], outside)
    assert ids.returncode == 0, ids.stderr[-2000:]
    assert ids.stdout.startswith(f"ids-engine {ids_engine.__version__}")
    assert "backend:" in ids.stdout


def test_editable_install_maps_repo_folders():
    """``pip install -e .`` (how this suite runs) maps kernels/ and viewer/ into the namespace."""
    import ids_engine.kernels
    import ids_engine.kernels.pencil
    import ids_engine.viewer

    assert Path(ids_engine.__file__).resolve() == REPO / "ids_engine" / "__init__.py"
    assert Path(ids_engine.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(ids_engine.kernels.pencil.__file__).resolve() == REPO / "kernels" / "pencil.py"
    assert Path(ids_engine.viewer.__file__).resolve() == REPO / "viewer" / "__init__.py"
    cu = Path(ids_engine.kernels.__file__).parent / "cuda" / "accumulate_segments.cu"
    assert cu.is_file()
