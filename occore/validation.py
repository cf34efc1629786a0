"""The predicates every argument check of occore and nn_adapter uses for numbers, and the one
conversion of array arguments (:func:`float_array`).

A number from numpy (``np.int64(3)`` out of ``np.arange``, ``np.float32(1e-3)`` out of an array) is
as good as Python's; a bool is not a number here (``max_iter=True`` is a mistake).

Example:
    >>> import numpy as np
    >>> is_integer(np.int64(3)), is_integer(True), is_integer(3.0)
    (True, False, False)
    >>> is_real(np.float32(0.5)), is_real(False), is_real("1")
    (True, False, False)
    >>> float_array([1, 2], "x0")
    array([1., 2.])
"""
from __future__ import annotations

import numbers

import numpy as np

from .errors import InputError

__all__ = ["is_integer", "is_real", "float_array"]


def is_integer(value) -> bool:
    """An integer (``int`` or a numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (``int``, ``float`` or a numpy integer or floating scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def float_array(value, name: str, what: str = "numbers") -> np.ndarray:
    """``value`` as a new float64 array (any shape; the caller checks it).

    Raises:
        InputError: naming ``name``, when ``value`` is not ``what`` (numbers, or a nested sequence
            of them), or holds complex numbers (numpy would drop their imaginary parts).
    """
    try:
        raw = np.asarray(value)
        if np.iscomplexobj(raw):
            raise InputError(f"{name}: expected real numbers, got complex values")
        return np.array(raw, dtype=float)
    except InputError:
        raise
    except (TypeError, ValueError) as err:
        raise InputError(f"{name}: expected {what}, got {type(value).__name__}") from err
