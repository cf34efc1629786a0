"""Finite-difference backend: the user's callables are written with numpy, differentiated by central
differences.

The differencing routine :func:`central_differences` is generic: it differentiates any batched
"value function" ``fun(points (B, K, n)) -> values (B, K, m)`` at B base points at once (one call of
``fun`` for all perturbed points of all base points), so it serves this backend (B = T stages) and
:func:`occore.check_derivatives` (values through any backend's numeric ``step_values``).

Step sizes: h = eps^(1/3) max(1, |z_j|) for first derivatives (central difference: truncation
O(h^2), rounding O(eps/h), both ~ eps^(2/3) ~ 4e-11 relative) and h = eps^(1/4) max(1, |z_j|) for
second derivatives (truncation O(h^2), rounding O(eps/h^2), both ~ eps^(1/2) ~ 1.5e-8 relative);
each step is rounded so that z + h is exactly representable.

Vectorisation: the user's functions are written for one point (x (nx,), u (nu,)). Many numpy
functions written with indexing and elementwise operations (``x[0] * np.sin(x[2])``, ``A @ x``,
``np.stack``) also accept a batch of points as trailing columns, x (nx, N). At construction the
backend probes this on a few distinct points and compares with the one-point results; when they
agree the derivatives evaluate all perturbed points of the horizon in one call of each function,
otherwise (or whenever a batched call returns a wrong shape) one point at a time.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import DerivativeError, ShapeError
from .base import Backend, from_stacked

__all__ = ["FiniteDifferenceBackend", "central_differences", "JACOBIAN_STEP", "HESSIAN_STEP"]

log = logging.getLogger("occore")

_EPS = np.finfo(np.float64).eps
#: relative step of the first-derivative differences, eps^(1/3)
JACOBIAN_STEP = _EPS ** (1.0 / 3.0)
#: relative step of the second-derivative differences, eps^(1/4)
HESSIAN_STEP = _EPS ** (1.0 / 4.0)


def _steps(Z: np.ndarray, rel: float, scaled: bool = True) -> np.ndarray:
    """Steps (B, n) rel * max(1, |z|) (rel when not ``scaled``), rounded so that z + h is exactly
    representable."""
    h = rel * np.maximum(1.0, np.abs(Z)) if scaled else np.full(Z.shape, rel)
    return (Z + h) - Z


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    j, k = np.triu_indices(n, 1)
    return j, k


def central_differences(fun, Z, hessian: bool = True, jacobian_step: float = JACOBIAN_STEP,
                        hessian_step: float = HESSIAN_STEP, scaled: bool = True):
    """Values, Jacobians and Hessians of a batched function by central differences.

    ``fun`` is called once, with every perturbed point of every base point:
    1 + 2n points per base point for the Jacobian, plus 2n + 2n(n-1) for the Hessian (diagonal
    by the 3-point formula, off-diagonal by the 4-point cross formula).

    Args:
        fun: callable ``fun(points) -> values`` with points (B, K, n) and values (B, K, m); row b
            of the points belongs to base point b (so ``fun`` may depend on b, e.g. on the stage).
        Z: (B, n) base points.
        hessian: also compute the Hessians.
        jacobian_step, hessian_step: relative steps (scaled by max(1, |z_j|)).
        scaled: False for absolute steps (``jacobian_step``, ``hessian_step`` as they are).

    Returns:
        (values (B, m), jacobians (B, m, n), hessians (B, m, n, n) or None).

    Example:
        >>> import numpy as np
        >>> from occore.derivatives.finite_difference import central_differences
        >>> fun = lambda P: np.stack([P[..., 0] ** 2 * P[..., 1], np.sin(P[..., 1])], axis=-1)
        >>> v, J, H = central_differences(fun, np.array([[1.0, 2.0]]))
        >>> np.round(J[0], 6).tolist(), np.round(H[0, 0], 4).tolist()
        ([[4.0, 1.0], [0.0, -0.416147]], [[4.0, 2.0], [2.0, 0.0]])
    """
    Z = np.asarray(Z, dtype=np.float64)
    B, n = Z.shape
    eye = np.eye(n)
    h1 = _steps(Z, jacobian_step, scaled)                                     # (B, n)
    blocks = [Z[:, None, :],
              Z[:, None, :] + eye[None] * h1[:, None, :],              # +h e_j
              Z[:, None, :] - eye[None] * h1[:, None, :]]              # -h e_j
    if hessian:
        h2 = _steps(Z, hessian_step, scaled)
        j, k = _pairs(n)
        S = np.zeros((4, j.size, n))                                   # (++, +-, -+, --) e_j, e_k
        for s, (a, b) in enumerate(((1, 1), (1, -1), (-1, 1), (-1, -1))):
            S[s, np.arange(j.size), j] = a
            S[s, np.arange(j.size), k] = b
        blocks += [Z[:, None, :] + eye[None] * h2[:, None, :],
                   Z[:, None, :] - eye[None] * h2[:, None, :],
                   Z[:, None, :] + S.reshape(-1, n)[None] * h2[:, None, :]]
    sizes = [b.shape[1] for b in blocks]
    V = np.asarray(fun(np.concatenate(blocks, axis=1)), dtype=np.float64)   # (B, K, m)
    if V.ndim != 3 or V.shape[:2] != (B, sum(sizes)):
        raise ShapeError("fun", (B, sum(sizes), "m"), V.shape, "values of every perturbed point")
    parts = np.split(V, np.cumsum(sizes)[:-1], axis=1)
    v0 = parts[0][:, 0]                                                # (B, m)
    J = (parts[1] - parts[2]).transpose(0, 2, 1) / (2.0 * h1[:, None, :])
    H = None
    if hessian:
        m = V.shape[2]
        H = np.empty((B, m, n, n))
        diag = (parts[3] - 2.0 * v0[:, None, :] + parts[4]) / (h2 * h2)[:, :, None]   # (B, n, m)
        H[:, :, np.arange(n), np.arange(n)] = diag.transpose(0, 2, 1)
        if j.size:
            C = parts[5].reshape(B, 4, j.size, m)
            cross = (C[:, 0] - C[:, 1] - C[:, 2] + C[:, 3]) / (4.0 * h2[:, j] * h2[:, k])[:, :, None]
            H[:, :, j, k] = cross.transpose(0, 2, 1)
            H[:, :, k, j] = H[:, :, j, k]
    return v0, J, H


def _as_values(argument: str, value, expected: tuple) -> np.ndarray:
    """The user function's output as a float64 array of shape ``expected``, or a typed error."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DerivativeError(f"{argument} returned {type(value).__name__}, which is not numeric "
                              f"(backend 'finite_difference' needs numpy operations)") from err
    if arr.shape != expected and not (expected == () and arr.size == 1):
        raise ShapeError(argument, expected, arr.shape, "the state is a 1-D array; costs must be scalars")
    return arr.reshape(expected)


def _as_vector(argument: str, value) -> np.ndarray:
    """A constraint function's output as a 1-D float64 array with at least one value."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DerivativeError(f"{argument} returned {type(value).__name__}, which is not numeric "
                              f"(backend 'finite_difference' needs numpy operations)") from err
    if arr.ndim > 1 or arr.size == 0:
        raise ShapeError(argument, "(m,) with m >= 1", arr.shape, "constraints are a 1-D array")
    return arr.reshape(-1)


class FiniteDifferenceBackend(Backend):
    """Central finite differences of numpy callables (no symbolic or automatic differentiation).

    The user's functions receive 1-D float64 arrays: f(x (nx,), u (nu,)[, p (np,)]) -> (nx,),
    l(x, u[, p]) -> scalar, lf(x[, p]) -> scalar. Derivatives are accurate to about 1e-10
    (first) and 1e-7 (second) relative; see :func:`central_differences` for the steps.

    Args:
        problem: the :class:`occore.Problem` whose functions to evaluate.

    Raises:
        ShapeError: a function returns the wrong shape (named "dynamics", "stage_cost" or
            "terminal_cost", with the expected and actual shapes).
        DerivativeError: a function raises or returns something that is not numeric.

    Example:
        >>> import numpy as np, occore
        >>> prob = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: x @ x + u @ u,
        ...                       lambda x: 10 * x @ x, x0=[1.0], nu=1, horizon=20,
        ...                       backend="finite_difference")
        >>> res = occore.ILQR().solve(prob)
        >>> res.converged, round(res.cost, 6)
        (True, 10.502848)
    """

    name = "finite_difference"

    def __init__(self, problem):
        super().__init__(problem)
        nx, nu, T = self.nx, self.nu, self.T
        self.npar = npar = problem.params.shape[1] if problem.params is not None else 0
        self.P = np.zeros((T + 1, npar))
        if npar:
            self.P[:] = problem.params
        self._user = (problem.dynamics, problem.stage_cost, problem.terminal_cost)
        self._constraints = {name: getattr(problem, name) for name in
                             ("path_constraints", "terminal_constraints", "terminal_inequalities")
                             if getattr(problem, name) is not None}
        x, u = np.array(problem.x0, dtype=np.float64), np.zeros(nu)
        self._eval("dynamics", (nx,), x, u, self.P[0])
        self._eval("stage_cost", (), x, u, self.P[0])
        self._eval("terminal_cost", (), x, None, self.P[T])
        if "path_constraints" in self._constraints:
            self.ng = self._eval("path_constraints", None, x, u, self.P[0]).size
        for name in ("terminal_constraints", "terminal_inequalities"):
            if name in self._constraints:
                m = self._eval(name, None, x, None, self.P[T]).size
                self.nterm += m
                self.nh = m if name == "terminal_constraints" else self.nh
        self.batched = self._probe_batching()
        log.debug("finite_difference backend: %s evaluation", "batched" if self.batched else "point-by-point")

    # -- calling the user's functions -------------------------------------------------------------
    def _raw(self, argument, x, u, p):
        f, l, lf = self._user
        extra = (p,) if self.npar else ()
        if argument == "dynamics":
            return f(x, u, *extra)
        if argument == "stage_cost":
            return l(x, u, *extra)
        if argument == "terminal_cost":
            return lf(x, *extra)
        if argument == "path_constraints":
            return self._constraints[argument](x, u, *extra)
        return self._constraints[argument](x, *extra)

    def _eval(self, argument, expected, x, u, p):
        """One call of a user function on copies of its arguments, checked."""
        try:
            value = self._raw(argument, x.copy(), None if u is None else u.copy(), p.copy())
        except (ShapeError, DerivativeError):
            raise
        except Exception as err:  # noqa: BLE001 - report which user function failed and why
            raise DerivativeError(f"{argument} could not be evaluated on numpy arrays: "
                                  f"{type(err).__name__}: {err}") from err
        if expected is None:       # a constraint vector: (m,) with m >= 1 (a scalar is one value)
            return _as_vector(argument, value)
        return _as_values(argument, value, expected)

    def _batch(self, X, U, P):
        """f, l and g at N points given as columns, X (nx, N), U (nu, N), P (np, N): (nx, N), (N,),
        (ng, N) (None without path constraints); None when the functions do not vectorise this way."""
        N = X.shape[1]
        try:
            with np.errstate(all="ignore"):
                F = np.asarray(self._raw("dynamics", X, U, P), dtype=np.float64)
                L = np.asarray(self._raw("stage_cost", X, U, P), dtype=np.float64)
                G = np.asarray(self._raw("path_constraints", X, U, P), dtype=np.float64) if self.ng else None
        except Exception as err:  # noqa: BLE001 - a function that does not vectorise: point by point
            log.debug("finite_difference backend: functions do not take batches (%s: %s); "
                      "evaluating point by point", type(err).__name__, err)
            return None
        if F.shape != (self.nx, N) or L.shape != (N,) or (G is not None and G.shape != (self.ng, N)):
            return None
        return F, L, G

    def _probe_batching(self) -> bool:
        """Whether batched evaluation reproduces the one-point values on a few distinct points."""
        nx, nu = self.nx, self.nu
        N = max(nx, nu, self.npar) + 3
        rng = np.random.default_rng(0)
        X = self.problem.x0[:, None] + 0.1 * rng.standard_normal((nx, N))
        U = 0.1 * rng.standard_normal((nu, N))
        P = np.repeat(self.P[:1].T, N, axis=1)
        out = self._batch(X, U, P)
        if out is None:
            return False
        for i in range(N):
            try:
                with np.errstate(all="ignore"):
                    f = self._eval("dynamics", (nx,), X[:, i], U[:, i], P[:, i])
                    l = self._eval("stage_cost", (), X[:, i], U[:, i], P[:, i])
                    g = self._eval("path_constraints", None, X[:, i], U[:, i], P[:, i]) if self.ng else None
            except (ShapeError, DerivativeError):
                return False
            if not (np.allclose(out[0][:, i], f, rtol=1e-12, atol=1e-300, equal_nan=True)
                    and np.allclose(out[1][i], l, rtol=1e-12, atol=1e-300, equal_nan=True)
                    and (g is None or np.allclose(out[2][:, i], g, rtol=1e-12, atol=1e-300, equal_nan=True))):
                return False
        return True

    def _stage_values(self, points):
        """[f; l; g] at points (T, K, n) of the stages: (T, K, nx+1+ng)."""
        T, K, n = points.shape
        nx, ng = self.nx, self.ng
        if self.batched:
            flat = points.reshape(T * K, n).T
            P = np.repeat(self.P[:T], K, axis=0).T                      # (np, T*K)
            out = self._batch(np.ascontiguousarray(flat[:nx]), np.ascontiguousarray(flat[nx:]), P)
            if out is not None:
                parts = [out[0].T, out[1][:, None]] + ([out[2].T] if ng else [])
                return np.concatenate(parts, axis=1).reshape(T, K, nx + 1 + ng)
            log.debug("finite_difference backend: batched evaluation failed; point by point from now on")
            self.batched = False
        V = np.empty((T, K, nx + 1 + ng))
        for t in range(T):
            for i in range(K):
                x, u = points[t, i, :nx], points[t, i, nx:]
                V[t, i, :nx], V[t, i, nx] = self.step_values(x, u, t)
                if ng:
                    V[t, i, nx + 1:] = self.constraint_step_values(x, u, t)
        return V

    def _terminal_values(self, points):
        """[lf; h; h_I] at points (1, K, nx): (1, K, 1 + nterm)."""
        V = np.empty(points.shape[:2] + (1 + self.nterm,))
        for i, x in enumerate(points[0]):
            V[0, i, 0] = self.terminal_value(x)
            if self.nterm:
                V[0, i, 1:] = self.terminal_constraint_values(x)
        return V

    # -- values -----------------------------------------------------------------------------------
    def step_values(self, x, u, t):
        f, l, _ = self._user
        extra = (self.P[t].copy(),) if self.npar else ()
        x, u = np.array(x, dtype=np.float64), np.array(u, dtype=np.float64)
        return (np.asarray(f(x.copy(), u.copy(), *extra), dtype=np.float64).reshape(self.nx),
                float(np.asarray(l(x, u, *extra), dtype=np.float64).reshape(())))

    def terminal_value(self, x):
        extra = (self.P[self.T].copy(),) if self.npar else ()
        return float(np.asarray(self._user[2](np.array(x, dtype=np.float64), *extra),
                                dtype=np.float64).reshape(()))

    def constraint_step_values(self, x, u, t):
        extra = (self.P[t].copy(),) if self.npar else ()
        x, u = np.array(x, dtype=np.float64), np.array(u, dtype=np.float64)
        return np.asarray(self._constraints["path_constraints"](x, u, *extra), dtype=np.float64).reshape(self.ng)

    def terminal_constraint_values(self, x):
        extra = (self.P[self.T].copy(),) if self.npar else ()
        out = [np.asarray(self._constraints[name](np.array(x, dtype=np.float64), *extra), dtype=np.float64).ravel()
               for name in ("terminal_constraints", "terminal_inequalities") if name in self._constraints]
        return np.concatenate(out)

    def constraint_values(self, xs, us):
        G = None
        if self.ng:
            T = self.T
            out = self._batch(np.ascontiguousarray(xs[:T].T), np.ascontiguousarray(np.asarray(us).T),
                              np.ascontiguousarray(self.P[:T].T)) if self.batched else None
            G = out[2].T.copy() if out is not None else np.array(
                [self.constraint_step_values(xs[t], us[t], t) for t in range(T)]).reshape(T, self.ng)
        H = self.terminal_constraint_values(xs[self.T]) if self.nterm else None
        return G, H

    # -- derivatives ------------------------------------------------------------------------------
    def derivatives(self, xs, us, second_order):
        T, nx = self.T, self.nx
        xs = np.asarray(xs, dtype=np.float64)
        Z = np.concatenate([xs[:T], np.asarray(us, dtype=np.float64)], axis=1)        # (T, n)
        with np.errstate(all="ignore"):
            v, J, H = central_differences(self._stage_values, Z, hessian=True)
            vT, gT, HT = central_differences(self._terminal_values, xs[T:], hessian=True)
        return from_stacked(v, J, H, vT[0], gT[0], HT[0], nx, second_order)
