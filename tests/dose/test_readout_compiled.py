"""The compiled loops of a DMR read's host work give their NumPy references' bits: the coarse
block sum of a patch stack, the stacked look-ups' bounds, and the bilinear read-out of a stack
of patch responses (``sample_weighted``, against the same float32 operations in NumPy)."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose._readout import _stacked_bounds
from ids_engine.kernels import _cpu, _cpu_readout

needs_numba = pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")


def _wide(rng, shape) -> np.ndarray:
    """float32 values over twelve decades, a fifth of them -0.0 (the order of the additions
    shows in the bits)."""
    x = (rng.normal(size=shape) * 10.0 ** rng.integers(-6, 6, shape)).astype(np.float32)
    x[rng.random(shape) < 0.2] = -0.0
    return x


@pytest.mark.parametrize("factor", range(1, 10))
def test_block_sum_is_numpys_sum_bit_for_bit(factor):
    """Every shape, the ones NumPy sums in another order (one block column, 8 or more cells a
    block row) included: they take NumPy's sum."""
    rng = np.random.default_rng(factor)
    for m, hh, ww in ((1, 1, 1), (1, 1, 5), (1, 5, 1), (3, 1, 7), (3, 7, 1), (1, 7, 9), (4, 11, 2), (16, 11, 66),
                      (0, 3, 3), (2, 0, 4)):
        for _ in range(3):
            x = _wide(rng, (m, hh * factor, ww * factor))
            ref = x.reshape(m, hh, factor, ww, factor).sum(axis=(2, 4))
            got = _cpu_readout.block_sum(x, factor)
            assert got.shape == ref.shape and got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))


@needs_numba
def test_stacked_bounds_are_the_numpy_bounds():
    rng = np.random.default_rng(11)
    for t in range(200):
        s_count, m = int(rng.integers(0, 10)), int(rng.integers(0, 50))
        ok = rng.random((s_count, m)) < 0.7
        v = rng.uniform(-50, 50, (s_count, m)).astype(np.float32)
        u = rng.uniform(-50, 50, (s_count, m)).astype(np.float32)
        v[rng.random((s_count, m)) < 0.1] = np.nan
        u[rng.random((s_count, m)) < 0.1] = -np.inf
        if t % 7 == 0:
            ok[:] = False
        assert _cpu_readout.stacked_bounds(ok, v, u) == _stacked_bounds(ok, v, u)


def _sample_weighted_reference(maps, v, u, origin_vu, weights, ok, k):
    """``sample_weighted``'s float32 operations in NumPy, in its order: the corner weights, the
    four corners' sum left to right, and per patch a running sum over the components from 0."""
    nmaps, h, w = maps.shape
    nc = nmaps // k
    one = np.float32(1)
    with np.errstate(invalid="ignore"):
        fv = v - np.float32(origin_vu[0])
        fu = u - np.float32(origin_vu[1])
        r0 = np.floor(fv).astype(np.int32)
        c0 = np.floor(fu).astype(np.int32)
    tv, tu = fv - r0.astype(np.float32), fu - c0.astype(np.float32)
    r_in0, r_in1 = (r0 >= 0) & (r0 < h), (r0 + 1 >= 0) & (r0 + 1 < h)
    c_in0, c_in1 = (c0 >= 0) & (c0 < w), (c0 + 1 >= 0) & (c0 + 1 < w)
    zero = np.float32(0)
    w00 = np.where(r_in0 & c_in0, (one - tv) * (one - tu), zero)
    w01 = np.where(r_in0 & c_in1, (one - tv) * tu, zero)
    w10 = np.where(r_in1 & c_in0, tv * (one - tu), zero)
    w11 = np.where(r_in1 & c_in1, tv * tu, zero)
    ra, rb = np.clip(r0, 0, h - 1), np.clip(r0 + 1, 0, h - 1)
    ca, cb = np.clip(c0, 0, w - 1), np.clip(c0 + 1, 0, w - 1)
    out = np.zeros((k, v.shape[0]), np.float32)
    for kk in range(k):
        acc = np.zeros(v.shape[0], np.float32)
        for c in range(nc):
            mp = maps[kk * nc + c]
            val = mp[ra, ca] * w00 + mp[ra, cb] * w01 + mp[rb, ca] * w10 + mp[rb, cb] * w11
            acc = acc + val * weights[c]
        out[kk] = np.where(ok, acc, zero)
    return out


@needs_numba
def test_sample_weighted_is_its_float32_operations_bit_for_bit():
    """Voxels off the maps, not in the level, or at non-finite positions included; every voxel
    in the level (the loop without indirection) a third of the time, whole-cell origins (ints,
    as the read-outs pass them) a quarter of the time."""
    rng = np.random.default_rng(13)
    for t in range(300):
        k, nc = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        h, w = (int(x) for x in rng.integers(1, 9, 2))
        n = int(rng.integers(0, 60))
        maps = _wide(rng, (k * nc, h, w))
        v = rng.uniform(-3, h + 3, n).astype(np.float32)
        u = rng.uniform(-3, w + 3, n).astype(np.float32)
        v[rng.random(n) < 0.05] = np.nan
        u[rng.random(n) < 0.05] = np.inf
        weights = rng.normal(size=(nc, n)).astype(np.float32)
        ok = np.ones(n, np.bool_) if t % 3 == 0 else rng.random(n) < 0.8
        origin = tuple(int(x) for x in rng.integers(-3, 4, 2)) if t % 4 == 0 else \
            (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
        ref = _sample_weighted_reference(maps, v, u, origin, weights, ok, k)
        got = _cpu.sample_weighted(maps, v, u, origin, weights, ok, k)
        np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))


@needs_numba
def test_block_sum_of_a_stack_not_c_ordered_is_numpys():
    """NumPy sums in memory order: a Fortran-ordered or axis-swapped stack takes NumPy's sum."""
    rng = np.random.default_rng(23)
    x = _wide(rng, (3, 4 * 6, 4 * 5))
    for y in (np.asfortranarray(x), np.swapaxes(np.swapaxes(x, 1, 2).copy(), 1, 2)):
        ref = y.reshape(3, 6, 4, 5, 4).sum(axis=(2, 4))
        np.testing.assert_array_equal(_cpu_readout.block_sum(y, 4).view(np.int32), ref.view(np.int32))


def test_block_sum_and_gather_follow_the_numba_switch(monkeypatch):
    """With ``_cpu.HAVE_NUMBA`` off (what ``IDS_NUMBA=0`` and the tests of the NumPy references
    set), the compiled loops are not called."""
    def refuse(*args):
        raise AssertionError("compiled loop called with HAVE_NUMBA off")

    monkeypatch.setattr(_cpu, "HAVE_NUMBA", False)
    monkeypatch.setattr(_cpu_readout, "_BLOCK_SUM", refuse)
    monkeypatch.setattr(_cpu_readout, "_GATHER_T", refuse)
    rng = np.random.default_rng(29)
    x = _wide(rng, (2, 8, 12))
    ref = x.reshape(2, 2, 4, 3, 4).sum(axis=(2, 4))
    np.testing.assert_array_equal(_cpu_readout.block_sum(x, 4).view(np.int32), ref.view(np.int32))
    records, rows = _wide(rng, (9, 4)), np.array([3, 0, 8], np.int64)
    np.testing.assert_array_equal(_cpu_readout.gather_columns(records, rows), records[rows].T)


@needs_numba
def test_gather_columns_is_numpys_gather_and_transpose():
    rng = np.random.default_rng(17)
    for n_rec, width, m in ((0, 5, 0), (1, 1, 3), (50, 33, 200), (7, 60, 1)):
        records = _wide(rng, (n_rec, width))
        rows = rng.integers(0, max(n_rec, 1), m).astype(np.int32) if n_rec else np.empty(0, np.int32)
        got = _cpu_readout.gather_columns(records, rows)
        assert got.shape == (width, m) and got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.int32), np.ascontiguousarray(records[rows].T).view(np.int32))


@needs_numba
def test_add_beam_parts_is_the_numpy_additions_in_order():
    """A joint read's parts added to the joint columns and to each beam's part: beams in turn,
    a beam's fine part before its coarse part, as the NumPy statements do."""
    rng = np.random.default_rng(19)
    n_levels, n_slots, k, n, n_beams = 2, 4, 6, 30, 5
    read = _wide(rng, (n_levels, n_slots, k, n))
    out, parts = _wide(rng, (k, n)), np.zeros((n_beams, k, n), np.float32)
    beam_cols = {0: np.arange(0, 3), 2: np.array([1, 4, 5]), 3: np.arange(2, 6), 4: np.array([0])}
    order, cols, q = [], [], 0
    want_out, want_parts = out.copy(), parts.copy()
    for s, (b, c) in enumerate(beam_cols.items()):
        cols.append(c)
        for level in range(n_levels) if b != 3 else (1,):
            order.append((b, level, s, q, q + c.size))
            got = read[level, s, c]
            want_out[c] += got
            want_parts[b, c] += got
        q += c.size
    _cpu_readout.add_beam_parts(read, np.array(order, np.int64), np.concatenate(cols).astype(np.int64), out, parts)
    np.testing.assert_array_equal(out.view(np.int32), want_out.view(np.int32))
    np.testing.assert_array_equal(parts.view(np.int32), want_parts.view(np.int32))
