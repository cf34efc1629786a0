"""The local linear-quadratic model of a dense problem around one trajectory.

With gaps (multiple shooting: states that are not a rollout of the controls, FDDP; Mastalli et al.
2020) the sweep expands each next value at its stage's defect, and the expected change of the cost
along the step alpha (feedforward alpha k, gaps closed by the fraction alpha) is
alpha D1 + alpha^2 D2 / 2 with

    D1 = d1 + F1 + F2 - Fd,    D2 = d2 - F2 + 2 Fd,
    F1 = sum_t Vx_t . gap_t,   F2 = sum_t gap_t . Vxx_t gap_t,   Fd = sum_t gap_t . Vxx_t dx_t,

where gap_0 = x0 - xs_0, gap_{t+1} the defect of stage t, and dx the states of the linear model
under the new policy (dx_0 = gap_0, dx_{t+1} = fx dx_t + fu (k_t + K_t dx_t) + gap_{t+1}). It is
exact for linear dynamics and quadratic costs (the LQ optimality conditions give
sum_t nu_t . gap_t = D1 + D2 with nu_t = Vx_t + Vxx_t dx_t), and reduces to (d1, d2) without gaps.
"""
from __future__ import annotations

import numpy as np

from .lq.compiled import best_adjoint, best_gap_terms
from .lq.riccati import riccati_sweep
from .types import Policy

__all__ = ["DenseLocalModel", "gap_terms", "linear_states"]


def gap_terms(d, k, K, gap, Vx, Vxx):
    """(F1, F2, Fd) of the module docstring: derivatives ``d``, the new policy (k, K), gap (T+1, nx)
    = gap_0..gap_T and the value (Vx, Vxx) of the backward pass (the numpy reference of
    :func:`occore.lq.csweep.gap_terms`)."""
    Pg = np.einsum("tij,tj->ti", Vxx, gap)
    F1 = float(np.sum(Vx * gap))
    F2 = float(np.sum(gap * Pg))
    A = d.fx + d.fu @ K                                                  # closed-loop (T, nx, nx)
    b = np.einsum("tij,tj->ti", d.fu, k) + gap[1:]
    dx = np.empty_like(gap)                                              # the linear model's states
    dx[0] = gap[0]
    for t in range(k.shape[0]):
        dx[t + 1] = A[t] @ dx[t] + b[t]
    return F1, F2, float(np.sum(Pg * dx))


def linear_states(d, k, K, gap):
    """The step of the linear model under the policy (k, K): (dx (T+1, nx), du (T, nu)) with
    dx_0 = gap_0, du_t = k_t + K_t dx_t, dx_{t+1} = fx_t dx_t + fu_t du_t + gap_{t+1} (gap (T+1, nx)
    = gap_0..gap_T; the numpy reference of :func:`occore.lq.csweep.linear_states`)."""
    T = k.shape[0]
    dx = np.empty_like(gap)
    du = np.empty_like(k)
    dx[0] = gap[0]
    for t in range(T):
        du[t] = k[t] + K[t] @ dx[t]
        dx[t + 1] = d.fx[t] @ dx[t] + d.fu[t] @ du[t] + gap[t + 1]
    return dx, du


class DenseLocalModel:
    """Derivatives of the whole horizon at one trajectory, and the sweeps that use them.

    Implements the :class:`occore.types.LocalModel` protocol for :class:`occore.Problem`.

    Args:
        derivs: :class:`occore.derivatives.base.DenseDerivatives` at the trajectory.
        us: (T, nu) controls of the trajectory.
        lower, upper: (T, nu) bounds or None.
        sweep: the backward-sweep function (defaults to the numpy reference
            :func:`occore.lq.riccati.riccati_sweep`; a compiled one has the same signature).
        gaps: (T, nx) defects f(x_t, u_t) - x_{t+1} of a multiple-shooting trajectory, or None.
        initial_gap: (nx,) x0 - xs_0, or None (zero).

    Example:
        >>> import occore
        >>> prob = occore.problems.make("lqr")
        >>> lm = prob.local_model(prob.rollout(prob.initial_controls()))
        >>> policy, (d1, d2) = lm.backward(mu=0.0)
        >>> policy.k.shape, policy.K.shape
        ((100, 2), (100, 2, 4))
    """

    def __init__(self, derivs, us, lower=None, upper=None, sweep=None, gaps=None, initial_gap=None):
        self.derivs = derivs
        self.us = us
        self.lower, self.upper = lower, upper
        self._sweep = sweep or riccati_sweep
        self._adjoint = None
        self._finite = None
        self.value = None  # (Vx, Vxx) of the last backward pass
        nx = derivs.fx.shape[1]
        self.gaps = gaps
        self.initial_gap = np.zeros(nx) if initial_gap is None else np.asarray(initial_gap, dtype=float)
        #: largest defect |gap| (0.0 for a single-shooting trajectory)
        self.max_gap = 0.0
        if gaps is not None:
            self.max_gap = float(max(np.max(np.abs(gaps), initial=0.0), np.max(np.abs(self.initial_gap), initial=0.0)))
            if self.max_gap == 0.0:
                self.gaps = None

    def finite(self) -> bool:
        """Whether every derivative of the model is finite (checked once)."""
        if self._finite is None:
            d = self.derivs
            self._finite = all(np.isfinite(a).all() for a in (d.fx, d.fu, d.lx, d.lu, d.lxx, d.lux, d.luu)
                               ) and (d.fxx is None or all(np.isfinite(a).all() for a in (d.fxx, d.fux, d.fuu)))
        return self._finite

    def curvature_scale(self) -> float:
        """The largest |entry| of the cost Hessians l_xx (terminal included) and l_uu: the scale
        V_xx and Q_uu inherit from the cost, to which the solvers relate the regularisation's cap
        (:func:`occore.solvers.ddp.curvature_scale` takes 1 where it is 0 or not finite)."""
        d = self.derivs
        return max(float(np.max(np.abs(d.lxx), initial=0.0)), float(np.max(np.abs(d.luu), initial=0.0)))

    def backward(self, mu: float, second_order: bool = False):
        if not self.finite():   # nothing to factorise: the solver ends with NON_FINITE
            T, nx, nu = self.derivs.fu.shape
            return Policy(k=np.full((T, nu), np.nan), K=np.full((T, nu, nx), np.nan)), (np.nan, np.nan)
        if self.gaps is None:
            k, K, d1, d2, Vx, Vxx = self._sweep(self.derivs, mu, second_order, self.us, self.lower, self.upper)
        else:
            k, K, d1, d2, Vx, Vxx = self._sweep(self.derivs, mu, second_order, self.us, self.lower, self.upper,
                                                gaps=self.gaps)
            d1, d2 = self._gap_terms(k, K, d1, d2, Vx, Vxx)
        self.value = (Vx, Vxx)
        return Policy(k=k, K=K), (d1, d2)

    def _gap_terms(self, k, K, d1, d2, Vx, Vxx):
        """(D1, D2) of the expected change with gaps (module docstring)."""
        gap = np.concatenate([self.initial_gap[None], self.gaps])            # (T+1, nx): gap_0..gap_T
        F1, F2, Fd = best_gap_terms()(self.derivs, k, K, gap, Vx, Vxx)
        return d1 + F1 + F2 - Fd, d2 - F2 + 2.0 * Fd

    def _adjoint_sweep(self):
        if self._adjoint is None:
            self._adjoint = best_adjoint()(self.derivs)
        return self._adjoint

    def costates(self) -> np.ndarray:
        """p_0..p_T, (T+1, nx), with p_t = -dJ/dx_t along the open-loop controls."""
        return -self._adjoint_sweep()[0]

    def control_gradient(self) -> np.ndarray:
        """dJ/du_t, (T, nu)."""
        return self._adjoint_sweep()[1]

    def gradient_norm(self) -> float:
        """Norm of dJ/du; with bounds, of its projection (components pushing a control at its
        bound outwards are dropped), which vanishes at a constrained optimum."""
        g = self.control_gradient()
        if self.lower is not None:
            g = np.where(((self.us <= self.lower) & (g > 0)) | ((self.us >= self.upper) & (g < 0)), 0.0, g)
        return float(np.linalg.norm(g))
