"""The one place that chooses between NumPy and CuPy.

``IDS_BACKEND=auto|cupy|numpy`` selects the array backend. It is read lazily
(on the first call that needs it, never at import) and ``auto`` picks CuPy
when a CUDA device answers, NumPy otherwise. Engine code gets its array
namespace from :func:`xp` (where arrays are created) or :func:`array_module`
(inferred from arguments), and never imports CuPy itself; only this module
and ``ids_engine.kernels`` do.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "BackendError",
    "BackendInfo",
    "array_module",
    "asnumpy",
    "backend_info",
    "backend_name",
    "cupy_available",
    "is_counting",
    "reset_backend",
    "synchronize",
    "to_device",
    "xp",
]

_CHOICES = ("auto", "cupy", "numpy", "devicecost")


class BackendError(RuntimeError):
    """The requested array backend cannot be used on this machine."""


@dataclass(frozen=True)
class BackendInfo:
    """Which backend is active and on what device."""

    name: str  # "numpy" | "cupy"
    device: str  # CPU model and core count, or GPU name
    requested: str  # the IDS_BACKEND value that led here
    reason: str  # why this backend (for `ids info`)


def _import_cupy() -> tuple[ModuleType | None, str]:
    """Return (cupy, "") when a CUDA device answers, else (None, why not)."""
    try:
        import cupy  # noqa: PLC0415  (the one sanctioned import outside kernels/)
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy found no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "CuPy found no CUDA device"
    return cupy, ""


def cpu_name() -> str:
    """CPU model name and core count, e.g. ``"AMD EPYC 7B13 (2 cores)"``."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


@lru_cache(maxsize=1)
def _resolve() -> tuple[ModuleType, BackendInfo]:
    requested = os.environ.get("IDS_BACKEND", "auto").strip().lower() or "auto"
    if requested not in _CHOICES:
        raise BackendError(
            f"IDS_BACKEND={requested!r} is not one of {', '.join(_CHOICES)}"
        )
    if requested == "numpy":
        return np, BackendInfo("numpy", cpu_name(), requested, "IDS_BACKEND=numpy")
    if requested == "devicecost":
        from ids_engine._devicecost import devicecost  # noqa: PLC0415

        return devicecost, BackendInfo("devicecost", cpu_name(), requested,
                                       "IDS_BACKEND=devicecost: NumPy counting what CuPy would launch and sync")
    cupy, why_not = _import_cupy()
    if cupy is None:
        if requested == "cupy":
            raise BackendError(
                "IDS_BACKEND=cupy was requested but no CUDA device can be used: "
                f"{why_not}. Install the 'gpu' extra on a machine with an NVIDIA GPU, "
                "or set IDS_BACKEND=numpy (or auto)."
            )
        return np, BackendInfo("numpy", cpu_name(), requested, f"auto: {why_not}")
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return cupy, BackendInfo("cupy", name, requested, f"{requested}: CUDA device found")


def reset_backend() -> None:
    """Forget the resolved backend so the next call reads ``IDS_BACKEND`` again (tests)."""
    _resolve.cache_clear()


def xp() -> ModuleType:
    """The array namespace of the active backend (``numpy`` or ``cupy``)."""
    return _resolve()[0]


def backend_info() -> BackendInfo:
    """Name, device and reason of the active backend."""
    return _resolve()[1]


def backend_name() -> str:
    """``"numpy"`` or ``"cupy"``."""
    return _resolve()[1].name


def cupy_available() -> bool:
    """True when CuPy imports and a CUDA device answers (independent of IDS_BACKEND)."""
    return _import_cupy()[0] is not None


def _is_counting(a: Any) -> bool:
    return type(a).__name__ == "DeviceArray" and type(a).__module__ == "ids_engine._devicecost"


def is_counting(mod: ModuleType) -> bool:
    """True for the device-cost counting backend's stand-in for ``cupy`` (IDS_BACKEND=devicecost)."""
    return getattr(mod, "__name__", "") == "devicecost"


def array_module(*arrays: Any) -> ModuleType:
    """NumPy or CuPy, inferred from the arguments (CuPy if any argument is a CuPy array; the
    counting backend's stand-in if any is one of its device arrays)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy  # noqa: PLC0415

            return cupy
        if _is_counting(a):
            from ids_engine._devicecost import devicecost  # noqa: PLC0415

            return devicecost
    return np


def to_device(a: Any, dtype: Any = None) -> Any:
    """Copy a host array to the active backend's device (no copy on NumPy)."""
    mod = xp()
    if mod is np:
        return np.asarray(a, dtype=dtype)
    return mod.asarray(a, dtype=dtype)


def asnumpy(a: Any) -> np.ndarray:
    """Host (NumPy) copy of an array from either backend."""
    if type(a).__module__.startswith("cupy") or _is_counting(a):
        return a.get()
    return np.asarray(a)


def synchronize(a: Any = None) -> None:
    """Wait for the GPU (no-op on NumPy); call before reading a clock."""
    mod = array_module(a) if a is not None else xp()
    if mod is np and backend_name() == "cupy":
        mod = xp()
    if mod is not np:
        mod.cuda.get_current_stream().synchronize()
