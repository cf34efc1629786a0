"""The local linear-quadratic model of a dense problem around one trajectory."""
from __future__ import annotations

import numpy as np

from .lq.compiled import best_adjoint
from .lq.riccati import riccati_sweep
from .types import Policy

__all__ = ["DenseLocalModel"]


class DenseLocalModel:
    """Derivatives of the whole horizon at one trajectory, and the sweeps that use them.

    Implements the :class:`occore.types.LocalModel` protocol for :class:`occore.Problem`.

    Args:
        derivs: :class:`occore.derivatives.base.DenseDerivatives` at the trajectory.
        us: (T, nu) controls of the trajectory.
        lower, upper: (T, nu) bounds or None.
        sweep: the backward-sweep function (defaults to the numpy reference
            :func:`occore.lq.riccati.riccati_sweep`; a compiled one has the same signature).

    Example:
        >>> import occore
        >>> prob = occore.problems.make("lqr")
        >>> lm = prob.local_model(prob.rollout(prob.initial_controls()))
        >>> policy, (d1, d2) = lm.backward(mu=0.0)
        >>> policy.k.shape, policy.K.shape
        ((100, 2), (100, 2, 4))
    """

    def __init__(self, derivs, us, lower=None, upper=None, sweep=None):
        self.derivs = derivs
        self.us = us
        self.lower, self.upper = lower, upper
        self._sweep = sweep or riccati_sweep
        self._adjoint = None
        self._finite = None
        self.value = None  # (Vx, Vxx) of the last backward pass

    def finite(self) -> bool:
        """Whether every derivative of the model is finite (checked once)."""
        if self._finite is None:
            d = self.derivs
            self._finite = all(np.isfinite(a).all() for a in (d.fx, d.fu, d.lx, d.lu, d.lxx, d.lux, d.luu)
                               ) and (d.fxx is None or all(np.isfinite(a).all() for a in (d.fxx, d.fux, d.fuu)))
        return self._finite

    def backward(self, mu: float, second_order: bool = False):
        if not self.finite():   # nothing to factorise: the solver ends with NON_FINITE
            T, nx, nu = self.derivs.fu.shape
            return Policy(k=np.full((T, nu), np.nan), K=np.full((T, nu, nx), np.nan)), (np.nan, np.nan)
        k, K, d1, d2, Vx, Vxx = self._sweep(self.derivs, mu, second_order, self.us, self.lower, self.upper)
        self.value = (Vx, Vxx)
        return Policy(k=k, K=K), (d1, d2)

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
