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
