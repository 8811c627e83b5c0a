"""A device-cost counting backend: NumPy underneath, CuPy's semantics on top (tests, benchmarks).

``IDS_BACKEND=devicecost`` makes :func:`ids_engine.backend.xp` return :data:`devicecost`, a
stand-in for the ``cupy`` module whose arrays (:class:`DeviceArray`) hold NumPy arrays but
behave as CuPy arrays do where it matters for cost and correctness on a GPU:

* every operation CuPy runs as a kernel counts as a **launch** (an elementwise ufunc, a
  reduction, a creation that writes memory, a gather, a scatter, a copy, a RawKernel call,
  an FFT);
* every read of a device value by the host counts as a **sync** and a **device-to-host**
  transfer (``float()``, ``int()``, ``bool()``, ``.item()``, ``.get()``, ``asnumpy``, boolean
  masks and ``nonzero`` whose output size the host must learn, ``unravel_index``);
* every host array that reaches the device counts as a **host-to-device** transfer
  (``asarray`` of a NumPy array, indexing with or assigning a NumPy array);
* **mistakes CuPy refuses raise here too**: an implicit conversion to NumPy
  (``np.asarray(device)``, any SciPy function on a device array) and mixing host arrays into
  device arithmetic raise ``TypeError`` with CuPy's wording.

The counts are deterministic, so launch and sync budgets are tests, not timings. Each count is
attributed to the first caller outside this module (``file:line function``): see
:func:`counting`. The model follows CuPy 13: one launch per ufunc call and per reduction,
creation routines other than ``empty`` write memory (one launch), ``cupyx.scipy.signal.
fftconvolve`` is two forward FFTs, a product, an inverse FFT and a copy (five launches, the
padding copies included as two more), a ``RawKernel`` call is one launch, a
``cupyx.scipy.sparse`` COO-to-CSC conversion ten launches and one sync, a sparse product one
launch. It is a model, not a profiler: it errs towards counting what CuPy would do in the common
case.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

__all__ = ["DeviceArray", "GpuCostModel", "Ledger", "counting", "devicecost", "register_raw_kernel"]

_HERE = str(Path(__file__).resolve())
_NUMPY_DIR = str(Path(np.__file__).resolve().parent)


# --------------------------------------------------------------------------- ledger
@dataclass
class Ledger:
    """Counts of device operations, in total and per call site."""

    launches: int = 0
    syncs: int = 0
    h2d: int = 0
    d2h: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    sites: Counter = field(default_factory=Counter)  # (kind, "file:line function") -> count
    # Seconds: the whole ``counting()`` block, and the part spent inside counted device
    # operations (the NumPy work standing in for kernels, copies and the counting itself).
    wall_s: float = 0.0
    device_s: float = 0.0

    @property
    def host_s(self) -> float:
        """Seconds of host work in the block: what would still run on the host with a GPU (the
        Python and NumPy work outside device operations), measured on this CPU."""
        return max(self.wall_s - self.device_s, 0.0)

    def add(self, kind: str, n: int = 1, nbytes: int = 0) -> None:
        setattr(self, kind, getattr(self, kind) + n)
        if kind == "h2d":
            self.h2d_bytes += nbytes
        elif kind == "d2h":
            self.d2h_bytes += nbytes
        self.sites[(kind, _call_site())] += n

    def top(self, kind: str = "launches", n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` call sites with the most operations of ``kind``."""
        rows = [(site, c) for (k, site), c in self.sites.items() if k == kind]
        return sorted(rows, key=lambda r: -r[1])[:n]

    def summary(self) -> dict:
        return {"launches": self.launches, "syncs": self.syncs, "h2d": self.h2d, "d2h": self.d2h,
                "h2d_bytes": self.h2d_bytes, "d2h_bytes": self.d2h_bytes}

    def gpu_estimate_ms(self, model: "GpuCostModel | None" = None) -> dict:
        """A GPU latency estimate for the block from its counts and its measured host work
        (see :class:`GpuCostModel`): ``{"host_ms", "launch_ms", "sync_ms", "transfer_ms",
        "total_ms"}``."""
        return (model or GpuCostModel()).estimate_ms(self)


@dataclass(frozen=True)
class GpuCostModel:
    """What a block of engine work would cost on a GPU, from what the counting backend measures.

    ``total = host + launches * launch_us + syncs * sync_us + bytes / bandwidth``:

    * **host**: the block's host work measured on this CPU (:attr:`Ledger.host_s`: the wall
      time less the time inside counted device operations). A GPU does not shorten it.
    * **launch_us**: CuPy's host-side cost of one kernel call (argument packing, the launch:
      about 11 us for an elementwise kernel in CuPy's own benchmarks, cupy/cupy#3298, less
      since; FFT plans and reductions cost more, so 10 us is taken for every launch).
    * **sync_us**: one device-to-host read (a stream synchronisation and a small copy, about
      10-20 us; the kernels in flight before it are assumed to take less than the host
      work between syncs, which holds here: the whole DMR step is a few MB of memory traffic).
    * **bandwidth**: pageable host memory over PCIe (about 10-12 GB/s in practice).

    The kernels' own execution time is not added (on an H100 the largest, a 9-beam
    incremental update, moves a few MB: microseconds). It is a model, not a measurement: a GPU
    run (``bench/gpu_check.sh``) replaces it."""

    launch_us: float = 10.0
    sync_us: float = 20.0
    h2d_gb_s: float = 10.0
    d2h_gb_s: float = 10.0

    def estimate_ms(self, led: "Ledger") -> dict:
        host = 1e3 * led.host_s
        launch = 1e-3 * self.launch_us * led.launches
        sync = 1e-3 * self.sync_us * led.syncs
        transfer = 1e3 * (led.h2d_bytes / (self.h2d_gb_s * 1e9) + led.d2h_bytes / (self.d2h_gb_s * 1e9))
        return {"host_ms": host, "launch_ms": launch, "sync_ms": sync, "transfer_ms": transfer,
                "total_ms": host + launch + sync + transfer}


_LEDGERS: list[Ledger] = []
_LOCK = threading.Lock()


def _call_site() -> str:
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename in (_HERE, __file__) or f.f_code.co_filename.startswith(("<", _NUMPY_DIR))):
        f = f.f_back
    if f is None:  # pragma: no cover
        return "?"
    name = f.f_code.co_filename
    parts = Path(name).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else name
    return f"{short}:{f.f_lineno} {f.f_code.co_name}"


def _count(kind: str, n: int = 1, nbytes: int = 0) -> None:
    if n <= 0 or not _LEDGERS:
        return
    with _LOCK:
        for led in _LEDGERS:
            led.add(kind, n, nbytes)


@contextlib.contextmanager
def counting():
    """Count the device operations of the block: ``with counting() as c: ...; c.launches``.

    Also times the block (``c.wall_s``) and the part spent in device operations
    (``c.device_s``), so ``c.host_s`` is the block's host work."""
    led = Ledger()
    with _LOCK:
        _LEDGERS.append(led)
    t0 = time.perf_counter()
    try:
        yield led
    finally:
        led.wall_s = time.perf_counter() - t0
        with _LOCK:
            _LEDGERS.remove(led)


_DEPTH = threading.local()


def _device_op(fn):
    """Time ``fn`` as device work on the active ledgers (the outermost call only: a device
    operation that calls another is timed once)."""

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        depth = getattr(_DEPTH, "n", 0)
        if depth or not _LEDGERS:
            _DEPTH.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                _DEPTH.n = depth
        _DEPTH.n = 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            _DEPTH.n = 0
            with _LOCK:
                for led in _LEDGERS:
                    led.device_s += dt

    return timed


# --------------------------------------------------------------------------- arrays
_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


def _wrap(x):
    """Wrap a NumPy result as a device array (0-d for scalars, as CuPy returns them)."""
    if isinstance(x, np.ndarray):
        return DeviceArray(x)
    if isinstance(x, np.generic):
        return DeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(x, what: str):
    """The NumPy array behind a device argument; host arrays are refused (CuPy would)."""
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (a host NumPy array passed to {what}: "
                        "copy it to the device first)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, what) for v in x)
    return x


def _h2d(x):
    """Copy host data to the device (counted), or return a device array as it is."""
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, (list, tuple)) and any(isinstance(v, DeviceArray) for v in x):
        return np.asarray([v._a if isinstance(v, DeviceArray) else v for v in x])
    a = np.asarray(x)
    _count("h2d", 1, a.nbytes)
    return a


def _index_key(key):
    """Translate an index for the NumPy array behind, counting what CuPy would do with it."""
    launches, syncs = 0, 0
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for k in parts:
        if isinstance(k, DeviceArray):
            launches = 1
            if k.dtype == bool:
                syncs += 1  # the host must learn how many elements the mask selects
            out.append(k._a)
        elif isinstance(k, (np.ndarray, list)):
            a = np.asarray(k)
            _count("h2d", 1, a.nbytes)
            launches = 1
            if a.dtype == bool:
                syncs += 1
            out.append(a)
        else:
            out.append(k)
    return (tuple(out) if isinstance(key, tuple) else out[0]), launches, syncs


class DeviceArray(NDArrayOperatorsMixin):
    """A "device" array: a NumPy array that only the counting backend's functions may touch."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    # ---- attributes (no device work)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DeviceArray(self._a.T))

    @property
    def device(self):
        return _Device(0)

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    def __iter__(self):
        for k in range(len(self._a)):
            yield DeviceArray(self._a[k])

    # ---- host reads: a sync and a transfer each
    def get(self, stream=None) -> np.ndarray:
        _count("syncs")
        _count("d2h", 1, self._a.nbytes)
        return self._a.copy()

    def item(self):
        _count("syncs")
        _count("d2h", 1, self._a.itemsize)
        return self._a.item()

    def tolist(self):
        return self.get().tolist()

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self._a.dtype.kind not in "iub":
            raise TypeError("only integer arrays can be used as an index")
        return int(self.item())

    def __bool__(self) -> bool:
        return bool(self.item())

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    # ---- NumPy protocols: what CuPy supports runs here (counted), the rest raises
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = _unwrap(inputs, f"numpy.{ufunc.__name__}")
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _unwrap(out, f"numpy.{ufunc.__name__}")
        _count("launches")
        result = getattr(ufunc, method)(*args, **kwargs)
        if method == "at":
            return None
        if out is not None:  # CuPy returns the very array passed as out=
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        mod = func.__module__ or "numpy"
        sub = mod.split(".")[1:] if mod.startswith("numpy") else None
        target = devicecost
        for part in sub or ():
            if part in ("core", "lib", "_core") or part.startswith("_"):
                continue
            target = getattr(target, part, None)
        impl = getattr(target, func.__name__, None) if target is not None else None
        if impl is None or sub is None:
            raise TypeError(f"no implementation found for '{mod}.{func.__name__}' on a device array "
                            "(CuPy has none either): copy it to the host explicitly")
        return impl(*args, **kwargs)

    # ---- indexing
    def __getitem__(self, key):
        k, launches, syncs = _index_key(key)
        _count("syncs", syncs)
        _count("launches", launches)
        return _wrap(self._a[k])

    def __setitem__(self, key, value):
        k, launches, syncs = _index_key(key)
        _count("syncs", syncs)
        if isinstance(value, DeviceArray):
            value = value._a
        elif isinstance(value, np.ndarray) and value.ndim > 0:
            _count("h2d", 1, value.nbytes)
        _count("launches", 1)
        self._a[k] = value

    # ---- methods CuPy has (views cost nothing, the rest one launch)
    def reshape(self, *shape, order="C"):
        view = self._a.reshape(*shape, order=order)
        if not np.shares_memory(view, self._a):
            _count("launches")
        return DeviceArray(view)

    def ravel(self, order="C"):
        return self.reshape(-1, order=order)

    def view(self, dtype=None):
        return DeviceArray(self._a.view(dtype) if dtype is not None else self._a.view())

    def transpose(self, *axes):
        return DeviceArray(self._a.transpose(*axes))

    def swapaxes(self, a, b):
        return DeviceArray(self._a.swapaxes(a, b))

    def squeeze(self, axis=None):
        return DeviceArray(self._a.squeeze(axis))

    def astype(self, dtype, copy=True, **kw):
        if not copy and np.dtype(dtype) == self._a.dtype:
            return self
        _count("launches")
        return DeviceArray(self._a.astype(dtype, copy=True))

    def copy(self, order="C"):
        _count("launches")
        return DeviceArray(self._a.copy(order=order))

    def fill(self, value):
        _count("launches")
        self._a.fill(value)

    def nonzero(self):
        _count("launches", 2)
        _count("syncs")
        return _wrap(self._a.nonzero())

    def dot(self, other):
        _count("launches")
        return _wrap(self._a.dot(_unwrap(other, "dot")))

    def __matmul__(self, other):
        _count("launches")
        return _wrap(self._a @ _unwrap(other, "matmul"))

    def __rmatmul__(self, other):
        _count("launches")
        return _wrap(_unwrap(other, "matmul") @ self._a)


def _reduction(name: str):
    def method(self, *args, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = _unwrap(kwargs["out"], name)
        _count("launches")
        return _wrap(getattr(self._a, name)(*args, **kwargs))

    method.__name__ = name
    return method


for _name in ("sum", "prod", "max", "min", "mean", "any", "all", "argmax", "argmin", "cumsum", "std", "var",
              "clip", "round", "conj", "repeat", "take", "sort", "argsort", "flatten"):
    setattr(DeviceArray, _name, _device_op(_reduction(_name)))
# The methods that do device work (or read the device) are timed as device work; views and
# attributes are not.
for _name in ("get", "item", "__array_ufunc__", "__getitem__", "__setitem__", "reshape", "astype", "copy", "fill",
              "nonzero", "dot", "__matmul__", "__rmatmul__"):
    setattr(DeviceArray, _name, _device_op(getattr(DeviceArray, _name)))


# --------------------------------------------------------------------------- the module
# Functions whose output size depends on the data: the host waits for the count.
_SYNCING = {"nonzero": 1, "flatnonzero": 1, "argwhere": 1, "unique": 1, "extract": 1, "compress": 1,
            "unravel_index": 2, "bincount": 1}
_FREE = {"empty", "empty_like", "broadcast_to", "broadcast_arrays", "expand_dims", "squeeze", "transpose",
         "swapaxes", "moveaxis", "atleast_1d", "atleast_2d", "atleast_3d", "shape", "ndim", "size", "result_type",
         "can_cast", "promote_types", "isscalar", "iscomplexobj", "ravel", "reshape"}
_CREATE_FROM_HOST = {"asarray", "array", "ascontiguousarray", "asanyarray", "asfortranarray"}
_NOT_IN_CUPY = {"vectorize", "frompyfunc", "fromfunction", "loadtxt", "genfromtxt", "save", "savez", "load",
                "set_printoptions", "printoptions"}


@_device_op
def _asarray(a, dtype=None, order=None, copy=None, **_):
    host = _h2d(a)
    if not isinstance(a, DeviceArray):
        # A copy, as a host-to-device transfer is: the device array never aliases host memory
        # (writes to one must not show in the other, as on a GPU).
        return DeviceArray(np.array(host, dtype=dtype, order=order or "K"))
    out = np.asarray(host, dtype=dtype, order=order)
    if out is not a._a:
        _count("launches")  # a dtype or layout change on the device
        return DeviceArray(out)
    return a


@_device_op
def _array(a, dtype=None, copy=True, order="K", **_):
    if isinstance(a, DeviceArray):
        if not copy and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        _count("launches")
        return DeviceArray(np.array(a._a, dtype=dtype, order=order))
    return DeviceArray(np.array(_h2d(a), dtype=dtype, order=order))


@_device_op
def _ascontiguousarray(a, dtype=None, **_):
    if isinstance(a, DeviceArray):
        if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        _count("launches")
        return DeviceArray(np.ascontiguousarray(a._a, dtype=dtype))
    return DeviceArray(np.array(_h2d(a), dtype=dtype, order="C"))  # a copy: no aliasing of host memory


@_device_op
def _asnumpy(a, stream=None, **_):
    if isinstance(a, DeviceArray):
        return a.get()
    return np.asarray(a)


def _function(name: str, fn):
    syncs = _SYNCING.get(name, 0)
    launches = 0 if name in _FREE else 1

    def wrapper(*args, **kwargs):
        a = _unwrap(args, f"cupy.{name}")
        kw = {k: _unwrap(v, f"cupy.{name}") for k, v in kwargs.items()}
        _count("launches", launches + (1 if syncs else 0))
        _count("syncs", syncs)
        return _wrap(fn(*a, **kw))

    wrapper.__name__ = name
    wrapper.__doc__ = f"Counting stand-in for cupy.{name}."
    return _device_op(wrapper)


class _Namespace(types.ModuleType):
    """A module whose attributes are NumPy's functions, counted and on device arrays."""

    def __init__(self, name: str, source) -> None:
        super().__init__(name)
        self._source = source

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _NOT_IN_CUPY:
            raise AttributeError(f"module 'cupy' has no attribute {name!r}")
        obj = getattr(self._source, name)
        if isinstance(obj, np.ufunc):
            value = obj  # dispatches through DeviceArray.__array_ufunc__
        elif callable(obj) and not isinstance(obj, type):
            value = _function(name, obj)
        else:
            value = obj  # dtypes, constants
        setattr(self, name, value)
        return value


class _Device:
    def __init__(self, device_id: int = 0) -> None:
        self.id = device_id

    def synchronize(self) -> None:
        _count("syncs")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Stream:
    def synchronize(self) -> None:
        _count("syncs")


class _RawFunction:
    def __init__(self, name: str) -> None:
        self.name = name

    @_device_op
    def __call__(self, grid, block, args, **kwargs):
        twin = _RAW_TWINS.get(self.name)
        if twin is None:
            raise RuntimeError(f"counting backend: no NumPy twin registered for the kernel {self.name!r}")
        for a in args:
            if isinstance(a, np.ndarray):
                raise TypeError(f"kernel {self.name}: a host NumPy array passed as a kernel argument")
            if isinstance(a, (int, float)) and not isinstance(a, (np.generic, bool)):
                raise TypeError(f"kernel {self.name}: pass scalars as sized NumPy scalars (np.int32, np.float32), "
                                f"not Python {type(a).__name__}")
        _count("launches")
        twin(grid, block, tuple(a._a if isinstance(a, DeviceArray) else a for a in args))


class _RawModule:
    def __init__(self, code: str = "", options=(), name_expressions=None, **kwargs) -> None:
        self.code = code

    def get_function(self, name: str) -> _RawFunction:
        if f"void {name}(" not in self.code.replace("void  ", "void "):
            raise RuntimeError(f"counting backend: the kernel source defines no function {name!r}")
        return _RawFunction(name)


_RAW_TWINS: dict = {}


def register_raw_kernel(name: str, twin) -> None:
    """Register the NumPy twin the counting backend runs for the CUDA kernel ``name``:
    ``twin(grid, block, args)`` with the kernel's arguments (NumPy arrays and scalars),
    writing its outputs in place as the kernel would."""
    _RAW_TWINS[name] = twin


@_device_op
def _fftconvolve(in1, in2, mode="full", axes=None):
    from scipy.signal import fftconvolve

    a, b = _unwrap(in1, "fftconvolve"), _unwrap(in2, "fftconvolve")
    _count("launches", 7)  # pad x2, rfftn x2, product, irfftn, crop copy
    return DeviceArray(np.asarray(fftconvolve(a, b, mode=mode, axes=axes), dtype=np.result_type(a, b)))


@_device_op
def _scatter_add(a, slices, value):
    target = _unwrap(a, "cupyx.scatter_add")
    _count("launches")
    np.add.at(target, _unwrap(slices, "cupyx.scatter_add"), _unwrap(value, "cupyx.scatter_add"))


class _CscMatrix:
    """Stand-in for ``cupyx.scipy.sparse.csc_matrix``: ``data``, ``indices`` and ``indptr`` on the
    device. ``get()`` is the explicit copy to a SciPy matrix; a product with a device array is
    one launch (cuSPARSE); a host operand raises, as in CuPy."""

    format = "csc"

    def __init__(self, data, indices, indptr, shape) -> None:
        self.data, self.indices, self.indptr = DeviceArray(data), DeviceArray(indices), DeviceArray(indptr)
        self.shape = tuple(int(s) for s in shape)

    dtype = property(lambda self: self.data.dtype)
    nnz = property(lambda self: int(self.data.shape[0]))  # known on the host: no sync
    ndim = 2

    def __repr__(self) -> str:
        return f"<devicecost csc_matrix shape={self.shape} nnz={self.nnz} dtype={self.dtype}>"

    def _host(self):
        import scipy.sparse as sp  # noqa: PLC0415

        return sp.csc_matrix((self.data._a, self.indices._a, self.indptr._a), shape=self.shape)

    @_device_op
    def get(self, stream=None):
        _count("syncs")
        for a in (self.data, self.indices, self.indptr):
            _count("d2h", 1, a.nbytes)
        return self._host().copy()

    def tocsc(self, copy=False):
        return self

    @_device_op
    def toarray(self):
        _count("launches")
        return DeviceArray(self._host().toarray())

    @_device_op
    def __matmul__(self, other):
        if not isinstance(other, DeviceArray):
            raise TypeError(f"Unsupported type {type(other)} (a host operand of a device sparse matrix product: "
                            "copy it to the device first)")
        _count("launches")
        return DeviceArray(np.asarray(self._host() @ other._a))

    dot = __matmul__

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)


class _CooMatrix:
    """Stand-in for ``cupyx.scipy.sparse.coo_matrix((data, (row, col)), shape)`` (device triplets);
    ``tocsc()`` sums duplicates as CuPy's does (a sort, a segmented sum, a compression: counted as
    ten launches and one sync, where the host learns the number of distinct entries)."""

    format = "coo"

    def __init__(self, arg, shape=None, dtype=None) -> None:
        data, (row, col) = arg
        for a in (data, row, col):
            if not isinstance(a, DeviceArray):
                raise TypeError(f"Unsupported type {type(a)} (coo_matrix needs device arrays)")
        if shape is None:
            raise ValueError("coo_matrix: give the shape")
        if dtype is not None and np.dtype(dtype) != data.dtype:
            data = data.astype(dtype)
        self.data, self.row, self.col = data, row, col
        self.shape = tuple(int(s) for s in shape)

    nnz = property(lambda self: int(self.data.shape[0]))
    dtype = property(lambda self: self.data.dtype)

    @_device_op
    def tocsc(self, copy=False) -> _CscMatrix:
        import scipy.sparse as sp  # noqa: PLC0415

        _count("launches", 10)
        _count("syncs")
        m = sp.coo_matrix((self.data._a, (self.row._a, self.col._a)), shape=self.shape).tocsc()
        m.sum_duplicates()
        return _CscMatrix(m.data, m.indices.astype(np.int32, copy=False), m.indptr.astype(np.int32, copy=False),
                          self.shape)


def _memoize(for_each_device=False):
    def deco(fn):
        cache = {}

        def wrapper(*args):
            if args not in cache:
                cache[args] = fn(*args)
            return cache[args]

        return wrapper

    return deco


devicecost = _Namespace("devicecost", np)
devicecost.__doc__ = "The counting backend's stand-in for the cupy module (see ids_engine._devicecost)."
devicecost.ndarray = DeviceArray
devicecost.asarray = _asarray
devicecost.array = _array
devicecost.asanyarray = _asarray
devicecost.ascontiguousarray = _ascontiguousarray
devicecost.asnumpy = _asnumpy
devicecost.get_array_module = lambda *a: devicecost if any(isinstance(v, DeviceArray) for v in a) else np
devicecost.RawModule = _RawModule
devicecost.memoize = _memoize
devicecost.fft = _Namespace("devicecost.fft", np.fft)
devicecost.linalg = _Namespace("devicecost.linalg", np.linalg)
devicecost.cuda = types.SimpleNamespace(
    Device=_Device, get_current_stream=lambda: _Stream(),
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
devicecost.cupyx = types.SimpleNamespace(
    scipy=types.SimpleNamespace(signal=types.SimpleNamespace(fftconvolve=_fftconvolve),
                                sparse=types.SimpleNamespace(coo_matrix=_CooMatrix, csc_matrix=_CscMatrix)),
    scatter_add=_scatter_add)
devicecost.__version__ = "devicecost (NumPy " + np.__version__ + ")"
