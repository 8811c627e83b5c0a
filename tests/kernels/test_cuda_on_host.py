"""Every CUDA kernel body, compiled for the CPU with g++ and run against its NumPy twin.

No GPU is needed. Each declared kernel (every :class:`~ids_engine.kernels._cuda.CudaKernel`
in ``ids_engine.kernels``, found as ``test_nvrtc.py`` finds them) is compiled, as its launcher
compiles it (``code()``: the ``#define`` lines, then the ``.cu`` file), into a shared library
with

* a shim that makes CUDA C++ plain C++: ``__global__``, ``__device__`` and
  ``__forceinline__`` defined away, ``blockIdx``, ``threadIdx``, ``blockDim`` and ``gridDim``
  as thread-local structs, ``min``/``max`` from ``std``, a sequential ``atomicAdd``;
* a generated ``extern "C"`` driver per kernel that sets the grid and block and calls the
  kernel for every block and thread in turn. The kernels use neither shared memory nor
  ``__syncthreads``, so running the threads one after another is a valid schedule.

The launch goes through the real launcher: ``CudaKernel.launch`` is replaced by the host
library's, and the public operation is called on the device-cost backend's arrays (NumPy
underneath), so the launcher's grid, block and arguments are what the kernel gets. Every
pointer argument is copied into a buffer with 64 sentinel elements on each side (for floats
a NaN with a payload of its own, for ints 0): a write outside a float array fails the test,
and a read outside one spreads NaN into the results.

Compiled with ``-O1 -ffp-contract=off`` (no fused multiply-adds: each float32 operation rounds
as written). What this checks: the index arithmetic (thread mapping, offsets, bounds, the
loops over the tables) and the maths of each kernel body, against its NumPy twin (bit for bit
where the kernel and the twin do the same float32 operations in the same order, as
``add_windows``; to float32 round-off where they differ: ``atomicAdd``'s order, a direct sum
against an FFT). What it does not: CUDA scheduling and what runs concurrently (atomics
under contention, races), NVRTC's own code generation (``-ftz=true`` flushes denormals there,
``--fmad=true`` fuses multiply-adds), 32-bit overflow at sizes the cases do not reach, and the
launch limits of a device (``test_nvrtc.py`` compiles the sources with NVRTC; the ``gpu``
tests run them on a GPU).

Needs ``g++`` on the PATH; skips, saying so, without it, and fails instead under
``IDS_REQUIRE_GXX=1``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ids_engine._devicecost import devicecost
from ids_engine.kernels._cuda import CudaKernel

from .test_nvrtc import DECLARED, KERNEL_IDS

GXX_FLAGS = ("-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC")
PAD = 64  # sentinel elements before and after every array argument

SHIM = r"""
#line 1 "host_shim"
#include <algorithm>
#include <cmath>
#include <cstddef>
using std::max;
using std::min;
struct ids_host_dim3 { unsigned int x, y, z; };
static thread_local ids_host_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
// One thread at a time: the add needs no atomicity.
static inline float atomicAdd(float* address, float value) { const float old = *address; *address = old + value; return old; }
"""

_CTYPES = {"int": ctypes.c_int32, "unsigned int": ctypes.c_uint32, "long long": ctypes.c_int64,
           "float": ctypes.c_float, "double": ctypes.c_double}


def _gxx() -> str:
    gxx = shutil.which("g++")
    if gxx is None:
        if os.environ.get("IDS_REQUIRE_GXX") == "1":
            pytest.fail("IDS_REQUIRE_GXX=1 but g++ is not on the PATH", pytrace=False)
        pytest.skip("host check of the CUDA kernels skipped: g++ is not on the PATH (apt-get install g++)")
    return gxx


def _driver(kernel: CudaKernel) -> str:
    """An ``extern "C"`` function that runs ``kernel`` over a whole grid, one thread at a time."""
    params = [f"{'const ' if p.const else ''}{p.ctype}* {p.name}" if p.pointer else f"{p.ctype} {p.name}"
              for p in kernel.parameters]
    names = ", ".join(p.name for p in kernel.parameters)
    # The loop variables are prefixed: a kernel parameter may be called x.
    return f"""
#line 1 "host_driver"
extern "C" void ids_host_launch(unsigned int ids_gx, unsigned int ids_gy, unsigned int ids_gz,
                                unsigned int ids_bx, unsigned int ids_by, unsigned int ids_bz, {", ".join(params)})
{{
    gridDim = {{ids_gx, ids_gy, ids_gz}};
    blockDim = {{ids_bx, ids_by, ids_bz}};
    for (unsigned int ids_z = 0; ids_z < ids_gz; ++ids_z)
        for (unsigned int ids_y = 0; ids_y < ids_gy; ++ids_y)
            for (unsigned int ids_x = 0; ids_x < ids_gx; ++ids_x) {{
                blockIdx = {{ids_x, ids_y, ids_z}};
                for (unsigned int ids_tz = 0; ids_tz < ids_bz; ++ids_tz)
                    for (unsigned int ids_ty = 0; ids_ty < ids_by; ++ids_ty)
                        for (unsigned int ids_tx = 0; ids_tx < ids_bx; ++ids_tx) {{
                            threadIdx = {{ids_tx, ids_ty, ids_tz}};
                            {kernel.name}({names});
                        }}
            }}
}}
"""


class HostKernel:
    """A :class:`CudaKernel` compiled for the CPU: ``run(grid, block, args)`` with the argument
    tuple of :meth:`CudaKernel.arguments` (NumPy arrays and NumPy scalars)."""

    def __init__(self, kernel: CudaKernel, directory: Path) -> None:
        self.kernel = kernel
        source = SHIM + kernel.code() + _driver(kernel)
        tag = hashlib.sha1(source.encode()).hexdigest()[:12]
        cpp, lib = directory / f"{kernel.name}_{tag}.cpp", directory / f"{kernel.name}_{tag}.so"
        if not lib.exists():
            cpp.write_text(source)
            done = subprocess.run([_gxx(), *GXX_FLAGS, "-o", str(lib), str(cpp)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"g++ cannot compile {kernel.source} ({kernel.name}) for the host:\n{done.stderr}",
                            pytrace=False)
        self._fn = ctypes.CDLL(str(lib)).ids_host_launch
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_uint32] * 6 + [
            ctypes.c_void_p if p.pointer else _CTYPES[p.ctype] for p in kernel.parameters]

    def run(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple) -> None:
        dims = [tuple(d) + (1,) * (3 - len(d)) for d in (grid, block)]
        padded, values = [], []
        for i, (p, a) in enumerate(zip(self.kernel.parameters, args)):
            if not p.pointer:
                values.append(a)
                continue
            flat = a.reshape(-1)  # a view: the arguments are C-contiguous
            before, after = _sentinel(flat.dtype, 2 * i + 1), _sentinel(flat.dtype, 2 * i + 2)
            buf = np.concatenate([np.full(PAD, before, flat.dtype), flat, np.full(PAD, after, flat.dtype)])
            padded.append((p, flat, buf, before, after))
            values.append(buf[PAD:].ctypes.data)
        self._fn(*dims[0], *dims[1], *values)
        for p, flat, buf, before, after in padded:
            for side, part, fill in (("before", buf[:PAD], before), ("after", buf[PAD + flat.size :], after)):
                assert part.tobytes() == np.full(PAD, fill, buf.dtype).tobytes(), \
                    f"{self.kernel.name} wrote outside {p.name} ({side} it)"
            if not p.const:
                flat[...] = buf[PAD : PAD + flat.size]


def _sentinel(dtype: np.dtype, k: int):
    """The fill of a pad: for floats a quiet NaN whose payload is ``k`` (one per argument and
    side, so a value copied or computed from another pad shows), for ints 0 (a harmless index
    should a kernel read it)."""
    if dtype == np.float32:
        return np.array(0x7FC00000 | k, np.uint32).view(np.float32)
    if dtype == np.float64:
        return np.array(0x7FF8000000000000 | k, np.uint64).view(np.float64)
    return dtype.type(0)


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory):
    """``kernel -> HostKernel``, compiled on first use (once per session)."""
    _gxx()
    directory = tmp_path_factory.mktemp("cuda_on_host")
    cache: dict[CudaKernel, HostKernel] = {}

    def get(kernel: CudaKernel) -> HostKernel:
        if kernel not in cache:
            cache[kernel] = HostKernel(kernel, directory)
        return cache[kernel]

    return get


@contextlib.contextmanager
def kernels_on_host(monkeypatch, host_kernels):
    """Within the block, every ``CudaKernel.launch`` on the device-cost backend's arrays runs the
    kernel compiled for the host (the arrays' NumPy data written in place); yields the list of
    (kernel name, grid, block) launched."""
    launched = []

    def launch(self, grid, block, **values):
        args = self.arguments(**values)
        # The NumPy array behind each device array (``_a``): the kernel's writes land in it.
        host = tuple(a._a if hasattr(a, "_a") else a for a in args)
        host_kernels(self).run(grid, block, host)
        launched.append((self.name, tuple(grid), tuple(block)))

    with monkeypatch.context() as m:
        m.setattr(CudaKernel, "launch", launch)
        yield launched


def _dev(values: dict) -> dict:
    return {k: devicecost.asarray(v) if isinstance(v, np.ndarray) else v for k, v in values.items()}


# --------------------------------------------------------------------------- the cases
def _run_accumulate_segments(rng, monkeypatch, host_kernels) -> None:
    from ids_engine.kernels.pencil import accumulate_segments, accumulate_segments_numpy

    from .test_segments import N_DOSE, TOL, _case

    case = _case(rng)
    dose = rng.random(N_DOSE).astype(np.float32)
    want = accumulate_segments_numpy(dose.copy(), *case)
    dev_dose = devicecost.asarray(dose)
    with kernels_on_host(monkeypatch, host_kernels) as launched:
        accumulate_segments(dev_dose, *(devicecost.asarray(a) for a in case), int(case[5][-1]))
    assert [name for name, *_ in launched] == ["accumulate_segments"]
    # atomicAdd order: the threads add in thread order, the twin window by window.
    np.testing.assert_allclose(dev_dose.get(), want, **TOL[np.float32])
    assert np.count_nonzero(dev_dose.get() != dose) > 100


def _run_add_windows(rng, monkeypatch, host_kernels) -> None:
    from ids_engine.kernels.windows import add_windows, add_windows_numpy

    from .test_windows import _case

    maps, windows, boxes, info = _case(rng)
    want = add_windows_numpy(maps.copy(), windows, boxes, info)
    dev_maps = devicecost.asarray(maps)
    with kernels_on_host(monkeypatch, host_kernels) as launched:
        add_windows(dev_maps, *(devicecost.asarray(a) for a in (windows, boxes, info)))
    assert [name for name, *_ in launched] == ["add_windows"]
    np.testing.assert_array_equal(dev_maps.get(), want)  # one add per cell: the same float32 sums


def _run_delta_rows(rng, monkeypatch, host_kernels) -> None:
    from ids_engine.kernels.deltas import delta_rows, delta_rows_numpy

    from .test_delta_rows import REL_TOL, UNTOUCHED, _case, _positional, _reference

    for n_nb in (0, 8):
        case = _case(rng, n_nb)
        want = delta_rows_numpy(*_positional({**case, "out": case["out"].copy()}))
        dev = _dev(case)
        with kernels_on_host(monkeypatch, host_kernels) as launched:
            delta_rows(**dev)
        assert [name for name, *_ in launched] == ["delta_rows"]
        got = dev["out"].get()
        written = want != UNTOUCHED
        np.testing.assert_array_equal(got == UNTOUCHED, ~written)  # the other columns untouched
        # A direct sum against the twin's FFT: round-off relative to the largest value.
        scale = np.abs(want[written]).max()
        np.testing.assert_allclose(got[written], want[written], rtol=0, atol=REL_TOL * scale)
        # And against the float64 direct sum, exactly 0 where it is (off the maps, not in the
        # level, non-finite positions), where the FFT leaves round-off.
        ref = _reference(case)
        np.testing.assert_allclose(got[written], ref[written], rtol=0, atol=1e-6 * scale)
        assert np.all(got[written][ref[written] == 0] == 0) and np.count_nonzero(ref[written] == 0) > 5


CASES = {
    "accumulate_segments": _run_accumulate_segments,
    "add_windows": _run_add_windows,
    "delta_rows": _run_delta_rows,
}


# =========================================================================== tests
def test_every_kernel_has_a_host_case():
    declared = {k.name for _, _, k in DECLARED}
    assert declared == set(CASES), (f"kernels without a host case: {sorted(declared - set(CASES))}; "
                                    f"cases of no kernel: {sorted(set(CASES) - declared)}")


@pytest.mark.parametrize("attr, module, kernel", DECLARED, ids=KERNEL_IDS)
def test_kernel_compiles_for_the_host(host_kernels, attr, module, kernel):
    assert host_kernels(kernel).kernel is kernel


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_on_the_host_matches_its_numpy_twin(host_kernels, monkeypatch, name, seed):
    CASES[name](np.random.default_rng(seed), monkeypatch, host_kernels)


def test_a_write_outside_an_array_is_reported(host_kernels, tmp_path, monkeypatch):
    monkeypatch.setattr("ids_engine.kernels._cuda.CUDA_DIR", Path(tmp_path))
    (tmp_path / "k.cu").write_text(
        'extern "C" __global__ void host_test_shift(float* out, const float* x, const int n) {\n'
        "    const int t = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "    if (t <= n) out[t] = x[t];  // one too many\n"
        "}\n")
    kernel = CudaKernel("k.cu", "host_test_shift", ("float* out", "const float* x", "int n"))
    out, x = np.zeros(5, np.float32), np.ones(5, np.float32)
    with pytest.raises(AssertionError, match="wrote outside out"):
        host_kernels(kernel).run((1,), (8,), kernel.arguments(out=out, x=x, n=5))
