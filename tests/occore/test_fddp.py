"""occore.FDDP (multiple shooting): the swing-ups from a linear-interpolation state guess reach DDP's
optimum; the expected change with gaps is exact on an LQ problem; gaps close by the fraction alpha;
the compiled sweep with gaps equals the numpy one; bad guesses are refused."""

import numpy as np
import pytest

import occore
from occore.lq import csweep, riccati
from occore.problems import GOALS, NAMES, OPTIMA
from occore.solvers.fddp import _Shooting


def interpolation(prob, goal):
    return np.linspace(prob.x0, goal, prob.horizon + 1)


@pytest.mark.parametrize("name", NAMES)
def test_from_a_linear_interpolation_guess_to_ddps_optimum(name):
    prob = occore.problems.make(name)
    solver, xs0 = occore.FDDP(), interpolation(prob, GOALS[name])
    assert solver.init(prob, xs0=xs0).traj.extras.max_gap > 0.01        # not feasible
    res = solver.solve(prob, xs0=xs0)
    assert res.converged, res.summary()
    assert abs(res.cost - OPTIMA[name]) / OPTIMA[name] <= (1e-6 if name == "pendulum_box" else 1e-8)
    assert res.history[-1].gap == 0.0                                   # the gaps closed
    again = prob.rollout(res.us)
    np.testing.assert_allclose(again.xs, res.xs, atol=1e-12)


def test_gapped_line_search_starts_two_steps_above_the_last_one():
    """With gaps, the trials start two step lengths above the previous accepted one: every gapped
    iteration tries no longer step than that, the feasible ones start at the full step; the
    optimum is the one of the line search that always starts at the full step, with fewer rollouts."""
    prob = occore.problems.make("cartpole")
    xs0 = interpolation(prob, GOALS["cartpole"])
    tried = []
    rollout = prob.rollout_policy

    def counting(ref, policy, alpha, **kw):
        tried[-1].append(alpha)
        return rollout(ref, policy, alpha, **kw)

    prob.rollout_policy = counting
    steps = occore.FDDP().options.line_search.steps
    runs = {}
    for warm in (2, None):
        marks = []

        def mark(info, state):
            marks.append((info.step, info.gap))
            tried.append([])
        tried[:] = [[]]
        ls = occore.LineSearch(steps=steps, gap_warm_start=warm)
        res = occore.FDDP(line_search=ls).solve(prob, xs0=xs0, callbacks=[mark])
        assert res.converged and abs(res.cost - OPTIMA["cartpole"]) / OPTIMA["cartpole"] <= 1e-8
        runs[warm] = (res, sum(map(len, tried)))
        if warm == 2:
            gap, last = 1.0, steps[0]    # the initial iterate has gaps
            for (step, gap_after), alphas in zip(marks, tried):
                if alphas and gap > 0 and last in steps[1:]:
                    assert alphas[0] == steps[max(0, steps.index(last) - 2)]
                elif alphas:             # feasible, or after a full or a rejected step
                    assert alphas[0] == 1.0
                last, gap = step, gap_after
    assert runs[2][0].iterations <= runs[None][0].iterations and runs[2][1] < 0.8 * runs[None][1]


def test_the_expected_change_with_gaps_is_exact_for_linear_dynamics():
    prob = occore.problems.make("lqr", horizon=20)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((21, 4))
    xs[0] += 0.3                                   # an initial gap too
    us = rng.standard_normal((20, 2))
    view = _Shooting(prob)
    traj = view.at(xs, us, False)
    lm = view.local_model(traj)
    policy, (d1, d2) = lm.backward(0.0)
    for alpha in (1.0, 0.5, 0.2):
        trial = view.rollout_policy(traj, policy, alpha)
        expected = -(alpha * d1 + 0.5 * alpha ** 2 * d2)
        assert traj.cost - trial.cost == pytest.approx(expected, rel=1e-9, abs=1e-10)
        assert trial.extras.max_gap == pytest.approx((1 - alpha) * traj.extras.max_gap, rel=1e-12)
    # the full step is the LQ optimum: its cost is the Riccati value, the next model is flat
    full = view.rollout_policy(traj, policy, 1.0)
    assert full.extras.gaps is None
    _, (e1, e2) = view.local_model(full).backward(0.0)
    assert abs(e1) < 1e-10
    assert full.cost == pytest.approx(occore.ILQR().solve(prob).cost, rel=1e-12)


def test_without_a_state_guess_fddp_is_the_ddp_loop():
    prob = occore.problems.make("cartpole")
    opts = dict(second_order_below=None, line_search=occore.LineSearch())
    a, b = occore.FDDP(**opts).solve(prob), occore.ILQR().solve(prob)
    assert a.iterations == b.iterations and [h.cost for h in a.history] == [h.cost for h in b.history]
    tuned = occore.FDDP().solve(prob)                       # FDDP's defaults: fewer iterations
    assert tuned.converged and tuned.iterations < b.iterations
    assert tuned.cost == pytest.approx(OPTIMA["cartpole"], rel=1e-8)


@pytest.mark.parametrize("name", ["cartpole", "pendulum_box"])
def test_compiled_sweep_with_gaps_equals_numpy(name):
    if not csweep.available():
        pytest.skip(csweep.load_error())
    prob = occore.problems.make(name)
    rng = np.random.default_rng(1)
    us = 0.3 * rng.standard_normal((prob.horizon, prob.nu))
    xs = prob.rollout(us).xs + 0.05 * rng.standard_normal((prob.horizon + 1, prob.nx))
    for second_order, mu in ((False, 1e-6), (True, 100.0)):
        d = prob.evaluate_derivatives(xs, us, second_order)
        kw = dict(us=us, lower=prob.u_lower, upper=prob.u_upper, gaps=d.f - xs[1:])
        a = riccati.riccati_sweep(d, mu, second_order, **kw)
        b = csweep.riccati_sweep(d, mu, second_order, **kw)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(y)))))


def test_bad_state_guesses_are_refused_and_guesses_not_modified():
    prob = occore.problems.make("pendulum")
    with pytest.raises(occore.ShapeError, match=r"xs0: expected shape \(101, 2\), got \(100, 2\)"):
        occore.FDDP().solve(prob, xs0=np.zeros((100, 2)))
    with pytest.raises(occore.InputError, match="xs0: expected finite"):
        occore.FDDP().solve(prob, xs0=np.full((101, 2), np.nan))
    with pytest.raises(TypeError, match="xs0"):
        occore.ILQR().solve(prob, xs0=np.zeros((101, 2)))
    xs0 = interpolation(prob, GOALS["pendulum"])
    us0 = np.full((100, 1), 0.2)
    copies = xs0.copy(), us0.copy()
    res = occore.FDDP().solve(prob, us0=us0, xs0=xs0)
    assert res.converged
    np.testing.assert_array_equal(xs0, copies[0])
    np.testing.assert_array_equal(us0, copies[1])


@pytest.mark.parametrize("kw, name", [(dict(gap_tol=0.0), "gap_tol"), (dict(stochastic=True), "stochastic")])
def test_bad_options(kw, name):
    with pytest.raises(ValueError, match=name):
        occore.FDDP(**kw)


def _defects(prob, xs, us):
    """The largest multiple-shooting defect of (xs, us), from the problem's one-step transition."""
    gaps = [np.abs(prob.transition(xs[t], us[t], t) - xs[t + 1]).max() for t in range(prob.horizon)]
    return max(max(gaps), float(np.abs(prob.x0 - xs[0]).max()))


def test_the_reported_gap_is_the_largest_defect_of_every_iterate():
    """``IterationInfo.gap`` and the initial iterate's gap equal the largest |f(x_t, u_t) -
    x_{t+1}| and |x0 - x_0| recomputed from the dynamics, also while they are small (below 1) and
    not yet closed (partial steps)."""
    prob = occore.problems.make("cartpole")
    rng = np.random.default_rng(3)
    us0 = 0.2 * rng.standard_normal((prob.horizon, prob.nu))
    xs0 = prob.rollout(us0).xs + 0.02 * rng.standard_normal((prob.horizon + 1, prob.nx))
    solver = occore.FDDP()
    start = solver.init(prob, us0, xs0=xs0)
    truth = _defects(prob, xs0, us0)
    assert 0.01 < truth < 0.2
    assert start.traj.extras.max_gap == pytest.approx(truth, rel=1e-12)
    seen = []

    def record(info, state):
        xs, us = state.traj.xs, state.traj.us
        seen.append((info.gap, _defects(prob, xs, us), info.step))
    res = solver.solve(prob, us0, xs0=xs0, callbacks=[record])
    assert res.converged
    partial = [(g, d) for g, d, step in seen if 0.0 < step < 1.0 and d > 1e-12]
    assert partial                                   # gapped iterates after partial steps
    for gap, defect, _ in seen:
        assert gap == pytest.approx(defect, rel=1e-9, abs=1e-13)
    xs1 = xs0.copy()
    xs1[0] = prob.x0                                 # only the dynamics gaps, no initial gap
    assert solver.init(prob, us0, xs0=xs1).traj.extras.max_gap == pytest.approx(_defects(prob, xs1, us0), rel=1e-12)


def test_the_first_iteration_reuses_the_initial_derivatives_and_a_second_order_model_has_them():
    """The derivatives evaluated for the initial iterate's cost and gaps are those of the first
    (Gauss-Newton) local model: one evaluation for both. A second-order model of that iterate is
    evaluated anew with the dynamics Hessians: its backward pass equals the one built from
    second-order derivatives directly, and differs from the Gauss-Newton one (pendulum: nonlinear)."""
    prob = occore.problems.make("pendulum")
    xs0 = interpolation(prob, GOALS["pendulum"])
    calls = []
    evaluate = prob.evaluate_derivatives

    def counting(xs, us, second_order=False):
        calls.append(second_order)
        return evaluate(xs, us, second_order)
    prob.evaluate_derivatives = counting
    solver = occore.FDDP(max_iter=1)
    solver.solve(prob, xs0=xs0)
    assert calls == [False]                          # init's evaluation, reused by iteration 0
    view = _Shooting(prob)
    traj = view.at(xs0, prob.initial_controls(), False)
    calls.clear()
    gn = view.local_model(traj, False)
    assert calls == []
    full = view.local_model(traj, True)
    assert calls == [True]
    d = evaluate(xs0, prob.initial_controls(), True)
    direct = prob.model_of(d, traj.us, gaps=d.f - xs0[1:], initial_gap=prob.x0 - xs0[0])
    (k, (a1, a2)), (kd, (b1, b2)), (kg, (c1, c2)) = (m.backward(10.0, s) for m, s in
                                                     ((full, True), (direct, True), (gn, False)))
    assert (a1, a2) == pytest.approx((b1, b2), rel=1e-12)
    assert abs(a2 - c2) > 1e-6 * abs(c2)


# -- rollout="linear": the multiple-shooting step that keeps the gaps open ---------------------------

LINEAR_CASES = [(name, guess) for name in NAMES for guess in ("zero", "xs0")
                if (name, guess) != ("pendulum_box", "xs0")]


@pytest.mark.parametrize("name, guess", LINEAR_CASES)
def test_linear_rollout_reaches_the_optimum_without_a_closed_loop_rollout(name, guess):
    """From the zero guess and from the interpolated state guess, FDDP(rollout="linear") reaches
    the optimum of the reference set (IPOPT's / DDP's, ``OPTIMA``) with its gaps closed to gap_tol,
    and never calls the problem's closed-loop rollout. (The boxed pendulum from the interpolated
    guess ends in another local optimum, cost 21.14: README, issue-14 solver table.)"""
    prob = occore.problems.make(name)
    calls = []
    rollout = prob.rollout_policy

    def counting(*args, **kw):
        calls.append(1)
        return rollout(*args, **kw)
    prob.rollout_policy = counting
    kw = {"xs0": interpolation(prob, GOALS[name])} if guess == "xs0" else {}
    solver = occore.FDDP(rollout="linear")
    res = solver.solve(prob, **kw)
    assert res.converged, res.summary()
    assert abs(res.cost - OPTIMA[name]) / OPTIMA[name] <= (1e-6 if name == "pendulum_box" else 1e-8)
    assert calls == []
    assert res.history[-1].gap <= solver.options.gap_tol
    assert _defects(prob, res.xs, res.us) == pytest.approx(res.history[-1].gap, rel=1e-6, abs=1e-13)
    np.testing.assert_allclose(prob.rollout(res.us).xs, res.xs, atol=1e-7)


def test_the_linear_trial_follows_the_linear_model_on_linear_dynamics():
    """On the LQR (linear dynamics, quadratic cost) from a random gapped iterate, the linear trial at
    alpha is xs + alpha dx with dx the linear model's states (recomputed here by a loop over
    fx dx + fu (k + K dx) + gap): its gaps are (1 - alpha) times the old ones, its cost change is the
    model's expected one, and the full step is iLQR's optimum."""
    from occore.solvers.fddp import _MeritModel

    prob = occore.problems.make("lqr", horizon=20)
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((21, 4))
    xs[0] += 0.3
    us = rng.standard_normal((20, 2))
    view = _Shooting(prob, linear=True)
    traj = view.at(xs, us, False)
    lm = view.local_model(traj)
    assert isinstance(lm, _MeritModel)
    policy, (d1, d2) = lm.lm.backward(0.0)
    d = traj.extras.derivs
    gap = np.concatenate([traj.extras.initial[None], traj.extras.gaps])
    dx = [gap[0]]
    for t in range(20):
        dx.append(d.fx[t] @ dx[t] + d.fu[t] @ (policy.k[t] + policy.K[t] @ dx[t]) + gap[t + 1])
    for alpha in (1.0, 0.5, 0.2):
        trial = view.rollout_policy(traj, policy, alpha)
        np.testing.assert_allclose(trial.xs, xs + alpha * np.array(dx), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(trial.extras.gaps, (1 - alpha) * traj.extras.gaps, atol=1e-11)
        assert traj.cost - trial.cost == pytest.approx(-(alpha * d1 + 0.5 * alpha ** 2 * d2), rel=1e-9, abs=1e-10)
    full = view.rollout_policy(traj, policy, 1.0)
    assert full.extras.max_gap < 1e-11
    assert full.cost == pytest.approx(occore.ILQR().solve(prob).cost, rel=1e-10)


def test_the_merit_penalty_makes_a_predicted_increase_a_decrease():
    """The merit model's expected change is that of cost + nu ||gaps||_1 with
    nu = (D1 + D2/2) / ((1 - MERIT_RHO) ||gaps||_1) where the cost model predicts an increase (and
    nu = 0 where it predicts a decrease), and its ``decrease`` is the merit's, recomputed here from
    the costs and gaps of the two trajectories."""
    from occore.solvers.fddp import MERIT_RHO

    prob = occore.problems.make("cartpole")
    view = _Shooting(prob, linear=True)
    seen = set()
    for xs0, us0 in ((interpolation(prob, GOALS["cartpole"]), prob.initial_controls()),
                     (prob.rollout(np.full((100, 1), 0.5)).xs + 0.01, np.full((100, 1), 0.5))):
        traj = view.at(xs0, us0, False)
        lm = view.local_model(traj)
        l1 = float(np.abs(traj.xs[1:] - traj.extras.derivs.f).sum() + np.abs(prob.x0 - traj.xs[0]).sum())
        assert lm.l1 == pytest.approx(l1, rel=1e-12)
        policy, (m1, m2) = lm.backward(1e-6)
        _, (d1, d2) = lm.lm.backward(1e-6)
        increase = d1 + 0.5 * d2
        nu = max(0.0, increase / ((1 - MERIT_RHO) * l1))
        seen.add(increase > 0)
        assert lm.nu == pytest.approx(nu, rel=1e-12) and m2 == d2
        assert m1 == pytest.approx(d1 - nu * l1, rel=1e-12)
        assert -(m1 + 0.5 * m2) > 0                          # the merit expects a decrease
        trial = view.rollout_policy(traj, policy, 0.5)
        tl1 = float(np.abs(trial.xs[1:] - trial.extras.derivs.f).sum() + np.abs(prob.x0 - trial.xs[0]).sum())
        assert lm.decrease(traj, trial) == pytest.approx((traj.cost + nu * l1) - (trial.cost + nu * tl1), rel=1e-12)
    assert seen == {True, False}


@pytest.mark.parametrize("name", ["cartpole", "unicycle"])
def test_compiled_linear_states_equal_numpy(name):
    if not csweep.available():
        pytest.skip(csweep.load_error())
    from occore.local_model import linear_states

    prob = occore.problems.make(name)
    rng = np.random.default_rng(5)
    us = 0.3 * rng.standard_normal((prob.horizon, prob.nu))
    d = prob.evaluate_derivatives(prob.rollout(us).xs, us)
    k = rng.standard_normal((prob.horizon, prob.nu))
    K = 0.1 * rng.standard_normal((prob.horizon, prob.nu, prob.nx))
    gap = rng.standard_normal((prob.horizon + 1, prob.nx))
    for a, b in zip(csweep.linear_states(d, k, K, gap), linear_states(d, k, K, gap)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("value", ["closed", "Linear", 1, None])
def test_the_rollout_option_is_validated(value):
    with pytest.raises(ValueError, match=r"option rollout=.* expected 'nonlinear' or 'linear'"):
        occore.FDDP(rollout=value)
    with pytest.raises(ValueError, match="rollout"):
        occore.solvers.options.FDDPOptions(rollout=value)


def boxed_double_integrator(T, bound):
    """A convex box-constrained QP: a 2-D double integrator driven to rest at 0, |u| <= bound."""
    import casadi as ca
    dt = 0.1

    def f(x, u):
        return ca.vertcat(x[0] + dt * x[2] + 0.5 * dt * dt * u[0], x[1] + dt * x[3] + 0.5 * dt * dt * u[1],
                          x[2] + dt * u[0], x[3] + dt * u[1])

    return occore.Problem(f, lambda x, u: 0.5 * dt * (ca.sumsqr(x[:2]) + 0.1 * ca.sumsqr(x[2:]) + 0.01 * ca.sumsqr(u)),
                          lambda x: 25.0 * ca.sumsqr(x), x0=[3.0, -2.0, 0.0, 1.0], nu=2, horizon=T,
                          u_lower=-bound, u_upper=bound)


@pytest.mark.parametrize("T, bound", [(15, 1.0), (20, 0.5)])
def test_boxed_convex_qp_from_a_state_guess_reaches_ipopts_optimum(T, bound):
    """Where closing the gaps is predicted to raise the cost, the full-step expected decrease is
    negative at every mu: that must not count as 'converged at a large mu' (which reset mu to its
    baseline each time it reached about 10, so the feedback of the active controls kept blowing the
    trials up and FDDP ended MAX_ITER with open gaps, 97% below the optimum)."""
    prob = boxed_double_integrator(T, bound)
    ref = occore.reference.ipopt(prob)
    res = occore.FDDP().solve(prob, xs0=np.linspace(prob.x0, np.zeros(4), T + 1))
    assert res.converged, res.summary()
    assert res.history[-1].gap == 0.0
    assert abs(res.cost - ref.cost) <= 1e-8 * ref.cost


def test_a_solve_that_ends_with_gaps_says_so_in_its_message():
    """A non-converged iterate with gaps is no trajectory: its cost (of the gapped (xs, us)) can lie
    below the optimum (35.8 against IPOPT's 50.8 on a boxed double integrator, J(us) = 104), so the
    message says it; a converged solve carries no such note."""
    prob = occore.problems.make("pendulum")
    xs0 = interpolation(prob, GOALS["pendulum"])
    res = occore.FDDP(max_iter=1).solve(prob, xs0=xs0)
    gap = res.history[-1].gap
    assert res.status is occore.Status.MAX_ITER and gap > 0.01
    assert f"still has gaps (largest {gap:.2e})" in res.message
    assert np.max(np.abs(prob.rollout(res.us).xs - res.xs)) > 0.01      # what the note warns of
    done = occore.FDDP().solve(prob, xs0=xs0)
    assert done.converged and "gaps" not in done.message
