"""Host arrays packed for one host-to-device copy per dtype (the engine's uploads)."""

from __future__ import annotations

import numpy as np

__all__ = ["_Uploads"]


class _Uploads:
    """Host arrays gathered for one upload per dtype (one host-to-device copy each)."""

    def __init__(self) -> None:
        self._parts: dict = {np.dtype(np.int32): [], np.dtype(np.float32): []}

    ALIGN = 64  # elements: every part starts 256 bytes into the buffer (cuFFT needs aligned input)

    def add(self, a: np.ndarray):
        a = np.ascontiguousarray(a)
        parts = self._parts[a.dtype]
        start = sum(p.size for p, _ in parts)
        pad = -start % self.ALIGN
        if pad:
            parts.append((np.zeros(pad, a.dtype), (pad,)))
            start += pad
        parts.append((a.ravel(), a.shape))
        return a.dtype, start, a.shape

    def send(self, xp) -> dict:
        out = {}
        for dtype, parts in self._parts.items():
            if parts:
                host = np.concatenate([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
                out[dtype] = host if xp is np else xp.asarray(host)
        return out

    @staticmethod
    def view(sent: dict, key):
        dtype, start, shape = key
        n = int(np.prod(shape))
        return sent[dtype][start : start + n].reshape(shape)
