"""Dense per-sample feedback gains of DDPNOpt (``feedback="dense"``): small networks and tests.

The same recursion as the factorised feedback (:mod:`nn_adapter.feedback`,
:mod:`nn_adapter.feedback_columns`) with every matrix materialised per sample instead of using the
structured kernels: the module Jacobians h_x^(i), h_u^(i) (``vmap(jacrev)``), the value Hessian at
the module output V^(i) = Y W' Y^T from its terminal columns Y and weights W' (dense r x r),
Q_xx = h_x^T V h_x, Q_ux = h_u^T V h_x (+ eps h_u^T h_x, + V_x . h_ux with second order), the
per-sample regularisation mu_i from the dense Schur complement (:func:`regularisation`), the gains
K^(i) = -P Q_ux^(i) / mu_i and W = W' - W' N W' / mu with N = G^T P G, G = h_u^T Y. P is the
curvature's inverse materialised as an (m_t, m_t) matrix.

Memory grows like B (n_t^2 + m_t n_t) + m_t^2 per stage; :func:`dense_gains` refuses networks
where that exceeds ``max_elements``.
"""
from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from .feedback import precondition
from .module_stages import ModuleStage

__all__ = ["dense_gains", "apply_gains", "regularisation"]


def _unflatten(vec: torch.Tensor, like: list) -> list:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def _dense_P(stage: ModuleStage, factors: list) -> torch.Tensor:
    params = stage.params
    m = sum(p.numel() for p in params)
    eye = torch.eye(m, dtype=params[0].dtype, device=params[0].device)
    return torch.stack([torch.cat([v.reshape(-1) for v in precondition(
        stage, factors, _unflatten(eye[j], params))]) for j in range(m)], 1)


def dense_gains(stages: list, factors: list, inputs: list, cols: list, w_term=None,
                vxx_update: bool = True, eps_vxx: float = 0.0, second_order: bool = False,
                v_out: list = None, max_elements: int = 50_000_000) -> list:
    """Per-sample Q_ux^(i) / mu_i of every stage t >= 1, (B, m_t, n_t) each (None for t = 0):
    the gains without their preconditioner, K_t^(i) = -P_t Q_ux^(i) / mu_i.

    Args:
        stages: the stages, in execution order.
        factors: the curvature factors of each stage (list per stage).
        inputs: nominal module inputs x_t, (B, ...) each.
        cols: per stage t >= 1, the terminal columns at the module output (B, r, ...).
        w_term: the terminal weights W_T (B, r, r), or None (identity).
        vxx_update, eps_vxx, second_order: as in :class:`nn_adapter.DDPNOpt`.
        v_out: per-sample value gradients at each module output (second order only).
        max_elements: refuse (``ValueError``) beyond this many numbers in one stage's matrices.
    """
    T = len(stages)
    B = inputs[0].shape[0]
    W = w_term
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
        yw = y if W is None else y @ W
        V = yw @ y.mT                                                    # Y W' Y^T
        qxx, qux = hx.mT @ V @ hx, hu.mT @ V @ hx
        P = _dense_P(stage, factors[t])
        if vxx_update:
            mu = regularisation(P, qxx, qux)[:, None, None]
            G = hu.mT @ y                                                # (B, m, r)
            Wn = torch.eye(y.shape[2], dtype=y.dtype, device=y.device) if W is None else W
            W = Wn - Wn @ (G.mT @ P @ G) @ Wn / mu
            W = 0.5 * (W + W.mT)
        else:
            mu = 1.0
        if eps_vxx and t < T - 1:
            qux = qux + eps_vxx * hu.mT @ hx
        if second_order:
            v = v_out[t].reshape(B, -1)

            def vhx(xi, uu, vi, h=h):   # V_x . h_x, its u-Jacobian is V_x . h_ux
                return jacrev(h, 0)(xi, uu).T @ vi

            qux = qux + vmap(jacrev(vhx, 1), in_dims=(0, None, 0))(xf, u, v).mT
        gains[t] = qux / mu
    return gains


def regularisation(P: torch.Tensor, qxx: torch.Tensor, qux: torch.Tensor) -> torch.Tensor:
    """mu_i = max(1, lambda_max(P^1/2 Q_ux Q_xx^+ Q_xu P^1/2)) per sample, (B,): the smallest
    multiple of P^-1 for which [[Q_xx, Q_xu], [Q_ux, mu P^-1]] is positive semi-definite."""
    evals, evecs = torch.linalg.eigh(0.5 * (P + P.mT))
    half = (evecs * evals.clamp(min=0.0).sqrt()) @ evecs.mT
    pinv = torch.linalg.pinv(0.5 * (qxx + qxx.mT), hermitian=True, rtol=1e-10)
    m = half @ qux @ pinv @ qux.mT @ half
    return torch.linalg.eigvalsh(0.5 * (m + m.mT))[:, -1].clamp(min=1.0)


def apply_gains(stage: ModuleStage, gain: torch.Tensor, dx: torch.Tensor) -> list:
    """(1/B) sum_i G^(i) dx^(i) as one tensor per stage parameter (G: :func:`dense_gains`)."""
    du = (gain @ dx.reshape(dx.shape[0], -1, 1)).mean(0).reshape(-1)
    return _unflatten(du, stage.params)
