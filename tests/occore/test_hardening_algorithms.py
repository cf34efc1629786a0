"""Class 9 of issue 13: tests that a wrong implementation cannot pass, against independent
computations (finite differences of the user's own functions, the exact quadratic model of an LQR).

* DDP's gains are those of the Q function l + V'(f) with V' the quadratic value model of the next
  stage, differentiated twice by finite differences of the numpy problem functions; this includes
  the dynamics' second derivatives contracted with V_x' (dropping them, iLQR, is caught).
* The expected decrease of a step alpha, -(alpha d1 + alpha^2 d2 / 2), equals the actual decrease
  on an LQR for every alpha (the model is exact there); a lost 1/2 is caught.
Each was checked by planting the bug (DDP without dynamics Hessians; the line search's expected
decrease without its 1/2) and seeing these tests fail.
"""
import numpy as np
import pytest

import occore
from occore import DDP, ILQR, LineSearch, Regularization

H = 1e-4


def _grad_hess(q, z):
    """Central-difference gradient and Hessian of a scalar function q at z."""
    n = z.size
    E = np.eye(n) * H
    g = np.array([(q(z + E[i]) - q(z - E[i])) / (2 * H) for i in range(n)])
    Hs = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            Hs[i, j] = Hs[j, i] = (q(z + E[i] + E[j]) - q(z + E[i] - E[j]) - q(z - E[i] + E[j])
                                   + q(z - E[i] - E[j])) / (4 * H * H)
    return g, Hs


def fd_ddp_gains(prob, xs, us):
    """k, K of full DDP at (xs, us), mu = 0, by finite differences of the problem's functions."""
    T, nx = us.shape[0], xs.shape[1]
    f, l, lf = prob.dynamics, prob.stage_cost, prob.terminal_cost
    Vx, Vxx = _grad_hess(lambda x: float(lf(x)), xs[T])
    k, K = np.empty(us.shape), np.empty((T,) + us.shape[1:] + (nx,))
    for t in range(T - 1, -1, -1):
        fbar = xs[t + 1]

        def q(z, Vx=Vx, Vxx=Vxx, fbar=fbar):
            dx = np.asarray(f(z[:nx], z[nx:]), dtype=float) - fbar
            return float(l(z[:nx], z[nx:])) + Vx @ dx + 0.5 * dx @ Vxx @ dx

        g, Hq = _grad_hess(q, np.concatenate([xs[t], us[t]]))
        Qx, Qu = g[:nx], g[nx:]
        Qxx, Qux, Quu = Hq[:nx, :nx], Hq[nx:, :nx], Hq[nx:, nx:]
        k[t] = -np.linalg.solve(Quu, Qu)
        K[t] = -np.linalg.solve(Quu, Qux)
        Vx = Qx + K[t].T @ Quu @ k[t] + K[t].T @ Qu + Qux.T @ k[t]
        Vxx = Qxx + K[t].T @ Quu @ K[t] + K[t].T @ Qux + Qux.T @ K[t]
        Vxx = 0.5 * (Vxx + Vxx.T)
    return k, K


@pytest.fixture(scope="module")
def unicycle_point():
    """The unicycle (dynamics with cross terms in (v, theta)) at a non-optimal trajectory, where
    V_x' is far from zero; numpy functions for the differences, casadi for the solvers."""
    fd = occore.problems.make("unicycle", backend="finite_difference", horizon=8)
    cas = occore.problems.make("unicycle", horizon=8)
    us = 0.3 * np.random.default_rng(3).standard_normal((8, 2)) + [0.5, 0.2]
    return fd, cas, us, fd.rollout(us).xs


def _first_policy(solver, prob, us):
    state = solver.init(prob, us, mu=0.0)
    new, _ = solver.step(prob, state)
    return new.policy


def test_ddp_gains_equal_finite_differences_of_the_q_function(unicycle_point):
    fd, cas, us, xs = unicycle_point
    k, K = fd_ddp_gains(fd, xs, us)
    policy = _first_policy(DDP(regularization=Regularization(initial=0.0, minimum=0.0)), cas, us)
    scale = max(np.abs(K).max(), 1.0)
    np.testing.assert_allclose(policy.K, K, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(policy.k, k, rtol=0, atol=1e-6 * max(np.abs(k).max(), 1.0))


def test_the_test_tells_ddp_from_ilqr(unicycle_point):
    """iLQR's gains (no dynamics Hessians) are far from the second-order ones at this point, so the
    test above fails for a DDP that drops them."""
    fd, cas, us, xs = unicycle_point
    k, K = fd_ddp_gains(fd, xs, us)
    policy = _first_policy(ILQR(regularization=Regularization(initial=0.0, minimum=0.0)), cas, us)
    assert np.abs(policy.K - K).max() > 1e-3 * max(np.abs(K).max(), 1.0)


@pytest.mark.parametrize("solver_cls", [ILQR, DDP])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.25])
def test_expected_decrease_equals_the_actual_one_on_an_lqr(solver_cls, alpha):
    prob = occore.problems.make("lqr")
    solver = solver_cls(line_search=LineSearch(steps=(alpha,)),
                        regularization=Regularization(initial=0.0, minimum=0.0))
    state = solver.init(prob, mu=0.0)
    state, info = solver.step(prob, state)
    assert info.accepted and info.step == alpha
    assert info.expected_decrease == pytest.approx(info.actual_decrease, rel=1e-9)
    # exact Riccati: d2 = -d1, so the full step's expected decrease (the stop value) is -d1 / 2
    # and the step alpha's is 2 alpha (1 - alpha / 2) times it
    assert info.stop == pytest.approx(info.expected_decrease / (2 * alpha * (1 - alpha / 2)), rel=1e-9)


def test_expected_decrease_matches_the_cost_for_small_steps_on_a_nonlinear_problem():
    """Away from the LQ case the model is exact to second order: actual / expected -> 1."""
    prob = occore.problems.make("pendulum")
    solver = ILQR(line_search=LineSearch(steps=(1e-3,)))
    _, info = solver.step(prob, solver.init(prob))
    assert info.actual_decrease / info.expected_decrease == pytest.approx(1.0, abs=1e-3)


# -- the line search's bookkeeping, the stochastic step, the mixed model (mutation survivors) ---

def _cost_chain_holds(prob, res, steps):
    """Each IterationInfo against the cost before it: an accepted iteration (a line-search step, or
    the polish of a converged one) moved the cost by exactly actual_decrease with a step length of
    the line search; a rejected one kept the cost and reports step 0."""
    before = prob.rollout(prob.initial_controls()).cost
    for h in res.history:
        if h.accepted:
            assert h.step in steps and h.actual_decrease == pytest.approx(before - h.cost, rel=1e-12,
                                                                          abs=1e-300)
            assert h.cost <= before * (1 + 1e-14)         # descent (single shooting never rises)
        else:
            assert h.step == 0.0 and h.cost == before
        before = h.cost
    return res


FULL_STEPS = LineSearch(steps=(1.0,))       # no backtracking: rejected iterations raise mu


@pytest.mark.parametrize("name, solver", [("pendulum", ILQR()), ("cartpole", DDP()), ("lqr", ILQR()),
                                          ("pendulum_box", ILQR(tol=1e-1)), ("unicycle", DDP(tol=1.0)),
                                          ("pendulum", ILQR(line_search=FULL_STEPS)),
                                          ("unicycle", DDP(line_search=FULL_STEPS))])
def test_every_iteration_reports_its_own_cost_change(name, solver):
    prob = occore.problems.make(name)
    res = _cost_chain_holds(prob, solver.solve(prob), solver.options.line_search.steps)
    if solver.options.line_search is FULL_STEPS:
        assert any(not h.accepted for h in res.history[:-1])      # rejections occurred
    best = min([prob.rollout(prob.initial_controls()).cost] + [h.cost for h in res.history])
    assert res.converged and res.cost == pytest.approx(best, rel=1e-14)


def test_converged_iterations_polish_or_keep_the_iterate():
    """The converged iteration takes its remaining full step when that does not raise the cost
    (step 1, accepted: the LQR), else keeps the iterate (step 0, not accepted: the cart-pole with a
    loose tolerance, where the full step of the last model raises the cost)."""
    for name, solver, polished in (("lqr", ILQR(), True), ("pendulum", DDP(), True),
                                   ("cartpole", ILQR(tol=10.0), False),
                                   ("pendulum_box", DDP(tol=1.0), False)):
        prob = occore.problems.make(name)
        res = _cost_chain_holds(prob, solver.solve(prob), solver.options.line_search.steps)
        last = res.history[-1]
        assert res.converged and (last.accepted, last.step) == ((True, 1.0) if polished else (False, 0.0))
        if not polished:
            policy = res.policy
            full = prob.rollout_policy(occore.Trajectory(res.xs, res.us, res.cost), policy, 1.0)
            assert full.cost > res.cost * (1 + 1e-14)


def test_every_trial_non_finite_ends_non_finite_with_the_best_iterate():
    """x+ = x + 0.1 u with |u| <= 0.5 (the dynamics raise outside) from x0 = 3: the unconstrained
    optimum wants |u| > 0.5, so after two steps every line-search trial leaves the domain."""
    def f(x, u):
        if abs(u[0]) > 0.5:
            raise ValueError("u outside the dynamics' domain")
        return x + 0.1 * u

    prob = occore.Problem(f, lambda x, u: x @ x + u @ u, lambda x: 100 * x @ x, x0=[3.0], nu=1,
                          horizon=10, backend="finite_difference")
    res = ILQR().solve(prob)
    assert res.status is occore.Status.NON_FINITE, res.summary()
    assert res.message == "every line-search trial gave a non-finite cost"
    last = res.history[-1]
    assert not last.accepted and last.step == 0.0 and res.iterations < 10
    assert res.cost == last.cost == pytest.approx(prob.rollout(res.us).cost, rel=1e-12)
    assert np.all(np.abs(res.us) <= 0.5)


def test_stochastic_iterations_take_the_full_step_without_a_cost_check():
    """``stochastic=True`` on the LQR: the full step is the Riccati solution (the optimum), its
    expected decrease is exact; later iterations keep taking full steps (no convergence test) and
    the regularisation the caller gave is kept (no second look at the baseline)."""
    prob = occore.problems.make("lqr")
    initial = prob.rollout(prob.initial_controls()).cost
    opt = occore.problems.OPTIMA["lqr"]
    res = ILQR(stochastic=True, max_iter=3).solve(prob)
    assert res.status is occore.Status.MAX_ITER and res.iterations == 3
    first = res.history[0]
    assert first.cost == pytest.approx(opt, rel=1e-9) and first.step == 1.0 and first.accepted
    assert first.expected_decrease == pytest.approx(initial - opt, rel=1e-6)
    assert first.actual_decrease == pytest.approx(initial - opt, rel=1e-9)
    assert first.stop == first.expected_decrease
    assert all(h.step == 1.0 for h in res.history)
    # a huge mu: the step is ~ -Q_u / mu, the cost barely moves, and mu is not reset
    big = 1e11
    solver = ILQR(stochastic=True, max_iter=1, regularization=Regularization(maximum=1e13, fixed=True))
    res = solver.solve(prob, mu=big)
    h = res.history[0]
    assert 0 < initial - h.cost < 1e-8 and h.regularization == big
    assert h.expected_decrease == pytest.approx(initial - h.cost, rel=1e-3)


def test_second_order_below_switches_to_ddp_iterations():
    """With ``second_order_below`` an iteration after a full step's expected decrease below it is a
    DDP iteration (the dynamics Hessians, pinned by finite differences above): from the same
    state, its policy is DDP's, not iLQR's; the first iteration (no history) is Gauss-Newton."""
    prob = occore.problems.make("unicycle", horizon=8)
    us = 0.3 * np.random.default_rng(3).standard_normal((8, 2)) + [0.5, 0.2]
    us = ILQR(max_iter=4).solve(prob, us).us        # near the optimum: a stop value well below 1
    mixed = ILQR(second_order_below=1e300)
    state = mixed.init(prob, us, mu=0.0)
    new, info = mixed.step(prob, state)
    assert 0 < info.stop < 1e-3
    np.testing.assert_allclose(new.policy.K, _first_policy(ILQR(), prob, us).K, rtol=1e-10, atol=1e-12)
    new = type(new)(**{**new.__dict__, "mu": 0.0})
    after, _ = mixed.step(prob, new)
    ddp_state = DDP().init(prob, traj=new.traj, mu=0.0)
    ilqr_state = ILQR().init(prob, traj=new.traj, mu=0.0)
    ddp, ilqr = DDP().step(prob, ddp_state)[0].policy, ILQR().step(prob, ilqr_state)[0].policy
    assert np.abs(ddp.K - ilqr.K).max() > 1e-6
    np.testing.assert_allclose(after.policy.K, ddp.K, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(after.policy.k, ddp.k, rtol=1e-10, atol=1e-12)
    # below a threshold the stop value never reaches, every iteration stays Gauss-Newton
    never = ILQR(second_order_below=0.0)
    state = never.step(prob, never.init(prob, us, mu=0.0))[0]
    np.testing.assert_allclose(never.step(prob, type(state)(**{**state.__dict__, "mu": 0.0}))[0].policy.K,
                               ilqr.K, rtol=1e-10, atol=1e-12)
