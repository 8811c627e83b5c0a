"""Incremental dose updates equal a full recomputation; point and voxel read-outs agree."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import DoseEngine, FluencePatch
from ids_engine.model import Beam

from .test_physics import water_phantom


@pytest.fixture(scope="module")
def engine3():
    p = water_phantom(width_mm=100.0, depth_mm=120.0, spacing_mm=2.5)
    beams = [Beam(gantry_deg=g) for g in (0.0, 120.0, 240.0)]
    eng = DoseEngine(p, beams)
    eng.set_fluences([eng.open_field(b, (-30, 30), (-30, 30)) for b in range(3)])
    return eng


def test_incremental_equals_full_over_many_patches(engine3):
    eng = engine3
    rng = np.random.default_rng(7)
    for _ in range(300):
        b = int(rng.integers(eng.n_beams))
        nv, nu = eng.geometry[b].fluence_grid.shape_vu
        h, w = (int(v) for v in rng.integers(1, 30, size=2))
        r0 = int(rng.integers(0, nv - h + 1))
        c0 = int(rng.integers(0, nu - w + 1))
        delta = (rng.random((h, w)) - 0.3).astype(np.float32) * 0.5
        eng.apply_patches([FluencePatch(b, r0, c0, delta)])
    incremental = eng.dose_cube_host()
    fluences = eng.fluences_host()
    eng.set_fluences(fluences)
    full = eng.dose_cube_host()
    scale = np.abs(full).max()
    assert scale > 0
    assert np.abs(incremental - full).max() <= 1e-4 * scale


def test_patch_outside_fluence_grid_is_refused(engine3):
    nv, nu = engine3.geometry[0].fluence_grid.shape_vu
    before = engine3.dose_cube_host()
    with pytest.raises(ValueError, match="leaves the fluence grid"):
        engine3.apply_patches([FluencePatch(0, nv - 2, 0, np.ones((5, 5), np.float32))])
    np.testing.assert_array_equal(before, engine3.dose_cube_host())


def test_dose_at_voxels_matches_cube(engine3):
    cube = engine3.dose_cube_host().ravel()
    rng = np.random.default_rng(3)
    idx = rng.integers(0, cube.size, size=500)
    np.testing.assert_allclose(np.asarray(engine3.dose_at_voxels(idx)), cube[idx], rtol=1e-5, atol=1e-7)


def test_dose_at_points_matches_voxels(engine3):
    """Direct point evaluation agrees with the two-level cube at voxel centres (coarse scatter interpolation)."""
    eng = engine3
    body = eng.body_index
    rng = np.random.default_rng(5)
    idx = rng.choice(body, size=400, replace=False)
    pts = eng.grid.index_to_world(np.stack(np.unravel_index(idx, eng.grid.shape_zyx), axis=-1))
    direct = np.asarray(eng.dose_at_points(pts))
    cube = np.asarray(eng.dose_at_voxels(idx))
    assert np.abs(direct - cube).max() <= 0.02 * cube.max()


def test_delta_at_voxels_predicts_apply(engine3):
    """The dose change predicted at voxels without touching the cube equals the applied change."""
    eng = engine3
    rng = np.random.default_rng(11)
    idx = rng.choice(eng.body_index, size=300, replace=False)
    patches = []
    for b in range(eng.n_beams):
        nv, nu = eng.geometry[b].fluence_grid.shape_vu
        patches.append(FluencePatch(b, nv // 2 - 6, nu // 2 - 4, rng.random((12, 9)).astype(np.float32)))
    before = np.asarray(eng.dose_at_voxels(idx))
    predicted = np.asarray(eng.delta_at_voxels(patches, idx))
    eng.apply_patches(patches)
    after = np.asarray(eng.dose_at_voxels(idx))
    assert np.abs(predicted).max() > 0
    np.testing.assert_allclose(after - before, predicted, atol=2e-6 * max(after.max(), 1e-6))


def test_delta_matrix_equals_delta_at_voxels_per_column(engine3):
    """The batched joint-solve matrix: column k is what patch set k would add at the voxels."""
    eng = engine3
    rng = np.random.default_rng(3)
    columns = []
    for k in range(5):
        ps = []
        for b in range(eng.n_beams):
            if rng.random() < 0.3 and k:
                continue  # some columns leave a beam out
            nv, nu = eng.geometry[b].fluence_grid.shape_vu
            h, w = (int(v) for v in rng.integers(3, 15, size=2))
            r0, c0 = int(rng.integers(0, nv - h)), int(rng.integers(0, nu - w))
            ps.append(FluencePatch(b, r0, c0, rng.normal(size=(h, w)).astype(np.float32)))
        columns.append(ps)
    rows = eng.body_index[:: max(1, eng.body_index.size // 200)]
    g = eng.delta_matrix(columns, rows)
    assert g.shape == (rows.size, len(columns))
    for k, ps in enumerate(columns):
        ref = eng.delta_at_voxels(ps, rows)
        np.testing.assert_allclose(g[:, k], ref, atol=1e-5 * max(float(np.abs(ref).max()), 1e-6))


def test_patch_response_window_equals_the_full_convolution(engine3):
    """A DMR solve's patch responses are convolved only over the window its samples read (the
    kernel cropped to the offsets that reach it): the same values as the full convolution
    sampled everywhere, for the narrow fine kernel and the broad coarse one."""
    from ids_engine.dose._readout import _level_delta_batch
    from ids_engine.kernels.pencil import convolve_full_batched, sample_bilinear

    eng = engine3
    rng = np.random.default_rng(5)
    for b in range(eng.n_beams):
        for lvl in (eng.geometry[b].fine, eng.geometry[b].coarse):
            h = lvl.host
            inside = np.flatnonzero(h.position >= 0) if h.position.ndim == 1 else None
            idx = rng.choice(inside, 300)
            idx[:5] = np.flatnonzero(h.position < 0)[:5] if np.any(h.position < 0) else idx[:5]
            stack = rng.normal(size=(3, 7, 9)).astype(np.float32)
            r0, c0 = int(np.median(h.v_cells)) - 3, int(np.median(h.u_cells)) - 4
            full = convolve_full_batched(stack, h.kernels)
            pos = h.position[idx]
            p = np.where(pos >= 0, pos, 0)
            s = sample_bilinear(full.reshape((-1,) + full.shape[2:]), h.v_cells[p], h.u_cells[p],
                                (r0 - lvl.half, c0 - lvl.half))
            ref = np.where(pos >= 0, (s.reshape(3, full.shape[1], -1) * h.weights[:, p][None]).sum(axis=1), 0)
            got = _level_delta_batch(lvl, stack, r0, c0, idx)
            assert np.abs(ref).max() > 0
            np.testing.assert_allclose(got, ref, atol=1e-5 * float(np.abs(ref).max()))
