"""The host fast paths of a DMR step give the reference's results bit for bit: the direct
pocketfft transforms against ``scipy.fft``, and the compiled row-selection loops (numba)
against the NumPy code in ``_Rows`` (the reference), on random BEV positions with the NaN and
infinity patterns of voxels and columns a beam misses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import fft as sfft

from ids_engine.dmr._recovery import _Rows
from ids_engine.kernels import _cpu

needs_numba = pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")


def _fast_len(n: int) -> int:
    return sfft.next_fast_len(n, real=True)


def test_direct_fft_equals_scipy_fft_bit_for_bit():
    """``rfft2_padded`` is ``scipy.fft.rfft2(x, fshape)`` and ``irfft2_rows`` the rows of
    ``scipy.fft.irfft2(spec, fshape)``, exactly, on stacks of the sizes a DMR read-out uses
    (odd and even lengths, one or several patches and components, any row range)."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        k, nc = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        hh, ww = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        fshape = (_fast_len(hh + int(rng.integers(0, 30))), _fast_len(ww + int(rng.integers(0, 30))))
        x = rng.standard_normal((k, hh, ww)).astype(np.float32)
        spec = _cpu.rfft2_padded(x, fshape)
        ref = sfft.rfft2(x, fshape)
        assert spec.dtype == ref.dtype == np.complex64
        assert np.array_equal(spec, ref)
        kern = rng.standard_normal((nc,) + spec.shape[1:]).astype(np.float32)
        prod = spec[:, None] * (kern + 1j * kern[::-1]).astype(np.complex64)[None]
        r0 = int(rng.integers(0, fshape[0]))
        r1 = int(rng.integers(r0 + 1, fshape[0] + 1))
        rows = _cpu.irfft2_rows(prod, fshape, r0, r1)
        full = sfft.irfft2(prod, fshape)
        assert rows.dtype == np.float32 and rows.shape == (k, nc, r1 - r0, fshape[1])
        assert np.array_equal(rows, full[..., r0:r1, :])
    with pytest.raises(TypeError, match="float32"):
        _cpu.rfft2_padded(np.zeros((1, 4, 4)), (8, 8))


def _fake_rows(rng, n_beams: int = 5, n: int = 3000, lattice: bool = False) -> _Rows:
    """A ``_Rows`` with random BEV positions only (what the selection loops read): some
    voxels missed by a beam (u NaN, v +inf), as ``_Rows.__init__`` sets them. ``lattice``:
    positions on quarter cells and a whole reach, so voxels lie exactly on the box edges."""
    rs = object.__new__(_Rows)
    u = (rng.random((n_beams, n)) * 120 - 10).astype(np.float32)
    v = (rng.random((n_beams, n)) * 120 - 10).astype(np.float32)
    if lattice:
        u, v = np.round(u * 4) / np.float32(4), np.round(v * 4) / np.float32(4)
    w = rng.random((n_beams, n)).astype(np.float32)
    miss = rng.random((n_beams, n)) < 0.1
    u[miss], v[miss], w[miss] = np.nan, np.inf, 0.0
    miss_all = rng.choice(n, 20, replace=False)  # voxels no beam reaches
    u[:, miss_all], v[:, miss_all], w[:, miss_all] = np.nan, np.inf, 0.0
    rs.vox = np.arange(n, dtype=np.int64)
    rs.bev_u2, rs.bev_v2, rs.bev_w2 = u, v, w
    rs.bev_u, rs.bev_v = list(u), list(v)
    rs.reach_cells = 9.0 if lattice else 9.0 + float(rng.random())
    shape = (n_beams, n)
    rs._order2, rs._rows2 = np.empty(shape, np.int64), np.empty(shape, np.int16)
    rs._bu_sorted2, rs._bv_sorted2 = np.empty(shape, np.float32), np.empty(shape, np.float32)
    rs.by_v, rs._by_v_uv = [], []
    for b in range(n_beams):
        row = np.where(miss[b] | np.isin(np.arange(n), miss_all), np.iinfo(np.int16).max,
                       np.clip(np.floor(v[b]), -32000, 32000)).astype(np.int16)
        rs._order2[b] = np.argsort(row, kind="stable")
        rs._rows2[b] = row[rs._order2[b]]
        rs._bu_sorted2[b], rs._bv_sorted2[b] = u[b][rs._order2[b]], v[b][rs._order2[b]]
        rs.by_v.append((rs._order2[b], rs._rows2[b]))
        rs._by_v_uv.append((rs._bu_sorted2[b], rs._bv_sorted2[b]))
    return rs, miss_all


@needs_numba
@pytest.mark.parametrize("lattice", [False, True])
def test_compiled_row_selection_loops_equal_numpy(monkeypatch, lattice):
    """The voxels under the columns' patches and the capped voxels' squared BEV distances and
    weights: compiled and NumPy give the same voxels and the same float32 values, including
    columns some or every beam misses and voxels on the edges of the patches' box."""
    rng = np.random.default_rng(11)
    rs, miss_all = _fake_rows(rng, lattice=lattice)
    cases = [rng.choice(rs.vox.size, int(rng.integers(1, 10)), replace=False) for _ in range(40)]
    cases += [miss_all[:3], np.concatenate([miss_all[:2], [5, 17]]), np.array([7])]
    for cols in cases:
        cols = np.asarray(cols, np.int64)
        capped = np.sort(rng.choice(rs.vox.size, 700, replace=False)).astype(np.int64)
        with monkeypatch.context() as m, np.errstate(invalid="ignore"):  # inf - inf where both miss a beam
            m.setattr(_cpu, "HAVE_NUMBA", False)
            under_ref = rs._under_patches(cols)
            d2_ref, w_ref = rs._capped_distance2(capped, cols)
        under = rs._under_patches(cols)
        d2, w = rs._capped_distance2(capped, cols)
        assert np.array_equal(under, under_ref)
        assert d2.dtype == d2_ref.dtype == np.float32
        assert np.array_equal(d2, d2_ref) and np.array_equal(w, w_ref)
    # The cases reach both kinds of voxel: some marked, some infinitely far in a beam.
    assert np.isinf(d2_ref).any() and np.isfinite(d2_ref).any()


def test_watch_distances_equal_a_kd_tree_query():
    """The priority rows are ordered by their distance to the nearest column: the same float64
    values as ``cKDTree.query`` (the order of equal distances depends on it)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(5)
    rs = object.__new__(_Rows)
    spacing = np.array([2.0, 1.952, 1.952])
    rs.coords = rng.integers(0, 60, (5000, 3)) * spacing
    for _ in range(20):
        cols = rng.choice(5000, int(rng.integers(1, 9)), replace=False)
        idx = rng.choice(5000, 800, replace=False)
        ref, _ = cKDTree(rs.coords[cols]).query(rs.coords[idx])
        assert np.array_equal(rs._distance_mm(idx, cols), ref)
    assert rs._distance_mm(np.zeros(0, np.int64), np.array([1])).shape == (0,)


@needs_numba
def test_counting_sort_by_row_is_numpys_stable_argsort():
    """A beam's voxels ordered by whole BEV row: the same permutation, keys and positions as
    NumPy's stable argsort of the clipped int16 keys (ties, missed voxels, +inf, keys beyond
    the int16 clip included); a NaN row is left to NumPy."""
    rng = np.random.default_rng(8)
    for n in (0, 1, 7, 5000):
        bv = (rng.integers(-20, 40, n) + rng.random(n).round(1)).astype(np.float32)
        bu = rng.random(n).astype(np.float32)
        missing = rng.random(n) < 0.2
        if n > 10:
            bv[:3] = [np.inf, -1e6, 1e6]
            missing[:3] = False
        bu[missing], bv[missing] = np.nan, np.inf
        key = np.where(missing, np.iinfo(np.int16).max, np.clip(np.floor(bv), -32000, 32000)).astype(np.int16)
        ref = np.argsort(key, kind="stable")
        order, rows = np.empty(n, np.int64), np.empty(n, np.int16)
        bu_s, bv_s = np.empty(n, np.float32), np.empty(n, np.float32)
        assert _cpu.sort_by_row(bu, bv, missing, order, rows, bu_s, bv_s)
        assert np.array_equal(order, ref) and np.array_equal(rows, key[ref])
        assert np.array_equal(bu_s, bu[ref], equal_nan=True) and np.array_equal(bv_s, bv[ref])
    bv = np.array([1.5, np.nan], np.float32)
    out = [np.empty(2, t) for t in (np.int64, np.int16, np.float32, np.float32)]
    assert not _cpu.sort_by_row(np.zeros(2, np.float32), bv, np.zeros(2, bool), *out)
