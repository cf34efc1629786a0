"""The reference Riccati sweep of DDP / iLQR in numpy (readable, one stage at a time).

Given the stacked local model (:class:`occore.derivatives.base.DenseDerivatives`), computes the
gains of every stage from the last to the first:

    Qx  = lx + fx' Vx'                 Qu  = lu + fu' Vx'
    Qxx = lxx + fx' Vxx' fx (+ Vx'.fxx) Qux = lux + fu' Vxx' fx (+ Vx'.fux)
    Quu = luu + fu' Vxx' fu (+ Vx'.fuu)
    k = -Quu~^-1 Qu                    K = -Quu~^-1 Qux~                (box QP when bounded)
    Vx  = Qx + K' Quu k + K' Qu + Qux' k
    Vxx = Qxx + K' Quu K + K' Qux + Qux' K

Regularisation is the state form of Tassa, Erez & Todorov 2012 (their eq. 10): mu is added to Vxx'
where it enters the gains, Quu~ = Quu + mu (fu' fu + c I) and Qux~ = Qux + mu fu' fx, with a small
control share c = CONTROL_REG (1e-6) so that Quu~ becomes positive definite for a large mu even where
fu is rank deficient (a control with no immediate effect on the state). It penalises the
deviation of the next state rather than of the control, so a large mu keeps the new trajectory
near the old one (a trust region in state space); measured on the reference set it is what makes
full second-order DDP converge where the control form (Quu + mu I) stalls or hits the
regularisation limit. The value update (same paper, eq. 11) uses the unregularised Q terms.
With bounds, k solves the box QP on lower - u <= k <= upper - u and the rows of K of clamped
controls are zero.

Gaps (multiple shooting, FDDP: Mastalli et al. 2020): when the trajectory's states are not a
rollout of its controls, with the defect gap_t = f(x_t, u_t) - x_{t+1} of stage t, the model of the
next stage's value is expanded at the gap, so Vx' is replaced by Vx' + Vxx' gap_t wherever it enters
stage t (Qx, Qu and the second-order contraction); the Hessians are unchanged.
"""
from __future__ import annotations

import numpy as np

from ..errors import NotPositiveDefinite
from .box_qp import box_qp, chol_solve

__all__ = ["riccati_sweep", "CONTROL_REG"]

#: Share of the control-space term in the state-form regularisation (the C sweep uses the same).
CONTROL_REG = 1e-6


def riccati_sweep(d, mu: float, second_order: bool, us=None, lower=None, upper=None, k_warm=None, gaps=None):
    """Backward pass over all stages.

    Args:
        d: DenseDerivatives with T stages.
        mu: state regularisation (added to Vxx' where it enters the gains).
        second_order: contract the dynamics Hessians with Vx' (full DDP); needs d.fxx.
        us: (T, nu) current controls (needed with bounds).
        lower, upper: (T, nu) control bounds or None.
        k_warm: (T, nu) warm start of the box QPs (the previous feedforward), optional.
        gaps: (T, nx) dynamics defects f(x_t, u_t) - x_{t+1} (multiple shooting), or None (zeros).

    Returns:
        (k (T, nu), K (T, nu, nx), d1, d2, Vx (T+1, nx), Vxx (T+1, nx, nx)).

    Raises:
        NotPositiveDefinite: Quu + mu I (on the free set) is not positive definite at some stage.
    """
    T, nx, nu = d.fu.shape
    k = np.zeros((T, nu))
    K = np.zeros((T, nu, nx))
    Vx_all = np.empty((T + 1, nx))
    Vxx_all = np.empty((T + 1, nx, nx))
    Vx, Vxx = d.lx[T].copy(), d.lxx[T].copy()
    Vx_all[T], Vxx_all[T] = Vx, Vxx
    d1 = d2 = 0.0
    use_hess = second_order and d.fxx is not None
    for t in range(T - 1, -1, -1):
        fx, fu = d.fx[t], d.fu[t]
        if gaps is not None:
            Vx = Vx + Vxx @ gaps[t]
        Vxx_fx, Vxx_fu = Vxx @ fx, Vxx @ fu
        Qx = d.lx[t] + fx.T @ Vx
        Qu = d.lu[t] + fu.T @ Vx
        Qxx = d.lxx[t] + fx.T @ Vxx_fx
        Qux = d.lux[t] + fu.T @ Vxx_fx
        Quu = d.luu[t] + fu.T @ Vxx_fu
        if use_hess:
            Qxx = Qxx + np.tensordot(Vx, d.fxx[t], axes=1)
            Qux = Qux + np.tensordot(Vx, d.fux[t], axes=1)
            Quu = Quu + np.tensordot(Vx, d.fuu[t], axes=1)
        Quu = 0.5 * (Quu + Quu.T)
        H = Quu + mu * (fu.T @ fu + CONTROL_REG * np.eye(nu))
        Qux_reg = Qux + mu * (fu.T @ fx)
        if lower is None:
            try:
                L = np.linalg.cholesky(H)
            except np.linalg.LinAlgError as err:
                raise NotPositiveDefinite(t) from err
            sol = -chol_solve(L, np.column_stack([Qu, Qux_reg]))
            kt, Kt = sol[:, 0], sol[:, 1:]
        else:
            kt, free, L = box_qp(H, Qu, lower[t] - us[t], upper[t] - us[t],
                                 None if k_warm is None else k_warm[t], stage=t)
            Kt = np.zeros((nu, nx))
            if L is not None:
                Kt[free] = -chol_solve(L, Qux_reg[free])
        k[t], K[t] = kt, Kt
        d1 += Qu @ kt
        d2 += kt @ Quu @ kt
        KtQuu = Kt.T @ Quu
        Vx = Qx + KtQuu @ kt + Kt.T @ Qu + Qux.T @ kt
        Vxx = Qxx + KtQuu @ Kt + Kt.T @ Qux + Qux.T @ Kt
        Vxx = 0.5 * (Vxx + Vxx.T)
        Vx_all[t], Vxx_all[t] = Vx, Vxx
    return k, K, float(d1), float(d2), Vx_all, Vxx_all
