"""Compiled CPU twins of hot NumPy kernels (numba, optional).

When numba is installed (the ``fast`` extra) the engine's NumPy path uses
:func:`accumulate_padded` for the bilinear read-out of a convolved fluence window at a
level's voxels fused with the add into the dose, the inner loop of every incremental update;
the NumPy functions in :mod:`ids_engine.kernels.pencil` stay the reference (and the CUDA
kernel's twin), and the tests compare the two bit for bit (the same float32 operations in the same
order, no fast-math contraction). ``IDS_NUMBA=0`` turns them off.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["HAVE_NUMBA", "accumulate_padded"]

_KERNEL = None  # the compiled loop, when numba is installed
HAVE_NUMBA = False
if os.environ.get("IDS_NUMBA", "1") != "0":
    try:  # pragma: no cover - depends on the environment
        import numba
    except ImportError:  # pragma: no cover
        numba = None
    if numba is not None:
        HAVE_NUMBA = True

        @numba.njit(nogil=True, cache=True)
        def _accumulate_padded_nb(dose, vox, u, v, weights, flat, h, w, o_v, o_u):  # pragma: no cover - compiled
            nc = flat.shape[0]
            stride = w + 4
            for i in range(u.shape[0]):
                tv = v[i] - o_v
                tu = u[i] - o_u
                if tv < 0:
                    tv = np.float32(0)
                elif tv > h + 2:
                    tv = np.float32(h + 2)
                if tu < 0:
                    tu = np.float32(0)
                elif tu > w + 2:
                    tu = np.float32(w + 2)
                r = np.int32(tv)
                c = np.int32(tu)
                # As NumPy promotes them: float32 - int32 is float64, corner differences are
                # float32, the rest of each component's term float64 until it is added to the
                # float32 sum.
                fv = np.float64(tv) - np.float64(r)
                fu = np.float64(tu) - np.float64(c)
                i00 = r * stride + c
                acc = np.float32(0)
                for k in range(nc):
                    a = flat[k, i00]
                    top = np.float64(a) + fu * np.float64(flat[k, i00 + 1] - a)
                    b = flat[k, i00 + stride]
                    bottom = np.float64(b) + fu * np.float64(flat[k, i00 + stride + 1] - b)
                    top = top + fv * (bottom - top)
                    top = top * np.float64(weights[k, i])
                    acc = np.float32(np.float64(acc) + top)
                dose[vox[i]] += acc

        _KERNEL = _accumulate_padded_nb


def accumulate_padded(dose, vox, u, v, weights, flat, h: int, w: int, origin_vu) -> None:
    """``dose[vox] += `` the bilinear read-out of ``flat`` (see
    :func:`ids_engine.kernels.pencil.padded_window`) at ``(v, u)`` times ``weights``, summed
    over components, in one pass (``vox`` without repeats). Needs numba (``HAVE_NUMBA``)."""
    if _KERNEL is None:
        raise RuntimeError("accumulate_padded needs numba (pip install ids-engine[fast])")
    _KERNEL(dose, vox, u, v, weights, flat, np.int32(h), np.int32(w),
            np.float32(origin_vu[0] - 2), np.float32(origin_vu[1] - 2))
