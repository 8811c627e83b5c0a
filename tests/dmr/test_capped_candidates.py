"""The capped ranking's pruned candidates (``kernels._cpu_rows.capped_candidates``): exactly
what the bounds of every voxel give (the same ``k``-th largest lower bound, the same voxels
at its cut, bit for bit), however the pruning goes (ceilings, the columns' boxes, a second
round of bounds), and the estimates it prunes with never below a voxel's upper bound."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr._recovery import _w_ceiling
from ids_engine.kernels import _cpu, _cpu_rows

needs_numba = pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")


def _tables(rng, n_beams: int, n: int, spread: float, miss: float = 0.15):
    """(u, v, w) (beams, n) float32 BEV tables over ``[0, spread)^2`` cells, a fraction
    ``miss`` of (beam, voxel) pairs missed (u NaN, v +inf, w 0), weights of a few scales, some
    zero or negative."""
    u = (rng.random((n_beams, n)) * spread).astype(np.float32)
    v = (rng.random((n_beams, n)) * spread).astype(np.float32)
    w = (rng.random((n_beams, n)) * rng.choice([0.1, 1.0, 3.0], (1, n))).astype(np.float32)
    w[rng.random((n_beams, n)) < 0.02] = 0.0
    w[rng.random((n_beams, n)) < 0.01] *= -1.0
    missed = rng.random((n_beams, n)) < miss
    u[missed], v[missed], w[missed] = np.nan, np.inf, 0.0
    return u, v, w


def _every_voxel(base, extra, sidx, col_u, col_v, s2, room, k):
    """The reference: every voxel's bounds (the kernel ``capped_candidates`` takes them with),
    their ``k``-th largest lower bound and the voxels whose upper bound reaches its cut."""
    n = sidx.size
    lower, upper = np.full(n, np.nan), np.full(n, np.nan)
    bad = _cpu_rows._bounds_at_nb(*base, *extra, sidx, np.arange(n), np.asarray(col_u, np.float32),
                                  np.asarray(col_v, np.float32), np.float32(s2), room, lower, upper)
    assert not bad
    kth = np.partition(lower, n - k)[n - k]
    return np.flatnonzero(upper >= kth * (1.0 - 1e-3)), float(kth), lower, upper


def _case(rng, trial, n_beams=5, nb=12000, ne=40):
    """A base, its extra voxels, a composed watch on them, columns near the voxels or off to
    a side (then the highest ceilings are far from them and most voxels pass the ceiling
    cut: the boxes prune and the second round runs), a beam without a column, a NaN u."""
    spread = float(rng.choice([40.0, 120.0]))
    base, extra = _tables(rng, n_beams, nb, spread), _tables(rng, n_beams, ne, spread)
    source = rng.permutation(nb + ne)[: nb + ne - 200].astype(np.int64)
    watch_tabs = [np.concatenate([b, e], axis=1)[:, source] for b, e in zip(base, extra)]
    cols = rng.choice(source.size, int(rng.integers(1, 9)), replace=False).astype(np.int64)
    col_u, col_v = (t[:, cols].copy() for t in watch_tabs[:2])
    if trial % 3 == 1:  # columns off to a side of every beam
        col_u += np.float32(spread * rng.uniform(0.6, 1.2))
    if trial % 4 == 2:  # a beam none of the columns is on, one with a NaN u among them
        col_v[1] = np.inf
        col_u[2, 0], col_v[2, 0] = np.nan, np.float32(5.0)
    if trial % 5 == 3:  # a column with an infinite u on a beam's grid
        col_u[0, 0] = np.inf
    return base, extra, source, col_u, col_v


@needs_numba
def test_capped_candidates_equal_the_bounds_of_every_voxel():
    """The candidates and ``k``-th largest lower bound bit for bit as the bounds of every voxel
    give them, on watches composed on a base and on a watch's own tables, with near and far
    columns, three fall-offs, rooms clipped at 0.02 and tied, ``k`` from 1 to a quarter of
    the voxels."""
    rng = np.random.default_rng(41)
    for trial in range(36):
        base, extra, source, col_u, col_v = _case(rng, trial)
        w_top = (_w_ceiling(base[2]), _w_ceiling(extra[2]))
        n = int(rng.choice([1500, 9000]))
        capped = np.sort(rng.choice(source.size, n, replace=False)).astype(np.int64)
        k = int(rng.choice([1, 17, 64, 384, n // 4 - 1]))
        s2 = float(rng.choice([2.0, 29.4, 400.0]))
        hi = rng.uniform(20, 40, source.size)
        dose = np.round(hi - rng.uniform(-1, 5, source.size), 1 if trial % 2 else 6)
        room = np.maximum(hi[capped] - dose[capped], 0.02)
        composed = trial % 6 != 5
        if composed:
            got = _cpu_rows.capped_candidates(base, extra, w_top, source, capped, col_u, col_v, s2, hi, dose, k)
            tabs, ext, sidx = base, extra, source[capped]
        else:  # the watch's own tables, no extra voxels
            tabs = tuple(np.ascontiguousarray(np.concatenate([b, e], axis=1)[:, source]) for b, e in zip(base, extra))
            ext = tuple(np.empty((len(tabs[0]), 0), np.float32) for _ in range(3))
            top = np.zeros(source.size, np.float32)
            top[capped] = _w_ceiling(tabs[2][:, capped])
            got = _cpu_rows.capped_candidates(tabs, ext, (top, np.zeros(0, np.float32)), None, capped, col_u, col_v,
                                              s2, hi, dose, k)
            sidx = capped
        at_ref, kth_ref, _, _ = _every_voxel(tabs, ext, sidx, col_u, col_v, s2, room, k)
        assert got is not None
        at, kth = got
        assert at.dtype == np.int64 and np.array_equal(at, at_ref)
        assert kth == kth_ref


@needs_numba
def test_capped_candidates_refuse():
    """None for a NaN room, a fall-off ``s2`` not positive and finite in float32, or a voxel
    whose ``w`` is NaN, infinite or not below 1e15 in magnitude in some beam (marked NaN in ``w_top`` by ``_w_ceiling``), even where a large
    negative one leaves its largest ``w`` ordinary."""
    rng = np.random.default_rng(42)
    base, extra, source, col_u, col_v = _case(rng, 0)
    capped = np.sort(rng.choice(source.size, 3000, replace=False)).astype(np.int64)
    hi = rng.uniform(20, 40, source.size)
    dose = hi - rng.uniform(-1, 5, source.size)
    w_top = (_w_ceiling(base[2]), _w_ceiling(extra[2]))
    assert _cpu_rows.capped_candidates(base, extra, w_top, source, capped, col_u, col_v, 29.4, hi, dose, 64) is not None
    in_base = source[capped][source[capped] < base[2].shape[1]]
    for value in (np.nan, np.inf, -np.inf, -2e15, 1e15):
        bad = base[2].copy()
        bad[3, in_base[7]] = value
        w_bad = (_w_ceiling(bad), w_top[1])
        assert _cpu_rows.capped_candidates((base[0], base[1], bad), extra, w_bad, source, capped, col_u, col_v, 29.4,
                                           hi, dose, 64) is None
    nan_dose = dose.copy()
    nan_dose[capped[5]] = np.nan
    assert _cpu_rows.capped_candidates(base, extra, w_top, source, capped, col_u, col_v, 29.4, hi, nan_dose, 64) is None
    # A fall-off the estimate does not bound (its exp(-d2 / s2) not a decay): refused, so the
    # caller computes every key (s2 = 0 with voxels at the columns made NaN estimates).
    for s2 in (0.0, -3.0, np.inf, np.nan, 1e-46):
        assert _cpu_rows.capped_candidates(base, extra, w_top, source, capped, col_u, col_v, s2, hi, dose, 64) is None


def test_w_ceiling_marks_the_weights_the_bounds_refuse():
    """Each voxel's largest ``w`` over the beams; NaN where one is NaN, infinite or not below
    1e15 in magnitude (float32's 1e15, as the bounds compare)."""
    w = np.array([[1.0, 0.5, np.nan, -np.inf, 3.0, -1e15, 9.9e14, 0.0],
                  [2.0, -0.5, 1.0, 1.0, np.inf, 1.0, 1.0, 0.0]], np.float32)
    got = _w_ceiling(w)
    assert got.dtype == np.float32
    assert np.array_equal(got, np.array([2.0, 0.5, np.nan, np.nan, np.nan, np.nan, 9.9e14, 0.0], np.float32),
                          equal_nan=True)
    assert _w_ceiling(np.zeros((3, 0), np.float32)).shape == (0,)


@needs_numba
def test_box_estimates_are_at_least_the_upper_bounds():
    """What the pruning rests on: each voxel's estimate (its ceiling times an upper bound of
    ``exp`` at the columns' boxes) is at least its upper bound, for voxels a beam misses, at
    a column, on a box's edge, columns with NaN or infinite coordinates, fall-offs from
    sharp to flat."""
    rng = np.random.default_rng(43)
    for trial in range(40):
        base, extra, source, col_u, col_v = _case(rng, trial, nb=3000)
        w_top = (_w_ceiling(base[2]), _w_ceiling(extra[2]))
        capped = np.sort(rng.choice(source.size, 2000, replace=False)).astype(np.int64)
        sidx = source[capped]
        if trial % 2:  # voxels at a column and on its box's edge
            at_col = sidx[:5][sidx[:5] < base[0].shape[1]]
            base[0][:, at_col], base[1][:, at_col] = col_u[:, :1], col_v[:, :1]
        s2 = float(rng.choice([0.5, 2.0, 29.4, 400.0, 1e4]))
        room = np.maximum(rng.uniform(-1, 5, capped.size), 0.02)
        w = np.concatenate(w_top)[sidx]
        ceiling = np.where(w <= 0, 0.0, w.astype(np.float64) / room)
        lower, upper = np.zeros(capped.size), np.zeros(capped.size)
        _cpu_rows._bounds_at_nb(*base, *extra, sidx, np.arange(capped.size), col_u, col_v, np.float32(s2), room,
                                lower, upper)
        est = np.full(capped.size, np.nan)
        _cpu_rows._box_ceiling_nb(base[0], base[1], extra[0], extra[1], sidx, np.arange(capped.size), col_u, col_v,
                                  np.float32(s2), ceiling, est)
        assert np.all(est >= upper)
