"""The seam between solvers and problems: two protocols and two immutable values.

Solvers (DDP, iLQR, E-MSA) touch only floats and the objects below. Dense classic problems
(:class:`occore.Problem`) and networks (``nn_adapter.NetworkProblem``) implement the protocols;
the contents of a :class:`Trajectory` or :class:`Policy` are opaque to the solver loop.

Notation (used in kernels and docstrings):

=========  ==============================================================================
symbol     meaning
=========  ==============================================================================
T          horizon (number of stages); t = 0..T-1, states x_0..x_T
nx, nu     state and control sizes (dense problems)
f, l, lf   dynamics x_{t+1} = f(x_t, u_t), stage cost l(x_t, u_t), terminal cost lf(x_T)
fx, fu     dynamics Jacobians, (T, nx, nx) and (T, nx, nu); outputs on rows
fxx...     dynamics Hessians (T, nx, nx, nx), fux (T, nx, nu, nx), fuu (T, nx, nu, nu)
lx, lu     cost gradients (T+1, nx) (row T is lf's) and (T, nu)
lxx...     cost Hessians (T+1, nx, nx), lux (T, nu, nx), luu (T, nu, nu)
Vx, Vxx    value function gradient and Hessian at a stage boundary
Qx...      Q-function derivatives: Qx, Qu, Qxx, Qux, Quu
k, K       feedforward (T, nu) and feedback (T, nu, nx) gains: u = u_ref + alpha k + K dx
mu         Levenberg-Marquardt regularisation >= 0 of the backward pass (see LocalModel.backward)
alpha      line-search step length
p          costates (E-MSA): p_t = dH/dx_t, p_T = -dlf/dx
=========  ==============================================================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Trajectory", "Policy", "ControlProblem", "LocalModel", "shape_text"]


def shape_text(value) -> str:
    """A short description of an array-like field for a repr: ``(T, nx)`` of an array, ``list of
    T`` of a list (a network's states or controls), ``operator`` of a callable, ``none``.

    Example:
        >>> import numpy as np
        >>> shape_text(np.zeros((3, 2))), shape_text([{}, {}]), shape_text(None)
        ('(3, 2)', 'list of 2', 'none')
    """
    if value is None:
        return "none"
    shape = getattr(value, "shape", None)
    if shape is not None and not callable(value):
        return str(tuple(shape))
    if callable(value):
        return "operator"
    try:
        return f"{type(value).__name__} of {len(value)}"
    except TypeError:
        return type(value).__name__


@dataclass(frozen=True)
class Trajectory:
    """States, controls and total cost of one rollout.

    Attributes:
        xs: states; a (T+1, nx) float64 array for dense problems, a list of tensors for networks.
        us: controls; (T, nu) for dense problems, a list of parameter dicts for networks.
        cost: total cost J = sum_t l(x_t, u_t) + lf(x_T), a Python float.
        extras: problem-private data the rollout computed (never read by solvers).

    Example:
        >>> import occore
        >>> prob = occore.problems.make("lqr")
        >>> traj = prob.rollout(prob.initial_controls())
        >>> traj.xs.shape, traj.us.shape       # (T+1, nx), (T, nu)
        ((101, 4), (100, 2))
    """

    xs: Any
    us: Any
    cost: float
    extras: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"Trajectory(xs {shape_text(self.xs)}, us {shape_text(self.us)}, cost={self.cost:.12g})"


@dataclass(frozen=True)
class Policy:
    """Feedback law of one backward pass: u_t = u_ref_t + alpha k_t + K_t (x_t - x_ref_t).

    Attributes:
        k: feedforward gains, (T, nu) for dense problems.
        K: feedback gains, (T, nu, nx) for dense problems; may be an operator (a callable of dx)
            where a matrix would be too large.

    Example:
        >>> import occore
        >>> pol = occore.DDP().solve(occore.problems.make("lqr")).policy
        >>> pol.k.shape, pol.K.shape          # (T, nu), (T, nu, nx)
        ((100, 2), (100, 2, 4))
    """

    k: Any
    K: Any

    def __repr__(self) -> str:
        return f"Policy(k {shape_text(self.k)}, K {shape_text(self.K)})"


@runtime_checkable
class LocalModel(Protocol):
    """Linear-quadratic model of a problem around one trajectory."""

    def backward(self, mu: float, second_order: bool = False) -> tuple[Policy, tuple[float, float]]:
        """Riccati sweep regularised by mu >= 0 (Levenberg-Marquardt; 0 = none, larger = shorter,
        more conservative steps; the solver raises it until this succeeds). Where it enters:
        dense problems (``occore.Problem``) and the network local model with a curvature's Q_uu
        (DDPNOpt's minibatch) add mu I to the next value Hessian V_xx' where it enters the gains
        (the state form of Tassa, Erez & Todorov 2012; for DDPNOpt, whose Q_uu is the
        curvature's, that is its ``eps_vxx``); the same network local model with exact /
        Gauss-Newton Q_uu (``NetworkProblem``) adds mu I to Q_uu (the control form), because full
        second-order DDP on a network needed it (measured: on WINE the state form stalled at
        loss 0.50 in 20 iterations where the control form reaches 2e-5; on the dense swing-ups
        it is the other way round). Returns the policy and (d1, d2) with d1 = sum_t Qu.k,
        d2 = sum_t k.Quu.k, so the expected decrease of step alpha is -(alpha d1 + alpha^2 d2 / 2)
        (NaN where a model does not compute it; only the stochastic step accepts that).
        Raises :class:`occore.errors.NotPositiveDefinite`."""

    def costates(self) -> Any:
        """Costates p_0..p_T of the adjoint sweep (p_T = -dlf/dx, p_t = fx' p_{t+1} - lx)."""

    def control_gradient(self) -> Any:
        """dJ/du_t for every stage, the same structure as the controls."""

    def gradient_norm(self) -> float:
        """Euclidean norm of :meth:`control_gradient` over all stages."""


@runtime_checkable
class ControlProblem(Protocol):
    """What a solver needs from a problem."""

    horizon: int

    def initial_controls(self) -> Any:
        """The default initial guess (zeros for dense problems, current parameters for networks)."""

    def rollout(self, us: Any) -> Trajectory:
        """Open-loop rollout of controls ``us`` (clamped to the bounds, if any)."""

    def rollout_policy(self, ref: Trajectory, policy: Policy, alpha: float) -> Trajectory:
        """Closed-loop rollout u_t = clamp(ref.us_t + alpha k_t + K_t (x_t - ref.xs_t))."""

    def local_model(self, traj: Trajectory, second_order: bool = False) -> LocalModel:
        """Derivatives of the whole horizon at ``traj`` (one evaluation for all stages)."""
