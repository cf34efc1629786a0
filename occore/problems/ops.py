"""The handful of operations the reference problems need, for each backend's array type.

Lets one problem definition serve the casadi, torch and finite-difference (numpy) backends.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import InputError


def ops_for(backend: str) -> SimpleNamespace:
    """``sin, cos, stack(list) -> column/vector, matmul(const_matrix, v)`` for ``backend``."""
    if backend == "casadi":
        import casadi as ca

        return SimpleNamespace(sin=ca.sin, cos=ca.cos, stack=lambda xs: ca.vertcat(*xs),
                               matmul=lambda A, v: ca.mtimes(ca.DM(A), v))
    if backend == "torch":
        import torch

        return SimpleNamespace(sin=torch.sin, cos=torch.cos, stack=torch.stack,
                               matmul=lambda A, v: torch.as_tensor(A, dtype=v.dtype) @ v)
    if backend == "finite_difference":
        return SimpleNamespace(sin=np.sin, cos=np.cos, stack=np.stack, matmul=lambda A, v: np.asarray(A) @ v)
    raise InputError(f"backend={backend!r} is unknown; valid backends are casadi, torch, finite_difference")
