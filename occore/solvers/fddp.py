"""FDDP, feasibility-driven DDP (Mastalli et al., "Crocoddyl: an efficient and versatile framework
for multi-contact optimal control", ICRA 2020): multiple shooting through the DDP loop.

An iterate is a state trajectory and a control trajectory that need not agree: stage t has the
defect (gap) f(x_t, u_t) - x_{t+1}, and x0 - x_0 is the initial one. The backward pass expands each
next value at its stage's gap (:func:`occore.lq.riccati.riccati_sweep` with ``gaps``); the forward
pass rolls the feedback policy out while closing the fraction alpha of every gap,

    x_0' = x_0 + alpha (x0 - x_0),   x_{t+1}' = f(x_t', u_t') - (1 - alpha) gap_t,

so one full step makes the iterate dynamically feasible, after which FDDP is DDP / iLQR. The line
search compares the cost with the model's expected change, which includes the gap terms
(:mod:`occore.local_model`); where that model predicts an increase (closing gaps may cost), a step
is accepted when the increase is at most ``LineSearch.accept_increase`` times the predicted one.
Starting from a state guess ``xs0`` (e.g. a linear interpolation to the goal) gives the solver a
feasible-looking path that a control guess alone cannot.

``rollout="linear"`` (:class:`occore.solvers.options.FDDPOptions`) takes the multiple-shooting step
of GNMS / FATROP instead: the trial at alpha is (xs + alpha dx, us + alpha du), with (dx, du) the
states and controls of the linear model under the new policy (:func:`occore.local_model.linear_states`),
so the gaps stay open, f(x_t, u_t) - x_{t+1} evaluated at the trial, and no closed-loop rollout can
diverge. Trials are compared on the merit cost + nu ||gaps||_1 (gap_0 included), nu chosen at each
iteration so that the merit's expected decrease of a full step is positive:
nu = max(0, (D1 + D2/2) / ((1 - MERIT_RHO) ||gaps||_1)) (Nocedal & Wright, eq. 18.36). The gaps close
as the iterates converge (quadratically once full steps are taken).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..errors import InputError
from ..lq.compiled import best_linear_states
from ..result import IterationInfo, Result, Status
from ..types import Trajectory
from .base import SolverState
from .checks import check_mu
from .ddp import _RiccatiSolver
from .options import FDDPOptions

__all__ = ["FDDP", "MERIT_RHO", "LINEAR_SECOND_ORDER_GAP"]

#: ``rollout="linear"``: share of the cost model's predicted increase that the penalty adds to the
#: merit's expected decrease of a full step (module docstring)
MERIT_RHO = 0.1
#: ``rollout="linear"``: the second-order model (``second_order_below``) is used only on iterates
#: whose largest gap is at most this (their gaps never vanish exactly). Measured on the reference
#: set from the zero guess, 1e-2 against 1e-4, 1e-6 and 1e9: cart-pole 81 iterations against 85,
#: 87 and 86, boxed pendulum 101 against 105, 111 and 125; with 1e9 the cart-pole from the
#: interpolated xs0 ends in another local optimum)
LINEAR_SECOND_ORDER_GAP = 1e-2


class _Gaps:
    """What a multiple-shooting trajectory carries: its defects (None when feasible) and, once
    evaluated, its derivatives."""

    __slots__ = ("gaps", "initial", "derivs")

    def __init__(self, gaps=None, initial=None, derivs=None):
        self.gaps, self.initial, self.derivs = gaps, initial, derivs

    @property
    def max_gap(self) -> float:
        if self.gaps is None:
            return 0.0
        return float(max(np.max(np.abs(self.gaps), initial=0.0), np.max(np.abs(self.initial), initial=0.0)))

    @property
    def l1(self) -> float:
        """sum of |gap| over every stage and component, gap_0 included (0.0 when feasible)."""
        if self.gaps is None:
            return 0.0
        return float(np.sum(np.abs(self.gaps)) + np.sum(np.abs(self.initial)))


class _MeritModel:
    """The local model of a ``rollout="linear"`` iteration: the gapped model, whose expected change
    is that of the merit cost + nu ||gaps||_1 (nu set by each backward pass, module docstring), and
    ``decrease(traj, trial)``, the merit's actual decrease, which the line search then uses."""

    def __init__(self, lm, l1: float):
        self.lm, self.l1, self.nu = lm, l1, 0.0

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def backward(self, mu: float, second_order: bool = False):
        policy, (d1, d2) = self.lm.backward(mu, second_order)
        self.nu = 0.0
        if self.l1 > 0.0 and math.isfinite(d1) and math.isfinite(d2):
            self.nu = max(0.0, (d1 + 0.5 * d2) / ((1.0 - MERIT_RHO) * self.l1))
        return policy, (d1 - self.nu * self.l1, d2)

    def decrease(self, traj: Trajectory, trial: Trajectory) -> float:
        return traj.cost - trial.cost + self.nu * (traj.extras.l1 - trial.extras.l1)


class _Shooting:
    """The ControlProblem an FDDP iteration sees: ``problem`` with multiple-shooting trajectories."""

    def __init__(self, problem, linear: bool = False):
        self.problem = problem
        self.horizon = problem.horizon
        self.linear = linear
        self._step = None      # (policy, dx, du) of the last linear step

    def at(self, xs, us, second_order: bool) -> Trajectory:
        """The trajectory (xs, us) as given: cost and gaps from one derivative evaluation (which
        the first iteration's local model reuses)."""
        d = self.problem.evaluate_derivatives(xs, us, second_order)
        with np.errstate(invalid="ignore", over="ignore"):
            cost = float(np.sum(d.l) + d.lf)
            gaps = d.f - xs[1:]
        initial = self.problem.x0 - xs[0]
        return Trajectory(xs, us, cost if math.isfinite(cost) else math.inf, extras=_Gaps(gaps, initial, d))

    @staticmethod
    def feasible(traj: Trajectory) -> Trajectory:
        return Trajectory(traj.xs, traj.us, traj.cost, extras=_Gaps())

    def initial_controls(self):
        return self.problem.initial_controls()

    def rollout(self, us) -> Trajectory:
        return self.feasible(self.problem.rollout(us))

    def rollout_policy(self, ref, policy, alpha) -> Trajectory:
        g = ref.extras
        if self.linear:
            return self._linear_trial(ref, policy, alpha)
        if g.gaps is None:
            return self.feasible(self.problem.rollout_policy(ref, policy, alpha))
        keep = 1.0 - alpha
        t = self.problem.rollout_policy(ref, policy, alpha, x0=ref.xs[0] + alpha * g.initial, shift=-keep * g.gaps)
        if keep == 0.0:
            return self.feasible(t)
        return Trajectory(t.xs, t.us, t.cost, extras=_Gaps(keep * g.gaps, keep * g.initial))

    def _linear_trial(self, ref, policy, alpha) -> Trajectory:
        """``rollout="linear"``: (xs + alpha dx, clamp(us + alpha du)) with its gaps (module docstring)."""
        if self._step is None or self._step[0] is not policy:
            g = ref.extras
            nx = ref.xs.shape[1]
            gap = (np.zeros((self.horizon + 1, nx)) if g.gaps is None
                   else np.concatenate([g.initial[None], g.gaps]))
            self._step = (policy, *best_linear_states()(g.derivs, policy.k, policy.K, gap))
        _, dx, du = self._step
        return self.at(ref.xs + alpha * dx, self.problem.clamp(ref.us + alpha * du), False)

    def local_model(self, traj: Trajectory, second_order: bool = False):
        g = traj.extras
        d = g.derivs
        if d is None or d.second_order != second_order:
            d = self.problem.evaluate_derivatives(traj.xs, traj.us, second_order)
        lm = self.problem.model_of(d, traj.us, gaps=g.gaps, initial_gap=g.initial)
        return _MeritModel(lm, g.l1) if self.linear else lm


class FDDP(_RiccatiSolver):
    """Feasibility-driven DDP (Mastalli et al. 2020): multiple shooting, so a solve can start from a
    state guess ``xs0`` as well as controls; the gaps close as it converges.

    ``IterationInfo.gap`` is the largest gap of the iterate after the iteration; CONVERGED needs it
    at most ``gap_tol`` besides the expected decrease below ``tol``. From a feasible start (no
    ``xs0``) the iterations are those of the DDP loop with FDDP's defaults (Gauss-Newton far from
    the solution, second order near it; :class:`occore.solvers.options.FDDPOptions`), equal to
    iLQR's with ``second_order_below=None, line_search=occore.LineSearch()``. Control bounds are
    honoured (box-QP gains, clamped rollouts); other constraints are refused (use :class:`CDDP`).

    Args:
        options: a :class:`occore.solvers.options.FDDPOptions` (or give its fields as keywords).
        callbacks: callables ``cb(info, state)``; returning True stops the solve.

    Example:
        >>> import numpy as np, occore
        >>> prob = occore.problems.make("pendulum")
        >>> xs0 = np.linspace(prob.x0, [np.pi, 0.0], prob.horizon + 1)   # (T+1, nx)
        >>> res = occore.FDDP().solve(prob, xs0=xs0)
        >>> res.status.name, round(res.cost, 6), res.history[-1].gap
        ('CONVERGED', 3.038501, 0.0)
    """

    name = "fddp"
    Options = FDDPOptions
    #: the gapped model is built from the dense derivatives (a NetworkProblem has none)
    needs = ("rollout_policy", "evaluate_derivatives", "model_of")

    @classmethod
    def default_options(cls) -> FDDPOptions:
        return FDDPOptions()

    def init(self, problem, us0=None, *, xs0=None, traj=None, mu=None) -> SolverState:
        """As :meth:`occore.solvers.base.Solver.init`, and ``xs0``: a (T+1, nx) state guess; the
        initial iterate is then (xs0, us0) as given (us0: controls, a Result's, or the problem's
        initial controls), with its gaps. Neither is modified."""
        if xs0 is None:
            return super().init(problem, us0, traj=traj, mu=mu)
        self.check_problem(problem)
        if traj is not None:
            raise TypeError("init: give xs0 or traj, not both")
        if not hasattr(problem, "check_states"):
            raise InputError(f"xs0: a state guess needs a dense occore.Problem, got {type(problem).__name__}")
        xs = problem.check_states(xs0, "xs0")
        if isinstance(us0, Result):
            us0 = us0.us
        us = problem.initial_controls() if us0 is None else problem.clamp(problem.check_controls(us0, "us0"))
        start = _Shooting(problem).at(xs, us, False)
        state = SolverState(traj=start, mu=self._initial_mu(problem) if mu is None else check_mu(mu))
        if not math.isfinite(start.cost):
            return replace(state, status=Status.NON_FINITE, message="cost of the initial guess is not finite")
        return state

    def _first_state(self, problem, state: SolverState) -> SolverState:
        if self.options.rollout == "linear":   # the linear step needs the derivatives at the iterate
            t = state.traj
            return replace(state, traj=_Shooting(problem).at(t.xs, t.us, False))
        return replace(state, traj=_Shooting.feasible(state.traj))

    def _gap_tol(self) -> float:
        return self.options.gap_tol

    def result(self, state: SolverState) -> Result:
        """As :meth:`occore.solvers.base.Solver.result`; a solve that ends with gaps larger than
        ``gap_tol`` (not converged) says so in the message: its xs are not the rollout of its us,
        and its cost is that of the gapped (xs, us), which can lie below the optimum."""
        extras = getattr(state.traj, "extras", None)
        gap = extras.max_gap if isinstance(extras, _Gaps) else 0.0
        if gap > self.options.gap_tol and state.status is not Status.RUNNING:
            state = replace(state, message=f"{state.message}; the iterate still has gaps (largest {gap:.2e}): "
                                           "xs is not the rollout of us, cost not J(us)")
        return super().result(state)

    def _second_order(self, state: SolverState) -> bool:
        if self.options.rollout == "nonlinear":
            return super()._second_order(state)
        below = self.options.second_order_below
        if below is None or not state.history:
            return False
        last = state.history[-1]
        return 0.0 <= last.stop < below and last.gap <= LINEAR_SECOND_ORDER_GAP

    def _iterate(self, problem, state: SolverState) -> tuple[SolverState, IterationInfo]:
        new, info = super()._iterate(_Shooting(problem, self.options.rollout == "linear"), state)
        return new, replace(info, gap=new.traj.extras.max_gap)
