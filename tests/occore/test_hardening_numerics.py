"""Class 3 of issue 13: numerical trouble always ends a solve with a status and the best iterate,
on every backend: user functions that raise at a trial point, E-MSA diverging without its adaptive
schedule, a regularisation schedule that can never reach its limit."""
import casadi as ca
import numpy as np
import pytest

import occore
from occore import DDP, EMSA, ILQR, Regularization, Status


def _domain_problem():
    """x+ = x + 0.1 u on a domain |u| <= 0.5 (the numpy dynamics raise outside it); the optimum
    from x0 = 3 wants |u| > 0.5 at the first stages, so trials and differences leave the domain.
    (The casadi and torch backends trace the functions once, symbolically, so a raise at a value
    can only happen with finite differences; the guard is the Problem's, for every backend.)"""
    def f(x, u):
        if abs(u[0]) > 0.5:
            raise ValueError("u outside the dynamics' domain")
        return x + 0.1 * u

    return occore.Problem(f, lambda x, u: x @ x + u @ u, lambda x: 100 * x @ x, x0=[3.0], nu=1,
                          horizon=10, backend="finite_difference")


@pytest.mark.parametrize("solver", [ILQR(), DDP(), EMSA(max_iter=50)], ids=lambda s: s.name)
def test_a_function_raising_at_a_trial_ends_with_a_status(solver, caplog):
    prob = _domain_problem()
    initial = prob.rollout(prob.initial_controls()).cost
    res = solver.solve(prob)                       # no exception escapes
    assert res.status in (Status.NON_FINITE, Status.LINE_SEARCH_FAILED, Status.REG_LIMIT,
                          Status.MAX_ITER, Status.CONVERGED), res.summary()
    assert np.isfinite(res.cost) and res.cost < initial
    assert np.all(np.abs(res.us) <= 0.5)
    assert res.cost == pytest.approx(prob.rollout(res.us).cost, rel=1e-12)
    assert any("raised" in r.getMessage() for r in caplog.records)


def test_a_trial_outside_the_domain_is_a_nan_trajectory():
    prob = _domain_problem()
    traj = prob.rollout(np.ones((10, 1)))
    assert np.isnan(traj.cost) and traj.xs.shape == (11, 1)


def test_derivatives_that_raise_are_non_finite():
    prob = _domain_problem()
    d = prob.evaluate_derivatives(np.zeros((11, 1)), np.full((10, 1), 0.5), second_order=True)
    assert np.isnan(d.fx).all() and d.fxx.shape == (10, 1, 1, 1)
    lm = prob.local_model(prob.rollout(np.full((10, 1), 0.5)))
    policy, (d1, d2) = lm.backward(0.0)
    assert np.isnan(d1) and np.isnan(policy.k).all()


def _exploding():
    return occore.Problem(lambda x, u: x + u, lambda x, u: 0.5 * ca.sumsqr(u), lambda x: 5e3 * ca.sumsqr(x),
                          x0=[1.0], nu=1, horizon=5)


def test_emsa_non_finite_returns_its_best_iterate_not_its_last():
    prob = _exploding()
    res = EMSA(rho=1e-3, adaptive_rho=False, max_iter=400).solve(prob)
    costs = [prob.rollout(prob.initial_controls()).cost] + [h.cost for h in res.history]
    assert res.status is Status.NON_FINITE and max(c for c in costs if np.isfinite(c)) > 1e100
    assert res.cost == min(c for c in costs if np.isfinite(c))
    assert res.cost == prob.rollout(res.us).cost and "best iterate" in res.message


@pytest.mark.parametrize("factor", [1.000001, 1.0 + 1e-12])
def test_a_regularisation_factor_barely_above_one_cannot_hang(factor):
    prob = occore.problems.make("cartpole")          # full DDP meets indefinite Q_uu here
    res = DDP(regularization=Regularization(factor=factor), max_iter=50).solve(prob)
    assert res.status is Status.REG_LIMIT, res.summary()
    assert "after 100 regularisation increases" in res.message and np.isfinite(res.cost)
    assert res.cost <= prob.rollout(prob.initial_controls()).cost
    # exactly MAX_RAISES regularised retries of the backward pass: the 101st increase ends it
    before = res.history[-2].regularization if len(res.history) > 1 else Regularization().initial
    assert res.history[-1].regularization == pytest.approx(before * factor ** 101, rel=1e-13)


@pytest.mark.parametrize("weight, initial, maximum, ok", [(1.0, 1.0, 2.5, True), (1.0, 1.0, 2.4999, False),
                                                         (0.1, 0.1, 1.0, True), (0.1, 0.1, 0.9999, False)])
def test_a_regularisation_equal_to_its_cap_is_allowed(weight, initial, maximum, ok):
    """The solve stops when mu would exceed its cap, ``maximum`` times max(1, the largest entry of
    the cost Hessians), so mu = cap is still tried. One stage, l = x^2 + (u^2 - 1)^2 (concave in u
    at 0: Q_uu = -4 + 1; the cost Hessians' largest entry |l_uu| = 4), mu from 1 by factor 10: the
    backward pass fails at mu = 1 and succeeds at mu = 10 = 2.5 * 4; the optimum is u = -1 (cost 1).
    The cost weighted by 0.1 (largest entry 0.4 < 1: the cap is ``maximum`` itself): Q_uu = -0.4 +
    0.1 + mu fails at mu = 0.1 and succeeds at mu = 1."""
    prob = occore.Problem(lambda x, u: x + u, lambda x, u: weight * (ca.sumsqr(x) + (u[0] ** 2 - 1) ** 2),
                          lambda x: weight * 0.5 * ca.sumsqr(x), x0=[1.0], nu=1, horizon=1)
    res = ILQR(regularization=Regularization(initial=initial, minimum=0.0, maximum=maximum,
                                             factor=10.0)).solve(prob)
    if ok:
        assert res.converged and res.us[0, 0] == pytest.approx(-1.0, abs=1e-6)
        assert res.cost == pytest.approx(weight, abs=1e-10)
    else:
        assert res.status is Status.REG_LIMIT and res.iterations == 1 and res.us[0, 0] == 0.0


def test_the_default_schedule_is_unaffected_by_the_bound():
    res = DDP().solve(occore.problems.make("cartpole"))
    assert res.converged and res.cost == pytest.approx(occore.problems.OPTIMA["cartpole"], rel=1e-6)


def _torch_domain_problem(batched):
    """``_domain_problem`` with the torch backend. The raise depends on a value, so it can happen
    only where the rollouts run eagerly (compiled code never calls the user's function, and the
    vmapped derivatives, whose inputs are functorch-wrapped tensors, skip the check). ``batched``:
    the line search asks for its trials 4 at a time (``rollout_batch``), as it does once the
    single-trial rollout is compiled (or due to be), while the batched rollout itself stays eager
    (its compilation failed: dynamo cannot trace ``float(u[0])``): the fallback of
    ``Problem.rollout_policies`` then rolls each trial out alone."""
    torch = pytest.importorskip("torch")
    from torch._C._functorch import is_functorch_wrapped_tensor

    def f(x, u):
        if not is_functorch_wrapped_tensor(u) and abs(float(u[0])) > 0.5:
            raise ValueError("u outside the dynamics' domain")
        return x + 0.1 * u

    prob = occore.Problem(f, lambda x, u: x @ x + u @ u, lambda x: 100 * x @ x, x0=[3.0], nu=1,
                          horizon=10, backend="torch", backend_options={"compile": "never"})
    if batched:
        prob._backend.fast["rollout_policy"].mode = "always"
    assert prob.rollout_batch == (4 if batched else 1)
    return prob, torch


def test_a_function_raising_in_a_batched_trial_gives_nan_for_that_trial_only(caplog):
    prob, _ = _torch_domain_problem(batched=True)
    traj = prob.rollout(np.zeros((10, 1)))
    policy = occore.Policy(k=np.full((10, 1), -0.8), K=np.zeros((10, 1, 1)))
    steps = [1.0, 0.5, 0.25, 0.125]                 # |u| = 0.8, 0.4, 0.2, 0.1: only the first raises
    trials = prob.rollout_policies(traj, policy, steps)
    assert len(trials) == 4 and np.isnan(trials[0].cost) and np.isnan(trials[0].us).all()
    assert any("raised during a rollout" in r.getMessage() for r in caplog.records)
    for alpha, trial in zip(steps[1:], trials[1:]):
        us = np.full((10, 1), -0.8 * alpha)         # the closed form of x+ = x + 0.1 u from x0 = 3
        xs = 3.0 + 0.1 * np.concatenate([[[0.0]], np.cumsum(us, axis=0)])
        cost = float((xs[:-1] ** 2).sum() + (us ** 2).sum() + 100 * xs[-1, 0] ** 2)
        np.testing.assert_allclose(trial.us, us, rtol=0, atol=1e-15)
        np.testing.assert_allclose(trial.xs, xs, rtol=1e-14)
        assert trial.cost == pytest.approx(cost, rel=1e-13)


def test_a_function_raising_in_a_batched_line_search_ends_like_the_single_trial_path(caplog):
    batched, _ = _torch_domain_problem(batched=True)
    single, _ = _torch_domain_problem(batched=False)
    initial = batched.rollout(batched.initial_controls()).cost
    for solver in (ILQR(), DDP()):
        caplog.clear()
        res = solver.solve(batched)                # no exception escapes
        ref = solver.solve(single)
        assert batched.rollout_batch == 4
        assert any("raised during a rollout" in r.getMessage() for r in caplog.records)
        assert res.status is ref.status and res.status in (Status.NON_FINITE, Status.LINE_SEARCH_FAILED,
                                                           Status.MAX_ITER, Status.CONVERGED)
        assert res.iterations == ref.iterations and res.message == ref.message
        np.testing.assert_allclose(res.us, ref.us, rtol=0, atol=1e-13)
        assert np.isfinite(res.cost) and res.cost < initial and np.all(np.abs(res.us) <= 0.5)
        assert res.cost == pytest.approx(single.rollout(res.us).cost, rel=1e-12)
        assert res.cost == min(h.cost for h in res.history if np.isfinite(h.cost))   # the best iterate
