"""Dense per-sample feedback gains of DDPNOpt (``feedback="dense"``): small networks and tests.

The same backward recursion as :mod:`nn_adapter.feedback`, with every matrix materialised per
sample instead of factorised: the stage Jacobians f_x^(i), f_u^(i) (one ``vmap(jacrev)`` per
stage), Q_xx^(i) = f_x^T V' f_x, Q_ux^(i) = f_u^T V' f_x (+ V_x' . f_ux with second-order
dynamics), the gains K^(i) = -P Q_ux^(i) / mu_i and V_xx^(i) = Q_xx - Q_ux^T P Q_ux / mu_i, where
mu_i >= 1 is the per-sample regularisation Q_uu = mu_i P^-1 that keeps the sample's local model
convex (:func:`regularisation`, computed from the Gauss-Newton part of Q_ux), + eps I carried back exactly (the factorised form keeps only its
first stage, eps f_u^T f_x dx). P is the curvature's inverse, materialised as an
(m_t, m_t) matrix. The terminal value Hessian is the optimizer's choice
(:mod:`nn_adapter.terminal`) materialised, so with the same options the result equals the
factorised one.

Memory grows like B (n_t^2 + m_t n_t) + m_t^2 per stage; :func:`dense_gains` refuses networks
where that exceeds ``max_elements``.
"""
from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from .feedback import StageView, precondition

__all__ = ["dense_gains", "apply_gains"]


def _unflatten(vec: torch.Tensor, like: list) -> list:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def _dense_P(view: StageView, factors: list) -> torch.Tensor:
    params = view.params
    m = sum(p.numel() for p in params)
    eye = torch.eye(m, dtype=params[0].dtype, device=params[0].device)
    return torch.stack([torch.cat([v.reshape(-1) for v in precondition(
        view, factors, _unflatten(eye[j], params))]) for j in range(m)], 1)


def dense_gains(views: list, factors: list, inputs: list, v_term: torch.Tensor,
                vxx_update: bool = True, eps_vxx: float = 0.0, second_order: bool = False,
                v_stage_out: list = None, max_elements: int = 50_000_000) -> list:
    """Per-sample Q_ux^(i) / mu_i of every stage t >= 1, (B, m_t, n_t) each (None for t = 0):
    the gains without their preconditioner, K_t^(i) = -P_t Q_ux^(i) / mu_i.

    Args:
        views: the stages.
        factors: the curvature factors of each stage (list per stage).
        inputs: nominal stage inputs x_t, (B, ...) each.
        v_term: per-sample terminal value Hessians V_xx^T (B, n_T, n_T) (see
            :mod:`nn_adapter.terminal`).
        vxx_update, eps_vxx, second_order: as in :class:`nn_adapter.DDPNOpt`.
        v_stage_out: per-sample value gradients at each stage output (second order only).
        max_elements: refuse (``ValueError``) beyond this many numbers in one stage's matrices.
    """
    T, B = len(views), v_term.shape[0]
    V = v_term
    gains: list = [None] * T
    for t in range(T - 1, 0, -1):
        view, x = views[t], inputs[t]
        params = [p.detach() for p in view.params]
        n_in, m = x[0].numel(), sum(p.numel() for p in params)
        if B * (n_in * n_in + m * n_in + V.shape[1] * (n_in + m)) + m * m > max_elements:
            raise ValueError(f"feedback='dense': stage {t} needs more than {max_elements} "
                             "numbers; use the factorised feedback for networks of this size")
        u = torch.cat([p.reshape(-1) for p in params])

        def f(xi, uu, view=view, params=params):
            return view.stage_fn(_unflatten(uu, params), xi[None])[0].reshape(-1)

        fx = vmap(jacrev(f, 0), in_dims=(0, None))(x, u).reshape(B, -1, n_in)
        fu = vmap(jacrev(f, 1), in_dims=(0, None))(x, u)
        Vfx = V @ fx
        qxx, qux = fx.mT @ Vfx, fu.mT @ Vfx
        P = _dense_P(view, factors[t])
        mu = regularisation(P, qxx, qux)[:, None, None] if vxx_update else 1.0
        if second_order:
            v_next = v_stage_out[t].reshape(B, -1)

            def vfx(xi, uu, vi, f=f):   # V_x' . f_x, its u-Jacobian is V_x' . f_ux
                return jacrev(f, 0)(xi, uu).reshape(-1, n_in).T @ vi

            qux = qux + vmap(jacrev(vfx, 1), in_dims=(0, None, 0))(x, u, v_next).mT
        gains[t] = qux / mu
        V = qxx - qux.mT @ (P @ qux) / mu if vxx_update else qxx
        V = 0.5 * (V + V.mT)
        evals, evecs = torch.linalg.eigh(V)
        V = (evecs * evals.clamp(min=0.0)[:, None, :]) @ evecs.mT
        if eps_vxx:   # Algorithm 3, line 12: V_xx^t + eps I (carried back from here on)
            V = V + eps_vxx * torch.eye(n_in, dtype=V.dtype, device=V.device)
    return gains


def regularisation(P: torch.Tensor, qxx: torch.Tensor, qux: torch.Tensor) -> torch.Tensor:
    """mu_i = max(1, lambda_max(P^1/2 Q_ux Q_xx^+ Q_xu P^1/2)) per sample, (B,): the smallest
    multiple of P^-1 for which [[Q_xx, Q_xu], [Q_ux, mu P^-1]] is positive semi-definite."""
    evals, evecs = torch.linalg.eigh(0.5 * (P + P.mT))
    half = (evecs * evals.clamp(min=0.0).sqrt()) @ evecs.mT
    pinv = torch.linalg.pinv(0.5 * (qxx + qxx.mT), hermitian=True, rtol=1e-10)
    m = half @ qux @ pinv @ qux.mT @ half
    return torch.linalg.eigvalsh(0.5 * (m + m.mT))[:, -1].clamp(min=1.0)


def apply_gains(view: StageView, gain: torch.Tensor, dx: torch.Tensor) -> list:
    """(1/B) sum_i G^(i) dx^(i) as one tensor per stage parameter (G: :func:`dense_gains`)."""
    du = (gain @ dx.reshape(dx.shape[0], -1, 1)).mean(0).reshape(-1)
    return _unflatten(du, view.params)
