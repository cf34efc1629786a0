"""Constraints in the declaration: state bounds, path constraints, terminal equalities and
inequalities; typed errors at construction; every backend derives them (against each other and
finite differences); IPOPT and FATROP transcribe them; solvers that cannot honour them refuse."""
import math

import casadi as ca
import numpy as np
import pytest

import occore
from occore.errors import DerivativeError, InputError, OccoreError, ShapeError
from occore.problems.ops import ops_for

BACKENDS = ["casadi", "torch", "finite_difference"]


def spec(backend, T=7, **kw):
    """A unicycle with every kind of constraint (all non-trivially nonlinear)."""
    ops, dt = ops_for(backend), 0.1

    def f(x, u):
        return ops.stack([x[0] + u[0] * ops.cos(x[2]) * dt, x[1] + u[0] * ops.sin(x[2]) * dt, x[2] + u[1] * dt])

    def g(x, u):
        return ops.stack([0.25 - (x[0] + 0.5) ** 2 - (x[1] + 0.4) ** 2, u[0] * x[2] - 1.0])

    def h(x):
        return ops.stack([x[0] * x[1], ops.sin(x[2])])

    def hi(x):
        return ops.stack([x[0] - 0.1])

    args = dict(dynamics=f, stage_cost=lambda x, u: 0.5 * (x[0] ** 2 + x[1] ** 2 + x[2] ** 2 + u[0] ** 2 + u[1] ** 2),
                terminal_cost=lambda x: 50 * (x[0] ** 2 + x[1] ** 2 + x[2] ** 2), x0=[-1.0, -1.0, 1.0], nu=2,
                horizon=T, path_constraints=g, terminal_constraints=h, terminal_inequalities=hi,
                x_lower=[-2.0, -np.inf, -3.0], x_upper=1.5, backend=backend)
    args.update(kw)
    return args


def make(backend="casadi", **kw):
    if backend == "torch":
        pytest.importorskip("torch")
    return occore.Problem(**spec(backend, **kw))


# -- declaration --------------------------------------------------------------------------------
def test_declaration_sizes_kinds_and_values():
    prob = make()
    cs = prob.constraints
    assert (cs.ng, cs.nh, cs.nhi) == (2, 2, 1)
    assert prob.constraint_kinds == occore.constraints.KINDS
    assert prob.x_lower.shape == prob.x_upper.shape == (8, 3)
    assert cs.upper_index.tolist() == [0, 1, 2] and cs.lower_index.tolist() == [0, 2]
    traj = prob.rollout(0.5 * np.ones((7, 2)))
    vals = prob.constraint_values(traj.xs, traj.us)
    assert vals.g.shape == (7, 2) and vals.upper.shape == (8, 3) and vals.lower.shape == (8, 2)
    assert vals.h.shape == (2,) and vals.hi.shape == (1,)
    assert np.all(vals.upper[0] == -np.inf)          # x0 is given: row 0 never counts
    x = traj.xs
    expected = max(np.max(0.25 - (x[:7, 0] + 0.5) ** 2 - (x[:7, 1] + 0.4) ** 2), np.max(0.5 * x[:7, 2] - 1),
                   abs(x[7, 0] * x[7, 1]), abs(math.sin(x[7, 2])), x[7, 0] - 0.1, np.max(x[1:] - 1.5), 0.0)
    assert prob.constraint_violation(traj.xs, traj.us) == pytest.approx(expected, rel=1e-14)
    assert "constraints: state bounds, path constraints" in repr(prob)


def test_one_sided_and_per_stage_state_bounds_and_scalar_constraint():
    upper = np.full((8, 3), np.inf)
    upper[3:, 1] = 0.5                                  # a bound from stage 3 on
    prob = make(x_lower=None, x_upper=upper, path_constraints=lambda x, u: x[0] - 1.0,
                terminal_constraints=None, terminal_inequalities=None)
    assert prob.constraint_kinds == ("state bounds", "path constraints")
    assert prob.constraints.ng == 1 and prob.constraints.upper_index.tolist() == [1]
    assert prob.constraints.lower_index.size == 0


@pytest.mark.parametrize("kw, error, words", [
    (dict(x_lower=[0.0, 0.0]), ShapeError, ["x_lower", "(3,)", "(2,)"]),
    (dict(x_upper=np.zeros((7, 3))), ShapeError, ["x_upper", "(8, 3)", "(7, 3)"]),
    (dict(x_lower=np.nan), InputError, ["x_lower", "NaN"]),
    (dict(x_lower=np.inf), InputError, ["x_lower", "admits no state"]),
    (dict(x_upper=-np.inf), InputError, ["x_upper", "admits no state"]),
    (dict(x_lower=2.0, x_upper=1.0), InputError, ["x_lower > x_upper", "stage 1", "state 0"]),
    (dict(path_constraints=3), InputError, ["path_constraints", "callable"]),
    (dict(path_constraints=lambda x, u: ca.horzcat(x, x)), ShapeError, ["path_constraints", "(3, 2)"]),
    (dict(terminal_constraints=lambda x: x.T), ShapeError, ["terminal_constraints", "(1, 3)"]),
    (dict(path_constraints=lambda x, u: ca.log(x[0])), InputError, ["path_constraints", "not finite at x0"]),
    (dict(terminal_inequalities=lambda x: 1 / (x[0] + 1)), InputError, ["terminal_inequalities", "not finite"]),
    (dict(path_constraints=lambda x, u: x[7]), DerivativeError, ["path_constraints", "could not be evaluated"]),
])
def test_bad_constraint_declarations_raise_typed_errors(kw, error, words):
    with pytest.raises(error) as info:
        make(**kw)
    assert isinstance(info.value, OccoreError)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("backend", ["torch", "finite_difference"])
def test_wrong_constraint_shapes_in_other_backends(backend):
    if backend == "torch":
        torch = pytest.importorskip("torch")
        bad = lambda x, u: torch.ones((2, 2), dtype=torch.float64)  # noqa: E731
    else:
        bad = lambda x, u: np.ones((2, 2))  # noqa: E731
    with pytest.raises(ShapeError, match="path_constraints"):
        make(backend, path_constraints=bad)


def test_user_arrays_are_not_modified():
    lower = np.array([-2.0, -np.inf, -3.0])
    copy = lower.copy()
    prob = make(x_lower=lower)
    lower[0] = 5.0
    assert prob.x_lower[1, 0] == -2.0
    lower[0] = -2.0
    np.testing.assert_array_equal(lower, copy)
    with pytest.raises(ValueError):
        prob.x_upper[1, 0] = 0.0


# -- derivatives --------------------------------------------------------------------------------
CFIELDS = ("g", "gx", "gu", "gxx", "gux", "guu", "h", "hx", "hxx")


def test_backends_agree_on_constraint_derivatives():
    probs = {b: make(b) for b in BACKENDS}
    us = 0.5 * np.random.default_rng(0).standard_normal((7, 2))
    traj = probs["casadi"].rollout(us)
    ref = probs["casadi"].evaluate_derivatives(traj.xs, traj.us, True)
    for b in ("torch", "finite_difference"):
        d = probs[b].evaluate_derivatives(traj.xs, traj.us, True)
        for name in CFIELDS:
            a, r = getattr(d, name), getattr(ref, name)
            tol = 1e-12 if b == "torch" else (1e-9 if name in ("g", "gx", "gu", "h", "hx") else 1e-6)
            assert a.shape == r.shape and np.abs(a - r).max() <= tol * max(1.0, np.abs(r).max()), (b, name)
        first = probs[b].evaluate_derivatives(traj.xs, traj.us, False)
        assert first.gxx is None and first.hxx is None and first.gx is not None
        Gb, Hb = probs[b]._backend.constraint_values(traj.xs, traj.us)
        np.testing.assert_allclose(Gb, ref.g, atol=1e-14)
        np.testing.assert_allclose(Hb, ref.h, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_derivatives_checks_the_constraints(backend):
    prob = make(backend)
    report = occore.check_derivatives(prob, 0.5 * np.random.default_rng(1).standard_normal((7, 2)))
    assert report.ok(1e-6), str(report)
    assert set(CFIELDS) <= set(report.errors)
    assert report["g"].shape == (7, 2) and report["hx"].shape == (3, 3)
    first = occore.check_derivatives(prob, second_order=False)
    assert "gxx" not in first.errors and "gx" in first.errors


def test_check_derivatives_catches_a_wrong_constraint_derivative():
    prob = make()
    backend = prob._backend
    true = backend.derivatives

    def wrong(xs, us, second_order):
        from dataclasses import replace
        d = true(xs, us, second_order)
        return replace(d, gu=d.gu * 1.01)

    backend.derivatives = wrong
    report = occore.check_derivatives(prob)
    assert not report.ok() and report.worst()[0] == "gu"


def test_unconstrained_problem_has_no_constraint_fields():
    prob = occore.problems.make("pendulum", horizon=10)
    d = prob.evaluate_derivatives(*prob.rollout(prob.initial_controls()).xs[None], np.zeros((10, 1)))
    assert all(getattr(d, name) is None for name in CFIELDS)
    assert prob.constraint_kinds == () and prob.constraint_violation(np.zeros((11, 2)), np.zeros((10, 1))) == 0.0


# -- references and refusals ----------------------------------------------------------------------
@pytest.mark.parametrize("reference", ["ipopt", "fatrop"])
def test_references_transcribe_every_constraint(reference):
    prob = make(T=15)
    res = getattr(occore.reference, reference)(prob)
    assert res.status is occore.Status.CONVERGED, res.message
    assert res.constraint_violation <= 1e-7
    vals = prob.constraint_values(res.xs, res.us)
    assert np.max(vals.g) <= 1e-7 and np.max(np.abs(vals.h)) <= 1e-7
    # non-convex: CDDP may find another local optimum; from CDDP's solution the reference stays there
    cddp = occore.CDDP().solve(prob)
    again = getattr(occore.reference, reference)(prob, cddp)
    assert cddp.converged and again.converged and cddp.cost == pytest.approx(again.cost, rel=1e-6)


@pytest.mark.parametrize("solver", [occore.DDP, occore.ILQR, occore.EMSA, occore.FDDP])
def test_solvers_without_constraint_support_refuse_naming_solver_and_kind(solver):
    prob = make(name="box")
    with pytest.raises(InputError) as info:
        solver().solve(prob)
    text = str(info.value)
    assert solver.name in text and "state bounds, path constraints, terminal equalities and terminal inequalities" in text
    assert "box" in text and "CDDP" in text
    prob = make(x_lower=None, x_upper=None, path_constraints=None, terminal_inequalities=None)
    with pytest.raises(InputError, match=f"{solver.name} cannot honour the terminal equalities"):
        solver().init(prob)


def test_with_initial_state_shares_the_compiled_functions():
    prob = make()
    moved = prob.with_initial_state([-0.9, -1.0, 0.9])
    assert moved._backend is prob._backend and prob.x0.tolist() == [-1.0, -1.0, 1.0]
    assert moved.rollout(np.zeros((7, 2))).xs[0].tolist() == [-0.9, -1.0, 0.9]
    for bad, error in (([1.0, 2.0], ShapeError), ([np.nan, 0, 0], InputError)):
        with pytest.raises(error, match="x0"):
            prob.with_initial_state(bad)
