"""The host read-outs' caches (neighbour tables, level look-ups, cropped kernel spectra) and
delta_matrix's per-beam column stacks change no value: checked bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import DoseEngine, FluencePatch
from ids_engine.model import Beam

from .test_physics import water_phantom


@pytest.fixture(scope="module")
def engine():
    p = water_phantom(width_mm=100.0, depth_mm=120.0, spacing_mm=2.5)
    eng = DoseEngine(p, [Beam(gantry_deg=g) for g in (0.0, 120.0, 240.0)])
    eng.set_fluences([eng.open_field(b, (-30, 30), (-30, 30)) for b in range(3)])
    return eng


def _centre_patch(eng, b, size, value, shift=(0, 0)):
    nv, nu = eng.geometry[b].fluence_grid.shape_vu
    r0, c0 = nv // 2 - size // 2 + shift[0], nu // 2 - size // 2 + shift[1]
    return FluencePatch(b, r0, c0, np.full((size, size), value, np.float32))


def _body_voxels(eng, n, seed):
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(eng.body_index, size=n, replace=False)).astype(np.int64)


def test_dose_at_voxels_follows_the_dose_through_the_cache(engine):
    eng = engine
    idx = _body_voxels(eng, 400, 1)
    first = np.asarray(eng.dose_at_voxels(idx)).copy()
    np.testing.assert_array_equal(np.asarray(eng.dose_at_voxels(idx.copy())), first)  # a hit: same content
    assert eng._neighbours(idx.copy()) is eng._neighbours(idx)
    assert not eng._neighbours(idx).cidx.flags.writeable
    patch = _centre_patch(eng, 0, 9, 0.5)
    eng.apply_patches([patch])
    try:
        after = np.asarray(eng.dose_at_voxels(idx))
        cube = eng.dose_cube_host().ravel()
        np.testing.assert_allclose(after, cube[idx], rtol=1e-5, atol=1e-7)
        assert np.abs(after - first).max() > 1e-3 * np.abs(first).max()  # the patch changed the read-out
        # A caller's array changed after a read is a different set, not the cached one.
        moved = idx.copy()
        moved[:50] = _body_voxels(eng, 50, 2)
        np.testing.assert_allclose(np.asarray(eng.dose_at_voxels(moved)), cube[moved], rtol=1e-5, atol=1e-7)
    finally:
        eng.apply_patches([FluencePatch(patch.beam, patch.row0, patch.col0, -patch.delta)])


def test_delta_matrix_skips_columns_without_a_patch_in_a_beam_bit_for_bit(engine):
    """Per beam, delta_matrix convolves only the columns with a patch in that beam; the result
    equals, bit for bit, the full stack of every column in every beam (forced here by a 1 x 1
    zero patch at each beam's box corner in every column: the same boxes, zero rows computed).
    Columns with patches in one beam (a per-beam solve), in all beams, two patches of one beam."""
    eng = engine
    rows = _body_voxels(eng, 300, 3)
    columns = [[_centre_patch(eng, b, 11, 0.2 * (b + 1))] for b in range(3)]
    columns.append([_centre_patch(eng, b, 7, -0.1, (3, -2)) for b in range(3)])
    columns.append([_centre_patch(eng, 1, 5, 0.3, (-6, 4)), _centre_patch(eng, 1, 9, 0.1, (5, 5))])
    columns.append([_centre_patch(eng, 2, 13, 0.05, (2, 8))])
    g = np.asarray(eng.delta_matrix(columns, rows))
    assert g.shape == (rows.size, len(columns))
    corner = {}
    for col in columns:
        for p in col:
            r, c = corner.get(p.beam, (p.row0, p.col0))
            corner[p.beam] = (min(r, p.row0), min(c, p.col0))
    full = [col + [FluencePatch(b, r, c, np.zeros((1, 1), np.float32)) for b, (r, c) in corner.items()]
            for col in columns]
    np.testing.assert_array_equal(g, np.asarray(eng.delta_matrix(full, rows)))
    assert np.all(np.abs(g).max(axis=0) > 0)
    # A beam without any patch in a column adds nothing there: the one-beam columns equal
    # delta_at_voxels of their patch (on its own box: other FFT sizes) to float32 round-off.
    # (FFT round-off is relative to the response's peak in the body.)
    for k in (0, 1, 2, 5):
        peak = np.abs(np.asarray(eng.delta_at_voxels(columns[k], eng.body_index))).max()
        np.testing.assert_allclose(g[:, k], np.asarray(eng.delta_at_voxels(columns[k], rows)),
                                   rtol=1e-4, atol=2e-6 * peak)


def test_delta_at_voxels_repeated_is_identical_and_matches_the_update(engine):
    """The second call reads the cached look-ups and kernel spectra: the same bits; and the
    prediction equals what apply_patches then adds, to float32 round-off."""
    eng = engine
    rows = _body_voxels(eng, 200, 4)
    patches = [_centre_patch(eng, b, 9, 0.4, (b, -b)) for b in range(3)]
    first = np.asarray(eng.delta_at_voxels(patches, rows)).copy()
    np.testing.assert_array_equal(np.asarray(eng.delta_at_voxels(patches, rows)), first)
    before = np.asarray(eng.dose_at_voxels(rows)).copy()
    eng.apply_patches(patches)
    try:
        got = np.asarray(eng.dose_at_voxels(rows)) - before
        np.testing.assert_allclose(got, first, rtol=1e-4, atol=1e-5 * np.abs(first).max())
    finally:
        eng.apply_patches([FluencePatch(p.beam, p.row0, p.col0, -p.delta) for p in patches])


def test_gather_bev_equals_the_numpy_gathers(engine):
    """The compiled gather of a watch's BEV arrays (recovery's row tables) equals NumPy's
    np.where(pos < 0, ...) gathers bit for bit, voxels outside the body included."""
    from ids_engine.kernels import _cpu

    if not _cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed (the 'fast' extra)")
    eng = engine
    rng = np.random.default_rng(5)
    vox = np.sort(rng.choice(eng.grid.size, size=3000, replace=False)).astype(np.int64)
    for geo in eng.geometry:
        h = geo.fine.host
        pos = h.position[vox]
        missing = pos < 0
        assert missing.any() and not missing.all()
        u, v, w = (np.empty(vox.size, np.float32) for _ in range(3))
        got = _cpu.gather_bev(h.position, h.u_cells, h.v_cells, h.weights[0], vox, u, v, w)
        np.testing.assert_array_equal(got, missing)
        for a, b in ((u, np.where(missing, np.nan, h.u_cells[pos])), (v, np.where(missing, np.inf, h.v_cells[pos])),
                     (w, np.where(pos >= 0, h.weights[0][pos], 0.0))):
            np.testing.assert_array_equal(a.view(np.uint32), np.asarray(b, np.float32).view(np.uint32))
