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


def pytest_collection_modifyitems(config, items):
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
