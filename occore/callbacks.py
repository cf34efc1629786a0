"""Callbacks called once per iteration: ``callback(info, state) -> bool | None``.

Returning True stops the solve with ``Status.STOPPED_BY_CALLBACK``.
"""
from __future__ import annotations

import logging
import sys

from .result import IterationInfo

__all__ = ["Logger", "Verbose", "format_header", "format_row"]

_HEADER = f"{'iter':>5} {'cost':>16} {'expected':>10} {'actual':>10} {'step':>8} {'reg':>8} {'stop':>10} {'viol':>8} {'gap':>8} {'time[ms]':>9}"


def format_header() -> str:
    """Column titles of the per-iteration table."""
    return _HEADER


def format_row(info: IterationInfo) -> str:
    """One line of the per-iteration table (viol: the constraint violation of the iterate, CDDP and
    IPOPT; gap: its largest dynamics gap, FDDP)."""
    mark = "" if info.accepted else " *"
    return (
        f"{info.iteration:>5d} {info.cost:>16.10g} {info.expected_decrease:>10.3e} "
        f"{info.actual_decrease:>10.3e} {info.step:>8.4f} {info.regularization:>8.1e} "
        f"{info.stop:>10.3e} {info.constraint_violation:>8.1e} {info.gap:>8.1e} {info.wall_time * 1e3:>9.2f}{mark}"
    )


class Logger:
    """Logs each iteration at INFO level to ``logging.getLogger("occore")``.

    Example:
        >>> import occore
        >>> res = occore.ILQR(callbacks=[occore.Logger()]).solve(occore.problems.make("lqr"))
        >>> res.converged
        True
    """

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO):
        self.logger = logger or logging.getLogger("occore")
        self.level = level

    def __call__(self, info: IterationInfo, state=None) -> None:
        self.logger.log(self.level, format_row(info))


class Verbose:
    """Prints the per-iteration table to a stream (stdout by default).

    Example:
        >>> import io, occore
        >>> out = io.StringIO()
        >>> _ = occore.ILQR(callbacks=[occore.Verbose(out)]).solve(occore.problems.make("lqr"))
        >>> out.getvalue().splitlines()[0].split()[:2]
        ['iter', 'cost']
    """

    def __init__(self, stream=None):
        self.stream = stream
        self._printed_header = False

    def __call__(self, info: IterationInfo, state=None) -> None:
        stream = self.stream or sys.stdout
        if not self._printed_header or info.iteration == 0:
            print(format_header(), file=stream)
            self._printed_header = True
        print(format_row(info), file=stream)
