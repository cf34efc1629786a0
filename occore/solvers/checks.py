"""What the solvers' public entry points (``solve``, ``init``, ``step``) check before any work.

Each check raises a typed error (:class:`occore.InputError` or :class:`occore.ShapeError`) that
names the argument as the caller wrote it (``problem``, ``us0``, ``state``, ``mu``, ``callbacks``),
with the expected and the actual type or shape. Dense checks (shapes) apply to problems that have
``nx`` / ``nu`` (:class:`occore.Problem`); other :class:`occore.types.ControlProblem` s (networks)
check their own controls.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import InputError, ShapeError
from ..validation import is_real

__all__ = ["check_problem", "check_warm_start", "check_state", "check_callbacks", "check_mu"]

#: what every solver calls on a problem
_PROTOCOL = ("initial_controls", "rollout", "local_model")


def check_problem(problem, needs=(), solver: str = "") -> None:
    """``problem`` implements the ControlProblem protocol (and the solver's extra methods ``needs``;
    ``solver``, its class name, is named when only those are missing)."""
    missing = [m for m in _PROTOCOL + tuple(needs) if not callable(getattr(problem, m, None))]
    if isinstance(problem, (str, bytes)) or missing or not hasattr(problem, "horizon"):
        hint = (f"; for the reference problem {problem!r} use occore.problems.make({problem!r})"
                if isinstance(problem, str) else "")
        if solver and missing and not set(missing) & set(_PROTOCOL) and hasattr(problem, "horizon"):
            hint = f"; occore.{solver} needs {', '.join(missing)} beyond the ControlProblem protocol"
            if "rollout_policy" not in missing:      # all that DDP and iLQR need beyond it
                hint += " (occore.DDP and occore.ILQR need none of them)"
        what = f" (missing: {', '.join(missing)})" if missing and not isinstance(problem, str) else ""
        raise InputError(f"problem: expected an occore.Problem or another ControlProblem{what}, "
                         f"got {type(problem).__name__}{hint}")


def _dense(problem) -> bool:
    return all(isinstance(getattr(problem, a, None), int) for a in ("nx", "nu", "horizon"))


def _shape(value):
    """The shape of an array-like value (None when it has none)."""
    try:
        return tuple(np.shape(value))
    except (TypeError, ValueError):   # ragged or not array-like
        return None


def check_warm_start(problem, prev) -> None:
    """A :class:`occore.Result` given as ``us0`` fits ``problem``: controls (T, nu), states (T+1, nx)
    and, when it has one, a policy whose gains are (T, nu) and (T, nu, nx); for a problem with
    its own ``check_controls`` (a network), its controls pass that check."""
    if not _dense(problem):
        _own_controls(problem, prev.us, "us0.us")
        return
    T, nx, nu = problem.horizon, problem.nx, problem.nu
    detail = "a Result of another problem (other horizon, state or control size)"
    for name, value, expected in (("us0.us", prev.us, (T, nu)), ("us0.xs", prev.xs, (T + 1, nx))):
        if _shape(value) != expected:
            raise ShapeError(name, expected, _shape(value), detail)
    if prev.policy is not None:
        for name, value, expected in (("us0.policy.k", prev.policy.k, (T, nu)),
                                      ("us0.policy.K", prev.policy.K, (T, nu, nx))):
            if not callable(value) and _shape(value) != expected:
                raise ShapeError(name, expected, _shape(value), detail)


def check_state(problem, state, state_type) -> None:
    """``state`` is a ``state_type`` (a SolverState) made by ``init`` for a problem of this shape."""
    if not isinstance(state, state_type):
        raise InputError(f"state: expected the {state_type.__name__} returned by init() or step(), "
                         f"got {type(state).__name__}")
    if _dense(problem):
        expected = (problem.horizon + 1, problem.nx)
        if _shape(state.traj.xs) != expected:
            raise ShapeError("state", f"states {expected}", _shape(state.traj.xs),
                             "a state of another problem; call init(problem) first")
    else:
        _own_controls(problem, state.traj.us, "state.traj.us")


def _own_controls(problem, us, name: str) -> None:
    """A problem without ``nx`` / ``nu`` that has ``check_controls(us, name)`` (a network's list of
    parameter dicts) checks controls itself, naming ``name``."""
    check = getattr(problem, "check_controls", None)
    if callable(check):
        check(us, name)


def check_callbacks(callbacks) -> tuple:
    """``callbacks`` as a tuple of callables."""
    if callable(callbacks):
        callbacks = (callbacks,)
    try:
        callbacks = tuple(callbacks)
    except TypeError:
        raise InputError(f"callbacks: expected a sequence of callables cb(info, state), got "
                         f"{type(callbacks).__name__}") from None
    for cb in callbacks:
        if not callable(cb):
            raise InputError(f"callbacks: expected callables cb(info, state), got {type(cb).__name__}")
    return callbacks


def check_mu(mu) -> float:
    """The initial regularisation ``mu``: a finite number >= 0."""
    if not is_real(mu) or not math.isfinite(mu) or mu < 0:
        raise InputError(f"mu: expected a finite number >= 0, got {mu!r}")
    return float(mu)
