"""The row tables of a watch's base are ordered by u within each BEV row (``_BaseRows``), so
the compiled search for the voxels under a solve's patches reads only the patches' box in each
row: it marks the same voxels as the scan of whole rows and as the NumPy reference, including
voxels on the box's edges, NaN positions (voxels a beam misses) and columns a beam misses."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.kernels import _cpu
from tests.kernels.test_cpu_select import _fake_rows

needs_numba = pytest.mark.skipif(not _cpu.HAVE_NUMBA, reason="numba is not installed (the 'fast' extra)")


@needs_numba
def test_rows_ordered_by_u_keep_each_row_and_its_voxels():
    rng = np.random.default_rng(2)
    rs, _ = _fake_rows(rng, lattice=True)
    for b in range(rs._rows2.shape[0]):
        rows, order = rs._rows2[b].copy(), rs._order2[b].copy()
        bu, bv = rs._bu_sorted2[b].copy(), rs._bv_sorted2[b].copy()
        assert _cpu.sort_rows_by_u(rows, order, bu, bv)
        assert np.array_equal(rows, rs._rows2[b])  # the rows themselves do not move
        assert np.array_equal(np.sort(order), np.sort(rs._order2[b]))  # a permutation...
        # ...that carries each voxel's u and v with it
        assert np.array_equal(bu, rs.bev_u2[b][order], equal_nan=True)
        assert np.array_equal(bv, rs.bev_v2[b][order])
        for r in np.unique(rows):
            seg = bu[rows == r]
            fin = seg[~np.isnan(seg)]
            assert np.all(np.diff(fin) >= 0)  # ordered by u...
            assert not np.isnan(seg[: fin.size]).any()  # ...NaN last
            # stable: equal u keep their row order (the voxel index order of a counting sort)
            o = order[rows == r][: fin.size]
            same = np.flatnonzero(np.diff(fin) == 0)
            assert np.all(o[same] < o[same + 1])


@needs_numba
@pytest.mark.parametrize("lattice", [False, True])
def test_search_of_u_ordered_rows_marks_the_voxels_of_the_scan(monkeypatch, lattice):
    rng = np.random.default_rng(17)
    rs, miss_all = _fake_rows(rng, lattice=lattice)
    sorted_rs, _ = _fake_rows(np.random.default_rng(17), lattice=lattice)  # the same tables
    sorted_rs._whole_rows = np.array([_cpu.sort_rows_by_u(sorted_rs._rows2[b], sorted_rs._order2[b],
                                                          sorted_rs._bu_sorted2[b], sorted_rs._bv_sorted2[b])
                                      for b in range(sorted_rs._rows2.shape[0])])
    assert sorted_rs._whole_rows.all()  # (the rows of the v test the search skips inside the box)
    sorted_rs._row_starts = _cpu.row_starts(sorted_rs._rows2)
    sorted_rs._u_sorted = True
    cases = [rng.choice(rs.vox.size, int(rng.integers(1, 10)), replace=False) for _ in range(60)]
    cases += [miss_all[:3], np.concatenate([miss_all[:2], [5, 17]]), np.array([7])]
    marked = 0
    for cols in cases:
        cols = np.asarray(cols, np.int64)
        scan = rs._under_patches(cols)
        got = sorted_rs._under_patches(cols)
        with monkeypatch.context() as m:
            m.setattr(_cpu, "HAVE_NUMBA", False)
            ref = rs._under_patches(cols)
        assert np.array_equal(got, scan) and np.array_equal(got, ref)
        marked += int(got.sum())
    assert 0 < marked < len(cases) * rs.vox.size  # the cases mark some voxels, not all


@needs_numba
def test_a_watch_on_a_base_searches_u_ordered_rows():
    """The base's tables are ordered by u once, and every watch built on it uses them."""
    from ids_engine.phantoms import PHANTOMS  # noqa: F401  (the coarse session below)
    from ids_engine.session import Session
    from ids_engine.dmr import SetVoxelDose
    from ids_engine.dmr import _recovery as R

    s = Session.from_phantom("horseshoe", "coarse", prescription_gy=60.0)
    seen = []
    orig = R._Rows._under_patches

    def spy(self, cols):
        seen.append((self._u_sorted, self))
        return orig(self, cols)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(R._Rows, "_under_patches", spy)
    try:
        oar = s.patient.structure("OAR").mask
        k, j, i = (int(v) for v in np.argwhere(oar).mean(axis=0).round())
        j = int(np.flatnonzero(oar[k, :, i]).min())
        s.run(SetVoxelDose((k, j, i), 33.0), recovery_steps=2)
    finally:
        monkeypatch.undo()
    assert seen and all(u for u, _ in seen)
    rs = seen[0][1]
    nb = rs._split[1]
    for cols in (np.array([0]), np.arange(0, rs.vox.size, max(rs.vox.size // 7, 1))):
        a, c = np.zeros(nb, bool), np.zeros(nb, bool)
        args = (rs.bev_u2, rs.bev_v2, rs._order2, rs._rows2, rs._bu_sorted2, rs._bv_sorted2, cols, rs.reach_cells)
        _cpu.mark_under_patches(*args, a, u_sorted=True, whole_rows=rs._whole_rows, row_starts=rs._row_starts)
        _cpu.mark_under_patches(*args, c, u_sorted=False)
        assert np.array_equal(a, c) and a.any()
    assert rs._whole_rows.shape == (rs._rows2.shape[0],) and rs._whole_rows.all()  # the base's rows are whole


@needs_numba
def test_compiled_ball_finds_the_watched_voxels_of_the_numpy_look_up(monkeypatch):
    """The voxels within a radius of the columns: compiled (each offset point searched in the
    sorted watch) and NumPy (all points, then ``Watch.locate``) give the same watch positions,
    for columns at the grid's edges and corners and a sparse, unevenly sampled watch."""
    from ids_engine.dmr._recovery import _Rows

    rng = np.random.default_rng(4)
    shape = (9, 14, 11)
    n_all = int(np.prod(shape))
    vox = np.sort(rng.choice(n_all, n_all // 3, replace=False)).astype(np.int64)
    rs = object.__new__(_Rows)
    rs.vox, rs.shape, rs.spacing = vox, shape, np.array([2.5, 1.9, 1.9])
    rs.index_zyx = np.stack(np.unravel_index(vox, shape), axis=-1).astype(np.int64)
    rs._balls = {}
    rs._ball_rows = {}

    class W:  # what ball reads of the watch
        voxels = vox

        @staticmethod
        def locate(flat):
            at = np.minimum(np.searchsorted(vox, flat), vox.size - 1)
            return at, vox[at] == flat

    rs.watch = W()
    corner = [int(np.argmin(vox)), int(np.argmax(vox))]
    for cols in [np.array(corner)] + [rng.choice(vox.size, int(rng.integers(1, 9)), replace=False) for _ in range(30)]:
        for radius in (3.0, 6.5):
            got = rs.ball(cols, radius)
            with monkeypatch.context() as m:  # every compiled host loop off: the NumPy look-up
                m.setattr(_cpu, "HAVE_NUMBA", False)
                ref = rs.ball(cols, radius)
            assert got.dtype == ref.dtype == np.int64
            assert np.array_equal(got, ref) and np.all(np.isin(cols, got))
