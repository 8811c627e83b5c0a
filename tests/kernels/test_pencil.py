"""Pencil-beam kernels: the NumPy twin against a slow float64 reference, and CuPy against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.kernels.pencil import accumulate_bilinear, accumulate_bilinear_numpy, convolve_full, sample_bilinear

# Tolerances per dtype (CONVENTIONS item 13).
TOL = {np.float32: dict(rtol=2e-5, atol=2e-6)}


def _reference(n_dose, vox, u, v, weights, maps, origin):
    """Slow float64 reference: a Python loop over voxels and corners, zero outside the maps."""
    out = np.zeros(n_dose, np.float64)
    nc, h, w = maps.shape
    for n in range(vox.size):
        fv, fu = float(v[n]) - origin[0], float(u[n]) - origin[1]
        r0, c0 = int(np.floor(fv)), int(np.floor(fu))
        tv, tu = fv - r0, fu - c0
        acc = 0.0
        for c in range(nc):
            s = 0.0
            for dr, wr in ((0, 1 - tv), (1, tv)):
                for dc, wc in ((0, 1 - tu), (1, tu)):
                    r, cc = r0 + dr, c0 + dc
                    if 0 <= r < h and 0 <= cc < w:
                        s += wr * wc * float(maps[c, r, cc])
            acc += float(weights[c, n]) * s
        out[vox[n]] += acc
    return out


def _case(rng, n=400, nc=2, h=17, w=23):
    vox = rng.choice(5000, size=n, replace=False).astype(np.int32)
    # Positions inside, on the edges of and outside the maps (origin shifts them).
    u = rng.uniform(-4, w + 4, n).astype(np.float32)
    v = rng.uniform(-4, h + 4, n).astype(np.float32)
    weights = rng.random((nc, n)).astype(np.float32)
    maps = rng.standard_normal((nc, h, w)).astype(np.float32)
    return vox, u, v, weights, maps


@pytest.mark.parametrize("origin", [(0, 0), (3, -2)])
def test_accumulate_numpy_twin_against_reference(rng, origin):
    vox, u, v, weights, maps = _case(rng)
    ref = _reference(5000, vox, u + origin[1], v + origin[0], weights, maps, origin)
    got = accumulate_bilinear_numpy(np.zeros(5000, np.float32), vox, u + origin[1], v + origin[0], weights, maps, origin)
    np.testing.assert_allclose(got, ref, **TOL[np.float32])


def test_sample_bilinear_matches_accumulate(rng):
    vox, u, v, weights, maps = _case(rng, nc=1)
    s = sample_bilinear(maps, v, u)
    got = accumulate_bilinear_numpy(np.zeros(5000, np.float32), vox, u, v, weights, maps)
    np.testing.assert_allclose(got[vox], weights[0] * s[0], **TOL[np.float32])


def test_convolve_full_is_the_linear_convolution(rng):
    a = rng.random((7, 9)).astype(np.float32)
    k = rng.random((5, 3)).astype(np.float32)
    ref = np.zeros((11, 11))
    for i in range(7):
        for j in range(9):
            ref[i : i + 5, j : j + 3] += a[i, j] * k
    np.testing.assert_allclose(convolve_full(a, k), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_accumulate_cuda_matches_numpy(rng):
    import cupy

    vox, u, v, weights, maps = _case(rng)
    # Duplicates are allowed on the GPU (atomicAdd): add a repeated voxel on both sides.
    host = accumulate_bilinear_numpy(np.zeros(5000, np.float32), vox, u, v, weights, maps, (1, 2))
    dev = accumulate_bilinear(cupy.zeros(5000, cupy.float32), cupy.asarray(vox), cupy.asarray(u), cupy.asarray(v),
                              cupy.asarray(weights), cupy.asarray(maps), (1, 2))
    np.testing.assert_allclose(cupy.asnumpy(dev), host, **TOL[np.float32])


@pytest.mark.gpu
def test_convolve_cuda_matches_numpy(rng):
    import cupy

    a = rng.random((40, 30)).astype(np.float32)
    k = rng.random((21, 21)).astype(np.float32)
    np.testing.assert_allclose(cupy.asnumpy(convolve_full(cupy.asarray(a), cupy.asarray(k))), convolve_full(a, k),
                               rtol=1e-4, atol=1e-4)
