"""Typed errors of nn_adapter (all under :class:`occore.errors.OccoreError`)."""
from __future__ import annotations

from occore.errors import OccoreError

__all__ = ["UnsupportedModuleError", "MemoryLimitError"]


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

    def __init__(self, estimate: int, limit: int, detail: str = ""):
        self.estimate, self.limit = int(estimate), int(limit)
        msg = (f"the network local model needs about {estimate / 2**20:.1f} MiB "
               f"(limit {limit / 2**20:.1f} MiB){': ' + detail if detail else ''}; raise "
               "`memory_limit` for a small network or train larger ones with "
               "nn_adapter.DDPNOpt (structured curvature)")
        super().__init__(msg)
