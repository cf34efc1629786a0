"""Receding-horizon control (MPC) with any occore solver, and closed-loop simulation.

At every call of :meth:`MPC.control` the problem is re-posed from the measured state x (the same
dynamics, costs, constraints and horizon: :meth:`occore.Problem.with_initial_state`) and solved,
warm-started from the previous call's solution shifted by one stage: controls u_1..u_{T-1}, u_{T-1},
the feedback gains shifted the same way (the first rollout is closed-loop around the shifted states,
u_t = u_t^prev + K_t (x_t - x_t^prev), which absorbs the difference between the predicted and the
measured state), and, for :class:`occore.CDDP`, the shifted multipliers. When the previous iterate
of a multiple-shooting solver (:class:`occore.FDDP`) still has gaps (after a real-time iteration),
the next call starts instead from its shifted states and controls as they are, the measured state
giving the initial gap: a closed-loop rollout around such states is no warm start (on the cart-pole
its cost overflowed). (A gap-free one is rolled out as above: from shifted states, FDDP near the
goal can stall with gaps of 1e-9 that no accepted step closes, measured on the pendulum.) A
warm-started call that ends in numerical trouble (NON_FINITE, REG_LIMIT: after a large disturbance
the shifted feedback rollout can overflow, measured on the cart-pole kicked at its goal) is redone
cold, from ``us0`` / ``xs0``; the cold result is kept unless it is in trouble too with a higher
cost. With ``iterations`` a fixed
number of solver iterations is done per call (real-time iteration, as in Diehl, Bock & Schloeder
2005), otherwise each call solves until the solver's stop rule. The first control u_0 is applied.

:func:`simulate` closes the loop: x_{k+1} = plant(x_k, controller(x_k)), recording the states,
controls and the latency of every controller call.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from .errors import InputError, ShapeError
from .output_paths import check_path_argument
from .result import Result, Status
from .validation import float_array, is_integer

__all__ = ["MPC", "simulate", "ClosedLoop", "plot_closed_loop"]

logger = logging.getLogger("occore")


#: statuses of a solve in numerical trouble: a warm-started call ending so is redone cold
_BROKEN = (Status.NON_FINITE, Status.REG_LIMIT)


def _shift(a):
    """Rows 1.. of ``a`` with its last row repeated (one stage later along the horizon)."""
    a = np.asarray(a)
    return np.concatenate([a[1:], a[-1:]]) if a.shape[0] else a


class MPC:
    """A receding-horizon controller: ``control(x) -> u`` solves ``problem`` from x, warm-started.

    Args:
        problem: an :class:`occore.Problem`, posed the same at every call: stage parameters and
            time-varying bounds ((T, nu) controls, (T+1, nx) states) are not shifted; row t
            applies t stages after the measured state at every call, so a feature k stages ahead
            stays k stages ahead (the closed loop never reaches it; a reference meant in absolute
            time needs a new problem per call).
        solver: an occore solver (:class:`occore.ILQR`, DDP, FDDP, CDDP), used as it is configured.
        iterations: None (default): solve to convergence at every call; an integer k >= 1: exactly
            k iterations per call (fewer once the solver stops), the real-time iteration for k = 1.
        warm_start: shift the previous solution (default True); False starts every call cold.
        us0: the controls (T, nu) a cold call starts from (the first call, every call with
            ``warm_start=False``, the first after :meth:`reset`); default the problem's initial ones.
        xs0: a state guess (T+1, nx) for the cold calls of a solver that takes one (FDDP: multiple
            shooting from xs0, its row 0 need not be the measured state). A swing-up's cold solve
            from zero controls can end in a worse local optimum than from a state guess: FDDP from
            the cart-pole at (0.2, 0, 0.4, 0) reaches cost 12.01 from zero controls and the optimum
            4.67 from the linear interpolation to the goal, and the closed loop follows the plan it
            starts with (tests/occore/test_mpc.py).

    Attributes:
        result: the :class:`occore.Result` of the last call (None before the first).

    Raises:
        InputError: a problem that cannot be re-posed from another state, a solver without the
            iteration API, or a bad ``iterations``.

    Example:
        >>> import occore
        >>> mpc = occore.MPC(occore.problems.make("pendulum"), occore.ILQR(), iterations=2)
        >>> u = mpc.control([0.1, 0.0])
        >>> u.shape, mpc.result.iterations
        ((1,), 2)
    """

    def __init__(self, problem, solver, *, iterations: int | None = None, warm_start: bool = True,
                 us0=None, xs0=None):
        if not hasattr(problem, "with_initial_state"):
            raise InputError(f"problem: expected an occore.Problem (re-posed from each measured state), "
                             f"got {type(problem).__name__}")
        for method in ("init", "step", "result", "solve"):
            if not callable(getattr(solver, method, None)):
                raise InputError(f"solver: expected an occore solver (ILQR, DDP, FDDP, CDDP) with "
                                 f"{method}(), got {type(solver).__name__}")
        if iterations is not None and not (is_integer(iterations) and iterations >= 1):
            raise InputError(f"iterations={iterations!r} is invalid: expected None or an integer >= 1")
        if not isinstance(warm_start, bool):
            raise InputError(f"warm_start={warm_start!r} is invalid: expected True or False")
        solver.check_problem(problem)
        #: the solver takes a state guess (multiple shooting, FDDP)
        self._shooting = "xs0" in inspect.signature(solver.init).parameters
        if us0 is not None:
            us0 = problem.check_controls(us0, "us0")
        if xs0 is not None:
            if not self._shooting:
                raise InputError(f"xs0: {solver.name} takes no state guess (FDDP does)")
            xs0 = problem.check_states(xs0, "xs0")
        self.problem, self.solver = problem, solver
        self._cold = {"xs0": xs0} if xs0 is not None else {}
        self.us0 = us0
        self.iterations = None if iterations is None else int(iterations)
        self.warm_start = warm_start
        self.result: Result | None = None

    def reset(self) -> None:
        """Forget the previous solution (the next call starts cold)."""
        self.result = None

    def _warm(self):
        """The previous result shifted by one stage (None for a cold start)."""
        prev = self.result
        if prev is None or not self.warm_start or not np.all(np.isfinite(prev.us)):
            return None
        policy = prev.policy
        if policy is not None:
            policy = type(policy)(k=_shift(policy.k), K=_shift(policy.K))
        mult = prev.multipliers
        if mult is not None and hasattr(mult, "shifted"):
            mult = mult.shifted()
        return replace(prev, xs=_shift(prev.xs), us=_shift(prev.us), policy=policy, multipliers=mult)

    def control(self, x) -> np.ndarray:
        """The control (nu,) to apply at the measured state ``x`` (nx,); the solve's
        :class:`Result` is kept as :attr:`result`. A warm-started solve ending NON_FINITE or
        REG_LIMIT is redone cold (logged as a warning); a solve still ending in numerical trouble
        gives the first control of its best iterate (logged as a warning)."""
        prob = self.problem.with_initial_state(x, name="x")
        warm = self._warm()
        if warm is None:
            res = self._solve(prob, self.us0, self._cold)
        else:    # a multiple-shooting iterate with gaps (FDDP after k iterations): its states as they are
            gapped = self._shooting and bool(warm.history) and warm.history[-1].gap > 0.0
            res = self._solve(prob, warm, {"xs0": warm.xs} if gapped else {})
            if res.status in _BROKEN:   # e.g. the feedback rollout from a state far off the prediction overflowed
                logger.warning("mpc: the warm-started %s ended %s (%s); solving cold", self.solver.name,
                               res.status.name, res.message)
                cold = self._solve(prob, self.us0, self._cold)
                if cold.status not in _BROKEN or not res.cost <= cold.cost:
                    res = cold
        if res.status not in (Status.CONVERGED, Status.MAX_ITER, Status.RUNNING):
            logger.warning("mpc: %s ended %s (%s); applying its best iterate's first control",
                           self.solver.name, res.status.name, res.message)
        self.result = res
        return np.array(res.us[0], dtype=float)

    def _solve(self, prob, start, kw) -> Result:
        if self.iterations is None:
            return self.solver.solve(prob, start, **kw)
        state = self.solver.init(prob, start, **kw)
        for _ in range(self.iterations):
            if state.done:
                break
            state, _ = self.solver.step(prob, state)
        return self.solver.result(state)

    __call__ = control


@dataclass(frozen=True)
class ClosedLoop:
    """A closed-loop simulation.

    Attributes:
        xs: (steps+1, nx) states, xs[0] the initial one.  us: (steps, nu) applied controls.
        latencies: (steps,) seconds of each controller call.

    Example:
        >>> import occore
        >>> prob = occore.problems.make("pendulum")
        >>> loop = occore.simulate(occore.MPC(prob, occore.ILQR(max_iter=5)), prob, steps=3)
        >>> loop.xs.shape, loop.us.shape, loop.latencies.shape
        ((4, 2), (3, 1), (3,))
        >>> loop.latency(99) >= loop.latency() > 0
        True
    """

    xs: np.ndarray
    us: np.ndarray
    latencies: np.ndarray

    def latency(self, q: float = 50.0) -> float:
        """The q-th percentile of the controller's latency, in seconds (median by default)."""
        return float(np.percentile(self.latencies, q))


def simulate(controller, plant, steps: int, x0=None) -> ClosedLoop:
    """Run ``controller`` against ``plant`` for ``steps`` steps.

    Args:
        controller: an :class:`MPC` or any callable x (nx,) -> u (nu,).
        plant: an :class:`occore.Problem` (its dynamics, stage 0's parameters and control box) or a callable
            (x (nx,), u (nu,)) -> x_next (nx,) on numpy arrays.
        steps: number of steps (>= 1).
        x0: initial state (nx,); default: the controller's problem's x0 (for an MPC) or the
            plant's (for a Problem).

    An :class:`MPC` is not reset: a second simulation with the same controller warm-starts from
    the last solution of the first; call :meth:`MPC.reset` for a repeatable run.

    Returns:
        A :class:`ClosedLoop` (states, controls, per-call latencies).

    Raises:
        InputError, ShapeError: bad arguments, or a controller / plant returning the wrong shape;
            InputError when the controller or the plant returns a non-finite value, naming the
            step k (0-based) and the values: the plant's x_{k+1} = plant(x_k, u_k) with x_k and
            u_k, or the controller's u_k with x_k.

    Example:
        >>> import occore
        >>> prob = occore.problems.make("pendulum")
        >>> run = occore.simulate(occore.MPC(prob, occore.ILQR(), iterations=1), prob, steps=3)
        >>> run.xs.shape, run.us.shape, run.latencies.shape
        ((4, 2), (3, 1), (3,))
    """
    if not callable(controller):
        raise InputError(f"controller: expected an occore.MPC or a callable x -> u, got {type(controller).__name__}")
    if not (is_integer(steps) and steps >= 1):
        raise InputError(f"steps={steps!r} is invalid: expected an integer >= 1")
    if hasattr(plant, "transition"):
        step = plant.transition
    elif callable(plant):
        step = plant
    else:
        raise InputError(f"plant: expected an occore.Problem or a callable (x, u) -> x_next, got {type(plant).__name__}")
    if x0 is None:
        source = getattr(controller, "problem", None) or (plant if hasattr(plant, "x0") else None)
        if source is None:
            raise InputError("x0: required when neither the controller nor the plant is an occore problem")
        x0 = source.x0
    x = float_array(x0, "x0", "a vector of numbers")
    if x.ndim != 1 or not np.all(np.isfinite(x)):
        raise InputError(f"x0: expected a finite vector (nx,), got {x.tolist()}")
    xs, us, lat = [x], [], np.empty(steps)
    for k in range(steps):
        t0 = time.perf_counter()
        u = np.atleast_1d(np.array(controller(x.copy()), dtype=float))
        lat[k] = time.perf_counter() - t0
        if u.ndim != 1:
            raise ShapeError("controller output", "(nu,)", u.shape)
        if not np.all(np.isfinite(u)):
            raise InputError(f"controller output at step {k}: expected finite values, got u={u.tolist()} "
                             f"at x={x.tolist()}")
        x_next = np.atleast_1d(np.array(step(x.copy(), u.copy()), dtype=float))
        if x_next.shape != x.shape:
            raise ShapeError("plant output", x.shape, x_next.shape)
        if not np.all(np.isfinite(x_next)):
            raise InputError(f"plant output at step {k}: expected a finite next state, got {x_next.tolist()} "
                             f"from x={x.tolist()}, u={u.tolist()}")
        x = x_next
        xs.append(x)
        us.append(u)
    return ClosedLoop(xs=np.array(xs), us=np.array(us), latencies=lat)


def plot_closed_loop(run: ClosedLoop, path: str, title: str = "", goal=None) -> None:
    """The states (one panel each, the goal dashed where given) and controls of a
    :class:`ClosedLoop` against the step, written to ``path`` (PNG). Needs matplotlib."""
    check_path_argument(path, file_ok=True)
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the plot/dev extras
        raise ImportError("plotting needs matplotlib: pip install 'occore[plot]'") from err
    from matplotlib.figure import Figure     # not pyplot: the user's backend and figures are kept

    nx, nu = run.xs.shape[1], run.us.shape[1]
    fig = Figure(figsize=(6.4, 1.5 * (nx + nu) + 0.8))
    axes = fig.subplots(nx + nu, 1, sharex=True, squeeze=False)
    steps = np.arange(run.xs.shape[0])
    for i in range(nx):
        ax = axes[i, 0]
        ax.plot(steps, run.xs[:, i], lw=1.4)
        if goal is not None:
            ax.axhline(goal[i], ls="--", lw=0.8, color="grey")
        ax.set_ylabel(f"x[{i}]")
    for j in range(nu):
        ax = axes[nx + j, 0]
        ax.step(steps[:-1], run.us[:, j], where="post", lw=1.2, color="tab:orange")
        ax.set_ylabel(f"u[{j}]")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{title}  (latency median {run.latency() * 1e3:.2f} ms, p99 {run.latency(99) * 1e3:.2f} ms)"
                 if title else "", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
