"""The compiled passes of a recovery step (``kernels._cpu_rows``) pick what the NumPy code
picks: the at-risk and capped voxels under the patches, the step's violation, score, chosen
voxel and off voxels, on random watches with open bands, NaN doses, ties and empty groups,
and on the coarse horseshoe's real watch (a step's rows, a whole recovery)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from ids_engine.dmr import SetVoxelDose, _recovery, resolve
from ids_engine.dmr._recovery import RecoveryOptions, Watch, _pick_spread, _Rows, _smallest, recover
from ids_engine.kernels import _cpu, _cpu_rows

needs_numba = pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")

RX = 60.0


def _numpy_only(mp) -> None:
    """Every compiled host loop off (``kernels._cpu``'s and ``kernels._cpu_rows``'s: one
    switch): the NumPy references. Each compiled function is also replaced by one that fails,
    so a call that ignored the switch would show."""
    mp.setattr(_cpu, "HAVE_NUMBA", False)
    try:
        from numba.core.registry import CPUDispatcher
    except ImportError:  # numba not installed: nothing was compiled
        return

    def compiled_called(*args, **kwargs):
        raise AssertionError("a compiled host loop ran with kernels._cpu.HAVE_NUMBA off")

    for mod in (_cpu, _cpu_rows):
        for name, value in list(vars(mod).items()):
            if isinstance(value, CPUDispatcher):
                mp.setattr(mod, name, compiled_called)


def _random_watch(rng, n: int):
    """Bands with open sides, doses on the band edges (ties), a few NaN doses."""
    lo = np.round(rng.uniform(0, 50, n), 1)
    hi = lo + np.round(rng.uniform(0, 10, n), 1)
    lo[rng.random(n) < 0.2] = -np.inf
    hi[rng.random(n) < 0.2] = np.inf
    dose = np.round(rng.uniform(-5, 65, n), 1)
    edge = rng.random(n) < 0.1
    dose[edge] = np.where(np.isfinite(lo[edge]), lo[edge], dose[edge])
    dose[rng.random(n) < 0.01] = np.nan
    weight = rng.choice([0.0, 0.5, 1.0, 4.0], n)
    return dose, lo, hi, weight


@needs_numba
@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_in_band_under_equals_numpy(n):
    """The voxels under the patches, not near, in band with little room: the same voxels, room
    and capped ones as ``flatnonzero`` and the gathers, with marks all off, all on and near
    voxels marked or not."""
    rng = np.random.default_rng(n)
    for trial in range(20):
        dose, lo, hi, weight = _random_watch(rng, n)
        viol = np.maximum(np.maximum(lo - dose, dose - hi), 0.0)
        capped = rng.random(n) < 0.7
        mark = rng.random(n) < (0.0, 1.0, 0.5)[trial % 3]
        near = rng.choice(n, min(n, int(rng.integers(0, 10))), replace=False).astype(np.int64)
        ref_mark = mark.copy()
        ref_mark[near] = False
        t = np.flatnonzero(ref_mark)
        with np.errstate(invalid="ignore"):
            slack = np.minimum(hi[t] - dose[t], dose[t] - lo[t])
            pick = (viol[t] == 0) & (slack < 3.0)
        t, slack = t[pick], slack[pick]
        got_t, got_slack, got_capped = _cpu_rows.in_band_under(mark, near, viol, dose, hi, lo, capped, 3.0)
        assert got_t.dtype == got_capped.dtype == np.int64
        assert np.array_equal(got_t, t) and np.array_equal(got_slack, slack)
        assert np.array_equal(got_capped, t[capped[t]])
        assert np.array_equal(mark, ref_mark)


@needs_numba
def test_in_band_room_drops_nan_bands_given_as_in_band():
    """The room test is branch-free (every operand read, the tests and-ed): a voxel whose band
    edge or dose is NaN while its violation reads 0 is still left out, as NumPy's minimum
    (NaN) is never below the slack; infinite edges keep a finite room on the other side."""
    rng = np.random.default_rng(11)
    n = 4000
    dose, lo, hi, _ = _random_watch(rng, n)
    lo[rng.random(n) < 0.05] = np.nan
    hi[rng.random(n) < 0.05] = np.nan
    viol = np.where(rng.random(n) < 0.8, 0.0, 1.0)  # "in band" whatever the edges say
    capped = rng.random(n) < 0.5
    mark = rng.random(n) < 0.6
    near = np.zeros(0, np.int64)
    t = np.flatnonzero(mark)
    with np.errstate(invalid="ignore"):
        slack = np.minimum(hi[t] - dose[t], dose[t] - lo[t])
        pick = (viol[t] == 0) & (slack < 3.0)
    assert np.isnan(slack[viol[t] == 0]).any()
    got_t, got_slack, got_capped = _cpu_rows.in_band_under(mark.copy(), near, viol, dose, hi, lo, capped, 3.0)
    assert np.array_equal(got_t, t[pick]) and np.array_equal(got_slack, slack[pick])
    assert np.array_equal(got_capped, t[pick][capped[t[pick]]])
    got = _cpu_rows.in_band_risk(mark.copy(), near, viol, dose, hi, lo, capped, 3.0, 10**6, np.empty(n, np.int64))
    assert np.array_equal(got[0], t[pick]) and np.array_equal(got[1], got_capped)


@needs_numba
@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_in_band_risk_keeps_the_least_room_set_and_the_capped_voxels(n):
    """What ``select`` keeps of the voxels under the patches: the ``k`` of least room (the set
    of ``_smallest``'s) and the capped ones, as :func:`in_band_under` gives them, with rooms
    tied (rounded doses) and none where the ``k``-th least room ties the next; the marks
    cleared at ``near`` the same way, every ``k`` from 1 to past the voxels passing."""
    rng = np.random.default_rng(200 + n)
    declined = kept = 0
    for trial in range(30):
        dose, lo, hi, weight = _random_watch(rng, n)
        if trial % 2:  # distinct rooms: no ties
            dose = dose + rng.uniform(-0.04, 0.04, n)
        with np.errstate(invalid="ignore"):
            viol = np.maximum(np.maximum(lo - dose, dose - hi), 0.0)
        capped = rng.random(n) < 0.7
        mark = rng.random(n) < (0.0, 1.0, 0.5)[trial % 3]
        near = rng.choice(n, min(n, int(rng.integers(0, 10))), replace=False).astype(np.int64)
        ref_mark = mark.copy()
        with np.errstate(invalid="ignore"):
            touched, slack, ref_capped = _cpu_rows.in_band_under(ref_mark, near, viol, dose, hi, lo, capped, 3.0)
        for k in sorted({1, 2, 5, 64, max(touched.size - 1, 1), touched.size + 1, max(touched.size, 1), 2**62}):
            got_mark = mark.copy()
            scratch = np.full(n + 3, -7, np.int64)
            got = _cpu_rows.in_band_risk(got_mark, near, viol, dose, hi, lo, capped, 3.0, k, scratch)
            assert np.array_equal(got_mark, ref_mark)
            ref_risk = np.sort(touched[_smallest(slack, k)])
            if got is None:
                declined += 1
                s = np.sort(slack)
                assert touched.size > k and s[k - 1] == s[k]
                continue
            kept += 1
            risk, got_capped = got
            assert risk.dtype == got_capped.dtype == np.int64
            assert np.array_equal(risk, ref_risk) and np.array_equal(got_capped, ref_capped)
    if n == 3000:
        assert declined and kept
    with pytest.raises(ValueError):
        _cpu_rows.in_band_risk(np.zeros(3, bool), np.zeros(0, np.int64), *np.zeros((4, 3)), np.zeros(3, bool), 3.0, 0,
                               np.zeros(3, np.int64))


def test_sorted_unique_equals_numpy_unique():
    """The step's rows: ``np.unique`` of the parts' concatenation (empty parts, repeats,
    one value)."""
    rng = np.random.default_rng(21)
    for trial in range(50):
        parts = [rng.integers(0, int(rng.choice([3, 50, 10**5])), int(rng.integers(0, 40))).astype(np.int64)
                 for _ in range(int(rng.integers(1, 8)))]
        got = _recovery._sorted_unique(parts)
        ref = np.unique(np.concatenate(parts))
        assert got.dtype == ref.dtype and np.array_equal(got, ref)
    assert _recovery._sorted_unique([np.zeros(0, np.int64)]).shape == (0,)


def test_ball_offsets_are_made_once_and_read_only():
    """The ball's offsets and rows are kept per radius and spacing (shared by watches) and
    cannot be written; a second watch gets the same arrays."""
    a = _recovery._ball_offsets(14.0, (2.0, 1.952, 1.952))
    b = _recovery._ball_offsets(14.0, (2.0, 1.952, 1.952))
    assert a[0] is b[0] and a[1] is b[1]
    assert not a[0].flags.writeable and not a[1].flags.writeable
    assert np.all(((a[0] * np.array([2.0, 1.952, 1.952])) ** 2).sum(axis=1) <= 14.0**2 + 1e-9)


@needs_numba
@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_scan_watch_equals_numpy(n):
    """A recovery step's pass over the watch: the violation, ``weight * viol**2`` (and its NumPy
    sum), the score, its argmax (the first of equal scores, the first NaN), whether a score is
    above 1e-6 and the voxels off each way, as the NumPy expressions give them; scores all
    zero, all blocked, and tied."""
    rng = np.random.default_rng(100 + n)
    for trial in range(20):
        dose, lo, hi, weight = _random_watch(rng, n)
        if trial % 4 == 1:
            dose = np.where(np.isnan(dose), 0.0, dose)  # no NaN: a proper argmax
        if trial % 4 == 2:
            dose = np.clip(np.nan_to_num(dose), np.maximum(lo, -1e9), np.minimum(hi, 1e9))  # all in band
        blocked = rng.random(n) < (0.0, 0.3, 1.0)[trial % 3]
        with np.errstate(invalid="ignore"):
            viol = np.maximum(np.maximum(lo - dose, dose - hi), 0.0)
            score = np.where(blocked, 0.0, weight * viol)
            cold = np.flatnonzero((score > 0) & (dose < lo))
            hot = np.flatnonzero((score > 0) & (dose > hi))
            big = bool(np.any(score > 1e-6))
            twin = _cpu_rows.scan_watch_numpy(dose, lo, hi, weight, blocked)
        got = _cpu_rows.scan_watch(dose, lo, hi, weight, blocked)
        assert np.array_equal(got[0], viol, equal_nan=True)
        assert np.array_equal(got[1], weight * viol**2, equal_nan=True)
        assert np.sum(got[1]) == np.sum(weight * viol**2) or np.isnan(np.sum(got[1]))
        assert np.array_equal(got[2], score, equal_nan=True)
        assert got[3] == (int(np.argmax(score)) if n else -1)
        assert got[4] == big
        assert np.array_equal(got[5], cold) and np.array_equal(got[6], hot)
        for a, b in zip(got, twin):
            assert np.array_equal(a, b, equal_nan=True)
    # Equal scores: the first.
    ones = np.ones(5)
    assert _cpu_rows.scan_watch(ones * 2, ones * 0, ones, ones, np.zeros(5, bool))[3] == 0


@needs_numba
def test_scan_watch_argmax_without_a_positive_score():
    """The argmax where no score is positive: negative weights (scores below zero, the largest far into the watch),
    -0.0 before 0.0, a NaN after them; the same as NumPy's."""
    rng = np.random.default_rng(7)
    for n in (1, 300, 3000):
        dose, lo, hi, weight = _random_watch(rng, n)
        dose = np.where(np.isnan(dose), 0.0, dose)
        weight = -rng.uniform(0.5, 2.0, n)
        blocked = np.zeros(n, bool)
        for case in range(3):
            if case == 1:  # -0.0 first (a voxel in band, negative weight), then 0.0 (blocked)
                dose[0], lo[0], hi[0] = 1.0, 0.0, 2.0
                blocked[n // 2] = True
            if case == 2:
                dose[n - 1] = np.nan
            got = _cpu_rows.scan_watch(dose, lo, hi, weight, blocked)
            with np.errstate(invalid="ignore"):
                twin = _cpu_rows.scan_watch_numpy(dose, lo, hi, weight, blocked)
            assert got[3] == twin[3] and got[4] == twin[4]
            for a, b in zip(got[:3] + got[5:], twin[:3] + twin[5:]):
                assert np.array_equal(a, b, equal_nan=True)


def test_one_switch_turns_every_compiled_host_loop_off(monkeypatch):
    """``kernels._cpu.HAVE_NUMBA`` is the only switch (``_cpu_rows`` has none of its own, its
    callers read ``_cpu``'s at each call): set False, the step's scan is the NumPy twin's."""
    assert not hasattr(_cpu_rows, "HAVE_NUMBA")
    called, reference = [], _cpu_rows.scan_watch_numpy

    def twin(*args):
        called.append(True)
        return reference(*args)

    monkeypatch.setattr(_cpu_rows, "scan_watch_numpy", twin)
    monkeypatch.setattr(_cpu, "HAVE_NUMBA", False)
    dose, lo, hi, weight = _random_watch(np.random.default_rng(2), 50)
    with np.errstate(invalid="ignore"):
        _cpu_rows.scan_watch(dose, lo, hi, weight, np.zeros(50, bool))
    assert called


@needs_numba
def test_pick_spread_equals_numpy(monkeypatch):
    """The cluster's voxels: the same indices as NumPy's greedy walk, on a lattice with the
    spacing's distance exactly (kept: not below it), empty and over-long orders."""
    rng = np.random.default_rng(4)
    coords = rng.integers(0, 12, (400, 3)) * np.array([3.0, 1.5, 1.5])
    for trial in range(60):
        order = rng.permutation(400)[: int(rng.integers(0, 60))].astype(np.int64)
        spacing, limit = float(rng.choice([0.0, 1.5, 3.0, 4.5])), int(rng.integers(0, 10))
        got = _pick_spread(order, coords, spacing, limit)
        with monkeypatch.context() as mp:
            _numpy_only(mp)
            ref = _pick_spread(order, coords, spacing, limit)
        assert got == ref and all(type(i) is int for i in got)


@needs_numba
def test_ball_rows_mark_the_offsets_voxels(monkeypatch):
    """The watched voxels within a radius of the columns: the ball's rows along x mark the
    same voxels as its offsets (anisotropic spacing, columns at the grid's edges, a sparse
    watch, radii with and without voxels on the sphere)."""
    rng = np.random.default_rng(12)
    rs = object.__new__(_Rows)
    rs.shape, rs.spacing = (20, 23, 26), np.array([3.0, 1.5, 1.25])
    rs.vox = np.sort(rng.choice(20 * 23 * 26, 4000, replace=False)).astype(np.int64)
    rs.index_zyx = np.stack(np.unravel_index(rs.vox, rs.shape), axis=-1).astype(np.int64)
    rs._balls, rs._ball_rows = {}, {}
    z = np.zeros(rs.vox.size)
    rs.watch = Watch(rs.vox, z, z, z, z, np.zeros(rs.vox.size, np.int32))
    for radius in (0.5, 3.0, 7.5, 14.0):
        cases = [rng.choice(rs.vox.size, int(rng.integers(1, 9)), replace=False) for _ in range(15)]
        for cols in cases + [[0, rs.vox.size - 1]]:  # the first and last watched voxels: at the grid's edges
            cols = np.asarray(cols, np.int64)
            got = rs.ball(cols, radius)
            with monkeypatch.context() as mp:
                _numpy_only(mp)
                ref = rs.ball(cols, radius)
            assert np.array_equal(got, ref)
        assert rs._ball_rows[radius] is not None
    assert _cpu_rows.ball_rows(np.array([[0, 0, -1], [0, 0, 1]])) is None  # not a row


@needs_numba
def test_capped_distances_from_the_base_equal_the_watch_tables():
    """The capped voxels' squared BEV distances and weights read from a base's tables and the
    extra voxels' equal ``_cpu.capped_distance2`` on the watch's spliced tables, bit for bit
    (voxels and columns some or every beam misses, columns among the extra voxels)."""
    rng = np.random.default_rng(13)
    n_beams, nb, ne = 4, 2000, 30
    tabs = []
    for n in (nb, ne):
        u = (rng.random((n_beams, n)) * 60).astype(np.float32)
        v = (rng.random((n_beams, n)) * 60).astype(np.float32)
        w = rng.random((n_beams, n)).astype(np.float32)
        miss = rng.random((n_beams, n)) < 0.15
        u[miss], v[miss], w[miss] = np.nan, np.inf, 0.0
        tabs.append((u, v, w))
    source = rng.permutation(nb + ne)[: nb + ne - 100].astype(np.int64)  # some base voxels left out
    watch_tabs = [np.concatenate([b, e], axis=1)[:, source] for b, e in zip(*tabs)]
    missed = np.flatnonzero(np.isinf(watch_tabs[1]).all(axis=0))
    for trial in range(30):
        cols = rng.choice(source.size, int(rng.integers(1, 9)), replace=False).astype(np.int64)
        if trial == 0 and missed.size:
            cols = missed[:2].astype(np.int64)
        capped = np.sort(rng.choice(source.size, 500, replace=False)).astype(np.int64)
        got = _cpu_rows.capped_distance2_source(tabs[0], tabs[1], source, capped, cols)
        ref = _cpu.capped_distance2(*watch_tabs, capped, cols)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_numpy_float32_exp_does_not_depend_on_the_position():
    """What the capped ranking's pruning rests on (``_Rows._top_capped`` computes the exact keys
    of a few voxels only): NumPy's float32 ``exp`` gives an element the same value in a
    (beams, n) block and in a gathered sub-block, at any offset and length (its SIMD loop and
    tail)."""
    rng = np.random.default_rng(31)
    for _ in range(60):
        n = int(rng.integers(1, 5000))
        x = (-rng.random((9, n)) * rng.choice([1.0, 10.0, 100.0, 120.0])).astype(np.float32)
        full = np.exp(x)
        idx = np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
        assert np.array_equal(np.exp(x[:, idx]), full[:, idx])
        for off in range(1, 9):
            assert np.array_equal(np.exp(x.ravel()[off : off + 37]), full.ravel()[off : off + 37])


def _bev_tables(rng, n_beams: int, n: int, miss: float = 0.15):
    """(u, v, w) (beams, n) float32 BEV tables, a fraction ``miss`` of (beam, voxel) pairs
    missed (u NaN, v +inf, w 0)."""
    u = (rng.random((n_beams, n)) * 60).astype(np.float32)
    v = (rng.random((n_beams, n)) * 60).astype(np.float32)
    w = rng.random((n_beams, n)).astype(np.float32)
    missed = rng.random((n_beams, n)) < miss
    u[missed], v[missed], w[missed] = np.nan, np.inf, 0.0
    return u, v, w


def _exact_keys(u, v, w, col_u, col_v, s2, room):
    """The capped ranking's ``sens / room`` as ``_Rows`` computes it with NumPy (its
    ``_capped_distance2`` and ``_capped_keys``, negated) for voxels at ``(u, v, w)`` ((beams,
    n) float32) and columns at ``(col_u, col_v)``."""
    skip = ~np.isfinite(col_v)
    d2 = np.full(u.shape, np.inf, np.float32)
    with np.errstate(invalid="ignore"):
        for j in range(col_u.shape[1]):
            dj = (u - col_u[:, j : j + 1]) ** 2 + (v - col_v[:, j : j + 1]) ** 2
            dj[skip[:, j]] = np.inf
            np.minimum(d2, dj, out=d2)
    d2 = np.where(np.isfinite(d2), d2, np.inf)
    sens = np.maximum(np.float32(0), (w * np.exp(-d2 / s2)).max(axis=0))
    return sens / room


@needs_numba
def test_capped_sens_bounds_hold():
    """The bounds of the capped ranking's keys hold to a relative 1e-5, read from a base's
    tables and extra voxels, with columns off some or every beam, a NaN u among them, voxels a
    beam misses; a non-finite weight: None."""
    rng = np.random.default_rng(32)
    n_beams, nb, ne = 5, 3000, 40
    base, extra = _bev_tables(rng, n_beams, nb), _bev_tables(rng, n_beams, ne)
    source = rng.permutation(nb + ne)[: nb + ne - 200].astype(np.int64)
    watch_tabs = [np.concatenate([b, e], axis=1)[:, source] for b, e in zip(base, extra)]
    for trial in range(40):
        cols = rng.choice(source.size, int(rng.integers(1, 9)), replace=False).astype(np.int64)
        capped = np.sort(rng.choice(source.size, 1500, replace=False)).astype(np.int64)
        s2 = float(rng.choice([2.0, 29.4, 400.0]))
        room = np.maximum(rng.uniform(-1, 5, capped.size), 0.02)
        col_u, col_v = (t[:, cols] for t in watch_tabs[:2])
        if trial % 5 == 1:  # a column off every beam's grid
            col_v[:, 0] = np.inf
        if trial % 5 == 2:  # a beam none of the columns is on; one with a NaN u among them
            col_v[1] = np.inf
            col_u[2, 0], col_v[2, 0] = np.nan, 5.0
        exact = _exact_keys(*(t[:, capped] for t in watch_tabs), col_u, col_v, s2, room)
        lower, upper = _cpu_rows.capped_sens_bounds(base, extra, source[capped], col_u, col_v, s2, room)
        # (below 1e-30, float32's exp nears its subnormals: those keys are far below any that
        # the ranking compares, which it checks)
        assert np.all(lower <= exact * (1 + 1e-5) + 1e-30) and np.all(upper >= exact * (1 - 1e-5) - 1e-30)
    bad = tuple(t.copy() for t in base)
    bad[2][0, 0] = np.inf
    assert _cpu_rows.capped_sens_bounds(bad, extra, np.arange(10), col_u, col_v, 29.4, np.ones(10)) is None


@needs_numba
def test_capped_candidates_hold_the_top_keys():
    """The pruned candidates (ceilings ``w / room``, bounds of the highest first): the same
    ``k``-th largest lower bound and the same voxels as the bounds of every voxel
    (:func:`capped_sens_bounds`), up to their exp's round-off at the cut, and every voxel of
    the exact top ``k`` among them, read from a base's tables and extra voxels, with columns
    off some beams; a NaN weight or room: None."""
    rng = np.random.default_rng(34)
    n_beams, nb, ne = 5, 12000, 40
    base, extra = _bev_tables(rng, n_beams, nb), _bev_tables(rng, n_beams, ne)
    w_top = tuple(t.max(axis=0) for t in (base[2], extra[2]))
    source = rng.permutation(nb + ne)[: nb + ne - 200].astype(np.int64)
    watch_tabs = [np.concatenate([b, e], axis=1)[:, source] for b, e in zip(base, extra)]
    for trial in range(30):
        k = int(rng.choice([1, 17, 64, 384]))
        cols = rng.choice(source.size, int(rng.integers(1, 9)), replace=False).astype(np.int64)
        capped = np.sort(rng.choice(source.size, int(rng.choice([2000, 9000])), replace=False)).astype(np.int64)
        s2 = float(rng.choice([2.0, 29.4, 400.0]))
        hi = rng.uniform(20, 40, source.size)
        dose = hi - rng.uniform(-1, 5, source.size)
        room = np.maximum(hi[capped] - dose[capped], 0.02)
        col_u, col_v = (t[:, cols] for t in watch_tabs[:2])
        if trial % 5 == 2:  # a beam none of the columns is on
            col_v[1] = np.inf
        at, kth = _cpu_rows.capped_candidates(base, extra, w_top, source, capped, col_u, col_v, s2, hi, dose, k)
        lower, upper = _cpu_rows.capped_sens_bounds(base, extra, source[capped], col_u, col_v, s2, room)
        kth_ref = np.partition(lower, lower.size - k)[lower.size - k]
        assert abs(kth - kth_ref) <= 1e-6 * kth_ref
        ref = upper >= kth_ref * (1.0 - 1e-3)
        got = np.zeros(capped.size, bool)
        got[at] = True
        assert np.all(np.diff(at) > 0)
        sliver = np.abs(upper / (kth_ref * (1.0 - 1e-3)) - 1.0) < 1e-5
        assert np.all((got == ref) | sliver)
        exact = _exact_keys(*(t[:, capped] for t in watch_tabs), col_u, col_v, s2, room)
        assert np.all(got[np.argsort(-exact, kind="stable")[:k]])
    bad = (base[0], base[1], base[2].copy())
    bad[2][0, source[capped[0]]] = np.nan
    w_bad = (bad[2].max(axis=0), w_top[1])
    assert _cpu_rows.capped_candidates(bad, extra, w_bad, source, capped, col_u, col_v, 29.4, hi, dose, 64) is None
    dose[capped[5]] = np.nan  # a NaN room
    assert _cpu_rows.capped_candidates(base, extra, w_top, source, capped, col_u, col_v, 29.4, hi, dose, 64) is None


def _capped_rows(rng, n: int, n_beams: int = 4) -> _Rows:
    """A row helper on its own BEV tables (no watch): what ``_Rows._top_capped`` reads."""
    rs = object.__new__(_Rows)
    rs.bev_u2, rs.bev_v2, rs.bev_w2 = _bev_tables(rng, n_beams, n)
    rs.reach_cells = 16.0
    rs.hi_solve = rng.uniform(20, 40, n)
    return rs


@needs_numba
def test_top_capped_equals_smallest(monkeypatch):
    """The capped ranking's top ``k``, pruned by the bounds: the same set as every key and
    ``_smallest`` (and the NumPy path), with the pruning taken (a few hundred exact keys) and
    the fall-backs: the ``k``-th key tied with the next (identical voxels), every key zero
    (a column off every beam), few voxels, ``k`` 0."""
    rng = np.random.default_rng(33)
    n = 3000
    rs = _capped_rows(rng, n)
    sizes = []
    keys_of = _Rows._capped_keys

    def recorded(self, capped, cols, dose):
        sizes.append(capped.size)
        return keys_of(self, capped, cols, dose)

    monkeypatch.setattr(_Rows, "_capped_keys", recorded)
    pruned = tied = 0
    for trial in range(40):
        k = int(rng.choice([0, 1, 17, 64, 384]))
        cols = rng.choice(n, int(rng.integers(1, 9)), replace=False).astype(np.int64)
        capped = np.sort(rng.choice(n, int(rng.choice([10, 1000, 2900])), replace=False)).astype(np.int64)
        dose = np.round(rs.hi_solve - rng.uniform(-1, 4, n), 1)  # rooms clipped at 0.02, tied rooms
        u, v, w = rs.bev_u2.copy(), rs.bev_v2.copy(), rs.bev_w2.copy()
        tie = trial % 4 == 1 and 1 < k < capped.size // 4
        if tie:  # the top 2 k voxels identical: at a column, w 1, room 0.02
            same = capped[: 2 * k]
            rs.bev_u2[:, same], rs.bev_v2[:, same] = rs.bev_u2[:, cols[:1]], rs.bev_v2[:, cols[:1]]
            rs.bev_w2[:, same] = 1.0
            dose[same] = rs.hi_solve[same] + 1.0
        off = trial % 4 == 2
        if off:  # every column off every beam: every key 0
            rs.bev_v2[:, cols] = np.inf
        sizes.clear()
        got = rs._top_capped(capped, cols, dose, k)
        n_calls = len(sizes)
        ref = capped[_smallest(rs._capped_keys(capped, cols, dose), k)]
        assert np.array_equal(np.sort(got), np.sort(ref))
        # (NumPy's distances warn of inf - inf: a column off a beam and a voxel the beam misses)
        with monkeypatch.context() as mp, np.errstate(invalid="ignore"):
            _numpy_only(mp)
            assert np.array_equal(np.sort(rs._top_capped(capped, cols, dose, k)), np.sort(ref))
        if tie:  # the exact keys of the few, then all of them
            assert sizes[:n_calls] == [sizes[0], capped.size] and sizes[0] < capped.size
            tied += 1
        elif n_calls == 0 or (n_calls == 1 and sizes[0] < capped.size):  # (none: exactly k left)
            pruned += 1
        elif not off and capped.size > 4 * k > 0:  # pruning falls back only where keys are tiny
            assert np.sort(keys_of(rs, capped, cols, dose))[k - 1] > -2e-20
        rs.bev_u2, rs.bev_v2, rs.bev_w2 = u, v, w
    assert pruned >= 5 and tied >= 2


@needs_numba
@pytest.mark.parametrize("w_far", [1.0, 1e38])
def test_top_capped_near_float32_subnormals(w_far):
    """Two beams whose exponents lie near float32 ``exp``'s subnormals (-101 to -104), so the
    relative bounds fail: with weights about 1 every key is below 1e-20 (the ranking computes
    every key), and with a weight of 1e38 on one beam the keys are large but built on
    subnormal ``exp`` terms (the bounds refuse: weights must be below 1e15). Either way the
    same set as every key and ``_smallest`` (found in review: a guard at ``kth > 0``, or no
    weight limit, swapped one or two voxels)."""
    rng = np.random.default_rng(2)
    n = 20000
    if w_far == 1.0:
        q = -rng.uniform(101, 104, (2, n)).astype(np.float32)
        q[1] = q[0] - rng.uniform(0, 0.02, n).astype(np.float32)
    else:
        q = -rng.uniform(99, 104, (2, n)).astype(np.float32)
        q[1] = q[0] - rng.uniform(0, 0.3, n).astype(np.float32)
    u = np.sqrt(-q).astype(np.float32)
    w = np.ones((2, n), np.float32)
    if w_far == 1.0:
        w[0] = 0.5
    else:
        w[1] = w_far
    rs = object.__new__(_Rows)
    rs.bev_u2 = np.concatenate([u, np.zeros((2, 1), np.float32)], 1)
    rs.bev_v2 = np.zeros_like(rs.bev_u2)
    rs.bev_w2 = np.concatenate([w, np.zeros((2, 1), np.float32)], 1)
    rs.reach_cells = 3.0 * np.sqrt(0.5)  # s2 = 1: exp(-d2) = exp(q)
    rs.hi_solve = np.full(n + 1, 1.0)
    dose = np.full(n + 1, 0.98)
    capped, cols = np.arange(n), np.array([n])
    for k in (10, 100, 384, 1000):
        with np.errstate(over="ignore", invalid="ignore"):
            got = rs._top_capped(capped, cols, dose, k)
            ref = capped[_smallest(rs._capped_keys(capped, cols, dose), k)]
        assert np.array_equal(np.sort(got), np.sort(ref))


@needs_numba
def test_gather_composed_equals_numpy():
    """A composed watch's dose: ``concatenate([base, extra])[source]`` as float64."""
    rng = np.random.default_rng(6)
    for nb, ne in ((0, 0), (5, 0), (0, 4), (300, 20)):
        base, extra = rng.random(nb).astype(np.float32), rng.random(ne).astype(np.float32)
        source = rng.integers(0, max(nb + ne, 1), 50 if nb + ne else 0).astype(np.int64)
        got = _cpu_rows.gather_composed(base, extra, source)
        assert got.dtype == np.float64
        assert np.array_equal(got, np.take(np.concatenate([base, extra]), source).astype(np.float64))


@pytest.fixture
def s(shaping_session):
    return shaping_session


def _request_watch(s):
    """A voxel on the OAR's rim set to 55 % of the prescription: its watch and the request."""
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    m = (int(c[0]), int(np.flatnonzero(oar[c[0], :, c[2]]).min()), int(c[2]))
    resolved = resolve(SetVoxelDose(m, 0.55 * RX), s.resolve_context())
    return s.build_watch(resolved), resolved


@needs_numba
@pytest.mark.parametrize("max_rows_capped", [64, 384])
def test_select_fast_equals_numpy_on_a_real_watch(s, monkeypatch, max_rows_capped):
    """A step's rows with every compiled loop on and with none: the same rows, for clusters of
    1-8 voxels across the watch (the capped voxels ranked, and not when there are few)."""
    watch, _ = _request_watch(s)
    rows = _Rows(s.modifier, watch, RecoveryOptions(max_rows_capped=max_rows_capped))
    rng = np.random.default_rng(21)
    dose = s.dose().reshape(-1)[rows.vox].astype(np.float64) * (1 + 0.05 * rng.standard_normal(rows.vox.size))
    viol = watch.violation(dose)
    assert "_bev_source" in rows.__dict__  # a watch on the session's base: its BEV tables not made
    for _ in range(12):
        cols = rng.choice(rows.vox.size, int(rng.integers(1, 9)), replace=False).astype(np.int64)
        got = rows.select(cols, dose, viol)
        assert "bev_u2" not in rows.__dict__
        with monkeypatch.context() as mp:
            _numpy_only(mp)
            ref = rows.select(cols, dose, viol)  # makes the watch's tables
        assert got.dtype == ref.dtype and np.array_equal(got, ref)
        assert np.array_equal(rows.select(cols, dose, viol), ref)  # compiled, on the watch's tables
        for name in ("bev_u2", "bev_v2", "bev_w2", "bev_u", "bev_v", "bev_w"):
            rows.__dict__.pop(name, None)


@needs_numba
@pytest.mark.parametrize("focused", [False, True])
def test_recover_fast_equals_numpy(s, monkeypatch, focused):
    """A whole recovery (after a modification of the request's voxel), with every compiled loop
    on and with none, from the same plan state: the same steps, chosen voxels, objectives,
    best state and final dose, focused on part of the watch or not."""
    watch, resolved = _request_watch(s)
    focus = None
    if focused:
        focus = np.zeros(watch.voxels.size, bool)
        focus[::3] = True
    eng = s.engine
    snap = eng.snapshot()
    s.modifier.modify(resolved.voxels, resolved.target_gy)
    start = eng.snapshot()  # some voxels off their band
    results = []
    for numpy_only in (False, True):
        eng.restore(start)
        with monkeypatch.context() as mp:
            if numpy_only:
                _numpy_only(mp)
            results.append(recover(s.modifier, watch, steps=6, focus=focus))
    eng.restore(snap)
    got, ref = results
    assert got.steps == ref.steps and got.best_step == ref.best_step
    assert np.array_equal(got.voxels, ref.voxels) and np.array_equal(got.accepted, ref.accepted)
    assert np.array_equal(got.objective, ref.objective) and np.array_equal(got.final_gy, ref.final_gy)
    assert got.remaining_candidates == ref.remaining_candidates
    assert got.steps > 0


def _cold(s, watch) -> None:
    """Every cache a recovery fills cleared (row tables, base tables, neighbour tables and read-out memos)."""
    watch.__dict__.pop("_rows_cache", None)
    watch.__dict__.pop("_dose_memo", None)
    s.modifier.__dict__.pop("_base_rows_cache", None)
    s.engine.__dict__.pop("_neighbour_cache", None)
    comp = watch.__dict__.get("_composition")
    if comp is not None:
        comp.base.memo.clear()


def _modified(s):
    """The request's watch, after its modification: (watch, engine, the snapshot before, the
    snapshot after the modification, where each recovery starts)."""
    watch, resolved = _request_watch(s)
    eng = s.engine
    snap = eng.snapshot()
    s.modifier.modify(resolved.voxels, resolved.target_gy)
    return watch, eng, snap, eng.snapshot()


def test_recover_from_cold_caches_equals_numpy(shaping_session, monkeypatch):
    """The compiled and the NumPy recovery, each from cold caches (nothing the other built)."""
    s = shaping_session
    watch, eng, snap, start = _modified(s)
    res = []
    for numpy_only in (False, True):
        eng.restore(start)
        _cold(s, watch)
        with monkeypatch.context() as mp:
            if numpy_only:
                _numpy_only(mp)
            res.append(recover(s.modifier, watch, steps=8))
    eng.restore(snap)
    _cold(s, watch)
    got, ref = res
    assert got.steps == ref.steps and got.best_step == ref.best_step
    assert np.array_equal(got.voxels, ref.voxels) and np.array_equal(got.accepted, ref.accepted)
    assert np.array_equal(got.objective, ref.objective) and np.array_equal(got.final_gy, ref.final_gy)


def test_rejected_voxels_are_not_chosen_again_on_both_paths(shaping_session, monkeypatch):
    """Every step rejected: each voxel is tried once, inside the focus when one is given, and
    the compiled and the NumPy steps choose the same voxels."""
    s = shaping_session
    watch, eng, snap, start = _modified(s)

    def reject(self, modifier, rows, cols, dirs, dose, **kw):
        return [], types.SimpleNamespace(accepted=False, proposed=False, watch_after_gy=dose)

    monkeypatch.setattr(_recovery._Rows, "solve", reject)
    focus = np.zeros(watch.voxels.size, bool)
    focus[::2] = True
    out = []
    for numpy_only in (False, True):
        for f in (None, focus):
            eng.restore(start)
            with monkeypatch.context() as mp:
                if numpy_only:
                    _numpy_only(mp)
                r = recover(s.modifier, watch, steps=10, focus=f)
            out.append(r.voxels)
            assert r.voxels.size and len(set(r.voxels.tolist())) == r.voxels.size
            if f is not None:
                assert np.isin(np.searchsorted(watch.voxels, r.voxels), np.flatnonzero(focus)).all()
    eng.restore(snap)
    assert np.array_equal(out[0], out[2]) and np.array_equal(out[1], out[3])
