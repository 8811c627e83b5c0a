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
    sets of one voxel, of a few hundred, of the grid's first and last voxels, and unsorted."""
    from ids_engine.kernels import _cpu_readout

    if not _cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed (the 'fast' extra)")
    eng = coarse_horseshoe_session.engine
    size = int(np.prod(eng.grid.shape_zyx))
    rng = np.random.default_rng(4)
    for idx in (np.array([size // 2]), rng.choice(size, 400, replace=False), np.sort(rng.choice(size, 3000, replace=False)),
                np.array([0, 1, size - 1, size - 2, 0])):
        idx = idx.astype(np.int64)
        cidx, cw = eng._coarse_neighbours(idx)
        uniq, inv = np.unique(cidx.reshape(-1), return_inverse=True)
        got = _cpu_readout.coarse_tables(idx, eng.grid.shape_zyx, eng.coarse_grid.shape_zyx, eng._up_host)
        for a, b in zip(got, (cidx, cw, uniq, inv.reshape(-1))):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_a_voxel_off_the_grid_raises_index_error():
    """An index off the grid is refused before the compiled table pass reads with it."""
    from ids_engine.dose import DoseEngine
    from ids_engine.model import Beam
    from tests.dose.test_physics import water_phantom

    eng = DoseEngine(water_phantom(width_mm=60.0, depth_mm=60.0, spacing_mm=5.0), [Beam(gantry_deg=0.0)])
    size = int(np.prod(eng.grid.shape_zyx))
    with pytest.raises(IndexError):
        eng.dose_at_voxels(np.array([6 * size], np.int64))


def test_every_beams_level_look_ups_in_one_pass_equal_one_beam_at_a_time(coarse_horseshoe_session):
    """``_cpu_readout.level_tables`` (all beams at the same level voxels, one compiled call)
    gives, row by row, ``_LevelRows.of``'s look-ups (compiled and NumPy) bit for bit, bounds
    included: fine level voxels with some outside the body, the distinct coarse neighbours;
    ``_rows_of_beams`` keeps them per beam (the host path finds them) and stacks them only when
    it looked every beam up itself."""
    from ids_engine.dose._readout import _LevelRows
    from ids_engine.kernels import _cpu_readout

    if not _cpu.HAVE_NUMBA:
        pytest.skip("numba is not installed (the 'fast' extra)")
    s = coarse_horseshoe_session
    eng = s.engine
    idx = _rows(s, 300, 5)
    eng.__dict__.pop("_neighbour_cache", None)
    try:
        nb = eng._neighbours(idx)
        beams = list(range(eng.n_beams))
        for name, level_index in (("fine", idx), ("coarse", nb.coarse_unique()[0])):
            hosts = [getattr(g, name).host for g in eng.geometry]
            ok, v, u, w, mm = _cpu_readout.level_tables(hosts, level_index)
            for b in beams:
                lvl = getattr(eng.geometry[b], name)
                want = _LevelRows.of(lvl, level_index)
                h = lvl.host
                pos = h.position[level_index]
                p = np.where(pos >= 0, pos, 0)
                for got, ref in ((ok[b], want.ok), (v[b], want.v), (u[b], want.u), (w[b], want.weights),
                                 (ok[b], pos >= 0), (v[b], h.v_cells[p]), (w[b], h.weights[:, p])):
                    assert got.dtype == ref.dtype and got.shape == ref.shape
                    np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.uint8),
                                                  np.ascontiguousarray(ref).view(np.uint8))
                bounds = None if mm[b] is None else tuple(int(np.floor(x)) for x in mm[b])
                assert bounds == want.bounds
            if name == "fine":
                assert (~ok).any()  # the rows outside the body are not in the level
            rows, stacked = eng._rows_of_beams(nb, beams, name, level_index)
            assert stacked is not None and all(rows[b] is nb.levels[(b, name)] for b in beams)
            for a, ref in zip(stacked, (ok, v, u, w)):
                np.testing.assert_array_equal(a, ref)
            assert rows[0].bounds == _LevelRows.of(getattr(eng.geometry[0], name), level_index).bounds
            # Found again: the same objects, nothing stacked (the device path stacks them itself).
            again, stacked = eng._rows_of_beams(nb, beams[::-1], name, level_index)
            assert stacked is None and all(a is r for a, r in zip(again, rows[::-1]))
    finally:
        eng.__dict__.pop("_neighbour_cache", None)
