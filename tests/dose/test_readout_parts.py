"""``delta_matrix(..., beam_parts=True)``: each beam's part of each column, bit for bit what a
per-beam solve's own read-out gives (its columns hold one beam's patch each), and the joint
result unchanged; with and without the compiled loops, on the coarse horseshoe's geometry and
DMR normalised patches of both signs."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import FluencePatch
from ids_engine.kernels import _cpu


@pytest.fixture(params=["numba", "numpy"])
def compiled(request, monkeypatch):
    """The read-out with numba's loops (where installed) or with its NumPy references only."""
    if request.param == "numba" and not _cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed (the 'fast' extra)")
    if request.param == "numpy":
        monkeypatch.setattr(_cpu, "HAVE_NUMBA", False)
    return request.param


@pytest.fixture
def s(coarse_horseshoe_session, compiled):
    eng = coarse_horseshoe_session.engine
    eng.__dict__.pop("_neighbour_cache", None)  # level look-ups and read-outs of the other path
    yield coarse_horseshoe_session
    eng.__dict__.pop("_neighbour_cache", None)


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _columns(s) -> list[list[FluencePatch]]:
    """Normalised patches (every beam) of target and OAR voxels, raising and lowering, and one
    column with some beams' patches left out (their stacks then skip it: not consecutive)."""
    mod = s.modifier
    target = np.flatnonzero(s.target_mask.reshape(-1))
    oar = np.flatnonzero(np.asarray(s.patient.structure("OAR").mask).reshape(-1))
    rng = np.random.default_rng(11)
    cols = []
    for v, raise_dose in ((rng.choice(target), False), (rng.choice(oar), True), (rng.choice(target), True),
                          (rng.choice(oar), False), (rng.choice(target), False)):
        ps = mod.normalised_patches(int(v), raise_dose=raise_dose)
        if ps:
            cols.append(ps)
    cols.insert(2, [p for p in cols[0] if p.beam % 3 != 1])
    assert len(cols) >= 5 and any(len(c) < s.engine.n_beams for c in cols)
    return cols


def _rows(s, n: int, seed: int) -> np.ndarray:
    """Body voxels near the target and a few voxels outside the body (they read 0)."""
    rng = np.random.default_rng(seed)
    body = np.asarray(s.engine.body_mask).reshape(-1)
    inside = np.flatnonzero(body)
    outside = np.flatnonzero(~body)
    return np.concatenate([rng.choice(inside, n, replace=False), rng.choice(outside, 4, replace=False)]).astype(np.int64)


def test_beam_parts_are_the_per_beam_columns_read_out_bit_for_bit(s):
    eng = s.engine
    cols = _columns(s)
    rows = _rows(s, 300, 1)
    joint = np.asarray(eng.delta_matrix(cols, rows))
    got, parts = eng.delta_matrix(cols, rows, beam_parts=True)
    np.testing.assert_array_equal(_bits(got), _bits(joint))
    assert parts.shape == (eng.n_beams, rows.size, len(cols)) and parts.dtype == np.float32
    # The per-beam solve's columns: each column's beam parts as columns of their own, in order
    # (a beam's columns are then not consecutive).
    per_beam = [[p] for col in cols for p in col]
    where = [(int(p.beam), k) for k, col in enumerate(cols) for p in col]
    g = np.asarray(eng.delta_matrix(per_beam, rows))
    held = np.zeros((eng.n_beams, len(cols)), bool)
    for j, (b, k) in enumerate(where):
        np.testing.assert_array_equal(_bits(parts[b][:, k]), _bits(g[:, j]))
        held[b, k] = True
    assert not np.any(parts.transpose(0, 2, 1)[~held])  # no patch of beam b in column k: 0
    assert not np.any(parts[:, -4:, :])  # outside the body: 0
    assert np.all(np.abs(parts[held.nonzero()[0], :, held.nonzero()[1]]).max(axis=1) > 0)
    # The joint read-out adds the same floats: close to the parts' sum (not its bits).
    np.testing.assert_allclose(parts.sum(axis=0), joint, rtol=1e-5, atol=1e-6 * np.abs(joint).max())


def test_beam_parts_of_one_column_are_its_one_patch_read_outs(s):
    """One column: each beam's stack is that patch on its own box, as in a call of its own."""
    eng = s.engine
    rows = _rows(s, 200, 2)
    for col in _columns(s)[:3]:
        joint, parts = eng.delta_matrix([col], rows, beam_parts=True)
        np.testing.assert_array_equal(_bits(joint), _bits(eng.delta_matrix([col], rows)))
        for p in col:
            np.testing.assert_array_equal(_bits(parts[p.beam][:, 0]), _bits(eng.delta_matrix([[p]], rows)[:, 0]))


def test_beam_parts_repeated_and_empty(s):
    """A second read (cached look-ups and read-outs) gives the same bits; no column or no voxel
    gives empty arrays of the right shapes."""
    eng = s.engine
    cols = _columns(s)[:3]
    rows = _rows(s, 150, 3)
    first = [np.array(a) for a in eng.delta_matrix(cols, rows, beam_parts=True)]
    again = eng.delta_matrix(cols, rows, beam_parts=True)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    joint, parts = eng.delta_matrix([], rows, beam_parts=True)
    assert joint.shape == (rows.size, 0) and parts.shape == (eng.n_beams, rows.size, 0)
    joint, parts = eng.delta_matrix(cols, np.zeros(0, np.int64), beam_parts=True)
    assert joint.shape == (0, len(cols)) and parts.shape == (eng.n_beams, 0, len(cols))


def test_compiled_coarse_tables_equal_the_numpy_reference(coarse_horseshoe_session):
    """``_cpu_readout.coarse_tables`` (a voxel set's coarse neighbours, weights and distinct
    neighbours in one pass) gives ``_coarse_neighbours`` and ``np.unique``'s tables bit for bit:
    sets of one voxel, of a few hundred, of the grid's first and last voxels, and unsorted; with
    its own work arrays and with work arrays kept from call to call (left zero where they must
    be); work arrays of another grid refused."""
    from ids_engine.kernels import _cpu_readout

    if not _cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed (the 'fast' extra)")
    eng = coarse_horseshoe_session.engine
    size = int(np.prod(eng.grid.shape_zyx))
    rng = np.random.default_rng(4)
    kept = _cpu_readout.coarse_scratch(eng.coarse_grid.shape_zyx)
    for idx in (np.array([size // 2]), rng.choice(size, 400, replace=False), np.sort(rng.choice(size, 3000, replace=False)),
                np.array([0, 1, size - 1, size - 2, 0])):
        idx = idx.astype(np.int64)
        cidx, cw = eng._coarse_neighbours(idx)
        uniq, inv = np.unique(cidx.reshape(-1), return_inverse=True)
        for scratch in (None, kept, kept):
            got = _cpu_readout.coarse_tables(idx, eng.grid.shape_zyx, eng.coarse_grid.shape_zyx, eng._up_host, scratch)
            for a, b in zip(got, (cidx, cw, uniq, inv.reshape(-1))):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
            assert not kept[0].any()
    cz, cy, cx = eng.coarse_grid.shape_zyx
    with pytest.raises(ValueError):
        _cpu_readout.coarse_tables(idx, eng.grid.shape_zyx, eng.coarse_grid.shape_zyx, eng._up_host,
                                   _cpu_readout.coarse_scratch((cz, cy, cx + 1)))


def test_a_voxel_off_the_grid_raises_index_error():
    """An index off the grid is refused before the compiled table pass reads with it."""
    from ids_engine.dose import DoseEngine
    from ids_engine.model import Beam
    from tests.dose.test_physics import water_phantom

    eng = DoseEngine(water_phantom(width_mm=60.0, depth_mm=60.0, spacing_mm=5.0), [Beam(gantry_deg=0.0)])
    size = int(np.prod(eng.grid.shape_zyx))
    with pytest.raises(IndexError):
        eng.dose_at_voxels(np.array([6 * size], np.int64))


def _level_ends(eng, name: str) -> np.ndarray:
    """Every beam's first and last level voxel (positions 0 and n - 1 on that level)."""
    return np.array([i for g in eng.geometry for i in (getattr(g, name).host.vox[0], getattr(g, name).host.vox[-1])],
                    np.int64)


def _assert_same_rows(got, want) -> None:
    """``_LevelRows`` (or their fields in order) equal bit for bit, bounds included."""
    for a, ref in zip((got.ok, got.v, got.u, got.weights), (want.ok, want.v, want.u, want.weights)):
        assert a.dtype == ref.dtype and a.shape == ref.shape
        np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(ref).view(np.uint8))
    assert got.bounds == want.bounds


def test_every_beams_level_look_ups_in_one_pass_equal_one_beam_at_a_time(coarse_horseshoe_session):
    """``_cpu_readout.level_tables`` (the beams asked for, in their order, at the same level
    voxels, one compiled call) gives, row by row, ``_LevelRows.of``'s look-ups and the NumPy
    gathers and bounds bit for bit: fine level voxels with some outside the body, the distinct
    coarse neighbours, and every beam's first and last level voxel on both."""
    from ids_engine.dose._readout import _LevelRows, level_bounds
    from ids_engine.kernels import _cpu_readout

    if not _cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed (the 'fast' extra)")
    s = coarse_horseshoe_session
    eng = s.engine
    beams = list(range(eng.n_beams))
    assert eng.n_beams > 5
    idx = np.concatenate([_rows(s, 300, 5), _level_ends(eng, "fine")])

    def fresh():
        eng.__dict__.pop("_neighbour_cache", None)
        return eng._neighbours(idx)

    try:
        nb = fresh()
        for name, level_index in (("fine", idx), ("coarse", np.concatenate([nb.coarse_unique()[0],
                                                                            _level_ends(eng, "coarse")]))):
            hosts = [getattr(g, name).host for g in eng.geometry]
            order = np.array(beams[::-1], np.int64)
            ok, v, u, w, mm = _cpu_readout.level_tables(hosts, order, level_index)
            assert ok.shape == (len(beams), level_index.size)
            for r, b in enumerate(order):
                lvl = getattr(eng.geometry[b], name)
                h = lvl.host
                got = _LevelRows.compiled(ok[r], v[r], u[r], w[r], mm[r])
                _assert_same_rows(got, _LevelRows.of(lvl, level_index))
                # An independent NumPy look-up.
                pos = h.position[level_index]
                p = np.where(pos >= 0, pos, 0)
                _assert_same_rows(got, _LevelRows(level_index.size, pos >= 0, h.v_cells[p], h.u_cells[p],
                                                  h.weights[:, p], level_bounds(pos >= 0, h.v_cells[p], h.u_cells[p])))
                use = (pos >= 0) & np.isfinite(h.v_cells[p]) & np.isfinite(h.u_cells[p])
                assert mm[r] == (float(h.v_cells[p][use].min()), float(h.v_cells[p][use].max()),
                                 float(h.u_cells[p][use].min()), float(h.u_cells[p][use].max()))
                ends = np.isin(level_index, h.vox[[0, -1]])
                assert ok[r, ends].all() and set(pos[ends]) == {0, h.vox.size - 1}
            if name == "fine":
                assert (~ok).any()  # the rows outside the body are not in the level
    finally:
        eng.__dict__.pop("_neighbour_cache", None)


def _fresh_tables(eng, idx):
    """The neighbours of ``idx`` and the engine's kept level look-ups, both built anew."""
    eng.__dict__.pop("_neighbour_cache", None)
    eng.__dict__.pop("_level_tables_cache", None)
    return eng._neighbours(idx)


def _assert_rows_of_beams(eng, nb, beams, name, level_index, got) -> None:
    """``_rows_of_beams``' stacked tables ``got`` are, row by row, ``_LevelRows.of`` of the
    beams asked for (C-contiguous), and ``nb.levels`` holds each beam's rows with its bounds."""
    from types import SimpleNamespace

    from ids_engine.dose._readout import _LevelRows

    ok, v, u, w = got
    assert ok.dtype == bool and v.dtype == u.dtype == w.dtype == np.float32
    assert all(a.flags.c_contiguous for a in got) and ok.shape == (len(beams), level_index.size)
    for s_row, b in enumerate(beams):
        want = _LevelRows.of(getattr(eng.geometry[b], name), level_index)
        kept = nb.levels[(b, name)]
        _assert_same_rows(kept, want)
        _assert_same_rows(SimpleNamespace(ok=ok[s_row], v=v[s_row], u=u[s_row], weights=w[s_row], bounds=kept.bounds),
                          want)
        assert kept.v.flags.c_contiguous and kept.weights.flags.c_contiguous


def test_rows_of_beams_gathers_kept_look_ups_bit_for_bit(s, monkeypatch):
    """``_rows_of_beams`` (a DMR joint solve's read, every beam at the same rows) equals one
    ``_LevelRows.of`` per beam bit for bit, bounds included, with and without numba, on both
    levels (fine rows with some outside the body, the distinct coarse neighbours, every beam's
    first and last level voxel), for every beam, a subset in another order, and beams whose
    rows the host path made before (kept, not replaced). Each level voxel is looked up once
    (:class:`_LevelTables`): a second read of the same or fewer rows looks nothing up, a read
    with new rows looks up those only."""
    from ids_engine.dose import _readout

    eng = s.engine
    beams = list(range(eng.n_beams))
    looked = []
    real = _readout._LevelTables._look_up
    monkeypatch.setattr(_readout._LevelTables, "_look_up", lambda self, vox: looked.append(vox.copy()) or real(self, vox))
    idx = np.concatenate([_rows(s, 300, 5), _level_ends(eng, "fine")])
    try:
        nb = _fresh_tables(eng, idx)
        eng._rows_of(nb, 3, "fine", idx)  # the host path's rows of beam 3, made first
        host_rows = nb.levels[(3, "fine")]
        levels = {"fine": idx, "coarse": np.concatenate([nb.coarse_unique()[0], _level_ends(eng, "coarse")])}
        for name, level_index in levels.items():
            looked.clear()
            got = eng._rows_of_beams(nb, beams, name, level_index)
            _assert_rows_of_beams(eng, nb, beams, name, level_index, got)
            assert len(looked) == 1 and np.array_equal(looked[0], np.unique(level_index))
        assert nb.levels[(3, "fine")] is host_rows
        # The same rows again (a new voxel set: nothing kept there) and a subset of them in
        # another order, for some beams in another order: gathered, nothing looked up.
        looked.clear()
        sub = idx[::-3].copy()
        nb = eng._neighbours(sub)
        for name, level_index in (("fine", sub), ("coarse", nb.coarse_unique()[0])):
            _assert_rows_of_beams(eng, nb, beams, name, level_index, eng._rows_of_beams(nb, beams, name, level_index))
            some = [5, 0, 2]
            eng.__dict__.pop("_neighbour_cache", None)
            nb2 = eng._neighbours(sub)
            _assert_rows_of_beams(eng, nb2, some, name, level_index, eng._rows_of_beams(nb2, some, name, level_index))
        assert looked == []
        # New rows among kept ones: only the new voxels are looked up.
        more = np.unique(np.concatenate([idx[:100], _rows(s, 200, 6)]))
        nb = eng._neighbours(more)
        got = eng._rows_of_beams(nb, beams, "fine", more)
        _assert_rows_of_beams(eng, nb, beams, "fine", more, got)
        assert len(looked) == 1 and np.array_equal(looked[0], np.setdiff1d(more, idx))
    finally:
        _fresh_tables(eng, idx[:1])


def test_level_tables_follow_the_engines_levels(coarse_horseshoe_session, monkeypatch):
    """The kept look-ups are the engine's levels' own: with a beam's geometry replaced (another
    beam's levels, as after a rotation), a beam removed, or the original beams back, the reads
    equal ``_LevelRows.of`` of the levels now in the engine."""
    from dataclasses import replace

    s = coarse_horseshoe_session
    eng = s.engine
    idx = _rows(s, 200, 7)
    original = list(eng.geometry)
    try:
        nb = _fresh_tables(eng, idx)
        eng._rows_of_beams(nb, list(range(eng.n_beams)), "fine", idx)
        first = eng._level_tables("fine")
        for geometry in ([replace(original[0], fine=original[1].fine, coarse=original[1].coarse)] + original[1:],
                         original[:-1], original):
            monkeypatch.setattr(eng, "geometry", geometry)
            for name in ("fine", "coarse"):
                eng.__dict__.pop("_neighbour_cache", None)
                nb = eng._neighbours(idx)
                level_index = idx if name == "fine" else nb.coarse_unique()[0]
                beams = list(range(len(geometry)))
                got = eng._rows_of_beams(nb, beams, name, level_index)
                _assert_rows_of_beams(eng, nb, beams, name, level_index, got)
                assert eng._level_tables(name).levels == [getattr(g, name) for g in geometry]
        assert eng._level_tables("fine") is not first
    finally:
        monkeypatch.setattr(eng, "geometry", original)
        _fresh_tables(eng, idx[:1])


def test_level_tables_start_again_when_full_and_refuse_voxels_off_the_level(coarse_horseshoe_session, monkeypatch):
    """At most ``_LEVEL_TABLES_MAX`` voxels are kept: a read that would pass it starts the
    table again, one larger than it is looked up and not kept; the values are the look-ups'
    either way. A level voxel outside the level raises IndexError."""
    from ids_engine.dose import _readout

    s = coarse_horseshoe_session
    eng = s.engine
    monkeypatch.setattr(_readout, "_LEVEL_TABLES_MAX", 64)
    rows = np.unique(_rows(s, 120, 8))
    a, b, big = rows[:50], rows[50:80], rows
    try:
        nb = _fresh_tables(eng, a)
        beams = list(range(eng.n_beams))
        tables = eng._level_tables("fine")
        for part, kept in ((a, 50), (b, 30), (big, 30)):
            eng.__dict__.pop("_neighbour_cache", None)
            nb = eng._neighbours(part)
            _assert_rows_of_beams(eng, nb, beams, "fine", part, eng._rows_of_beams(nb, beams, "fine", part))
            assert eng._level_tables("fine") is tables and tables._n == kept
        assert (tables._slot >= 0).sum() == 30 and np.array_equal(np.flatnonzero(tables._slot >= 0), b)
        # A read that fills the table while holding kept voxels (b's first 20 and 40 new ones,
        # 30 + 40 > 64): the table starts again with every voxel of the read, kept ones
        # included (they lost their records with the rest), and the values are the look-ups'.
        mixed = np.unique(np.concatenate([b[:20], a[:40]]))
        eng.__dict__.pop("_neighbour_cache", None)
        nb = eng._neighbours(mixed)
        _assert_rows_of_beams(eng, nb, beams, "fine", mixed, eng._rows_of_beams(nb, beams, "fine", mixed))
        assert tables._n == mixed.size and np.array_equal(np.flatnonzero(tables._slot >= 0), mixed)
        # An empty read: empty tables of the right shapes.
        empty = np.zeros(0, np.int64)
        ok, v, u, w = eng._rows_of_beams(eng._neighbours(empty), beams, "fine", empty)
        assert ok.shape == v.shape == u.shape == (eng.n_beams, 0) and w.shape == (eng.n_beams, tables.nc, 0)
        size = eng.geometry[0].fine.host.position.shape[0]
        for bad in (size, -size - 1):
            with pytest.raises(IndexError):
                tables.gather(np.array([a[0], bad], np.int64))
    finally:
        _fresh_tables(eng, a[:1])


def test_level_tables_declines_mixed_arrays_and_rejects_indices_off_the_level(coarse_horseshoe_session):
    """A read-only (or otherwise differently typed) array in one beam: ``level_tables`` returns
    None (the caller looks each beam up alone) rather than failing to compile; level voxels or
    beams outside the level or the beams raise IndexError (the compiled loops would read out of
    bounds), in ``_cpu.level_rows`` too."""
    from types import SimpleNamespace

    from ids_engine.kernels import _cpu_readout

    if not _cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed (the 'fast' extra)")
    eng = coarse_horseshoe_session.engine
    hosts = [SimpleNamespace(position=g.fine.host.position, v_cells=g.fine.host.v_cells, u_cells=g.fine.host.u_cells,
                             weights=g.fine.host.weights) for g in eng.geometry]
    level_index = _level_ends(eng, "fine")
    beams = np.arange(len(hosts), dtype=np.int64)
    assert _cpu_readout.level_tables(hosts, beams, level_index) is not None
    frozen = hosts[1].v_cells.copy()
    frozen.flags.writeable = False
    mixed = [SimpleNamespace(**{**vars(h), "v_cells": frozen}) if k == 1 else h for k, h in enumerate(hosts)]
    assert _cpu_readout.level_tables(mixed, beams, level_index) is None
    size = hosts[0].position.shape[0]
    h = hosts[0]
    for bad in (size, size + 10**6, -size - 1):
        off = np.concatenate([level_index, [bad]]).astype(np.int64)
        with pytest.raises(IndexError, match="level_index"):
            _cpu_readout.level_tables(hosts, beams, off)
        with pytest.raises(IndexError, match="level_index"):
            _cpu.level_rows(h.position, h.v_cells, h.u_cells, h.weights, off)
    for bad in (len(hosts), -1):
        with pytest.raises(IndexError, match="beams"):
            _cpu_readout.level_tables(hosts, np.array([0, bad], np.int64), level_index)


def test_device_read_refuses_stacks_past_the_kernels_int32_offsets(coarse_horseshoe_session):
    """``_device_rows._level_tables`` packs the slots' stacks for ``delta_rows``, whose offsets
    are int32: stacks of 2^31 cells or more are refused before anything is copied (a stack
    that only claims the shape: a broadcast view)."""
    from ids_engine.dose._device_rows import _level_tables
    from ids_engine.dose._uploads import _Uploads

    s = coarse_horseshoe_session
    eng = s.engine
    idx = _rows(s, 20, 9)
    try:
        nb = _fresh_tables(eng, idx)
        huge = np.broadcast_to(np.float32(0), (2, 2**15, 2**15))
        slots = [(0, huge, 0, 0, np.arange(2)), (1, huge[:1, :2, :2], 0, 0, np.arange(2, 3))]
        with pytest.raises(ValueError, match="int32 offsets"):
            _level_tables(eng, "fine", slots, nb, idx, _Uploads())
        keys, scalars = _level_tables(eng, "fine", slots[1:], nb, idx, _Uploads())
        assert scalars == {"m": idx.size, "nc": eng.geometry[1].fine.host.weights.shape[0]}
    finally:
        _fresh_tables(eng, idx[:1])


def test_stacked_bounds_equal_level_bounds_row_by_row():
    """``_stacked_bounds`` (every beam's bounds at once) gives ``level_bounds`` of each row:
    non-finite positions and voxels not in the level left out, negative values and -0.0
    floored as Python ints, None for a row with no usable voxel."""
    from ids_engine.dose._readout import _stacked_bounds, level_bounds

    rng = np.random.default_rng(12)
    v = rng.uniform(-30, 30, (5, 40)).astype(np.float32)
    u = rng.uniform(-30, 30, (5, 40)).astype(np.float32)
    ok = rng.random((5, 40)) > 0.2
    v[0, :3], u[1, :3] = (np.nan, np.inf, -np.inf), (np.nan, -np.inf, np.inf)
    v[2], u[2] = np.float32(-0.0), np.float32(-0.5)
    ok[3] = False
    v[4, ok[4]] = np.nan
    got = _stacked_bounds(ok, v, u)
    assert got == [level_bounds(ok[s], v[s], u[s]) for s in range(5)]
    assert got[3] is None and got[4] is None and got[2] == (0, 0, -1, -1)
    assert all(type(x) is int for b in got[:3] for x in b)
