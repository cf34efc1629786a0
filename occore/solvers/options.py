"""Frozen, validated option dataclasses shared by the solvers.

Defaults are those proven on the reference set (REFERENCE.md): mu from 1e-9, x10 on a failed
factorisation or a step <= 0.01, /10 on a step > 0.5, abort above 1e9; step lengths 2^-k,
k = 0..9; accept when actual/expected decrease > 0.1; stop when the expected decrease of a full
step is below 1e-9. Variants are made with :func:`dataclasses.replace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"option {name}={value!r} is invalid: expected {expected}")


def _positive(name: str, value) -> None:
    _check(name, value, isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
           "a finite number > 0")


@dataclass(frozen=True)
class Regularization:
    """Levenberg-Marquardt regularisation of Quu (Tassa, Erez & Todorov 2012).

    Attributes:
        initial: mu of the first backward pass (0: none until a factorisation fails).
        minimum: mu never goes below this.
        maximum: the solve stops (REG_LIMIT / LINE_SEARCH_FAILED) when mu would exceed it.
        factor: multiplier applied on increase, divisor on decrease.
        increase_below: mu is raised after an accepted step of length <= this.
        decrease_above: mu is lowered after an accepted step of length > this.
        fixed: keep mu at ``initial`` except when a factorisation fails.

    Example:
        >>> Regularization(initial=1e-6).factor
        10.0
    """

    initial: float = 1e-9
    minimum: float = 1e-9
    maximum: float = 1e9
    factor: float = 10.0
    increase_below: float = 0.01
    decrease_above: float = 0.5
    fixed: bool = False

    def __post_init__(self):
        _check("initial", self.initial, isinstance(self.initial, (int, float)) and math.isfinite(
            self.initial) and self.initial >= 0, "a finite number >= 0")
        _positive("maximum", self.maximum)
        _check("minimum", self.minimum, isinstance(self.minimum, (int, float)) and 0 <= self.minimum
               <= self.initial, "0 <= minimum <= initial")
        _check("factor", self.factor, isinstance(self.factor, (int, float)) and self.factor > 1, "> 1")
        _check("maximum", self.maximum, self.maximum >= self.initial, ">= initial")
        for name in ("increase_below", "decrease_above"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, (int, float)) and 0 <= v <= 1, "a number in [0, 1]")

    def increase(self, mu: float) -> float:
        return max(mu * self.factor, self.minimum, 1e-12)

    def decrease(self, mu: float) -> float:
        return max(mu / self.factor, self.minimum)

    def after_step(self, mu: float, alpha: float) -> float:
        """mu after a step of length alpha was accepted."""
        if self.fixed:
            return mu
        if alpha > self.decrease_above:
            return self.decrease(mu)
        if alpha <= self.increase_below:
            return self.increase(mu)
        return mu


def _default_steps() -> tuple:
    return tuple(2.0 ** -k for k in range(10))


@dataclass(frozen=True)
class LineSearch:
    """Backtracking on the expected decrease.

    Attributes:
        steps: step lengths tried in order; ``(1.0,)`` means no line search (full steps only).
        accept_ratio: a step is accepted when actual / expected decrease exceeds this.

    Example:
        >>> LineSearch(steps=(1.0,)).steps
        (1.0,)
    """

    steps: tuple = field(default_factory=_default_steps)
    accept_ratio: float = 0.1

    def __post_init__(self):
        steps = tuple(self.steps)
        _check("steps", self.steps, len(steps) > 0 and all(
            isinstance(a, (int, float)) and 0 < a <= 1 for a in steps), "a non-empty sequence in (0, 1]")
        object.__setattr__(self, "steps", tuple(float(a) for a in steps))
        _check("accept_ratio", self.accept_ratio, isinstance(self.accept_ratio, (int, float))
               and 0 <= self.accept_ratio < 1, "a number in [0, 1)")


@dataclass(frozen=True)
class DDPOptions:
    """Options of :class:`occore.DDP` and :class:`occore.ILQR`.

    Attributes:
        max_iter: iteration limit (MAX_ITER when reached).
        tol: stop (CONVERGED) when the expected decrease of a full step is below this.
        regularization: see :class:`Regularization`.
        line_search: see :class:`LineSearch`.
        stochastic: every iteration takes the full step of its policy, with no cost check, no
            line search and no convergence test: the iteration of stochastic training, where the
            problem changes (a new minibatch) at every step and its cost is not evaluated
            (DDPNOpt). The regularisation is still raised until the backward pass succeeds.

    Example:
        >>> DDPOptions(max_iter=50).tol
        1e-09
        >>> DDPOptions(stochastic=True).stochastic
        True
    """

    max_iter: int = 500
    tol: float = 1e-9
    regularization: Regularization = field(default_factory=Regularization)
    line_search: LineSearch = field(default_factory=LineSearch)
    stochastic: bool = False

    def __post_init__(self):
        _check("max_iter", self.max_iter, isinstance(self.max_iter, int) and not isinstance(
            self.max_iter, bool) and self.max_iter >= 1, "an integer >= 1")
        _positive("tol", self.tol)
        _check("regularization", self.regularization, isinstance(self.regularization, Regularization),
               "an occore.solvers.options.Regularization")
        _check("line_search", self.line_search, isinstance(self.line_search, LineSearch),
               "an occore.solvers.options.LineSearch")
        _check("stochastic", self.stochastic, isinstance(self.stochastic, bool), "a bool")


def build_options(cls, options, kwargs: dict):
    """An options instance of ``cls`` from an optional instance and keyword overrides."""
    if options is None:
        options = cls()
    elif not isinstance(options, cls):
        raise TypeError(f"options: expected {cls.__name__}, got {type(options).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; valid options are {sorted(names)}")
    from dataclasses import replace

    return replace(options, **kwargs) if kwargs else options
