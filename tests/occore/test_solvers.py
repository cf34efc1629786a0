"""DDP and iLQR against the optima of REFERENCE.md and closed forms (casadi backend)."""
import time

import numpy as np
import pytest
import scipy.linalg

import occore
from occore.problems import LQR_A, LQR_B, OPTIMA

SOLVERS = [occore.DDP, occore.ILQR]


@pytest.fixture(scope="module")
def zoo():
    return {name: occore.problems.make(name) for name in occore.problems.NAMES}


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
@pytest.mark.parametrize("name", occore.problems.NAMES)
def test_reaches_reference_optimum(zoo, solver, name):
    prob = zoo[name]
    res = solver().solve(prob)
    gap = abs(res.cost - OPTIMA[name]) / OPTIMA[name]
    assert res.status is occore.Status.CONVERGED, res.summary()
    assert res.converged
    assert gap <= (1e-6 if name == "pendulum_box" else 1e-8), gap
    # The returned trajectory is consistent: rolling out its controls gives its states and cost.
    again = prob.rollout(res.us)
    np.testing.assert_allclose(again.xs, res.xs, rtol=0, atol=1e-12)
    assert again.cost == pytest.approx(res.cost, rel=1e-13)
    if prob.bounded:
        assert np.all(res.us >= prob.u_lower) and np.all(res.us <= prob.u_upper)
        assert np.abs(res.us).max() == pytest.approx(2.0)  # the box is active at the optimum


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_cartpole_within_150_iterations(zoo, solver):
    res = solver().solve(zoo["cartpole"])
    assert res.converged and res.iterations <= 150, res.summary()


def _lqr_closed_form(A, B, Q, R, Qf, x0, T):
    """Finite-horizon LQR by the backward Riccati recursion (independent matrix form)."""
    P = Qf
    gains = []
    for _ in range(T):
        G = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P = Q + A.T @ P @ (A - B @ G)
        gains.append(G)
    gains.reverse()
    x, us = x0, []
    for G in gains:
        u = -G @ x
        us.append(u)
        x = A @ x + B @ u
    return 0.5 * x0 @ P @ x0, np.array(us)


def _lqr_kkt(A, B, Q, R, Qf, x0, T):
    """The same LQR as one dense least-squares solve over all controls."""
    nx, nu = B.shape
    Sx = np.zeros(((T + 1) * nx, nx))
    Su = np.zeros(((T + 1) * nx, T * nu))
    Ak = np.eye(nx)
    for t in range(T + 1):
        Sx[t * nx:(t + 1) * nx] = Ak
        Ak = A @ Ak
    for t in range(1, T + 1):
        for s in range(t):
            Su[t * nx:(t + 1) * nx, s * nu:(s + 1) * nu] = np.linalg.matrix_power(A, t - 1 - s) @ B
    W = scipy.linalg.block_diag(*([Q] * T + [Qf]))
    H = Su.T @ W @ Su + np.kron(np.eye(T), R)
    U = np.linalg.solve(H, -Su.T @ W @ Sx @ x0)
    X = Sx @ x0 + Su @ U
    return 0.5 * X @ W @ X + 0.5 * U @ np.kron(np.eye(T), R) @ U, U.reshape(T, nu)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_lqr_one_iteration_equals_riccati_and_kkt(zoo, solver):
    prob = zoo["lqr"]
    res = solver().solve(prob)
    assert res.iterations == 2  # one step, then the confirming backward pass
    assert res.history[0].step == 1.0 and res.history[1].expected_decrease < 1e-9
    args = (LQR_A, LQR_B, np.eye(4), 0.1 * np.eye(2), 10 * np.eye(4), prob.x0, 100)
    J, us = _lqr_closed_form(*args)
    Jk, usk = _lqr_kkt(*args)
    assert abs(res.cost - J) <= 1e-12 * J
    assert abs(res.cost - Jk) <= 1e-12 * J
    np.testing.assert_allclose(res.us, us, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.us, usk, rtol=0, atol=1e-10)


def test_lqr_with_dare_terminal_weight_costs_half_x0_P_x0():
    """With Qf = P_inf (scipy's DARE), the optimal cost of any horizon is 1/2 x0' P_inf x0."""
    import casadi as ca

    Q, R = np.eye(4), 0.1 * np.eye(2)
    P = scipy.linalg.solve_discrete_are(LQR_A, LQR_B, Q, R)
    x0 = np.array([1.0, -1.0, 0.5, 2.0])
    prob = occore.Problem(lambda x, u: ca.mtimes(LQR_A, x) + ca.mtimes(LQR_B, u),
                          lambda x, u: 0.5 * ca.bilin(Q, x, x) + 0.5 * ca.bilin(R, u, u),
                          lambda x: 0.5 * ca.bilin(P, x, x), x0=x0, nu=2, horizon=30)
    res = occore.ILQR().solve(prob)
    expected = 0.5 * x0 @ P @ x0
    assert abs(res.cost - expected) <= 1e-12 * expected
    K_inf = -np.linalg.solve(R + LQR_B.T @ P @ LQR_B, LQR_B.T @ P @ LQR_A)
    np.testing.assert_allclose(res.policy.K[0], K_inf, atol=1e-10)


def test_ddp_equals_ilqr_step_for_step_on_linear_dynamics():
    """Linear dynamics, non-quadratic cost: the dynamics Hessians vanish, so DDP is iLQR."""
    import casadi as ca

    prob = occore.Problem(lambda x, u: ca.mtimes(LQR_A, x) + ca.mtimes(LQR_B, u),
                          lambda x, u: ca.sumsqr(x) + 0.1 * ca.sumsqr(u) + 0.5 * ca.sum1(x ** 4),
                          lambda x: 10 * ca.sumsqr(x) + ca.sum1(ca.cosh(x)), x0=[1.0, -1.0, 0.5, 2.0],
                          nu=2, horizon=40)
    opts = dict(regularization=occore.Regularization())
    a, b = occore.DDP(**opts).solve(prob), occore.ILQR(**opts).solve(prob)
    assert a.iterations == b.iterations > 2
    for ha, hb in zip(a.history, b.history):
        assert ha.cost == pytest.approx(hb.cost, rel=1e-13)
        assert ha.step == hb.step
    np.testing.assert_allclose(a.us, b.us, atol=1e-12)


def test_step_api_reproduces_solve(zoo):
    prob, solver = zoo["unicycle"], occore.ILQR()
    state = solver.init(prob)
    costs = []
    while not state.done:
        state, info = solver.step(prob, state)
        costs.append(info.cost)
    res = solver.solve(prob)
    assert costs == [h.cost for h in res.history]
    np.testing.assert_array_equal(state.traj.us, res.us)
    assert solver.step(prob, state) == (state, None)  # a finished state does not move


def test_warm_start_from_result_and_from_controls(zoo):
    prob = zoo["pendulum"]
    res = occore.DDP().solve(prob)
    for guess in (res, res.us):
        again = occore.DDP().solve(prob, us0=guess)
        assert again.converged and again.iterations <= 2
        assert again.cost == pytest.approx(res.cost, rel=1e-10)


def test_warm_start_with_policy_after_initial_state_moves():
    """MPC-style: the previous Result's feedback gains absorb a perturbed x0."""
    base = occore.problems.make("pendulum")
    res = occore.ILQR().solve(base)
    moved = occore.Problem(base.dynamics, base.stage_cost, base.terminal_cost, x0=[0.05, 0.0], nu=1,
                           horizon=100)
    cold = occore.ILQR().solve(moved)
    warm = occore.ILQR().solve(moved, us0=res)
    assert warm.converged and warm.cost == pytest.approx(cold.cost, rel=1e-8)
    assert warm.iterations < cold.iterations


def test_warm_start_from_an_unfinished_result_starts_at_its_trajectory(zoo):
    """u_t = us_t + K_t (x_t - xs_t) from the same x0 is the result's own trajectory, whatever the
    feedforward k of its policy (large after one iteration: the step just taken)."""
    prob = zoo["pendulum"]
    res = occore.ILQR(max_iter=1).solve(prob)
    assert np.abs(res.policy.k).max() > 1e-2
    state = occore.ILQR().init(prob, res)
    np.testing.assert_allclose(state.traj.us, res.us, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state.traj.xs, res.xs, rtol=0, atol=1e-12)
    assert state.traj.cost == pytest.approx(res.cost, rel=1e-12)


def test_max_iter_and_callback_stop(zoo):
    prob = zoo["cartpole"]
    res = occore.ILQR(max_iter=5).solve(prob)
    assert res.status is occore.Status.MAX_ITER and res.iterations == 5 and not res.converged
    assert res.cost < prob.rollout(prob.initial_controls()).cost
    seen = []
    res = occore.ILQR(callbacks=[lambda info, state: seen.append(info.iteration) or info.iteration == 2]).solve(prob)
    assert res.status is occore.Status.STOPPED_BY_CALLBACK and seen == [0, 1, 2]


def test_history_records_every_field(zoo):
    start = time.perf_counter()
    res = occore.ILQR().solve(zoo["pendulum"])
    elapsed = time.perf_counter() - start
    walls = [h.wall_time for h in res.history]       # seconds since the solve began, not a duration
    assert all(b >= a for a, b in zip(walls, walls[1:])) and 0 < walls[-1] <= res.wall_time <= elapsed
    costs = [h.cost for h in res.history]
    assert all(b <= a for a, b in zip(costs, costs[1:]))  # accepted costs never increase
    first = res.history[0]
    assert first.expected_decrease > 0 and first.actual_decrease > 0 and 0 < first.step <= 1
    assert first.regularization > 0 and first.wall_time > 0
    assert [h.iteration for h in res.history] == list(range(res.iterations))
    text = res.summary()
    assert "CONVERGED" in text and "3.0385011" in text


def test_line_search_free_variant_still_converges_on_lqr(zoo):
    res = occore.ILQR(line_search=occore.LineSearch(steps=(1.0,))).solve(zoo["lqr"])
    assert res.converged and res.cost == pytest.approx(OPTIMA["lqr"], rel=1e-12)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_control_without_effect_on_the_state_and_concave_cost(solver):
    """fu has a zero column (u1 moves nothing) and the cost is concave in u1 at 0.5: the state-form
    regularisation alone cannot make Quu positive definite; its small control share does."""
    import casadi as ca

    prob = occore.Problem(lambda x, u: x + 0.1 * u[0], lambda x, u: ca.sumsqr(x) + 0.1 * u[0] ** 2 + (u[1] ** 2 - 1) ** 2,
                          lambda x: 10 * ca.sumsqr(x), x0=[1.0], nu=2, horizon=10)
    us0 = np.tile([0.0, 0.5], (10, 1))
    res = solver().solve(prob, us0=us0)
    assert res.converged, res.summary()
    np.testing.assert_allclose(res.us[:, 1], 1.0, atol=1e-6)


def test_a_cost_weighted_by_1e6_ends_converged_at_the_optimum_not_line_search_failed():
    """With |J| about 1e7 an expected decrease of tol = 1e-9 is below J's rounding (ulp 2e-9):
    iLQR's Gauss-Newton tail used to end LINE_SEARCH_FAILED at the optimum after ~100 iterations
    of rounding noise. The stop rule now also accepts an expected decrease below 1e-14 |J|."""
    import casadi as ca
    dt, scale = 0.1, 1e6
    prob = occore.Problem(lambda x, u: ca.vertcat(x[0] + dt * x[1], x[1] + dt * ca.sin(u[0])),
                          lambda x, u: scale * (x[0] ** 2 + 0.1 * x[1] ** 2 + 0.1 * u[0] ** 2),
                          lambda x: scale * 50 * (x[0] ** 2 + x[1] ** 2), x0=[2.0, 0.0], nu=1, horizon=10)
    res = occore.ILQR().solve(prob)
    assert res.status is occore.Status.CONVERGED, res.summary()
    ref = occore.reference.ipopt(prob, us0=res)     # IPOPT from there: a local optimum, reached
    assert abs(res.cost - ref.cost) <= 1e-12 * ref.cost
    assert res.cost < occore.reference.ipopt(prob).cost     # (IPOPT from zero ends in a worse one)
    # the stop value of the last iteration is below the rounding level of J, not below tol
    assert occore.ILQR().options.tol < res.history[-1].stop < 1e-14 * res.cost


def test_ddps_regularisation_cap_follows_the_scale_of_the_cost():
    """Multiplying the cost by 1e6 leaves the optimum in place. Full DDP there needs mu about 1e12
    (1e6 times the unscaled problem's) for an indefinite Q_uu: with the cap an absolute 1e9 it ended
    REG_LIMIT after 2 iterations, 10.6 % above the optimum. The cap is now relative to the cost
    Hessians (Regularization.maximum), and the scaled solve is the unscaled one, iteration for
    iteration, at 1e6 times its cost."""
    import casadi as ca
    dt = 0.1

    def make(scale):
        return occore.Problem(lambda x, u: ca.vertcat(x[0] + dt * x[1], x[1] + dt * ca.sin(u[0])),
                              lambda x, u: scale * (x[0] ** 2 + 0.1 * x[1] ** 2 + 0.1 * u[0] ** 2),
                              lambda x: scale * 50 * (x[0] ** 2 + x[1] ** 2), x0=[2.0, 0.0], nu=1, horizon=10)

    plain, scaled = occore.DDP().solve(make(1.0)), occore.DDP().solve(make(1e6))
    assert plain.status is scaled.status is occore.Status.CONVERGED, scaled.summary()
    assert scaled.iterations == plain.iterations
    assert scaled.cost == pytest.approx(1e6 * plain.cost, rel=1e-12)
    np.testing.assert_allclose(scaled.us, plain.us, atol=1e-7)
    # the scaled solve did use a mu above the default maximum (the old absolute cap)
    assert max(h.regularization for h in scaled.history) > occore.Regularization().maximum
    assert plain.cost == pytest.approx(occore.reference.ipopt(make(1.0), us0=plain).cost, rel=1e-10)
