"""The search for the voxels under a step's patches and the ball around its columns mark the
same voxels as their references: the search of u-ordered rows (skipping the v test in the
rows strictly inside the box where a beam's rows are whole, marking at table indices and
copying run by run into watch positions) against the scan of whole rows, on tables with
voxels on the box's edges, NaN positions, rows clipped at +-32000 and NaN v (whose row the
NumPy cast leaves undefined); the ball's span of marks against the marks themselves."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.kernels import _cpu, _cpu_rows

needs_numba = pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")


def _tables(rng, kind: str, n_beams: int = 4, n: int = 2500):
    """BEV positions (beams, n) float32 and their row tables as ``_Rows._fill_beam``'s NumPy
    path makes them (u NaN / v +inf where a beam misses a voxel), the reach, and the voxels
    no beam reaches. ``kind``: "plain", "lattice" (quarter cells and a whole reach: voxels on
    the box's edges), "nan_v" (some v NaN), "clipped" (v around 32000 and -32000, beyond the
    clipped rows)."""
    u = (rng.random((n_beams, n)) * 120 - 10).astype(np.float32)
    v = (rng.random((n_beams, n)) * 120 - 10).astype(np.float32)
    reach = 9.0 + float(rng.random())
    if kind == "lattice":
        u, v = np.round(u * 4) / np.float32(4), np.round(v * 4) / np.float32(4)
        reach = 9.0
    elif kind == "clipped":
        side = np.where(rng.random((n_beams, n)) < 0.5, np.float32(32000), np.float32(-32000))
        v = (side + (rng.random((n_beams, n)) * 40 - 20)).astype(np.float32)
        reach = 25.0
    miss = rng.random((n_beams, n)) < 0.1
    u[miss], v[miss] = np.nan, np.inf
    miss_all = rng.choice(n, 20, replace=False)
    u[:, miss_all], v[:, miss_all] = np.nan, np.inf
    if kind == "nan_v":
        v[rng.random((n_beams, n)) < 0.05] = np.nan
    out = miss | np.isin(np.arange(n), miss_all)[None]
    order = np.empty((n_beams, n), np.int64)
    rows = np.empty((n_beams, n), np.int16)
    with np.errstate(invalid="ignore"):
        key = np.where(out, np.iinfo(np.int16).max, np.clip(np.floor(v), -32000, 32000)).astype(np.int16)
    for b in range(n_beams):
        order[b] = np.argsort(key[b], kind="stable")
        rows[b] = key[b][order[b]]
    bu = np.take_along_axis(u, order, axis=1)
    bv = np.take_along_axis(v, order, axis=1)
    return u, v, (order, rows, bu, bv), reach, miss_all


def _u_sorted(tables):
    order, rows, bu, bv = (t.copy() for t in tables)
    whole = np.array([_cpu.sort_rows_by_u(rows[b], order[b], bu[b], bv[b]) for b in range(rows.shape[0])])
    return (order, rows, bu, bv), whole


@needs_numba
@pytest.mark.parametrize("kind", ["plain", "lattice", "nan_v", "clipped"])
def test_search_of_whole_rows_marks_the_voxels_of_the_scan(kind):
    rng = np.random.default_rng({"plain": 1, "lattice": 2, "nan_v": 3, "clipped": 4}[kind])
    u, v, tables, reach, miss_all = _tables(rng, kind)
    sorted_tables, whole = _u_sorted(tables)
    # A table from the floor of v has whole rows; a NaN v (row 0 or another in range) does not.
    assert whole.all() if kind != "nan_v" else not whole.all()
    n = u.shape[1]
    cases = [rng.choice(n, int(rng.integers(1, 10)), replace=False) for _ in range(80)]
    cases += [miss_all[:3], np.concatenate([miss_all[:2], [5, 17]]), np.array([7]), np.zeros(0, np.int64)]
    marked = 0
    for cols in cases:
        cols = np.asarray(cols, np.int64)
        scan = np.zeros(n, bool)
        _cpu.mark_under_patches(u, v, *tables, cols, reach, scan)
        for flags in (whole, None, np.zeros_like(whole)):
            for starts in (None, _cpu.row_starts(sorted_tables[1])):
                got = np.zeros(n, bool)
                _cpu.mark_under_patches(u, v, *sorted_tables, cols, reach, got, u_sorted=True, whole_rows=flags,
                                        row_starts=starts)
                assert np.array_equal(got, scan)
        marked += int(scan.sum())
    assert 0 < marked < len(cases) * n  # the cases mark some voxels, not all


@needs_numba
def test_whole_rows_need_every_row_in_range_to_be_the_floor_of_v():
    rows = np.array([-32000, -5, -5, 0, 3, 32000, 32767], np.int16)
    v = np.array([-40000, -4.5, -5, 0.99, 3, 32500, np.inf], np.float32)
    order = np.arange(7, dtype=np.int64)
    u = np.zeros(7, np.float32)
    assert _cpu.sort_rows_by_u(rows.copy(), order.copy(), u.copy(), v.copy())  # the clipped rows not read
    for i, bad in ((1, -3.9), (3, 1.0), (4, np.nan), (2, -5.0000005)):
        w = v.copy()
        w[i] = bad
        assert not _cpu.sort_rows_by_u(rows.copy(), order.copy(), u.copy(), w)


@needs_numba
def test_row_starts_are_the_searches_of_the_rows():
    rng = np.random.default_rng(8)
    for kind in ("plain", "clipped"):
        rows = _tables(rng, kind)[2][1]
        starts, k_lo = _cpu.row_starts(rows)
        keys = np.arange(k_lo, int(rows.max()) + 2)
        assert starts.shape == (rows.shape[0], keys.size) and starts.dtype == np.int64
        for b in range(rows.shape[0]):
            assert np.array_equal(starts[b], np.searchsorted(rows[b], keys, side="left"))
    empty = _cpu.row_starts(np.zeros((3, 0), np.int16))
    assert empty[0].shape == (3, 0)


def _runs_ref(remap: np.ndarray) -> np.ndarray:
    runs, t, n = [], 0, remap.size
    while t < n:
        if remap[t] < 0:
            t += 1
            continue
        e = t + 1
        while e < n and remap[e] == remap[e - 1] + 1:
            e += 1
        runs.append((t, remap[t], e - t))
        t = e
    return np.array(runs, np.int64).reshape(-1, 3)


@needs_numba
def test_remap_runs_are_the_maximal_runs_of_the_map():
    rng = np.random.default_rng(5)
    cases = [np.zeros(0, np.int64), np.array([-1]), np.array([0]), np.array([5, 6, 7, -1, 8, 9, 2, 3, 3, 4, -1, -1, 0])]
    for _ in range(300):
        k = int(rng.integers(0, 60))
        cases.append(rng.integers(-1, 6, k))
        keep = rng.random(k) > 0.2  # a watch's map of its base: increasing, gaps where extra voxels sit
        at = np.cumsum(keep) - 1 + np.cumsum(rng.random(k) < 0.1)
        cases.append(np.where(keep, at, -1))
    for remap in cases:
        got = _cpu.remap_runs(remap)
        assert got.dtype == np.int64 and np.array_equal(got, _runs_ref(np.asarray(remap, np.int64)))


@needs_numba
@pytest.mark.parametrize("kind", ["plain", "lattice"])
def test_marks_copied_by_runs_are_the_marks_mapped_voxel_by_voxel(kind):
    rng = np.random.default_rng(6)
    u, v, tables, reach, _ = _tables(rng, kind)
    sorted_tables, whole = _u_sorted(tables)
    n = u.shape[1]
    for _ in range(40):
        keep = rng.random(n) > 0.05  # the base voxels a watch keeps, between its extra voxels
        remap = np.where(keep, np.cumsum(keep) - 1 + np.cumsum(rng.random(n) < 0.02), -1).astype(np.int64)
        size = int(remap.max()) + 3
        cols = rng.choice(n, int(rng.integers(1, 8)), replace=False)
        base = np.zeros(n, bool)
        _cpu.mark_under_patches(u, v, *sorted_tables, cols, reach, base, u_sorted=True, whole_rows=whole)
        ref = rng.random(size) < 0.01  # marks already set stay set
        got = ref.copy()
        at = remap[np.flatnonzero(base)]
        ref[at[at >= 0]] = True
        _cpu.mark_under_patches(u, v, *sorted_tables, cols, reach, got, u_sorted=True, runs=_cpu.remap_runs(remap),
                                whole_rows=whole, row_starts=_cpu.row_starts(sorted_tables[1]))
        assert np.array_equal(got, ref)
    with pytest.raises(ValueError, match="u_sorted"):
        _cpu.mark_under_patches(u, v, *tables, cols, reach, np.zeros(n, bool), whole_rows=whole)
    # Tables of another watch: refused with the field named, nothing marked.
    mark = np.zeros(n, bool)
    with pytest.raises(ValueError, match="whole_rows"):
        _cpu.mark_under_patches(u, v, *sorted_tables, cols, reach, mark, u_sorted=True, whole_rows=whole[:-1])
    starts, k_lo = _cpu.row_starts(sorted_tables[1])
    with pytest.raises(ValueError, match="row_starts"):
        _cpu.mark_under_patches(u, v, *sorted_tables, cols, reach, mark, u_sorted=True, row_starts=(starts[:, :-1], k_lo))
    for bad in ([[0, 0, n + 1]], [[0, size, 1]], [[-1, 0, 1]]):
        with pytest.raises(ValueError, match="runs"):
            _cpu.mark_under_patches(u, v, *sorted_tables, cols, reach, np.zeros(size, bool), u_sorted=True,
                                    runs=np.array(bad, np.int64))
    assert not mark.any()


@needs_numba
def test_ball_marks_lie_in_the_span_it_returns():
    rng = np.random.default_rng(7)
    shape = (9, 14, 11)
    n_all = int(np.prod(shape))
    vox = np.sort(rng.choice(n_all, n_all // 3, replace=False)).astype(np.int64)
    index_zyx = np.stack(np.unravel_index(vox, shape), axis=-1).astype(np.int64)
    offs = np.array([(z, y, x) for z in (-1, 0, 1) for y in (-1, 0, 1) for x in range(-2, 3)], np.int64)
    rows = _cpu_rows.ball_rows(offs)
    for cols in [np.zeros(0, np.int64), np.array([0]), np.array([vox.size - 1])] + [
            rng.choice(vox.size, int(rng.integers(1, 6)), replace=False) for _ in range(40)]:
        mark = np.zeros(vox.size, bool)
        first, stop = _cpu_rows.ball_row_marks(index_zyx, cols, rows, shape, vox, mark)
        at = np.flatnonzero(mark)
        if not cols.size:
            assert first >= stop and not at.size
        else:
            assert at[0] == first and at[-1] == stop - 1
