"""occore.CDDP (augmented-Lagrangian DDP): the IPOPT optima of the constrained reference problems,
multipliers against IPOPT's, the barrier variant, infeasibility, warm starts, options."""
import math

import casadi as ca
import numpy as np
import pytest

import occore
from occore.problems import CONSTRAINED, OPTIMA


@pytest.fixture(scope="module")
def zoo():
    return {name: occore.problems.make(name) for name in CONSTRAINED}


@pytest.fixture(scope="module")
def solved(zoo):
    return {name: occore.CDDP().solve(prob) for name, prob in zoo.items()}


@pytest.mark.parametrize("name", CONSTRAINED)
def test_reaches_the_ipopt_optimum_with_the_constraints_met(zoo, solved, name):
    prob, res = zoo[name], solved[name]
    assert res.status is occore.Status.CONVERGED, res.summary()
    assert abs(res.cost - OPTIMA[name]) / OPTIMA[name] <= 1e-6
    assert res.constraint_violation <= 1e-6
    assert res.constraint_violation == prob.constraint_violation(res.xs, res.us)
    again = prob.rollout(res.us)                   # a dynamically feasible trajectory
    np.testing.assert_allclose(again.xs, res.xs, rtol=0, atol=1e-12)
    assert again.cost == pytest.approx(res.cost, rel=1e-13)
    if prob.bounded:
        assert np.all(res.us >= prob.u_lower) and np.all(res.us <= prob.u_upper)
    # the history reports the problem's cost and the violation of every iterate
    assert res.history[-1].cost == pytest.approx(res.cost, rel=1e-12)
    assert res.history[0].constraint_violation >= 0 and res.history[-1].constraint_violation <= 1e-6
    assert isinstance(res.multipliers, occore.Multipliers) and "constraint violation" in res.summary()


def test_active_constraints_have_positive_multipliers(zoo, solved):
    m = solved["unicycle_obstacles"].multipliers
    assert m.g.shape == (50, 2) and np.all(m.g >= 0) and np.all(m.g.max(axis=0) > 1e-3)   # both obstacles touch
    m = solved["cartpole_track"].multipliers
    assert m.upper.shape == (101, 1) and m.upper.max() > 0 and np.all(m.lower >= 0)
    assert solved["quadrotor"].multipliers.g.max() > 0


def test_terminal_multipliers_equal_ipopts(zoo, solved):
    """The multipliers are those of the KKT point: IPOPT's duals of the terminal equalities (the
    last two NLP constraints) agree."""
    ref = occore.reference.ipopt(zoo["pendulum_terminal"])
    np.testing.assert_allclose(solved["pendulum_terminal"].multipliers.h, ref.multipliers["lam_g"][-2:], rtol=1e-5)


def test_warm_start_with_multipliers_converges_at_once(zoo, solved):
    prob, res = zoo["quadrotor"], solved["quadrotor"]
    again = occore.CDDP().solve(prob, us0=res)
    assert again.converged and again.iterations <= 3
    assert again.cost == pytest.approx(res.cost, rel=1e-9)


def test_barrier_variant_reaches_the_optimum_from_an_interior_start(zoo):
    res = occore.CDDP(method="barrier").solve(zoo["cartpole_track"])
    assert res.converged and abs(res.cost - OPTIMA["cartpole_track"]) / OPTIMA["cartpole_track"] <= 1e-6
    assert res.constraint_violation == 0.0                          # interior all along
    assert all(h.constraint_violation == 0.0 for h in res.history)
    outside = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: ca.sumsqr(u), lambda x: ca.sumsqr(x - 1),
                             x0=[0.0], nu=1, horizon=5, path_constraints=lambda x, u: 0.5 - x[0] - u[0])
    with pytest.raises(occore.InputError, match="interior start"):
        occore.CDDP(method="barrier").solve(outside)
    assert occore.CDDP().solve(outside).converged                   # the augmented Lagrangian starts anywhere


def _flat(m):
    return np.concatenate([m.g.ravel(), m.upper.ravel(), m.lower.ravel(), m.h.ravel()])


@pytest.mark.parametrize("barrier_min", [1e-11, 1e-8])
def test_barrier_multipliers_are_the_kkt_duals(zoo, solved, barrier_min):
    """With the barrier the multipliers are the duals of the last LQ subproblem: mu / -c alone is
    ill-conditioned as mu -> 0 (on the cart-pole track, active track limits, more than 100% off
    at mu = 1e-11); they equal the augmented Lagrangian's KKT multipliers (IPOPT's, see
    test_terminal_multipliers_equal_ipopts), inactive ones zero to rounding."""
    res = occore.CDDP(method="barrier", barrier_min=barrier_min).solve(zoo["cartpole_track"])
    assert res.converged
    lam, ref = _flat(res.multipliers), _flat(solved["cartpole_track"].multipliers)
    assert np.all(lam >= 0) and (ref > 1e-3).sum() >= 2
    np.testing.assert_allclose(lam, ref, rtol=0, atol=1e-4 * ref.max())


def test_contradictory_constraints_end_infeasible_with_the_best_iterate():
    prob = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: ca.sumsqr(u), lambda x: 0 * x[0], x0=[1.0],
                          nu=1, horizon=10, x_upper=1.2, terminal_constraints=lambda x: x - 2.0)
    res = occore.CDDP(penalty_max=1e6).solve(prob)
    assert res.status is occore.Status.INFEASIBLE and not res.converged
    assert "penalty" in res.message and res.constraint_violation > 0.1
    assert np.isfinite(res.cost) and res.xs.shape == (11, 1)


def test_without_constraints_cddp_is_the_fddp_iteration():
    prob = occore.problems.make("pendulum_box")
    cddp = occore.CDDP()      # the FDDP iteration with CDDP's inner options (its later second-order switch)
    a = cddp.solve(prob)
    b = occore.FDDP(second_order_below=cddp.options.second_order_below).solve(prob)
    assert a.iterations == b.iterations and [h.cost for h in a.history] == [h.cost for h in b.history]
    assert a.multipliers is not None and a.constraint_violation == 0.0


def test_torch_backend_gives_the_same_iterates():
    pytest.importorskip("torch")
    pc, pt = (occore.problems.make("unicycle_obstacles", backend) for backend in ("casadi", "torch"))
    a, b = occore.CDDP(max_iter=12).solve(pc), occore.CDDP(max_iter=12).solve(pt)
    np.testing.assert_allclose([h.cost for h in a.history], [h.cost for h in b.history], rtol=1e-9)
    np.testing.assert_allclose(a.us, b.us, atol=1e-8)


def test_a_tiny_problem_against_its_closed_form():
    """min sum u^2 s.t. x+ = x + u, x_T = 1, x_1 >= 0.6: the bound is active (unconstrained, every
    u = 1/T), u_0 = 0.6, the other T-1 controls share the rest; KKT: 2 u_t + lam_h = 0 (t > 0),
    2 u_0 + lam_h - nu = 0."""
    T = 4
    lower = np.full((T + 1, 1), -np.inf)
    lower[1] = 0.6
    prob = occore.Problem(lambda x, u: x + u, lambda x, u: ca.sumsqr(u), lambda x: 0 * x[0], x0=[0.0], nu=1,
                          horizon=T, x_lower=lower, terminal_constraints=lambda x: x - 1.0)
    res = occore.CDDP().solve(prob)
    u = np.array([0.6] + [0.4 / (T - 1)] * (T - 1))
    assert res.converged
    np.testing.assert_allclose(res.us[:, 0], u, atol=1e-7)
    assert res.cost == pytest.approx(float(u @ u), rel=1e-7)
    assert res.multipliers.h[0] == pytest.approx(-2 * u[1], rel=1e-5)
    assert res.multipliers.lower[1, 0] == pytest.approx(2 * u[0] - 2 * u[1], rel=1e-5)


@pytest.mark.parametrize("kw, name", [
    (dict(method="sqp"), "method"), (dict(penalty=0.0), "penalty"), (dict(penalty_factor=1.0), "penalty_factor"),
    (dict(penalty_keep=0.0), "penalty_keep"), (dict(constraint_tol=-1.0), "constraint_tol"),
    (dict(barrier_min=1.0), "barrier_min"), (dict(stochastic=True), "stochastic"),
    (dict(second_order_below=-1.0), "second_order_below"),
])
def test_bad_options_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        occore.CDDP(**kw)


def test_inputs_are_not_modified(zoo):
    prob = zoo["pendulum_terminal"]
    us0 = np.full((50, 1), 0.1)
    copy = us0.copy()
    res = occore.CDDP().solve(prob, us0=us0)
    np.testing.assert_array_equal(us0, copy)
    assert res.converged and math.isclose(res.cost, OPTIMA["pendulum_terminal"], rel_tol=1e-6)


def test_problems_without_a_constraint_declaration_are_refused():
    class Bare:      # a ControlProblem that is not an occore.Problem (e.g. a network)
        horizon = 3

    with pytest.raises(occore.InputError, match="cddp: expected an occore.Problem"):
        occore.CDDP().solve(Bare())
    with pytest.raises(occore.InputError, match="xs0: a state guess needs a dense occore.Problem"):
        occore.FDDP().solve(Bare(), xs0=np.zeros((4, 1)))


def _schedule(res_history, states, opts, initial_violation):
    """(stop, threshold, updated) per iteration: the inner-solve tolerance the options document
    (barrier: max(tol, 10 mu) above barrier_min; augmented Lagrangian: max(tol, min(inner_tol, v))
    while the violation v before the iteration is above constraint_tol; tol otherwise) and whether
    the iteration updated the multipliers."""
    rows, before, violation = [], None, initial_violation
    for info, (mult, prev) in zip(res_history, states):
        if prev.barrier > opts.barrier_min:
            threshold = max(opts.tol, 10.0 * prev.barrier)
        elif violation > opts.constraint_tol:
            threshold = max(opts.tol, min(opts.inner_tol, violation))
        else:
            threshold = opts.tol
        rows.append((info.stop, threshold, not _same(mult, prev)))
        violation = info.constraint_violation
    return rows


def _same(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("g", "upper", "lower", "h")) and (
        (a.nh, a.penalty, a.barrier, a.violation) == (b.nh, b.penalty, b.barrier, b.violation))


def _solve_recording(solver, prob, **kw):
    states, prev = [], []

    def record(info, state):
        states.append((state.multipliers, prev[-1] if prev else first.multipliers))
        prev.append(state.multipliers)
    first = solver._first_state(prob, solver.init(prob, **kw))
    res = solver.solve(prob, callbacks=[record], **kw)
    return res, states, first


@pytest.mark.parametrize("method", ["barrier", "al"])
def test_multipliers_are_updated_exactly_when_an_inner_solve_reaches_its_tolerance(zoo, method):
    """Each iteration updates the multipliers iff its stop value (expected decrease of a full
    step) fell below the inner solve's tolerance; the barrier falls by the superlinear rule of
    IPOPT (Waechter & Biegler 2006, eq. 7), mu <- max(mu_min, min(kappa mu, mu^1.5)); an
    inner tolerance of tol applies at mu = barrier_min (here tol < 10 barrier_min)."""
    prob = zoo["cartpole_track"]
    solver = occore.CDDP(method=method, tol=1e-9, barrier_min=1e-6)
    res, states, first = _solve_recording(solver, prob)
    assert res.converged and abs(res.cost - OPTIMA["cartpole_track"]) / OPTIMA["cartpole_track"] <= 1e-5
    opts = solver.options
    rows = _schedule(res.history, states, opts, first.traj.extras.values.violation())
    updates = 0
    for stop, threshold, updated in rows:
        assert updated == (stop < threshold), (stop, threshold)
        updates += updated
    assert updates >= 3
    if method == "barrier":
        seen = [opts.barrier] + [m.barrier for m, prev in states if m.barrier != prev.barrier]
        expect = [opts.barrier]
        while expect[-1] > opts.barrier_min:
            mu = expect[-1]
            expect.append(max(opts.barrier_min, min(opts.barrier_factor * mu, mu ** 1.5)))
        assert seen == expect            # 0.1, 0.02, 0.00283, 1.5e-4, 1.8e-6, 1e-6


def test_infeasible_after_the_penalty_reached_its_maximum():
    """The penalty rises x10 from 1 and may reach penalty_max itself (10^4 is exact); the solve
    ends INFEASIBLE only when the next raise would pass it."""
    prob = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: ca.sumsqr(u), lambda x: 0 * x[0], x0=[1.0],
                          nu=1, horizon=10, x_upper=1.2, terminal_constraints=lambda x: x - 2.0)
    res = occore.CDDP(penalty_max=1e4).solve(prob)
    assert res.status is occore.Status.INFEASIBLE
    assert res.multipliers.penalty == 1e4


def test_the_local_model_reuses_derivatives_and_evaluates_second_order_ones_anew(zoo):
    """_Augmented.local_model: the derivatives stored with an iterate serve another model of the
    same order (after a multiplier update) without a new evaluation; a second-order model is
    evaluated anew, with the dynamics Hessians (its backward pass equals the one built from
    second-order derivatives directly, and differs from the Gauss-Newton one)."""
    from occore.lq.augmented import augment
    from occore.solvers.cddp import _Augmented

    prob = occore.problems.make("unicycle_obstacles")
    cs = prob.constraints
    mult = occore.Multipliers.zeros(cs, 10.0)
    view = _Augmented(prob, mult)
    rng = np.random.default_rng(0)
    traj = view.rollout(0.3 * rng.standard_normal((prob.horizon, prob.nu)))
    calls = []
    evaluate = prob.evaluate_derivatives

    def counting(xs, us, second_order=False):
        calls.append(second_order)
        return evaluate(xs, us, second_order)
    prob.evaluate_derivatives = counting
    gn = view.local_model(traj, False)
    moved = _Augmented(prob, occore.Multipliers.zeros(cs, 100.0)).rewrap(traj)
    _Augmented(prob, occore.Multipliers.zeros(cs, 100.0)).local_model(moved, False)
    assert calls == [False]
    full = view.local_model(traj, True)
    assert calls == [False, True]
    d = evaluate(traj.xs, traj.us, True)
    direct = prob.model_of(augment(d, traj.extras.values, mult, cs.upper_index, cs.lower_index), traj.us)
    (_, (a1, a2)), (_, (b1, b2)), (_, (c1, c2)) = (m.backward(1e3, s) for m, s in
                                                   ((full, True), (direct, True), (gn, False)))
    assert (a1, a2) == pytest.approx((b1, b2), rel=1e-12)
    assert abs(a2 - c2) > 1e-6 * abs(c2)


def test_a_problem_missing_either_constraint_attribute_is_refused(zoo):
    prob = zoo["pendulum_terminal"]

    class OnlyValues:
        horizon = prob.horizon
        constraint_values = prob.constraint_values

    class OnlyDeclaration:
        horizon = prob.horizon
        constraints = prob.constraints

    for bare in (OnlyValues(), OnlyDeclaration()):
        with pytest.raises(occore.InputError, match="cddp: expected an occore.Problem"):
            occore.CDDP().init(bare)


def test_multipliers_of_other_constraints_are_not_taken_as_a_warm_start():
    """A Result whose multipliers have other shapes (state bounds against a path constraint; the
    same single terminal equality) warm-starts the controls only: the multipliers start at zero and
    the solve reaches the cold start's optimum."""
    def make(**kw):
        return occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: ca.sumsqr(u), lambda x: 0 * x[0], x0=[0.0],
                              nu=1, horizon=10, terminal_constraints=lambda x: x - 1.0, **kw)
    a = make(x_upper=0.5 + 0.1 * np.arange(11)[:, None])
    b = make(path_constraints=lambda x, u: u[0] - 1.5)
    res_a = occore.CDDP().solve(a)
    assert res_a.converged and res_a.multipliers.upper.shape == (11, 1)
    state = occore.CDDP().init(b, us0=res_a)
    zeros = occore.Multipliers.zeros(b.constraints, 1.0)
    for k in ("g", "upper", "lower", "h"):
        assert getattr(state.multipliers, k).shape == getattr(zeros, k).shape
    warm, cold = occore.CDDP().solve(b, us0=res_a), occore.CDDP().solve(b)
    assert warm.converged and warm.cost == pytest.approx(cold.cost, rel=1e-8)


@pytest.mark.parametrize("constrained", [False, True])
def test_an_initial_rollout_that_overflows_ends_non_finite_like_the_other_solvers(constrained):
    """x+ = x + 0.1 x^3 + 0.1 u from x0 = 3 overflows under zero controls: DDP, iLQR, FDDP and E-MSA
    end NON_FINITE at init; CDDP's result then read the augmented point that was never made
    (AttributeError). It now ends NON_FINITE too, its constraint violation unknown (nan)."""
    dt = 0.1
    extra = dict(path_constraints=lambda x, u: u - 1.0) if constrained else {}
    prob = occore.Problem(lambda x, u: x + dt * x ** 3 + dt * u, lambda x, u: x ** 2 + u ** 2,
                          lambda x: 10 * x ** 2, x0=[3.0], nu=1, horizon=30, **extra)
    assert not np.isfinite(prob.rollout(prob.initial_controls()).cost)
    res = occore.CDDP().solve(prob)
    assert res.status is occore.Status.NON_FINITE
    assert res.message == "initial rollout cost is not finite" and res.iterations == 0
    if not constrained:
        assert occore.ILQR().solve(prob).message == res.message
    assert np.array_equal(res.us, np.zeros((30, 1))) and res.cost == math.inf
    assert math.isnan(res.constraint_violation)
