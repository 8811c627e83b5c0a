"""The ``IDS_BACKEND`` switch in :mod:`ids_engine.backend`.

Every test sets the environment with ``monkeypatch`` and resets the cached backend
before and after, so the rest of the suite sees whatever backend it would have seen.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from ids_engine import backend


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Forget the resolved backend before and after each test (monkeypatch undoes the env)."""
    backend.reset_backend()
    yield
    backend.reset_backend()


def _no_gpu(monkeypatch) -> None:
    """Simulate a machine without a usable CUDA device, even where CuPy is installed."""
    monkeypatch.setattr(backend, "_import_cupy", lambda: (None, "no device"))


def test_numpy_forced(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "numpy")
    assert backend.xp() is np
    assert backend.backend_name() == "numpy"
    info = backend.backend_info()
    assert info.name == "numpy"
    assert info.requested == "numpy"
    assert info.device == backend.cpu_name()
    assert "cores" in info.device
    assert info.reason == "IDS_BACKEND=numpy"


@pytest.mark.parametrize("value", ["NumPy", "  numpy  "])
def test_value_is_case_and_space_insensitive(monkeypatch, value):
    monkeypatch.setenv("IDS_BACKEND", value)
    assert backend.backend_name() == "numpy"


@pytest.mark.parametrize("value", [None, "", "auto"])
def test_auto_without_gpu_gives_numpy_with_reason(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("IDS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("IDS_BACKEND", value)
    _no_gpu(monkeypatch)
    assert backend.xp() is np
    info = backend.backend_info()
    assert info.name == "numpy"
    assert info.requested == "auto"
    assert info.reason == "auto: no device"
    assert info.device


def test_invalid_value_raises_naming_it(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "torch")
    with pytest.raises(backend.BackendError, match="'torch'") as err:
        backend.xp()
    for choice in ("auto", "cupy", "numpy"):
        assert choice in str(err.value)
    with pytest.raises(backend.BackendError, match="'torch'"):
        backend.backend_info()


def test_cupy_forced_without_gpu_raises(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "cupy")
    _no_gpu(monkeypatch)
    with pytest.raises(backend.BackendError) as err:
        backend.backend_name()
    msg = str(err.value)
    assert "IDS_BACKEND=cupy" in msg
    assert "no device" in msg  # the underlying reason
    assert "IDS_BACKEND=numpy" in msg  # and the way out


def test_import_cupy_reports_why_not(monkeypatch):
    """Without CuPy (or a device) the reason is a readable sentence, never an exception."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    mod, why = backend._import_cupy()
    assert mod is None
    assert "CuPy is not importable" in why
    assert backend.cupy_available() is False


def test_reset_rereads_environment(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "numpy")
    assert backend.backend_name() == "numpy"
    monkeypatch.setenv("IDS_BACKEND", "bogus")
    assert backend.backend_name() == "numpy"  # cached: read once, lazily
    backend.reset_backend()
    with pytest.raises(backend.BackendError, match="bogus"):
        backend.backend_name()
    monkeypatch.setenv("IDS_BACKEND", "numpy")
    backend.reset_backend()
    assert backend.backend_name() == "numpy"


def test_environment_not_read_at_import():
    """An invalid value only fails when the backend is first needed, never at import."""
    code = (
        "import ids_engine.backend as b, ids_engine.cli, ids_engine.dose\n"
        "try:\n    b.xp()\nexcept b.BackendError as e:\n    print('raised:', e)\n"
    )
    env = {**os.environ, "IDS_BACKEND": "bogus"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "raised:" in out.stdout and "bogus" in out.stdout


@pytest.mark.parametrize(
    "args",
    [(), (np.zeros(3),), (np.zeros(3), 1.0, [1, 2]), (None,), (np.float32(1.0),)],
    ids=["none", "array", "mixed", "None", "numpy-scalar"],
)
def test_array_module_infers_numpy(monkeypatch, args):
    monkeypatch.setenv("IDS_BACKEND", "bogus")  # inference never consults the switch
    assert backend.array_module(*args) is np


def test_to_device_asnumpy_round_trip(monkeypatch, rng):
    monkeypatch.setenv("IDS_BACKEND", "numpy")
    host = rng.normal(size=(4, 5, 6))
    dev = backend.to_device(host, dtype=np.float32)
    assert backend.array_module(dev) is np
    assert dev.dtype == np.float32
    back = backend.asnumpy(dev)
    assert isinstance(back, np.ndarray)
    assert back.shape == host.shape
    np.testing.assert_allclose(back, host, rtol=1e-6)
    # No dtype: no copy and no conversion on NumPy.
    same = backend.to_device(host)
    assert same.dtype == np.float64
    np.testing.assert_array_equal(backend.asnumpy(same), host)
    # asnumpy accepts lists and scalars.
    np.testing.assert_array_equal(backend.asnumpy([1, 2, 3]), np.array([1, 2, 3]))


def test_synchronize_is_noop_on_numpy(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "numpy")
    assert backend.synchronize() is None
    assert backend.synchronize(np.ones(3)) is None


@pytest.mark.gpu
def test_auto_picks_cupy_on_gpu(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "auto")
    info = backend.backend_info()
    assert info.name == "cupy"
    assert info.device.strip()
    assert info.requested == "auto"
    xp = backend.xp()
    assert xp.__name__ == "cupy"
    a = backend.to_device(np.arange(6, dtype=np.float32))
    assert backend.array_module(a) is xp
    backend.synchronize(a)
    np.testing.assert_array_equal(backend.asnumpy(a), np.arange(6, dtype=np.float32))


@pytest.mark.gpu
def test_cupy_forced_on_gpu(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "cupy")
    assert backend.backend_name() == "cupy"
    assert backend.backend_info().device.strip()
