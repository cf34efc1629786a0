"""Class 6 of issue 13, correctness only (the timings are in benchmarks/classic.py): the compiled
torch backend (inductor) computes what the eager one and CasADi compute, "auto" never compiles a
short solve, a failed compilation falls back to eager, and a function with data-dependent Python
branches gets a TraceError naming it."""
import logging

import casadi as ca
import numpy as np
import pytest

import occore
from occore import TraceError
from occore.derivatives.torch_compile import CompiledFunction

torch = pytest.importorskip("torch")

T = 13     # the rollouts' loop runs 10 stages per iteration (UNROLL): one iteration and 3 stages before it


def _problem(backend, **kw):
    """Two states, two controls, stage parameters (tracking targets) and control bounds: every
    branch of the compiled functions."""
    if backend == "torch":
        sin, stack = torch.sin, torch.stack
    else:
        sin, stack = ca.sin, (lambda v: ca.vertcat(*v))

    def f(x, u, p):
        return stack([x[0] + 0.1 * x[1] + 0.05 * sin(u[0]), x[1] + 0.1 * u[1] - 0.2 * sin(x[0])])

    def l(x, u, p):
        return (x[0] - p[0]) ** 2 + 0.5 * x[1] ** 2 + 0.1 * (u[0] ** 2 + u[1] ** 2)

    def lf(x, p):
        return 10 * (x[0] - p[0]) ** 2 + x[1] ** 2

    params = np.linspace(0.0, 1.0, T + 1)[:, None]
    return occore.Problem(f, l, lf, x0=[0.3, -0.2], nu=2, horizon=T, params=params, u_lower=-0.8,
                          u_upper=0.8, backend=backend, **kw)


@pytest.fixture(scope="module")
def compiled():
    prob = _problem("torch", backend_options={"compile": "always"})
    rng = np.random.default_rng(0)
    us = rng.uniform(-1, 1, (T, 2))
    traj = prob.rollout(us)                       # compiles the rollout
    prob.evaluate_derivatives(traj.xs, traj.us, True)
    K = 0.1 * rng.standard_normal((T, 2, 2))
    policy = occore.Policy(k=rng.standard_normal((T, 2)), K=K)
    prob.rollout_policy(traj, policy, 0.5)
    assert prob.rollout_batch == 4
    prob.rollout_policies(traj, policy, [1.0, 0.5])   # the line search's batched trials
    fast = prob._backend.fast
    if not all(fn.compiled is not None for fn in fast.values()):
        pytest.skip("inductor cannot compile here (no C++ compiler?): "
                    + ", ".join(k for k, fn in fast.items() if fn.compiled is None))
    return prob, traj, policy


def test_compiled_functions_equal_eager_and_casadi(compiled):
    prob, traj, policy = compiled
    eager = _problem("torch", backend_options={"compile": "never"})
    cas = _problem("casadi")
    for other in (eager, cas):
        a, b = prob.rollout(traj.us), other.rollout(traj.us)
        np.testing.assert_allclose(a.xs, b.xs, rtol=1e-12, atol=1e-14)
        assert a.cost == pytest.approx(b.cost, rel=1e-12)
        for alpha in (1.0, 0.5):
            a, b = prob.rollout_policy(traj, policy, alpha), other.rollout_policy(traj, policy, alpha)
            np.testing.assert_allclose(a.us, b.us, rtol=1e-12, atol=1e-14)
            assert np.all(np.abs(a.us) <= 0.8) and a.cost == pytest.approx(b.cost, rel=1e-12)
        steps = (1.0, 0.5, 0.25)                  # fewer than rollout_batch: padded, then dropped
        for alpha, a in zip(steps, prob.rollout_policies(traj, policy, steps)):
            b = other.rollout_policy(traj, policy, alpha)
            np.testing.assert_allclose(a.xs, b.xs, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(a.us, b.us, rtol=1e-12, atol=1e-14)
            assert a.cost == pytest.approx(b.cost, rel=1e-12)
        da = prob.evaluate_derivatives(traj.xs, traj.us, True)
        db = other.evaluate_derivatives(traj.xs, traj.us, True)
        for name in ("f", "l", "fx", "fu", "lx", "lu", "lxx", "lux", "luu", "fxx", "fux", "fuu"):
            np.testing.assert_allclose(getattr(da, name), getattr(db, name), rtol=1e-11, atol=1e-12,
                                       err_msg=name)


def test_compiled_solves_are_the_casadi_solves(compiled):
    prob = compiled[0]
    cas = _problem("casadi")
    for solver in (occore.DDP(), occore.ILQR(), occore.EMSA(max_iter=30)):
        a, b = solver.solve(prob), solver.solve(cas)
        assert a.iterations == b.iterations and a.status is b.status
        np.testing.assert_allclose(a.us, b.us, rtol=0, atol=1e-9)


def test_auto_does_not_compile_a_short_solve():
    prob = occore.problems.make("pendulum", backend="torch", horizon=20)
    res = occore.ILQR().solve(prob)
    assert res.converged
    fast = prob._backend.fast
    assert all(fn.mode == "auto" and fn.compiled is None and not fn.failed for fn in fast.values())
    assert 0 < fast["derivatives"].eager_seconds < fast["derivatives"].after_seconds


def test_a_failed_compilation_stays_eager_and_says_so_once(caplog):
    calls = []

    def not_compilable(*args):
        raise RuntimeError("no C++ compiler")

    fn = CompiledFunction("probe", lambda x: calls.append(x) or 2 * x, not_compilable, mode="always")
    with caplog.at_level(logging.WARNING, logger="occore"):
        assert fn(torch.ones(2)).tolist() == [2.0, 2.0]
        assert fn(torch.ones(2)).tolist() == [2.0, 2.0]
    assert fn.failed and fn.compiled is None and len(calls) == 2
    assert [r.getMessage() for r in caplog.records].count(
        "torch backend: compiling probe failed (RuntimeError: no C++ compiler); it stays eager") == 1


def test_auto_compiles_once_the_eager_time_reaches_the_threshold():
    seen = []
    fn = CompiledFunction("probe", lambda x: x + 1, lambda *a: (seen.append(a) or (lambda x: x + 1)),
                          mode="auto", after_seconds=0.0)
    fn(torch.ones(1))
    assert seen and (fn.compiled is not None or fn.failed)


def _branching(x, u):
    if x[0] > 0:
        return x + u
    return x - u


@pytest.mark.parametrize("kw, name", [
    (dict(dynamics=_branching), "dynamics"),
    (dict(stage_cost=lambda x, u: float(x.sum()) + (u * u).sum()), "stage_cost"),
    (dict(terminal_cost=lambda x: x.sum().item()), "terminal_cost"),
])
def test_data_dependent_python_branches_are_a_trace_error_naming_the_function(kw, name):
    args = dict(dynamics=lambda x, u: x + u, stage_cost=lambda x, u: (x * x).sum() + (u * u).sum(),
                terminal_cost=lambda x: (x * x).sum())
    args.update(kw)
    with pytest.raises(TraceError) as info:
        occore.Problem(**args, x0=[1.0, 2.0], nu=2, horizon=3, backend="torch")
    msg = str(info.value)
    assert msg.startswith(name) and "torch.where" in msg and "backend='casadi'" in msg
