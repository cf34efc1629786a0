"""E-MSA, the extended method of successive approximations (Li, Chen, Tai & E, "Maximum principle
based algorithms for deep learning", JMLR 18(165), 2018), as the authors' code runs it.

Each iteration: the states of the current controls (forward), their costates (backward,
p_T = -dlf/dx, p_t = dH_t/dx), then, for every stage independently, a maximisation over u_t of the
augmented Hamiltonian

    H_t(x_t, p_{t+1}, u) - rho/2 |x_{t+1} - f_t(x_t, u)|^2 - rho/2 |p_t - dH_t/dx(x_t, p_{t+1}, u)|^2

(the problem's ``maximize_hamiltonian``; vectorised over the horizon where the backend allows).
The new controls are rolled out. With the adaptive rho schedule (on by default) a trial that does
not lower J is rejected and rho raised; an accepted one lowers rho. There is no line search on an
expected decrease: the stop value is the norm of the control gradient of J.

Convergence on LQR problems (stated bound, tested in tests/occore/test_hardening_emsa.py): with the
defaults, on stable LQRs (spectral radius of A <= 0.95, nx 2..8, nu 1..4, diagonal weights within
[0.1, 10], T = 30), E-MSA ends CONVERGED within 1500 iterations, within 1e-6 of the optimum
(measured worst over 20 seeds: 1185). On an LQR the E-MSA step is a gradient step preconditioned
stage by stage by (R + rho B'B)^-1, so its iteration count grows with the condition number of the
problem: the momentum of ``EMSAOptions.momentum`` makes that growth a square root (without it the
same family needs up to 2364 iterations, and nearly unstable systems, spectral radius ~1, need
1e4-1e5 at the best fixed rho; with it, still several thousand: no bound is claimed there).

E-MSA remains a first-order-like method: on swing-ups it creeps. Use DDP/iLQR to converge; use
E-MSA to compare, or where only per-stage maximisations are cheap. Measured with the defaults from
the zero guess: the reference LQR converges (|dJ/du| < 1e-4) in 805 iterations, 1.3e-9 from the
Riccati optimum; after 3000 iterations the pendulum swing-up is at 7.3x its optimal cost, the
cart-pole at 6.1x, the boxed pendulum at 2.1x and the unicycle 6e-6 above its optimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..result import IterationInfo, Status
from ..validation import is_integer, is_real
from .base import Solver, SolverState
from .ddp import curvature_scale
from .options import _check

__all__ = ["EMSA", "EMSAOptions", "InnerSolver"]

_INNER_METHODS = ("auto", "newton", "gradient", "lbfgs")


def _number(value) -> bool:
    return is_real(value) and math.isfinite(value)


@dataclass(frozen=True)
class InnerSolver:
    """The per-stage maximisation of the augmented Hamiltonian.

    Attributes:
        method: "auto" (the problem's first ``inner_methods`` entry: "newton" for dense problems),
            "newton" (dense problems), "gradient" (projected gradient ascent, every problem) or
            "lbfgs" (networks: torch.optim.LBFGS per layer, as the authors' L-BFGS-B).
        iterations: inner iterations per E-MSA iteration (the authors' code: 10).
        step_size: step of the gradient method (and the learning rate of "lbfgs").

    Example:
        >>> InnerSolver(method="gradient", step_size=0.1).iterations
        10
    """

    method: str = "auto"
    iterations: int = 10
    step_size: float = 1.0

    def __post_init__(self):
        _check("inner.method", self.method, self.method in _INNER_METHODS, f"one of {_INNER_METHODS}")
        _check("inner.iterations", self.iterations, is_integer(self.iterations) and self.iterations >= 1,
               "an integer >= 1")
        object.__setattr__(self, "iterations", int(self.iterations))
        _check("inner.step_size", self.step_size, _number(self.step_size) and self.step_size > 0,
               "a finite number > 0")


@dataclass(frozen=True)
class EMSAOptions:
    """Options of :class:`EMSA`.

    Attributes:
        max_iter: iteration limit (rejected trials count as iterations).
        tol: stop (CONVERGED) when the norm of dJ/du over all stages (with bounds, of its
            projection) is below ``tol * min(1, s)``, s the largest entry of the cost Hessians
            (l_xx, the terminal one included, and l_uu) at the initial iterate, measured once
            (``SolverState.scale``; 1 where the problem's local model has none, the networks, or
            where the cost has no curvature). dJ/du scales with the cost, s too, so |dJ/du| / s is
            about a distance in u: with an absolute tol a cost multiplied by 1e-6 (a double
            integrator, T = 10) ended CONVERGED after 1 iteration 37 % above the optimum (T = 40:
            12 iterations, 2.2x); it now ends in 62 (345), 2.5e-7 (3.7e-6) above it. Costs whose
            Hessians reach 1 (every reference problem, the LQR family above) see ``tol`` itself.
        ftol: also stop (CONVERGED) when a trial changes J by at most ``ftol * max(1, |J|)`` (default
            1e-14, about 45 rounding units of J): no progress is measurable any more (a fixed point of the iteration up to rounding). On
            stiff problems (swing-ups) dJ/du stays far from 0 at the optimum DDP finds, since
            rounding the controls at 1e-9 moves it by ~0.1; this rule is what stops there.
        rho: initial penalty weight of the feasibility terms (>= 0; 0 with one exact inner
            maximisation is the basic MSA). None (default): the problem's choice, its
            ``emsa_rho`` attribute where it has one (a network with a mean loss over B samples
            takes 1/B: its Hamiltonian carries 1/B per sample, the feasibility terms do not), else
            1.0.
        adaptive_rho: reject a trial that does not lower J and raise rho; lower rho after an
            accepted one. Off: every trial is accepted.
        rho_increase: factor applied to rho on a rejected trial.
        rho_decrease: divisor applied to rho on an accepted trial.
        rho_min: rho never goes below this when lowered, and a rejection raises rho to at least
            ``rho_min * rho_increase``.
        rho_max: the solve stops (REG_LIMIT) when rho would exceed it.
        inner: the inner maximisation, an :class:`InnerSolver` (or a method name, or a dict of its
            fields).
        momentum: accelerate the outer iteration (Nesterov's extrapolation with adaptive restart,
            O'Donoghue & Candes 2015): the E-MSA step is taken from y = u_k + beta_k (u_k - u_{k-1}),
            beta_k = j / (j + 3) after j accepted steps since the last restart; when that trial
            does not lower J, the plain step from u_k is tried in the same iteration and the
            momentum restarts. Needs ``adaptive_rho`` (the monotone test) and a problem with
            ``extrapolate_controls`` (dense problems); ignored otherwise. Why: on an LQR the plain
            E-MSA step is a gradient step preconditioned stage by stage, whose iteration count
            grows like the condition number of the problem (measured at the best fixed rho:
            2e4-2e5 iterations to 1e-6 on random LQRs of nx <= 8, T = 30, with the spectral radius
            of A up to 1.05); with momentum it grows like its square root.

    Example:
        >>> EMSAOptions(rho=0.5, inner="gradient").inner.method
        'gradient'
    """

    max_iter: int = 3000
    tol: float = 1e-4
    ftol: float = 1e-14
    rho: float | None = None
    adaptive_rho: bool = True
    rho_increase: float = 10.0
    rho_decrease: float = 1.1
    rho_min: float = 1e-6
    rho_max: float = 1e16
    inner: InnerSolver = field(default_factory=InnerSolver)
    momentum: bool = True

    def __post_init__(self):
        if isinstance(self.inner, str):
            object.__setattr__(self, "inner", InnerSolver(method=self.inner))
        elif isinstance(self.inner, dict):
            object.__setattr__(self, "inner", InnerSolver(**self.inner))
        _check("inner", self.inner, isinstance(self.inner, InnerSolver), "an InnerSolver, a method name or a dict")
        _check("max_iter", self.max_iter, is_integer(self.max_iter) and self.max_iter >= 1, "an integer >= 1")
        object.__setattr__(self, "max_iter", int(self.max_iter))
        _check("tol", self.tol, _number(self.tol) and self.tol > 0, "a finite number > 0")
        _check("ftol", self.ftol, _number(self.ftol) and self.ftol >= 0, "a finite number >= 0")
        _check("rho", self.rho, self.rho is None or (_number(self.rho) and self.rho >= 0),
               "None or a finite number >= 0")
        _check("adaptive_rho", self.adaptive_rho, isinstance(self.adaptive_rho, bool), "True or False")
        _check("momentum", self.momentum, isinstance(self.momentum, bool), "True or False")
        for name in ("rho_increase", "rho_decrease"):
            v = getattr(self, name)
            _check(name, v, _number(v) and (v > 1 if name == "rho_increase" else v >= 1),
                   "a finite number > 1" if name == "rho_increase" else "a finite number >= 1")
        _check("rho_min", self.rho_min, _number(self.rho_min) and self.rho_min > 0, "a finite number > 0")
        _check("rho_max", self.rho_max, _number(self.rho_max) and self.rho_max >= max(self.rho or 0.0, self.rho_min),
               ">= rho and >= rho_min")


class EMSA(Solver):
    """Extended method of successive approximations (Li, Chen, Tai & E, JMLR 2018).

    Works on any :class:`occore.types.ControlProblem` that also offers ``maximize_hamiltonian``
    (dense :class:`occore.Problem` and networks); the loop sees only floats and opaque objects.
    ``IterationInfo.stop`` is |dJ/du| of the iterate after the iteration, ``regularization`` is rho,
    ``step`` is 1 for an accepted trial and 0 for a rejected one.

    Args:
        options: an :class:`EMSAOptions` (or give its fields as keywords, e.g. ``rho=1.0``).
        callbacks: callables ``cb(info, state)``; returning True stops the solve.

    Example:
        >>> import occore
        >>> res = occore.EMSA(max_iter=50).solve(occore.problems.make("unicycle"))
        >>> res.history[-1].cost <= res.history[0].cost, res.solver
        (True, 'emsa')
    """

    name = "emsa"
    Options = EMSAOptions
    needs = ("maximize_hamiltonian",)

    def _initial_mu(self, problem) -> float:
        if self.options.rho is not None:
            return float(self.options.rho)
        rho = getattr(problem, "emsa_rho", None)
        return 1.0 if rho is None else float(rho)

    def _inner(self, problem) -> InnerSolver:
        inner = self.options.inner
        if inner.method == "auto":
            methods = getattr(problem, "inner_methods", ("gradient",))
            inner = replace(inner, method=methods[0])
        return inner

    @staticmethod
    def _model(problem, traj):
        """The local model of ``traj`` and its gradient norm (overflow is reported as inf, not warned)."""
        with np.errstate(over="ignore", invalid="ignore"):
            lm = problem.local_model(traj, False)
            return lm, float(lm.gradient_norm())

    def _first_state(self, problem, state: SolverState) -> SolverState:
        lm, gnorm = self._model(problem, state.traj)
        return replace(state, cache=(lm, gnorm, None, 0, state.traj), scale=curvature_scale(lm))

    def _gtol(self, state: SolverState) -> float:
        """The stop value of |dJ/du|: ``tol * min(1, s)``, s the cost's scale (EMSAOptions.tol)."""
        tol = self.options.tol
        return tol * min(1.0, state.scale) if state.scale is not None else tol

    def _converged(self, state: SolverState, gnorm: float, gtol: float) -> str:
        scaled = "" if gtol == self.options.tol else f" x the cost's scale {state.scale:.3g} = {gtol:.3g}"
        return f"|dJ/du| = {gnorm:.2e} < tol {self.options.tol:g}{scaled}"

    def _trial(self, problem, traj, lm, rho):
        """The E-MSA step from ``traj`` (its local model ``lm``): the new controls' rollout."""
        return problem.rollout(problem.maximize_hamiltonian(traj, lm.costates(), rho, self._inner(problem)))

    def _accelerated_trial(self, problem, traj, prev_us, j, rho):
        """The E-MSA step from the extrapolated controls, or None when it does not lower J."""
        beta = j / (j + 3.0)
        y = problem.rollout(problem.extrapolate_controls(traj.us, prev_us, beta))
        if not math.isfinite(y.cost):
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            trial = self._trial(problem, y, problem.local_model(y, False), rho)
        return trial if math.isfinite(trial.cost) and trial.cost < traj.cost else None

    def _iterate(self, problem, state: SolverState) -> tuple[SolverState, IterationInfo]:
        opts = self.options
        traj, rho = state.traj, state.mu
        lm, gnorm, prev_us, j, best = state.cache
        if not math.isfinite(gnorm):
            return self._end(state, Status.NON_FINITE, "non-finite control gradient", rho, gnorm)
        gtol = self._gtol(state)
        if gnorm < gtol:
            return self._end(state, Status.CONVERGED, self._converged(state, gnorm, gtol), rho, gnorm)

        trial = None
        if (opts.momentum and opts.adaptive_rho and j > 0 and prev_us is not None
                and hasattr(problem, "extrapolate_controls")):
            trial = self._accelerated_trial(problem, traj, prev_us, j, rho)
        j = j + 1 if trial is not None else 0            # a failed extrapolation restarts the momentum
        if trial is None:
            trial = self._trial(problem, traj, lm, rho)
        actual = traj.cost - trial.cost
        finite = math.isfinite(trial.cost)
        stalled = finite and abs(actual) <= opts.ftol * max(1.0, abs(traj.cost))
        if finite and (not opts.adaptive_rho or trial.cost < traj.cost):
            new_lm, new_norm = self._model(problem, trial)
            if opts.adaptive_rho:
                rho = max(rho / opts.rho_decrease, opts.rho_min)
            best = trial if trial.cost < best.cost else best
            new = replace(state, traj=trial, mu=rho, cache=(new_lm, new_norm, traj.us, max(j, 1), best))
            if not math.isfinite(new_norm):
                new = replace(new, status=Status.NON_FINITE, message="non-finite control gradient")
            elif new_norm < gtol:
                new = replace(new, status=Status.CONVERGED, message=self._converged(state, new_norm, gtol))
            elif stalled:
                new = replace(new, status=Status.CONVERGED, message=self._stalled(actual, new_norm))
            return new, self._info(state, cost=trial.cost, expected_decrease=float("nan"), actual_decrease=actual,
                                   step=1.0, regularization=rho, stop=new_norm)
        if stalled:   # the trial changed J only at rounding level: a fixed point of the iteration
            return self._end(state, Status.CONVERGED, self._stalled(actual, gnorm), rho, gnorm, actual=actual)
        if not opts.adaptive_rho:
            return self._end(state, Status.NON_FINITE, "the trial controls gave a non-finite cost", rho, gnorm,
                             actual=float("nan"))
        rho = max(rho, opts.rho_min) * opts.rho_increase
        if rho > opts.rho_max:
            why = "non-finite" if not finite else "no lower"
            return self._end(state, Status.REG_LIMIT, f"rho above rho_max={opts.rho_max:g} ({why} cost)",
                             rho, gnorm, actual=actual if finite else float("nan"))
        new = replace(state, mu=rho, cache=(lm, gnorm, prev_us, 0, best))
        return new, self._info(state, cost=traj.cost, expected_decrease=float("nan"),
                               actual_decrease=actual if finite else float("nan"), step=0.0,
                               regularization=rho, stop=gnorm, accepted=False)

    def result(self, state: SolverState):
        """The Result of ``state``, with the best iterate seen (without the adaptive schedule a
        trial that raises J is accepted, so the last iterate need not be the best)."""
        best = state.cache[4] if state.cache is not None and len(state.cache) > 4 else None
        if best is not None and math.isfinite(best.cost) and not best.cost >= state.traj.cost:
            note = f"; the best iterate (cost {best.cost:.6g}) is returned, not the last"
            state = replace(state, traj=best, message=state.message + note)
        return super().result(state)

    def _stalled(self, actual, gnorm) -> str:
        return (f"J changed by {abs(actual):.1e} <= ftol * max(1, |J|) (ftol {self.options.ftol:g}); "
                f"|dJ/du| = {gnorm:.2e}")

    def _end(self, state, status, message, rho, gnorm, actual=0.0):
        new = replace(state, mu=rho, status=status, message=message)
        return new, self._info(state, cost=state.traj.cost, expected_decrease=float("nan"),
                               actual_decrease=actual, step=0.0, regularization=rho, stop=gnorm,
                               accepted=False)
