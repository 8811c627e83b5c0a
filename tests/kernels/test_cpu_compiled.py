"""The compiled CPU twin (numba, the ``fast`` extra) gives the NumPy reference's results bit
for bit: the fused read-out and add, and a whole sequence of incremental dose updates."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.kernels import _cpu, pencil

pytestmark = pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")


def test_read_out_and_add_is_bit_identical():
    rng = np.random.default_rng(1)
    n, nc, h, w = 20000, 3, 40, 50
    # Positions inside, on the edges of and outside the window (clamped to the zero border).
    u = (rng.random(n) * 70 - 10).astype(np.float32)
    v = (rng.random(n) * 60 - 10).astype(np.float32)
    weights = rng.random((nc, n)).astype(np.float32)
    maps = rng.random((nc, h + 8, w + 8)).astype(np.float32)
    box = (0, 0, 3, 3 + h, 4, 4 + w)
    ranges = [(0, 7000), (7000, 20000)]
    dose = rng.random(30000).astype(np.float32)
    vox = rng.permutation(30000)[:n].astype(np.int32)
    expect = dose.copy()
    for s, e, contrib in pencil.segment_contribution_numpy(u, v, weights, maps, box, ranges):
        assert contrib.dtype == np.float32
        expect[vox[s:e]] += contrib
    flat, fh, fw, origin = pencil.padded_window(maps, box)
    assert (fh, fw, origin) == (h, w, (3, 4))
    for s, e in ranges:
        _cpu.accumulate_padded(dose, vox[s:e], u[s:e], v[s:e], weights[:, s:e], flat, fh, fw, origin)
    assert np.array_equal(dose, expect)


def test_incremental_updates_are_bit_identical_to_numpy(monkeypatch):
    from ids_engine.dose import DoseEngine, FluencePatch
    from ids_engine.model import Beam

    from ..dose.test_physics import water_phantom

    p = water_phantom(width_mm=100.0, depth_mm=120.0, spacing_mm=2.5)
    beams = [Beam(gantry_deg=g) for g in (0.0, 120.0, 240.0)]
    cubes = []
    for compiled in (True, False):
        monkeypatch.setattr(_cpu, "HAVE_NUMBA", compiled)
        eng = DoseEngine(p, beams)
        eng.set_fluences([eng.open_field(b, (-30, 30), (-30, 30)) for b in range(3)])
        rng = np.random.default_rng(3)
        for _ in range(40):
            b = int(rng.integers(eng.n_beams))
            nv, nu = eng.geometry[b].fluence_grid.shape_vu
            h, w = (int(x) for x in rng.integers(1, 25, size=2))
            r0, c0 = int(rng.integers(0, nv - h + 1)), int(rng.integers(0, nu - w + 1))
            eng.apply_patches([FluencePatch(b, r0, c0, ((rng.random((h, w)) - 0.3) * 0.5).astype(np.float32))])
        cubes.append(eng.dose_cube_host())
    assert np.array_equal(cubes[0], cubes[1])


def test_weighted_read_out_of_patch_responses_matches_numpy():
    """``sample_weighted`` (a DMR solve's read-out of k patch responses, components summed with
    their depth weights) against ``sample_bilinear`` and the weighted sum, positions inside, on
    the edges of and outside the maps, voxels out of the beam (``ok`` False) giving 0."""
    rng = np.random.default_rng(4)
    k, nc, h, w, n = 3, 2, 17, 23, 4000
    maps = rng.random((k * nc, h, w)).astype(np.float32)
    v = (rng.random(n) * (h + 8) - 4 + 5).astype(np.float32)
    u = (rng.random(n) * (w + 8) - 4 + 7).astype(np.float32)
    weights = rng.random((nc, n)).astype(np.float32)
    ok = rng.random(n) > 0.1
    got = _cpu.sample_weighted(maps, v, u, (5, 7), weights, ok, k)
    s = pencil.sample_bilinear(maps, v, u, (5, 7))
    expect = np.where(ok[None], (s.reshape(k, nc, n) * weights[None]).sum(axis=1), 0)
    assert got.shape == (k, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    assert np.all(got[:, ~ok] == 0)


def test_ray_walk_equals_numpy():
    """``block_depth`` (one loop per ray) gives the NumPy block walk's radiological depths (to a
    float32 ulp: a padded NumPy block can add a sub-ulp sliver after a ray's last step), on rays
    of every direction through a random density, some missing it; the threaded public function
    on 0 to 3 rays too."""
    from ids_engine.kernels import raytrace

    rng = np.random.default_rng(6)
    rho = (rng.random((30, 40, 50)) * 2).astype(np.float32)
    vol = raytrace._Volume(np, rho, (2.0, 2.5, 3.0), (0.0, 0.0, 0.0))
    pts = rng.random((5000, 3)) * np.array([150.0, 100.0, 60.0]) + np.array([0.0, 0.0, -10.0])
    for source in ((500.0, -300.0, 40.0), (-400.0, 50.0, 30.0), (75.0, 50.0, 900.0)):
        rays = raytrace._Rays(np, vol, np.asarray(source), pts, chunk=1 << 14)
        expect = raytrace._block_depth(np, vol, rays.ints, rays.floats, int(rays.n_steps.max()))
        got = _cpu.block_depth(vol.flat, rays.ints, rays.floats)
        assert np.count_nonzero(expect) > 1000
        np.testing.assert_allclose(got, expect, rtol=2.5e-7, atol=1e-6)
        for n in (0, 1, 2, 3):
            few = raytrace.radiological_depth(rho, (2.0, 2.5, 3.0), (0.0, 0.0, 0.0), source, pts[:n])
            assert few.shape == (n,)
            np.testing.assert_allclose(few, expect[:n], rtol=2.5e-7, atol=1e-6)
