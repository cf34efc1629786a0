"""occore.reference.ipopt: the optima of REFERENCE.md, bounds, stage parameters, clear errors."""
import logging
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import occore
from occore.problems import OPTIMA


@pytest.mark.parametrize("name", occore.problems.NAMES)
def test_reproduces_reference_optimum(name):
    prob = occore.problems.make(name)
    res = occore.reference.ipopt(prob)
    assert res.status is occore.Status.CONVERGED, res.message
    assert res.solver == "ipopt" and res.policy is None
    # Scored like every solver: the rollout of IPOPT's controls. (pendulum_box: 8e-9, the clamped
    # rollout of a swing-up amplifies IPOPT's last digits; the table's J* is IPOPT's own objective.)
    assert abs(res.cost - OPTIMA[name]) / OPTIMA[name] <= 1e-8
    again = prob.rollout(res.us)
    assert again.cost == res.cost
    np.testing.assert_array_equal(again.xs, res.xs)
    # The history scores every IPOPT iterate by a rollout; its last entry is the result.
    assert len(res.history) == res.iterations >= 1
    assert res.history[-1].cost == pytest.approx(res.cost, rel=1e-12)
    assert [h.iteration for h in res.history] == list(range(res.iterations))
    assert all(np.diff([h.wall_time for h in res.history]) >= 0)
    if prob.bounded:   # the box is kept exactly (no IPOPT bound relaxation) and is active
        assert np.all(res.us >= prob.u_lower) and np.all(res.us <= prob.u_upper)
        assert np.abs(res.us).max() == pytest.approx(2.0, abs=1e-8)


def test_lqr_takes_one_iteration_and_equals_ddp():
    prob = occore.problems.make("lqr")
    res = occore.reference.ipopt(prob)
    ddp = occore.ILQR().solve(prob)
    assert res.iterations == 1
    np.testing.assert_allclose(res.us, ddp.us, atol=1e-9)


def test_stage_parameters_match_a_dense_least_squares_solve():
    """Tracking a time-varying reference given as stage parameters, against an independent
    closed form: x+ = a x + b u is linear, so the problem is one least-squares solve over U."""
    T, a, b, r = 30, 1.1, 0.5, 0.2
    ref = np.sin(np.linspace(0, 3, T + 1))

    def f(x, u, p):
        return a * x + b * u

    def l(x, u, p):
        return 0.5 * (x[0] - p[0]) ** 2 + 0.5 * r * u[0] ** 2

    def lf(x, p):
        return 2.0 * (x[0] - p[0]) ** 2

    prob = occore.Problem(f, l, lf, x0=[0.3], nu=1, horizon=T, params=ref[:, None])
    res = occore.reference.ipopt(prob)
    # Closed form: X = Sx x0 + Su U, J = 1/2 |W^1/2 (X - ref)|^2 + r/2 |U|^2.
    Sx = a ** np.arange(T + 1)
    Su = np.array([[a ** (t - 1 - s) * b if s < t else 0.0 for s in range(T)] for t in range(T + 1)])
    w = np.ones(T + 1)
    w[T] = 4.0
    A = np.vstack([np.sqrt(w)[:, None] * Su, np.sqrt(r) * np.eye(T)])
    y = np.concatenate([np.sqrt(w) * (ref - Sx * 0.3), np.zeros(T)])
    U = np.linalg.lstsq(A, y, rcond=None)[0]
    assert res.converged
    np.testing.assert_allclose(res.us[:, 0], U, atol=1e-8)
    X = Sx * 0.3 + Su @ U
    assert res.cost == pytest.approx(0.5 * np.sum(w * (X - ref) ** 2) + 0.5 * r * U @ U, rel=1e-10)


def test_time_varying_bounds_are_honoured():
    prob = occore.problems.make("pendulum")
    lower = np.full((100, 1), -3.0)
    lower[:50] = -1.0
    boxed = occore.Problem(prob.dynamics, prob.stage_cost, prob.terminal_cost, x0=prob.x0, nu=1,
                           horizon=100, u_lower=lower, u_upper=1.5)
    res = occore.reference.ipopt(boxed)
    assert res.converged
    assert np.all(res.us >= lower) and np.all(res.us <= 1.5)
    ddp = occore.DDP().solve(boxed)
    assert res.cost == pytest.approx(ddp.cost, rel=1e-6)


def test_initial_guess_is_used_and_not_modified():
    prob = occore.problems.make("unicycle")
    us0 = np.full((50, 2), 0.1)
    copy = us0.copy()
    res = occore.reference.ipopt(prob, us0)
    np.testing.assert_array_equal(us0, copy)
    assert res.converged and res.cost == pytest.approx(OPTIMA["unicycle"], rel=1e-8)
    again = occore.reference.ipopt(prob, occore.DDP().solve(prob))     # warm start from a Result
    assert again.converged and again.iterations <= 3


def test_iteration_limit_gives_max_iter():
    res = occore.reference.ipopt(occore.problems.make("cartpole"), max_iter=3)
    assert res.status is occore.Status.MAX_ITER and res.iterations == 3
    assert np.isfinite(res.cost)


def test_numpy_callables_transcribe_where_casadi_implements_them():
    prob = occore.problems.make("cartpole", backend="finite_difference")
    res = occore.reference.ipopt(prob)
    assert res.converged and abs(res.cost - OPTIMA["cartpole"]) / OPTIMA["cartpole"] <= 1e-8


def test_torch_problem_cannot_be_transcribed():
    pytest.importorskip("torch")
    prob = occore.problems.make("lqr", backend="torch")
    with pytest.raises(occore.InputError, match="torch"):
        occore.reference.ipopt(prob)


def test_callable_that_does_not_take_casadi_symbols_is_named():
    prob = occore.problems.make("pendulum")

    def numpy_only(x, u):            # float() of a symbol fails
        return float(np.asarray(x, dtype=float)[0] ** 2)

    # a stand-in with the Problem's attributes: Problem itself would reject the callable at
    # construction with backend "casadi"
    stand_in = SimpleNamespace(**vars(prob))
    stand_in.stage_cost = numpy_only
    stand_in.rollout, stand_in.initial_controls, stand_in.clamp = prob.rollout, prob.initial_controls, prob.clamp
    with pytest.raises(occore.InputError, match="stage_cost"):
        occore.reference.ipopt(stand_in)


@pytest.mark.parametrize("bad", [dict(tol=0.0), dict(tol=float("nan")), dict(max_iter=-1), dict(max_iter=1.5),
                                 dict(tol=True), dict(record="no"), dict(record=None)])
def test_bad_options(bad):
    with pytest.raises(occore.InputError, match=list(bad)[0]):
        occore.reference.ipopt(occore.problems.make("lqr"), **bad)


def test_not_a_problem():
    with pytest.raises(occore.InputError, match="problem"):
        occore.reference.ipopt(object())


def test_ipopt_option_passthrough():
    res = occore.reference.ipopt(occore.problems.make("pendulum"), ipopt_options={"mu_strategy": "adaptive"})
    assert res.converged
    with pytest.raises(occore.InputError, match="ipopt_options"):
        occore.reference.ipopt(occore.problems.make("pendulum"), ipopt_options={"no_such_option": 1})


@pytest.mark.parametrize("solver,options,words", [
    ("ipopt", [("tol", 1e-3)], "ipopt_options=.* expected None or a dict"),
    ("fatrop", "max_iter=3", "fatrop_options=.* expected None or a dict"),
    ("fatrop", {"no_such_option": 1}, "fatrop_options: FATROP refused .*no_such_option"),
    ("fatrop", {"max_iter": "many"}, "fatrop_options: FATROP refused .*'many'.*type mismatch"),
])
def test_bad_solver_options_are_input_errors_naming_them(solver, options, words):
    """FATROP reads its options only when called, IPOPT when built: both refusals name the
    argument, as an option dict of the wrong kind does."""
    with pytest.raises(occore.InputError, match=words):
        getattr(occore.reference, solver)(occore.problems.make("lqr"), **{f"{solver}_options": options})


@pytest.mark.parametrize("name", occore.problems.CONSTRAINED)
def test_reproduces_the_constrained_optima(name):
    """The optima stored for the constrained problems are IPOPT's (tol 1e-10, from the zero guess),
    with every constraint met and active (the multipliers of the constraints are not all zero)."""
    prob = occore.problems.make(name)
    res = occore.reference.ipopt(prob)
    assert res.status is occore.Status.CONVERGED, res.message
    assert abs(res.cost - OPTIMA[name]) / OPTIMA[name] <= 1e-9
    assert res.constraint_violation <= 1e-8
    T, nx = prob.horizon, prob.nx    # duals: lam_g = [gaps; path; terminal], lam_x = [X; U] (x_0 fixed)
    duals = np.concatenate([res.multipliers["lam_g"][T * nx:], res.multipliers["lam_x"][nx:(T + 1) * nx]])
    assert np.max(np.abs(duals)) > 1e-3


@pytest.mark.parametrize("solver", ["ipopt", "ipopt-norecord"])
def test_a_non_finite_evaluation_is_a_status_not_casadis_warnings_on_stderr(solver, capfd):
    """log(0) at the initial guess: CasADi's 'NaN detected' warnings (one per evaluation) would
    be printed on stderr; the library never prints, the status says it."""
    import casadi as ca

    prob = occore.Problem(dynamics=lambda x, u: x + 0.1 * ca.log(x) * u,
                          stage_cost=lambda x, u: x[0] ** 2 + u[0] ** 2,
                          terminal_cost=lambda x: x[0] ** 2, x0=[0.0], nu=1, horizon=5)
    res = occore.reference.ipopt(prob, record=solver == "ipopt")
    assert res.status is occore.Status.NON_FINITE
    out, err = capfd.readouterr()
    assert "NaN detected" not in out + err and out == "", err


def test_fatrop_meeting_a_nan_logs_casadis_warning_instead_of_printing_it(capfd, caplog, monkeypatch):
    """log(0) at the initial guess, FATROP run on it all the same (the check of the start, see
    below, would not run it): FATROP ends on a non-finite iterate and CasADi then warns 'Failed to
    calculate multipliers' on stderr; the library never prints, it logs the line."""
    import casadi as ca

    from occore.reference import transcription

    monkeypatch.setattr(transcription, "_non_finite_start", lambda ca, nlp: "")
    prob = occore.Problem(dynamics=lambda x, u: x + 0.1 * ca.log(x) * u,
                          stage_cost=lambda x, u: x[0] ** 2 + u[0] ** 2,
                          terminal_cost=lambda x: x[0] ** 2, x0=[0.0], nu=1, horizon=5)
    with caplog.at_level(logging.DEBUG, logger="occore"):
        res = occore.reference.fatrop(prob, max_iter=50)
    assert res.status is occore.Status.NON_FINITE
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    logged = [r for r in caplog.records if r.name == "occore" and "Failed to calculate multipliers" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert logged[0].getMessage().startswith("FATROP: ")


def test_solver_output_on_the_file_descriptors_is_logged_and_the_descriptors_restored(capfd, caplog):
    """What C/C++ code writes to fds 1/2 (printf, raw writes) and what Python code prints during
    the solve all go to the log; afterwards both descriptors write where they did before."""
    import ctypes

    from occore.reference.transcription import _output_to_log

    with caplog.at_level(logging.DEBUG, logger="occore"), _output_to_log("fatrop"):
        os.write(1, b"iteration 1 on fd 1\n")
        os.write(2, b"WARNING: error on fd 2\n")
        ctypes.CDLL(None).printf(b"printf from C\n")   # buffered by the C library until flushed
        print("printed by python")
        print("python warning", file=sys.stderr)
    os.write(1, b"after 1\n")
    os.write(2, b"after 2\n")
    out, err = capfd.readouterr()
    assert out == "after 1\n" and err == "after 2\n"
    got = {(r.levelno, r.getMessage()) for r in caplog.records if r.name == "occore"}
    assert got == {(logging.DEBUG, "FATROP: iteration 1 on fd 1"), (logging.WARNING, "FATROP: WARNING: error on fd 2"),
                   (logging.DEBUG, "FATROP: printf from C"), (logging.DEBUG, "FATROP: printed by python"),
                   (logging.WARNING, "FATROP: python warning")}


def test_output_capture_without_usable_descriptors_still_logs_python_level_output(monkeypatch, capsys, caplog):
    """fds 1/2 that cannot be duplicated (closed, or no real file behind them): the descriptors are
    left alone, CasADi's Python-level messages are still logged, nothing raises."""
    from occore.reference import transcription

    def no_dup(fd):
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(transcription.os, "dup", no_dup)
    with caplog.at_level(logging.DEBUG, logger="occore"), transcription._output_to_log("ipopt"):
        print("CasADi - WARNING(x)", file=sys.stderr)
    assert capsys.readouterr() == ("", "")
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "occore"] == [
        (logging.WARNING, "IPOPT: CasADi - WARNING(x)")]


_HANGS = """
import casadi as ca, occore
cases = {"inf": (lambda x, u: ca.vertcat(ca.exp(10 * x[0]) + u[0], x[1] + u[0]), [100.0, 0.0]),
         "nan": (lambda x, u: ca.vertcat(ca.log(x[0] - u[0]), x[1] + u[0]), [0.5, 0.0]),
         "slope": (lambda x, u: ca.vertcat(x[0] + 0.1 * ca.sqrt(x[0]) * u[0] + 0.1 * u[0], x[1]), [0.0, 1.0])}
for name, (f, x0) in cases.items():
    prob = occore.Problem(dynamics=f, stage_cost=lambda x, u: ca.sumsqr(x) + ca.sumsqr(u),
                          terminal_cost=lambda x: ca.sumsqr(x), x0=x0, nu=1, horizon=5)
    res = occore.reference.fatrop(prob, max_iter=20)
    print(name, res.status.name, res.iterations, res.message)
"""


def test_fatrop_from_a_non_finite_initial_guess_is_a_status_not_a_hang():
    """exp(1000) = inf, log of a negative rollout state, the infinite slope of sqrt at 0 at the
    initial guess: FATROP 1.1.8 never returns from such a start (its linear solve spins), so it is
    not called; the status says why, as IPOPT's Invalid_Number_Detected does. (In a child process,
    so that a regression fails instead of hanging the suite.)"""
    done = subprocess.run([sys.executable, "-c", _HANGS], capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(occore.__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "inf NON_FINITE 0 FATROP: not run, the NLP is not finite at the initial guess (objective, constraints, "
        "objective gradient, constraint Jacobian)",
        "nan NON_FINITE 0 FATROP: not run, the NLP is not finite at the initial guess (constraints, "
        "constraint Jacobian)",
        "slope NON_FINITE 0 FATROP: not run, the NLP is not finite at the initial guess (constraint Jacobian)"]
    assert done.stderr == ""

