"""Goals: validation names the field, gradients match finite differences, DVH evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.optimise import (
    GOAL_KINDS,
    MaxDose,
    MaxDVH,
    MaxEUD,
    MaxMeanDose,
    MinDose,
    MinDVH,
    MinEUD,
    MinMeanDose,
    UniformDose,
    evaluate_goals,
)
from ids_engine.optimise._optimiser import _Problem

# Goals whose thresholds sit inside the spread of the test doses (0.5..70 Gy), so every
# penalty term is active for some voxels.
ALL_GOALS = [
    MinDose("s", 40.0, importance=3.0),
    MaxDose("s", 30.0, importance=2.0),
    UniformDose("s", 35.0, importance=1.5),
    MinMeanDose("s", 50.0, importance=4.0),
    MaxMeanDose("s", 20.0, importance=4.0),
    MinEUD("s", 50.0, -8.0, importance=2.0),
    MaxEUD("s", 20.0, 6.0, importance=2.0),
    MinDVH("s", 45.0, 80.0, importance=5.0),
    MaxDVH("s", 25.0, 30.0, importance=5.0),
]
CONSTRAINTS = [g for g in ALL_GOALS if g.can_be_constraint]


def _doses(rng, n=40):
    return rng.uniform(0.5, 70.0, n)


def _central_gradient(fun, x, eps=1e-5):
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (fun(x + e) - fun(x - e)) / (2 * eps)
    return g


def test_every_kind_is_tested():
    assert {type(g) for g in ALL_GOALS} == set(GOAL_KINDS.values())


@pytest.mark.parametrize("goal", ALL_GOALS, ids=lambda g: g.kind)
def test_objective_gradient_matches_finite_differences(goal, rng):
    d = _doses(rng)
    value, grad = goal.objective(d)
    assert value > 0, "test doses must make the goal's penalty active"
    fd = _central_gradient(lambda x: goal.objective(x)[0], d)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7 * max(1.0, np.abs(fd).max()))


@pytest.mark.parametrize("goal", CONSTRAINTS, ids=lambda g: g.kind)
def test_constraint_residual_vjp_matches_finite_differences(goal, rng):
    d = _doses(rng)
    active = goal.active_set(d)
    r = goal.residual(d, active)
    y = rng.uniform(0.5, 2.0, r.shape)

    def phi(x):
        res = goal.residual(x, active)
        return float(np.sum(np.where(np.isfinite(res), y * res, 0.0)))

    fd = _central_gradient(phi, d)
    np.testing.assert_allclose(goal.residual_vjp(d, y, active), fd, rtol=1e-5, atol=1e-8)


def test_augmented_lagrangian_gradient_in_weights(rng):
    """The whole function the optimiser minimises: every kind as objective and as
    constraint, overlapping structures, a dose offset, nonzero multipliers."""
    n_vox, n_beam = 60, 7
    a = rng.uniform(0.0, 12.0, (n_vox, n_beam))
    voxels = {"s": np.arange(0, 40), "t": np.arange(25, 60)}
    constraints = [type(g)(**{**g.__dict__, "structure": "t", "constraint": True}) for g in CONSTRAINTS]
    offset = rng.uniform(-1.0, 1.0, n_vox)
    problem = _Problem(a, tuple(ALL_GOALS + constraints), voxels, offset, np.float64)
    w = rng.uniform(0.2, 1.2, n_beam)
    d = problem.dose(w)
    problem.start(d)
    problem.mu = 0.05
    problem.lam = [rng.uniform(0.0, 1.0, lam.shape) * (problem.constraints[k].residual(
        d[voxels["t"]], problem.active[k]) > -np.inf) for k, lam in enumerate(problem.lam)]
    _, grad = problem.lagrangian(w)
    fd = _central_gradient(lambda x: problem.lagrangian(x)[0], w, eps=1e-6)
    np.testing.assert_allclose(grad, fd, rtol=1e-5)


def test_eud_limits(rng):
    d = _doses(rng)
    assert MaxEUD("s", 0.0, 1.0).achieved(d)[0] == pytest.approx(d.mean())
    assert MaxEUD("s", 0.0, 200.0).achieved(d)[0] == pytest.approx(d.max(), rel=0.03)
    assert MinEUD("s", 0.0, -200.0).achieved(d)[0] == pytest.approx(d.min(), rel=0.03)


def test_dvh_evaluation_counts_voxels():
    d = np.arange(1.0, 11.0)  # 1..10 Gy, ten voxels
    achieved, limit, met = MaxDVH("s", 7.5, 30.0).achieved(d)  # 8, 9, 10 above 7.5: 30 %
    assert (achieved, limit, met) == (pytest.approx(30.0), 30.0, True)
    assert not MaxDVH("s", 7.5, 20.0).achieved(d)[2]
    assert MinDVH("s", 3.0, 80.0).achieved(d)[2]  # 3..10: 80 %
    assert not MinDVH("s", 3.5, 80.0).achieved(d)[2]
    # Wu & Mohan: only voxels above 7.5 Gy outside the hottest 20 % (i.e. 8 Gy) pay.
    value, grad = MaxDVH("s", 7.5, 20.0).objective(d)
    assert value == pytest.approx(0.5**2 / 10)
    assert np.flatnonzero(grad).tolist() == [7]


def test_evaluate_goals_reports_constraints_by_amount():
    d = np.array([10.0, 20.0, 30.0, 40.0])
    res = evaluate_goals(d, [MaxDose("a", 25.0, constraint=True), MinDose("a", 5.0, constraint=True)],
                         {"a": np.arange(4)})
    assert not res[0].met and res[0].shortfall == pytest.approx(15.0) and res[0].value == pytest.approx(15.0)
    assert res[1].met and res[1].shortfall == 0.0
    assert "missed by 15 Gy" in str(res[0])


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: MinDose("PTV", -1.0), "MinDose.dose_gy"),
        (lambda: MinDose("PTV", float("nan")), "MinDose.dose_gy"),
        (lambda: MinDose("", 50.0), "MinDose.structure"),
        (lambda: MinDose("PTV", 50.0, importance=0.0), "MinDose.importance"),
        (lambda: MinDose("PTV", 50.0, constraint="yes"), "MinDose.constraint"),
        (lambda: MaxDVH("PTV", 20.0, 101.0), "MaxDVH.volume_pct"),
        (lambda: MaxEUD("Cord", 20.0, 0.0), "MaxEUD.a"),
        (lambda: UniformDose("PTV", 60.0, constraint=True), "UniformDose.constraint"),
    ],
)
def test_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_goals_are_frozen():
    g = MinDose("PTV", 50.0)
    with pytest.raises(AttributeError):
        g.dose_gy = 10.0  # type: ignore[misc]
