"""Selects the fastest available implementation of the backward sweep.

The numpy reference (:func:`occore.lq.riccati.riccati_sweep`) is always available.
"""
from __future__ import annotations

from .riccati import riccati_sweep


def best_sweep():
    """The sweep function to use (same signature as :func:`riccati_sweep`)."""
    return riccati_sweep
