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


def test_neighbour_cache_knows_sealed_indices_by_identity(engine, monkeypatch):
    """Indices sealed by the engine (:func:`sealed_indices`: a watch base's voxels) are found
    again by identity, with no comparison of their content, also through a whole view; a
    partial view, a copy, a caller's read-only array (even one owning its memory: a writeable
    view made before it was frozen can still change it) or a read-only view of a writeable
    array are compared, and their new content is read, never the cached tables."""
    from ids_engine.dose import _readout

    eng = engine
    sealed = _readout.sealed_indices(_body_voxels(eng, 3000, 5))
    assert not sealed.flags.writeable and sealed.base is None
    first = eng._neighbours(sealed)
    assert first.source is sealed
    compared = []
    real_equal = np.array_equal
    monkeypatch.setattr(_readout.np, "array_equal", lambda a, b: compared.append(a.size) or real_equal(a, b))
    assert eng._neighbours(sealed) is first and eng._neighbours(sealed.reshape(-1)) is first
    assert not compared  # found by identity
    assert eng._neighbours(sealed.copy()) is first and compared  # the same content, compared
    head = sealed[:-1]  # a partial view of the same memory: never taken by identity
    assert eng._neighbours(head) is not first and np.array_equal(eng._neighbours(head).idx, head)
    # A caller's read-only owner with a writeable alias made before it was frozen, and a
    # read-only view of a writeable owner: their content changed (the same ends) is read anew.
    read = []
    for seed, frozen_is_owner in ((6, True), (8, False)):
        writable = _body_voxels(eng, 2000, seed)
        frozen = writable if frozen_is_owner else writable.view()
        writable = writable[:] if frozen_is_owner else writable
        frozen.setflags(write=False)
        got = eng._neighbours(frozen)
        assert got.source is None
        writable[1:-1] = np.sort(_body_voxels(eng, 1998, seed + 1).clip(frozen[0] + 1, frozen[-1] - 1))
        again = eng._neighbours(frozen)
        assert again is not got and np.array_equal(again.idx, frozen)
        read.append(frozen)
    monkeypatch.undo()
    ref = np.asarray(eng.dose_cube_host()).ravel()
    for idx in read:
        np.testing.assert_allclose(np.asarray(eng.dose_at_voxels(idx)), ref[idx], rtol=1e-5, atol=1e-7)


def test_coarse_work_arrays_are_taken_off_the_engine_during_a_call(engine, monkeypatch):
    """The compiled coarse tables' work arrays are the engine's between calls; a call that fails
    inside leaves them off it (possibly dirty), and the next call makes fresh ones and gives
    the same tables as a fresh engine's."""
    from ids_engine.dose import _readout
    from ids_engine.kernels import _cpu

    if not _cpu.HAVE_NUMBA:
        pytest.skip("the compiled coarse tables need numba")
    eng = engine
    idx = _body_voxels(eng, 500, 11)
    eng._neighbour_cache = []
    ref = eng._neighbours(idx)
    assert "_coarse_scratch" in eng.__dict__
    real = _readout._cpu_readout.coarse_tables

    def failing(*args):
        args[-1][0][:] = 7  # dirty work arrays, then a failure
        raise MemoryError("simulated")

    monkeypatch.setattr(_readout._cpu_readout, "coarse_tables", failing)
    with pytest.raises(MemoryError):
        eng._neighbours(idx + 1)
    assert "_coarse_scratch" not in eng.__dict__
    monkeypatch.setattr(_readout._cpu_readout, "coarse_tables", real)
    eng._neighbour_cache = []
    again = eng._neighbours(idx)
    assert np.array_equal(again.cidx, ref.cidx) and np.array_equal(again.cw, ref.cw)
    assert all(np.array_equal(a, b) for a, b in zip(again.coarse_unique(), ref.coarse_unique()))


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


def test_compiled_coarse_combination_equals_numpy_bit_for_bit(engine, monkeypatch):
    """The coarse level's read-out at the distinct neighbours, spread to the CT voxels with the
    trilinear weights: the compiled pass (``_cpu.combine_neighbours``) gives NumPy's floats, so
    delta_matrix and delta_at_voxels do not depend on numba for this step."""
    from ids_engine.kernels import _cpu

    if not _cpu.HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(7)
    for k, n, m in ((1, 1, 8), (3, 400, 700), (18, 35, 90)):
        dc = (rng.normal(size=(k, m)) * 10.0 ** rng.uniform(-4, 2, (k, m))).astype(np.float32)
        dc[:, ::5] = 0
        inv = rng.integers(0, m, 8 * n).astype(np.int64)
        cw = rng.uniform(0, 1, (8, n)).astype(np.float32)
        out = rng.normal(size=(k + 2, n)).astype(np.float32)
        sel = np.sort(rng.choice(k + 2, k, replace=False)).astype(np.int64)
        ref = out.copy()
        ref[sel] += (dc[:, inv].reshape(k, 8, n) * cw[None]).sum(axis=1)
        _cpu.combine_neighbours(dc, inv, cw, out, sel)
        np.testing.assert_array_equal(out.view(np.int32), ref.view(np.int32))
    # Through the engine: the same read-outs with NumPy's combination in its place.
    eng = engine
    idx = _body_voxels(eng, 300, 8)
    cols = [[_centre_patch(eng, b, 9, 0.3 + b, (b, -b))] for b in range(3)] + \
        [[_centre_patch(eng, b, 6, -0.2, (2, 1)) for b in range(3)]]
    eng.__dict__.pop("_neighbour_cache", None)
    fast, one = eng.delta_matrix(cols, idx).copy(), eng.delta_at_voxels(cols[-1], idx).copy()
    assert np.abs(fast).max() > 0

    def numpy_combination(dc, inv, cw, out, sel):
        out[sel] += (dc[:, inv].reshape(dc.shape[0], 8, cw.shape[1]) * cw[None]).sum(axis=1)

    monkeypatch.setattr(_cpu, "combine_neighbours", numpy_combination)
    eng.__dict__.pop("_neighbour_cache", None)
    np.testing.assert_array_equal(eng.delta_matrix(cols, idx), fast)
    np.testing.assert_array_equal(eng.delta_at_voxels(cols[-1], idx), one)


def test_patch_response_window_is_the_scipy_transforms_bit_for_bit():
    """The fused host transform of a DMR read-out (forward FFT of the stack, product with the
    cropped kernels' spectra, inverse of the rows read, the columns read) gives SciPy's floats."""
    from scipy import fft as sfft

    from ids_engine.kernels import _cpu

    rng = np.random.default_rng(11)
    for k, nc, h, w, fshape in ((1, 1, 22, 22, (45, 45)), (9, 2, 8, 9, (25, 90)), (3, 2, 6, 7, (15, 18))):
        stack = rng.normal(size=(k, h, w)).astype(np.float32)
        kern = rng.normal(size=(nc, fshape[0] - h + 1, fshape[1] - w + 1)).astype(np.float32)
        kspec = sfft.rfft2(kern, fshape)
        r0, r1 = fshape[0] // 3, fshape[0] - 2
        c0, c1 = 2, fshape[1] // 2
        ref = sfft.irfft2(sfft.rfft2(stack, fshape)[:, None] * kspec[None], fshape)[:, :, r0:r1, c0:c1]
        got = _cpu.patch_response_window(stack, kspec, fshape, (r0, r1), (c0, c1))
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.int32), np.ascontiguousarray(ref).view(np.int32))


def test_response_windows_are_reused_at_other_rows_bit_for_bit(engine, monkeypatch):
    """A stack's convolved window does not depend on the rows that sample it: a read at another
    row set with the same window (here the same voxels in another order) convolves nothing, and
    gives what a fresh read (no cached windows) gives, bit for bit."""
    from ids_engine.kernels import _cpu

    eng = engine
    rows = _body_voxels(eng, 300, 7)
    perm = np.random.default_rng(8).permutation(rows.size)
    cols = [[_centre_patch(eng, b, 7, 0.3, (b, 1 - b)) for b in range(3)], [_centre_patch(eng, 1, 5, -0.2)]]
    calls = []
    orig = _cpu.patch_response_window
    monkeypatch.setattr(_cpu, "patch_response_window", lambda *a: calls.append(1) or orig(*a))
    for name in ("_response_window_cache", "_neighbour_cache"):
        eng.__dict__.pop(name, None)
    first = eng.delta_matrix(cols, rows)
    assert calls
    del calls[:]
    got = eng.delta_matrix(cols, rows[perm])  # a new row set: its own look-ups, the same windows
    assert not calls
    for name in ("_response_window_cache", "_neighbour_cache"):
        eng.__dict__.pop(name, None)
    fresh = eng.delta_matrix(cols, rows[perm])
    assert calls
    np.testing.assert_array_equal(got.view(np.int32), fresh.view(np.int32))
    np.testing.assert_array_equal(got.view(np.int32), first[perm].view(np.int32))


def test_response_windows_are_told_apart_by_stack_and_window(engine):
    """The window cache's key holds the stack's values and the window: with windows of one
    read kept, a stack of the same shape with other values at the same rows, and the same
    stacks read at other rows (other windows), each give what a fresh read gives, bit for bit."""
    eng = engine
    rows = _body_voxels(eng, 300, 7)
    cols = [[_centre_patch(eng, b, 7, 0.3, (b, 1 - b)) for b in range(3)], [_centre_patch(eng, 1, 5, -0.2)]]
    other_values = [[_centre_patch(eng, b, 7, 0.45, (b, 1 - b)) for b in range(3)], [_centre_patch(eng, 1, 5, -0.35)]]
    other_rows = _body_voxels(eng, 40, 11)

    def fresh(columns, at):
        for name in ("_response_window_cache", "_neighbour_cache"):
            eng.__dict__.pop(name, None)
        return eng.delta_matrix(columns, at)

    want_values, want_rows = fresh(other_values, rows), fresh(cols, other_rows)
    for columns, at, want in ((other_values, rows, want_values), (cols, other_rows, want_rows)):
        fresh(cols, rows)  # the first read's windows kept
        got = eng.delta_matrix(columns, at)
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
