"""Beamlet influence matrices: dose from the matrix equals the engine's dose for the same fluence."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dose import DoseEngine, influence_matrix
from ids_engine.model import Beam, Grid

from .test_physics import water_phantom


@pytest.fixture(scope="module")
def small():
    p = water_phantom(width_mm=60.0, depth_mm=60.0, spacing_mm=3.0)
    return DoseEngine(p, [Beam(gantry_deg=0.0), Beam(gantry_deg=90.0)])


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


def test_influence_equals_engine_without_cutoff(small, rng):
    eng = small
    masks = _beamlets_in(eng, 12.0)
    dij = influence_matrix(eng, beamlet_masks=masks, cutoff_mm=None)
    w = rng.random(dij.shape[1]).astype(np.float32)
    eng.set_fluences(dij.fluence_maps(w))
    ref = np.asarray(eng.dose_at_points(dij.points_xyz()))
    got = dij.matrix @ w
    assert ref.max() > 0
    np.testing.assert_allclose(got, ref, atol=1e-5 * ref.max())


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
    dij = influence_matrix(eng, g6, beamlet_masks=_beamlets_in(eng, 6.0), cutoff_mm=20.0)
    assert dij.grid == g6
    assert dij.shape[0] == int(dij.voxels.size) > 0
    assert dij.matrix.nnz > 0


def test_beamlet_size_must_align_with_coarse_cells(small):
    with pytest.raises(ValueError, match="multiple of the coarse fluence factor"):
        influence_matrix(small, beamlet_cells=3)
