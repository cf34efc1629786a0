"""Selects the fastest available implementation of the sweeps.

The numpy references (:func:`occore.lq.riccati.riccati_sweep`, :func:`occore.lq.adjoint.adjoint_sweep`)
are always available; the C versions of :mod:`occore.lq.csweep` (same signatures and results,
tested to agree to 1e-12) are used when their library was built at install time. When it was not,
a warning is logged once and numpy is used.

Example:
    >>> from occore.lq.compiled import best_sweep
    >>> best_sweep().__name__
    'riccati_sweep'
"""
from __future__ import annotations

import logging

from . import csweep
from .adjoint import adjoint_sweep
from .riccati import riccati_sweep

__all__ = ["best_sweep", "best_adjoint", "best_gap_terms", "best_linear_states", "compiled_available"]

logger = logging.getLogger("occore")
_warned = False


def compiled_available() -> bool:
    """True when the C sweeps are loaded; logs a warning (once per process) when they are not."""
    global _warned
    if csweep.available():
        return True
    if not _warned:
        _warned = True
        logger.warning("occore: compiled backward sweep unavailable (%s); using the numpy sweep "
                       "(correct but slower)", csweep.load_error())
    return False


def best_sweep():
    """The backward-sweep function to use (same signature as :func:`riccati_sweep`)."""
    return csweep.riccati_sweep if compiled_available() else riccati_sweep


def best_adjoint():
    """The adjoint-sweep function to use (same signature as :func:`adjoint_sweep`)."""
    return csweep.adjoint_sweep if compiled_available() else adjoint_sweep


def best_gap_terms():
    """The gap-terms function to use (same signature as :func:`occore.local_model.gap_terms`)."""
    if compiled_available():
        return csweep.gap_terms
    from ..local_model import gap_terms
    return gap_terms


def best_linear_states():
    """The linear-states function to use (same signature as :func:`occore.local_model.linear_states`)."""
    if compiled_available():
        return csweep.linear_states
    from ..local_model import linear_states
    return linear_states
