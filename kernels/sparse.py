"""Sparse matrix construction on either backend: scipy.sparse (NumPy) or cupyx.scipy.sparse (CuPy)."""

from __future__ import annotations

import numpy as np

from ids_engine.backend import array_module

__all__ = ["csc_from_triplets"]


def csc_from_triplets(values, rows, cols, shape):
    """A CSC matrix from (value, row, column) triplets; duplicates are summed."""
    xp = array_module(values)
    if xp is np:
        import scipy.sparse as sp

        return sp.csc_matrix((values, (rows, cols)), shape=shape)
    import cupyx.scipy.sparse as csp  # pragma: no cover - GPU only

    return csp.coo_matrix((values, (rows.astype(xp.int32), cols.astype(xp.int32))), shape=shape).tocsc()
