"""occore.check_derivatives: every backend agrees with finite differences of its own values on every
reference problem, and a wrong derivative is caught and named."""
from dataclasses import replace

import numpy as np
import pytest

import occore
from occore.derivatives.check import FIELDS
from occore.problems import NAMES

BACKENDS = ["casadi", "torch", "finite_difference"]
FIRST = ("f", "l", "fx", "fu", "lx", "lu")
SECOND = ("lxx", "lux", "luu", "fxx", "fux", "fuu")
HORIZON = 15   # the check is per stage: a short horizon tests the same thing, faster


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_every_backend_agrees_with_finite_differences(name, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    prob = occore.problems.make(name, backend, horizon=HORIZON)
    us = 0.5 * np.random.default_rng(0).standard_normal((HORIZON, prob.nu))
    report = occore.check_derivatives(prob, us)
    assert report.ok(1e-6), str(report)
    assert list(report.errors) == list(FIELDS)
    for field in FIRST:
        assert min(report[field].abs, report[field].rel) <= 1e-8, (field, str(report))
    nx, nu = prob.nx, prob.nu
    assert report["fxx"].shape == (HORIZON, nx, nx, nx) and report["fux"].shape == (HORIZON, nx, nu, nx)
    assert report["lx"].shape == (HORIZON + 1, nx) and report["l"].shape == (HORIZON + 1,)


def test_default_controls_first_order_and_table():
    prob = occore.problems.make("unicycle", horizon=10)
    report = occore.check_derivatives(prob, second_order=False)   # zeros
    assert report.ok() and not report.second_order
    assert set(report.errors) == set(FIELDS) - {"fxx", "fux", "fuu"}
    text = str(report)
    assert "backend 'casadi'" in text and "T=10" in text and "first order" in text
    for field in report.errors:
        assert f"\n{field} " in text


class _Wrong:
    """A problem whose backend returns one wrong derivative field."""

    def __init__(self, prob, field, delta):
        self._prob, self._field, self._delta = prob, field, delta

    def __getattr__(self, name):
        return getattr(self._prob, name)

    def evaluate_derivatives(self, xs, us, second_order=False):
        d = self._prob.evaluate_derivatives(xs, us, second_order)
        bad = np.array(getattr(d, self._field), copy=True)
        bad[3] += self._delta
        return replace(d, **{self._field: bad})


@pytest.mark.parametrize("field", ["fx", "lu", "lxx", "fux"])
def test_a_wrong_derivative_is_caught_and_named(field):
    prob = occore.problems.make("cartpole", horizon=HORIZON)
    us = 0.3 * np.ones((HORIZON, 1))
    report = occore.check_derivatives(_Wrong(prob, field, 1e-3), us)
    assert not report.ok(1e-5)
    assert report.worst()[0] == field
    assert report[field].where[0] == 3
    assert report[field].abs == pytest.approx(1e-3, rel=1e-3)
    for other in set(report.errors) - {field}:
        assert report[other].ok(1e-6), (other, str(report))


def test_bad_controls_are_rejected():
    prob = occore.problems.make("pendulum", horizon=5)
    with pytest.raises(occore.ShapeError, match="us"):
        occore.check_derivatives(prob, np.zeros((4, 1)))
    with pytest.raises(occore.InputError, match="occore.Problem"):
        occore.check_derivatives(object())
    us = np.full((5, 1), 3.0)
    occore.check_derivatives(prob, us)
    assert np.all(us == 3.0)   # not modified


@pytest.mark.parametrize("value", ["no", None, 0, 1.0])
def test_second_order_must_be_a_bool(value):
    """A truthy string or None would have picked one of the two checks silently (and the report
    would carry the value as its second_order)."""
    prob = occore.problems.make("pendulum", horizon=5)
    with pytest.raises(occore.InputError, match=f"second_order={value!r} is invalid: expected True or False"):
        occore.check_derivatives(prob, second_order=value)


LARGE = [("lqr", 1e3), ("lqr", 1e6), ("pendulum", 1e3), ("pendulum", 1e4), ("cartpole", 1e3),
         ("unicycle", 1e3), ("unicycle", 1e4)]   # cartpole from 1e4 overflows within 6 stages


@pytest.mark.parametrize("name,scale", LARGE)
def test_correct_derivatives_pass_at_large_states(name, scale):
    """States ~1e3-1e6: the values (a cost ~scale^2) round at ~eps |l|, which central differences
    divide by h; and a relative step at a large state is large in absolute terms. Neither may
    read as a wrong derivative of the exact (CasADi) backend."""
    prob = occore.problems.make(name, horizon=6)
    prob = prob.with_initial_state(scale * np.linspace(1.0, 0.5, prob.nx))
    us = 0.5 * np.random.default_rng(1).standard_normal((6, prob.nu))
    assert np.abs(prob.rollout(us).xs).max() >= 0.5 * scale
    report = occore.check_derivatives(prob, us)
    assert report.ok(1e-6), str(report)


@pytest.mark.parametrize("field,delta", [("lx", 1e-4), ("fx", 1e-4), ("fu", 1e-2), ("lxx", 1e-3)])
def test_a_wrong_derivative_is_still_caught_at_large_states(field, delta):
    """The same check at states ~1e6 (lqr: polynomial, so the differences are exact up to
    rounding) still sees an error of ``delta`` times the field's scale at one stage, well above
    what the differencing resolves there (fu: f ~1e6 differenced with a control step ~6e-6)."""
    prob = occore.problems.make("lqr", horizon=6)
    prob = prob.with_initial_state(1e6 * np.linspace(1.0, 0.5, prob.nx))
    us = 0.5 * np.ones((6, prob.nu))
    good = occore.check_derivatives(prob, us)
    scale = good[field].scale
    report = occore.check_derivatives(_Wrong(prob, field, delta * scale), us)
    assert not report.ok(1e-5), str(report)
    assert report.worst()[0] == field and report[field].where[0] == 3
    res = report[field].resolution   # the differences' own error estimate
    assert res < 0.1 * delta * scale
    assert abs(report[field].abs - delta * scale) <= res


def _fast_curving():
    """Small states (|x| <= 1, relative and absolute steps the same) but sin(100 x): the
    truncation error of the Hessian differences (~h^2 f''''/12) is ~1e-5 of the Hessian."""
    import casadi as ca

    return occore.Problem(
        dynamics=lambda x, u: ca.vertcat(x[0] + 0.01 * ca.sin(100 * x[0]) + 0.1 * u[0],
                                         0.9 * x[1] + 0.1 * ca.cos(80 * x[0])),
        stage_cost=lambda x, u: ca.sumsqr(x) + 0.1 * ca.sumsqr(u) + 0.01 * ca.cos(60 * x[0]),
        terminal_cost=lambda x: ca.sumsqr(x), x0=[0.3, -0.2], nu=1, horizon=6)


def test_the_truncation_error_of_a_fast_curving_function_is_not_a_mismatch():
    prob = _fast_curving()
    us = 0.5 * np.random.default_rng(2).standard_normal((6, 1))
    report = occore.check_derivatives(prob, us)
    assert report.ok(1e-6), str(report)
    # estimated, not inflated: the truncation estimate from halved steps is 1.5x the error at
    # these steps (Richardson); measured 5.9e-8, 1.2e-5, 6.4e-6 of the scale (doubled steps: 4x)
    for field, bound in (("fx", 1.2e-7), ("fxx", 2.4e-5), ("lxx", 1.3e-5)):
        assert 0 < report[field].resolution < bound * report[field].scale, (field, str(report))
    wrong = occore.check_derivatives(_Wrong(prob, "fxx", 1e-3 * report["fxx"].scale), us)
    assert not wrong.ok(1e-5) and wrong.worst()[0] == "fxx" and wrong["fxx"].where[0] == 3

