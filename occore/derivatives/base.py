"""The horizon-stacked local model data and the backend interface.

A backend turns the user's callables into (a) values along a rollout and (b) all derivatives of
the whole horizon in one call. Shapes follow DESIGN.md: time-major and stacked, Jacobians with
outputs on rows (fx[t][i, j] = d f_i / d x_j).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DenseDerivatives", "Backend", "nan_derivatives"]


@dataclass(frozen=True)
class DenseDerivatives:
    """Values and derivatives at T stage points (xs[t], us[t]) and the terminal point xs[T].

    Attributes:
        f: (T, nx) dynamics values.         l: (T,) stage costs.        lf: terminal cost (float).
        fx: (T, nx, nx).  fu: (T, nx, nu).
        lx: (T+1, nx) (row T: terminal).  lu: (T, nu).
        lxx: (T+1, nx, nx).  lux: (T, nu, nx).  luu: (T, nu, nu).
        fxx: (T, nx, nx, nx), fux: (T, nx, nu, nx), fuu: (T, nx, nu, nu), or None (first order).
            fxx[t, i] is the Hessian of f_i in x; fux[t, i, a, b] = d2 f_i / du_a dx_b.
    """

    f: np.ndarray
    l: np.ndarray
    lf: float
    fx: np.ndarray
    fu: np.ndarray
    lx: np.ndarray
    lu: np.ndarray
    lxx: np.ndarray
    lux: np.ndarray
    luu: np.ndarray
    fxx: np.ndarray | None = None
    fux: np.ndarray | None = None
    fuu: np.ndarray | None = None

    @property
    def second_order(self) -> bool:
        return self.fxx is not None


def nan_derivatives(T: int, nx: int, nu: int, second_order: bool) -> DenseDerivatives:
    """Derivatives of the right shapes, all NaN (a point where the functions could not be evaluated)."""
    def nan(*shape):
        return np.full(shape, np.nan)

    kw = dict(fxx=nan(T, nx, nx, nx), fux=nan(T, nx, nu, nx), fuu=nan(T, nx, nu, nu)) if second_order else {}
    return DenseDerivatives(f=nan(T, nx), l=nan(T), lf=float("nan"), fx=nan(T, nx, nx), fu=nan(T, nx, nu),
                            lx=nan(T + 1, nx), lu=nan(T, nu), lxx=nan(T + 1, nx, nx), lux=nan(T, nu, nx),
                            luu=nan(T, nu, nu), **kw)


class Backend:
    """Evaluates one :class:`occore.Problem`'s functions. Subclasses implement ``step_values``
    (one stage, for the generic rollouts), ``terminal_value`` and ``derivatives``; they may override
    the rollouts with compiled versions.

    ``ps`` below is the (T+1, np) stage-parameter array (np = 0 when the problem has none).
    """

    name = "base"

    def __init__(self, problem):
        self.problem = problem
        self.nx, self.nu, self.T = problem.nx, problem.nu, problem.horizon

    # -- values ---------------------------------------------------------------------------------
    def step_values(self, x: np.ndarray, u: np.ndarray, t: int) -> tuple[np.ndarray, float]:
        """(f(x, u, p_t), l(x, u, p_t)) for one stage."""
        raise NotImplementedError

    def terminal_value(self, x: np.ndarray) -> float:
        raise NotImplementedError

    def rollout(self, us: np.ndarray) -> tuple[np.ndarray, float]:
        """States (T+1, nx) and total cost of the (already clamped) controls us (T, nu)."""
        xs = np.empty((self.T + 1, self.nx))
        xs[0] = self.problem.x0
        cost = 0.0
        for t in range(self.T):
            xs[t + 1], lt = self.step_values(xs[t], us[t], t)
            cost += lt
        return xs, cost + self.terminal_value(xs[-1])

    def rollout_policy(self, xs_ref, us_ref, k, K, alpha, lower, upper):
        """Closed-loop rollout u_t = clip(us_ref_t + alpha k_t + K_t (x_t - xs_ref_t), lower_t, upper_t).

        Returns (xs (T+1, nx), us (T, nu), cost)."""
        xs = np.empty((self.T + 1, self.nx))
        us = np.empty((self.T, self.nu))
        xs[0] = self.problem.x0
        cost = 0.0
        with np.errstate(invalid="ignore", over="ignore"):
            for t in range(self.T):
                u = us_ref[t] + alpha * k[t] + K[t] @ (xs[t] - xs_ref[t])
                if lower is not None:
                    u = np.minimum(np.maximum(u, lower[t]), upper[t])
                us[t] = u
                xs[t + 1], lt = self.step_values(xs[t], u, t)
                cost += lt
        return xs, us, cost + self.terminal_value(xs[-1])

    # -- derivatives ----------------------------------------------------------------------------
    def derivatives(self, xs: np.ndarray, us: np.ndarray, second_order: bool) -> DenseDerivatives:
        """All derivatives at the points (xs[t], us[t]), t < T, and xs[T], in one call."""
        raise NotImplementedError
