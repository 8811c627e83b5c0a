"""Auto weight four ways: known optima of small constructed problems, infeasibility, the
seed's objective term by term, the cooling schedule, and the four-field box."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.planning import (
    AutoWeightInfeasible, AutoWeightProblem, VolumeGoal, auto_weight, objective, objective_terms, search_upper_limit,
    solve_annealing, solve_cimmino, solve_downhill, solve_simplex,
)
from ids_engine.planning._autoweight import annealing_steps

# Two beams, a target of two points and an OAR of one point (doses per MU, Gy/MU).
T = np.array([[1.0, 0.5], [0.5, 1.0]])
O = np.array([[0.2, 0.6]])


def small(oar_max=None, target_min=1.0, oar_importance=1.0, penalty=10.0):
    goals = (VolumeGoal("T", "target", target_min, None, 1.0, penalty), VolumeGoal("O", "oar", None, oar_max, oar_importance, penalty))
    return AutoWeightProblem(goals, (T, O), ("B1", "B2"))


def test_simplex_known_optimum_by_hand():
    # min c.mu, c = (1/2) * (1.5, 1.5) + (0.2, 0.6) = (0.95, 1.35), subject to
    # mu1 + 0.5 mu2 >= 1 and 0.5 mu1 + mu2 >= 1: the vertices (2, 0), (2/3, 2/3), (0, 2)
    # cost 1.9, 1.533, 2.7.
    r = solve_simplex(small())
    assert r.mu == pytest.approx((2 / 3, 2 / 3), abs=1e-9) and r.feasible
    # An OAR maximum of 0.5 Gy cuts (2/3, 2/3) (0.533 Gy) off: the optimum moves to where
    # 0.5 mu1 + mu2 = 1 meets 0.2 mu1 + 0.6 mu2 = 0.5, i.e. (1, 0.5), cost 1.625 < 1.9 at (2, 0).
    r = solve_simplex(small(oar_max=0.5))
    assert r.mu == pytest.approx((1.0, 0.5), abs=1e-9) and r.feasible


def test_simplex_infeasible_names_the_limit_to_move():
    # The least OAR dose that still covers the target is 0.4 Gy (at mu = (2, 0)): a maximum
    # of 0.3 Gy is infeasible, and raising it by 0.1 Gy is the smallest change.
    with pytest.raises(AutoWeightInfeasible, match=r"O maximum 0\.3 Gy \(needs raising by 0\.1 Gy\)") as err:
        solve_simplex(small(oar_max=0.3))
    (v,) = err.value.violations
    assert (v.volume, v.limit, v.limit_gy) == ("O", "maximum", 0.3) and v.amount_gy == pytest.approx(0.1)
    # A target the beams do not reach: its minimum is what must move.
    goals = (VolumeGoal("T", "target", 1.0), VolumeGoal("X", "target", 1.0))
    prob = AutoWeightProblem(goals, (T, np.zeros((3, 2))), ("B1", "B2"))
    with pytest.raises(AutoWeightInfeasible, match=r"X minimum 1 Gy \(needs lowering by 1 Gy\)"):
        solve_simplex(prob)


def test_objective_term_by_term_by_hand():
    prob = small(oar_max=0.1, penalty=10.0)
    mu = np.array([1.0, 0.0])  # target doses (1, 0.5), OAR dose 0.2
    terms = {(v, t): x for v, t, x in objective_terms(prob, mu)}
    assert terms[("T", "target (d - min)^2")] == pytest.approx((0.0 + 0.25) / 2)  # importance 1, 2 points
    assert terms[("T", "target below min")] == pytest.approx(10.0 * 1 / 2)  # penalty at the one point below
    assert terms[("O", "above max")] == pytest.approx(10.0 * 1.0 * 1 / 1)  # penalty x importance
    assert terms[("O", "OAR d^2")] == pytest.approx(0.04)
    assert objective(prob, mu) == pytest.approx(0.125 + 5.0 + 10.0 + 0.04)
    # The fast closure the solvers use is the same function.
    from ids_engine.planning._autoweight import _objective_fn

    f = _objective_fn(prob)
    for m in ([1.0, 0.0], [0.7, 0.9], [3.0, 0.1]):
        assert f(np.array(m)) == pytest.approx(objective(prob, m), rel=1e-12)


def test_downhill_finds_the_penalty_objective_minimum():
    # One beam, a target point at 0.5 Gy/MU (min 1 Gy) and an OAR point at 0.2 Gy/MU: below
    # 2 MU the penalty (10) dominates; above, (0.5 mu - 1)^2 + (0.2 mu)^2 grows: minimum at 2 MU.
    goals = (VolumeGoal("T", "target", 1.0, penalty=10.0), VolumeGoal("O", "oar"))
    prob = AutoWeightProblem(goals, (np.array([[0.5]]), np.array([[0.2]])), ("B",))
    r = solve_downhill(prob, start_mu=[5.0], tolerance_mu=1e-4)
    assert r.mu[0] == pytest.approx(2.0, abs=1e-3) and r.feasible
    # Without the OAR and with a smooth target term only, the minimum is 2 MU from either side.
    r2 = solve_downhill(AutoWeightProblem(goals[:1], (np.array([[0.5]]),), ("B",)), start_mu=[0.5], tolerance_mu=1e-5)
    assert r2.mu[0] == pytest.approx(2.0, abs=1e-3)


def test_cimmino_projection_and_stop_rule():
    # One constraint 0.5 mu >= 1 from mu = 0: the projection lands on mu = 2 in one step;
    # the next step moves 0 MU, below the stop distance: two iterations.
    prob = AutoWeightProblem((VolumeGoal("T", "target", 1.0),), (np.array([[0.5]]),), ("B",))
    r = solve_cimmino(prob)
    assert r.mu == pytest.approx((2.0,)) and r.iterations == 2 and "converged" in r.message
    # The small problem: feasible, every target point covered (to the stop distance).
    r = solve_cimmino(small(), stop_distance_mu=1e-6, max_iterations=100000)
    assert min(T @ np.array(r.mu)) >= 1.0 - 1e-5
    # An OAR without a maximum is ignored: the same answer with or without it.
    alone = AutoWeightProblem((VolumeGoal("T", "target", 1.0),), (T,), ("B1", "B2"))
    assert solve_cimmino(alone, stop_distance_mu=1e-6, max_iterations=100000).mu == pytest.approx(r.mu)
    # The iteration limit stops it.
    assert solve_cimmino(small(oar_max=0.0), max_iterations=7).iterations == 7


def test_cimmino_compromise_follows_importance():
    """Infeasible limits (OAR maximum 0): a compromise, and more target importance gives more
    target dose."""
    doses = []
    for imp in (1.0, 10.0):
        goals = (VolumeGoal("T", "target", 1.0, importance=imp), VolumeGoal("O", "oar", None, 0.0, 1.0))
        r = solve_cimmino(AutoWeightProblem(goals, (T, O), ("B1", "B2")), stop_distance_mu=1e-6, max_iterations=20000)
        assert not r.feasible
        doses.append(float((T @ np.array(r.mu)).min()))
    assert 0.0 < doses[0] < doses[1] < 1.0  # short of the minimum, less so with more importance


def test_annealing_cooling_schedule_and_best_seen():
    prob = small()
    r = solve_annealing(prob, sd0_mu=2.0, iterations_per_step=10, increment=0.01, seed=3)
    # sd = 2 exp(-0.01 k) >= 0.5 for k = 0 .. 138: 139 steps of 10 iterations.
    assert annealing_steps(2.0, 0.01, 0.5) == 139 == int(np.floor(np.log(4.0) / 0.01)) + 1
    assert r.iterations == 1390
    again = solve_annealing(prob, sd0_mu=2.0, iterations_per_step=10, increment=0.01, seed=3)
    assert again.mu == r.mu  # seeded
    assert r.objective <= objective(prob, prob.start_mu())  # the best seen is never worse than the start
    assert r.feasible
    # Five iterations per step and twice the increment: a quarter of the iterations.
    quick = solve_annealing(prob, sd0_mu=2.0, iterations_per_step=5, increment=0.02, seed=3)
    assert quick.iterations == 5 * annealing_steps(2.0, 0.02, 0.5) == 5 * 70
    # Starting below 0.5 MU of spread: nothing to do, the start is returned.
    assert solve_annealing(prob, sd0_mu=0.4).iterations == 0


def test_binary_search_on_an_upper_limit_follows_the_seed():
    # The OAR can be held to 0.4 Gy at best: start at the target dose (1 Gy, feasible), halve
    # (0.5, feasible), halve (0.25, infeasible), then midway between infeasible and feasible.
    s = search_upper_limit(small(), "O", tolerance_gy=1e-3)
    assert [t for t, _ in s.trials[:5]] == pytest.approx([1.0, 0.5, 0.25, 0.375, 0.4375])
    assert [ok for _, ok in s.trials[:5]] == [True, True, False, False, True]
    assert s.limit_gy == pytest.approx(0.4, abs=1e-3) and s.limit_gy >= 0.4
    assert s.result.mu == pytest.approx((2.0, 0.0), abs=0.01)
    with pytest.raises(AutoWeightInfeasible, match="start from a higher limit"):
        search_upper_limit(small(), "O", start_gy=0.2)


def test_goals_are_checked():
    with pytest.raises(ValueError, match="target 'T' needs a minimum dose"):
        VolumeGoal("T", "target")
    with pytest.raises(ValueError, match="OAR 'O': an OAR has no minimum"):
        VolumeGoal("O", "oar", min_gy=1.0)
    with pytest.raises(ValueError, match="needs a target"):
        AutoWeightProblem((VolumeGoal("O", "oar"),), (O,), ("B1", "B2"))
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        auto_weight(small(), "newton")


# ----------------------------------------------------------------------------- the four-field box
BOX_GOALS = (VolumeGoal("PTV", "target", 2.0, None, 1.0, 10.0), VolumeGoal("BODY", "oar", importance=1.0))


def test_four_field_box_four_ways(box):
    patient, plan, doses = box
    passes = doses.engine_passes
    prob = AutoWeightProblem.from_doses(doses, patient, BOX_GOALS, max_points=1500, seed=0)
    res = {m: auto_weight(prob, m) for m in ("simplex", "cimmino", "downhill", "annealing")}
    ptv = [patient.structure("PTV").mask]
    for m, r in res.items():
        d = doses.dose(r.mu)[ptv[0]]
        assert d.min() >= 2.0 * (0.99 if m == "cimmino" else 0.999), m  # every method covers the target
        assert d.max() <= 2.0 * 1.1, m
    # The seed's remark: without an upper limit on the body outside the target, the simplex
    # takes the AP/PA pair (less water to cross: 100 mm against 150 mm) and leaves the laterals out.
    ap, ll, pa, rl = res["simplex"].mu
    assert ll == pytest.approx(0.0, abs=1e-6) and rl == pytest.approx(0.0, abs=1e-6) and ap > 100 and pa > 100
    # The squared OAR dose of the downhill search and annealing spreads the dose over all four.
    for m in ("downhill", "annealing"):
        assert min(res[m].mu) > 30, m
    # Downhill and annealing minimise the same objective, and reach nearly the same value.
    assert res["annealing"].objective == pytest.approx(res["downhill"].objective, rel=0.05)
    assert doses.engine_passes == passes  # solving ran no dose computation


def test_four_field_box_ring_limit_spreads_the_simplex(box):
    patient, plan, doses = box
    goals = BOX_GOALS + (VolumeGoal("RING", "oar", importance=0.0),)
    prob = AutoWeightProblem.from_doses(doses, patient, goals, max_points=1500, seed=0)
    passes = doses.engine_passes
    s = search_upper_limit(prob, "RING", tolerance_gy=0.02)
    assert doses.engine_passes == passes
    free = solve_simplex(prob)
    ring = prob.rates[2]
    assert (ring @ np.array(s.result.mu)).max() <= s.limit_gy + 1e-9 < (ring @ np.array(free.mu)).max()
    ap, ll, pa, rl = s.result.mu
    assert min(ll, rl) > 0.5 * max(ap, pa)  # the laterals now carry a good share
    # With the limit a little lower the problem is infeasible, and the error names the ring.
    tight = prob.with_goals(BOX_GOALS + (VolumeGoal("RING", "oar", None, s.limit_gy - 0.1, 0.0),))
    with pytest.raises(AutoWeightInfeasible, match="RING maximum"):
        solve_simplex(tight)
    # A new problem with other limits reuses the cached samples (same arrays).
    again = AutoWeightProblem.from_doses(doses, patient, goals, max_points=1500, seed=0)
    assert all(a is b for a, b in zip(again.rates, prob.rates))


def test_progress_and_cancel():
    seen = []
    r = solve_annealing(small(), sd0_mu=2.0, progress=lambda d, t, lab: seen.append((d, t, lab)))
    assert seen[-1] == (139, 139, "annealing") and len(seen) == 139
    calls = [0]

    def stop():
        calls[0] += 1
        return calls[0] > 5

    r = solve_annealing(small(), sd0_mu=2.0, cancel=stop)
    assert r.iterations == 50 and r.message.startswith("cancelled")
    r = solve_downhill(small(), cancel=lambda: True)
    assert r.iterations <= 2 and r.message.startswith("cancelled")
    r = solve_cimmino(small(oar_max=0.0), stop_distance_mu=1e-12, max_iterations=10000, relaxation=0.01,
                      cancel=lambda: True)
    assert r.iterations == 100 and r.message.startswith("cancelled")
