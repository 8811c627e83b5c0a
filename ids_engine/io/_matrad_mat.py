"""MATLAB .mat files, both flavours, read into one plain tree.

MATLAB writes two kinds of .mat file that matter here: version 5 (the default; zlib
compressed, read with :func:`scipy.io.loadmat`) and version 7.3 (``save -v7.3``, an HDF5
file, read with h5py). This module turns either into the same tree of Python values so
that the matRad reader has one code path:

========================  ===============================================================
MATLAB                    Python
========================  ===============================================================
numeric, logical array    ``numpy.ndarray`` in MATLAB's shape (at least 2-D, column-major
                          subscripts: ``a[i, j, k]`` is MATLAB's ``a(i+1, j+1, k+1)``)
char array                ``str`` (rows joined by newlines)
struct, 1x1               ``dict`` field -> value, in MATLAB's field order
struct array, other size  ``list`` of ``dict``, in MATLAB's (column-major) element order
cell array                :class:`Cell` (an object ``ndarray`` in MATLAB's shape)
class object, function    :class:`Opaque` (its class name; the contents are not decoded)
handle, sparse matrix
========================  ===============================================================

Layout of version 7.3 files (from files MATLAB writes; see also the MAT-file format notes
shipped with MATLAB): every variable is a root dataset or group with a ``MATLAB_class``
attribute. Arrays are stored transposed (HDF5 is row-major, MATLAB column-major), so an
HDF5 dataset of shape ``(nz, nx, ny)`` is MATLAB's ``[ny nx nz]``. ``char`` is uint16
(UTF-16 code units). A cell is a dataset of object references into the ``#refs#`` group.
A 1x1 struct is a group holding one member per field (attribute ``MATLAB_fields`` gives
the order); a struct array is a group whose members are reference datasets *without* a
``MATLAB_class``, one reference per element. Empty arrays carry ``MATLAB_empty = 1`` and
store their dimensions as data. Class objects (``classdef``) carry
``MATLAB_object_decode`` and point into ``#subsystem#``; they are returned as opaque.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Cell", "MatFileError", "Opaque", "is_hdf5", "load_mat_variables"]


class MatFileError(Exception):
    """The file is not a readable MATLAB .mat file (the caller adds file and field)."""


@dataclass(frozen=True, eq=False)
class Cell:
    """A MATLAB cell array: ``items`` is an object ``ndarray`` in MATLAB's shape."""

    items: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.items.shape

    @property
    def size(self) -> int:
        return int(self.items.size)

    def column_major(self) -> list:
        """The elements in MATLAB's linear order (``c{1}, c{2}, ...``)."""
        return list(self.items.ravel(order="F"))


@dataclass(frozen=True)
class Opaque:
    """A MATLAB value this reader does not decode (class object, function handle, sparse)."""

    matlab_class: str


_NUMERIC_CLASSES = {
    "double": np.float64, "single": np.float32,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}


def is_hdf5(path: Path) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(str(path)))
    except OSError:
        return False


def load_mat_variables(path: Path, names: tuple[str, ...]) -> tuple[dict, list[str], str]:
    """Read the named top-level variables of a .mat file (either flavour).

    Returns ``(variables, notes, flavour)``: a dict holding those of ``names`` that the
    file has (missing ones are simply absent); the texts of any warnings the underlying
    reader gave (kept for the caller's metadata rather than raised); ``"MATLAB v5"`` or
    ``"MATLAB v7.3 (HDF5)"``.

    Raises :class:`MatFileError` when the file cannot be read as a .mat file.
    """
    if is_hdf5(path):
        return _load_v73(path, names), [], "MATLAB v7.3 (HDF5)"
    variables, notes = _load_v5(path, names)
    return variables, notes, "MATLAB v5"


# ------------------------------------------------------------------ version 5
def _load_v5(path: Path, names: tuple[str, ...]) -> tuple[dict, list[str]]:
    import scipy.io

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            raw = scipy.io.loadmat(
                str(path), squeeze_me=False, struct_as_record=False, chars_as_strings=True,
                variable_names=list(names),
            )
        except NotImplementedError as exc:  # scipy's answer to an HDF5 file it cannot see as one
            raise MatFileError(f"not readable as a MATLAB .mat file ({exc})") from exc
        except MemoryError:
            raise
        except Exception as exc:  # scipy raises assorted exception types on foreign or damaged files
            raise MatFileError(f"not a MATLAB .mat file, or a damaged one ({type(exc).__name__}: {exc})") from exc
        out = {k: _from_scipy(v) for k, v in raw.items() if not k.startswith("__")}
    return out, [str(w.message) for w in caught]


def _from_scipy(v):
    from scipy.io.matlab import MatlabFunction, MatlabOpaque, mat_struct

    if isinstance(v, mat_struct):
        return {f: _from_scipy(getattr(v, f)) for f in v._fieldnames}
    if isinstance(v, MatlabOpaque):
        try:
            name = str(np.asarray(v).ravel()[0]["s2"])
        except (IndexError, KeyError, ValueError, TypeError):
            name = "object"
        return Opaque(name or "object")
    if isinstance(v, MatlabFunction):
        return Opaque("function_handle")
    if isinstance(v, np.ndarray):
        if v.dtype.kind == "U":
            return "\n".join(str(s) for s in v.ravel())
        if v.dtype == object:
            flat = v.ravel(order="F")
            if flat.size and all(isinstance(e, mat_struct) for e in flat):
                structs = [_from_scipy(e) for e in flat]
                return structs[0] if len(structs) == 1 else structs
            items = np.empty(v.shape, dtype=object)
            for idx in np.ndindex(v.shape):
                items[idx] = _from_scipy(v[idx])
            return Cell(items)
        if v.dtype.names:  # a record array: only with struct_as_record=True, kept for safety
            return Opaque("struct")
        return v
    if isinstance(v, (str, bytes)):
        return v if isinstance(v, str) else v.decode("latin-1")
    if isinstance(v, (int, float, complex, np.number, np.bool_)):
        return np.atleast_2d(np.asarray(v))
    return Opaque(type(v).__name__)


# ---------------------------------------------------------------- version 7.3
def _load_v73(path: Path, names: tuple[str, ...]) -> dict:
    import h5py

    try:
        with h5py.File(str(path), "r") as f:
            out = {}
            for name in names:
                if name in f and not name.startswith("#"):
                    out[name] = _from_h5(f, f[name])
            return out
    except MatFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, RuntimeError) as exc:
        raise MatFileError(f"not readable as a MATLAB v7.3 (HDF5) .mat file ({type(exc).__name__}: {exc})") from exc


def _attr_str(node, key: str) -> str | None:
    v = node.attrs.get(key)
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        v = v.ravel()[0] if v.size else b""
    return v.decode("ascii", "replace") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _is_ref_dataset(node) -> bool:
    import h5py

    return isinstance(node, h5py.Dataset) and node.dtype == h5py.ref_dtype


def _field_names(group) -> list[str]:
    raw = group.attrs.get("MATLAB_fields")
    if raw is None:
        return [k for k in group.keys()]
    names = []
    for entry in np.asarray(raw, dtype=object).ravel():
        chars = np.asarray(entry).ravel()
        names.append("".join(c.decode("ascii") if isinstance(c, (bytes, np.bytes_)) else str(c) for c in chars))
    return [n for n in names if n in group]


def _from_h5(f, node):
    import h5py

    cls = _attr_str(node, "MATLAB_class")
    if "MATLAB_sparse" in node.attrs:
        return Opaque("sparse")
    if "MATLAB_object_decode" in node.attrs:
        return Opaque(cls or "object")
    if isinstance(node, h5py.Group):
        if cls not in (None, "struct"):
            return Opaque(cls)
        fields = _field_names(node)
        if fields and all(_is_ref_dataset(node[k]) and _attr_str(node[k], "MATLAB_class") is None for k in fields):
            return _h5_struct_array(f, node, fields)
        return {k: _from_h5(f, node[k]) for k in fields}
    # a dataset
    if node.attrs.get("MATLAB_empty") is not None and int(np.asarray(node.attrs["MATLAB_empty"]).ravel()[0]):
        return _h5_empty(node, cls)
    data = node[()]
    if cls == "cell" or (cls is None and node.dtype == h5py.ref_dtype):
        refs = np.atleast_2d(np.asarray(data).T)
        items = np.empty(refs.shape, dtype=object)
        for idx in np.ndindex(refs.shape):
            items[idx] = _from_h5(f, f[refs[idx]])
        return Cell(items)
    if cls == "char":
        codes = np.atleast_2d(np.asarray(data).T).astype("<u2")
        return "\n".join(row.tobytes().decode("utf-16-le", "replace") for row in codes)
    if cls == "logical":
        return np.atleast_2d(np.asarray(data).T).astype(bool)
    if cls in _NUMERIC_CLASSES:
        arr = np.asarray(data)
        if arr.dtype.names and {"real", "imag"} <= set(arr.dtype.names):
            arr = arr["real"] + 1j * arr["imag"]
        return np.atleast_2d(arr.T)
    return Opaque(cls or "unknown")


def _h5_struct_array(f, group, fields: list[str]):
    refs = {k: np.atleast_2d(np.asarray(group[k][()]).T) for k in fields}
    shape = refs[fields[0]].shape
    if any(r.shape != shape for r in refs.values()):
        raise MatFileError(f"struct array {group.name!r}: fields of different sizes")
    flat = {k: r.ravel(order="F") for k, r in refs.items()}
    n = int(np.prod(shape))
    elements = [{k: _from_h5(f, f[flat[k][i]]) for k in fields} for i in range(n)]
    return elements[0] if n == 1 else elements


def _h5_empty(node, cls: str | None):
    dims = tuple(int(d) for d in np.asarray(node[()]).ravel())
    if cls == "char":
        return ""
    if cls == "cell":
        return Cell(np.empty(dims or (0, 0), dtype=object))
    if cls == "struct":
        return []
    dtype = bool if cls == "logical" else _NUMERIC_CLASSES.get(cls or "double", np.float64)
    return np.zeros(dims or (0, 0), dtype=dtype)
