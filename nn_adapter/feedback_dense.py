"""Dense per-sample feedback gains of DDPNOpt (``feedback="dense"``): small networks and tests.

The gains of the factorised feedback (:mod:`nn_adapter.minibatch`'s sweep) held as matrices per
sample instead of as operators: the module Jacobians h_x^(i), h_u^(i) (``vmap(jacrev)``), the
value Hessian at the module output V^(i) = Y W' Y^T from the sweep's columns Y and weights W',
Q_ux = h_u^T V h_x (+ eps h_u^T h_x, + V_x . h_ux with second order) and the gain without its
preconditioner Q_ux^(i) / mu_i (K^(i) = -P Q_ux^(i) / mu_i).

Memory grows like B (n_t^2 + m_t n_t) per stage; :func:`dense_gains` refuses networks where that
exceeds ``max_elements``.
"""
from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from .stages import Stage

__all__ = ["dense_gains", "apply_gains"]


def _unflatten(vec: torch.Tensor, like: list) -> list:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def dense_gains(stages: list, inputs: list, cols: list, ws: list, mus: list,
                eps_vxx: float = 0.0, second_order: bool = False, v_out: list = None,
                max_elements: int = 50_000_000) -> list:
    """Per-sample Q_ux^(i) / mu_i of every stage t >= 1, (B, m_t, n_t) each (None for t = 0).

    Args:
        stages: the stages, in execution order.
        inputs: nominal module inputs x_t, (B, ...) each.
        cols: per stage t >= 1, the columns Y at the module output (B, r, ...).
        ws: ws[t + 1], the weights W' at stage t's output (B, r, r), or None (identity).
        mus: per stage, the per-sample regularisation (B,) or None (1).
        eps_vxx, second_order: as in :class:`nn_adapter.DDPNOpt`.
        v_out: per-sample value gradients at each module output (second order only).
        max_elements: refuse (``ValueError``) beyond this many numbers in one stage's matrices.
    """
    T = len(stages)
    B = inputs[0].shape[0]
    gains: list = [None] * T
    for t in range(T - 1, 0, -1):
        stage, x = stages[t], inputs[t]
        params = [p.detach() for p in stage.params]
        y = cols[t].reshape(B, cols[t].shape[1], -1).mT                   # (B, n_out, r)
        n_in, n_out, m = x[0].numel(), y.shape[1], sum(p.numel() for p in params)
        if B * (n_in * n_in + (m + n_out) * (n_in + n_out)) + m * m > max_elements:
            raise ValueError(f"feedback='dense': stage {t} needs more than {max_elements} "
                             "numbers; use the factorised feedback for networks of this size")
        u = torch.cat([p.reshape(-1) for p in params])
        shape = x.shape[1:]

        def h(xi, uu, stage=stage, params=params, shape=shape):
            return stage.module_fn(_unflatten(uu, params), xi.reshape(shape)[None])[0].reshape(-1)

        xf = x.reshape(B, -1)
        hx = vmap(jacrev(h, 0), in_dims=(0, None))(xf, u)                # (B, n_out, n_in)
        hu = vmap(jacrev(h, 1), in_dims=(0, None))(xf, u)                # (B, n_out, m)
        W = ws[t + 1]
        V = (y if W is None else y @ W) @ y.mT                           # Y W' Y^T
        qux = hu.mT @ V @ hx
        if mus[t] is not None:
            qux = qux / mus[t][:, None, None]
        if eps_vxx:
            extra = eps_vxx * hu.mT @ hx
        else:
            extra = None
        if second_order:
            v = v_out[t].reshape(B, -1)

            def vhx(xi, uu, vi, h=h):   # V_x . h_x, its u-Jacobian is V_x . h_ux
                return jacrev(h, 0)(xi, uu).T @ vi

            so = vmap(jacrev(vhx, 1), in_dims=(0, None, 0))(xf, u, v).mT
            extra = so if extra is None else extra + so
        if extra is not None:            # the extra terms are divided by mu as well
            qux = qux + (extra if mus[t] is None else extra / mus[t][:, None, None])
        gains[t] = qux
    return gains


def apply_gains(stage: Stage, gain: torch.Tensor, dx: torch.Tensor) -> list:
    """(1/B) sum_i G^(i) dx^(i) as one tensor per stage parameter (G: :func:`dense_gains`)."""
    du = (gain @ dx.reshape(dx.shape[0], -1, 1)).mean(0).reshape(-1)
    return _unflatten(du, stage.params)
