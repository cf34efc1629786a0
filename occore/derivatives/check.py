"""Check a problem's derivatives against finite differences of its own function values.

The values are evaluated through the problem's backend (``step_values`` / ``terminal_value``, plain
numbers in, plain numbers out), so the same check serves every backend: it catches a wrong
derivative as well as a function that does not differentiate the way it evaluates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .finite_difference import central_differences

__all__ = ["check_derivatives", "DerivativeReport", "FieldError"]

#: the compared fields, in table order ("f" and "l": values of the derivative call vs step values)
FIELDS = ("f", "l", "fx", "fu", "lx", "lu", "lxx", "lux", "luu", "fxx", "fux", "fuu")
#: the constraint fields, compared when the problem has path (g) or terminal (h: [h; h_I]) constraints;
#: the Hessians only with ``second_order``
CONSTRAINT_FIELDS = ("g", "gx", "gu", "h", "hx", "gxx", "gux", "guu", "hxx")


@dataclass(frozen=True)
class FieldError:
    """Largest error of one derivative field.

    Attributes:
        shape: shape of the field, e.g. (T, nx, nx).
        abs: max |backend - finite difference| over all entries.
        rel: ``abs / max |finite difference|`` (0 when both are zero; inf when only the reference is).
        where: index of the largest absolute error (stage first).
        scale: max |finite difference| of the field.

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
        lines = [head, f"{'field':<6} {'shape':<18} {'abs error':>10} {'rel error':>10} {'scale':>10}  worst at"]
        for name, e in self.errors.items():
            lines.append(f"{name:<6} {str(e.shape):<18} {e.abs:>10.2e} {e.rel:>10.2e} {e.scale:>10.2e}  {e.where}")
        return "\n".join(lines)


def _compare(a, b) -> FieldError:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    diff = np.where(np.isnan(diff), np.inf, diff)
    i = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    err = float(diff[i]) if diff.size else 0.0
    finite = np.abs(b[np.isfinite(b)])
    scale = float(finite.max()) if finite.size else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else np.inf)
    return FieldError(shape=a.shape, abs=err, rel=rel, where=tuple(int(k) for k in i), scale=scale)


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
        field  shape               abs error  rel error      scale  worst at
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
        v, J, H = central_differences(stage_values, np.concatenate([xs[:T], us], axis=1), hessian=True)
        vT, gT, HT = central_differences(terminal_values, xs[T:], hessian=True)
    ref = dict(
        f=v[:, :nx], l=np.append(v[:, nx], vT[0, 0]),
        fx=J[:, :nx, :nx], fu=J[:, :nx, nx:],
        lx=np.concatenate([J[:, nx, :nx], gT[:, 0]]), lu=J[:, nx, nx:],
        lxx=np.concatenate([H[:, nx, :nx, :nx], HT[:, 0]]), lux=H[:, nx, nx:, :nx], luu=H[:, nx, nx:, nx:],
        fxx=H[:, :nx, :nx, :nx], fux=H[:, :nx, nx:, :nx], fuu=H[:, :nx, nx:, nx:])
    got = dict(f=d.f, l=np.append(d.l, d.lf), fx=d.fx, fu=d.fu, lx=d.lx, lu=d.lu, lxx=d.lxx, lux=d.lux,
               luu=d.luu, fxx=d.fxx, fux=d.fux, fuu=d.fuu)
    names = list(FIELDS if second_order else FIELDS[:-3])
    c = slice(nx + 1, None)
    if ng:
        ref.update(g=v[:, c], gx=J[:, c, :nx], gu=J[:, c, nx:], gxx=H[:, c, :nx, :nx], gux=H[:, c, nx:, :nx],
                   guu=H[:, c, nx:, nx:])
        got.update(g=d.g, gx=d.gx, gu=d.gu, gxx=d.gxx, gux=d.gux, guu=d.guu)
        names += ["g", "gx", "gu"] + (["gxx", "gux", "guu"] if second_order else [])
    if nT:
        ref.update(h=vT[0, 1:], hx=gT[0, 1:], hxx=HT[0, 1:])
        got.update(h=d.h, hx=d.hx, hxx=d.hxx)
        names += ["h", "hx"] + (["hxx"] if second_order else [])
    errors = {}
    for name in names:
        if got[name] is None:
            raise ValueError(f"backend {backend.name!r} returned no {name} for second_order=True")
        errors[name] = _compare(got[name], ref[name])
    return DerivativeReport(backend=backend.name, horizon=T, second_order=second_order, errors=errors)
