"""Pencil-beam kernels: the NumPy twin against a slow float64 reference, and CuPy against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.kernels.pencil import accumulate_segments, convolve_full, sample_bilinear

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


def _accumulate(dose, vox, u, v, weights, maps, origin=(0, 0), xp=np):
    """``dose[vox[n]] += sum_c weights[c, n] * bilerp(maps[c], v[n] - v0, u[n] - u0)`` for every n:
    :func:`accumulate_segments` with one window (its valid box the whole window) and one
    segment over all the voxels."""
    n = int(vox.size)
    h, w = maps.shape[1:]
    box = np.array([[origin[0], origin[1], origin[0], origin[0] + h, origin[1], origin[1] + w]], np.int32)
    tables = [np.array([0, n], np.int32), np.array([0], np.int32), np.array([0], np.int32), box]
    dev = (lambda a: a) if xp is np else xp.asarray  # noqa: E731
    return accumulate_segments(dose, dev(vox), dev(u), dev(v), dev(weights), dev(maps[None]), *map(dev, tables), n)


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
    got = _accumulate(np.zeros(5000, np.float32), vox, u + origin[1], v + origin[0], weights, maps, origin)
    np.testing.assert_allclose(got, ref, **TOL[np.float32])


def test_sample_bilinear_matches_accumulate(rng):
    vox, u, v, weights, maps = _case(rng, nc=1)
    s = sample_bilinear(maps, v, u)
    got = _accumulate(np.zeros(5000, np.float32), vox, u, v, weights, maps)
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
    host = _accumulate(np.zeros(5000, np.float32), vox, u, v, weights, maps, (1, 2))
    dev = _accumulate(cupy.zeros(5000, cupy.float32), vox, u, v, weights, maps, (1, 2), xp=cupy)
    np.testing.assert_allclose(cupy.asnumpy(dev), host, **TOL[np.float32])


@pytest.mark.gpu
def test_convolve_cuda_matches_numpy(rng):
    import cupy

    a = rng.random((40, 30)).astype(np.float32)
    k = rng.random((21, 21)).astype(np.float32)
    np.testing.assert_allclose(cupy.asnumpy(convolve_full(cupy.asarray(a), cupy.asarray(k))), convolve_full(a, k),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- device backends
# ``device_backend``: the device-cost counting backend everywhere (CuPy's semantics over NumPy),
# CuPy on a GPU; each against the NumPy twin or the float64 reference.
def test_sample_bilinear_device_matches_numpy(device_backend, rng):
    from ids_engine import backend

    xp = backend.xp()
    _, u, v, _, maps = _case(rng, nc=3)
    for origin in ((0, 0), (2, -3)):
        host = sample_bilinear(maps, v, u, origin)
        dev = sample_bilinear(xp.asarray(maps), xp.asarray(v), xp.asarray(u), origin)
        assert backend.array_module(dev) is xp and dev.dtype == np.float32
        np.testing.assert_allclose(backend.asnumpy(dev), host, **TOL[np.float32])


def test_accumulate_device_adds_up_duplicate_voxels(device_backend, rng):
    """atomicAdd semantics: a voxel listed several times gets every contribution."""
    from ids_engine import backend

    xp = backend.xp()
    vox, u, v, weights, maps = _case(rng)
    # Every fifth voxel again, and one voxel five times, with their own positions and weights.
    dup = np.concatenate([vox[::5], np.repeat(vox[7], 4)])
    vox_d = np.concatenate([vox, dup]).astype(np.int32)
    n_extra = dup.size
    u_d = np.concatenate([u, rng.uniform(-4, 27, n_extra).astype(np.float32)])
    v_d = np.concatenate([v, rng.uniform(-4, 21, n_extra).astype(np.float32)])
    w_d = np.concatenate([weights, rng.random((weights.shape[0], n_extra)).astype(np.float32)], axis=1)
    origin = (1, 2)
    ref = _reference(5000, vox_d, u_d, v_d, w_d, maps, origin)
    start = rng.random(5000).astype(np.float32)  # accumulates onto what is there
    dev = _accumulate(xp.asarray(start), vox_d, u_d, v_d, w_d, maps, origin, xp=xp)
    got = backend.asnumpy(dev)
    np.testing.assert_allclose(got, start + ref, **TOL[np.float32])
    # The same as the NumPy twin run once per group of distinct voxels.
    n = vox.size
    twin = _accumulate(start.copy(), vox, u_d[:n], v_d[:n], np.ascontiguousarray(w_d[:, :n]), maps, origin)
    for part in (slice(n, n + vox[::5].size), *(slice(k, k + 1) for k in range(n + vox[::5].size, vox_d.size))):
        twin = _accumulate(twin, vox_d[part], u_d[part], v_d[part], np.ascontiguousarray(w_d[:, part]), maps, origin)
    np.testing.assert_allclose(got, twin, **TOL[np.float32])
    assert np.abs(got[vox[7]] - start[vox[7]]) > 0
