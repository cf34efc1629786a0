"""DDP (Mayne 1966; Jacobson & Mayne 1970) and iLQR (Li & Todorov 2004): one loop, two models.

Each iteration: the local model of the current trajectory (derivatives of the whole horizon in one
call), a Riccati sweep with Levenberg-Marquardt regularisation of Quu (raised on a failed
factorisation), then a backtracking line search on the expected decrease, rolling out the feedback
policy u = u_ref + alpha k + K (x - x_ref); with ``stochastic=True`` (minibatch training, DDPNOpt) the
full step is taken without a cost check. Control bounds are handled by the problem's local model
(projected-Newton box QP, Tassa, Mansard & Todorov 2014) and its clamped rollouts.
"""
from __future__ import annotations

import math
from dataclasses import replace

from ..errors import NotPositiveDefinite
from ..result import IterationInfo, Status
from .base import Solver, SolverState
from .options import DDPOptions, Regularization

__all__ = ["DDP", "ILQR", "MAX_RAISES", "COST_ROUNDING", "curvature_scale", "mu_cap"]

#: most regularisation increases in one backward pass before the solve ends with REG_LIMIT (the
#: default factor 10 spans the range 1e-9..1e9 in 18, up to a cap of 1e17 (cost Hessians of 1e8, see
#: :func:`mu_cap`) in 26)
MAX_RAISES = 100
#: an expected decrease below COST_ROUNDING |J| (about 45 rounding units of J) counts as converged
#: whatever ``tol`` says: the line search compares costs and cannot measure a smaller decrease
#: (E-MSA's ``ftol`` rule). It matters only where |J| > tol / COST_ROUNDING (1e5 at the default tol):
#: a cost weighted by 1e6 ended LINE_SEARCH_FAILED at the optimum after 100 iterations of rounding noise.
COST_ROUNDING = 1e-14


def curvature_scale(lm) -> float:
    """The largest entry of the cost Hessians of the local model ``lm`` (its ``curvature_scale()``),
    or 1.0 for a model without one (the network local models) or without curvature (a linear cost)."""
    scale = getattr(lm, "curvature_scale", None)
    if not callable(scale):
        return 1.0
    s = float(scale())
    return s if 0.0 < s < math.inf else 1.0     # (nan: False)


def mu_cap(reg: Regularization, scale: float | None) -> float:
    """The largest mu a backward pass or a line search may use: ``reg.maximum * max(1, scale)``,
    ``scale`` the largest entry of the cost Hessians at the solve's first iterate (see
    :class:`Regularization`; None: ``maximum`` itself). mu enters next to those Hessians, so a cost
    multiplied by c needs a c times larger mu for the same step, and the cap follows it."""
    return reg.maximum * max(1.0, scale) if scale is not None else reg.maximum


def _trials(problem, traj, policy, steps):
    """(alpha, closed-loop rollout at alpha) for each step length in order, lazily: one rollout at a
    time, or ``problem.rollout_batch`` of them in one call where the problem offers that (the
    compiled torch backend: several trials cost about one); the caller stops at the first it accepts."""
    batch = getattr(problem, "rollout_batch", 1)
    for i in range(0, len(steps), batch):
        chunk = steps[i:i + batch]
        trials = (problem.rollout_policies(traj, policy, chunk) if batch > 1
                  else [problem.rollout_policy(traj, policy, alpha) for alpha in chunk])
        yield from zip(chunk, trials)


def _steps(ls, state, gapped: bool) -> tuple:
    """The step lengths this iteration's line search tries: ``ls.steps``, or, on an iterate with gaps
    after an iteration that accepted a step shorter than the first, those from
    ``ls.gap_warm_start`` places above that step on (see :class:`LineSearch`)."""
    steps = ls.steps
    if gapped and ls.gap_warm_start is not None and state.history:
        last = state.history[-1].step
        if last in steps and last != steps[0]:
            return steps[max(0, steps.index(last) - ls.gap_warm_start):]
    return steps


class _RiccatiSolver(Solver):
    """The shared DDP/iLQR iteration; ``second_order`` selects the model."""

    Options = DDPOptions
    second_order = False
    needs = ("rollout_policy",)

    def _initial_mu(self, problem) -> float:
        return self.options.regularization.initial

    def _iterate(self, problem, state: SolverState) -> tuple[SolverState, IterationInfo]:
        reg = self.options.regularization
        traj, mu = state.traj, state.mu
        second_order = self._second_order(state)
        lm = state.cache     # the local model of traj after a rejected step (of the wrong order: rebuilt)
        if lm is None or (second_order and not getattr(getattr(lm, "derivs", None), "second_order", True)):
            lm = problem.local_model(traj, second_order)
        if state.scale is None:     # measured once per solve (the regularisation's cap)
            state = replace(state, scale=curvature_scale(lm))

        # Backward pass, raising mu until every Quu + mu I is positive definite (at most
        # MAX_RAISES raises per iteration: a factor barely above 1 must not loop for ever).
        tol = self._tol(state)
        baseline = max(reg.initial, reg.minimum)
        # No second look after a rejected step: mu was raised from below because the steps of the
        # smaller ones failed at this very iterate, so going back would only repeat them (a cycle:
        # back to the baseline, rejected, raised again to where the expected decrease is small).
        retried = bool(state.history) and not state.history[-1].accepted
        relooked, raises = retried, 0
        while True:
            try:
                policy, (d1, d2) = lm.backward(mu, second_order)
            except NotPositiveDefinite as err:
                mu = reg.increase(mu)
                if mu > (cap := mu_cap(reg, state.scale)):
                    return self._stop(state, lm, Status.REG_LIMIT,
                                      f"regularisation above {cap:g} ({err})", mu)
                raises += 1
                if raises > MAX_RAISES:
                    return self._stop(state, lm, Status.REG_LIMIT,
                                      f"Q_uu still not positive definite after {MAX_RAISES} regularisation "
                                      f"increases (mu = {mu:.3g}, factor {reg.factor!r}; {err})", mu)
                continue
            # A large mu shrinks the step and with it the expected decrease: a small one means
            # convergence only at the baseline regularisation, so look again there. Not with gaps:
            # there the model may predict an increase (closing them costs) at every mu, which is no
            # sign of convergence, and going back to the baseline would keep mu from ever growing.
            if (-(d1 + 0.5 * d2) < tol and getattr(lm, "max_gap", 0.0) <= self._gap_tol()
                    and mu > baseline * reg.factor and not (relooked or self.options.stochastic)):
                mu, relooked = baseline, True
                continue
            break
        if self.options.stochastic:
            return self._full_step(problem, state, policy, mu, -(d1 + 0.5 * d2))
        if not (math.isfinite(d1) and math.isfinite(d2)):
            return self._stop(state, lm, Status.NON_FINITE, "non-finite derivatives in the backward pass", mu)
        full = -(d1 + 0.5 * d2)
        if full < tol and getattr(lm, "max_gap", 0.0) <= self._gap_tol():
            # Converged. The remaining (tiny) full step is still taken when it does not raise the
            # cost (beyond rounding): it removes the O(mu) bias the regularisation left in the last step.
            trial = problem.rollout_policy(traj, policy, 1.0)
            polish = math.isfinite(trial.cost) and trial.cost - traj.cost <= 1e-14 * abs(traj.cost)
            new = replace(state, traj=trial if polish else traj, mu=mu, policy=policy,
                          cache=None if polish else lm, status=Status.CONVERGED,
                          message=f"expected decrease {full:.2e} < tol {tol:g}")
            return new, self._info(state, cost=new.traj.cost, expected_decrease=full,
                                   actual_decrease=traj.cost - new.traj.cost, step=1.0 if polish else 0.0,
                                   regularization=mu, stop=full, accepted=polish)

        # Line search on the expected decrease.
        ls = self.options.line_search
        gapped = getattr(lm, "max_gap", 0.0) > 0.0
        merit = getattr(lm, "decrease", None)    # a merit's decrease instead of the cost's (FDDP rollout="linear")
        steps = _steps(ls, state, gapped)
        nonfinite = 0       # (steps is never empty: the loop sets expected and actual)
        for alpha, trial in _trials(problem, traj, policy, steps):
            expected = -(alpha * d1 + 0.5 * alpha * alpha * d2)
            if not math.isfinite(trial.cost):
                nonfinite += 1
                actual = float("nan")
                continue
            actual = traj.cost - trial.cost if merit is None else merit(traj, trial)
            if expected > 0:
                ok = actual > ls.accept_ratio * expected
            else:   # only a model with gaps predicts an increase: FDDP closing them (Mastalli et al. 2020)
                ok = gapped and actual >= ls.accept_increase * expected
            if ok:
                mu = reg.after_step(mu, alpha)
                new = replace(state, traj=trial, mu=mu, policy=policy, cache=None)
                return new, self._info(state, cost=trial.cost, expected_decrease=expected,
                                       actual_decrease=actual, step=alpha, regularization=mu, stop=full)
        if nonfinite == len(steps):
            return self._stop(state, lm, Status.NON_FINITE,
                              "every line-search trial gave a non-finite cost", mu, policy, full)
        mu = reg.increase(mu)
        if mu > (cap := mu_cap(reg, state.scale)):
            return self._stop(state, lm, Status.LINE_SEARCH_FAILED,
                              f"no step length decreased the cost (regularisation above {cap:g})",
                              mu, policy, full)
        new = replace(state, mu=mu, policy=policy, cache=lm)
        return new, self._info(state, cost=traj.cost, expected_decrease=expected, actual_decrease=actual,
                               step=0.0, regularization=mu, stop=full, accepted=False)

    def _second_order(self, state: SolverState) -> bool:
        """Whether this iteration uses the dynamics Hessians (see ``DDPOptions.second_order_below``)."""
        below = getattr(self.options, "second_order_below", None)
        if below is None:
            return self.second_order
        if not state.history:
            return False
        last = state.history[-1]     # (a multiple-shooting iterate with gaps stays Gauss-Newton)
        return 0.0 <= last.stop < below and last.gap == 0.0

    def _tol(self, state: SolverState) -> float:
        """The stop tolerance on the expected decrease of a full step (CDDP: of its inner solve):
        ``tol``, or the rounding level of the cost where that is larger (:data:`COST_ROUNDING`)."""
        cost = state.traj.cost
        return max(self.options.tol, COST_ROUNDING * abs(cost)) if math.isfinite(cost) else self.options.tol

    def _gap_tol(self) -> float:
        """Largest dynamics gap of a converged multiple-shooting iterate (FDDP)."""
        return 0.0

    def _full_step(self, problem, state, policy, mu, expected):
        """``stochastic=True``: the full step, taken without looking at its cost."""
        trial = problem.rollout_policy(state.traj, policy, 1.0)
        new = replace(state, traj=trial, mu=mu, policy=policy, cache=None)
        return new, self._info(state, cost=trial.cost, expected_decrease=expected,
                               actual_decrease=state.traj.cost - trial.cost, step=1.0,
                               regularization=mu, stop=expected)

    def _stop(self, state, lm, status, message, mu, policy=None, stop=float("nan")):
        new = replace(state, mu=mu, cache=lm, status=status, message=message,
                      policy=policy if policy is not None else state.policy)
        return new, self._info(state, cost=state.traj.cost, expected_decrease=float("nan"),
                               actual_decrease=float("nan"), step=0.0, regularization=mu, stop=stop,
                               accepted=False)


class DDP(_RiccatiSolver):
    """Full second-order DDP: Q terms include the dynamics Hessians contracted with V_x'.

    Args:
        options: a :class:`occore.solvers.options.DDPOptions` (or give its fields as keywords).
        callbacks: callables ``cb(info, state)``; returning True stops the solve.

    Example:
        >>> import occore
        >>> res = occore.DDP(max_iter=100).solve(occore.problems.make("pendulum"))
        >>> res.status.name, round(res.cost, 6)
        ('CONVERGED', 3.038501)
    """

    name = "ddp"
    second_order = True

    @classmethod
    def default_options(cls) -> DDPOptions:
        """Regularisation factor 4 instead of 10: the second-order model needs a gentler schedule
        (measured on the reference set: cart-pole 131 iterations instead of 178)."""
        return DDPOptions(regularization=Regularization(factor=4.0))


class ILQR(_RiccatiSolver):
    """iLQR (Gauss-Newton DDP): the dynamics are linearised, their Hessians dropped.

    Example:
        >>> import occore
        >>> res = occore.ILQR().solve(occore.problems.make("lqr"))
        >>> res.iterations, round(res.cost, 10)
        (2, 5.1236462179)
    """

    name = "ilqr"
    second_order = False
