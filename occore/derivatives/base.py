"""The horizon-stacked local model data and the backend interface.

A backend turns the user's callables into (a) values along a rollout and (b) all derivatives of
the whole horizon in one call. Shapes follow DESIGN.md: time-major and stacked, Jacobians with
outputs on rows (fx[t][i, j] = d f_i / d x_j).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

__all__ = ["DenseDerivatives", "Backend", "stacked_fields", "from_fields", "from_stacked", "nan_derivatives"]


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
        g: (T, ng) path constraint values, gx: (T, ng, nx), gu: (T, ng, nu); with second order
            also gxx (T, ng, nx, nx), gux (T, ng, nu, nx), guu (T, ng, nu, nu). None without path
            constraints.
        h: (nh + nhi,) terminal constraint values [equalities; inequalities], hx: (nh + nhi, nx),
            with second order hxx (nh + nhi, nx, nx). None without terminal constraints.
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
    g: np.ndarray | None = None
    gx: np.ndarray | None = None
    gu: np.ndarray | None = None
    gxx: np.ndarray | None = None
    gux: np.ndarray | None = None
    guu: np.ndarray | None = None
    h: np.ndarray | None = None
    hx: np.ndarray | None = None
    hxx: np.ndarray | None = None

    @property
    def second_order(self) -> bool:
        return self.fxx is not None

    def with_cost_derivatives(self, lx, lu, lxx, lux, luu) -> "DenseDerivatives":
        """A copy with these cost derivatives, the other fields shared (``dataclasses.replace``
        without its field-by-field constructor call: CDDP makes one per iteration)."""
        new = copy.copy(self)
        for name, value in (("lx", lx), ("lu", lu), ("lxx", lxx), ("lux", lux), ("luu", luu)):
            object.__setattr__(new, name, value)
        return new


#: the DenseDerivatives fields that only the second-order model has
SECOND_ORDER_FIELDS = ("fxx", "fux", "fuu", "gxx", "gux", "guu", "hxx")


def stacked_fields(v, J, H, vT, gT, HT, nx: int, cat, contiguous) -> dict:
    """The :class:`DenseDerivatives` fields (second order included; ``lf`` a 0-d array) from the
    derivatives of the stacked stage function [f; l; g] of z = [x; u] and terminal function
    [lf; h; h_I] of x: values v (T, nx+1+ng), Jacobians J (T, nx+1+ng, n), Hessians H
    (T, nx+1+ng, n, n); terminal vT (1+nterm,), gT (1+nterm, nx), HT (1+nterm, nx, nx). ``cat``
    (a list along axis 0) and ``contiguous`` are the array library's (numpy, or torch inside the
    torch backend's compiled derivative function, so that one call returns every field laid out)."""
    c = contiguous
    kw = dict(f=c(v[:, :nx]), l=c(v[:, nx]), lf=vT[0], fx=c(J[:, :nx, :nx]), fu=c(J[:, :nx, nx:]),
              lx=cat([J[:, nx, :nx], gT[:1]]), lu=c(J[:, nx, nx:]), lxx=cat([H[:, nx, :nx, :nx], HT[:1]]),
              lux=c(H[:, nx, nx:, :nx]), luu=c(H[:, nx, nx:, nx:]),
              fxx=c(H[:, :nx, :nx, :nx]), fux=c(H[:, :nx, nx:, :nx]), fuu=c(H[:, :nx, nx:, nx:]))
    if v.shape[1] > nx + 1:      # path constraints
        g = slice(nx + 1, None)
        kw.update(g=c(v[:, g]), gx=c(J[:, g, :nx]), gu=c(J[:, g, nx:]),
                  gxx=c(H[:, g, :nx, :nx]), gux=c(H[:, g, nx:, :nx]), guu=c(H[:, g, nx:, nx:]))
    if vT.shape[0] > 1:          # terminal constraints
        kw.update(h=c(vT[1:]), hx=c(gT[1:]), hxx=c(HT[1:]))
    return kw


def from_fields(fields: dict, second_order: bool) -> DenseDerivatives:
    """DenseDerivatives of numpy :func:`stacked_fields` (the second-order ones dropped unless
    ``second_order``)."""
    kw = {k: np.ascontiguousarray(a) for k, a in fields.items() if k != "lf" and (second_order or k not in SECOND_ORDER_FIELDS)}
    return DenseDerivatives(lf=float(fields["lf"]), **kw)


def from_stacked(v, J, H, vT, gT, HT, nx: int, second_order: bool) -> DenseDerivatives:
    """DenseDerivatives from the stacked derivatives of :func:`stacked_fields` (numpy arrays; the
    finite-difference backend computes exactly these)."""
    return from_fields(stacked_fields(v, J, H, vT, gT, HT, nx, np.concatenate, np.ascontiguousarray),
                       second_order)


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
    the rollouts with compiled versions. With constraints they also implement
    ``constraint_step_values`` and ``terminal_constraint_values`` (and may override
    ``constraint_values``), and set ``ng`` and ``nterm`` (sizes of the path and the stacked terminal
    constraint vectors, 0 when absent) while tracing the user's functions.

    ``ps`` below is the (T+1, np) stage-parameter array (np = 0 when the problem has none). Rollouts
    take the initial state ``x0`` (nx,) as an argument, so problems that differ only in x0 share one
    backend (:meth:`occore.Problem.with_initial_state`).
    """

    name = "base"

    def __init__(self, problem):
        self.problem = problem
        self.nx, self.nu, self.T = problem.nx, problem.nu, problem.horizon
        self.ng = 0       # path constraints per stage
        self.nterm = 0    # stacked terminal constraints [h; h_I]
        self.nh = 0       # of which equalities

    # -- values ---------------------------------------------------------------------------------
    def step_values(self, x: np.ndarray, u: np.ndarray, t: int) -> tuple[np.ndarray, float]:
        """(f(x, u, p_t), l(x, u, p_t)) for one stage."""
        raise NotImplementedError

    def terminal_value(self, x: np.ndarray) -> float:
        raise NotImplementedError

    def constraint_step_values(self, x: np.ndarray, u: np.ndarray, t: int) -> np.ndarray:
        """g(x, u, p_t), (ng,), for one stage."""
        raise NotImplementedError

    def terminal_constraint_values(self, x: np.ndarray) -> np.ndarray:
        """[h(x, p_T); h_I(x, p_T)], (nterm,)."""
        raise NotImplementedError

    def constraint_values(self, xs: np.ndarray, us: np.ndarray):
        """(G (T, ng) or None, terminal (nterm,) or None) along a trajectory (values only)."""
        G = None
        if self.ng:
            G = np.array([self.constraint_step_values(xs[t], us[t], t) for t in range(self.T)]).reshape(self.T, self.ng)
        H = self.terminal_constraint_values(xs[self.T]) if self.nterm else None
        return G, H

    def rollout(self, us: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray, float]:
        """States (T+1, nx) and total cost of the (already clamped) controls us (T, nu) from x0."""
        xs = np.empty((self.T + 1, self.nx))
        xs[0] = x0
        cost = 0.0
        for t in range(self.T):
            xs[t + 1], lt = self.step_values(xs[t], us[t], t)
            cost += lt
        return xs, cost + self.terminal_value(xs[-1])

    def rollout_policy(self, xs_ref, us_ref, k, K, alpha, lower, upper, x0, shift=None):
        """Closed-loop rollout u_t = clip(us_ref_t + alpha k_t + K_t (x_t - xs_ref_t), lower_t, upper_t),
        x_{t+1} = f(x_t, u_t) + shift_t from x_0 = x0 (``shift`` (T, nx): None for zeros; FDDP's
        partly closed gaps).

        Returns (xs (T+1, nx), us (T, nu), cost)."""
        xs = np.empty((self.T + 1, self.nx))
        us = np.empty((self.T, self.nu))
        xs[0] = x0
        cost = 0.0
        with np.errstate(invalid="ignore", over="ignore"):
            for t in range(self.T):
                u = us_ref[t] + alpha * k[t] + K[t] @ (xs[t] - xs_ref[t])
                if lower is not None:
                    u = np.minimum(np.maximum(u, lower[t]), upper[t])
                us[t] = u
                xs[t + 1], lt = self.step_values(xs[t], u, t)
                if shift is not None:
                    xs[t + 1] += shift[t]
                cost += lt
        return xs, us, cost + self.terminal_value(xs[-1])

    # -- derivatives ----------------------------------------------------------------------------
    def derivatives(self, xs: np.ndarray, us: np.ndarray, second_order: bool) -> DenseDerivatives:
        """All derivatives at the points (xs[t], us[t]), t < T, and xs[T], in one call (with the
        constraints' when the problem has any)."""
        raise NotImplementedError
