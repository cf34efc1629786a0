"""occore.lq.augmented: the penalty terms of constrained DDP against what the module documents.

augment's added cost derivatives against central differences of merit_terms (the sum of the
terms) as a function of the states and controls, for the augmented Lagrangian and the log barrier,
with the Gauss-Newton and the second-order model; merit_terms against the closed forms of the
terms; update and shifted against their rules; CDDP on a problem whose terminal inequalities and
equality have closed-form optimum and multipliers."""
from dataclasses import replace

import casadi as ca
import numpy as np
import pytest

import occore
from occore.constraints import ConstraintSet
from occore.lq.augmented import INFEASIBLE, Multipliers, augment, barrier_duals, merit_terms, multiplier_change, update

T, NX, NU = 4, 3, 2


def _problem():
    """Every kind of constraint, each with curvature (g with x-u cross terms), per-stage state
    bounds with unbounded stages and components, two terminal equalities and two inequalities;
    the box |x|, |u| <= 0.5 lies strictly inside all of them."""
    def f(x, u):
        return ca.vertcat(x[0] + 0.1 * u[0] * ca.cos(x[2]), x[1] + 0.1 * u[0] * ca.sin(x[2]), x[2] + 0.1 * u[1])

    def g(x, u):
        return ca.vertcat(x[0] ** 2 + u[0] ** 2 + x[2] * u[1] - 2.0, ca.sin(x[1]) * u[0] + x[0] * x[2] - 1.0)

    upper = np.full((T + 1, NX), np.inf)
    upper[1:, 0] = 1.0
    upper[2, 0] = np.inf                   # component 0: no bound at stage 2
    upper[1:, 2] = 1.5
    return occore.Problem(f, lambda x, u: ca.sumsqr(x) + ca.sumsqr(u), lambda x: ca.sumsqr(x), x0=[0.1, -0.2, 0.3],
                          nu=NU, horizon=T, x_upper=upper, x_lower=[-2.0, -np.inf, -1.5],
                          path_constraints=g, terminal_constraints=lambda x: ca.vertcat(x[0] * x[1] - 0.1, ca.sin(x[2])),
                          terminal_inequalities=lambda x: ca.vertcat(x[0] ** 2 + x[1] - 1.0, x[2] - 2.0))


@pytest.fixture(scope="module")
def point():
    prob = _problem()
    rng = np.random.default_rng(3)
    xs, us = rng.uniform(-0.5, 0.5, (T + 1, NX)), rng.uniform(-0.5, 0.5, (T, NU))
    return prob, xs, us


def _multipliers(prob, values, method, rng):
    """Multipliers at ``values``: for the augmented Lagrangian lam >= 0 with lam + rho c at least
    0.3 away from 0 (about half the inequalities active), lam = 0 where c = -inf; for the barrier
    mu = 0.3 (the inequalities' multipliers are not used)."""
    rho = 2.0
    m = Multipliers.zeros(prob.constraints, rho, 0.3 if method == "barrier" else 0.0)

    def lam(c):
        delta = rng.choice([-1.0, 1.0], c.shape) * rng.uniform(0.3, 1.0, c.shape)
        with np.errstate(invalid="ignore"):
            out = np.maximum(-rho * c + delta, 0.0)
        return np.where(np.isfinite(c), out, 0.0)
    h = np.concatenate([rng.standard_normal(prob.constraints.nh), lam(values.hi)])
    return replace(m, g=lam(values.g), upper=lam(values.upper), lower=lam(values.lower), h=h)


def _phi(prob, m, xs, us):
    return merit_terms(prob.constraint_values(xs, us), m)


def _stage_vars(t):
    """(array name, row, column) of the variables of stage t: x_t then u_t (t < T)."""
    return [("x", t, i) for i in range(NX)] + ([("u", t, j) for j in range(NU)] if t < T else [])


def _moved(xs, us, moves):
    xs, us = xs.copy(), us.copy()
    for (which, t, i), step in moves:
        (xs if which == "x" else us)[t, i] += step
    return xs, us


def _fd_gradient(fun, xs, us, t, h=1e-6):
    return np.array([(fun(*_moved(xs, us, [(v, h)])) - fun(*_moved(xs, us, [(v, -h)]))) / (2 * h)
                     for v in _stage_vars(t)])


def _fd_hessian(fun, xs, us, t, h=1e-4):
    vs = _stage_vars(t)
    H = np.empty((len(vs), len(vs)))
    for a, va in enumerate(vs):
        for b, vb in enumerate(vs[a:], a):
            H[a, b] = H[b, a] = sum(sa * sb * fun(*_moved(xs, us, [(va, sa * h), (vb, sb * h)]))
                                    for sa in (1, -1) for sb in (1, -1)) / (4 * h * h)
    return H


def _added(aug, d, t):
    """(gradient, Hessian) that augment added to the cost derivatives of stage t, in z = (x_t, u_t)."""
    g = aug.lx[t] - d.lx[t]
    H = aug.lxx[t] - d.lxx[t]
    if t < T:
        g = np.concatenate([g, aug.lu[t] - d.lu[t]])
        ux = aug.lux[t] - d.lux[t]
        H = np.block([[H, ux.T], [ux, aug.luu[t] - d.luu[t]]])
    return g, H


def _constraint_jacobian(prob, xs, us, t, h=1e-6):
    """Central differences of every finite constraint value that stage t's variables move: path
    constraints at t, state bounds at t, terminal constraints at T (columns: _stage_vars(t))."""
    def stacked(xs, us):
        v = prob.constraint_values(xs, us)
        parts = [v.upper[t], v.lower[t]] + ([v.g[t]] if t < T else [v.h, v.hi])
        return np.concatenate(parts)
    c = stacked(xs, us)
    keep = np.isfinite(c)
    cols = [(stacked(*_moved(xs, us, [(v, h)]))[keep] - stacked(*_moved(xs, us, [(v, -h)]))[keep]) / (2 * h)
            for v in _stage_vars(t)]
    return c[keep], np.stack(cols, axis=1), keep


def _curvatures(prob, m, values, t):
    """phi'' of the finite constraint values of stage t in _constraint_jacobian's order, by the
    documented formulas: rho where lam + rho c > 0 (augmented Lagrangian), mu / c^2 (barrier);
    rho for the terminal equalities."""
    def ineq(c, lam):
        if m.barrier:
            return m.barrier / c ** 2
        return m.penalty * (lam + m.penalty * c > 0)
    parts = [ineq(values.upper[t], m.upper[t]), ineq(values.lower[t], m.lower[t])]
    if t < T:
        parts.append(ineq(values.g[t], m.g[t]))
    else:
        parts += [np.full(m.nh, m.penalty), ineq(values.hi, m.h[m.nh:])]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.concatenate(parts)


@pytest.mark.parametrize("method", ["al", "barrier"])
def test_augment_adds_the_gradient_and_hessian_of_the_penalty_terms(point, method):
    """lx, lu of J + sum phi are those of J plus the central-difference gradient of merit_terms in
    (x_t, u_t) at every stage (t = 0: the path constraints only; x_0's state-bound row is unused);
    with the second-order model, lxx, lux, luu add its central-difference Hessian (curvature of
    the constraints included); the Gauss-Newton model adds Jc' diag(phi'') Jc (Jc: central
    differences of the constraint values). d itself is not modified."""
    prob, xs, us = point
    cs = prob.constraints
    values = prob.constraint_values(xs, us)
    m = _multipliers(prob, values, method, np.random.default_rng(5))
    assert merit_terms(values, m) < INFEASIBLE
    if method == "al":    # both branches of max(0, lam + rho c) are exercised
        active = np.concatenate([(m.g + m.penalty * values.g).ravel(), m.h[m.nh:] + m.penalty * values.hi]) > 0
        assert active.any() and not active.all()

    def phi(xs, us):
        return _phi(prob, m, xs, us)

    for second_order in (True, False):
        d = prob.evaluate_derivatives(xs, us, second_order)
        before = {k: getattr(d, k).copy() for k in ("lx", "lu", "lxx", "lux", "luu")}
        aug = augment(d, values, m, cs.upper_index, cs.lower_index)
        for k, a in before.items():
            np.testing.assert_array_equal(getattr(d, k), a)
        for t in range(T + 1):
            grad, hess = _added(aug, d, t)
            np.testing.assert_allclose(grad, _fd_gradient(phi, xs, us, t), rtol=1e-7, atol=1e-7)
            if second_order:
                np.testing.assert_allclose(hess, _fd_hessian(phi, xs, us, t), rtol=1e-5, atol=1e-5)
            else:
                _, Jc, keep = _constraint_jacobian(prob, xs, us, t)
                D = _curvatures(prob, m, values, t)[keep]
                np.testing.assert_allclose(hess, Jc.T @ (D[:, None] * Jc), rtol=1e-7, atol=1e-7)
        # not vacuous: every added block is non-zero somewhere
        for k in ("lx", "lu", "lxx", "lux", "luu"):
            assert np.abs(getattr(aug, k) - getattr(d, k)).max() > 0.01, (k, second_order)


def test_merit_terms_are_the_documented_closed_forms():
    """Augmented Lagrangian: lam c + rho c^2 / 2 where lam + rho c > 0, -lam^2 / (2 rho) elsewhere;
    equalities lam c + rho c^2 / 2. Barrier: -mu sum log(-c) over the bounded entries, INFEASIBLE
    as soon as one value is 0 or positive. The default Multipliers are the augmented Lagrangian's."""
    cs = ConstraintSet.build(T=2, nx=1, x_lower=None, x_upper=[[np.inf], [1.0], [np.inf]], ng=2, nh=1, nhi=2)
    xs = np.array([[0.0], [1.5], [7.0]])                      # x_1 above its bound by 0.5
    g = np.array([[-0.5, 0.2], [-3.0, 0.1]])
    values = cs.values(xs, g, np.array([0.3, -0.4, 0.25]))
    rho = 4.0
    m = Multipliers.zeros(cs, rho)
    assert m.barrier == 0.0 and m.h.shape == (3,) and m.g.shape == (2, 2) and m.upper.shape == (3, 1)
    lam_g = np.array([[3.0, 0.0], [1.0, 2.0]])
    lam_u = np.array([[0.0], [0.5], [0.0]])
    lam_h = np.array([-1.5, 2.0, 0.5])
    m = replace(m, g=lam_g, upper=lam_u, h=lam_h)

    def ineq(c, lam):
        return lam * c + rho * c * c / 2 if lam + rho * c > 0 else -lam * lam / (2 * rho)
    expect = (ineq(-0.5, 3.0) + ineq(0.2, 0.0) + ineq(-3.0, 1.0) + ineq(0.1, 2.0)     # path
              + ineq(0.5, 0.5)                                                       # state bound, stage 1
              + (-1.5 * 0.3 + rho * 0.09 / 2)                                        # terminal equality
              + ineq(-0.4, 2.0) + ineq(0.25, 0.5))                                   # terminal inequalities
    assert merit_terms(values, m) == pytest.approx(expect, rel=1e-14)
    direct = Multipliers(g=lam_g, upper=lam_u, lower=np.zeros((3, 0)), h=lam_h, nh=1, penalty=rho)
    assert direct.barrier == 0.0 and merit_terms(values, direct) == pytest.approx(expect, rel=1e-14)

    mu = 0.3
    inside = cs.values(np.array([[0.0], [0.5], [7.0]]), np.array([[-0.5, -0.2], [-3.0, -0.1]]),
                       np.array([0.3, -0.4, -0.25]))
    b = replace(m, barrier=mu)
    logs = np.log([0.5, 0.2, 3.0, 0.1, 0.5, 0.4, 0.25])
    assert merit_terms(inside, b) == pytest.approx(-mu * logs.sum() + (-1.5 * 0.3 + rho * 0.09 / 2), rel=1e-14)
    for bad in (0.0, 0.5, np.nan):                             # on or past the boundary
        out = cs.values(np.array([[0.0], [0.5], [7.0]]), np.array([[-0.5, -0.2], [-3.0, bad]]),
                        np.array([0.3, -0.4, -0.25]))
        assert merit_terms(out, b) == INFEASIBLE


def test_update_is_the_derivative_of_each_term():
    """lam <- phi'(c): max(0, lam + rho c) for the augmented Lagrangian's inequalities, mu / -c
    (the dual estimate) for the barrier's, 0 where a state bound is absent (c = -inf: row 0 and
    unbounded stages); lam + rho c for the equalities either way; violation recorded, penalty and
    barrier kept (the barrier's schedule is the caller's)."""
    cs = ConstraintSet.build(T=2, nx=1, x_lower=None, x_upper=[[np.inf], [1.0], [np.inf]], ng=2, nh=1, nhi=2)
    rho, mu = 4.0, 0.3
    lam_g = np.array([[3.0, 0.0], [1.0, 2.0]])
    lam_h = np.array([-1.5, 2.0, 0.5])
    m = replace(Multipliers.zeros(cs, rho), g=lam_g, upper=np.array([[0.0], [0.5], [0.0]]), h=lam_h)
    values = cs.values(np.array([[0.0], [1.5], [7.0]]), np.array([[-0.5, 0.2], [-3.0, 0.1]]),
                       np.array([0.3, -0.4, 0.25]))
    new = update(values, m)
    np.testing.assert_array_equal(new.g, [[1.0, 0.8], [0.0, 2.4]])
    np.testing.assert_array_equal(new.upper, [[0.0], [2.5], [0.0]])
    assert new.lower.shape == (3, 0)
    np.testing.assert_allclose(new.h, [-1.5 + rho * 0.3, 0.4, 1.5], rtol=1e-15)
    assert (new.nh, new.penalty, new.barrier, new.violation) == (1, rho, 0.0, values.violation()) and new.violation == 0.5
    assert np.isinf(m.violation)

    inside = cs.values(np.array([[0.0], [0.5], [7.0]]), np.array([[-0.5, -0.2], [-3.0, -0.1]]),
                       np.array([0.3, -0.4, -0.25]))
    new = update(inside, replace(m, barrier=mu))
    np.testing.assert_allclose(new.g, mu / np.array([[0.5, 0.2], [3.0, 0.1]]), rtol=1e-15)
    np.testing.assert_array_equal(new.upper, [[0.0], [mu / 0.5], [0.0]])
    np.testing.assert_allclose(new.h, [-1.5 + rho * 0.3, mu / 0.4, mu / 0.25], rtol=1e-15)
    assert (new.penalty, new.barrier, new.violation) == (rho, mu, 0.3)


def test_barrier_duals_are_the_linearised_dual_update_of_every_inequality(point):
    """barrier_duals: lam = max(0, mu / -c + mu / c^2 dc) for the path constraints, both state
    bounds and the terminal inequalities, dc the change of c along the step (dxs, dus), here
    central differences of the constraint values (independent of the Jacobians it is given); 0
    where a bound is absent; the terminal equalities keep update's lam + rho h. Without a barrier
    it is update itself."""
    prob, xs, us = point
    cs = prob.constraints
    values = prob.constraint_values(xs, us)
    mu = 0.05
    m = replace(Multipliers.zeros(cs, 2.0, mu), h=np.concatenate([[0.7, -0.4], np.zeros(cs.nhi)]))
    assert merit_terms(values, m) < INFEASIBLE                 # strictly inside: the barrier's domain
    rng = np.random.default_rng(11)
    dxs, dus = rng.standard_normal((T + 1, NX)), rng.standard_normal((T, NU))
    d = prob.evaluate_derivatives(xs, us, False)
    new = barrier_duals(values, m, d, dxs, dus, cs.upper_index, cs.lower_index)
    e = 1e-6
    up = prob.constraint_values(xs + e * dxs, us + e * dus)
    down = prob.constraint_values(xs - e * dxs, us - e * dus)
    seen = []
    for name in ("g", "upper", "lower", "hi"):
        c = getattr(values, name)
        finite = np.isfinite(c)
        with np.errstate(invalid="ignore"):
            dc = np.where(finite, (getattr(up, name) - getattr(down, name)) / (2 * e), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            expect = np.where(finite, np.maximum(mu / -c + mu / c ** 2 * dc, 0.0), 0.0)
        got = new.h[m.nh:] if name == "hi" else getattr(new, name)
        assert got.shape == c.shape and c.size > 0, name
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-9, err_msg=name)
        seen += [bool((got[finite] == 0).any()), bool((got > 0).any())]
    assert all(seen[1::2]) and any(seen[0::2])                  # both branches of the max reached
    np.testing.assert_allclose(new.h[:m.nh], m.h[:m.nh] + m.penalty * values.h, rtol=1e-15)
    plain = replace(m, barrier=0.0)
    same = barrier_duals(values, plain, d, dxs, dus, cs.upper_index, cs.lower_index)
    ref = update(values, plain)
    for name in ("g", "upper", "lower", "h"):
        np.testing.assert_array_equal(getattr(same, name), getattr(ref, name))


def test_shifted_multipliers_move_one_stage_earlier():
    """Stage t takes stage t+1's multipliers, the last stage keeps its own; the terminal ones, the
    penalty, the barrier and the violation are kept; empty kinds stay empty."""
    cs = ConstraintSet.build(T=3, nx=2, x_lower=None, x_upper=[1.0, np.inf], ng=2, nh=1, nhi=0)
    g = np.arange(6.0).reshape(3, 2)
    upper = 10 + np.arange(4.0)[:, None]
    m = replace(Multipliers.zeros(cs, 3.0, 0.2), g=g, upper=upper, h=np.array([7.0]), violation=0.25)
    s = m.shifted()
    np.testing.assert_array_equal(s.g, [[2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(s.upper, [[11], [12], [13], [13]])
    assert s.lower.shape == (4, 0) and s.h.tolist() == [7.0]
    assert (s.nh, s.penalty, s.barrier, s.violation) == (1, 3.0, 0.2, 0.25)
    np.testing.assert_array_equal(m.g, np.arange(6.0).reshape(3, 2))          # m itself unchanged
    none = Multipliers.zeros(ConstraintSet.build(T=0, nx=1, x_lower=None, x_upper=1.0, ng=1, nh=0, nhi=0), 1.0)
    assert none.shifted().g.shape == (0, 1) and none.shifted().upper.shape == (1, 0)


@pytest.mark.parametrize("method", ["al", "barrier"])
def test_terminal_inequalities_and_equality_reach_the_closed_form_kkt_point(method):
    """min sum |u_t|^2, x+ = x + u (two integrators), x_0 = 0, T = 4, with x_T[0] = 1 and the
    terminal inequalities 0.5 - x_T[1] <= 0 (active) and x_T[0] - 5 <= 0 (inactive): u_t = (1/T,
    0.5/T), cost 1.25/T; KKT 2 u_t0 + lam_h + nu_2 = 0, 2 u_t1 - nu_1 = 0: multipliers
    [lam_h, nu_1, nu_2] = [-2/T, 1/T, 0]. The barrier starts inside (x_T = (1, 1)) and stops at
    mu = 1e-7: its optimum is O(mu) away, and its dual estimates mu / -c of the last iterate are
    accurate (at the default barrier_min, 1e-11, c of the active constraint is -3e-11 and mu / -c
    is 30% off)."""
    prob = occore.Problem(lambda x, u: x + u, lambda x, u: ca.sumsqr(u), lambda x: 0 * x[0], x0=[0.0, 0.0], nu=2,
                          horizon=T, terminal_constraints=lambda x: x[0] - 1.0,
                          terminal_inequalities=lambda x: ca.vertcat(0.5 - x[1], x[0] - 5.0))
    kw = dict(barrier_min=1e-7) if method == "barrier" else {}
    res = occore.CDDP(method=method, **kw).solve(prob, us0=np.full((T, 2), 0.25))
    assert res.converged, res.summary()
    np.testing.assert_allclose(res.us, np.tile([1 / T, 0.5 / T], (T, 1)), atol=1e-6)
    assert res.cost == pytest.approx(1.25 / T, rel=1e-6)
    assert res.multipliers.h.shape == (3,)
    np.testing.assert_allclose(res.multipliers.h, [-2 / T, 1 / T, 0.0], atol=1e-5)
    if method == "barrier":
        assert prob.constraint_values(res.xs, res.us).hi.max() < 0 and res.multipliers.h[2] == pytest.approx(1e-7 / 4, rel=1e-6)


def test_multiplier_change_is_the_feasibility_complementarity_measure():
    """|max(c, -lam / rho)| for inequalities (a violated one: c; one that holds strictly with a
    positive multiplier: min(-c, lam / rho); active or inactive with lam = 0: 0), |h| for equalities."""
    cs = ConstraintSet.build(T=1, nx=1, x_lower=None, x_upper=None, ng=0, nh=1, nhi=3)
    m = replace(Multipliers.zeros(cs, penalty=4.0), h=np.array([1.0, 0.0, 2.0, 0.5]))
    for h, ineq, expected in ((0.0, [-0.5, 0.0, 0.0], 0.0),         # inactive with lam 0, active, active
                              (0.0, [-0.5, 0.1, 0.0], 0.1),         # violated: c
                              (0.0, [-0.5, 0.0, -0.05], 0.05),      # strict with lam 0.5: min(0.05, 0.125)
                              (0.0, [-0.5, 0.0, -1.0], 0.125),      # strict with lam 0.5: min(1, 0.125)
                              (-0.3, [-0.5, 0.0, 0.0], 0.3)):       # equality: |h|
        vals = cs.values(np.zeros((2, 1)), None, np.array([h, *ineq]))
        assert multiplier_change(update(vals, m), m) == pytest.approx(expected, rel=1e-12, abs=1e-15)
