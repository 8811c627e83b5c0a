"""Compute kernels: one operation per module, each with a NumPy twin of identical signature.

CUDA sources live in ``cuda/*.cu`` and are compiled lazily with CuPy the first time an
operation runs on CuPy arrays, once per device. Each kernel is declared once by its
launcher as a ``_cuda.CudaKernel`` (C parameters, ``#define`` constants, options), which
builds the launch arguments and which ``tests/kernels/test_nvrtc.py`` compiles with NVRTC
and checks against the source. This package is installed as ``ids_engine.kernels``.
"""

__all__: list[str] = []
