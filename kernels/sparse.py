"""Sparse matrix construction on either backend: scipy.sparse (NumPy) or cupyx.scipy.sparse (CuPy;
the device-cost counting backend's stand-in for it under IDS_BACKEND=devicecost)."""

from __future__ import annotations

import numpy as np

from ids_engine.backend import array_module, is_counting

__all__ = ["csc_from_columns", "csc_from_triplets"]


def csc_from_triplets(values, rows, cols, shape):
    """A CSC matrix from (value, row, column) triplets; duplicates are summed.

    NumPy arrays give a ``scipy.sparse.csc_matrix``; device arrays a ``cupyx.scipy.sparse``
    matrix built on the device (int32 indices), or, on the counting backend, its stand-in
    (same construction, counted; ``.get()`` copies it to SciPy).
    """
    xp = array_module(values, rows, cols)
    if xp is np:
        import scipy.sparse as sp

        return sp.csc_matrix((values, (rows, cols)), shape=shape)
    if is_counting(xp):
        csp = xp.cupyx.scipy.sparse
    else:  # pragma: no cover - GPU only
        import cupyx.scipy.sparse as csp

    return csp.coo_matrix((values, (rows.astype(xp.int32), cols.astype(xp.int32))), shape=shape).tocsc()


def csc_from_columns(values, rows, counts, shape):
    """A CSC matrix from entries already in column order: ``values`` and ``rows`` of column 0,
    then column 1, ..., with ``counts`` (host, (n_cols,) ints) entries per column and the rows
    of each column ascending, no duplicates.

    NumPy arrays give a ``scipy.sparse.csc_matrix`` without sorting or copying the entries;
    device arrays go through :func:`csc_from_triplets` (the column of each entry found on the
    device by a search in the column ends).
    """
    xp = array_module(values, rows)
    counts = np.asarray(counts, dtype=np.int64)
    if xp is np:
        import scipy.sparse as sp

        nnz = int(counts.sum())
        index_dtype = np.int32 if max(nnz, *shape) < 2**31 else np.int64
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(index_dtype)
        return sp.csc_matrix((values, rows.astype(index_dtype, copy=False), indptr), shape=shape)
    ends = xp.asarray(np.cumsum(counts))
    cols = xp.searchsorted(ends, xp.arange(int(counts.sum())), side="right")
    return csc_from_triplets(values, rows, cols, shape)
