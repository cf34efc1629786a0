"""The two predicates every argument check of occore and nn_adapter uses for numbers.

A number from numpy (``np.int64(3)`` out of ``np.arange``, ``np.float32(1e-3)`` out of an array) is
as good as Python's; a bool is not a number here (``max_iter=True`` is a mistake).

Example:
    >>> import numpy as np
    >>> is_integer(np.int64(3)), is_integer(True), is_integer(3.0)
    (True, False, False)
    >>> is_real(np.float32(0.5)), is_real(False), is_real("1")
    (True, False, False)
"""
from __future__ import annotations

import numbers

__all__ = ["is_integer", "is_real"]


def is_integer(value) -> bool:
    """An integer (``int`` or a numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (``int``, ``float`` or a numpy integer or floating scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
