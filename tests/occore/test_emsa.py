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


def test_every_option_bound_is_enforced_at_its_documented_edge():
    """Each validated option: the documented edge value is accepted, the first value past it (and
    a non-finite one) is refused with the option's name and the expected range."""
    bad = [({"tol": float("inf")}, "tol"), ({"rho": True}, "rho"), ({"max_iter": 0}, "max_iter"),
           ({"max_iter": 2.0}, "max_iter"), ({"max_iter": True}, "max_iter"), ({"ftol": -1e-300}, "ftol"),
           ({"ftol": float("nan")}, "ftol"), ({"rho_decrease": 0.999}, r"rho_decrease=.*expected a finite number >= 1"),
           ({"rho_increase": 1.0}, r"rho_increase=.*expected a finite number > 1"),
           ({"rho_min": 0.0}, "rho_min"), ({"rho_min": -1.0}, "rho_min"),
           ({"rho_max": float("inf")}, "rho_max"), ({"rho": 2.0, "rho_max": 1.5}, "rho_max"),
           ({"rho_min": 1e-3, "rho_max": 5e-4}, "rho_max")]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            EMSA(**kwargs)
    for kwargs in ({"step_size": 0.0}, {"step_size": -1.0}, {"step_size": float("inf")}, {"step_size": True}):
        with pytest.raises(ValueError, match="inner.step_size"):
            InnerSolver(**kwargs)
    # the edges themselves are valid: ftol 0, rho_decrease 1 (rho kept), rho_max equal to rho or to
    # rho_min, and with rho None (the problem's choice) or 0 only rho_min bounds rho_max from below
    ok = [{"ftol": 0.0}, {"rho_decrease": 1.0}, {"max_iter": 1}, {"rho": 5.0, "rho_max": 5.0},
          {"rho_min": 1e-3, "rho_max": 1e-3}, {"rho_max": 0.5}, {"rho": 0.0, "rho_max": 0.5}]
    for kwargs in ok:
        opts = EMSA(**kwargs).options
        assert all(getattr(opts, k) == v for k, v in kwargs.items())
    assert InnerSolver(step_size=1e-300).step_size == 1e-300


class _Scripted:
    """A 1-D problem whose E-MSA step is scripted: J(u) = K + u_0 (a cost with a constant
    gradient, never CONVERGED by tol), and ``maximize_hamiltonian`` returns ``step(us, rho)``
    instead of maximising; records the rho of every call. Without ``extrapolate_controls``, so no
    momentum."""

    def __init__(self, K, step):
        self.prob = occore.Problem(lambda x, u: x + u, lambda x, u: u[0] + K, lambda x: 0 * x[0],
                                   x0=[0.0], nu=1, horizon=1)
        self.horizon, self.step, self.rhos = 1, step, []

    def initial_controls(self):
        return self.prob.initial_controls()

    def rollout(self, us):
        return self.prob.rollout(us)

    def local_model(self, traj, second_order=False):
        return self.prob.local_model(traj, second_order)

    def maximize_hamiltonian(self, traj, costates, rho, inner):
        self.rhos.append(rho)
        return self.step(np.array(traj.us), rho)


def test_rho_schedule_steps_and_rho_max_boundary():
    """The documented schedule: a rejected trial (J raised) multiplies rho by rho_increase (from at
    least rho_min), an accepted one divides it by rho_decrease down to rho_min; rho equal to
    rho_max is allowed, REG_LIMIT only when it would exceed it. step is 1 accepted, 0 rejected."""
    prob = _Scripted(1.0, lambda us, rho: us + 1.0)             # every trial raises J by 1
    res = EMSA(rho=1.0, rho_max=100.0, max_iter=50).solve(prob)
    assert res.status is Status.REG_LIMIT and res.iterations == 3, res.summary()
    assert prob.rhos == [1.0, 10.0, 100.0]                    # 100 == rho_max is still tried
    assert [h.regularization for h in res.history] == [10.0, 100.0, 1000.0]
    assert [h.step for h in res.history] == [0.0, 0.0, 0.0]
    assert not any(h.accepted for h in res.history)
    assert [h.actual_decrease for h in res.history] == [-1.0, -1.0, -1.0]
    assert res.cost == 1.0 and res.us[0, 0] == 0.0 and "best iterate" not in res.message
    # from rho = 0 a rejection raises rho to rho_min * rho_increase
    prob = _Scripted(1.0, lambda us, rho: us + 1.0)
    res = EMSA(rho=0.0, rho_min=1e-3, rho_increase=4.0, max_iter=2).solve(prob)
    assert prob.rhos == [0.0, 4e-3] and res.history[-1].regularization == 1.6e-2
    # accepted trials (J lowered by 1) divide rho by rho_decrease, floored at rho_min
    prob = _Scripted(10.0, lambda us, rho: us - 1.0)
    res = EMSA(rho=8e-3, rho_min=1e-3, rho_decrease=2.0, max_iter=4).solve(prob)
    assert prob.rhos == [8e-3, 4e-3, 2e-3, 1e-3]
    assert [h.regularization for h in res.history] == [4e-3, 2e-3, 1e-3, 1e-3]
    assert [h.step for h in res.history] == [1.0] * 4 and all(h.accepted for h in res.history)
    assert res.status is Status.MAX_ITER and res.cost == 6.0 and res.us[0, 0] == -4.0
    assert "best iterate" not in res.message      # the last iterate is the best: no note


@pytest.mark.parametrize("K, ftol, change, stalled", [
    (1e4, 1e-8, 1e-6, True), (1e4, 1e-8, 1e-3, False),          # |J| > 1: the tolerance scales with |J|
    (1e-2, 1e-8, 1e-9, True), (1e-2, 1e-8, 1e-7, False),        # |J| < 1: it is ftol itself
    (1e4, 1e-8, -1e-6, True), (1e4, 1e-8, -1e-3, False)])       # a raising trial: J unchanged
def test_ftol_stops_when_a_trial_changes_j_by_at_most_ftol_times_max_1_abs_j(K, ftol, change, stalled):
    prob = _Scripted(K, lambda us, rho: us - change)
    res = EMSA(rho=1.0, ftol=ftol, max_iter=3).solve(prob)
    first = res.history[0]
    assert first.actual_decrease == pytest.approx(change, rel=1e-6)
    assert first.accepted == (change > 0) and first.step == (1.0 if change > 0 else 0.0)
    if stalled:
        assert res.status is Status.CONVERGED and res.iterations == 1 and "ftol" in res.message
    else:
        assert res.status is Status.MAX_ITER and res.iterations == 3, res.summary()
    assert "best iterate" not in res.message


@pytest.mark.parametrize("ftol", [0.0, 1e-14])
def test_a_trial_that_leaves_j_unchanged_is_a_fixed_point_not_a_step(ftol):
    """The inner step returns the same controls: J is unchanged (even with ftol = 0, "at most
    ftol"), the trial is not accepted (it does not lower J) and rho keeps its value."""
    prob = _Scripted(3.0, lambda us, rho: us)
    res = EMSA(rho=0.5, ftol=ftol, max_iter=20).solve(prob)
    assert res.status is Status.CONVERGED and res.iterations == 1, res.summary()
    h = res.history[0]
    assert not h.accepted and h.step == 0.0 and h.actual_decrease == 0.0 and h.regularization == 0.5
    assert res.cost == 3.0 and "best iterate" not in res.message


def test_a_solve_that_does_no_step_reports_zero_decrease_and_step(zoo):
    prob = zoo["unicycle"]
    J0 = prob.rollout(prob.initial_controls()).cost
    res = EMSA(tol=1e300).solve(prob)                      # converged at the first gradient
    assert res.status is Status.CONVERGED and res.iterations == 1 and res.cost == J0
    h = res.history[0]
    assert not h.accepted and h.step == 0.0 and h.actual_decrease == 0.0 and h.cost == J0


def test_a_non_finite_initial_rollout_is_reported_not_raised():
    prob = occore.Problem(lambda x, u: x + u, lambda x, u: ca.log(x[0]) + u[0] ** 2, lambda x: 0 * x[0],
                          x0=[-1.0], nu=1, horizon=2)
    res = EMSA().solve(prob)
    assert res.status is Status.NON_FINITE and res.iterations == 0 and "initial rollout" in res.message


class _Logged:
    """A dense problem whose E-MSA calls are logged per iteration: the beta of each extrapolation
    and the cost of each trial rolled out from a maximisation. ``poison``: the extrapolated
    trials (those whose maximisation started from an extrapolation) with these indices roll out
    at a cost above every other, i.e. they do not lower J."""

    def __init__(self, prob, poison=()):
        self.prob, self.horizon, self.nx, self.nu = prob, prob.horizon, prob.nx, prob.nu
        self.inner_methods, self.poison = prob.inner_methods, set(poison)
        self.log, self._next_from, self._n_extra = [], None, 0

    def initial_controls(self):
        return self.prob.initial_controls()

    def rollout(self, us):
        traj = self.prob.rollout(us)
        if self._next_from is not None:                   # the rollout of a maximisation's controls
            extrapolated, self._next_from = self._next_from, None
            if extrapolated:
                self._n_extra += 1
                if self._n_extra - 1 in self.poison:
                    traj = occore.Trajectory(traj.xs, traj.us, 1e300)
            self.log.append(("trial", extrapolated, traj.cost))
        return traj

    def local_model(self, traj, second_order=False):
        return self.prob.local_model(traj, second_order)

    def maximize_hamiltonian(self, traj, costates, rho, inner):
        self._next_from = bool(self.log) and self.log[-1][0] == "extrapolate"
        return self.prob.maximize_hamiltonian(traj, costates, rho, inner)

    def extrapolate_controls(self, us, us_prev, beta):
        self.log.append(("extrapolate", beta))
        return self.prob.extrapolate_controls(us, us_prev, beta)


def test_momentum_follows_the_documented_schedule(zoo):
    """Nesterov's beta_k = j / (j + 3) after j accepted steps since the last restart; an
    extrapolated trial that does not lower J is followed, in the same iteration, by the plain
    step from u_k, and the momentum restarts (no extrapolation until a step is accepted again).
    The log is replayed against that rule."""
    prob = _Logged(zoo["lqr"], poison=(2, 7))
    res = EMSA(max_iter=40).solve(prob)
    assert sum(1 for e in prob.log if e[0] == "extrapolate") > 10
    log, j, J = list(prob.log), 0, prob.rollout(prob.initial_controls()).cost
    for h in res.history:
        if j > 0:
            assert log.pop(0) == ("extrapolate", j / (j + 3.0))
            kind, extrapolated, cost = log.pop(0)
            assert kind == "trial" and extrapolated
            if cost < J:                                   # taken: the iteration accepts it
                assert h.accepted and h.cost == cost
                j, J = j + 1, cost
                continue
            j = 0                                          # restart, the plain step follows
        kind, extrapolated, cost = log.pop(0)
        assert kind == "trial" and not extrapolated
        assert h.accepted == (cost < J)
        if h.accepted:
            assert h.cost == cost
            j, J = 1, cost
        else:
            assert h.cost == J
            j = 0
    assert not log and res.cost == J
    assert any(not h.accepted for h in res.history)      # rejections happen in these 40 iterations


def test_the_gradient_stop_follows_the_scale_of_the_cost():
    """dJ/du scales with the cost. Multiplied by 1e-6, a double integrator's gradient is below the
    absolute tol 1e-4 at the zero guess already: E-MSA ended CONVERGED after 1 iteration, 37 %
    above the optimum. The stop value is now tol * min(1, the largest entry of the cost Hessians),
    and the scaled solve ends at the unscaled one's optimum (DDP's, the same local optimum)."""
    dt = 0.1

    def make(scale):
        return occore.Problem(lambda x, u: ca.vertcat(x[0] + dt * x[1], x[1] + dt * ca.sin(u[0])),
                              lambda x, u: scale * (x[0] ** 2 + 0.1 * x[1] ** 2 + 0.1 * u[0] ** 2),
                              lambda x: scale * 50 * (x[0] ** 2 + x[1] ** 2), x0=[2.0, 0.0], nu=1, horizon=10)

    tiny = make(1e-6)
    start = tiny.rollout(tiny.initial_controls())
    assert tiny.local_model(start).gradient_norm() < EMSA().options.tol      # the old stop held at once
    ref = occore.DDP().solve(make(1.0))
    for prob, scale in ((make(1.0), 1.0), (tiny, 1e-6)):
        res = EMSA().solve(prob)
        assert res.status is Status.CONVERGED, res.summary()
        assert res.cost / scale == pytest.approx(ref.cost, rel=1e-6), res.summary()
        np.testing.assert_allclose(res.us, ref.us, atol=2e-2)
        # the stop value: tol times the cost Hessians' largest entry, 1e-6 * 2 * 50 (terminal), capped at 1
        assert res.history[-1].stop < EMSA().options.tol * min(1.0, scale * 100.0)
        assert ("x the cost's scale 0.0001 = 1e-08" in res.message) is (scale < 1), res.message


def test_a_cost_without_curvature_keeps_the_absolute_gradient_stop():
    """J = x_T with x' = x + u^2: the cost's Hessians are 0 (the curvature comes from the dynamics),
    so there is no scale to measure and the stop value is tol itself, not 0 (which no |dJ/du|
    could pass: the solve would end on ftol instead). E-MSA reaches u = 0, dJ/du = 2u = 0."""
    prob = occore.Problem(lambda x, u: x + u[0] ** 2, lambda x, u: 0 * x[0], lambda x: 1.0 * x[0], x0=[0.0],
                          nu=1, horizon=5)
    res = EMSA().solve(prob, us0=np.ones((5, 1)))
    assert res.status is Status.CONVERGED and res.message.startswith("|dJ/du| = 0.00e+00 < tol 0.0001")
    assert "ftol" not in res.message and res.cost == 0.0
