"""Shared fixtures and markers.

Markers (strict): ``gpu`` (needs CuPy and a CUDA device; skipped otherwise), ``viewer``
(needs PyQt6, vispy and a display), ``slow``.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

from ids_engine import backend


def _gpu_ok() -> bool:
    return backend.cupy_available()


# The slowest test files, slowest first (wall seconds of each file's tests, module fixtures
# included, in one measured ``-n 2 --dist loadfile`` run on a shared 2-core machine: only the
# order matters). Under ``--dist loadfile`` xdist hands out whole files in the collection order
# below: longest first, so that no worker is left running a long file alone at the end while
# the other one idles (files not listed follow in their usual order). Update it when a file
# becomes one of the slowest.
SLOWEST_FILES = (
    # Not the window tests first: in a fresh clone the first requests compile the numba
    # kernels (tens of seconds), which must not happen inside a window test's 30 s wait.
    "tests/dmr/test_shaping_clinical.py",  # 206 s
    "tests/test_session_files.py",  # 155 s
    "tests/viewer/test_window.py",  # 379 s
    "tests/adapt/test_adapt.py",  # 150 s
    "tests/store/test_crash.py",  # 142 s
    "tests/dmr/test_lp_repair.py",  # 129 s
    "tests/adapt/test_cli_adapt.py",  # 112 s
    "tests/viewer/test_metrics_window.py",  # 110 s
    "tests/test_cli_errors.py",  # 102 s
    "tests/test_cli_plan.py",  # 100 s
    "tests/dmr/test_shaping.py",  # 90 s
    "tests/test_cli.py",  # 86 s
    "tests/viewer/test_truth.py",  # 78 s
    "tests/optimise/test_rows_sampling.py",  # 72 s
    "tests/viewer/test_launch.py",  # 70 s
    "tests/adapt/test_batch.py",  # 68 s
    "tests/dose/test_device_budgets.py",  # 68 s
    "tests/viewer/test_forward_display.py",  # 64 s
    "tests/io/test_export.py",  # 63 s
    "tests/dmr/test_repair_determinism.py",  # 60 s
    "tests/test_install.py",  # 59 s
    "tests/viewer/test_isodose_display.py",  # 57 s
    "tests/dose/test_device_backends.py",  # 56 s
    "tests/viewer/test_evaluation_menus.py",  # 52 s
    "tests/forward/test_cli_forward.py",  # 51 s
    "tests/viewer/test_forward_dialog.py",  # 48 s
    "tests/viewer/test_export_menu.py",  # 46 s
    "tests/registration/test_deformable.py",  # 43 s
    "tests/dmr/test_side_effects.py",  # 37 s
    "tests/io/test_matrad.py",  # 36 s
    "tests/viewer/test_worker.py",  # 32 s
    "tests/viewer/test_metrics_worker.py",  # 30 s
)


def pytest_configure(config):
    # xdist (3.6 and later) sorts loadfile's files by their number of tests unless told not to;
    # keep the collection order, slowest files first (pytest_collection_modifyitems).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    # Slowest files first (a stable sort: each file's tests keep their order and stay together).
    rank = {path: i for i, path in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(SLOWEST_FILES)))
    if _gpu_ok():
        return
    skip = pytest.mark.skip(reason="no CUDA device / CuPy: GPU test skipped")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded local RNG (tests never use the global one)."""
    return np.random.default_rng(12345)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp_name(request, monkeypatch):
    """Run a test body on both backends: sets IDS_BACKEND and yields its name."""
    monkeypatch.setenv("IDS_BACKEND", request.param)
    backend.reset_backend()
    yield request.param
    backend.reset_backend()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with ``IDS_BACKEND=name`` (the backend reset before and after); for
    module-scoped fixtures, where ``monkeypatch`` is not available."""
    old = os.environ.get("IDS_BACKEND")
    os.environ["IDS_BACKEND"] = name
    backend.reset_backend()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("IDS_BACKEND", None)
        else:
            os.environ["IDS_BACKEND"] = old
        backend.reset_backend()


@pytest.fixture(params=["devicecost", pytest.param("cupy", marks=pytest.mark.gpu)])
def device_backend(request, monkeypatch):
    """Run a test body on a device backend: the device-cost counting backend (NumPy underneath,
    CuPy's semantics and refusals on top: runs everywhere) and CuPy (GPU only). Sets
    IDS_BACKEND and yields its name; the test compares against NumPy itself."""
    monkeypatch.setenv("IDS_BACKEND", request.param)
    backend.reset_backend()
    yield request.param
    backend.reset_backend()


@pytest.fixture(scope="module")
def coarse_horseshoe_session():
    """A coarse horseshoe session (9 open fields, 60 Gy), one per test module."""
    from ids_engine.session import Session

    return Session.from_phantom("horseshoe", "coarse", prescription_gy=60.0)


@pytest.fixture
def shaping_session(coarse_horseshoe_session):
    """The module's coarse horseshoe session, with every request of the test undone afterwards."""
    yield from undo_afterwards(coarse_horseshoe_session)


def undo_afterwards(session):
    """Yield ``session`` and afterwards take back every request the test made (and its pins,
    redo stack and journal folder): a module-scoped session shared by tests stays clean."""
    n = len(session.journal)
    pins = dict(session.pins)
    yield session
    session.close()
    while len(session.journal) > n:
        session.undo()
    session.clear_redo()
    session.pins = pins
