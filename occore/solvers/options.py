"""Frozen, validated option dataclasses shared by the solvers.

Defaults are those proven on the reference set (REFERENCE.md): mu from 1e-9, x10 on a failed
factorisation or a step <= 0.01, /10 on a step > 0.5, abort above 1e9; step lengths 2^-k,
k = 0..9; accept when actual/expected decrease > 0.1; stop when the expected decrease of a full
step is below 1e-9. Variants are made with :func:`dataclasses.replace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import InputError
from ..validation import is_integer, is_real


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise InputError(f"option {name}={value!r} is invalid: expected {expected}")


def _positive(name: str, value) -> None:
    _check(name, value, is_real(value) and math.isfinite(value) and value > 0,
           "a finite number > 0")


@dataclass(frozen=True)
class Regularization:
    """Levenberg-Marquardt regularisation of Quu (Tassa, Erez & Todorov 2012).

    Attributes:
        initial: mu of the first backward pass (0: none until a factorisation fails).
        minimum: mu never goes below this.
        maximum: the solve stops (REG_LIMIT / LINE_SEARCH_FAILED) when mu would exceed
            ``maximum * max(1, s)``, s the largest entry of the cost Hessians (l_xx, the terminal
            one included, and l_uu) at the solve's first iterate, measured once
            (``SolverState.scale``, :func:`occore.solvers.ddp.mu_cap`). mu enters
            next to those Hessians (in V_xx' or Q_uu), so the cap is relative: a cost multiplied
            by 1e6 needs a 1e6 times larger mu for the same step, and gets a 1e6 times larger cap
            (measured: DDP on a double integrator with its cost x1e6, horizon 10, needs mu = 1.2e12
            where the unscaled one needs 1.1e6; with an absolute cap 1e9 it ended REG_LIMIT after
            2 iterations, 10.6 % above the optimum, and now converges in the unscaled problem's
            14). Costs whose Hessians are at most 1 see ``maximum`` itself; a model without cost
            Hessians (the network local models) too.
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
        _check("initial", self.initial, is_real(self.initial) and math.isfinite(
            self.initial) and self.initial >= 0, "a finite number >= 0")
        _positive("maximum", self.maximum)
        _check("minimum", self.minimum, is_real(self.minimum) and 0 <= self.minimum
               <= self.initial, "0 <= minimum <= initial")
        _check("factor", self.factor, is_real(self.factor) and self.factor > 1, "> 1")
        _check("maximum", self.maximum, self.maximum >= self.initial, ">= initial")
        for name in ("increase_below", "decrease_above"):
            v = getattr(self, name)
            _check(name, v, is_real(v) and 0 <= v <= 1, "a number in [0, 1]")

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
        accept_increase: where the model predicts an increase of the cost (a multiple-shooting
            step closing gaps, FDDP), a step is accepted when the actual increase is at most this
            times the predicted one (crocoddyl's th_acceptnegstep). Single-shooting models never
            predict an increase.
        gap_warm_start: None, or an integer n >= 0: on an iterate with gaps (multiple shooting,
            FDDP from a state guess), after an iteration that accepted the step ``steps[i]``
            (i > 0), the trials start at ``steps[max(0, i - n)]``: while gaps close, the accepted
            steps grow a few places per iteration, and the longer steps before them blow up
            (measured: FDDP from the interpolated state guess on the cart-pole, 133 rollouts
            instead of 188 with n = 2, the same 52 iterations).

    Example:
        >>> LineSearch(steps=(1.0,)).steps
        (1.0,)
    """

    steps: tuple = field(default_factory=_default_steps)
    accept_ratio: float = 0.1
    accept_increase: float = 2.0
    gap_warm_start: int | None = None

    def __post_init__(self):
        steps = tuple(self.steps)
        _check("steps", self.steps, len(steps) > 0 and all(
            is_real(a) and 0 < a <= 1 for a in steps), "a non-empty sequence in (0, 1]")
        object.__setattr__(self, "steps", tuple(float(a) for a in steps))
        _check("accept_ratio", self.accept_ratio, is_real(self.accept_ratio)
               and 0 <= self.accept_ratio < 1, "a number in [0, 1)")
        _check("accept_increase", self.accept_increase, is_real(self.accept_increase)
               and math.isfinite(self.accept_increase) and self.accept_increase >= 1, "a finite number >= 1")
        if self.gap_warm_start is not None:
            _check("gap_warm_start", self.gap_warm_start, is_integer(self.gap_warm_start)
                   and self.gap_warm_start >= 0, "None or an integer >= 0")
            object.__setattr__(self, "gap_warm_start", int(self.gap_warm_start))


def _fine_steps() -> tuple:
    return tuple(0.7 ** k for k in range(20))


def _fine_line_search() -> LineSearch:
    return LineSearch(steps=_fine_steps(), gap_warm_start=2)


@dataclass(frozen=True)
class DDPOptions:
    """Options of :class:`occore.DDP` and :class:`occore.ILQR`.

    Attributes:
        max_iter: iteration limit (MAX_ITER when reached).
        tol: stop (CONVERGED) when the expected decrease of a full step is below this (or below
            1e-14 |J|, the rounding level of the cost, where that is larger: |J| > 1e5).
        regularization: see :class:`Regularization`.
        line_search: see :class:`LineSearch`.
        stochastic: every iteration takes the full step of its policy, with no cost check, no
            line search and no convergence test: the iteration of stochastic training, where the
            problem changes (a new minibatch) at every step and its cost is not evaluated
            (DDPNOpt). The regularisation is still raised until the backward pass succeeds.
        second_order_below: None: every iteration uses the solver's own model (DDP: with the
            dynamics Hessians; iLQR, FDDP, CDDP: Gauss-Newton). A number: Gauss-Newton
            iterations, and second-order ones (dynamics and constraint Hessians) whenever the
            previous iteration's expected decrease of a full step was below it: the robust model
            far from the solution, the quadratically convergent one near it (measured on the
            reference set with 0.1: cart-pole 100 iterations instead of 146, unicycle 7 instead of
            12, boxed pendulum 67 instead of 106; ``benchmarks/classic.py``).

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
    second_order_below: float | None = None

    def __post_init__(self):
        if self.second_order_below is not None:
            _check("second_order_below", self.second_order_below, is_real(self.second_order_below)
                   and self.second_order_below >= 0, "None or a number >= 0")
        _check("max_iter", self.max_iter, is_integer(self.max_iter) and self.max_iter >= 1, "an integer >= 1")
        object.__setattr__(self, "max_iter", int(self.max_iter))
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


@dataclass(frozen=True)
class CDDPOptions(DDPOptions):
    """Options of :class:`occore.CDDP`: those of :class:`DDPOptions` (for its inner DDP iterations)
    and the augmented-Lagrangian schedule.

    The inner iterations are FDDP's (:class:`FDDPOptions`: step lengths 0.7^k, Gauss-Newton
    switching to the second-order model with the dynamics and constraint Hessians near the
    solution), with the switch later, at an expected decrease of 1e-3 instead of 0.1.

    Defaults measured on the constrained reference problems (``benchmarks/classic.py``; iterations
    from the zero guess on unicycle_obstacles / cartpole_track / pendulum_terminal / quadrotor):
    the penalty x10 unless the violation fell to 1/20 of the last update's, and the later
    switch: 25 / 96 / 10 / 21 against 31 / 93 / 13 / 24 with the penalty kept when the violation
    fell to a quarter and the switch at 0.1 (the Gauss-Newton iterations are also the cheaper
    ones). x30 or x100 save more on the quadrotor (19 iterations) but make the mixed-constraint
    unicycle of ``tests/occore/test_constraints.py`` end MAX_ITER; x100 with the switch at 0.1
    ends the track-limited cart-pole in another local optimum.

    Attributes:
        constraint_tol: CONVERGED needs the largest constraint violation at most this (and the
            expected decrease of the inner solve below ``tol``); with the augmented Lagrangian
            also |max(c, -lam / rho)| at most this for every inequality (no positive multiplier
            on a constraint that holds strictly).
        penalty: initial penalty weight rho.
        penalty_factor: rho is multiplied by this after an outer iteration that did not reduce the
            violation to ``penalty_keep`` times the previous one.
        penalty_keep: see ``penalty_factor`` (in (0, 1]; 1 raises rho after every outer iteration).
        penalty_max: the solve ends INFEASIBLE when rho would exceed this while the constraints
            are still violated.
        inner_tol: while the violation v is above ``constraint_tol``, an inner solve ends (and
            the multipliers are updated) when the expected decrease falls below
            max(tol, min(inner_tol, v)): rough solves while the multipliers are still wrong, so
            that penalty and multipliers adapt early (measured: with a fixed 1e-4 instead, the
            track-limited cart-pole takes 335 iterations, a first rough solve at rho = 1 having
            settled in a swing-up far off the track).
        method: ``"al"`` (augmented Lagrangian) or ``"barrier"`` (log barrier on the inequalities,
            interior start).
        barrier: ``method="barrier"``: the initial barrier weight mu.
        barrier_min, barrier_factor: while mu > barrier_min an inner solve ends at an expected
            decrease below max(tol, 10 mu), and then mu <- max(barrier_min, min(barrier_factor mu,
            mu^1.5)) (IPOPT's superlinear rule); at barrier_min the inner solve runs to ``tol``.

    Example:
        >>> CDDPOptions(constraint_tol=1e-7).penalty_factor
        10.0
    """

    line_search: LineSearch = field(default_factory=_fine_line_search)
    second_order_below: float | None = 1e-3
    method: str = "al"
    constraint_tol: float = 1e-8
    penalty: float = 1.0
    penalty_factor: float = 10.0
    penalty_keep: float = 0.05
    penalty_max: float = 1e12
    inner_tol: float = 0.1
    barrier: float = 0.1
    barrier_min: float = 1e-11
    barrier_factor: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        _check("method", self.method, self.method in ("al", "barrier"), "'al' or 'barrier'")
        _check("barrier", self.barrier, is_real(self.barrier) and self.barrier > 0, "> 0")
        _check("barrier_min", self.barrier_min, is_real(self.barrier_min)
               and 0 < self.barrier_min <= self.barrier, "0 < barrier_min <= barrier")
        _check("barrier_factor", self.barrier_factor, is_real(self.barrier_factor)
               and 0 < self.barrier_factor < 1, "a number in (0, 1)")
        _check("stochastic", self.stochastic, self.stochastic is False, "False (CDDP checks every step)")
        for name in ("constraint_tol", "penalty", "inner_tol"):
            _positive(name, getattr(self, name))
        _check("penalty_factor", self.penalty_factor, is_real(self.penalty_factor)
               and math.isfinite(self.penalty_factor) and self.penalty_factor > 1, "a finite number > 1")
        _check("penalty_keep", self.penalty_keep, is_real(self.penalty_keep)
               and 0 < self.penalty_keep <= 1, "a number in (0, 1]")
        _check("penalty_max", self.penalty_max, is_real(self.penalty_max)
               and math.isfinite(self.penalty_max) and self.penalty_max >= self.penalty, "a finite number >= penalty")


@dataclass(frozen=True)
class FDDPOptions(DDPOptions):
    """Options of :class:`occore.FDDP`: those of :class:`DDPOptions` with other defaults, and

    Defaults measured on the reference set (``benchmarks/classic.py``), unlike DDP's and iLQR's
    (crocoddyl's): the Gauss-Newton model switching to the second-order one when the expected
    decrease of a full step falls below 0.1 (``second_order_below``), and step lengths 0.7^k,
    k = 0..19 (swing-ups accept steps of about 0.5 for long stretches; 2^-k offers 1 or 0.5 only),
    tried from two places above the previous step while the iterate has gaps
    (``LineSearch.gap_warm_start``).

    Attributes:
        gap_tol: CONVERGED needs every dynamics gap at most this (besides the expected decrease).
        rollout: how a line-search trial is made. ``"nonlinear"``: the closed-loop rollout of the
            new policy closing the fraction alpha of every gap (Mastalli et al. 2020); once a full
            step is taken the iterates are feasible. ``"linear"``: the multiple-shooting step of
            GNMS / FATROP, (xs + alpha dx, us + alpha du) from the linear model, gaps left open
            and re-evaluated at the trial, accepted on the merit cost + nu ||gaps||_1
            (:mod:`occore.solvers.fddp`): no trial can diverge, and one derivative evaluation per
            trial replaces the rollout (reused by the next iteration when accepted). The result's
            states then agree with a rollout of its controls to ``gap_tol``, not exactly.

    Example:
        >>> FDDPOptions(gap_tol=1e-10).gap_tol
        1e-10
        >>> FDDPOptions(rollout="linear").rollout
        'linear'
    """

    line_search: LineSearch = field(default_factory=_fine_line_search)
    second_order_below: float | None = 0.1
    gap_tol: float = 1e-9
    rollout: str = "nonlinear"

    def __post_init__(self):
        super().__post_init__()
        _check("stochastic", self.stochastic, self.stochastic is False, "False")
        _positive("gap_tol", self.gap_tol)
        _check("rollout", self.rollout, isinstance(self.rollout, str) and self.rollout in ("nonlinear", "linear"),
               "'nonlinear' or 'linear'")
