"""Pencil-beam kernels: lateral convolution and the bilinear gather-accumulate into the dose cube.

Operations (each dispatches on the array type of its first array argument):

``convolve_full(fluence, kernel)``
    Full 2D linear convolution (output shape ``in + kernel - 1``) of a fluence map or patch
    with a lateral kernel on the same grid. NumPy: ``scipy.signal.fftconvolve``; CuPy:
    ``cupyx.scipy.signal.fftconvolve``. Both compute the same linear map in float32.

``accumulate_segments(dose, vox, u, v, weights, maps, seg_first, seg_start, seg_patch, patch_box, n_threads)``
    For each voxel ``i`` of some segments of a level's arrays, with the segment's window ``p``:
    ``dose[vox[i]] += sum_c weights[c, i] * bilerp(maps[p, c], v[i] - o_r, u[i] - o_c)``,
    zero outside the window's valid box. The hot loop of the full and the incremental dose
    (one launch per level for every beam). NumPy twin: :func:`accumulate_segments_numpy`;
    CUDA: ``cuda/accumulate_segments.cu``, one thread per voxel, ``atomicAdd`` (duplicates
    allowed).

``convolve_full_batched(stack, kernels)``
    Full 2D convolutions of a stack of patches ``(k, h, w)`` with a stack of kernels
    ``(nc, kh, kw)``: ``(k, nc, h+kh-1, w+kw-1)``, one batched FFT call (the columns of a
    DMR joint solve).

``sample_bilinear(maps, v, u, origin_vu)``
    ``out[c, n] = bilerp(maps[c], v[n] - v0, u[n] - u0)`` (zero outside), for point queries.
"""

from __future__ import annotations

import numpy as np

from ids_engine._devicecost import register_raw_kernel
from ids_engine.backend import array_module, is_counting
from ids_engine.kernels._cuda import CudaKernel

__all__ = [
    "accumulate_segments",
    "accumulate_segments_numpy",
    "padded_window",
    "segment_contribution_numpy",
    "convolve_full",
    "convolve_full_batched",
    "sample_bilinear",
]

# --------------------------------------------------------------------------- convolution
def _fftconvolve(xp):
    """SciPy's ``fftconvolve`` for NumPy arrays, CuPy's (cupyx) for device arrays."""
    if xp is np:
        from scipy.signal import fftconvolve
    elif is_counting(xp):
        fftconvolve = xp.cupyx.scipy.signal.fftconvolve
    else:  # pragma: no cover - GPU only
        from cupyx.scipy.signal import fftconvolve
    return fftconvolve


def convolve_full(fluence, kernel):
    """Full 2D convolution of ``fluence`` (h, w) with ``kernel`` (kh, kw), float32, shape (h+kh-1, w+kw-1)."""
    xp = array_module(fluence, kernel)
    fftconvolve = _fftconvolve(xp)
    out = fftconvolve(fluence.astype(xp.float32, copy=False), kernel.astype(xp.float32, copy=False), mode="full")
    return out.astype(xp.float32, copy=False)


def convolve_full_batched(stack, kernels):
    """Full 2D convolutions of every patch in ``stack`` (k, h, w) with every kernel in
    ``kernels`` (nc, kh, kw), float32, shape (k, nc, h+kh-1, w+kw-1), in one batched FFT."""
    xp = array_module(stack, kernels)
    if xp is np:
        # SciPy's fftconvolve, without its per-call checks (a DMR solve makes hundreds of
        # these small batched calls): the same single-precision transforms of the same sizes.
        from scipy import fft as sfft

        h, w = stack.shape[-2:]
        kh, kw = kernels.shape[-2:]
        shape = (h + kh - 1, w + kw - 1)
        fshape = tuple(sfft.next_fast_len(n, real=True) for n in shape)
        spec = sfft.rfft2(stack.astype(np.float32, copy=False), fshape)[:, None]
        spec = spec * sfft.rfft2(kernels.astype(np.float32, copy=False), fshape)[None]
        out = sfft.irfft2(spec, fshape)[..., : shape[0], : shape[1]]
        return np.ascontiguousarray(out, dtype=np.float32)
    fftconvolve = _fftconvolve(xp)
    a = stack.astype(xp.float32, copy=False)[:, None]
    k = kernels.astype(xp.float32, copy=False)[None]
    out = fftconvolve(a, k, mode="full", axes=(-2, -1))
    return out.astype(xp.float32, copy=False)


# --------------------------------------------------------------------------- bilinear
def _bilinear_weights(xp, maps_shape, v, u, origin_vu):
    """Corner indices and weights of a bilinear lookup, with a validity mask per corner."""
    h, w = maps_shape[-2], maps_shape[-1]
    fv = v - origin_vu[0]
    fu = u - origin_vu[1]
    r0 = xp.floor(fv)
    c0 = xp.floor(fu)
    tv = (fv - r0).astype(xp.float32)
    tu = (fu - c0).astype(xp.float32)
    r0 = r0.astype(xp.int32)
    c0 = c0.astype(xp.int32)
    corners = []
    for dr, dc, wgt in ((0, 0, (1 - tv) * (1 - tu)), (0, 1, (1 - tv) * tu), (1, 0, tv * (1 - tu)), (1, 1, tv * tu)):
        r = r0 + dr
        c = c0 + dc
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        flat = xp.where(ok, r * w + c, 0)
        corners.append((flat, xp.where(ok, wgt, xp.float32(0))))
    return corners


def sample_bilinear(maps, v, u, origin_vu=(0, 0)):
    """Bilinear samples of stacked maps ``(nc, h, w)`` at fractional (row, col) ``(v, u)``; (nc, n) float32."""
    xp = array_module(maps, v, u)
    nc = maps.shape[0]
    flat_maps = maps.reshape(nc, -1)
    out = xp.zeros((nc, v.shape[0]), dtype=xp.float32)
    for flat, wgt in _bilinear_weights(xp, maps.shape, v, u, origin_vu):
        out += flat_maps[:, flat] * wgt
    return out


def _pad2(maps) -> np.ndarray:
    """(nc, h * w) -> flat (nc, (h + 4) * (w + 4)) copy with a border of two zero cells."""
    nc, h, w = maps.shape
    padded = np.zeros((nc, h + 4, w + 4), np.float32)
    padded[:, 2:-2, 2:-2] = maps
    return padded.reshape(nc, -1)


def _bilinear_padded(u, v, weights, flat, h: int, w: int, origin_vu) -> np.ndarray:
    tv = v - np.float32(origin_vu[0] - 2)
    tu = u - np.float32(origin_vu[1] - 2)
    np.clip(tv, 0, h + 2, out=tv)
    np.clip(tu, 0, w + 2, out=tu)
    r = tv.astype(np.int32)  # floor for the (clamped) non-negative values
    c = tu.astype(np.int32)
    fv = tv - r  # in [0, 1] after the clamp
    fu = tu - c
    i00 = r * np.int32(w + 4) + c
    out = np.zeros(u.shape[0], np.float32)
    for k in range(flat.shape[0]):
        m = flat[k]
        a = m.take(i00)
        top = a + fu * (m.take(i00 + 1) - a)
        b = m.take(i00 + (w + 4))
        bottom = b + fu * (m.take(i00 + (w + 5)) - b)
        top += fv * (bottom - top)
        top *= weights[k]
        out += top
    return out


# --------------------------------------------------------------------------- segments
# One launch per level for a whole incremental update: the voxels to update are given as
# segments (contiguous runs of a level's tile-sorted voxel arrays, all beams concatenated),
# each reading one convolved change window of a stack.
def padded_window(maps_p, box):
    """The valid part of a convolved change window (see :func:`segment_contribution_numpy`'s
    ``box``) as the zero-bordered flat maps the bilinear read-out takes: ``(flat, h, w,
    origin_vu)``."""
    o_r, o_c, r_lo, r_hi, c_lo, c_hi = (int(x) for x in box)
    window = maps_p[:, r_lo - o_r : r_hi - o_r, c_lo - o_c : c_hi - o_c]
    return _pad2(window), window.shape[1], window.shape[2], (r_lo, c_lo)


def segment_contribution_numpy(u, v, weights, maps_p, box, ranges):
    """The contribution of one window to the voxels of some ranges of the level arrays.

    Parameters
    ----------
    u, v, weights : the level's (n,) fractional column / row and (nc, n) component weights.
    maps_p : (nc, mh, mw) float32 convolved change window.
    box : (6,) ints: window origin row and column on the level grid, then the valid rows
        [r_lo, r_hi) and columns [c_lo, c_hi) on the level grid (outside: zero); the valid
        box lies inside the window.
    ranges : (start, end) pairs into the level arrays.

    Returns a list of ``(start, end, contribution)``, one per range, float32 values.
    """
    flat, h, w, origin = padded_window(maps_p, box)
    return [(s, e, _bilinear_padded(u[s:e], v[s:e], weights[:, s:e], flat, h, w, origin)) for s, e in ranges]


def accumulate_segments_numpy(dose, vox, u, v, weights, maps, seg_first, seg_start, seg_patch, patch_box):
    """NumPy twin of :func:`accumulate_segments` (segments of one window never repeat a voxel;
    windows are applied in order)."""
    seg_first = np.asarray(seg_first)
    seg_start = np.asarray(seg_start)
    seg_patch = np.asarray(seg_patch)
    for p in range(maps.shape[0]):
        segs = np.flatnonzero(seg_patch == p)
        if segs.size == 0:
            continue
        ranges = [(int(seg_start[k]), int(seg_start[k] + seg_first[k + 1] - seg_first[k])) for k in segs]
        for s, e, contrib in segment_contribution_numpy(u, v, weights, maps[p], patch_box[p], ranges):
            np.add.at(dose, vox[s:e], contrib)
    return dose


def _accumulate_segments_twin(grid, block, args) -> None:
    (dose, vox, u, v, weights, maps, seg_first, seg_start, seg_patch, patch_box,
     n_threads, n_segments, n_level, nc, mh, mw) = args
    s = int(n_segments)
    accumulate_segments_numpy(dose, vox, u, v, weights.reshape(int(nc), int(n_level)),
                              maps.reshape(-1, int(nc), int(mh), int(mw)), seg_first[: s + 1], seg_start[:s],
                              seg_patch[:s], patch_box.reshape(-1, 6))


register_raw_kernel("accumulate_segments", _accumulate_segments_twin)

# One thread per voxel of all segments; see cuda/accumulate_segments.cu.
_SEGMENTS = CudaKernel(
    "accumulate_segments.cu",
    "accumulate_segments",
    (
        "float* dose",
        "const int* vox",
        "const float* u",
        "const float* v",
        "const float* weights",
        "const float* maps",
        "const int* seg_first",
        "const int* seg_start",
        "const int* seg_patch",
        "const int* patch_box",
        "int n_threads",
        "int n_segments",
        "int n_level",
        "int nc",
        "int mh",
        "int mw",
    ),
)


def accumulate_segments(dose, vox, u, v, weights, maps, seg_first, seg_start, seg_patch, patch_box, n_threads):
    """Add the convolved change windows ``maps`` to the dose of the voxels of some segments.

    For every segment ``s`` and every position ``i`` in ``[seg_start[s], seg_start[s] +
    seg_first[s + 1] - seg_first[s])`` of the level arrays, with ``p = seg_patch[s]``::

        dose[vox[i]] += sum_c weights[c, i] * bilerp(maps[p, c], v[i] - o_r, u[i] - o_c)

    where a bilinear corner outside the window's valid box counts as zero.

    Parameters
    ----------
    dose : (N,) float32 level dose, modified in place.
    vox : (n,) int32 level voxel indices; u, v : (n,) float32 fractional column / row on the
        level's fluence grid; weights : (nc, n) float32 (all beams' level arrays concatenated).
    maps : (P, nc, mh, mw) float32 change windows.
    seg_first : (S + 1,) int32 first thread of each segment (prefix sums of the lengths).
    seg_start : (S,) int32 first position of each segment in the level arrays.
    seg_patch : (S,) int32 window of each segment.
    patch_box : (P, 6) int32 per window: origin row, origin column, valid rows [r_lo, r_hi),
        valid columns [c_lo, c_hi), all on the level grid.
    n_threads : ``seg_first[S]`` (known on the host: no sync).
    """
    xp = array_module(dose, maps)
    if xp is np:
        return accumulate_segments_numpy(dose, vox, u, v, weights, maps, seg_first, seg_start, seg_patch, patch_box)
    n_threads = int(n_threads)  # pragma: no cover - GPU only
    if n_threads == 0:
        return dose
    threads = 256
    _SEGMENTS.launch(
        ((n_threads + threads - 1) // threads,),
        (threads,),
        dose=dose,
        vox=vox,
        u=u,
        v=v,
        weights=weights,
        maps=maps,
        seg_first=seg_first,
        seg_start=seg_start,
        seg_patch=seg_patch,
        patch_box=patch_box,
        n_threads=n_threads,
        n_segments=int(seg_start.shape[0]),
        n_level=int(vox.shape[0]),
        nc=int(maps.shape[1]),
        mh=int(maps.shape[2]),
        mw=int(maps.shape[3]),
    )
    return dose
