"""Independent references for the solvers: the same problem solved by an external NLP solver.

    >>> import occore
    >>> ref = occore.reference.ipopt(occore.problems.make("lqr"))
    >>> ref.status.name, ref.iterations
    ('CONVERGED', 1)
"""
from __future__ import annotations

from .transcription import fatrop, ipopt

__all__ = ["ipopt", "fatrop"]
