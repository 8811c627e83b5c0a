"""Host arrays packed for one host-to-device copy per dtype (the engine's uploads)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["_Uploads"]


class _Uploads:
    """Host arrays gathered for one upload per dtype (one host-to-device copy each)."""

    def __init__(self) -> None:
        self._parts: dict = {np.dtype(np.int32): [], np.dtype(np.float32): []}
        self._size: dict = dict.fromkeys(self._parts, 0)  # elements gathered so far, per dtype

    ALIGN = 64  # elements: every part starts 256 bytes into the buffer (cuFFT needs aligned input)

    def add(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        parts = self._parts[a.dtype]
        start = self._size[a.dtype]
        pad = -start % self.ALIGN
        if pad:
            parts.append(np.zeros(pad, a.dtype))
            start += pad
        parts.append(a.ravel())
        self._size[a.dtype] = start + a.size
        return a.dtype, start, a.shape

    def send(self, xp) -> dict:
        out = {}
        for dtype, parts in self._parts.items():
            if parts:
                host = np.concatenate(parts) if len(parts) > 1 else parts[0]
                out[dtype] = host if xp is np else xp.asarray(host)
        return out

    @staticmethod
    def view(sent: dict, key):
        """The part ``key`` (what :meth:`add` returned) of the arrays :meth:`send` returned: a
        view (a slice, reshaped unless one-dimensional)."""
        dtype, start, shape = key
        part = sent[dtype][start : start + math.prod(shape)]
        return part if len(shape) == 1 else part.reshape(shape)
