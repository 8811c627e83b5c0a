"""Scatter-add on either backend: ``target[index] += values`` with repeated indices summed.

NumPy: ``numpy.add.at``; CuPy: ``cupyx.scatter_add`` (one kernel, atomic adds); the
device-cost counting backend: its stand-in for ``cupyx.scatter_add`` (one launch).
"""

from __future__ import annotations

import numpy as np

from ids_engine.backend import array_module, is_counting

__all__ = ["scatter_add"]


def scatter_add(target, index, values):
    """Add ``values`` to ``target[index]`` in place (``target`` flat; repeated indices add up).

    Parameters
    ----------
    target : (n,) array, modified in place and returned.
    index : (m,) integer indices into ``target``.
    values : (m,) values of ``target``'s dtype.
    """
    xp = array_module(target)
    if xp is np:
        np.add.at(target, index, values)
    elif is_counting(xp):
        xp.cupyx.scatter_add(target, index, values)
    else:  # pragma: no cover - GPU only
        import cupyx

        cupyx.scatter_add(target, index, values)
    return target
