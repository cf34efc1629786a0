"""Penalty terms of a problem's constraints for constrained DDP, vectorised over the horizon.

Every inequality c <= 0 (path constraints, state bounds, terminal inequalities) and every terminal
equality c = 0 adds a term phi(c) to the cost; CDDP minimises J + sum phi with the unchanged DDP
iteration and updates the terms' parameters in an outer loop. Two treatments of the inequalities:

augmented Lagrangian (Powell-Hestenes-Rockafellar; the AL-DDP of ALTRO, Howell, Jackson &
Manchester 2019), multiplier lam >= 0, penalty rho > 0:

    phi(c) = (max(0, lam + rho c)^2 - lam^2) / (2 rho),  phi' = w = max(0, lam + rho c),
    phi'' = rho where w > 0;  update lam <- w;

log barrier (interior point; the feasible-start barrier DDP of Pavlov, Shames & Manzie 2021
without slack variables), barrier parameter mu > 0, iterates strictly feasible:

    phi(c) = -mu log(-c),  phi' = w = mu / (-c) (the dual estimate),  phi'' = mu / c^2;  mu -> 0.

The terminal equalities always use the augmented Lagrangian, phi(c) = lam c + rho c^2 / 2,
phi' = lam + rho c, phi'' = rho. :func:`augment` adds the terms' first and second derivatives to a
:class:`DenseDerivatives`' cost derivatives, so that the unchanged Riccati sweep (numpy or C) runs
on J + sum phi: with constraint Jacobians cx, cu and D = diag(phi''),

    lx += cx' w     lu += cu' w     lxx += cx' D cx    lux += cu' D cx    luu += cu' D cu
    (+ sum_i w_i d2c_i, the constraint curvature, when the derivatives are second order).

Example:
    >>> import numpy as np
    >>> from occore.constraints import ConstraintSet
    >>> cs = ConstraintSet.build(T=1, nx=1, x_lower=None, x_upper=None, ng=0, nh=1, nhi=0)
    >>> vals = cs.values(np.zeros((2, 1)), None, np.array([2.0]))
    >>> m = Multipliers.zeros(cs, penalty=1.0)
    >>> merit_terms(vals, m)            # rho c^2 / 2 for c = 2
    2.0
    >>> update(vals, m).h.tolist()      # lam + rho c
    [2.0]
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["Multipliers", "merit_terms", "augment", "update", "multiplier_change", "barrier_duals", "INFEASIBLE"]

#: merit of a trial that leaves the interior (barrier): finite, so the line search backtracks
#: from it like from any worse trial rather than treating it as a numerical failure
INFEASIBLE = 1e300


@dataclass(frozen=True)
class Multipliers:
    """Multipliers of every constraint and the parameters of the penalty terms (the shapes of
    :class:`occore.constraints.ConstraintValues`).

    Attributes:
        g: (T, ng) path constraints.  upper, lower: (T+1, n_upper), (T+1, n_lower) state bounds
            of the bounded components (row 0 unused).
        h: (nh + nhi,) terminal constraints, equalities first.  nh: number of equalities.
        penalty: rho > 0 of the augmented-Lagrangian terms.
        barrier: mu > 0 when the inequalities use the log barrier (their multipliers are then the
            dual estimates mu / -c of the last update; those of a converged solve
            :func:`barrier_duals`), 0.0 for the augmented Lagrangian.
        violation: the largest constraint violation when these multipliers were computed (inf for
            the initial ones); the penalty rule compares the next violation with it.

    Example:
        >>> import occore
        >>> res = occore.CDDP().solve(occore.problems.make("pendulum_terminal"))
        >>> m = res.multipliers      # the terminal equalities' multipliers (x_T = goal: 2 rows)
        >>> m.h.shape, m.nh, m.g.shape
        ((2,), 2, (50, 0))
    """

    g: np.ndarray
    upper: np.ndarray
    lower: np.ndarray
    h: np.ndarray
    nh: int
    penalty: float
    barrier: float = 0.0
    violation: float = float("inf")

    @classmethod
    def zeros(cls, constraints, penalty: float, barrier: float = 0.0) -> "Multipliers":
        """Zero multipliers for a :class:`occore.constraints.ConstraintSet`."""
        T1 = constraints.x_lower.shape[0]
        return cls(g=np.zeros((T1 - 1, constraints.ng)), upper=np.zeros((T1, constraints.upper_index.size)),
                   lower=np.zeros((T1, constraints.lower_index.size)), h=np.zeros(constraints.nh + constraints.nhi),
                   nh=constraints.nh, penalty=float(penalty), barrier=float(barrier))

    def shifted(self) -> "Multipliers":
        """The multipliers one stage later (receding horizon): stage t takes stage t+1's, the last
        stage keeps its own."""
        def shift(a):
            return np.concatenate([a[1:], a[-1:]]) if a.shape[0] else a
        return replace(self, g=shift(self.g), upper=shift(self.upper), lower=shift(self.lower))


def _pairs(values, m: Multipliers):
    """(values, multipliers) of the inequality blocks: path, upper and lower state bounds, terminal."""
    return ((values.g, m.g), (values.upper, m.upper), (values.lower, m.lower), (values.hi, m.h[m.nh:]))


def _weights(c, lam, m: Multipliers):
    """(w, phi'') of inequality values c with multipliers lam (row 0 of the state bounds, -inf, gives 0)."""
    if not c.size:
        return c, c
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if m.barrier:
            s = -c
            w = np.where(s < np.inf, m.barrier / s, 0.0)
            return w, w / s
        w = np.maximum(lam + m.penalty * c, 0.0)
        return w, m.penalty * (w > 0.0)


def merit_terms(values, m: Multipliers) -> float:
    """sum of phi over all constraints, for :class:`ConstraintValues` ``values``; :data:`INFEASIBLE`
    when a barrier'd inequality is not strictly satisfied, inf on overflow."""
    total = 0.0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for c, lam in _pairs(values, m):
            if not c.size:
                continue
            if m.barrier:
                if not np.max(c) < 0.0:
                    return INFEASIBLE
                total -= m.barrier * float(np.sum(np.log(-c[c > -np.inf])))
            else:    # row 0 of the state bounds is -inf with lam = 0: phi = 0
                w = np.maximum(lam + m.penalty * c, 0.0)
                total += float(np.sum(w * w - lam * lam)) / (2.0 * m.penalty)
        if m.nh:
            total += float(m.h[:m.nh] @ values.h + 0.5 * m.penalty * values.h @ values.h)
    return total


def update(values, m: Multipliers) -> Multipliers:
    """The multipliers at ``values``: lam <- phi'(c) for every constraint (for the barrier, the dual
    estimates mu / -c; the barrier parameter itself is the caller's)."""
    g, up, lo, hi = (_weights(c, lam, m)[0] for c, lam in _pairs(values, m))
    h = np.concatenate([m.h[:m.nh] + m.penalty * values.h, hi])
    return replace(m, g=g, upper=up, lower=lo, h=h, violation=values.violation())


def multiplier_change(new: Multipliers, old: Multipliers) -> float:
    """Largest |lam_new - lam_old| / rho over all constraints, ``new = update(values, old)``
    (augmented Lagrangian). For an inequality it is |max(c, -lam / rho)|, the violation of
    feasibility and complementarity together (Birgin & Martinez 2014, "Practical augmented
    Lagrangian methods", eq. 4.8): positive where c > 0, but also where the constraint holds
    strictly while its multiplier is still positive (the inner solve kept x off a constraint that
    is not active); for an equality it is |h|. 0.0 when there are no constraints."""
    worst = 0.0
    for a, b in ((new.g, old.g), (new.upper, old.upper), (new.lower, old.lower), (new.h, old.h)):
        if a.size:
            worst = max(worst, float(np.max(np.abs(a - b))))
    return float("inf") if np.isnan(worst) else worst / old.penalty


def barrier_duals(values, m: Multipliers, d, dxs: np.ndarray, dus: np.ndarray, upper_index,
                  lower_index) -> Multipliers:
    """The inequality multipliers of a converged barrier solve: the duals of its last LQ
    subproblem, lam = max(0, w + phi''(c) dc) with w = mu / -c, phi'' = mu / c^2 and dc the
    constraints' change along the subproblem's step (dxs, dus) (the primal-dual linearisation).

    The estimate w = mu / -c alone is ill-conditioned as mu -> 0: along the constraint normal the
    barrier's curvature mu / c^2 is so large that an inner solve stops (its expected decrease below
    tol) with -c off by a fraction of itself, and w with it (on the cart-pole track at mu = 1e-11,
    by more than 100%). The step's change of w is what the quadratic model needs to be stationary,
    so the sum is the multiplier of the model's KKT point. The terminal equalities keep their
    augmented-Lagrangian update (:func:`update`).

    Args:
        values: :class:`~occore.constraints.ConstraintValues` at the iterate; ``m``: its
            (barrier) multipliers; ``d``: the :class:`DenseDerivatives` there (constraint Jacobians).
        dxs, dus: (T+1, nx), (T, nu): the step of the subproblem (linear rollout of its policy).
        upper_index, lower_index: the bounded state components.
    """
    out = update(values, m)
    if not m.barrier:
        return out

    def corrected(c, lam_old, dc):
        w, D = _weights(c, lam_old, m)
        return np.maximum(w + np.where(D > 0.0, D * dc, 0.0), 0.0) if c.size else c
    g = out.g
    if d.g is not None and d.g.shape[1]:
        dg = np.einsum("tia,ta->ti", d.gx, dxs[:-1]) + np.einsum("tia,ta->ti", d.gu, dus)
        g = corrected(values.g, m.g, dg)
    upper = corrected(values.upper, m.upper, dxs[:, upper_index]) if upper_index.size else out.upper
    lower = corrected(values.lower, m.lower, -dxs[:, lower_index]) if lower_index.size else out.lower
    h = out.h
    if d.h is not None and d.h.shape[0] > m.nh:
        h = np.concatenate([out.h[:m.nh], corrected(values.hi, m.h[m.nh:], d.hx[m.nh:] @ dxs[-1])])
    return replace(out, g=g, upper=upper, lower=lower, h=h)


def augment(d, values, m: Multipliers, upper_index, lower_index):
    """A copy of DenseDerivatives ``d`` whose cost derivatives are those of J + sum phi at the same
    trajectory (``values``: its :class:`ConstraintValues`; ``upper_index``, ``lower_index``: the
    bounded state components, :class:`occore.constraints.ConstraintSet`'s); ``d`` is not modified.

    The path constraints' terms come from their stacked Jacobian J = [gx gu] (T, ng, nx+nu):
    J' w and J' D J in one product each, split into the x and u blocks."""
    nh = m.nh
    T, nx, _ = d.fu.shape
    lx, lxx = d.lx.copy(), d.lxx.copy()
    lu, lux, luu = d.lu, d.lux, d.luu
    for index, c, lam, sign in ((upper_index, values.upper, m.upper, 1.0), (lower_index, values.lower, m.lower, -1.0)):
        if index.size:    # state bounds: c = +-(x_j - bound), Jacobian +-e_j
            w, D = _weights(c, lam, m)
            lx[:, index] += sign * w
            lxx[:, index, index] += D
    if d.g is not None and d.g.shape[1]:
        w, D = _weights(values.g, m.g, m)
        J = np.concatenate([d.gx, d.gu], axis=2)
        G = np.einsum("tia,ti->ta", J, w)
        H = np.einsum("tia,tib->tab", J, D[:, :, None] * J)
        lx[:T] += G[:, :nx]
        lxx[:T] += H[:, :nx, :nx]
        lu = lu + G[:, nx:]
        lux = lux + H[:, nx:, :nx]
        luu = luu + H[:, nx:, nx:]
        if d.gxx is not None:     # constraint curvature (second-order model)
            lxx[:T] += np.einsum("ti,tiab->tab", w, d.gxx)
            lux += np.einsum("ti,tiab->tab", w, d.gux)
            luu += np.einsum("ti,tiab->tab", w, d.guu)
    if d.h is not None and d.h.shape[0]:
        wi, Di = _weights(values.hi, m.h[nh:], m)
        w = np.concatenate([m.h[:nh] + m.penalty * values.h, wi])
        D = np.concatenate([np.full(nh, m.penalty), Di])
        lx[T] += d.hx.T @ w
        lxx[T] += d.hx.T @ (D[:, None] * d.hx)
        if d.hxx is not None:
            lxx[T] += np.einsum("i,iab->ab", w, d.hxx)
    return d.with_cost_derivatives(lx, lu, lxx, lux, luu)
