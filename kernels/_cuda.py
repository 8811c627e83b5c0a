"""CUDA kernel declarations: one :class:`CudaKernel` per ``extern "C" __global__`` function.

A launcher module declares each kernel it launches once, at module level, with the C
parameter list of its ``cuda/*.cu`` source, the ``#define`` constants and the NVRTC
options. The same declaration

* builds the argument tuple at launch (:meth:`CudaKernel.arguments`): arrays as
  C-contiguous arrays of the declared dtype, scalars as NumPy scalars of the declared
  C type (a Python ``int`` or ``float`` would be passed as 64 bits), by parameter name;
* compiles the module lazily with ``cupy.RawModule``, cached per CUDA device
  (:meth:`CudaKernel.function`), on the backend of the arrays it is given (CuPy, or the
  device-cost counting backend's stand-in, which runs a registered NumPy twin);
* is read by ``tests/kernels/test_nvrtc.py``, which compiles ``code()`` with NVRTC for the
  target architectures (no GPU needed) and checks the declared parameters against the
  signature in the source and against the keyword arguments of every ``.launch(...)``
  call in the launcher.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ids_engine.backend import array_module

__all__ = ["CUDA_DIR", "CudaKernel", "SCALAR_DTYPES", "parse_param"]

CUDA_DIR = Path(__file__).with_name("cuda")

# C scalar type (as written in a parameter list) -> the NumPy dtype a launch passes.
SCALAR_DTYPES: dict[str, type[np.generic]] = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "float": np.float32,
    "double": np.float64,
}

_IGNORED_QUALIFIERS = ("__restrict__", "__restrict", "restrict")


@dataclass(frozen=True)
class Param:
    """One kernel parameter, normalised: ``const float* __restrict__ u`` is
    ``Param("u", "float", pointer=True, const=True)``; ``const int n`` is
    ``Param("n", "int", pointer=False, const=False)`` (top-level ``const`` of a scalar is
    no part of the calling convention)."""

    name: str
    ctype: str
    pointer: bool
    const: bool

    @property
    def dtype(self) -> type[np.generic]:
        return SCALAR_DTYPES[self.ctype]


def parse_param(text: str) -> Param:
    """A :class:`Param` from one C parameter declaration, e.g. ``"const float* __restrict__ u"``."""
    words = text.replace("*", " * ").split()
    words = [w for w in words if w not in _IGNORED_QUALIFIERS]
    if len(words) < 2:
        raise ValueError(f"cannot parse kernel parameter {text!r}")
    name, type_words = words[-1], words[:-1]
    stars = type_words.count("*")
    if stars > 1:
        raise ValueError(f"kernel parameter {text!r}: pointers to pointers are not supported")
    pointer = stars == 1
    before = type_words[: type_words.index("*")] if pointer else type_words
    # `float const*` and `const float*` both make the pointee const; a const after the star
    # (`float* const p`) is top-level and, like a scalar's, does not matter to the caller.
    const = pointer and "const" in before
    ctype = " ".join(w for w in before if w != "const")
    if ctype not in SCALAR_DTYPES:
        raise ValueError(f"kernel parameter {text!r}: C type {ctype!r} is not one of {sorted(SCALAR_DTYPES)}")
    return Param(name, ctype, pointer, const)


# The C scalar types passed as integers (a Python value is taken through ``operator.index``).
_INTEGER_CTYPES = frozenset(c for c, d in SCALAR_DTYPES.items() if np.issubdtype(d, np.integer))


@lru_cache(maxsize=None)
def _parse_params(params: tuple[str, ...]) -> tuple[Param, ...]:
    """The parsed parameters of a declaration (parsed once: a launch builds its arguments from them)."""
    return tuple(parse_param(p) for p in params)


@lru_cache(maxsize=None)
def _param_names(params: tuple[str, ...]) -> frozenset[str]:
    """The names of a declaration's parameters (what a launch's keywords must be)."""
    return frozenset(p.name for p in _parse_params(params))


@dataclass(frozen=True)
class CudaKernel:
    """A ``extern "C" __global__`` function in ``cuda/<source>``.

    Parameters
    ----------
    source : file name under ``kernels/cuda/``.
    name : the kernel's C name.
    params : the C parameter declarations, in order, e.g. ``("float* dose", "const int* vox", "int n")``.
        Pointers to non-const data are outputs: they must be passed as C-contiguous
        arrays of the declared dtype (a converted copy would lose the kernel's writes).
    defines : ``#define`` constants prepended to the source, ``((name, value), ...)``.
    options : NVRTC options given to ``cupy.RawModule`` (CuPy adds ``-arch`` and ``-ftz=true``).
    """

    source: str
    name: str
    params: tuple[str, ...]
    defines: tuple[tuple[str, int | float], ...] = ()
    options: tuple[str, ...] = ("--std=c++17",)

    @property
    def parameters(self) -> tuple[Param, ...]:
        return _parse_params(self.params)

    def code(self) -> str:
        """The CUDA source as compiled: the ``#define`` lines, then the file (``#line`` keeps
        compiler messages on the file's own line numbers)."""
        defines = "".join(f"#define {k} {_c_literal(v)}\n" for k, v in self.defines)
        return f'{defines}#line 1 "{self.source}"\n' + (CUDA_DIR / self.source).read_text()

    def arguments(self, **values: Any) -> tuple:
        """The argument tuple of a launch, in declaration order, from keyword arguments named
        like the C parameters (all of them, no others)."""
        params = self.parameters
        if values.keys() != _param_names(self.params):
            names = [p.name for p in params]
            missing = [n for n in names if n not in values]
            extra = [n for n in values if n not in names]
            raise TypeError(f"{self.name}: missing arguments {missing}, unexpected {extra}")
        name = self.name
        return tuple([_argument(name, p, values[p.name]) for p in params])

    def function(self, xp: Any) -> Any:
        """The compiled kernel on the current device of ``xp``: ``cupy``, or a stand-in with
        its ``RawModule`` and ``cuda.Device`` (the device-cost counting backend)."""
        return _compiled(xp, self, xp.cuda.Device().id)

    def launch(self, grid: tuple[int, ...], block: tuple[int, ...], **values: Any) -> None:
        """Launch on the current device and stream of the arrays' backend (arguments as for
        :meth:`arguments`)."""
        args = self.arguments(**values)
        xp = array_module(*(a for a in args if not isinstance(a, np.generic)))
        if xp is np:
            raise TypeError(f"{self.name}: a CUDA kernel needs device arrays, got only NumPy arrays")
        self.function(xp)(grid, block, args)


def _c_literal(value: int | float) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"#define values must be int or float, got {value!r}")
    if isinstance(value, int):
        return str(value)
    return f"{value!r}f" if np.float32(value) == value else repr(value)


def _argument(kernel: str, p: Param, value: Any) -> Any:
    dtype = SCALAR_DTYPES[p.ctype]
    if not p.pointer:
        try:
            return dtype(operator.index(value) if p.ctype in _INTEGER_CTYPES else value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"{kernel}: argument {p.name!r} ({p.ctype}) cannot take {value!r}: {exc}") from exc
    if not hasattr(value, "dtype"):
        raise TypeError(f"{kernel}: argument {p.name!r} ({p.ctype}*) must be an array, got {type(value).__name__}")
    if value.dtype == dtype and not isinstance(value, np.generic) and value.flags.c_contiguous:
        # Already what the kernel takes: passed as it is (``ascontiguousarray`` would return
        # this very array; skipping the call saves its dispatch at every launch).
        return value
    if p.const:
        return array_module(value).ascontiguousarray(value, dtype=dtype)
    if isinstance(value, np.generic):  # a scalar cannot be written to
        raise TypeError(f"{kernel}: output {p.name!r} ({p.ctype}*) must be an array, got the scalar {value!r}")
    raise TypeError(
        f"{kernel}: output {p.name!r} ({p.ctype}*) must be a C-contiguous {np.dtype(dtype).name} array, "
        f"got {value.dtype} (C-contiguous: {value.flags.c_contiguous})"
    )


@lru_cache(maxsize=None)
def _compiled(xp: Any, kernel: CudaKernel, device_id: int) -> Any:
    # A loaded module belongs to one device's context: keyed on the device, compiled and
    # loaded with that device current.
    with xp.cuda.Device(device_id):
        return xp.RawModule(code=kernel.code(), options=kernel.options).get_function(kernel.name)
