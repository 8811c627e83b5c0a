"""Every CUDA kernel compiles with NVRTC, and every launch matches the kernel's signature.

No GPU or driver is needed: NVRTC is a compiler library (``cuda-bindings`` with
``nvidia-cuda-nvrtc-cu12`` from PyPI, in the ``test`` extra on Linux x86_64); the tests
skip, saying so, where it is not importable, and fail instead under ``IDS_REQUIRE_NVRTC=1``
(set by ``.ci/run``).

Each ``extern "C" __global__`` function in ``kernels/cuda/*.cu`` is declared once by its
launcher as a :class:`~ids_engine.kernels._cuda.CudaKernel` (C parameter list, ``#define``
constants, options). These tests check, for every declaration:

* it is compiled exactly as the CuPy launcher compiles it (``code()`` and ``options``,
  plus the ``-ftz=true`` CuPy appends) for ``sm_80``, ``sm_90`` and ``compute_90``, and
  the kernel's C name is in the result; a failure reports the NVRTC log;
* its parameters equal the signature parsed from the source (order, name, C type,
  pointer or scalar, const pointee);
* every ``.launch(...)`` call in the launcher module passes grid, block and exactly the
  declared parameters by keyword (read from the module's syntax tree, not by running it);
* its argument builder passes each scalar as a NumPy scalar of the declared C type and
  each array as a contiguous array of the declared dtype (run on host arrays).

The negative tests at the end feed each check a broken input and require it to fail.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import ids_engine.kernels
from ids_engine.kernels._cuda import CUDA_DIR, CudaKernel, Param, parse_param

ARCHS = ("sm_80", "sm_90", "compute_90")
# cupy.cuda.compiler appends this to the options of every RawModule compiled with NVRTC
# (and -arch for the current device, which the parametrisation stands in for).
CUPY_OPTIONS = ("-ftz=true",)


# --------------------------------------------------------------------------- declarations
def _declarations() -> list[tuple[str, object, CudaKernel]]:
    """(attribute name, launcher module, kernel) for every CudaKernel declared in ids_engine.kernels."""
    found = []
    for info in pkgutil.iter_modules(ids_engine.kernels.__path__, "ids_engine.kernels."):
        module = importlib.import_module(info.name)
        for attr, value in vars(module).items():
            if isinstance(value, CudaKernel):
                found.append((attr, module, value))
    return found


DECLARED = _declarations()
KERNEL_IDS = [f"{module.__name__.rsplit('.', 1)[-1]}.{attr}" for attr, module, _ in DECLARED]


# --------------------------------------------------------------------------- CUDA source
_GLOBAL = re.compile(
    r'(?P<extern>extern\s+"C"\s+)?__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s+)?void\s+'
    r"(?:__launch_bounds__\s*\([^)]*\)\s+)?(?P<name>\w+)\s*\((?P<params>[^)]*)\)"
)


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", src, flags=re.S)


def _source_kernels(src: str) -> dict[str, tuple[bool, tuple[Param, ...]]]:
    """Kernel name -> (declared extern "C", parsed parameters) for every __global__ function."""
    out = {}
    for m in _GLOBAL.finditer(_strip_comments(src)):
        params = [p.strip() for p in m["params"].split(",") if p.strip()]
        if params == ["void"]:
            params = []
        out[m["name"]] = (m["extern"] is not None, tuple(parse_param(p) for p in params))
    return out


def _signature_mismatches(kernel: CudaKernel, source: tuple[Param, ...]) -> list[str]:
    declared = kernel.parameters
    problems = []
    if len(declared) != len(source):
        problems.append(f"{len(declared)} parameters declared, {len(source)} in the source")
    for i, (d, s) in enumerate(zip(declared, source)):
        if d != s:
            problems.append(f"parameter {i}: declared {d}, source {s}")
    return problems


# --------------------------------------------------------------------------- launch calls
def _launch_mismatches(kernel: CudaKernel, attr: str, module_source: str) -> list[str]:
    """Problems with the ``<attr>.launch(grid, block, **args)`` / ``<attr>.arguments(**args)``
    calls in a launcher's source; also a problem when the kernel is never launched."""
    names = [p.name for p in kernel.parameters]
    problems, launches = [], 0
    for node in ast.walk(ast.parse(module_source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Name) and target.id == attr):
            continue
        method = node.func.attr
        where = f"line {node.lineno}: {attr}.{method}(...)"
        if method == "function":
            problems.append(f"{where} bypasses the declared argument list")
            continue
        if method not in ("launch", "arguments"):
            continue
        launches += method == "launch"
        positional = 2 if method == "launch" else 0
        if len(node.args) != positional or any(isinstance(a, ast.Starred) for a in node.args):
            problems.append(f"{where} takes {positional} positional arguments, got {len(node.args)}")
        passed = [k.arg for k in node.keywords]
        if None in passed:
            problems.append(f"{where} passes **kwargs: its arguments cannot be checked")
        passed = [k for k in passed if k is not None]
        missing = [n for n in names if n not in passed]
        extra = [k for k in passed if k not in names]
        if missing or extra:
            problems.append(f"{where}: missing {missing}, unexpected {extra}")
    if launches == 0:
        problems.append(f"{attr} is declared but never launched")
    return problems


# --------------------------------------------------------------------------- NVRTC
def _unavailable(reason: str):
    """Skip, or fail where CI says NVRTC must be there (IDS_REQUIRE_NVRTC=1, set by .ci/run)."""
    if os.environ.get("IDS_REQUIRE_NVRTC") == "1":
        pytest.fail(f"IDS_REQUIRE_NVRTC=1 but {reason}", pytrace=False)
    pytest.skip(f"NVRTC check skipped: {reason}")


def _nvrtc_module():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            with warnings.catch_warnings():
                # cuda-bindings < 12.6 only has the (since deprecated) cuda.nvrtc spelling.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                from cuda import nvrtc
        except ImportError as exc:
            _unavailable(f"cuda-bindings is not importable ({exc}); "
                         "pip install 'cuda-bindings<13' nvidia-cuda-nvrtc-cu12")
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # the bindings load libnvrtc lazily
        _unavailable(f"libnvrtc cannot be loaded ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc-cu12")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _unavailable(f"nvrtcVersion() returned {err}")
    return nvrtc


@pytest.fixture(scope="module")
def nvrtc():
    return _nvrtc_module()


class NvrtcError(Exception):
    """NVRTC refused a program; the message holds its log."""


def _check(nvrtc, result):
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcError(f"NVRTC call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def _compile(nvrtc, code: str, filename: str, kernel_name: str, options: tuple[str, ...]) -> tuple[int, bytes]:
    """Compile ``code``; returns (size of the CUBIN or PTX, the kernel's lowered name).

    Raises :class:`NvrtcError` with the compiler log when the program does not compile.
    """
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(code.encode(), filename.encode(), 0, [], []))
    try:
        _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, kernel_name.encode()))
        opts = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log))
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            text = log.rstrip(b"\x00 ").decode(errors="replace")
            raise NvrtcError(f"{filename} ({kernel_name}), options {' '.join(options)}: {err}\n{text}")
        cubin = any(o.startswith("-arch=sm_") for o in options)
        size = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog) if cubin else nvrtc.nvrtcGetPTXSize(prog))
        lowered = _check(nvrtc, nvrtc.nvrtcGetLoweredName(prog, kernel_name.encode()))
        return size, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _assert_compiles(nvrtc, kernel: CudaKernel, code: str, arch: str) -> None:
    options = kernel.options + CUPY_OPTIONS + (f"-arch={arch}",)
    try:
        size, lowered = _compile(nvrtc, code, kernel.source, kernel.name, options)
    except NvrtcError as exc:
        log = str(exc)
    else:
        log = None
    if log is not None:  # outside the except block: the report is the log alone
        pytest.fail(f"NVRTC cannot compile {kernel.source} for {arch}:\n{log}", pytrace=False)
    assert size > 0
    # extern "C": the symbol cupy.RawModule.get_function looks up is the plain name.
    assert lowered == kernel.name.encode(), f"{kernel.name} is exported as {lowered!r}"


# =========================================================================== tests
def test_every_cuda_source_is_declared_once_per_kernel():
    sources = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
    assert sources, f"no CUDA sources in {CUDA_DIR}"
    declared = {(k.source, k.name) for _, _, k in DECLARED}
    assert len(declared) == len(DECLARED), "a kernel is declared twice"
    in_sources = set()
    for name in sources:
        for kernel_name, (extern_c, _) in _source_kernels((CUDA_DIR / name).read_text()).items():
            assert extern_c, f'{name}: __global__ {kernel_name} must be extern "C" (RawModule looks it up by name)'
            in_sources.add((name, kernel_name))
    assert declared == in_sources, (
        f"kernels in the sources but not declared by a launcher: {sorted(in_sources - declared)}; "
        f"declared but not in the sources: {sorted(declared - in_sources)}"
    )


@pytest.mark.parametrize("attr, module, kernel", DECLARED, ids=KERNEL_IDS)
def test_declared_parameters_match_the_source(attr, module, kernel):
    source = _source_kernels((CUDA_DIR / kernel.source).read_text())
    assert kernel.name in source, f"{kernel.source} has no __global__ {kernel.name}"
    problems = _signature_mismatches(kernel, source[kernel.name][1])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("attr, module, kernel", DECLARED, ids=KERNEL_IDS)
def test_launch_calls_pass_the_declared_parameters(attr, module, kernel):
    problems = _launch_mismatches(kernel, attr, inspect.getsource(module))
    assert not problems, f"{module.__name__}:\n" + "\n".join(problems)


@pytest.mark.parametrize("attr, module, kernel", DECLARED, ids=KERNEL_IDS)
def test_arguments_have_the_declared_c_types(attr, module, kernel):
    values = {}
    for p in kernel.parameters:
        if p.pointer:
            # Inputs of another dtype and layout are converted; outputs must already fit.
            values[p.name] = np.zeros((3, 2), p.dtype) if not p.const else np.zeros((2, 3), np.float64).T
        else:
            values[p.name] = 3 if np.issubdtype(p.dtype, np.integer) else 0.5
    args = kernel.arguments(**values)
    assert len(args) == len(kernel.parameters)
    for p, a in zip(kernel.parameters, args):
        if p.pointer:
            assert a.dtype == p.dtype and a.flags.c_contiguous, p
            if not p.const:
                assert a is values[p.name], f"output {p.name} was copied: the kernel's writes would be lost"
        else:
            assert type(a) is p.dtype, f"{p.name}: {type(a).__name__} passed for C {p.ctype}"
    # An input that already has the declared dtype and layout is passed as it is (not copied).
    fitting = {p.name: (np.zeros((2, 3), p.dtype) if p.pointer else values[p.name]) for p in kernel.parameters}
    for p, a in zip(kernel.parameters, kernel.arguments(**fitting)):
        if p.pointer:
            assert a is fitting[p.name], f"{p.name}: a fitting array was copied"
    # A scalar cannot be an output.
    outputs = [p for p in kernel.parameters if p.pointer and not p.const]
    if outputs:
        bad = dict(fitting, **{outputs[0].name: np.dtype(outputs[0].dtype).type(0)})
        with pytest.raises(TypeError, match="must be an array, got the scalar"):
            kernel.arguments(**bad)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attr, module, kernel", DECLARED, ids=KERNEL_IDS)
def test_kernel_compiles_with_nvrtc(nvrtc, attr, module, kernel, arch):
    _assert_compiles(nvrtc, kernel, kernel.code(), arch)


# --------------------------------------------------------------------------- negative tests
@pytest.mark.parametrize("attr, module, kernel", DECLARED, ids=KERNEL_IDS)
def test_a_syntax_error_fails_the_compile_check_with_the_log(nvrtc, attr, module, kernel):
    code = kernel.code()
    end = code.rindex("}")  # the last function's closing brace
    broken = code[:end] + "    int broken = ;\n" + code[end:]
    with pytest.raises(pytest.fail.Exception, match=r"(?s)error.*int broken = ;"):
        _assert_compiles(nvrtc, kernel, broken, "sm_90")


def _mutations(kernel: CudaKernel) -> dict[str, tuple[str, ...]]:
    """The kernel's declaration with one kind of mistake each (as C parameter strings)."""
    params = kernel.parameters
    scalar = next(i for i, p in enumerate(params) if not p.pointer)
    pointer = next(i for i, p in enumerate(params) if p.pointer)

    def with_param(i: int, text: str) -> tuple[str, ...]:
        return kernel.params[:i] + (text,) + kernel.params[i + 1:]

    s, p = params[scalar], params[pointer]
    return {
        "one dropped": kernel.params[:-1],
        "one added": kernel.params + ("int extra",),
        "two swapped": (kernel.params[1], kernel.params[0]) + kernel.params[2:],
        "int vs float": with_param(scalar, f"{'int' if s.ctype == 'float' else 'float'} {s.name}"),
        "pointer vs scalar": with_param(pointer, f"{p.ctype} {p.name}"),
        "const changed": with_param(pointer, f"{'' if p.const else 'const '}{p.ctype}* {p.name}"),
    }


@pytest.mark.parametrize("change", ["one dropped", "one added", "two swapped", "int vs float", "pointer vs scalar",
                                    "const changed"])
@pytest.mark.parametrize("attr, module, kernel", DECLARED, ids=KERNEL_IDS)
def test_a_wrong_declaration_is_reported(attr, module, kernel, change):
    wrong = dataclasses.replace(kernel, params=_mutations(kernel)[change])
    source = _source_kernels((CUDA_DIR / kernel.source).read_text())[kernel.name][1]
    assert _signature_mismatches(wrong, source)


@pytest.mark.parametrize("call, problem", [
    ("K.launch((1,), (32,), {kw})", None),
    ("K.launch((1,), (32,), {kw_but_last})", "missing"),
    ("K.launch((1,), (32,), {kw}, extra=1)", "unexpected"),
    ("K.launch((1,), (32,), *args)", "positional"),
    ("K.launch((1,), (32,), **values)", "**kwargs"),
    ("K.function()(grid, block, args)", "bypasses"),
    ("pass", "never launched"),
])
def test_a_wrong_launch_call_is_reported(call, problem):
    kernel = CudaKernel("k.cu", "k", ("float* out", "const int* idx", "int n", "float scale"))
    names = [p.name for p in kernel.parameters]
    text = call.format(kw=", ".join(f"{n}={n}" for n in names),
                       kw_but_last=", ".join(f"{n}={n}" for n in names[:-1]))
    problems = _launch_mismatches(kernel, "K", f"def f():\n    {text}\n")
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_arguments_refuse_what_the_kernel_would_misread():
    kernel = CudaKernel("k.cu", "k", ("float* out", "const int* idx", "int n", "float scale"))
    out, idx = np.zeros(4, np.float32), np.arange(4)
    with pytest.raises(TypeError, match="missing arguments \\['scale'\\]"):
        kernel.arguments(out=out, idx=idx, n=4)
    with pytest.raises(TypeError, match="'n' \\(int\\) cannot take 4.5"):
        kernel.arguments(out=out, idx=idx, n=4.5, scale=1.0)
    with pytest.raises(TypeError, match="output 'out'"):
        kernel.arguments(out=np.zeros(4), idx=idx, n=4, scale=1.0)
    with pytest.raises(TypeError, match="output 'out'"):
        kernel.arguments(out=np.zeros((4, 2), np.float32).T, idx=idx, n=4, scale=1.0)
    with pytest.raises(TypeError, match="'n' \\(int\\) cannot take"):
        kernel.arguments(out=out, idx=idx, n=2**40, scale=1.0)


def test_launch_compiles_once_per_device_and_passes_sized_arguments(tmp_path, monkeypatch):
    # The device-cost counting backend stands in for CuPy: its RawModule runs a registered
    # NumPy twin and refuses host arrays and unsized Python scalars, as a CuPy launch would.
    from ids_engine._devicecost import counting, devicecost as dc, register_raw_kernel

    monkeypatch.setattr("ids_engine.kernels._cuda.CUDA_DIR", Path(tmp_path))
    (tmp_path / "k.cu").write_text(
        'extern "C" __global__ void nvrtc_test_axpy(float* out, const float* x, int n, float a) {}\n')
    kernel = CudaKernel("k.cu", "nvrtc_test_axpy", ("float* out", "const float* x", "int n", "float a"))
    seen = []

    def twin(grid, block, args):
        out, x, n, a = args
        seen.append(tuple(type(v) for v in (n, a)))
        out[:n] += a * x[:n]

    register_raw_kernel("nvrtc_test_axpy", twin)
    out = dc.zeros(4, dc.float32)
    x = dc.asarray(np.arange(4, dtype=np.float64))  # converted to float32 on the device
    with counting() as c:
        kernel.launch((1,), (32,), out=out, x=x, n=3, a=2)
        kernel.launch((1,), (32,), out=out, x=x, n=3, a=2)
    np.testing.assert_array_equal(out.get(), [0, 4, 8, 0])
    assert seen == [(np.int32, np.float32)] * 2
    assert c.launches == 2 + 2  # the kernel twice, the float64 -> float32 conversion twice
    assert kernel.function(dc) is kernel.function(dc)  # compiled once for the device
    with pytest.raises(TypeError, match="needs device arrays"):
        kernel.launch((1,), (32,), out=np.zeros(4, np.float32), x=np.ones(4, np.float32), n=3, a=2)


@pytest.mark.parametrize("text, param", [
    ("const float* __restrict__ u", Param("u", "float", True, True)),
    ("float const *u", Param("u", "float", True, True)),
    ("float* const out", Param("out", "float", True, False)),
    ("const int n", Param("n", "int", False, False)),
    ("unsigned int count", Param("count", "unsigned int", False, False)),
])
def test_parameter_parsing(text, param):
    assert parse_param(text) == param


def test_defines_come_first_and_keep_the_file_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr("ids_engine.kernels._cuda.CUDA_DIR", Path(tmp_path))
    (tmp_path / "k.cu").write_text('extern "C" __global__ void k(float* out) { out[0] = SCALE * N; }\n')
    kernel = CudaKernel("k.cu", "k", ("float* out",), defines=(("N", 3), ("SCALE", 0.5)))
    assert kernel.code().splitlines()[:3] == ["#define N 3", "#define SCALE 0.5f", '#line 1 "k.cu"']
