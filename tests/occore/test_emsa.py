"""E-MSA: the augmented Hamiltonian against finite differences, basic MSA, the LQR optimum, the
fixed point at DDP's solution, monotone accepted costs, bounds, honest statuses, bad input."""
import casadi as ca
import numpy as np
import pytest

import occore
from occore import EMSA, InnerSolver, Status
from occore.problems import LQR_B, OPTIMA

EPS = 1e-6


@pytest.fixture(scope="module")
def zoo():
    return {name: occore.problems.make(name) for name in occore.problems.NAMES}


def _random_iterate(prob, seed=0, scale=0.5):
    us = scale * np.random.default_rng(seed).standard_normal((prob.horizon, prob.nu))
    traj = prob.rollout(us)
    return traj, prob.local_model(traj)


@pytest.mark.parametrize("name", ["pendulum", "cartpole", "unicycle"])
def test_costates_and_control_gradient_match_finite_differences(zoo, name):
    prob = zoo[name]
    traj, lm = _random_iterate(prob)
    ps, grad = lm.costates(), lm.control_gradient()
    # dJ/du_t by central differences of the rolled-out cost, for a few stages and controls
    for t in (0, prob.horizon // 2, prob.horizon - 1):
        for i in range(prob.nu):
            e = np.zeros_like(traj.us)
            e[t, i] = EPS
            fd = (prob.rollout(traj.us + e).cost - prob.rollout(traj.us - e).cost) / (2 * EPS)
            assert grad[t, i] == pytest.approx(fd, rel=1e-6, abs=1e-7)
    # p_0 = -dJ/dx_0: the same controls from a perturbed initial state
    for j in range(prob.nx):
        e = np.zeros(prob.nx)
        e[j] = EPS
        costs = [occore.Problem(prob.dynamics, prob.stage_cost, prob.terminal_cost, x0=prob.x0 + s * e,
                                nu=prob.nu, horizon=prob.horizon).rollout(traj.us).cost for s in (1, -1)]
        assert ps[0, j] == pytest.approx(-(costs[0] - costs[1]) / (2 * EPS), rel=1e-6, abs=1e-7)
    # at the current controls every feasibility residual is 0: dHt/du = -dJ/du for any rho
    for rho in (0.0, 3.0):
        values, grads = prob.hamiltonian_grad(traj, ps, rho, traj.us)
        np.testing.assert_allclose(grads, -grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["pendulum", "cartpole", "unicycle", "lqr"])
def test_augmented_hamiltonian_gradient_and_hessian_match_finite_differences(zoo, name):
    """At other controls the feasibility terms are active: check d/du of all three terms."""
    from occore.lq.hamiltonian import augmented_hamiltonian

    prob = zoo[name]
    traj, lm = _random_iterate(prob, seed=1)
    ps, rho = lm.costates(), 0.7
    vs = traj.us + 0.3 * np.random.default_rng(2).standard_normal(traj.us.shape)
    vs_copy, xs_copy = vs.copy(), traj.xs.copy()
    values, grads = prob.hamiltonian_grad(traj, ps, rho, vs)
    np.testing.assert_array_equal(vs, vs_copy)
    np.testing.assert_array_equal(traj.xs, xs_copy)
    assert values.shape == (prob.horizon,) and grads.shape == (prob.horizon, prob.nu)
    for i in range(prob.nu):
        e = np.zeros_like(vs)
        e[:, i] = EPS   # the stages are independent: perturb them all at once
        fd = (prob.hamiltonian_grad(traj, ps, rho, vs + e)[0] - prob.hamiltonian_grad(traj, ps, rho, vs - e)[0]) / (2 * EPS)
        np.testing.assert_allclose(grads[:, i], fd, rtol=1e-5, atol=1e-6)
    # the Hessian is exact where the p-residual vanishes (at the current controls)
    d = prob.evaluate_derivatives(traj.xs, traj.us, second_order=True)
    _, g0, hess = augmented_hamiltonian(d, traj.xs, ps, rho, hessian=True)
    for i in range(prob.nu):
        e = np.zeros_like(vs)
        e[:, i] = EPS
        fd = (prob.hamiltonian_grad(traj, ps, rho, traj.us + e)[1] - prob.hamiltonian_grad(traj, ps, rho, traj.us - e)[1]) / (2 * EPS)
        np.testing.assert_allclose(hess[:, :, i], fd, rtol=1e-5, atol=1e-6)


def test_rho_zero_with_one_exact_maximisation_is_basic_msa(zoo):
    """LQR: argmax_u p.(Ax + Bu) - x'Qx/2 - u'Ru/2 = R^-1 B' p_{t+1}."""
    prob = zoo["lqr"]
    traj, lm = _random_iterate(prob, seed=3)
    ps = lm.costates()
    solver = EMSA(rho=0.0, adaptive_rho=False, inner=InnerSolver("newton", iterations=1), max_iter=1)
    state, info = solver.step(prob, solver.init(prob, traj.us))
    expected = ps[1:] @ LQR_B / 0.1
    np.testing.assert_allclose(state.traj.us, expected, rtol=1e-12, atol=1e-12)
    assert info.accepted and info.regularization == 0.0


def test_basic_msa_on_the_pendulum(zoo):
    """H is quadratic in u (f affine in u, l quadratic): argmax_u H = fu' p_{t+1} / (0.1 dt)."""
    prob, dt = zoo["pendulum"], 0.05
    traj, lm = _random_iterate(prob, seed=4)
    ps = lm.costates()
    us_before = traj.us.copy()
    new = prob.maximize_hamiltonian(traj, ps, 0.0, InnerSolver("newton", iterations=1))
    np.testing.assert_array_equal(traj.us, us_before)          # the trajectory is not modified
    fu = np.array([3 * dt * dt, 3 * dt])
    np.testing.assert_allclose(new[:, 0], ps[1:] @ fu / (0.1 * dt), rtol=1e-12)


def test_lqr_converges_to_the_riccati_optimum(zoo):
    res = EMSA().solve(zoo["lqr"])
    ref = occore.ILQR().solve(zoo["lqr"])
    assert res.status is Status.CONVERGED, res.summary()
    assert res.iterations <= 1000          # measured: 805 with the defaults (1611 without momentum)
    assert abs(res.cost - OPTIMA["lqr"]) / OPTIMA["lqr"] <= 1e-6
    np.testing.assert_allclose(res.us, ref.us, atol=1e-3)
    assert res.history[-1].stop < EMSA().options.tol


@pytest.mark.parametrize("name", occore.problems.NAMES)
def test_ddp_solution_is_a_fixed_point(zoo, name):
    prob = zoo[name]
    ddp = occore.DDP().solve(prob)
    res = EMSA().solve(prob, us0=ddp.us)
    assert res.status is Status.CONVERGED, res.summary()
    assert res.iterations <= 20            # measured: 1 (lqr, unicycle), 11 (pendulum_box), 14 (cartpole), 16 (pendulum): rejected trials while rho rises
    assert np.abs(res.us - ddp.us).max() < 1e-8
    assert res.cost <= ddp.cost


@pytest.mark.parametrize("name", occore.problems.NAMES)
def test_accepted_costs_never_increase(zoo, name):
    prob = zoo[name]
    res = EMSA(max_iter=60 if name == "cartpole" else 150).solve(prob)
    costs = [prob.rollout(prob.initial_controls()).cost] + [h.cost for h in res.history if h.accepted]
    assert np.all(np.diff(costs) <= 0)
    assert res.cost == min(costs) and res.cost < costs[0]
    # rejected trials keep the iterate and raise rho; accepted ones lower it
    for prev, h in zip(res.history, res.history[1:]):
        assert (h.regularization < prev.regularization) == h.accepted or h.regularization == EMSA().options.rho_min
    assert res.status in (Status.MAX_ITER, Status.CONVERGED)
    again = prob.rollout(res.us)
    assert again.cost == res.cost


@pytest.mark.parametrize("method", ["newton", "gradient"])
def test_bounds_are_honoured(zoo, method):
    prob = zoo["pendulum_box"]
    inner = InnerSolver(method, step_size=20.0)
    res = EMSA(max_iter=60, inner=inner).solve(prob)
    assert np.all(res.us >= -2.0) and np.all(res.us <= 2.0)
    assert np.abs(res.us).max() == 2.0               # the box is reached
    assert res.cost < prob.rollout(prob.initial_controls()).cost


def test_gradient_inner_method_decreases_the_cost(zoo):
    prob = zoo["unicycle"]
    res = EMSA(max_iter=100, inner=InnerSolver("gradient", iterations=5, step_size=0.5)).solve(prob)
    accepted = [h.cost for h in res.history if h.accepted]
    assert accepted and np.all(np.diff(accepted) <= 0)
    assert res.cost < 0.2 * prob.rollout(prob.initial_controls()).cost


def _exploding():
    """x+ = x + u, costs quadratic but a huge terminal weight: basic MSA (rho = 0) overshoots by a
    factor ~1e4 per iteration and overflows."""
    return occore.Problem(lambda x, u: x + u, lambda x, u: 0.5 * ca.sumsqr(u), lambda x: 5e3 * ca.sumsqr(x),
                          x0=[1.0], nu=1, horizon=5, name="exploding")


def test_divergence_ends_with_an_honest_status():
    prob = _exploding()
    res = EMSA(rho=0.0, adaptive_rho=False, max_iter=200).solve(prob)
    assert res.status in (Status.NON_FINITE, Status.MAX_ITER)
    assert res.status is Status.NON_FINITE, res.summary()
    assert np.isfinite(res.cost)      # the last finite iterate is kept
    # with the adaptive schedule the same start is tamed: monotone, converged
    res = EMSA(rho=0.0, max_iter=500).solve(prob)
    accepted = [h.cost for h in res.history if h.accepted]
    assert np.all(np.diff(accepted) <= 0)
    assert res.converged, res.summary()


def test_minimum_at_the_edge_of_the_domain_ends_cleanly():
    """The cost is NaN for u > 1.5 and decreases up to there, where its gradient is infinite."""
    prob = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: (u[0] - 3) ** 2 + 1e-2 * ca.sqrt(1.5 - u[0]),
                          lambda x: ca.sumsqr(x), x0=[0.0], nu=1, horizon=3)
    res = EMSA(max_iter=300).solve(prob)
    accepted = [h.cost for h in res.history if h.accepted]
    assert np.all(np.diff(accepted) <= 0) and np.isfinite(res.cost)
    assert np.all(res.us <= 1.5) and res.us.min() > 1.49
    assert res.status is Status.NON_FINITE and "gradient" in res.message


class _NaNOnce:
    """The unicycle, except that the first trial rollout reports a NaN cost."""

    def __init__(self, prob):
        self.prob, self.horizon, self.calls = prob, prob.horizon, 0

    def initial_controls(self):
        return self.prob.initial_controls()

    def rollout(self, us):
        self.calls += 1
        traj = self.prob.rollout(us)
        return occore.Trajectory(traj.xs, traj.us, float("nan")) if self.calls == 2 else traj

    def local_model(self, traj, second_order=False):
        return self.prob.local_model(traj, second_order)

    def maximize_hamiltonian(self, traj, costates, rho, inner):
        return self.prob.maximize_hamiltonian(traj, costates, rho, inner)


def test_a_non_finite_trial_is_rejected_and_rho_raised(zoo):
    res = EMSA(max_iter=10).solve(_NaNOnce(zoo["unicycle"]))
    first = res.history[0]
    assert not first.accepted and np.isnan(first.actual_decrease) and first.regularization == 10.0
    assert any(h.accepted for h in res.history) and res.status is Status.MAX_ITER
    # without the adaptive schedule the same trial ends the solve, keeping the finite iterate
    res = EMSA(max_iter=5, adaptive_rho=False).solve(_NaNOnce(zoo["unicycle"]))
    assert res.status is Status.NON_FINITE and res.iterations == 1 and np.isfinite(res.cost)


def test_solver_api_callbacks_and_inputs(zoo):
    prob = zoo["pendulum"]
    us0 = np.full((100, 1), 0.1)
    copy = us0.copy()
    seen = []
    res = EMSA(max_iter=50, callbacks=[lambda info, state: seen.append(info) or info.iteration == 4]).solve(prob, us0)
    np.testing.assert_array_equal(us0, copy)
    assert res.status is Status.STOPPED_BY_CALLBACK and res.iterations == 5 == len(seen)
    assert res.solver == "emsa" and res.history == seen
    assert all(isinstance(h.stop, float) and h.stop > 0 for h in res.history)
    assert "emsa" in res.summary()
    solver = EMSA()
    state = solver.init(prob)
    state, info = solver.step(prob, state)
    assert info.iteration == 0 and state.iteration == 1


def test_options_are_validated():
    with pytest.raises(ValueError, match="rho"):
        EMSA(rho=-1.0)
    with pytest.raises(ValueError, match="inner.method"):
        InnerSolver(method="bfgs")
    with pytest.raises(ValueError, match="inner.iterations"):
        InnerSolver(iterations=0)
    with pytest.raises(ValueError, match="tol"):
        EMSA(tol=0.0)
    with pytest.raises(TypeError, match="unknown option"):
        EMSA(rhoo=1.0)
    assert EMSA(inner="gradient").options.inner == InnerSolver("gradient")
    assert EMSA(inner={"method": "newton", "iterations": 3}).options.inner.iterations == 3


def test_unsupported_inner_method_names_the_supported_ones(zoo):
    with pytest.raises(occore.InputError, match="newton, gradient"):
        EMSA(inner="lbfgs", max_iter=2).solve(zoo["lqr"])


def test_loop_talks_only_to_the_protocol(zoo):
    """A wrapper exposing only the protocol (and no dense attributes) is solved identically."""
    prob = zoo["unicycle"]

    class Opaque:
        horizon = prob.horizon
        inner_methods = ("newton",)

        def initial_controls(self):
            return prob.initial_controls()

        def rollout(self, us):
            return prob.rollout(us)

        def local_model(self, traj, second_order=False):
            return prob.local_model(traj, second_order)

        def maximize_hamiltonian(self, traj, costates, rho, inner):
            assert isinstance(rho, float) and inner.method == "newton"
            return prob.maximize_hamiltonian(traj, costates, rho, inner)

        def extrapolate_controls(self, us, us_prev, beta):   # E-MSA's momentum
            return prob.extrapolate_controls(us, us_prev, beta)

    a = EMSA(max_iter=20).solve(Opaque())
    b = EMSA(max_iter=20).solve(prob)
    np.testing.assert_array_equal(a.us, b.us)


def test_non_finite_stage_derivatives_keep_their_controls(zoo):
    """A stage whose derivatives are NaN keeps its control (bounded, two controls: the per-stage
    box QP path) instead of raising."""
    import dataclasses

    from occore.lq.hamiltonian import maximize

    prob = zoo["lqr"]
    traj, lm = _random_iterate(prob, seed=5)

    def evaluate(vs):
        d = prob.evaluate_derivatives(traj.xs, vs, second_order=True)
        fuu = d.fuu.copy()
        fuu[3] = np.nan
        return dataclasses.replace(d, fuu=fuu)

    lower, upper = np.full((100, 2), -0.5), np.full((100, 2), 0.5)
    new = maximize(evaluate, traj.xs, traj.us, lm.costates(), 1.0, InnerSolver("newton"), lower, upper)
    assert np.all(np.isfinite(new)) and np.all(new >= lower) and np.all(new <= upper)
    np.testing.assert_array_equal(new[3], np.clip(traj.us[3], -0.5, 0.5))
    assert np.abs(new - np.clip(traj.us, -0.5, 0.5)).max() > 1e-3


def test_rho_increase_must_raise_rho():
    with pytest.raises(ValueError, match="rho_increase"):
        occore.EMSA(rho_increase=1.0)
