"""CDDP: constrained DDP by the augmented Lagrangian (ALTRO: Howell, Jackson & Manchester 2019),
through the same loop and seam as DDP / iLQR.

Every iteration is one DDP/iLQR iteration (:class:`occore.solvers.ddp._RiccatiSolver`) on the
*augmented* problem: a :class:`occore.types.ControlProblem` view of the constrained problem whose
cost is J + sum phi(c) for the current multipliers and penalty (:mod:`occore.lq.augmented`), and
whose local model is the problem's, with the penalty terms added to the cost derivatives (the
Riccati sweep itself is unchanged). Control bounds stay with the box-QP sweep and clamped rollouts.
When an inner solve converges (expected decrease below ``inner_tol``, or ``tol`` once the
constraints hold) the multipliers are updated, lam <- phi'(c), and the penalty raised when the
violation did not shrink enough; the solve is CONVERGED when an inner solve at ``tol`` ends with
the violation at most ``constraint_tol`` and (augmented Lagrangian) the multiplier update would move
no multiplier by more than ``constraint_tol`` times the penalty (complementarity:
:func:`occore.lq.augmented.multiplier_change`), and INFEASIBLE when the penalty would pass its maximum.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..errors import InputError
from ..local_model import linear_states
from ..lq.augmented import INFEASIBLE, Multipliers, augment, barrier_duals, merit_terms, multiplier_change, update
from ..result import IterationInfo, Result, Status
from ..types import Trajectory
from .base import SolverState
from .ddp import _RiccatiSolver
from .options import CDDPOptions

__all__ = ["CDDP", "Multipliers"]


class _Point:
    """What an augmented trajectory carries: the problem's own cost, its constraint values and (once
    evaluated) its derivatives, reused when only the multipliers change."""

    __slots__ = ("cost", "values", "derivs")

    def __init__(self, cost, values, derivs=None):
        self.cost, self.values, self.derivs = cost, values, derivs


class _Augmented:
    """The ControlProblem a CDDP iteration sees: ``problem`` with cost J + sum phi(c; multipliers)."""

    def __init__(self, problem, multipliers: Multipliers):
        self.problem, self.multipliers = problem, multipliers
        self.horizon = problem.horizon

    def wrap(self, traj: Trajectory, values=None, derivs=None) -> Trajectory:
        """``traj`` of the problem as a trajectory of the augmented problem (cost = merit)."""
        if values is None:
            values = self.problem.constraint_values(traj.xs, traj.us)
        merit = traj.cost + merit_terms(values, self.multipliers)
        return Trajectory(traj.xs, traj.us, merit if math.isfinite(merit) else math.inf,
                          extras=_Point(traj.cost, values, derivs))

    def rewrap(self, traj: Trajectory) -> Trajectory:
        """An augmented trajectory under these multipliers (no evaluation of the problem)."""
        p = traj.extras
        return self.wrap(Trajectory(traj.xs, traj.us, p.cost), p.values, p.derivs)

    def initial_controls(self):
        return self.problem.initial_controls()

    def rollout(self, us) -> Trajectory:
        return self.wrap(self.problem.rollout(us))

    def rollout_policy(self, ref, policy, alpha) -> Trajectory:
        return self.wrap(self.problem.rollout_policy(ref, policy, alpha))

    def local_model(self, traj: Trajectory, second_order: bool = False):
        p = traj.extras
        if p.derivs is None or p.derivs.second_order != second_order:
            p.derivs = self.problem.evaluate_derivatives(traj.xs, traj.us, second_order)
        cs = self.problem.constraints
        return self.problem.model_of(augment(p.derivs, p.values, self.multipliers, cs.upper_index, cs.lower_index),
                                     traj.us)


class CDDP(_RiccatiSolver):
    """Constrained DDP (augmented Lagrangian): state bounds, path constraints g(x, u) <= 0, terminal
    equalities h(x_T) = 0 and inequalities, besides control bounds.

    ``IterationInfo.cost`` is the problem's cost J of the iterate, ``constraint_violation`` its
    largest violation; ``expected_decrease``, ``actual_decrease`` and ``stop`` refer to the
    augmented merit. The :class:`Result` carries the final :class:`Multipliers` (``multipliers``)
    and ``constraint_violation``; a Result given as ``us0`` warm-starts the controls, the feedback
    gains and the multipliers.

    Args:
        options: a :class:`occore.solvers.options.CDDPOptions` (or give its fields as keywords).
        callbacks: callables ``cb(info, state)``; returning True stops the solve.

    Example:
        >>> import casadi as ca, occore
        >>> prob = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: ca.sumsqr(u), lambda x: 0 * x[0],
        ...                       x0=[1.0], nu=1, horizon=10, x_upper=2.0,
        ...                       terminal_constraints=lambda x: x - 2.0)
        >>> res = occore.CDDP().solve(prob)
        >>> res.status.name, round(res.cost, 6), res.constraint_violation < 1e-8
        ('CONVERGED', 10.0, True)
    """

    name = "cddp"
    Options = CDDPOptions
    supported_constraints = ("state bounds", "path constraints", "terminal equalities", "terminal inequalities")

    @classmethod
    def default_options(cls) -> CDDPOptions:
        return CDDPOptions()

    # -- the iteration --------------------------------------------------------------------------
    def init(self, problem, us0=None, *, traj=None, mu=None) -> SolverState:
        """As :meth:`occore.solvers.base.Solver.init`; a :class:`Result` of CDDP as ``us0`` also
        gives its multipliers as the initial ones."""
        if not hasattr(problem, "constraints") or not hasattr(problem, "constraint_values"):
            raise InputError(f"cddp: expected an occore.Problem (its constraints are declared there), got "
                             f"{type(problem).__name__}")
        state = super().init(problem, us0, traj=traj, mu=mu)
        warm = getattr(us0, "multipliers", None) if isinstance(us0, Result) else None
        if isinstance(warm, Multipliers) and state.multipliers is not None and _fits(warm, state.multipliers):
            view = _Augmented(problem, warm)
            state = replace(state, multipliers=warm, traj=view.rewrap(state.traj))
        return state

    def _first_state(self, problem, state: SolverState) -> SolverState:
        opts = self.options
        barrier = opts.barrier if opts.method == "barrier" else 0.0
        mult = Multipliers.zeros(problem.constraints, opts.penalty, barrier)
        traj = _Augmented(problem, mult).wrap(state.traj)
        if barrier and traj.cost >= INFEASIBLE:
            raise InputError("cddp (method='barrier'): the initial trajectory does not satisfy the inequality "
                             "constraints strictly; the barrier needs an interior start (use method='al')")
        return replace(state, multipliers=mult, traj=traj)

    def _tol(self, state: SolverState) -> float:
        opts, mult = self.options, state.multipliers
        if mult.barrier > opts.barrier_min:
            return max(opts.tol, 10.0 * mult.barrier)
        violation = state.traj.extras.values.violation()
        if violation > opts.constraint_tol:    # the multipliers are still wrong: solve roughly
            return max(opts.tol, min(opts.inner_tol, violation))
        return opts.tol

    def _iterate(self, problem, state: SolverState) -> tuple[SolverState, IterationInfo]:
        opts = self.options
        new, info = super()._iterate(_Augmented(problem, state.multipliers), state)
        point = new.traj.extras
        violation = point.values.violation()
        info = replace(info, cost=point.cost, constraint_violation=violation)
        feasible = violation <= opts.constraint_tol
        inner_done = new.status is Status.CONVERGED or (
            new.status in (Status.LINE_SEARCH_FAILED, Status.REG_LIMIT) and not feasible)
        if not inner_done:
            return new, info
        if new.status is Status.CONVERGED and feasible and info.stop < opts.tol and (
                state.multipliers.barrier <= opts.barrier_min):
            # The multipliers of the result are those at the final iterate, lam <- phi'(c): the KKT
            # estimate there (the ones of the last inner solve differ from it by rho c); with the
            # barrier, the duals of the last LQ subproblem (phi'(c) alone is ill-conditioned).
            mult = (self._barrier_duals(problem, state, new.policy) if state.multipliers.barrier
                    else update(point.values, state.multipliers))
            # Augmented Lagrangian: feasible is not enough. A multiplier still positive on a
            # constraint that holds strictly (complementarity violated) kept the inner solve off
            # that constraint: the iterate minimises J + lam c there, not J (measured: a swing-up
            # with a terminal inequality stopped CONVERGED 1 % above IPOPT's optimum, c = -0.013
            # with lam = 3.96). Then the multipliers are updated and the solve goes on.
            if state.multipliers.barrier or multiplier_change(mult, state.multipliers) <= opts.constraint_tol:
                return replace(new, multipliers=mult,
                               message=f"expected decrease {info.stop:.2e} < tol {opts.tol:g}, constraint "
                                       f"violation {violation:.1e} <= {opts.constraint_tol:g}"), info
        # An inner solve is done, but the constraints do not hold yet (or it stopped at inner_tol):
        # update the multipliers, and raise the penalty unless the violation fell enough since the
        # last update.
        mult = state.multipliers
        rho = mult.penalty
        if not feasible and violation > opts.penalty_keep * mult.violation:
            rho = rho * opts.penalty_factor
        if rho > opts.penalty_max:
            new = replace(new, status=Status.INFEASIBLE,
                          message=f"constraint violation {violation:.1e} > {opts.constraint_tol:g} with the "
                                  f"penalty at its maximum {opts.penalty_max:g}")
            return new, info
        mult = replace(update(point.values, mult), penalty=rho)
        if mult.barrier:
            mu = mult.barrier
            mult = replace(mult, barrier=max(opts.barrier_min, min(opts.barrier_factor * mu, mu ** 1.5)))
        # mu is kept, unless the inner solve ended on the regularisation's cap (scaled by the cost
        # Hessians, see Regularization: a CONVERGED inner solve never passed it)
        keep = new.status is Status.CONVERGED or new.mu <= opts.regularization.maximum
        reg = new.mu if keep else opts.regularization.initial
        new = replace(new, traj=_Augmented(problem, mult).rewrap(new.traj), multipliers=mult, cache=None,
                      status=Status.RUNNING, message="", mu=reg)
        return new, info

    @staticmethod
    def _barrier_duals(problem, state: SolverState, policy) -> Multipliers:
        """:func:`occore.lq.augmented.barrier_duals` at ``state``'s iterate along the step of
        ``policy`` (its backward pass there), the step's states from the linearised dynamics."""
        point = state.traj.extras
        d = point.derivs
        k, K = np.asarray(policy.k, dtype=float), np.asarray(policy.K, dtype=float)
        dxs, dus = linear_states(d, k, K, np.zeros((k.shape[0] + 1, d.fu.shape[1])))
        cs = problem.constraints
        return barrier_duals(point.values, state.multipliers, d, dxs, dus, cs.upper_index, cs.lower_index)

    def result(self, state: SolverState) -> Result:
        res = super().result(state)
        point = state.traj.extras
        if point is None:   # ended in init (initial cost not finite): no augmented point, nothing evaluated
            return replace(res, constraint_violation=math.nan, multipliers=state.multipliers)
        return replace(res, cost=float(point.cost), constraint_violation=point.values.violation(),
                       multipliers=state.multipliers)


def _fits(a: Multipliers, b: Multipliers) -> bool:
    return all(getattr(a, k).shape == getattr(b, k).shape for k in ("g", "upper", "lower", "h")) and a.nh == b.nh
