"""Side-by-side comparison of trajectory optimisers: ``occore.compare(...)`` and ``occore compare``.

Runs a set of solvers on a set of problems from the same initial guess and reports, per run: status,
iterations, final cost, relative gap to the best cost found, box violation, solve time, time per
iteration, and the iterations and time needed to come within 1e-2 and 1e-4 of the best cost.
"""
from __future__ import annotations

from .runner import DEFAULT_SOLVERS, LEVELS, Comparison, Record, compare
from .solvers import SOLVERS

__all__ = ["compare", "Comparison", "Record", "SOLVERS", "DEFAULT_SOLVERS", "LEVELS"]
