"""What makes the optimiser fast, held to known answers: the two-level influence matrix gives
the optimum of its assembled form, the cold start is the best uniform fluence, the stall
rule ends a converged problem early at the converged objective, BLAS runs on one thread."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse

from ids_engine.dose import DoseEngine, influence_matrix
from ids_engine.dose._influence import TwoLevelMatrix
from ids_engine.model import Beam
from ids_engine.optimise import MaxDose, MinDose, UniformDose, optimise_fluence
from ids_engine.optimise._optimiser import _Problem, _uniform_start
from tests.dose.test_influence import _beamlets_in
from tests.dose.test_physics import water_phantom


def _two_structure_problem(rng, n_beam=30):
    """30 target voxels, 30 organ voxels whose dose leans on the later beamlets."""
    target = rng.random((30, n_beam))
    organ = rng.random((30, n_beam)) * np.linspace(0.05, 1.0, n_beam)[None, :] * rng.random((30, 1)) * 2
    return np.vstack([target, organ]), {"t": np.arange(30), "o": np.arange(30, 60)}


@pytest.fixture(scope="module")
def water_dij():
    """A 48 mm water cube, two beams, beamlets over a 16 mm field: the exact (two-level) matrix."""
    eng = DoseEngine(water_phantom(width_mm=48.0, depth_mm=48.0, spacing_mm=3.0),
                     [Beam(gantry_deg=0.0), Beam(gantry_deg=90.0)])
    return influence_matrix(eng, beamlet_masks=_beamlets_in(eng, 8.0), cutoff_mm=None)


def test_two_level_matrix_reaches_the_least_squares_optimum(water_dij):
    """Uniform dose to the central voxels: the optimum is the non-negative least-squares
    solution on the assembled matrix (SciPy's NNLS, float64); the two-level matrix, its
    assembled CSC and the dense array all reach it."""
    dij = water_dij
    m = dij.matrix
    assert isinstance(m, TwoLevelMatrix)
    dense = np.asarray(m.toarray(), np.float64)
    central = np.flatnonzero(dense.sum(axis=1) > 0.5 * dense.sum(axis=1).max())
    assert central.size > 3 * dense.shape[1], "more voxels than beamlets: a real least-squares problem"
    level_gy = 2.0
    expected, _ = scipy.optimize.nnls(dense[central], np.full(central.size, level_gy))
    assert (expected == 0).any() and (expected > 0).any()
    voxels = {"centre": central}
    goals = [UniformDose("centre", level_gy)]
    ref_obj = float(np.mean((dense[central] @ expected - level_gy) ** 2))
    for matrix in (m, scipy.sparse.csc_matrix(dense.astype(np.float32)), dense):
        res = optimise_fluence(matrix, goals, voxels, ftol=1e-12)
        assert res.objective == pytest.approx(ref_obj, rel=1e-4)
        np.testing.assert_allclose(res.beamlet_weights, expected, rtol=0, atol=2e-3 * expected.max())


def test_cold_start_is_the_best_uniform_fluence(rng):
    a = rng.uniform(0.5, 1.5, (25, 4))
    voxels = {"all": np.arange(25)}
    problem = _Problem(a, (UniformDose("all", 60.0),), voxels, None, np.float64)
    w0 = _uniform_start(problem, 4)
    d1 = a.sum(axis=1)
    # argmin_c mean((c d1 - 60)^2) = 60 sum(d1) / sum(d1^2)
    np.testing.assert_allclose(w0, 60.0 * d1.sum() / (d1 @ d1), rtol=1e-4)
    # With an offset the search finds the uniform weights that complete it.
    offset = np.full(25, -30.0)
    problem = _Problem(a, (UniformDose("all", 30.0),), voxels, offset, np.float64)
    np.testing.assert_allclose(_uniform_start(problem, 4), 60.0 * d1.sum() / (d1 @ d1), rtol=1e-4)
    # Only constraints, or objectives no beamlet reaches: zeros.
    only = _Problem(a, (MinDose("all", 60.0, constraint=True),), voxels, None, np.float64)
    assert not _uniform_start(only, 4).any()
    blind = np.vstack([a, np.zeros((5, 4))])
    far = _Problem(blind, (UniformDose("far", 60.0),), {"far": np.arange(25, 30)}, None, np.float64)
    assert not _uniform_start(far, 4).any()
    # An organ's maximum alone is met best by no fluence at all.
    organ = _Problem(a, (MaxDose("all", 10.0),), voxels, None, np.float64)
    assert not _uniform_start(organ, 4).any()


def test_cold_start_gets_further_than_zeros_in_the_same_iterations(rng):
    a, voxels = _two_structure_problem(rng)
    goals = [UniformDose("t", 60.0, importance=10.0), MaxDose("o", 10.0)]
    cold = optimise_fluence(a, goals, voxels, max_iterations=10)
    zeros = optimise_fluence(a, goals, voxels, max_iterations=10, initial_weights=np.zeros(a.shape[1]))
    assert cold.iterations == zeros.iterations == 10
    assert cold.objective < zeros.objective


def test_stall_rule_stops_a_converged_problem_early(rng):
    a, voxels = _two_structure_problem(rng)
    goals = [UniformDose("t", 60.0, importance=10.0), MaxDose("o", 10.0)]
    ref = optimise_fluence(a, goals, voxels, ftol=1e-15, max_iterations=5000)
    assert ref.iterations < 5000
    stalled = optimise_fluence(a, goals, voxels, ftol=1e-15, max_iterations=5000, stall_rtol=1e-6, stall_iterations=5)
    assert stalled.message.startswith("converged: the objective fell by less than 1e-06")
    assert stalled.iterations < ref.iterations
    assert stalled.objective == pytest.approx(ref.objective, rel=1e-6)
    # Off by default: the same run without it goes on to L-BFGS-B's own test.
    assert not optimise_fluence(a, goals, voxels, ftol=1e-15, max_iterations=5000).message.startswith("converged")
    # While the objective still falls fast the rule does not stop the run.
    early = optimise_fluence(a, goals, voxels, max_iterations=8, stall_rtol=1e-6, stall_iterations=5)
    assert early.iterations == 8 and early.message == "iteration budget spent"
    with pytest.raises(ValueError, match="stall_rtol"):
        optimise_fluence(a, goals, voxels, stall_rtol=0.0)
    with pytest.raises(ValueError, match="stall_iterations"):
        optimise_fluence(a, goals, voxels, stall_rtol=1e-3, stall_iterations=0)


def test_blas_runs_on_one_thread_while_optimising(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    a, voxels = _two_structure_problem(rng)
    seen = []

    def progress(done, total, label):
        seen.extend(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")

    before = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    optimise_fluence(a, [UniformDose("t", 60.0)], voxels, max_iterations=3, progress=progress)
    assert seen and set(seen) == {1}
    assert [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"] == before


def test_overlapping_optimisations_restore_blas_threads_once_both_end():
    """Two optimisations in threads (an adapt batch): the limit holds while either runs and
    the original thread count comes back when the last one leaves, not before or never."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from ids_engine.optimise._optimiser import _one_blas_thread

    def blas():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before = blas()
    a, b = _one_blas_thread(), _one_blas_thread()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # the first one leaves while the second still runs
    assert all(n == 1 for n in blas())
    b.__exit__(None, None, None)
    assert blas() == before
