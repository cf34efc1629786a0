"""Class 2 of issue 13: every public entry point of occore checks what it is given and names the
argument (``problem``, ``us0``, ``state``, ``mu``, ``callbacks``, ...) with the expected and the
actual type or shape, before any work; nothing the caller passed is modified."""
import numpy as np
import pytest

import occore
from occore import DDP, EMSA, ILQR, InputError, OccoreError, ShapeError

SOLVERS = [DDP(max_iter=3), ILQR(max_iter=3), EMSA(max_iter=3)]


@pytest.fixture(scope="module")
def pendulum():
    return occore.problems.make("pendulum")


@pytest.fixture(scope="module")
def cartpole():
    return occore.problems.make("cartpole")


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
@pytest.mark.parametrize("entry", ["solve", "init"])
def test_a_problem_name_or_other_object_is_refused_naming_problem(solver, entry):
    with pytest.raises(InputError, match=r"problem: .*got str.*occore\.problems\.make\('pendulum'\)"):
        getattr(solver, entry)("pendulum")
    with pytest.raises(InputError) as err:            # a name gets the hint, not a list of methods
        getattr(solver, entry)("pendulum")
    assert "missing" not in str(err.value)
    with pytest.raises(InputError, match=r"problem: .*missing: initial_controls.*got NoneType"):
        getattr(solver, entry)(None)


def test_a_solver_names_the_method_it_needs(pendulum):
    class NoHamiltonian:        # the DDP protocol only
        horizon = pendulum.horizon
        initial_controls, rollout = pendulum.initial_controls, pendulum.rollout
        local_model, rollout_policy = pendulum.local_model, pendulum.rollout_policy

    assert ILQR(max_iter=2).solve(NoHamiltonian()).iterations == 2
    with pytest.raises(InputError, match="missing: maximize_hamiltonian"):
        EMSA().solve(NoHamiltonian())


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: s.name)
def test_a_warm_start_from_another_problem_names_us0_and_both_shapes(solver, pendulum, cartpole):
    other = solver.solve(cartpole)                        # (101, 4) states where pendulum has (101, 2)
    with pytest.raises(ShapeError) as info:
        solver.solve(pendulum, us0=other)
    msg = str(info.value)
    assert info.value.argument.startswith("us0") and "(101, 2)" in msg and "(101, 4)" in msg, msg
    shorter = solver.solve(occore.problems.make("pendulum", horizon=50))
    with pytest.raises(ShapeError, match=r"us0\.us: expected shape \(100, 1\), got \(50, 1\)"):
        solver.init(pendulum, shorter)


@pytest.mark.parametrize("us0, error, words", [
    (np.zeros((3, 1)), ShapeError, ["us0", "(100, 1)", "(3, 1)"]),
    (np.zeros((100, 2)), ShapeError, ["us0", "(100, 1)", "(100, 2)"]),
    (np.full((100, 1), np.nan), InputError, ["us0", "finite"]),
    ("abc", InputError, ["us0", "numbers", "str"]),
    ([[1.0]] * 99, ShapeError, ["us0", "(99, 1)"]),
])
def test_bad_control_guesses_name_us0(pendulum, us0, error, words):
    for solver in SOLVERS:
        with pytest.raises(error) as info:
            solver.solve(pendulum, us0=us0)
        for w in words:
            assert w in str(info.value), (w, str(info.value))


def test_the_guess_is_not_modified(pendulum):
    us0 = np.full((100, 1), 0.3)
    res0 = ILQR(max_iter=3).solve(pendulum)
    before = (us0.copy(), res0.us.copy(), res0.xs.copy(), res0.policy.K.copy())
    for solver in SOLVERS:
        solver.solve(pendulum, us0=us0)
        solver.solve(pendulum, us0=res0)
    for a, b in zip(before, (us0, res0.us, res0.xs, res0.policy.K)):
        np.testing.assert_array_equal(a, b)


def test_step_checks_its_state(pendulum, cartpole):
    solver = ILQR()
    with pytest.raises(InputError, match="state: expected the SolverState returned by init"):
        solver.step(pendulum, "state")
    state = solver.init(cartpole)
    with pytest.raises(ShapeError, match=r"state: .*\(101, 2\).*\(101, 4\).*another problem"):
        solver.step(pendulum, state)
    new, info = solver.step(cartpole, state)
    assert info.iteration == 0 and new.iteration == 1


@pytest.mark.parametrize("mu", [-1.0, float("nan"), float("inf"), "a", True])
def test_init_mu_is_checked(pendulum, mu):
    with pytest.raises(InputError, match="mu: expected a finite number >= 0"):
        ILQR().init(pendulum, mu=mu)
    xs0 = np.zeros((pendulum.horizon + 1, pendulum.nx))      # FDDP's own init (a state guess)
    with pytest.raises(InputError, match="mu: expected a finite number >= 0"):
        occore.FDDP().init(pendulum, xs0=xs0, mu=mu)


@pytest.mark.parametrize("callbacks", [3, [3], ["x"]])
def test_solve_callbacks_are_checked(pendulum, callbacks):
    with pytest.raises(InputError, match="callbacks: expected"):
        ILQR().solve(pendulum, callbacks=callbacks)


def test_a_single_callable_is_a_callback(pendulum):
    seen = []
    ILQR(max_iter=2).solve(pendulum, callbacks=lambda info, state: seen.append(info.iteration))
    assert seen == [0, 1]


@pytest.mark.parametrize("kw, words", [
    (dict(problems=3), ["problems", "int"]),
    (dict(problems="nosuch"), ["unknown problem 'nosuch'", "lqr"]),
    (dict(solvers=5), ["solvers", "int"]),
    (dict(solvers="ddp,nosuch"), ["unknown solver 'nosuch'"]),
    (dict(levels="x"), ["levels='x'", "(0, 1)"]),
    (dict(levels=[2.0]), ["levels", "(0, 1)"]),
    (dict(backend="jax"), ["backend='jax'", "casadi"]),
    (dict(max_iter=0), ["max_iter=0"]),
    (dict(repeat=1.5), ["repeat=1.5"]),
    (dict(workers=0), ["workers=0"]),
])
def test_compare_refuses_bad_arguments_before_any_work(kw, words):
    args = dict(problems="lqr", solvers="ilqr")
    args.update(kw)
    with pytest.raises(InputError) as info:
        occore.compare(**args)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("arg", ["pendulum", None, 3])
def test_reference_ipopt_refuses_what_it_cannot_transcribe(arg):
    with pytest.raises(InputError, match="problem: expected an occore.Problem"):
        occore.reference.ipopt(arg)


def test_reference_ipopt_refuses_a_torch_problem():
    pytest.importorskip("torch")
    with pytest.raises(InputError, match="torch"):
        occore.reference.ipopt(occore.problems.make("pendulum", backend="torch", horizon=5))


@pytest.mark.parametrize("kw, words", [
    (dict(backend_options={"compile": "sometimes"}), ["backend_options", "compile", "'auto'"]),
    (dict(backend_options={"jit": True}), ["backend_options", "jit"]),
    (dict(backend_options=[1]), ["backend_options", "dict"]),
])
def test_backend_options_are_checked(kw, words):
    pytest.importorskip("torch")
    with pytest.raises(InputError) as info:
        occore.problems.make("pendulum", backend="torch", horizon=5, **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    with pytest.raises(InputError, match="not understood by backend 'casadi'"):
        occore.problems.make("pendulum", horizon=5, backend_options={"compile": "always"})


def test_every_error_here_is_an_occore_error():
    for cls in (InputError, ShapeError, occore.DerivativeError, occore.TraceError):
        assert issubclass(cls, OccoreError)


def test_repr_of_a_result_is_a_few_lines_and_summary_reads_as_english(pendulum):
    res = ILQR().solve(pendulum)
    text = repr(res)
    assert len(text.splitlines()) <= 4 and len(text) < 400, text
    assert "status=CONVERGED" in text and "xs (101, 2)" in text and "us (100, 1)" in text
    lqr = occore.problems.make("lqr")
    one = ILQR().solve(lqr, us0=ILQR().solve(lqr))
    assert one.iterations == 1 and "after 1 iteration " in one.summary(), one.summary()
    assert "after 10 iterations" in res.summary() and "ms per iteration" in res.summary()


def test_repr_of_a_solver_state_trajectory_and_policy_shows_shapes_not_arrays(pendulum):
    state = ILQR().init(pendulum)
    state, _ = ILQR().step(pendulum, state)
    for obj, words in ((state, ["SolverState(iteration=1, status=RUNNING", "xs (101, 2)", "us (100, 1)",
                                "policy=yes", "history of 1"]),
                       (state.traj, ["Trajectory(xs (101, 2), us (100, 1), cost="]),
                       (state.policy, ["Policy(k (100, 1), K (100, 1, 2))"])):
        text = repr(obj)
        assert len(text.splitlines()) <= 2 and len(text) < 300, text
        assert all(w in text for w in words), text
