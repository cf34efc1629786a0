"""Typed errors of occore.

Declaration and shape problems raise at construction; numerical trouble during a solve never raises
but ends the solve with a :class:`occore.Status`.
"""
from __future__ import annotations


class OccoreError(Exception):
    """Base class of every error occore raises on purpose."""


class ShapeError(OccoreError, ValueError):
    """An argument or a function output has the wrong shape.

    The message names the argument, the expected and the actual shape.
    """

    def __init__(self, argument: str, expected, actual, detail: str = ""):
        self.argument, self.expected, self.actual = argument, expected, actual
        msg = f"{argument}: expected shape {expected}, got {actual}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class DerivativeError(OccoreError):
    """A backend could not build or evaluate the derivatives of a user function."""


class TraceError(DerivativeError):
    """A user function cannot be traced by the torch backend: it branches in Python on tensor
    values (``if x[0] > 0``, ``while``, ``bool(t)``, ``.item()``, ``float(t)``). The message names
    the function and the way out (``torch.where`` / ``torch.clamp``, or another backend)."""


class InputError(OccoreError, ValueError):
    """An argument has a bad value (non-finite, inconsistent bounds, unknown name...)."""


class NotPositiveDefinite(OccoreError):
    """Internal: the regularised Q_uu of some stage is not positive definite.

    Raised by ``LocalModel.backward``; solvers catch it and raise the regularisation.
    """

    def __init__(self, stage: int):
        self.stage = stage
        super().__init__(f"Q_uu not positive definite at stage {stage}")
