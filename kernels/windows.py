"""Adding convolved change windows into the engine's flat maps buffer (one launch per level).

``add_windows(maps, windows, patch_box, map_info)``
    For every window ``p`` (one per beam), component ``c`` and map cell ``(r, col)`` inside the
    window's valid box: ``maps[base + (c * mh + r) * mw + col] += windows[p, c, r - o_r, col - o_c]``,
    with ``(o_r, o_c, r_lo, r_hi, c_lo, c_hi) = patch_box[p]`` and ``(base, mh, mw) =
    map_info[p]``. The incremental dose update's write of the convolved maps: the device
    finds each element's map cell from the window's box, so the host builds no per-element
    index table (a clinical 9-beam update's coarse level alone would be 1.2 MB of int32
    indices to build and upload). NumPy twin: :func:`add_windows_numpy`; CUDA:
    ``cuda/add_windows.cu``, one thread per window element, ``atomicAdd``.
"""

from __future__ import annotations

import numpy as np

from ids_engine._devicecost import register_raw_kernel
from ids_engine.backend import array_module
from ids_engine.kernels._cuda import CudaKernel

__all__ = ["add_windows", "add_windows_numpy"]


def add_windows_numpy(maps, windows, patch_box, map_info):
    """NumPy twin of :func:`add_windows` (windows added in order, each cell once per window)."""
    windows = np.asarray(windows)
    nc = int(windows.shape[1])
    for p in range(windows.shape[0]):
        o_r, o_c, r_lo, r_hi, c_lo, c_hi = (int(x) for x in patch_box[p])
        base, mh, mw = (int(x) for x in map_info[p])
        if r_hi <= r_lo or c_hi <= c_lo:
            continue
        m = maps[base : base + nc * mh * mw].reshape(nc, mh, mw)
        m[:, r_lo:r_hi, c_lo:c_hi] += windows[p, :, r_lo - o_r : r_hi - o_r, c_lo - o_c : c_hi - o_c]
    return maps


def _add_windows_twin(grid, block, args) -> None:
    maps, windows, patch_box, map_info, n_windows, nc, fh, fw = args
    p = int(n_windows)
    add_windows_numpy(maps, windows.reshape(p, int(nc), int(fh), int(fw)), patch_box.reshape(-1, 6)[:p],
                      map_info.reshape(-1, 3)[:p])


register_raw_kernel("add_windows", _add_windows_twin)

_ADD_WINDOWS = CudaKernel(
    "add_windows.cu",
    "add_windows",
    (
        "float* maps",
        "const float* windows",
        "const int* patch_box",
        "const int* map_info",
        "int n_windows",
        "int nc",
        "int fh",
        "int fw",
    ),
)


def add_windows(maps, windows, patch_box, map_info):
    """Add convolved change windows into a flat maps buffer, each inside its valid box.

    Parameters
    ----------
    maps : (M,) float32 flat maps buffer of one level (every beam's (nc, mh, mw) maps at its
        offset), modified in place and returned.
    windows : (P, nc, fh, fw) float32 convolved windows on the level's fluence grid.
    patch_box : (P, 6) int32 per window: origin row, origin column, valid rows [r_lo, r_hi),
        valid columns [c_lo, c_hi) on the map (o_r <= r_lo <= r_hi <= o_r + fh; likewise
        for columns).
    map_info : (P, 3) int32 per window: the offset of its beam's maps in ``maps`` and the
        map's shape (mh, mw).
    """
    xp = array_module(maps, windows)
    if xp is np:
        return add_windows_numpy(maps, windows, patch_box, map_info)
    p, nc, fh, fw = (int(n) for n in windows.shape)
    n = p * nc * fh * fw
    if n == 0:
        return maps
    threads = 256
    _ADD_WINDOWS.launch(
        ((n + threads - 1) // threads,),
        (threads,),
        maps=maps,
        windows=windows,
        patch_box=patch_box,
        map_info=map_info,
        n_windows=p,
        nc=nc,
        fh=fh,
        fw=fw,
    )
    return maps
