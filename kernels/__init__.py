"""Compute kernels: one operation per module, each with a NumPy twin of identical signature.

CUDA sources live in ``cuda/*.cu`` and are compiled lazily with CuPy the first time an
operation runs on CuPy arrays. This package is installed as ``ids_engine.kernels``.
"""

__all__: list[str] = []
