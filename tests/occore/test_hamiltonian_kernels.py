"""occore.lq.hamiltonian (E-MSA's augmented Hamiltonian and its stage-wise maximisation) against
independent computations on a hand-written problem whose derivatives are known in closed form:
the Hamiltonian from its definition, its gradient and Hessian by finite differences (exact here:
g_t is linear in the control, so no third-derivative term is dropped), and the maximisation against
a brute-force search per stage (a fine grid with one control, many starts of a bounded
quasi-Newton search with two)."""
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import minimize

from occore.lq.hamiltonian import augmented_hamiltonian, maximize

NX, NU, T = 2, 2, 4
A = np.array([[0.9, 0.2], [-0.1, 0.8]])
B = np.array([[0.5, 0.0], [0.1, 0.3]])
Q = np.diag([1.0, 0.5])


def _f(x, u, c):
    """Dynamics with u-x coupling (fux) and curvature in u (fuu)."""
    return A @ x + B @ u + np.array([c * x[0] * u[0], 0.4 * u[1] ** 2 - c * x[1] * u[1]])


def _l(x, u, c):
    """Stage cost with a cross term (lux) and a non-convex part in u (for c > 0)."""
    return x @ Q @ x + 0.3 * u @ u + 0.7 * x[0] * u[1] - c * np.cos(2.0 * u[0])


def _derivatives(x, u, c):
    fx = A + np.array([[c * u[0], 0.0], [0.0, -c * u[1]]])
    fu = B + np.array([[c * x[0], 0.0], [0.0, 0.8 * u[1] - c * x[1]]])
    fux = np.zeros((NX, NU, NX))                 # fux[i, a, b] = d2 f_i / du_a dx_b
    fux[0, 0, 0], fux[1, 1, 1] = c, -c
    fuu = np.zeros((NX, NU, NU))
    fuu[1, 1, 1] = 0.8
    lx = 2 * Q @ x + np.array([0.7 * u[1], 0.0])
    lu = 0.6 * u + np.array([2 * c * np.sin(2 * u[0]), 0.7 * x[0]])
    lux = np.zeros((NU, NX))
    lux[1, 0] = 0.7
    luu = 0.6 * np.eye(NU)
    luu[0, 0] += 4 * c * np.cos(2 * u[0])
    return dict(f=_f(x, u, c), l=_l(x, u, c), fx=fx, fu=fu, fux=fux, fuu=fuu, lx=lx, lu=lu,
                lux=lux, luu=luu)


def _evaluate(xs, c):
    def evaluate(vs):
        parts = [_derivatives(xs[t], vs[t], c) for t in range(len(vs))]
        d = {k: np.array([p[k] for p in parts]) for k in parts[0]}
        d["lx"] = np.concatenate([d["lx"], np.zeros((1, NX))])   # (T+1, nx): row T terminal
        return SimpleNamespace(**d)
    return evaluate


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T + 1, NX)), rng.normal(size=(T + 1, NX)), rng.normal(size=(T, NU))


def _definition(xs, ps, vs, rho, c):
    """Ht_t(v) = p' f - l - rho/2 |x' - f|^2 - rho/2 |p - g|^2, g = fx' p' - lx, stage by stage."""
    out = []
    for t in range(T):
        d = _derivatives(xs[t], vs[t], c)
        g = d["fx"].T @ ps[t + 1] - d["lx"]
        out.append(ps[t + 1] @ d["f"] - d["l"] - 0.5 * rho * np.sum((xs[t + 1] - d["f"]) ** 2)
                   - 0.5 * rho * np.sum((ps[t] - g) ** 2))
    return np.array(out)


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_values_gradients_and_hessians_against_the_definition(rho):
    xs, ps, vs = _data()
    c = 0.6
    values, grads, hess = augmented_hamiltonian(_evaluate(xs, c)(vs), xs, ps, rho, hessian=True)
    np.testing.assert_allclose(values, _definition(xs, ps, vs, rho, c), rtol=1e-12, atol=1e-12)
    h = 1e-5
    for a in range(NU):
        e = np.zeros(NU)
        e[a] = h
        fd = (_definition(xs, ps, vs + e, rho, c) - _definition(xs, ps, vs - e, rho, c)) / (2 * h)
        np.testing.assert_allclose(grads[:, a], fd, rtol=1e-7, atol=1e-8)
        up = augmented_hamiltonian(_evaluate(xs, c)(vs + e), xs, ps, rho)[1]
        down = augmented_hamiltonian(_evaluate(xs, c)(vs - e), xs, ps, rho)[1]
        np.testing.assert_allclose(hess[:, :, a], (up - down) / (2 * h), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(hess, np.swapaxes(hess, 1, 2))


def _brute_force(xs, ps, rho, c, lower, upper, t, start):
    def neg(v):
        vs = start.copy()
        vs[t] = v
        return -_definition(xs, ps, vs, rho, c)[t]
    best = None
    grid = np.linspace(0, 1, 7)
    for a in grid:
        for b in grid:
            v0 = lower[t] + np.array([a, b]) * (upper[t] - lower[t])
            r = minimize(neg, v0, method="L-BFGS-B", bounds=list(zip(lower[t], upper[t])),
                         options=dict(ftol=1e-15, gtol=1e-12))
            if best is None or r.fun < best.fun:
                best = r
    return -best.fun


@pytest.mark.parametrize("method", ["newton", "gradient"])
def test_bounded_maximisation_reaches_each_stages_maximum(method):
    """Non-concave stages (cos term, indefinite Hessians) in a box: every stage ends at the best
    value a brute-force multi-start search finds (to 1e-8), never below its start, inside the
    box, with the controls passed in untouched."""
    xs, ps, us = _data(1)
    c, rho = 0.6, 0.3
    lower, upper = np.full((T, NU), -0.8), np.full((T, NU), 0.9)
    us0 = us.copy()
    inner = SimpleNamespace(method=method, iterations=400 if method == "gradient" else 60,
                            step_size=0.2)
    vs = maximize(_evaluate(xs, c), xs, us, ps, rho, inner, lower, upper)
    np.testing.assert_array_equal(us, us0)
    assert np.all(vs >= lower) and np.all(vs <= upper)
    got = _definition(xs, ps, vs, rho, c)
    start = _definition(xs, ps, np.clip(us, lower, upper), rho, c)
    assert np.all(got >= start)
    best = np.array([_brute_force(xs, ps, rho, c, lower, upper, t, vs) for t in range(T)])
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-8)   # (here the global maxima)


def test_unbounded_newton_on_concave_stages_is_the_exact_maximiser():
    """With c = 0 and rho > 0 every stage is a concave quadratic in u plus 0.4 u_1^2 terms; the
    Newton maximisation reaches the stationary point: zero gradient, the maximum of the stage."""
    xs, ps, us = _data(2)
    rho = 2.0
    inner = SimpleNamespace(method="newton", iterations=50, step_size=1.0)
    vs = maximize(_evaluate(xs, 0.0), xs, us, ps, rho, inner)
    _, grads, hess = augmented_hamiltonian(_evaluate(xs, 0.0)(vs), xs, ps, rho, hessian=True)
    assert np.all(np.linalg.eigvalsh(hess) < 0)
    np.testing.assert_allclose(grads, 0.0, atol=1e-9)


def test_one_control_in_a_box_is_the_grid_maximum():
    """nu = 1 takes the clipped Newton step: against a grid of 20001 points per stage."""
    rng = np.random.default_rng(3)
    xs, ps = rng.normal(size=(T + 1, NX)), rng.normal(size=(T + 1, NX))

    def evaluate(vs):
        full = np.concatenate([vs, np.zeros_like(vs)], axis=1)
        d = _evaluate(xs, 0.6)(full)
        for k in ("fu", "lu"):
            setattr(d, k, getattr(d, k)[..., :1])
        d.fux, d.lux = d.fux[:, :, :1], d.lux[:, :1]
        d.fuu, d.luu = d.fuu[:, :, :1, :1], d.luu[:, :1, :1]
        return d

    lower, upper = np.full((T, 1), -1.0), np.full((T, 1), 0.5)
    inner = SimpleNamespace(method="newton", iterations=80, step_size=1.0)
    vs = maximize(evaluate, xs, np.zeros((T, 1)), ps, 0.5, inner, lower, upper)
    grid = np.linspace(-1.0, 0.5, 20001)
    for t in range(T):
        vals = [_definition(xs, ps, np.tile([[g, 0.0]], (T, 1)), 0.5, 0.6)[t] for g in grid[::40]]
        fine = max(vals)
        here = _definition(xs, ps, np.tile([[vs[t, 0], 0.0]], (T, 1)), 0.5, 0.6)[t]
        assert here >= fine - 1e-5 and lower[t, 0] <= vs[t, 0] <= upper[t, 0]
