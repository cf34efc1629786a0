"""Declaration of a dense discrete-time optimal-control problem.

    minimise  J(U) = sum_{t<T} l(x_t, u_t[, p_t]) + lf(x_T[, p_T])
    subject to x_{t+1} = f(x_t, u_t[, p_t]),  x_0 given,  lower_t <= u_t <= upper_t
               and optionally x_lower_t <= x_t <= x_upper_t (t >= 1), g(x_t, u_t[, p_t]) <= 0,
               h(x_T[, p_T]) == 0, h_I(x_T[, p_T]) <= 0    (see :mod:`occore.constraints`)
"""
from __future__ import annotations

import logging

import numpy as np

from .constraints import ConstraintSet, ConstraintValues
from .derivatives import BACKENDS, make_backend
from .derivatives.base import nan_derivatives
from .errors import InputError, OccoreError, ShapeError
from .local_model import DenseLocalModel
from .types import Policy, Trajectory
from .validation import float_array, is_integer

__all__ = ["Problem"]

log = logging.getLogger("occore")


def _int(name: str, value, minimum: int = 1) -> int:
    if not is_integer(value) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _bound(name: str, value, T: int, nu: int, missing: float) -> np.ndarray:
    """A bound given as scalar, (nu,) or (T, nu), as a read-only (T, nu) float64 array; None gives
    ``missing`` (an infinite value) everywhere."""
    if value is None:
        return _frozen(np.full((T, nu), missing))
    arr = float_array(value, name)
    if arr.ndim == 0 or arr.shape == (nu,):
        arr = np.broadcast_to(arr, (T, nu)).copy()
    elif arr.shape != (T, nu):
        raise ShapeError(name, f"() or ({nu},) or ({T}, {nu})", arr.shape)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: expected finite values, got {arr[~np.isfinite(arr)][:3].tolist()}...")
    return _frozen(arr)


def _guarded(rollout, *args):
    """``rollout(*args)``, or None (logged) when a user function raises inside it."""
    try:
        return rollout(*args)
    except OccoreError:
        raise
    except Exception as err:  # noqa: BLE001 - a user function failing at a trial point is numerical trouble
        log.warning("a problem function raised during a rollout (%s: %s); the trial counts as a "
                    "non-finite cost", type(err).__name__, err)
        return None


class Problem:
    """A dense optimal-control problem: dynamics, costs, initial state, horizon, optional bounds and
    constraints.

    Args:
        dynamics: f(x, u) -> x_next (f(x, u, p) with params), written with the backend's operations.
        stage_cost: l(x, u) -> scalar (l(x, u, p)).
        terminal_cost: lf(x) -> scalar (lf(x, p)).
        x0: initial state, (nx,).
        nu: number of controls.
        horizon: number of stages T.
        u_lower, u_upper: control bounds: scalar, (nu,) or (T, nu), finite; None for no bound on
            that side.
        x_lower, x_upper: state bounds on x_1..x_T: scalar, (nx,) or (T+1, nx) (row 0, x0's, is
            ignored); -inf / inf (or None) for no bound.
        path_constraints: g(x, u) -> vector (ng,) (g(x, u, p)); g <= 0 at every stage t < T.
        terminal_constraints: h(x) -> vector (nh,) (h(x, p)); h == 0 at x_T.
        params: stage parameters (T+1, np): row t goes to stage t, row T to the terminal cost.
        backend: "casadi" (default), "torch" or "finite_difference" (numpy callables).
        name: optional label used in tables.
        terminal_inequalities: h_I(x) -> vector (nhi,) (h_I(x, p)); h_I <= 0 at x_T (keyword only).
        backend_options: the backend's options: ``{"compile": "auto" | "always" | "never"}`` for
            "torch" (see :mod:`occore.derivatives.torch_compile`).

    Constraint functions return a column (casadi) or a 1-D tensor / array; a scalar counts as one
    value. Only :class:`occore.CDDP` (and the IPOPT reference) solve problems with state, path or
    terminal constraints; the other solvers refuse them with an :class:`occore.InputError`.

    Raises:
        ShapeError, InputError, DerivativeError: at construction, naming the argument (a constraint
            function of the wrong shape, or non-finite at (x0, u = 0); infeasible bounds).

    Example:
        >>> import casadi as ca, occore
        >>> prob = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: ca.sumsqr(x) + ca.sumsqr(u),
        ...                       lambda x: 10 * ca.sumsqr(x), x0=[1.0], nu=1, horizon=20)
        >>> res = occore.ILQR().solve(prob)
        >>> res.converged, res.us.shape
        (True, (20, 1))
    """

    def __init__(self, dynamics, stage_cost, terminal_cost, x0, nu, horizon, u_lower=None, u_upper=None,
                 x_lower=None, x_upper=None, path_constraints=None, terminal_constraints=None,
                 params=None, backend="casadi", name=None, backend_options=None, *, terminal_inequalities=None):
        for arg, fn in (("dynamics", dynamics), ("stage_cost", stage_cost), ("terminal_cost", terminal_cost)):
            if not callable(fn):
                raise InputError(f"{arg}: expected a callable, got {type(fn).__name__}")
        for arg, fn in (("path_constraints", path_constraints), ("terminal_constraints", terminal_constraints),
                        ("terminal_inequalities", terminal_inequalities)):
            if fn is not None and not callable(fn):
                raise InputError(f"{arg}: expected a callable or None, got {type(fn).__name__}")
        self.dynamics, self.stage_cost, self.terminal_cost = dynamics, stage_cost, terminal_cost
        self.path_constraints = path_constraints
        self.terminal_constraints = terminal_constraints
        self.terminal_inequalities = terminal_inequalities
        x0 = float_array(x0, "x0", "a vector of numbers")
        if x0.ndim != 1 or x0.size == 0:
            raise ShapeError("x0", "(nx,)", x0.shape)
        if not np.all(np.isfinite(x0)):
            raise InputError(f"x0: expected finite values, got {x0.tolist()}")
        self.x0 = _frozen(x0)
        self.nx = x0.size
        self.nu = _int("nu", nu)
        self.horizon = _int("horizon", horizon)
        T = self.horizon
        if u_lower is None and u_upper is None:
            self.u_lower = self.u_upper = None
        else:  # a missing side is unbounded
            self.u_lower = _bound("u_lower", u_lower, T, self.nu, -np.inf)
            self.u_upper = _bound("u_upper", u_upper, T, self.nu, np.inf)
        if self.u_lower is not None:
            bad = np.argwhere(self.u_lower > self.u_upper)
            if bad.size:
                t, i = bad[0]
                raise InputError(f"u_lower > u_upper at stage {t}, control {i}: "
                                 f"{self.u_lower[t, i]} > {self.u_upper[t, i]}")
        if params is not None:
            params = float_array(params, "params")
            if params.ndim == 1 and params.shape[0] == T + 1:
                params = params[:, None]
            if params.ndim != 2 or params.shape[0] != T + 1:
                raise ShapeError("params", f"({T + 1}, np)", params.shape, "one row per stage plus the terminal one")
            if not np.all(np.isfinite(params)):
                raise InputError("params: expected finite values")
            params = _frozen(params)
        self.params = params
        if backend not in BACKENDS:
            raise InputError(f"backend={backend!r} is unknown; valid backends are {', '.join(BACKENDS)}")
        self.backend = backend
        self.name = name
        self._backend = make_backend(backend, self, backend_options)   # builds and checks the functions
        b = self._backend
        self.constraints = ConstraintSet.build(T, self.nx, x_lower, x_upper, b.ng, b.nh, b.nterm - b.nh)
        self.x_lower, self.x_upper = self.constraints.x_lower, self.constraints.x_upper
        self._check_constraints_at_x0()

    def _check_constraints_at_x0(self) -> None:
        """Constraint functions must be finite at (x0, initial control): InputError naming them."""
        b, u0 = self._backend, self.initial_controls()[0]
        checks = []
        if b.ng:
            checks.append(("path_constraints", lambda: b.constraint_step_values(self.x0, u0, 0)))
        if b.nterm:
            names = [n for n in ("terminal_constraints", "terminal_inequalities") if getattr(self, n) is not None]
            checks.append((" / ".join(names), lambda: b.terminal_constraint_values(self.x0)))
        for argument, call in checks:
            with np.errstate(all="ignore"):
                value = np.asarray(call(), dtype=float)
            if not np.all(np.isfinite(value)):
                raise InputError(f"{argument}: not finite at x0 = {self.x0.tolist()} (value {value.tolist()}); "
                                 "constraint functions must be finite where the solve starts")

    def __repr__(self) -> str:
        box = ", bounded" if self.bounded else ""
        cons = f", constraints: {', '.join(self.constraints.kinds)}" if self.constraints.any else ""
        return (f"Problem({self.name or 'unnamed'}: nx={self.nx}, nu={self.nu}, horizon={self.horizon}"
                f"{box}{cons}, backend={self.backend!r})")

    @property
    def bounded(self) -> bool:
        """True when the controls have bounds."""
        return self.u_lower is not None

    @property
    def constraint_kinds(self) -> tuple:
        """The kinds of constraints beyond the control box (words of :data:`occore.constraints.KINDS`);
        a solver that cannot honour one of them refuses the problem."""
        return self.constraints.kinds

    def with_initial_state(self, x0, name: str = "x0") -> "Problem":
        """The same problem from another initial state (nx,), sharing the compiled functions (cheap:
        no retracing; used by :class:`occore.MPC`). ``name``: the argument named in errors."""
        import copy

        arr = float_array(x0, name, "a vector of numbers")
        if arr.shape != (self.nx,):
            raise ShapeError(name, (self.nx,), arr.shape)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: expected finite values, got {arr.tolist()}")
        new = copy.copy(self)
        new.x0 = _frozen(arr)
        return new

    def transition(self, x, u, t: int = 0) -> np.ndarray:
        """The next state f(x, u[, p_t]) (nx,) from one state x (nx,) and control u (nu,), the
        control clamped into stage t's box (a plant for :func:`occore.simulate`)."""
        x = np.array(x, dtype=float).reshape(-1)
        u = np.array(u, dtype=float).reshape(-1)
        if x.shape != (self.nx,):
            raise ShapeError("x", (self.nx,), x.shape)
        if u.shape != (self.nu,):
            raise ShapeError("u", (self.nu,), u.shape)
        if self.u_lower is not None:
            u = np.minimum(np.maximum(u, self.u_lower[t]), self.u_upper[t])
        return np.array(self._backend.step_values(x, u, t)[0], dtype=float).reshape(self.nx)

    def constraint_values(self, xs, us) -> ConstraintValues:
        """All constraint values along (xs (T+1, nx), us (T, nu)); see :class:`ConstraintValues`."""
        xs = np.asarray(xs, dtype=float)
        with np.errstate(all="ignore"):
            g, h = self._backend.constraint_values(xs, np.asarray(us, dtype=float))
        return self.constraints.values(xs, g, h)

    def constraint_violation(self, xs, us) -> float:
        """Largest violation of any constraint along (xs, us), control bounds included (0.0: feasible)."""
        viol = self.constraint_values(xs, us).violation() if self.constraints.any else 0.0
        if self.u_lower is not None:
            us = np.asarray(us, dtype=float)
            viol = max(viol, float(np.max(self.u_lower - us, initial=0.0)), float(np.max(us - self.u_upper, initial=0.0)))
        return viol

    # -- ControlProblem protocol ----------------------------------------------------------------
    def initial_controls(self) -> np.ndarray:
        """Zeros (T, nu), clamped into the box."""
        return self.clamp(np.zeros((self.horizon, self.nu)))

    def clamp(self, us: np.ndarray) -> np.ndarray:
        """A copy of ``us`` projected onto the control box."""
        if self.u_lower is None:
            return np.array(us, dtype=float)
        return np.minimum(np.maximum(us, self.u_lower), self.u_upper)

    def extrapolate_controls(self, us, us_prev, beta: float) -> np.ndarray:
        """us + beta (us - us_prev), projected onto the box (E-MSA's momentum); (T, nu)."""
        return self.clamp(np.asarray(us) + beta * (np.asarray(us) - np.asarray(us_prev)))

    def check_controls(self, us, name: str = "us") -> np.ndarray:
        """``us`` as a new (T, nu) float64 array; ShapeError/InputError otherwise."""
        arr = float_array(us, name)
        if arr.shape == (self.horizon,) and self.nu == 1:
            arr = arr[:, None]
        if arr.shape != (self.horizon, self.nu):
            raise ShapeError(name, (self.horizon, self.nu), arr.shape)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: expected finite values")
        return arr

    def rollout(self, us) -> Trajectory:
        """Open-loop rollout of ``us`` (T, nu), clamped into the box; ``us`` is not modified.

        A user function that raises during the rollout (a value outside its domain) gives a
        trajectory of cost NaN, which the solvers treat as any non-finite trial (a rejected step,
        or a NON_FINITE status); the exception is logged."""
        us = self.clamp(self.check_controls(us))
        with np.errstate(invalid="ignore", over="ignore"):
            out = _guarded(self._backend.rollout, us, self.x0)
        if out is None:
            return Trajectory(xs=np.full((self.horizon + 1, self.nx), np.nan), us=us, cost=float("nan"))
        return Trajectory(xs=out[0], us=us, cost=float(out[1]))

    def rollout_policy(self, ref: Trajectory, policy: Policy, alpha: float, *, x0=None, shift=None) -> Trajectory:
        """Closed-loop rollout u_t = clamp(ref.us_t + alpha k_t + K_t (x_t - ref.xs_t)),
        x_{t+1} = f(x_t, u_t) + shift_t from x_0 = x0 (defaults: the problem's x0, no shift; a
        multiple-shooting solver passes both to close its gaps partly); a user function that
        raises gives cost NaN, as in :meth:`rollout`."""
        with np.errstate(invalid="ignore", over="ignore"):
            out = _guarded(self._backend.rollout_policy, ref.xs, ref.us, policy.k, policy.K, alpha,
                           self.u_lower, self.u_upper, self.x0 if x0 is None else x0, shift)
        if out is None:
            nan = np.nan
            return Trajectory(xs=np.full((self.horizon + 1, self.nx), nan),
                              us=np.full((self.horizon, self.nu), nan), cost=nan)
        xs, us, cost = out
        return Trajectory(xs=xs, us=us, cost=float(cost))

    @property
    def rollout_batch(self) -> int:
        """How many step lengths :meth:`rollout_policies` takes at once (1 unless the backend rolls
        out several trials in one pass, as the compiled torch backend does)."""
        return getattr(self._backend, "rollout_batch", 1)

    def rollout_policies(self, ref: Trajectory, policy: Policy, alphas) -> list:
        """:meth:`rollout_policy` at each step length of ``alphas`` (at most :attr:`rollout_batch`),
        rolled out together where the backend can: a list of Trajectories, one per alpha. Where a
        user function raises, each trial is rolled out alone (so only the failing ones get cost NaN)."""
        alphas = [float(a) for a in alphas]
        if self.rollout_batch > 1:
            with np.errstate(invalid="ignore", over="ignore"):
                out = _guarded(self._backend.rollout_policies, ref.xs, ref.us, policy.k, policy.K, alphas,
                               self.u_lower, self.u_upper, self.x0)
            if out is not None:
                return [Trajectory(xs=xs, us=us, cost=cost) for xs, us, cost in out]
        return [self.rollout_policy(ref, policy, alpha) for alpha in alphas]

    def evaluate_derivatives(self, xs, us, second_order: bool = False):
        """All derivatives at the points (xs[t], us[t]) and xs[T]; a DenseDerivatives. When a user
        function raises at a point the backend evaluates (finite differences perturb the
        trajectory), every derivative is NaN: the solvers end with NON_FINITE (logged)."""
        try:
            return self._backend.derivatives(np.asarray(xs, dtype=float), np.asarray(us, dtype=float),
                                             second_order)
        except OccoreError:
            raise
        except Exception as err:  # noqa: BLE001 - a user function failing near the trajectory
            log.warning("a problem function raised while evaluating derivatives (%s: %s); they are "
                        "reported as non-finite", type(err).__name__, err)
            return nan_derivatives(self.horizon, self.nx, self.nu, second_order)

    def local_model(self, traj: Trajectory, second_order: bool = False) -> DenseLocalModel:
        """The local LQ model at ``traj`` (one derivative evaluation for the whole horizon)."""
        return self.model_of(self.evaluate_derivatives(traj.xs, traj.us, second_order), traj.us)

    def model_of(self, derivs, us, gaps=None, initial_gap=None) -> DenseLocalModel:
        """The local LQ model of given derivatives (e.g. augmented by a constrained solver) at
        controls ``us`` (T, nu), with this problem's control bounds and backward sweep; ``gaps``
        (T, nx) and ``initial_gap`` (nx,) for a multiple-shooting trajectory (see DenseLocalModel)."""
        return DenseLocalModel(derivs, us, self.u_lower, self.u_upper, sweep=self._sweep(), gaps=gaps,
                               initial_gap=initial_gap)

    def check_states(self, xs, name: str = "xs0") -> np.ndarray:
        """``xs`` as a new (T+1, nx) float64 array; ShapeError/InputError otherwise."""
        arr = float_array(xs, name)
        if arr.shape == (self.horizon + 1,) and self.nx == 1:
            arr = arr[:, None]
        if arr.shape != (self.horizon + 1, self.nx):
            raise ShapeError(name, (self.horizon + 1, self.nx), arr.shape)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name}: expected finite values")
        return arr

    def _sweep(self):
        from .lq import compiled

        return compiled.best_sweep()

    # -- E-MSA extension of the protocol (occore.EMSA; kernels in occore/lq/hamiltonian.py) -------
    #: inner maximisation methods this problem supports; the first is the default ("auto").
    inner_methods = ("newton", "gradient")

    def hamiltonian_grad(self, traj: Trajectory, costates, rho: float, us):
        """Values (T,) and gradients (T, nu) in u of every stage's augmented Hamiltonian at ``us``,
        around ``traj`` and its ``costates`` (T+1, nx); see :mod:`occore.lq.hamiltonian`."""
        from .lq.hamiltonian import augmented_hamiltonian

        d = self.evaluate_derivatives(traj.xs, self.check_controls(us), second_order=True)
        return augmented_hamiltonian(d, np.asarray(traj.xs), np.asarray(costates), float(rho))

    def maximize_hamiltonian(self, traj: Trajectory, costates, rho: float, inner):
        """New controls (T, nu) maximising each stage's augmented Hamiltonian from ``traj.us``
        (projected onto the bounds; ``traj`` is not modified). ``inner``: method, iterations, step_size."""
        from .lq.hamiltonian import maximize

        xs = np.asarray(traj.xs)
        return maximize(lambda vs: self.evaluate_derivatives(xs, vs, second_order=True), xs, traj.us,
                        np.asarray(costates), float(rho), inner, self.u_lower, self.u_upper)
