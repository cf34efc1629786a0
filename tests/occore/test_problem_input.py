"""Bad input to occore.Problem and the solvers: typed errors naming the argument; inputs untouched."""
import subprocess
import sys

import casadi as ca
import numpy as np
import pytest

import occore
from occore.errors import DerivativeError, InputError, OccoreError, ShapeError


def f(x, u):
    return x + 0.1 * u


def l(x, u):
    return ca.sumsqr(x) + ca.sumsqr(u)


def lf(x):
    return 10 * ca.sumsqr(x)


def make(**kw):
    args = dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[1.0, 2.0], nu=2, horizon=10)
    args.update(kw)
    return occore.Problem(**args)


@pytest.mark.parametrize("kw, error, words", [
    (dict(x0=[[1.0, 2.0]]), ShapeError, ["x0", "(nx,)", "(1, 2)"]),
    (dict(x0=[1.0, np.nan]), InputError, ["x0", "finite"]),
    (dict(x0="ab"), InputError, ["x0"]),
    (dict(nu=0), InputError, ["nu", ">= 1"]),
    (dict(horizon=2.5), InputError, ["horizon"]),
    (dict(u_lower=[-1.0, -1.0, -1.0], u_upper=1.0), ShapeError, ["u_lower", "(3,)"]),
    (dict(u_lower=-1.0, u_upper=np.inf), InputError, ["u_upper", "finite"]),
    (dict(u_lower=np.nan, u_upper=1.0), InputError, ["u_lower", "finite"]),
    (dict(u_lower=1.0, u_upper=-1.0), InputError, ["u_lower > u_upper", "stage 0"]),
    (dict(params=np.zeros((5, 1))), ShapeError, ["params", "(11, np)", "(5, 1)"]),
    (dict(params=np.full((11, 1), np.inf)), InputError, ["params", "finite"]),
    (dict(backend="jax"), InputError, ["backend", "casadi", "torch"]),
    (dict(dynamics=3), InputError, ["dynamics", "callable"]),
    (dict(dynamics=lambda x, u: ca.vertcat(x, u)), ShapeError, ["dynamics", "(2, 1)", "(4, 1)"]),
    (dict(stage_cost=lambda x, u: x), ShapeError, ["stage_cost", "(1, 1)", "(2, 1)"]),
    (dict(terminal_cost=lambda x: x.T), ShapeError, ["terminal_cost", "(1, 1)", "(1, 2)"]),
    (dict(dynamics=lambda x, u: x[5]), DerivativeError, ["dynamics", "could not be evaluated"]),
    (dict(dynamics=lambda x, u, p: x), DerivativeError, ["dynamics", "TypeError"]),
])
def test_declaration_errors_name_the_argument(kw, error, words):
    with pytest.raises(error) as info:
        make(**kw)
    assert isinstance(info.value, OccoreError)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bounds_broadcast_and_one_sided():
    prob = make(u_lower=[-1.0, -2.0], u_upper=None)
    assert prob.u_lower.shape == (10, 2) and np.all(prob.u_upper == np.inf)
    per_stage = np.linspace(0.5, 1.5, 10)[:, None] * np.ones((1, 2))
    prob = make(u_lower=-per_stage, u_upper=per_stage)
    res = occore.ILQR().solve(prob)
    assert np.all(np.abs(res.us) <= per_stage + 1e-15)


def test_controls_checked():
    prob = make()
    with pytest.raises(ShapeError, match=r"us0: expected shape \(10, 2\), got \(10, 3\)"):
        occore.ILQR().solve(prob, us0=np.zeros((10, 3)))
    with pytest.raises(InputError, match="us: expected finite"):
        prob.rollout(np.full((10, 2), np.nan))


@pytest.mark.parametrize("kw, name", [
    (dict(max_iter=0), "max_iter"), (dict(tol=-1.0), "tol"), (dict(tol=float("nan")), "tol"),
])
def test_bad_options_raise_value_error_naming_them(kw, name):
    with pytest.raises(ValueError, match=name):
        occore.DDP(**kw)


@pytest.mark.parametrize("make_opt, name", [
    (lambda: occore.Regularization(factor=1.0), "factor"),
    (lambda: occore.Regularization(initial=0.0), "initial"),
    (lambda: occore.Regularization(maximum=1e-12), "maximum"),
    (lambda: occore.LineSearch(steps=()), "steps"),
    (lambda: occore.LineSearch(steps=(1.0, 2.0)), "steps"),
    (lambda: occore.LineSearch(accept_ratio=1.5), "accept_ratio"),
    (lambda: occore.LineSearch(gap_warm_start=-1), "gap_warm_start"),
    (lambda: occore.LineSearch(gap_warm_start=1.5), "gap_warm_start"),
])
def test_bad_sub_options(make_opt, name):
    with pytest.raises(ValueError, match=name):
        make_opt()


def test_unknown_option_and_bad_callback():
    with pytest.raises(TypeError, match="max_iters"):
        occore.DDP(max_iters=3)
    with pytest.raises(TypeError, match="callbacks"):
        occore.DDP(callbacks=[3])


def test_nan_inside_a_solve_ends_with_non_finite_and_keeps_best_iterate():
    # sqrt(-u^2) is 0 at u = 0 but has no derivative there: the local model is NaN.
    prob = make(stage_cost=lambda x, u: ca.sumsqr(x) + ca.sumsqr(u) + ca.sqrt(-ca.sumsqr(u)))
    res = occore.DDP().solve(prob)
    assert res.status is occore.Status.NON_FINITE and not res.converged
    assert np.isfinite(res.cost) and np.all(res.us == 0.0)
    assert res.message


def test_nan_trials_are_backtracked():
    # The barrier -log(2 - x) is NaN beyond x = 2: long steps give NaN costs and are rejected.
    prob = occore.Problem(lambda x, u: x + u, lambda x, u: ca.sumsqr(u),
                          lambda x: 10 * (x[0] - 3) ** 2 - ca.log(2 - x[0]), x0=[0.0], nu=1, horizon=5)
    res = occore.ILQR().solve(prob)
    assert res.converged and np.isfinite(res.cost) and res.xs[-1, 0] < 2
    # Stationarity of the optimum found: T u = x_T and 2 u = -lf'(x_T).
    xT = res.xs[-1, 0]
    assert 2 * res.us[0, 0] == pytest.approx(-(20 * (xT - 3) + 1 / (2 - xT)), abs=1e-6)


def test_initial_non_finite_rollout():
    prob = occore.Problem(lambda x, u: x + u, lambda x, u: ca.sumsqr(u), lambda x: ca.log(x[0] - 1),
                          x0=[0.0], nu=1, horizon=5)
    res = occore.ILQR().solve(prob)
    assert res.status is occore.Status.NON_FINITE and res.iterations == 0


def test_inputs_are_not_modified():
    x0 = np.array([1.0, 2.0])
    lower = np.full((10, 2), -0.5)
    params = np.zeros((11, 1))
    us0 = np.full((10, 2), 0.1)
    copies = [a.copy() for a in (x0, lower, params, us0)]
    prob = occore.Problem(lambda x, u, p: x + 0.1 * u + p, lambda x, u, p: l(x, u), lambda x, p: lf(x),
                          x0=x0, nu=2, horizon=10, u_lower=lower, u_upper=0.5, params=params)
    x0[0] = 99.0  # the problem keeps its own copy
    assert prob.x0[0] == 1.0
    x0[0] = 1.0
    res = occore.DDP().solve(prob, us0=us0)
    assert res.converged
    for a, b in zip((x0, lower, params, us0), copies):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        prob.x0[0] = 3.0  # read-only


def test_stage_parameters_track_a_reference():
    T = 20
    ref = np.sin(np.linspace(0, 3, T + 1))[:, None]
    prob = occore.Problem(lambda x, u, p: x + 0.1 * u, lambda x, u, p: (x[0] - p[0]) ** 2 + 1e-3 * u[0] ** 2,
                          lambda x, p: (x[0] - p[0]) ** 2, x0=[0.0], nu=1, horizon=T, params=ref)
    res = occore.ILQR().solve(prob)
    assert res.converged and np.abs(res.xs[5:, 0] - ref[5:, 0]).max() < 0.05


def test_import_occore_loads_neither_torch_nor_casadi():
    code = ("import sys, occore; bad = [m for m in ('torch', 'casadi', 'nn_adapter') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
