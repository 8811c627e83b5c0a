"""Beamlet influence matrices: dose from the matrix equals the engine's dose cube for the same
fluence (the interactive engine's own two-level model), and a cutoff's tail is corrected."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import DoseEngine, influence_matrix
from ids_engine.dose._influence import TwoLevelMatrix
from ids_engine.model import Beam, Grid

from .test_physics import water_phantom


@pytest.fixture(scope="module")
def small():
    p = water_phantom(width_mm=60.0, depth_mm=60.0, spacing_mm=3.0)
    return DoseEngine(p, [Beam(gantry_deg=0.0), Beam(gantry_deg=90.0), Beam(gantry_deg=225.0)])


def _engine_dose(eng, dij, w):
    """The engine's dose cube at the matrix's rows for the fluence of ``w`` (host)."""
    eng.set_fluences(dij.fluence_maps(w))
    return np.asarray(eng.dose_cube()).ravel()[dij.ct_voxels]


def _beamlets_in(eng, half_mm):
    bc = eng.geometry[0].coarse_fluence_factor
    out = []
    for g in eng.geometry:
        ap = g.fluence_grid.rectangle_mask((-half_mm, half_mm), (-half_mm, half_mm))
        nbr, nbc = -(-ap.shape[0] // bc), -(-ap.shape[1] // bc)
        pad = np.zeros((nbr * bc, nbc * bc), bool)
        pad[: ap.shape[0], : ap.shape[1]] = ap
        out.append(pad.reshape(nbr, bc, nbc, bc).any(axis=(1, 3)))
    return out


@pytest.mark.parametrize("half_mm", [12.0, None])
def test_influence_equals_engine_without_cutoff(small, rng, half_mm):
    """Every row equals the engine's dose cube (fine level + upsampled coarse level), for
    beamlets over a small field and for every beamlet of the maps (cut ones at the edges)."""
    eng = small
    masks = None if half_mm is None else _beamlets_in(eng, half_mm)
    dij = influence_matrix(eng, beamlet_masks=masks, cutoff_mm=None)
    np.testing.assert_array_equal(dij.ct_voxels, dij.voxels)
    w = rng.random(dij.shape[1]).astype(np.float32)
    ref = _engine_dose(eng, dij, w)
    got = dij.matrix @ w
    assert ref.max() > 0
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * ref.max())
    # The engine's own offset is zero to round-off, and leaves its plan state as it was.
    before = eng.dose_cube().copy()
    off = dij.tail_offset(eng, 2 * w)
    np.testing.assert_array_equal(eng.dose_cube(), before)
    assert np.abs(off).max() <= 2e-5 * ref.max()


def test_two_level_form_products_are_the_engines(small, rng):
    """Without a cutoff the matrix is kept as F + U C: a column is the engine's dose of its
    beamlet alone, ``A.T @ y`` is the transpose of the same matrix (checked column by column
    against the engine, not against the parts), and it stores fewer numbers than the
    assembled matrix, whose scatter fills every (row, beamlet) pair."""
    eng = small
    dij = influence_matrix(eng, cutoff_mm=None)
    m = dij.matrix
    assert isinstance(m, TwoLevelMatrix) and m.shape == dij.shape and m.dtype == np.float32
    assembled = np.asarray(m.toarray(), np.float64)
    assert m.nnz < 0.5 * np.count_nonzero(assembled)
    y = rng.random(dij.shape[0]).astype(np.float32)
    aty = m.T @ y
    assert aty.shape == (dij.shape[1],) and aty.dtype == np.float32
    # Columns the fine part reaches fully (the middle of the maps) and cut ones at the edges.
    for j in sorted({0, dij.shape[1] // 3, dij.shape[1] // 2, dij.shape[1] - 1}):
        e = np.zeros(dij.shape[1], np.float32)
        e[j] = 1.0
        col = _engine_dose(eng, dij, e).astype(np.float64)
        assert col.max() > 0
        # The engine's FFT convolution rounds a lone edge beamlet's small dose to ~1e-5 of it.
        np.testing.assert_allclose(assembled[:, j], col, rtol=0, atol=5e-5 * col.max())
        assert aty[j] == pytest.approx(float(y @ col), rel=1e-4)
    # Several right-hand sides at once, and the assembled CSC for export.
    w = rng.random((dij.shape[1], 3)).astype(np.float32)
    np.testing.assert_allclose(m @ w, assembled @ w, rtol=1e-4, atol=1e-5 * np.abs(assembled @ w).max())
    np.testing.assert_allclose(m.tocsc().toarray(), assembled, rtol=0, atol=0)
    assert m.get() is m  # already on the host


def test_tail_offset_makes_a_cut_matrix_the_engine(small, rng):
    """With a cutoff, ``A w + offset(w)`` is the engine's dose; the cutoff alone loses a few
    per cent of the maximum, and an offset from nearby weights recovers most of that."""
    eng = small
    masks = _beamlets_in(eng, 15.0)
    dij = influence_matrix(eng, beamlet_masks=masks, cutoff_mm=10.0)
    w = rng.random(dij.shape[1]).astype(np.float32)
    ref = _engine_dose(eng, dij, w)
    got = dij.matrix @ w
    cut_err = np.abs(got - ref).max() / ref.max()
    assert 1e-3 < cut_err < 0.2
    assert np.all(got <= ref + 1e-5 * ref.max())  # the tail is only dropped
    off = dij.tail_offset(eng, w)
    np.testing.assert_allclose(dij.dose(w, off), ref, rtol=0, atol=1e-5 * ref.max())
    # A stale offset (from the previous round's weights) still beats none.
    w2 = w * rng.uniform(0.8, 1.2, w.size).astype(np.float32)
    ref2 = _engine_dose(eng, dij, w2)
    stale_err = np.abs(dij.dose(w2, off) - ref2).max() / ref2.max()
    print(f"cutoff 10 mm: max error {cut_err:.2e} of the maximum without offset, {stale_err:.2e} with a stale one")
    assert stale_err < 0.5 * cut_err


def test_cutoff_keeps_it_sparse_and_close(small, rng):
    eng = small
    masks = _beamlets_in(eng, 12.0)
    full = influence_matrix(eng, beamlet_masks=masks, cutoff_mm=None)
    cut = influence_matrix(eng, beamlet_masks=masks, cutoff_mm=15.0)
    assert cut.matrix.nnz < full.matrix.nnz
    w = np.ones(full.shape[1], np.float32)
    a, b = full.matrix @ w, cut.matrix @ w
    # The scatter tail beyond the cutoff is lost: the dose only drops, and not by much.
    assert np.all(b <= a + 1e-6 * a.max())
    assert np.abs(a - b).max() < 0.2 * a.max()


def test_influence_on_a_coarser_grid(small):
    eng = small
    g = eng.grid
    g6 = Grid(tuple(max(1, n // 2) for n in g.shape_zyx), tuple(2 * s for s in g.spacing_mm_zyx), g.origin_mm_xyz)
    dij = influence_matrix(eng, g6, beamlet_masks=_beamlets_in(eng, 6.0), cutoff_mm=None)
    assert dij.grid == g6
    assert dij.shape[0] == int(dij.voxels.size) > 0
    assert dij.matrix.nnz > 0
    # A row is the engine's dose at the CT voxel nearest its centre.
    ct_idx = np.stack(np.unravel_index(dij.ct_voxels, g.shape_zyx), axis=-1)
    assert np.abs(g.index_to_world(ct_idx) - dij.points_xyz()).max() <= 0.5 * max(g.spacing_mm_zyx) + 1e-9
    w = np.ones(dij.shape[1], np.float32)
    ref = _engine_dose(eng, dij, w)
    np.testing.assert_allclose(dij.matrix @ w, ref, rtol=0, atol=1e-5 * ref.max())


def test_beamlet_size_must_align_with_coarse_cells(small):
    with pytest.raises(ValueError, match="multiple of the coarse fluence factor"):
        influence_matrix(small, beamlet_cells=3)
