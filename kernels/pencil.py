"""Pencil-beam kernels: lateral convolution and the bilinear gather-accumulate into the dose cube.

Operations (each dispatches on the array type of its first array argument):

``convolve_full(fluence, kernel)``
    Full 2D linear convolution (output shape ``in + kernel - 1``) of a fluence map or patch
    with a lateral kernel on the same grid. NumPy: ``scipy.signal.fftconvolve``; CuPy:
    ``cupyx.scipy.signal.fftconvolve``. Both compute the same linear map in float32.

``accumulate_bilinear(dose_flat, vox, u, v, weights, maps, origin_vu)``
    For each voxel ``n``: ``dose_flat[vox[n]] += sum_c weights[c, n] * bilerp(maps[c], v[n] - v0, u[n] - u0)``,
    with zero outside the maps. This is the hot loop of the full and the incremental dose.
    NumPy twin: :func:`accumulate_bilinear_numpy` (vectorised; ``vox`` must hold no
    duplicates, which holds within one beam). CUDA: ``cuda/accumulate_bilinear.cu``, one
    thread per voxel, ``atomicAdd`` (duplicates allowed).

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
    "accumulate_bilinear",
    "accumulate_bilinear_numpy",
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


def bilinear_contribution_numpy(u, v, weights, maps, origin_vu=(0, 0)) -> np.ndarray:
    """``sum_c weights[c, n] * bilerp(maps[c], v[n] - v0, u[n] - u0)`` (zero outside the maps), float32.

    The maps get a border of two zero cells on each side, so that every lookup can be
    clamped into the padded array without branches: a voxel outside the maps lands on zeros.
    """
    nc, h, w = maps.shape
    padded = np.zeros((nc, h + 4, w + 4), np.float32)
    padded[:, 2:-2, 2:-2] = maps
    flat = padded.reshape(nc, -1)
    tv = v - np.float32(origin_vu[0] - 2)
    tu = u - np.float32(origin_vu[1] - 2)
    r = np.clip(tv, 0, h + 2).astype(np.int32)  # floor for the (clamped) non-negative values
    c = np.clip(tu, 0, w + 2).astype(np.int32)
    fv = np.clip(tv - r, 0, 1).astype(np.float32)
    fu = np.clip(tu - c, 0, 1).astype(np.float32)
    i00 = r * (w + 4) + c
    out = np.zeros(u.shape[0], np.float32)
    for k in range(nc):
        m = flat[k]
        top = m.take(i00) + fu * (m.take(i00 + 1) - m.take(i00))
        bottom = m.take(i00 + (w + 4)) + fu * (m.take(i00 + (w + 5)) - m.take(i00 + (w + 4)))
        out += weights[k] * (top + fv * (bottom - top))
    return out


def accumulate_bilinear_numpy(dose_flat, vox, u, v, weights, maps, origin_vu=(0, 0)):
    """NumPy twin of :func:`accumulate_bilinear` (``vox`` without duplicates)."""
    dose_flat[vox] += bilinear_contribution_numpy(u, v, weights, maps, origin_vu)
    return dose_flat


# One thread per voxel; see cuda/accumulate_bilinear.cu.
_ACCUMULATE = CudaKernel(
    "accumulate_bilinear.cu",
    "accumulate_bilinear",
    (
        "float* dose",
        "const int* vox",
        "const float* u",
        "const float* v",
        "const float* weights",
        "const float* maps",
        "int n",
        "int nc",
        "int h",
        "int w",
        "float v0",
        "float u0",
    ),
)


def _accumulate_twin(grid, block, args) -> None:
    """The kernel's semantics on NumPy arrays (atomicAdd: duplicate voxels add up), run by the
    device-cost counting backend in place of the CUDA kernel."""
    dose, vox, u, v, weights, maps, n, nc, h, w, v0, u0 = args
    n = int(n)
    contrib = bilinear_contribution_numpy(u[:n], v[:n], weights.reshape(int(nc), -1)[:, :n],
                                          maps.reshape(int(nc), int(h), int(w)), (float(v0), float(u0)))
    np.add.at(dose, vox[:n], contrib)


register_raw_kernel("accumulate_bilinear", _accumulate_twin)


def accumulate_bilinear(dose_flat, vox, u, v, weights, maps, origin_vu=(0, 0)):
    """Add ``sum_c weights[c, n] * bilerp(maps[c], v[n], u[n])`` to ``dose_flat[vox[n]]``.

    Parameters
    ----------
    dose_flat : (N,) float32, modified in place (and returned).
    vox : (n,) int32 flat voxel indices (NumPy: no duplicates).
    u, v : (n,) float32 fractional column / row index into the maps' parent grid.
    weights : (nc, n) float32 per-voxel component weights (depth dose x inverse square x calibration).
    maps : (nc, h, w) float32 convolved fluence (or its change) on a window of that grid.
    origin_vu : (row, col) of ``maps[:, 0, 0]`` in the parent grid.
    """
    xp = array_module(dose_flat, maps)
    if xp is np:
        return accumulate_bilinear_numpy(dose_flat, vox, u, v, weights, maps, origin_vu)
    n = int(vox.shape[0])  # pragma: no cover - GPU only
    if n == 0:
        return dose_flat
    nc, h, w = (int(s) for s in maps.shape)
    threads = 256
    _ACCUMULATE.launch(
        ((n + threads - 1) // threads,),
        (threads,),
        dose=dose_flat,
        vox=vox,
        u=u,
        v=v,
        weights=weights,
        maps=maps,
        n=n,
        nc=nc,
        h=h,
        w=w,
        v0=origin_vu[0],
        u0=origin_vu[1],
    )
    return dose_flat
