"""The augmented Hamiltonian of E-MSA for dense problems, and its stage-wise maximisation.

With H_t(x, p, u) = p . f_t(x, u) - l_t(x, u) and the current states xs and costates ps
(p_T = -dlf/dx, p_t = dH_t/dx(x_t, p_{t+1}, u_t)), stage t's augmented Hamiltonian at a control v is

    Ht_t(v) = H_t(x_t, p_{t+1}, v) - rho/2 |x_{t+1} - f_t(x_t, v)|^2 - rho/2 |p_t - g_t(v)|^2,
    g_t(v)  = dH_t/dx(x_t, p_{t+1}, v) = fx' p_{t+1} - lx        (Li, Chen, Tai & E, JMLR 2018).

Its derivatives in v, with the residuals r = x_{t+1} - f and s = p_t - g and the (nu, nx) matrix
G = dg/dv' = sum_i p_{t+1,i} fux_i - lux:

    dHt/dv   = fu' p_{t+1} - lu + rho fu' r + rho G s
    d2Ht/dv2 ~ sum_i (p_{t+1,i} + rho r_i) fuu_i - luu - rho fu' fu - rho G G'

The Hessian drops only rho s.d2g/dv2 (third derivatives of f and l), which vanishes where s = 0,
i.e. at the current controls, and for dynamics linear in x with costs quadratic in x.
All functions are vectorised over the horizon (arrays are time-major: (T, ...)).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .box_qp import box_qp

__all__ = ["METHODS", "augmented_hamiltonian", "maximize"]

_HALVINGS = 30   # backtracking halvings per inner iteration (a stage still failing keeps its control)

#: Inner methods for dense problems.
METHODS = ("newton", "gradient")


def augmented_hamiltonian(d, xs, ps, rho: float, hessian: bool = False):
    """Values, gradients (and optionally Hessians) of every stage's augmented Hamiltonian.

    Args:
        d: DenseDerivatives evaluated at the points (xs[t], v_t) (second order: needs fux, and fuu
            for ``hessian``).
        xs: (T+1, nx) states of the current trajectory.
        ps: (T+1, nx) costates of the current trajectory.
        rho: penalty weight (>= 0).
        hessian: also return the (T, nu, nu) Hessians (third-derivative term dropped).

    Returns:
        (values (T,), grads (T, nu)) or (values, grads, hess (T, nu, nu)).

    Example:
        >>> import numpy as np, occore
        >>> prob = occore.problems.make("lqr")
        >>> traj = prob.rollout(prob.initial_controls())
        >>> ps = prob.local_model(traj).costates()
        >>> d = prob.evaluate_derivatives(traj.xs, traj.us, second_order=True)
        >>> values, grads = augmented_hamiltonian(d, traj.xs, ps, rho=1.0)
        >>> values.shape, grads.shape
        ((100,), (100, 2))
    """
    p_next = ps[1:]
    T = d.fu.shape[0]
    r = xs[1:] - d.f                                               # (T, nx)
    g = np.einsum("tij,ti->tj", d.fx, p_next) - d.lx[:T]            # (T, nx)
    s = ps[:T] - g
    H = np.einsum("ti,ti->t", p_next, d.f) - d.l
    values = H - 0.5 * rho * (np.einsum("ti,ti->t", r, r) + np.einsum("ti,ti->t", s, s))
    G = np.einsum("ti,tiaj->taj", p_next, d.fux) - d.lux          # (T, nu, nx)
    grads = (np.einsum("tia,ti->ta", d.fu, p_next + rho * r) - d.lu
             + rho * np.einsum("taj,tj->ta", G, s))
    if not hessian:
        return values, grads
    hess = (np.einsum("ti,tiab->tab", p_next + rho * r, d.fuu) - d.luu
            - rho * np.einsum("tia,tib->tab", d.fu, d.fu) - rho * np.einsum("taj,tbj->tab", G, G))
    return values, grads, 0.5 * (hess + np.swapaxes(hess, 1, 2))


def _newton_directions(grads, hess, vs, lower, upper):
    """Ascent directions maximising each stage's quadratic model (Hessians made negative definite by
    flipping the sign of positive eigenvalues); a box QP per stage when bounded."""
    T, nu = grads.shape
    # -hess with its eigenvalues replaced by their absolute values (floored): positive definite,
    # and the Newton step itself where the stage's model is concave
    lam, V = np.linalg.eigh(-hess)
    scale = np.maximum(np.abs(lam).max(axis=1, keepdims=True), 1.0)
    lam = np.maximum(np.abs(lam), 1e-10 * scale)
    M = np.einsum("tij,tj,tkj->tik", V, lam, V)
    if lower is None:
        return np.linalg.solve(M, grads[..., None])[..., 0]
    if nu == 1:   # the box QP of one variable: the clipped Newton step
        return np.clip(grads / M[:, :, 0], lower - vs, upper - vs)
    dirs = np.empty((T, nu))
    for t in range(T):
        dirs[t] = box_qp(M[t], -grads[t], lower[t] - vs[t], upper[t] - vs[t], stage=t)[0]
    return dirs


def maximize(evaluate, xs, us, ps, rho: float, inner, lower=None, upper=None):
    """Maximise every stage's augmented Hamiltonian from ``us`` (all stages at once).

    Each inner iteration takes a projected ascent step per stage (Newton on the model above, or the
    gradient times ``inner.step_size``) and backtracks, stage by stage, until the stage's value rises
    (Armijo, 1e-4); a stage with no such step keeps its control. A stage's next inner iteration
    starts from twice its last accepted step length (at most 1).

    Args:
        evaluate: ``evaluate(vs) -> DenseDerivatives`` at (xs[t], vs[t]) with second-order terms.
        xs, ps: (T+1, nx) current states and costates.
        us: (T, nu) starting controls (not modified).
        rho: penalty weight.
        inner: object with ``method`` ("newton" or "gradient"), ``iterations``, ``step_size``.
        lower, upper: (T, nu) bounds or None.

    Returns:
        (T, nu) new controls.

    Raises:
        InputError: ``inner.method`` is not one of :data:`METHODS`.
    """
    method = getattr(inner, "method", None)
    if method not in METHODS:
        raise InputError(f"inner.method={method!r} is not supported by dense problems; "
                         f"supported methods are {', '.join(METHODS)}")
    vs = np.array(us, dtype=float)
    if lower is not None:
        vs = np.minimum(np.maximum(vs, lower), upper)
    with np.errstate(all="ignore"):
        values, grads, hess = augmented_hamiltonian(evaluate(vs), xs, ps, rho, hessian=True)
        alpha = np.ones(vs.shape[0])
        for _ in range(int(inner.iterations)):
            if method == "newton":
                # a stage whose derivatives are not finite gets no step (it keeps its control)
                bad = ~(np.isfinite(grads).all(axis=1) & np.isfinite(hess).all(axis=(1, 2)))
                g_ok = np.where(bad[:, None], 0.0, grads)
                h_ok = np.where(bad[:, None, None], -np.eye(grads.shape[1]), hess)
                dirs = _newton_directions(g_ok, h_ok, vs, lower, upper)
            else:
                dirs = float(inner.step_size) * grads
            dirs = np.where(np.isfinite(dirs), dirs, 0.0)
            alpha = np.minimum(1.0, 2.0 * alpha)   # each stage starts from twice its last step
            # a stage with no ascent direction (at rounding level) is at its maximum already
            slope = np.einsum("ta,ta->t", grads, dirs)
            pending = (slope > 0) & (np.abs(dirs).max(axis=1) > 1e-15 * (1.0 + np.abs(vs).max(axis=1)))
            if not pending.any():
                break
            moved = np.zeros_like(pending)
            before = values
            for _ in range(_HALVINGS):
                trial = vs + alpha[:, None] * dirs
                if lower is not None:
                    trial = np.minimum(np.maximum(trial, lower), upper)
                tv, tg, th = augmented_hamiltonian(evaluate(trial), xs, ps, rho, hessian=True)
                gain = np.einsum("ta,ta->t", grads, trial - vs)
                ok = pending & np.isfinite(tv) & (tv >= values + 1e-4 * gain) & (tv >= values)
                vs = np.where(ok[:, None], trial, vs)
                values = np.where(ok, tv, values)
                grads = np.where(ok[:, None], tg, grads)
                hess = np.where(ok[:, None, None], th, hess)
                moved |= ok
                pending &= ~ok
                alpha = np.where(pending, 0.5 * alpha, alpha)
                if not pending.any():
                    break
            if not moved.any() or np.all(values - before <= 1e-15 * (1.0 + np.abs(before))):
                break
    return vs
