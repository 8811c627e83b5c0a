"""The optimiser on small problems with known optima, constraints, warm start, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse

from ids_engine.optimise import (
    FluenceResult,
    MaxDose,
    MaxDVH,
    MaxEUD,
    MaxMeanDose,
    MinDose,
    MinDVH,
    MinEUD,
    UniformDose,
    optimise_fluence,
)

TOL_GY = 0.01


def _two_structure_problem(rng, n_beam=12):
    """30 target voxels, 30 organ voxels whose dose leans on the later beamlets."""
    target = rng.random((30, n_beam))
    organ = rng.random((30, n_beam)) * np.linspace(0.05, 1.0, n_beam)[None, :] * rng.random((30, 1)) * 2
    return np.vstack([target, organ]), {"t": np.arange(30), "o": np.arange(30, 60)}


# --------------------------------------------------------------- known optima
def test_one_beamlet_closed_form():
    # f(w) = (60 - w)^2 [w < 60] + (0.5 w - 20)^2 [w > 40]: f'(w) = 0 at w = 56.
    a = np.array([[1.0], [0.5]])
    voxels = {"PTV": np.array([0]), "OAR": np.array([1])}
    res = optimise_fluence(a, [MinDose("PTV", 60.0), MaxDose("OAR", 20.0)], voxels)
    assert res.beamlet_weights[0] == pytest.approx(56.0, rel=1e-6)
    assert res.objective == pytest.approx(4.0**2 + 8.0**2, rel=1e-6)
    # As a constraint the organ's bound wins: w = 40, on the constraint.
    res = optimise_fluence(a, [MinDose("PTV", 60.0), MaxDose("OAR", 20.0, constraint=True)], voxels)
    assert res.feasible
    assert res.beamlet_weights[0] == pytest.approx(40.0, abs=2 * TOL_GY)


def test_uniform_dose_with_one_beamlet_is_the_projection(rng):
    a = rng.uniform(0.5, 1.5, (25, 1))
    res = optimise_fluence(a, [UniformDose("all", 60.0)], {"all": np.arange(25)})
    expected = 60.0 * a.sum() / (a * a).sum()
    assert res.beamlet_weights[0] == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize(("sparse", "dtype"), [(False, np.float64), (True, np.float64), (True, np.float32)],
                         ids=["dense", "csr-float64", "csc-float32"])
def test_least_squares_matches_nnls_with_offset(rng, sparse, dtype):
    a = rng.random((50, 8)) * (rng.random((50, 8)) < 0.6)
    prescription = rng.uniform(20.0, 60.0, 50)
    offset = rng.uniform(0.0, 2.0, 50)
    a = a.astype(dtype).astype(np.float64)  # the float32 matrix's values, exactly
    expected, _ = scipy.optimize.nnls(a, prescription - offset)
    assert (expected == 0).any(), "the test wants some bounds active"
    matrix = scipy.sparse.csc_matrix(a.astype(dtype)) if sparse and dtype == np.float32 else (
        scipy.sparse.csr_matrix(a) if sparse else a)
    res = optimise_fluence(matrix, [UniformDose("all", 0.0)], {"all": np.arange(50)},
                           dose_offset_gy=offset - prescription)
    np.testing.assert_allclose(res.beamlet_weights, expected, rtol=1e-4, atol=1e-4)
    # The reported dose includes the offset.
    np.testing.assert_allclose(res.dose_gy, a @ res.beamlet_weights + offset - prescription)
    assert res.unmet_constraints == () and res.rounds == 1 and res.iterations > 0


def test_active_max_dose_constraint_sits_on_the_bound(rng):
    a, voxels = _two_structure_problem(rng)
    free = optimise_fluence(a, [UniformDose("t", 60.0)], voxels)
    limit = 25.0
    assert free.dose_gy[voxels["o"]].max() > limit + 5, "the constraint must be active"
    res = optimise_fluence(a, [UniformDose("t", 60.0), MaxDose("o", limit, constraint=True)], voxels)
    assert res.feasible
    assert res.dose_gy[voxels["o"]].max() == pytest.approx(limit, abs=TOL_GY)
    # Reference: SLSQP on the same convex problem.
    t, o = a[voxels["t"]], a[voxels["o"]]
    ref = scipy.optimize.minimize(
        lambda w: np.mean((t @ w - 60.0) ** 2), free.beamlet_weights, jac=lambda w: 2 * t.T @ (t @ w - 60.0) / 30,
        method="SLSQP", bounds=[(0, None)] * a.shape[1],
        constraints=[{"type": "ineq", "fun": lambda w: limit - o @ w, "jac": lambda w: -o}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert ref.success
    assert res.objective == pytest.approx(ref.fun, rel=2e-3)


@pytest.mark.parametrize(
    "constraint",
    [
        MaxDVH("o", 20.0, 30.0, constraint=True),
        MinDVH("t", 58.0, 90.0, constraint=True),
        MaxMeanDose("o", 15.0, constraint=True),
        MaxEUD("o", 18.0, 4.0, constraint=True),
        MinEUD("t", 57.0, -10.0, constraint=True),
        MinDose("t", 55.0, constraint=True),
    ],
    ids=lambda g: g.kind,
)
def test_constraints_end_feasible(rng, constraint):
    a, voxels = _two_structure_problem(rng)
    objective = UniformDose("t", 60.0, importance=10.0)
    free = optimise_fluence(a, [objective], voxels)
    check = constraint.achieved(free.dose_gy[voxels[constraint.structure]], TOL_GY)
    assert not check[2], "without the constraint the optimum must violate it"
    res = optimise_fluence(a, [objective, constraint], voxels, tolerance_gy=TOL_GY)
    assert res.feasible, [str(u) for u in res.unmet_constraints]
    assert res.goals[1].met
    assert res.objective > free.objective


def test_infeasible_constraints_are_reported_by_name_and_amount():
    # One voxel (9) in both structures: at least 60 Gy and at most 50 Gy.
    a = np.eye(20) + 0.01
    voxels = {"boost": np.arange(0, 10), "spare": np.arange(9, 20)}
    lo = MinDose("boost", 60.0, constraint=True)
    hi = MaxDose("spare", 50.0, constraint=True)
    res = optimise_fluence(a, [UniformDose("boost", 62.0), MaxDose("spare", 0.0), lo, hi], voxels,
                           max_rounds=12)
    assert not res.feasible
    unmet = {u.name: u for u in res.unmet_constraints}
    assert set(unmet) == {lo.label, hi.label}
    assert unmet[lo.label].unit == unmet[hi.label].unit == "Gy"
    assert all(u.amount > TOL_GY for u in unmet.values())
    # The voxel's dose is the min of one structure and the max of the other: the two
    # amounts add up to the 10 Gy conflict.
    assert unmet[lo.label].amount + unmet[hi.label].amount == pytest.approx(10.0, abs=0.05)
    d = res.dose_gy
    assert d[:9].min() >= 60.0 - TOL_GY and d[10:].max() <= 50.0 + TOL_GY, "the rest is met"
    assert f"{lo.label}: achieved" in str(unmet[lo.label])


# ------------------------------------------------------------ warm start etc.
def test_warm_start_converges_faster(rng):
    a, voxels = _two_structure_problem(rng, n_beam=30)
    goals = [UniformDose("t", 60.0, importance=10.0), MaxDose("o", 10.0)]
    cold = optimise_fluence(a, goals, voxels)
    # Replanning: the organ's goal changes a little; start from the previous plan.
    goals2 = [goals[0], MaxDose("o", 11.0)]
    cold2 = optimise_fluence(a, goals2, voxels)
    warm2 = optimise_fluence(a, goals2, voxels, initial_weights=cold.beamlet_weights)
    assert warm2.objective == pytest.approx(cold2.objective, rel=1e-4)
    assert warm2.iterations < cold2.iterations
    assert warm2.evaluations < cold2.evaluations


def test_progress_reports_objective_and_cancel_stops(rng):
    a, voxels = _two_structure_problem(rng, n_beam=30)
    goals = [UniformDose("t", 60.0), MaxDose("o", 10.0)]
    calls = []
    res = optimise_fluence(a, goals, voxels, progress=lambda *c: calls.append(c), max_iterations=400)
    assert calls[-1][:2] == (400, 400)
    done = [c[0] for c in calls]
    assert done == sorted(done) and all(c[1] == 400 for c in calls)
    assert all(c[2].startswith("objective ") for c in calls)
    assert float(calls[-1][2].split()[-1]) == pytest.approx(res.objective, rel=1e-5)
    assert not res.cancelled

    asked = []

    def cancel():
        asked.append(1)
        return len(asked) > 3

    stopped = optimise_fluence(a, goals, voxels, cancel=cancel)
    assert stopped.cancelled and stopped.message == "cancelled"
    assert stopped.iterations <= 3 < res.iterations
    assert isinstance(stopped, FluenceResult) and np.all(stopped.beamlet_weights >= 0)


def test_iteration_budget(rng):
    a, voxels = _two_structure_problem(rng, n_beam=30)
    res = optimise_fluence(a, [UniformDose("t", 60.0), MaxDose("o", 10.0)], voxels, max_iterations=5)
    assert res.iterations == 5 and res.message == "iteration budget spent"


def test_bad_input_names_what_is_wrong(rng):
    a, voxels = _two_structure_problem(rng)
    with pytest.raises(ValueError, match="'PTV' is not in structure_voxels"):
        optimise_fluence(a, [MinDose("PTV", 60.0)], voxels)
    with pytest.raises(ValueError, match=r"structure_voxels\['t'\]: indices span"):
        optimise_fluence(a, [MinDose("t", 60.0)], {"t": np.array([0, 60])})
    with pytest.raises(ValueError, match="initial_weights"):
        optimise_fluence(a, [MinDose("t", 60.0)], voxels, initial_weights=np.ones(3))
    with pytest.raises(ValueError, match="dose_offset_gy"):
        optimise_fluence(a, [MinDose("t", 60.0)], voxels, dose_offset_gy=np.ones(3))
