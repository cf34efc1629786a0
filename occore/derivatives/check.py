"""Check a problem's derivatives against finite differences of its own function values.

The values are evaluated through the problem's backend (``step_values`` / ``terminal_value``, plain
numbers in, plain numbers out), so the same check serves every backend: it catches a wrong
derivative as well as a function that does not differentiate the way it evaluates.

Scale: every difference comes with an estimate of its own error, so that large states do not read
as wrong derivatives. The estimate is the sum of

- rounding: the values are only known to ~eps |v|, so a central difference of a value v is off by up
  to about eps |v| / h (Jacobian) and 4 eps |v| / (h_j h_k) (Hessian), which dominates when the
  value is large and the derivative small (a cost ~1e12 differentiated in a control near 0);
- truncation: twice the change of the difference when the steps are halved (Richardson: the
  O(h^2) error of a central difference is 4/3 of that change).

The steps are relative, h = eps^(1/3) max(1, |z_j|) (Jacobians) and eps^(1/4) max(1, |z_j|)
(Hessians), which keeps the rounding error of a value that grows with |z| constant; where some
|z_j| > 1 the absolute steps eps^(1/3), eps^(1/4) are tried too (a relative step at |z| ~ 1e6 is
large in absolute terms, and sin(z) curves on a scale of 1), and each entry takes the difference
with the smaller error estimate (or, where the two disagree by more than both estimates, an error
as large as their disagreement). Only an error above the estimate counts (``FieldError.abs``); the
estimate itself is reported (``FieldError.resolution``): an error below it cannot be told from the
differencing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .base import stacked_fields
from .finite_difference import HESSIAN_STEP, JACOBIAN_STEP, _steps, central_differences

__all__ = ["check_derivatives", "DerivativeReport", "FieldError"]

#: the compared fields, in table order ("f" and "l": values of the derivative call vs step values)
FIELDS = ("f", "l", "fx", "fu", "lx", "lu", "lxx", "lux", "luu", "fxx", "fux", "fuu")
#: the constraint fields, compared when the problem has path (g) or terminal (h: [h; h_I]) constraints;
#: the Hessians only with ``second_order``
CONSTRAINT_FIELDS = ("g", "gx", "gu", "h", "hx", "gxx", "gux", "guu", "hxx")

_EPS = np.finfo(np.float64).eps
#: the values' rounding error in units of eps |v| (a function of a few operations is off by a few ulps)
ROUNDING = 10.0


@dataclass(frozen=True)
class FieldError:
    """Largest error of one derivative field.

    Attributes:
        shape: shape of the field, e.g. (T, nx, nx).
        abs: max |backend - finite difference| over the entries where it exceeds the finite
            difference's own error estimate (rounding and truncation, see the module docstring);
            0 when it exceeds it nowhere.
        rel: ``abs / max |finite difference|`` (0 when both are zero; inf when only the reference is).
        where: index of the largest such error (stage first).
        scale: max |finite difference| of the field.
        resolution: max estimated error of the finite differences of the field (an error below it
            cannot be seen).

    Example:
        >>> from occore.derivatives.check import FieldError
        >>> FieldError((10, 2, 2), abs=3e-9, rel=3e-11, where=(4, 0, 1), scale=100.0).ok(1e-8)
        True
    """

    shape: tuple
    abs: float
    rel: float
    where: tuple
    scale: float
    resolution: float = 0.0

    def ok(self, tol: float) -> bool:
        """True when the absolute or the relative error is at most ``tol``."""
        return min(self.abs, self.rel) <= tol


@dataclass(frozen=True)
class DerivativeReport:
    """The result of :func:`check_derivatives`: the largest error of each field.

    Attributes:
        backend: name of the checked backend.
        horizon: T.
        second_order: whether the dynamics Hessians were checked.
        errors: field name -> :class:`FieldError`, in the order of :data:`FIELDS`.

    Example:
        >>> from occore.derivatives.check import DerivativeReport, FieldError
        >>> rep = DerivativeReport("casadi", 1, False, {"fx": FieldError((1, 1, 1), 1e-10, 2e-11, (0, 0, 0), 5.0)})
        >>> rep.ok(), rep.worst()
        (True, ('fx', 2e-11))
    """

    backend: str
    horizon: int
    second_order: bool
    errors: dict

    def ok(self, tol: float = 1e-5) -> bool:
        """True when every field's absolute or relative error is at most ``tol``.

        Finite differences give first derivatives to about 1e-10 and second derivatives to about
        1e-7 relative, so a tol of 1e-5 flags real mistakes without flagging the differencing."""
        return all(e.ok(tol) for e in self.errors.values())

    def worst(self) -> tuple[str, float]:
        """(field, min(abs, rel)) of the field with the largest error."""
        name = max(self.errors, key=lambda k: min(self.errors[k].abs, self.errors[k].rel))
        e = self.errors[name]
        return name, min(e.abs, e.rel)

    def __getitem__(self, name: str) -> FieldError:
        return self.errors[name]

    def __str__(self) -> str:
        head = (f"derivative check: backend {self.backend!r}, T={self.horizon}, "
                f"{'second' if self.second_order else 'first'} order, against central differences of the values")
        lines = [head, f"{'field':<6} {'shape':<18} {'abs error':>10} {'rel error':>10} {'scale':>10} "
                       f"{'fd error':>10}  worst at"]
        for name, e in self.errors.items():
            lines.append(f"{name:<6} {str(e.shape):<18} {e.abs:>10.2e} {e.rel:>10.2e} {e.scale:>10.2e} "
                         f"{e.resolution:>10.2e}  {e.where}")
        return "\n".join(lines)


def _compare(a, b, noise) -> FieldError:
    """The error of ``a`` against the finite differences ``b``, counting only the entries whose error
    exceeds the differences' own error estimate ``noise``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    noise = np.broadcast_to(np.where(np.isfinite(noise), noise, 0.0), b.shape)
    diff = np.abs(a - b)
    diff = np.where(np.isnan(diff), np.inf, diff)
    excess = np.where(diff > noise, diff, 0.0)
    pick = excess if np.any(excess > 0) else diff
    i = np.unravel_index(int(np.argmax(pick)), diff.shape) if diff.size else ()
    err = float(excess[i]) if diff.size else 0.0
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else np.inf)
    resolution = float(noise.max()) if noise.size else 0.0
    return FieldError(shape=a.shape, abs=err, rel=rel, where=tuple(int(k) for k in i), scale=scale,
                      resolution=resolution)


def _estimate(fun, Z, scaled: bool):
    """Central differences of ``fun`` at ``Z`` (B, n), relative (``scaled``) or absolute steps, with
    the estimated absolute error of each entry (rounding of the values at these steps plus twice the
    change when the steps are halved)."""
    v, J, H = central_differences(fun, Z, hessian=True, scaled=scaled)
    _, J2, H2 = central_differences(fun, Z, hessian=True, jacobian_step=JACOBIAN_STEP / 2,
                                    hessian_step=HESSIAN_STEP / 2, scaled=scaled)
    h1, h2 = _steps(Z, JACOBIAN_STEP, scaled), _steps(Z, HESSIAN_STEP, scaled)
    size = ROUNDING * _EPS * np.abs(v)                                     # (B, m)
    eJ = size[:, :, None] / h1[:, None, :] + 2.0 * np.abs(J - J2)
    eH = 4.0 * size[:, :, None, None] / (h2[:, None, :, None] * h2[:, None, None, :]) + 2.0 * np.abs(H - H2)
    return v, J, H, size, _finite(eJ), _finite(eH)


def _finite(e):
    return np.where(np.isnan(e), np.inf, e)


def _differences(fun, Z):
    """Central differences of ``fun`` at ``Z`` (B, n) with an estimate of their error: (v, J, H,
    ev, eJ, eH), values (B, m), Jacobians (B, m, n), Hessians (B, m, n, n) and the estimated absolute
    error of each entry; per entry the relative or the absolute steps, whichever is estimated better."""
    v, J, H, ev, eJ, eH = _estimate(fun, Z, scaled=True)
    if np.any(np.abs(Z) > 1.0):
        _, Ja, Ha, _, eJa, eHa = _estimate(fun, Z, scaled=False)
        J, eJ = _better(J, eJ, Ja, eJa)
        H, eH = _better(H, eH, Ha, eHa)
    return v, J, H, ev, eJ, eH


def _better(D, e, Da, ea):
    """Per entry the difference with the smaller error estimate; where the two disagree by more than
    both estimates together (a step far outside the range where the estimates hold) the error is
    not known better than that disagreement."""
    gap = np.abs(D - Da)
    best = np.minimum(e, ea)
    return np.where(ea < e, Da, D), np.where(gap > e + ea, np.maximum(best, gap), best)


def _fields(v, J, H, vT, gT, HT, nx: int) -> dict:
    """The DenseDerivatives fields of the finite differences of the stacked stage and terminal
    functions, or of their error estimates (:func:`occore.derivatives.base.stacked_fields`; the
    terminal arrays with their leading axis of one point), ``l`` with the terminal cost appended."""
    kw = stacked_fields(v, J, H, vT[0], gT[0], HT[0], nx, np.concatenate, np.asarray)
    kw["l"] = np.append(kw["l"], kw.pop("lf"))
    return kw


def check_derivatives(problem, us=None, second_order: bool = True) -> DerivativeReport:
    """Compare a problem's backend derivatives with central differences of its values.

    Rolls out ``us``, evaluates the backend's derivatives at the trajectory (one call, as a solver
    does) and differentiates the problem's own function values (through its backend's numeric
    evaluation) at the same points by central differences
    (:func:`occore.derivatives.finite_difference.central_differences`).

    Args:
        problem: an :class:`occore.Problem` (any backend).
        us: (T, nu) controls to roll out (clamped into the bounds); zeros by default.
        second_order: also check the dynamics Hessians fxx, fux, fuu.

    Raises:
        InputError: ``problem`` is not an :class:`occore.Problem`, ``second_order`` not a bool.
        ShapeError, InputError: ``us`` has the wrong shape or non-finite values.

    Returns:
        A :class:`DerivativeReport` with the largest absolute and relative error of f, l (values),
        fx, fu, lx, lu, lxx, lux, luu (and fxx, fux, fuu); with path constraints also g, gx, gu
        (gxx, gux, guu), with terminal constraints h, hx (hxx), h being [h; h_I];
        ``report.ok(tol)``, ``print(report)``.

    Example:
        >>> import occore
        >>> report = occore.check_derivatives(occore.problems.make("pendulum"))
        >>> report.ok(), report["fx"].shape
        (True, (100, 2, 2))
        >>> print(report)  # doctest: +ELLIPSIS
        derivative check: backend 'casadi', T=100, second order, ...
        field  shape               abs error  rel error      scale   fd error  worst at
        f      (100, 2) ...
    """
    backend = getattr(problem, "_backend", None)
    if backend is None or not hasattr(backend, "step_values"):
        raise InputError(f"problem: expected an occore.Problem (a dense problem with a derivative "
                         f"backend), got {type(problem).__name__}")
    if not isinstance(second_order, bool):
        raise InputError(f"second_order={second_order!r} is invalid: expected True or False")
    T, nx = problem.horizon, problem.nx
    ng, nT = backend.ng, backend.nterm
    us = problem.initial_controls() if us is None else problem.clamp(problem.check_controls(us))
    traj = problem.rollout(us)
    xs = np.asarray(traj.xs, dtype=np.float64)
    d = problem.evaluate_derivatives(xs, us, second_order)

    def stage_values(points):                        # (T, K, n) -> (T, K, nx + 1 + ng): [f; l; g]
        V = np.empty(points.shape[:2] + (nx + 1 + ng,))
        for t in range(points.shape[0]):
            for k in range(points.shape[1]):
                x, u = points[t, k, :nx], points[t, k, nx:]
                V[t, k, :nx], V[t, k, nx] = backend.step_values(x, u, t)
                if ng:
                    V[t, k, nx + 1:] = backend.constraint_step_values(x, u, t)
        return V

    def terminal_values(points):                     # (1, K, nx) -> (1, K, 1 + nT): [lf; h; h_I]
        V = np.empty(points.shape[:2] + (1 + nT,))
        for k, p in enumerate(points[0]):
            V[0, k, 0] = backend.terminal_value(p)
            if nT:
                V[0, k, 1:] = backend.terminal_constraint_values(p)
        return V

    with np.errstate(all="ignore"):
        v, J, H, ev, eJ, eH = _differences(stage_values, np.concatenate([xs[:T], us], axis=1))
        vT, gT, HT, evT, eJT, eHT = _differences(terminal_values, xs[T:])
    ref = _fields(v, J, H, vT, gT, HT, nx)
    noise = _fields(ev, eJ, eH, evT, eJT, eHT, nx)
    got = dict(f=d.f, l=np.append(d.l, d.lf), fx=d.fx, fu=d.fu, lx=d.lx, lu=d.lu, lxx=d.lxx, lux=d.lux,
               luu=d.luu, fxx=d.fxx, fux=d.fux, fuu=d.fuu)
    names = list(FIELDS if second_order else FIELDS[:-3])
    if ng:
        got.update(g=d.g, gx=d.gx, gu=d.gu, gxx=d.gxx, gux=d.gux, guu=d.guu)
        names += ["g", "gx", "gu"] + (["gxx", "gux", "guu"] if second_order else [])
    if nT:
        got.update(h=d.h, hx=d.hx, hxx=d.hxx)
        names += ["h", "hx"] + (["hxx"] if second_order else [])
    errors = {}
    for name in names:
        if got[name] is None:
            raise ValueError(f"backend {backend.name!r} returned no {name} for second_order=True")
        errors[name] = _compare(got[name], ref[name], noise[name])
    return DerivativeReport(backend=backend.name, horizon=T, second_order=second_order, errors=errors)
