"""Sparse matrix construction on either backend: scipy.sparse (NumPy) or cupyx.scipy.sparse (CuPy;
the device-cost counting backend's stand-in for it under IDS_BACKEND=devicecost)."""

from __future__ import annotations

import numpy as np

from ids_engine.backend import array_module, is_counting

__all__ = ["csc_from_triplets"]


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
