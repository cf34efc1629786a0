"""Constraints of a dense problem beyond the control box, as :class:`occore.Problem` declares them.

    state bounds          x_lower_t <= x_t <= x_upper_t     t = 1..T (x_0 is given)
    path constraints      g(x_t, u_t[, p_t]) <= 0            t = 0..T-1, g a vector of ng values
    terminal equalities   h(x_T[, p_T]) == 0                 nh values
    terminal inequalities h_I(x_T[, p_T]) <= 0               nhi values

Solvers see them through two values: :class:`ConstraintSet` (what the problem declares: sizes,
bounds, which kinds are present) and :class:`ConstraintValues` (the values along one trajectory,
from which the violation and the augmented-Lagrangian terms are computed). The terminal
constraints are stacked into one vector ``[h; h_I]`` of ``nh + nhi`` values (equalities first)
wherever they are evaluated, so a backend differentiates one terminal constraint function.

Example:
    >>> import numpy as np
    >>> cs = ConstraintSet.build(T=2, nx=1, x_lower=-1.0, x_upper=None, ng=0, nh=1, nhi=0)
    >>> cs.kinds
    ('state bounds', 'terminal equalities')
    >>> vals = cs.values(np.array([[0.0], [-1.5], [2.0]]), None, np.array([0.25]))
    >>> vals.violation()
    0.5
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError, ShapeError
from .validation import float_array

__all__ = ["ConstraintSet", "ConstraintValues", "KINDS"]

#: the constraint kinds a problem may declare, in the words solvers use when they refuse one
KINDS = ("state bounds", "path constraints", "terminal equalities", "terminal inequalities")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class _Empty(dict):
    """Read-only empty (n, 0) arrays by n (the values of an absent kind of constraint)."""

    def __missing__(self, n):
        a = self[n] = _frozen(np.zeros((n, 0)))
        return a


_NONE_T = _Empty()
_EMPTY = _frozen(np.zeros(0))


def state_bound(name: str, value, T: int, nx: int, missing: float) -> np.ndarray:
    """A state bound given as scalar, (nx,) or (T+1, nx), as a read-only (T+1, nx) float64 array.

    ``missing`` (-inf for a lower bound, inf for an upper one) fills a bound that is None and may
    also be given for single components; the other infinity and NaN are refused (InputError)."""
    if value is None:
        return _frozen(np.full((T + 1, nx), missing))
    arr = float_array(value, name)
    if arr.ndim == 0 or arr.shape == (nx,):
        arr = np.broadcast_to(arr, (T + 1, nx)).copy()
    elif arr.shape != (T + 1, nx):
        raise ShapeError(name, f"() or ({nx},) or ({T + 1}, {nx})", arr.shape, "row 0 belongs to x0 and is ignored")
    if np.isnan(arr).any():
        raise InputError(f"{name}: expected numbers, got NaN")
    wrong = arr == -missing
    if wrong.any():
        t, i = np.argwhere(wrong)[0]
        raise InputError(f"{name}: {arr[t, i]} at stage {t}, state {i} admits no state "
                         f"(use {missing} or None for no bound)")
    return _frozen(arr)


@dataclass(frozen=True)
class ConstraintValues:
    """Constraint values along one trajectory (feasible means every entry <= 0, equalities == 0).

    Attributes:
        g: (T, ng) path constraint values.
        upper: (T+1, n_upper) x_t[j] - x_upper_t[j] for the bounded state components j
            (``ConstraintSet.upper_index``; -inf where a stage has no bound; row 0 is -inf: x_0 is given).
        lower: (T+1, n_lower) x_lower_t[j] - x_t[j] for the components ``ConstraintSet.lower_index``.
        h: (nh,) terminal equality values.
        hi: (nhi,) terminal inequality values.
    """

    g: np.ndarray
    upper: np.ndarray
    lower: np.ndarray
    h: np.ndarray
    hi: np.ndarray

    def violation(self) -> float:
        """Largest violation of any constraint (0.0 when all hold; NaN counts as inf). Computed once."""
        cached = self.__dict__.get("_violation")
        if cached is None:
            worst = 0.0
            for p in (self.g, self.upper, self.lower, self.hi):
                if p.size:
                    worst = max(worst, float(np.max(p)))
            if self.h.size:
                worst = max(worst, float(np.max(np.abs(self.h))))
            cached = worst if worst == worst else float("inf")
            self.__dict__["_violation"] = cached
        return cached


@dataclass(frozen=True)
class ConstraintSet:
    """The constraints a problem declares (beyond the control box).

    Attributes:
        x_lower, x_upper: (T+1, nx) state bounds (+-inf where unbounded; row 0 ignored).
        ng: number of path constraints per stage (0: none).
        nh: number of terminal equalities.  nhi: number of terminal inequalities.
        kinds: the kinds present, words from :data:`KINDS`.
        upper_index, lower_index: the state components with an upper (lower) bound at some stage
            t >= 1; only these have values and multipliers.
    """

    x_lower: np.ndarray
    x_upper: np.ndarray
    ng: int
    nh: int
    nhi: int
    kinds: tuple
    upper_index: np.ndarray
    lower_index: np.ndarray

    @classmethod
    def build(cls, T: int, nx: int, x_lower, x_upper, ng: int, nh: int, nhi: int) -> "ConstraintSet":
        """Validated state bounds (see :func:`state_bound`) and the sizes the backend found."""
        lower = state_bound("x_lower", x_lower, T, nx, -np.inf)
        upper = state_bound("x_upper", x_upper, T, nx, np.inf)
        bad = np.argwhere(lower[1:] > upper[1:])
        if bad.size:
            t, i = bad[0]
            raise InputError(f"x_lower > x_upper at stage {t + 1}, state {i}: "
                             f"{lower[t + 1, i]} > {upper[t + 1, i]}")
        upper_index = _frozen(np.flatnonzero(np.isfinite(upper[1:]).any(axis=0)))
        lower_index = _frozen(np.flatnonzero(np.isfinite(lower[1:]).any(axis=0)))
        bounded = bool(upper_index.size or lower_index.size)
        kinds = tuple(k for k, present in zip(KINDS, (bounded, ng > 0, nh > 0, nhi > 0)) if present)
        return cls(lower, upper, int(ng), int(nh), int(nhi), kinds, upper_index, lower_index)

    @property
    def any(self) -> bool:
        """True when the problem has any constraint beyond the control box."""
        return bool(self.kinds)

    def values(self, xs: np.ndarray, g, terminal) -> ConstraintValues:
        """:class:`ConstraintValues` of states ``xs`` (T+1, nx), path values ``g`` (T, ng) or None
        and stacked terminal values ``terminal`` (nh + nhi,) or None."""
        T1 = self.x_lower.shape[0]
        iu, il = self.upper_index, self.lower_index
        if iu.size or il.size:
            with np.errstate(invalid="ignore"):
                upper = xs[:, iu] - self.x_upper[:, iu]
                lower = self.x_lower[:, il] - xs[:, il]
            upper[0] = lower[0] = -np.inf
        else:
            upper = lower = _NONE_T[T1]
        g = _NONE_T[T1 - 1] if g is None else g
        terminal = _EMPTY if terminal is None else terminal
        return ConstraintValues(g=g, upper=upper, lower=lower, h=terminal[:self.nh], hi=terminal[self.nh:])
