"""occore.MPC and occore.simulate: the swing-ups from moved initial states reach the goal in closed
loop (solve to convergence and real-time iteration), CDDP keeps the track limit in closed loop, the
shifted warm start is what makes the calls cheap, the `occore mpc` command, bad input."""
import numpy as np
import pytest

import occore
from occore.cli import main
from occore.problems import GOALS


@pytest.mark.parametrize("name, x0, iterations, tol", [
    ("pendulum", [0.5, -1.0], None, 1e-8),
    ("pendulum", [0.5, -1.0], 1, 1e-6),
    ("cartpole", [0.2, 0.0, 0.4, 0.0], None, 1e-4),
    ("cartpole", [0.2, 0.0, 0.4, 0.0], 2, 1e-3),
])
def test_swing_ups_from_a_moved_state_reach_the_goal_in_closed_loop(name, x0, iterations, tol):
    prob = occore.problems.make(name)
    run = occore.simulate(occore.MPC(prob, occore.ILQR(), iterations=iterations), prob, steps=150, x0=x0)
    assert run.xs.shape == (151, prob.nx) and run.us.shape == (150, prob.nu)
    np.testing.assert_array_equal(run.xs[0], x0)
    assert np.max(np.abs(run.xs[-1] - GOALS[name])) < tol
    for k in (0, 75, 149):    # the plant is the problem's dynamics
        np.testing.assert_allclose(run.xs[k + 1], prob.transition(run.xs[k], run.us[k]), rtol=0, atol=0)
    assert np.all(run.latencies > 0) and run.latency(99) >= run.latency(50)


def test_fddp_in_closed_loop_on_the_cart_pole_from_a_state_guess():
    """FDDP's cold solve from zero controls at the moved cart-pole ends in a worse local optimum
    (an extra swing, cost 12.01) that the closed loop then follows (it has not settled after 150
    steps); from the linear interpolation to the goal as state guess it reaches the optimum that
    iLQR reaches (4.67), and the closed loop, warm-started from there, reaches the goal."""
    prob = occore.problems.make("cartpole")
    x0 = [0.2, 0.0, 0.4, 0.0]
    moved = prob.with_initial_state(x0)
    xs0 = np.linspace(x0, GOALS["cartpole"], prob.horizon + 1)
    cold, guided, ilqr = (occore.FDDP().solve(moved), occore.FDDP().solve(moved, xs0=xs0),
                          occore.ILQR().solve(moved))
    assert cold.converged and guided.converged and ilqr.converged
    assert abs(cold.cost - 12.0147) < 1e-3 and abs(guided.cost - ilqr.cost) < 1e-8 * ilqr.cost
    for iterations, tol in ((None, 1e-4), (2, 1e-3)):
        mpc = occore.MPC(prob, occore.FDDP(), iterations=iterations, xs0=xs0)
        run = occore.simulate(mpc, prob, steps=150, x0=x0)
        assert np.max(np.abs(run.xs[-1] - GOALS["cartpole"])) < tol, iterations
    run = occore.simulate(occore.MPC(prob, occore.FDDP()), prob, steps=150, x0=x0)   # the cold plan
    assert np.max(np.abs(run.xs[-1] - GOALS["cartpole"])) > 1e-3


def test_cddp_keeps_the_track_limit_in_closed_loop():
    prob = occore.problems.make("cartpole_track")
    run = occore.simulate(occore.MPC(prob, occore.CDDP(), iterations=3), prob, steps=120, x0=[0.3, 0, 0.3, 0])
    assert np.max(np.abs(run.xs[:, 0])) <= 0.8 + 1e-6          # the track: |x_cart| <= 0.8
    assert np.max(np.abs(run.xs[-1] - GOALS["cartpole_track"])) < 1e-3


def test_the_shifted_warm_start_makes_the_next_solve_cheap():
    prob = occore.problems.make("pendulum")
    x = np.array([0.5, -1.0])
    warm, cold = occore.MPC(prob, occore.ILQR()), occore.MPC(prob, occore.ILQR(), warm_start=False)
    for mpc in (warm, cold):
        u = mpc.control(x)
        assert mpc.result.converged and u.shape == (1,)
        mpc.control(prob.transition(x, u))
    assert warm.result.iterations <= 2 < cold.result.iterations
    warm.reset()
    assert warm.result is None


def test_transition_is_the_rollouts_step_with_the_control_clamped():
    prob = occore.problems.make("pendulum_box")
    us = np.full((prob.horizon, 1), 5.0)
    xs = prob.rollout(us).xs
    np.testing.assert_allclose(prob.transition(xs[0], [5.0]), xs[1], rtol=0, atol=1e-15)
    with pytest.raises(occore.ShapeError, match="u: expected shape"):
        prob.transition(xs[0], [1.0, 2.0])


def test_simulate_takes_plain_callables_and_does_not_modify_inputs():
    x0 = np.array([1.0])
    run = occore.simulate(lambda x: -0.5 * x, lambda x, u: x + u, steps=3, x0=x0)
    np.testing.assert_allclose(run.xs[:, 0], [1.0, 0.5, 0.25, 0.125])
    np.testing.assert_array_equal(x0, [1.0])


def test_a_non_finite_plant_state_is_named_with_its_step_and_values():
    """A plant returning NaN/inf: the error names the step, what the plant returned and from which
    state and control, instead of the next controller call refusing 'x' (an MPC) or the NaN running
    on silently (a plain controller)."""
    def plant(x, u):                      # x_{k+1} = x_k + u_k, NaN from step 2 on
        return np.full_like(x, np.nan) if abs(x[0] - 0.25) < 1e-12 else x + u
    with pytest.raises(occore.InputError, match=r"^plant output at step 2: expected a finite next state, "
                                                r"got \[nan\] from x=\[0\.25\], u=\[-0\.125\]$"):
        occore.simulate(lambda x: -0.5 * x, plant, steps=5, x0=[1.0])

    prob = occore.problems.make("pendulum", horizon=20)
    calls = []

    def broken(x, u):                     # the real plant, but inf at its second call
        calls.append(None)
        return np.array([np.inf, 0.0]) if len(calls) == 2 else prob.transition(x, u)
    with pytest.raises(occore.InputError, match=r"^plant output at step 1: .* got \[inf, 0\.0\] from x=\["):
        occore.simulate(occore.MPC(prob, occore.ILQR(max_iter=2)), broken, steps=4)
    assert len(calls) == 2


def test_a_non_finite_control_is_named_with_its_step():
    with pytest.raises(occore.InputError, match=r"^controller output at step 1: expected finite values, "
                                                r"got u=\[nan\] at x=\[2\.0\]$"):
        occore.simulate(lambda x: np.array([np.nan if x[0] > 1.5 else 1.0]), lambda x, u: x + u,
                        steps=3, x0=[1.0])


def test_bad_input():
    prob = occore.problems.make("pendulum")
    with pytest.raises(occore.InputError, match="iterations"):
        occore.MPC(prob, occore.ILQR(), iterations=0)
    with pytest.raises(occore.InputError, match="solver"):
        occore.MPC(prob, object())
    with pytest.raises(occore.InputError, match="problem"):
        occore.MPC("pendulum", occore.ILQR())
    with pytest.raises(occore.InputError, match="cannot honour the state bounds"):
        occore.MPC(occore.problems.make("cartpole_track"), occore.ILQR())
    with pytest.raises(occore.InputError, match="xs0: ilqr takes no state guess"):
        occore.MPC(prob, occore.ILQR(), xs0=np.zeros((prob.horizon + 1, 2)))
    with pytest.raises(occore.ShapeError, match="xs0"):
        occore.MPC(prob, occore.FDDP(), xs0=np.zeros((prob.horizon, 2)))
    with pytest.raises(occore.ShapeError, match="us0"):
        occore.MPC(prob, occore.ILQR(), us0=np.zeros((prob.horizon + 1, 1)))
    mpc = occore.MPC(prob, occore.ILQR())
    with pytest.raises(occore.ShapeError, match=r"^x: expected shape \(2,\)"):
        mpc.control([0.0, 0.0, 0.0])
    with pytest.raises(occore.InputError, match="steps"):
        occore.simulate(mpc, prob, steps=0)
    with pytest.raises(occore.InputError, match="x0"):
        occore.simulate(lambda x: x, lambda x, u: x, steps=2)
    with pytest.raises(occore.ShapeError, match="plant output"):
        occore.simulate(lambda x: x, lambda x, u: np.zeros(3), steps=2, x0=[0.0])


def test_mpc_command_prints_latency_and_plots(tmp_path, capsys):
    png = tmp_path / "mpc.png"
    assert main(["mpc", "pendulum", "--x0", "0.5,-1", "--steps", "60", "--iterations", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "distance to the goal" in out and "latency per step: median" in out and "p99" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["mpc", "pendulum", "--x0", "0.5"], "--x0 '0.5': expected 2 comma-separated numbers"),
    (["mpc", "pendulum", "--x0", "nan,0"], "--x0 'nan,0': expected finite numbers"),   # before the progress bar
    (["mpc", "pendulum", "--x0", "0,inf"], "--x0 '0,inf': expected finite numbers"),
    (["mpc", "pendulum", "--steps", "0"], "--steps 0"),
    (["mpc", "pendulum", "--solver", "ipopt"], "mpc needs an occore solver"),
    (["mpc", "cartpole_track", "--solver", "ilqr"], "cannot honour the state bounds"),
    (["mpc", "cartpole", "--x0", "1e200,0,1e200,1e200", "--steps", "3", "--iterations", "1", "--no-progress"],
     "plant output at step 0: expected a finite next state, got [1e+200, inf, "),   # the dynamics overflow
])
def test_mpc_command_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_mpc_command_shows_its_progress_on_stderr_unless_told_not_to(capsys):
    assert main(["mpc", "pendulum", "--steps", "5", "--iterations", "1"]) == 0
    captured = capsys.readouterr()
    assert "/5 [" in captured.err and "step/s" in captured.err   # the bar, on stderr only
    assert "latency per step" in captured.out and "/5 [" not in captured.out
    assert main(["mpc", "pendulum", "--steps", "5", "--iterations", "1", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_plot_closed_loop_keeps_the_users_matplotlib_backend_and_figures(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from occore.mpc import ClosedLoop, plot_closed_loop

    run = ClosedLoop(xs=np.zeros((4, 2)), us=np.ones((3, 1)), latencies=np.full(3, 1e-3))
    before = plt.get_backend()
    plt.switch_backend("svg")
    try:
        mine = plt.figure()
        plot_closed_loop(run, str(tmp_path / "loop.png"), title="t", goal=[0.0, 0.0])
        assert plt.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        assert (tmp_path / "loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close("all")
        plt.switch_backend(before)


def test_a_warm_start_that_breaks_down_far_from_the_prediction_is_redone_cold():
    """A large disturbance: at the cart-pole's goal the previous solution's feedback gains are
    large, and its closed-loop rollout from a state kicked far from the prediction overflows
    (NON_FINITE before any iteration). The call is redone cold instead of applying the first
    control of the overflowed rollout (67.1 here, then the solves warm-started from it ran off:
    the closed loop diverged with DDP to convergence)."""
    prob = occore.problems.make("cartpole")
    goal = np.array(GOALS["cartpole"], dtype=float)
    kicked = goal + [0.0, 1.0, 0.0, 4.0]
    mpc = occore.MPC(prob, occore.DDP(), iterations=2)
    mpc.control(goal)
    warm = mpc.solver.init(prob.with_initial_state(kicked), mpc._warm())
    assert warm.status is occore.Status.NON_FINITE       # the shifted warm start itself breaks down
    u = mpc.control(kicked)
    cold = occore.MPC(prob, occore.DDP(), iterations=2, warm_start=False)
    np.testing.assert_array_equal(u, cold.control(kicked))
    assert mpc.result.status is cold.result.status and np.isfinite(mpc.result.cost)
    assert mpc.result.iterations == 2


def test_time_varying_bounds_are_not_shifted_between_calls():
    """As documented: every call poses the same problem, a (T, nu) control box included, so a
    window of tighter bounds k stages ahead is k stages ahead at every call (its controls obey the
    unshifted rows, the first control stage 0's bound) and the problem's arrays are untouched."""
    import casadi as ca
    dt, T = 0.05, 30
    upper = np.full((T, 1), 2.0)
    upper[10:15] = 0.5
    prob = occore.Problem(lambda x, u: ca.vertcat(x[0] + dt * x[1], x[1] + dt * (-15 * ca.sin(x[0]) + 3 * u[0])),
                          lambda x, u: 0.5 * dt * ((x[0] - ca.pi) ** 2 + 0.1 * u[0] ** 2),
                          lambda x: 50 * ((x[0] - ca.pi) ** 2 + x[1] ** 2), x0=[0.0, 0.0], nu=1, horizon=T,
                          u_lower=-upper, u_upper=upper.copy())
    mpc, x = occore.MPC(prob, occore.ILQR(), iterations=3), np.array([0.0, 0.0])
    for _ in range(12):
        u = mpc.control(x)
        assert np.all(np.abs(mpc.result.us) <= upper + 1e-12)
        assert np.max(np.abs(mpc.result.us[:10])) > 0.5 + 1e-3   # stage 0..9 may use the full box
        x = prob.transition(x, u)
    np.testing.assert_array_equal(prob.u_upper, upper)


def test_simulate_with_one_step_and_a_non_finite_initial_state():
    run = occore.simulate(lambda x: -0.5 * x, lambda x, u: x + u, steps=1, x0=[2.0])
    np.testing.assert_array_equal(run.xs, [[2.0], [1.0]])
    np.testing.assert_array_equal(run.us, [[-1.0]])
    assert run.latencies.shape == (1,)
    with pytest.raises(occore.InputError, match=r"^x0: expected a finite vector \(nx,\), got \[nan\]$"):
        occore.simulate(lambda x: -0.5 * x, lambda x, u: x + u, steps=1, x0=[np.nan])


def test_numpy_integer_counts_are_accepted_where_python_ints_are():
    """steps / iterations / max_iter out of numpy (np.arange, an array of
    settings) are integers; floats and bools stay refused by name."""
    from occore.errors import InputError

    prob = occore.problems.make("lqr")
    run = occore.simulate(occore.MPC(prob, occore.ILQR(), iterations=np.int64(1)), prob, np.int64(2))
    assert run.us.shape == (2, prob.nu)
    ref = occore.reference.ipopt(prob, max_iter=np.int64(50), tol=np.float32(1e-6))
    assert ref.converged
    for bad in (2.0, True):
        with pytest.raises(InputError, match="steps="):
            occore.simulate(occore.MPC(prob, occore.ILQR()), prob, bad)
        with pytest.raises(InputError, match="iterations="):
            occore.MPC(prob, occore.ILQR(), iterations=bad)
