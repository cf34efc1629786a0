"""What a solve returns: :class:`Result`, its :class:`Status` and per-iteration :class:`IterationInfo`."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .types import shape_text

__all__ = ["Status", "IterationInfo", "Result"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Status(enum.Enum):
    """How a solve ended.

    CONVERGED: the stop rule held. MAX_ITER: the iteration limit was reached. REG_LIMIT: the
    regularisation needed exceeded its maximum. LINE_SEARCH_FAILED: no step length decreased the
    cost. NON_FINITE: NaN or inf appeared (derivatives or every trial). STOPPED_BY_CALLBACK: a callback
    returned True. INFEASIBLE: the constraints could not be met (CDDP: the penalty reached its
    maximum with the violation still above tolerance; IPOPT: infeasibility detected). FAILED: an
    external solver (IPOPT) reported failure. RUNNING: not finished.

    Example:
        >>> Status.CONVERGED.name
        'CONVERGED'
    """

    CONVERGED = "converged"
    MAX_ITER = "max_iter"
    REG_LIMIT = "reg_limit"
    LINE_SEARCH_FAILED = "line_search_failed"
    NON_FINITE = "non_finite"
    STOPPED_BY_CALLBACK = "stopped_by_callback"
    INFEASIBLE = "infeasible"
    FAILED = "failed"
    RUNNING = "running"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class IterationInfo:
    """One solver iteration.

    Example:
        >>> info = IterationInfo(0, cost=1.0, expected_decrease=0.5, actual_decrease=0.4, step=1.0,
        ...                      regularization=1e-9, stop=0.5, wall_time=1e-3)
        >>> info.accepted
        True

    Attributes:
        iteration: index, starting at 0.
        cost: cost after the iteration (the accepted iterate's, or the unchanged one when rejected).
        expected_decrease: model-predicted decrease of the chosen step (positive means descent).
        actual_decrease: cost before minus cost after the step that was tried last.
        step: step length alpha of the accepted step (0.0 when none was accepted).
        regularization: mu after the iteration's update.
        stop: the solver's stop value (DDP/iLQR: expected decrease of a full step; E-MSA: gradient norm).
        wall_time: seconds since the solve began.
        accepted: whether the iteration moved the iterate.
        constraint_violation: largest violation of the problem's constraints (state bounds, path,
            terminal) by the iterate after the iteration; 0.0 for problems without any.
        gap: largest dynamics gap |f(x_t, u_t) - x_{t+1}| of the iterate (multiple shooting, FDDP);
            0.0 for single-shooting solvers.
    """

    iteration: int
    cost: float
    expected_decrease: float
    actual_decrease: float
    step: float
    regularization: float
    stop: float
    wall_time: float
    accepted: bool = True
    constraint_violation: float = 0.0
    gap: float = 0.0


@dataclass(frozen=True)
class Result:
    """Outcome of a solve.

    Example:
        >>> import occore
        >>> res = occore.ILQR().solve(occore.problems.make("unicycle"))
        >>> res.status, res.converged, res.xs.shape, res.us.shape
        (<Status.CONVERGED: 'converged'>, True, (51, 3), (50, 2))
        >>> res.history[0].iteration, res.policy.K.shape
        (0, (50, 2, 3))

    Attributes:
        xs: states, (T+1, nx) for dense problems.
        us: controls, (T, nu) for dense problems.
        cost: total cost of (xs, us).
        status: how the solve ended.
        iterations: number of iterations performed.
        history: one :class:`IterationInfo` per iteration.
        policy: feedback law (k, K) of the last backward pass, or None.
        message: human-readable reason for the status.
        solver: the solver's name.
        wall_time: total seconds.
        constraint_violation: largest violation of the constraints by (xs, us) (0.0 without any).
        multipliers: the constraint multipliers where the solver has them (CDDP: an
            :class:`occore.solvers.cddp.Multipliers`; IPOPT: a dict of its constraint duals), else None.
    """

    xs: Any
    us: Any
    cost: float
    status: Status
    iterations: int
    history: list = field(default_factory=list, repr=False)
    policy: Any = field(default=None, repr=False)
    message: str = ""
    solver: str = ""
    wall_time: float = 0.0
    constraint_violation: float = 0.0
    multipliers: Any = field(default=None, repr=False)

    @property
    def converged(self) -> bool:
        """True when the status is CONVERGED."""
        return self.status is Status.CONVERGED

    def __repr__(self) -> str:
        """A few lines: solver, status, iterations, cost and the shapes (not the arrays)."""
        return (f"Result(solver={self.solver!r}, status={self.status.name}, iterations={self.iterations}, "
                f"cost={self.cost:.12g},\n       xs {shape_text(self.xs)}, us {shape_text(self.us)}, "
                f"policy={'yes' if self.policy is not None else 'none'}, wall_time={self.wall_time:.3g} s,"
                f"\n       message={self.message!r})")

    def summary(self) -> str:
        """A few lines describing the outcome."""
        per_iter = self.wall_time / self.iterations if self.iterations else float("nan")
        lines = [
            f"{self.solver or 'solver'}: {self.status.name} after {_plural(self.iterations, 'iteration')}"
            + (f" ({self.message})" if self.message else ""),
            f"  cost        {self.cost:.12g}",
            f"  wall time   {self.wall_time * 1e3:.2f} ms ({per_iter * 1e3:.3f} ms per iteration)",
        ]
        if self.history:
            last = self.history[-1]
            lines.append(f"  last stop   {last.stop:.3e} (stop value), regularization {last.regularization:.1e}")
        if self.constraint_violation or self.multipliers is not None:
            lines.append(f"  constraint violation {self.constraint_violation:.3e}")
        return "\n".join(lines)
