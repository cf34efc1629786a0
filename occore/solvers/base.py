"""The loop every solver shares: ``init`` / ``step`` / ``solve``, callbacks and the :class:`Result`.

A solver subclass provides ``_first_state(problem, traj)`` (optional) and ``_iterate(problem, state)``,
which performs one iteration and returns the new state and its :class:`IterationInfo`. The loop
talks to the problem only through the :class:`occore.types.ControlProblem` protocol.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InputError
from ..result import IterationInfo, Result, Status
from ..types import Trajectory, shape_text
from .checks import check_callbacks, check_mu, check_problem, check_state, check_warm_start
from .options import build_options

logger = logging.getLogger("occore")

__all__ = ["SolverState", "Solver"]


@dataclass(frozen=True)
class SolverState:
    """Everything one iteration needs; immutable (each ``step`` returns a new one).

    Attributes:
        traj: the current (always the best accepted) trajectory.
        iteration: iterations done so far.
        mu: current regularisation (DDP/iLQR) or rho (E-MSA).
        status: RUNNING until the solve ends.
        message: reason for the status.
        policy: policy of the last backward pass, or None.
        history: the IterationInfo of every iteration so far.
        start: ``time.perf_counter()`` at ``init``.
        cache: solver-private data carried between iterations (e.g. the local model of ``traj``).
        multipliers: constraint multipliers of a constrained solver (CDDP), else None.
        scale: the scale of the problem's cost a solver measured once per solve, at its first
            iteration (DDP, iLQR, FDDP, CDDP and E-MSA: the largest entry of the cost Hessians,
            see :class:`occore.Regularization` and :class:`occore.solvers.emsa.EMSAOptions`), or None.
    """

    traj: Trajectory
    iteration: int = 0
    mu: float = 0.0
    status: Status = Status.RUNNING
    message: str = ""
    policy: Any = None
    history: tuple = ()
    start: float = field(default_factory=time.perf_counter)
    cache: Any = field(default=None, repr=False)
    multipliers: Any = field(default=None, repr=False)
    scale: float | None = None

    @property
    def done(self) -> bool:
        return self.status is not Status.RUNNING

    def __repr__(self) -> str:
        return (f"SolverState(iteration={self.iteration}, status={self.status.name}, mu={self.mu:.3g}, "
                f"cost={self.traj.cost:.12g},\n            xs {shape_text(self.traj.xs)}, us "
                f"{shape_text(self.traj.us)}, policy={'yes' if self.policy is not None else 'none'}, "
                f"history of {len(self.history)})")


class Solver:
    """Base class of the solvers. Subclasses set ``name``, ``Options`` and ``_iterate``."""

    name = "solver"
    Options: type = None
    #: the constraint kinds beyond control bounds (words of :data:`occore.constraints.KINDS`) this
    #: solver honours; a problem declaring any other is refused by :meth:`init`
    supported_constraints: tuple = ()
    #: problem methods this solver calls beyond the ControlProblem basics (checked by ``init``)
    needs: tuple = ()

    def __init__(self, options=None, *, callbacks=(), **kwargs):
        self.options = build_options(self.Options, self.default_options() if options is None else options,
                                     kwargs)
        self.callbacks = tuple(callbacks)
        for cb in self.callbacks:
            if not callable(cb):
                raise TypeError(f"callbacks: expected callables, got {type(cb).__name__}")

    @classmethod
    def default_options(cls):
        """The options used when none are given."""
        return cls.Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # -- the iteration API ----------------------------------------------------------------------
    def init(self, problem, us0=None, *, traj: Trajectory | None = None, mu: float | None = None
             ) -> SolverState:
        """Initial state: rollout of ``us0`` (default ``problem.initial_controls()``).

        ``us0`` may also be a previous :class:`Result`: its controls are used, and where it has a
        policy the first rollout is closed-loop, u_t = us_t + K_t (x_t - xs_t) (warm start from a
        moved initial state, as in MPC). ``traj``: a :class:`Trajectory` of ``problem`` the
        caller already rolled out (then ``us0`` must be None and nothing is rolled out; a
        minibatch's trajectory is the closure's forward pass). ``mu``: the initial
        regularisation (default: the options').
        """
        check_problem(problem, self.needs, type(self).__name__)
        self.check_problem(problem)
        if traj is not None:
            if us0 is not None:
                raise TypeError("init: give us0 or traj, not both")
            if not isinstance(traj, Trajectory):
                raise TypeError(f"traj: expected an occore.Trajectory, got {type(traj).__name__}")
        elif isinstance(us0, Result):
            prev = us0
            check_warm_start(problem, prev)
            if prev.policy is not None:
                ref = Trajectory(prev.xs, prev.us, prev.cost)
                traj = problem.rollout_policy(ref, prev.policy, 0.0)
            else:
                traj = problem.rollout(prev.us)
        else:
            if us0 is not None and hasattr(problem, "check_controls"):
                us0 = problem.check_controls(us0, "us0")
            traj = problem.rollout(problem.initial_controls() if us0 is None else us0)
        state = SolverState(traj=traj, mu=self._initial_mu(problem) if mu is None else check_mu(mu))
        if not math.isfinite(traj.cost):
            return replace(state, status=Status.NON_FINITE, message="initial rollout cost is not finite")
        return self._first_state(problem, state)

    def step(self, problem, state: SolverState) -> tuple[SolverState, IterationInfo | None]:
        """One iteration. Returns the new state and its info (None when ``state`` is already done)."""
        check_state(problem, state, SolverState)
        if state.done:
            return state, None
        new, info = self._iterate(problem, state)
        new = replace(new, iteration=state.iteration + 1, history=state.history + (info,))
        if not new.done and new.iteration >= self.options.max_iter:
            new = replace(new, status=Status.MAX_ITER, message=f"max_iter={self.options.max_iter} reached")
        return new, info

    def solve(self, problem, us0=None, *, callbacks=None, **init) -> Result:
        """Iterate from ``us0`` until a stop rule holds; returns a :class:`Result`. Further keywords
        go to :meth:`init` (FDDP: ``xs0``)."""
        callbacks = self.callbacks if callbacks is None else check_callbacks(callbacks)
        state = self.init(problem, us0, **init)
        while not state.done:
            state, info = self.step(problem, state)
            logger.debug("%s it %d cost %.12g stop %.3e", self.name, info.iteration, info.cost, info.stop)
            if any([bool(cb(info, state)) for cb in callbacks]) and not state.done:
                state = replace(state, status=Status.STOPPED_BY_CALLBACK, message="a callback asked to stop")
        return self.result(state)

    def result(self, state: SolverState) -> Result:
        """The :class:`Result` of a (finished or not) state."""
        t = state.traj
        res = Result(xs=t.xs, us=t.us, cost=float(t.cost), status=state.status, iterations=state.iteration,
                     history=list(state.history), policy=state.policy, message=state.message,
                     solver=self.name, wall_time=time.perf_counter() - state.start)
        logger.info("%s: %s after %d iterations, cost %.12g", self.name, res.status.name, res.iterations,
                    res.cost)
        return res

    def check_problem(self, problem) -> None:
        """Raise :class:`occore.InputError` naming this solver and the constraint kind when
        ``problem`` declares constraints it does not honour (before any work is done)."""
        unsupported = [k for k in getattr(problem, "constraint_kinds", ()) if k not in self.supported_constraints]
        if unsupported:
            name = getattr(problem, "name", None) or "(unnamed)"
            kinds = ", ".join(unsupported[:-1]) + (" and " if len(unsupported) > 1 else "") + unsupported[-1]
            raise InputError(f"{self.name} cannot honour the {kinds} of problem {name}: "
                             "it handles control bounds only; use occore.CDDP (constrained DDP) or "
                             "occore.reference.ipopt")

    # -- subclass hooks -------------------------------------------------------------------------
    def _initial_mu(self, problem) -> float:
        return 0.0

    def _first_state(self, problem, state: SolverState) -> SolverState:
        return state

    def _iterate(self, problem, state: SolverState) -> tuple[SolverState, IterationInfo]:
        raise NotImplementedError

    def _info(self, state: SolverState, **kw) -> IterationInfo:
        return IterationInfo(iteration=state.iteration, wall_time=time.perf_counter() - state.start, **kw)
