"""Typed errors of nn_adapter (all under :class:`occore.errors.OccoreError`), and its warnings.

=============================  ==============================  ==================================
error                          builtins it is                  raised for
=============================  ==============================  ==================================
UnsupportedModuleError         TypeError                       a module that cannot be a stage
DataDependentForwardError      TypeError (UnsupportedModule)   a forward that branches on data
DtypeError                     TypeError and ValueError        integer inputs, targets' dtype
DataError                      ValueError (InputError)         an empty batch, NaN/inf data
MemoryLimitError               MemoryError                     a dense local model (or dense
                                                               DDPNOpt feedback) too large
=============================  ==============================  ==================================

:func:`warn` is the one way nn_adapter warns (a refused step, a guessed loss): one
``RuntimeWarning`` attributed to the user's line (``logging.captureWarnings(True)`` routes it to
the logs); the library never prints and never also logs the same message.
"""
from __future__ import annotations

import os
import sys
import warnings

from occore.errors import InputError, OccoreError

__all__ = ["UnsupportedModuleError", "DataDependentForwardError", "DtypeError", "DataError",
           "MemoryLimitError", "warn"]


class UnsupportedModuleError(OccoreError, TypeError):
    """A module the adapter cannot turn into a stage (or a follower of one).

    The message names the module (its name in the model and its class) and says what is supported.

    Example:
        >>> from torch import nn
        >>> from nn_adapter import split_stages
        >>> try:
        ...     split_stages(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))   # training mode
        ... except UnsupportedModuleError as err:
        ...     print(str(err)[:41])
        module '1' (Dropout) is in training mode,
    """


class MemoryLimitError(OccoreError, MemoryError):
    """The dense network local model would need more memory than the configured limit.

    Attributes:
        estimate: the estimated number of bytes.
        limit: the configured limit in bytes.

    Example:
        >>> MemoryLimitError(3 * 2**20, 2**20).estimate
        3145728
    """

    def __init__(self, estimate: int, limit: int, detail: str = "", way_out: str = ""):
        self.estimate, self.limit = int(estimate), int(limit)
        way_out = way_out or ("raise `memory_limit` for a small network or train larger ones with "
                              "nn_adapter.DDPNOpt (structured curvature)")
        msg = (f"the network local model needs about {_size(estimate)} "
               f"(limit {_size(limit)}){': ' + detail if detail else ''}; {way_out}")
        super().__init__(msg)


def _size(n) -> str:
    """A number of bytes for a message, in the unit that keeps it readable (a limit of a few
    kilobytes is not "0.0 MiB").

    Example:
        >>> _size(3 * 2**20), _size(5000), _size(1000)
        ('3.0 MiB', '4.9 KiB', '1000 bytes')
    """
    n = int(n)
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} bytes"


class DataDependentForwardError(UnsupportedModuleError):
    """A module whose forward branches on the values of its input (``if x.sum() > 0``,
    ``x.item()``, ``bool(x)``...).

    The network local model differentiates every stage per sample with ``torch.func`` (``vmap``),
    which cannot follow a Python branch on tensor values; write the branch with tensor operations
    (``torch.where``, ``torch.clamp``). The message names the module (its name in the model and
    its class).

    Example:
        >>> issubclass(DataDependentForwardError, TypeError)
        True
    """


class DtypeError(InputError, TypeError):
    """An argument has a dtype that cannot work: integer inputs for a module that needs floating
    point, floating targets for a loss that needs class indices, or the reverse.

    Both a ``TypeError`` (the kind of the mistake) and an :class:`occore.errors.InputError` (a
    ``ValueError``, like every bad argument value). The message names the argument, the expected
    and the actual dtype.

    Example:
        >>> err = DtypeError("inputs", "a floating-point dtype", "torch.int64")
        >>> str(err)
        'inputs: expected a floating-point dtype, got torch.int64'
    """

    def __init__(self, argument: str, expected: str, actual, detail: str = ""):
        self.argument, self.expected, self.actual = argument, expected, actual
        msg = f"{argument}: expected {expected}, got {actual}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class DataError(InputError):
    """The batch cannot be trained on: no samples, NaN or inf values, class indices out of range.

    The message names the argument (``inputs`` or ``targets``) and what is wrong with it.

    Example:
        >>> str(DataError("targets", "contains NaN or inf"))
        'targets: contains NaN or inf'
    """

    def __init__(self, argument: str, problem: str):
        self.argument = argument
        super().__init__(f"{argument}: {problem}")


_INTERNAL = None


def _internal_dirs() -> tuple:
    global _INTERNAL
    if _INTERNAL is None:
        import torch

        import occore
        here = os.path.dirname(os.path.abspath(__file__))
        _INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                          for m in (occore, torch)) + (here + os.sep,)
    return _INTERNAL


def warn(message: str, category: type = RuntimeWarning) -> None:
    """Issue ``message`` once as a warning, attributed to the first caller outside nn_adapter,
    occore and torch (the user's ``opt.step(closure)`` line).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("step refused")
        >>> [str(w.message) for w in caught]
        ['step refused']
    """
    internal = _internal_dirs()
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
