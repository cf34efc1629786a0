"""Projected-Newton box QP (Bertsekas 1982, as used by control-limited DDP, Tassa, Mansard & Todorov 2014).

    minimise 1/2 k' H k + g' k   subject to  lower <= k <= upper
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import cho_solve

from ..errors import NotPositiveDefinite

__all__ = ["box_qp", "chol_solve"]


def box_qp(H, g, lower, upper, k0=None, max_iter: int = 100, tol: float = 1e-13, stage: int = -1):
    """Solve the box QP by projected Newton with an Armijo search along the projection arc.

    Args:
        H: (n, n) symmetric positive definite on the free set.
        g: (n,) linear term.
        lower, upper: (n,) bounds (may be -inf / inf), lower <= upper.
        k0: (n,) warm start (clamped into the box), zeros by default.
        stage: stage index reported by :class:`NotPositiveDefinite`.

    Returns:
        (k, free, L): solution (n,), boolean mask of the free (unclamped) coordinates and the Cholesky
        factor of H restricted to them (None when all are clamped).

    Raises:
        NotPositiveDefinite: when H on the free set cannot be factorised.

    Example:
        >>> import numpy as np
        >>> k, free, _ = box_qp(np.eye(2), np.array([-3.0, 1.0]), -np.ones(2), np.ones(2))
        >>> k.tolist(), free.tolist()
        ([1.0, -1.0], [False, True])
    """
    n = g.shape[0]
    k = np.zeros(n) if k0 is None else np.array(k0, dtype=float)
    k = np.minimum(np.maximum(k, lower), upper)

    def value(v):
        return 0.5 * v @ H @ v + g @ v

    free = np.ones(n, dtype=bool)
    L = None
    fk = value(k)
    for _ in range(max_iter):
        grad = g + H @ k
        clamped = ((k <= lower) & (grad > 0)) | ((k >= upper) & (grad < 0))
        free = ~clamped
        if not free.any():
            return k, free, None
        Hf = H[np.ix_(free, free)]
        try:
            L = np.linalg.cholesky(Hf)
        except np.linalg.LinAlgError as err:
            raise NotPositiveDefinite(stage) from err
        gf = grad[free]
        if np.linalg.norm(gf) < tol:
            break
        step = np.zeros(n)
        step[free] = -chol_solve(L, gf)
        expected = grad @ step
        if expected >= -tol * max(1.0, abs(fk)):
            break
        alpha, accepted = 1.0, False
        while alpha > 1e-10:
            cand = np.minimum(np.maximum(k + alpha * step, lower), upper)
            fc = value(cand)
            if fc - fk <= 0.1 * grad @ (cand - k):
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            break
        improvement = fk - fc
        k, fk = cand, fc
        if improvement < tol * max(1.0, abs(fk)):
            break
    # Recompute the free set and its factor at the final point (consistent with the returned k).
    grad = g + H @ k
    free = ~(((k <= lower) & (grad > 0)) | ((k >= upper) & (grad < 0)))
    if not free.any():
        return k, free, None
    try:
        L = np.linalg.cholesky(H[np.ix_(free, free)])
    except np.linalg.LinAlgError as err:
        raise NotPositiveDefinite(stage) from err
    return k, free, L


def chol_solve(L, b):
    """(L L')^-1 b for a lower Cholesky factor L (two triangular solves)."""
    return cho_solve((L, True), b, check_finite=False)
