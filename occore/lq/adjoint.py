"""The adjoint (costate) sweep: first-order sensitivities of J along a trajectory.

    lambda_T = lx_T,   lambda_t = lx_t + fx_t' lambda_{t+1},   dJ/du_t = lu_t + fu_t' lambda_{t+1}

The costates of the maximum principle (H = p.f - l) are p_t = -lambda_t.
"""
from __future__ import annotations

import numpy as np

__all__ = ["adjoint_sweep"]


def adjoint_sweep(d):
    """Returns (lam (T+1, nx), dJ/du (T, nu)) for DenseDerivatives ``d``."""
    T, nx, _ = d.fu.shape
    lam = np.empty((T + 1, nx))
    lam[T] = d.lx[T]
    for t in range(T - 1, -1, -1):
        lam[t] = d.lx[t] + d.fx[t].T @ lam[t + 1]
    grad = d.lu + np.einsum("tij,ti->tj", d.fu, lam[1:])
    return lam, grad
