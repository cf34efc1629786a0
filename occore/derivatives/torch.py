"""Torch backend: the user's callables are written with torch operations and differentiated with
``torch.func``.

Per evaluation the derivatives of the whole horizon come from ONE vmapped call: the stage function
``g(z) = [f(x, u); l(x, u)]`` of ``z = [x; u]`` is differentiated twice in forward mode
(``jacfwd(jacfwd(.))``: all Jacobians, the cost gradient and every Hessian; with n = nx + nu <= a
few dozen inputs forward mode is as cheap as reverse mode eagerly, and its graph is pointwise work
on tangents that inductor fuses well: compiled, 0.19 ms instead of 0.72 ms for forward-over-reverse
on the cart-pole), and the result is ``vmap``-ed over the T stages. The same call gives the
Hessians of every dynamics output, so both orders share it (first order just leaves them out); the
terminal cost (unmapped) is in the same call.

FX trace: after :attr:`TorchBackend.trace_after` eager evaluations, that function is traced once
with ``make_fx`` into an FX graph of plain aten operations (specialised to this horizon), which gives
the same numbers (bit for bit) about 3x faster (pendulum: 4.9 instead of 14.9 ms per evaluation on
the loaded 2-core machine); tracing costs 0.5-1.9 s, about 30-90 eager calls, hence
the threshold. The graph bakes in whatever the user's functions close over (Python numbers, numpy
constants), as the casadi backend's symbolic trace does.

Compiled path (:mod:`occore.derivatives.torch_compile`): that graph and the rollouts (as scans
over the stages; the line search's trials :data:`LINE_SEARCH_BATCH` at a time) compiled by inductor (C++; ``make_fx`` graphs, no dynamo), per ``backend_options={"compile":
"auto" | "always" | "never"}``.

What the torch backend cannot trace: Python control flow on tensor values (``if x[0] > 0``,
``while``, ``bool(t)``, ``.item()``, ``float(t)``) - torch.func's vmap refuses it; the backend
reports it at construction as a :class:`occore.errors.TraceError` naming the function.

Values: rollouts step through the stages with the dynamics only (plain torch calls, no autograd),
then evaluate the stage costs of all stages in one vmapped call. ``torch`` is imported only here.
"""
from __future__ import annotations

import logging
import numbers
import warnings

import numpy as np
import torch
from torch.func import jacfwd, vmap

from ..errors import DerivativeError, InputError, ShapeError, TraceError
from .base import SECOND_ORDER_FIELDS, Backend, from_fields, stacked_fields
from .torch_compile import MODES, CompiledFunction, scan_rollout, scan_rollout_policy

__all__ = ["TorchBackend"]

log = logging.getLogger("occore")

_DTYPE = torch.float64
#: line-search trials per batched rollout (TorchBackend.rollout_batch): 1, 1/2, 1/4, 1/8 of the
#: default step lengths cover 97% of the cart-pole's iterations in one pass
LINE_SEARCH_BATCH = 4
#: how torch.func reports .item() or Python control flow on a tensor under vmap
_DATA_DEPENDENT = "data-dependent control flow"

# The first forward-mode transform makes torch import its jvp decompositions, which calls the
# deprecated torch.jit.script (a DeprecationWarning from torch's own code, once per process).
# Trigger that import here, quietly, so the user's own warning filters never see it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
    jacfwd(torch.sin)(torch.zeros((), dtype=_DTYPE))


def _tensor(a) -> torch.Tensor:
    """A float64 numpy array (or number) as a tensor, sharing memory where possible (never with a
    read-only array)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _to_tensor(argument: str, value) -> torch.Tensor:
    """The user function's output as a float64 tensor, or a DerivativeError naming ``argument``."""
    if isinstance(value, torch.Tensor) and value.dtype == _DTYPE:   # the usual case, first
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        value = torch.stack(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.generic)):
        value = torch.tensor(float(value), dtype=_DTYPE)   # a constant (its derivatives are zero)
    if not isinstance(value, torch.Tensor):
        raise DerivativeError(f"{argument} returned {type(value).__name__}, which is not a torch tensor "
                              f"(backend 'torch' needs torch operations)")
    if value.dtype != _DTYPE:
        raise DerivativeError(f"{argument} returned a {value.dtype} tensor; backend 'torch' works in "
                              f"torch.float64 (create constants with dtype=torch.float64 or x.dtype)")
    return value


class TorchBackend(Backend):
    """Derivatives by ``torch.func`` (vmap over the horizon of jacfwd-of-jacfwd).

    The user's functions receive 1-D float64 tensors: f(x (nx,), u (nu,)[, p (np,)]) -> (nx,),
    l(x, u[, p]) -> scalar, lf(x[, p]) -> scalar. They must be traceable by ``torch.func`` (no
    ``.item()``, no Python branching on tensor values, no in-place writes into the inputs).

    Args:
        problem: the :class:`occore.Problem` whose functions to evaluate.

    Raises:
        ShapeError: a function returns the wrong shape (named "dynamics", "stage_cost" or
            "terminal_cost", with the expected and actual shapes).
        DerivativeError: a function raises, returns something that is not a float64 tensor, or
            cannot be differentiated by torch.func.

    Example:
        >>> import torch, occore
        >>> prob = occore.Problem(lambda x, u: x + 0.1 * u, lambda x, u: (x ** 2).sum() + (u ** 2).sum(),
        ...                       lambda x: 10 * (x ** 2).sum(), x0=[1.0], nu=1, horizon=20,
        ...                       backend="torch")
        >>> traj = prob.rollout(prob.initial_controls())
        >>> d = prob.evaluate_derivatives(traj.xs, traj.us, second_order=True)
        >>> d.fx.shape, d.fxx.shape, float(d.lxx[-1, 0, 0])
        ((20, 1, 1), (20, 1, 1, 1), 20.0)
    """

    name = "torch"
    #: eager derivative evaluations before the derivative function is traced into an FX graph;
    #: 0 traces on the first call, None never traces.
    trace_after: int | None = 32

    def __init__(self, problem, compile="auto"):
        if compile not in MODES:
            raise InputError(f"backend_options: compile={compile!r} is unknown; valid modes are "
                             f"{', '.join(map(repr, MODES))}")
        super().__init__(problem)
        nx, nu, T = self.nx, self.nu, self.T
        self.npar = npar = problem.params.shape[1] if problem.params is not None else 0
        P = np.zeros((T + 1, npar))
        if npar:
            P[:] = problem.params
        self.P = _tensor(P)                                  # (T+1, np); np = 0 without params
        self._x0 = _tensor(problem.x0)
        user_f, user_l, user_lf = problem.dynamics, problem.stage_cost, problem.terminal_cost
        extra = (lambda p: (p,)) if npar else (lambda p: ())

        # Normalised functions of one stage: (nx,) tensor, 0-d tensors.
        def f(x, u, p):
            out = _to_tensor("dynamics", user_f(x, u, *extra(p)))
            return out if out.shape == (nx,) else out.reshape(nx)

        def l(x, u, p):
            return _to_tensor("stage_cost", user_l(x, u, *extra(p))).reshape(())

        def lf(x, p):
            return _to_tensor("terminal_cost", user_lf(x, *extra(p))).reshape(())

        self._f, self._l, self._lf = f, l, lf
        self._probe_constraints(problem)
        ng, nT = self.ng, self.nterm
        user_g = problem.path_constraints
        user_h = [fn for fn in (problem.terminal_constraints, problem.terminal_inequalities) if fn is not None]

        def c(x, u, p):                                       # path constraints, (ng,)
            return _to_tensor("path_constraints", user_g(x, u, *extra(p))).reshape(ng)

        def hT(x, p):                                         # [h; h_I], (nterm,)
            return torch.cat([_to_tensor(name, fn(x, *extra(p))).reshape(-1)
                              for name, fn in zip(self._terminal_names, user_h)])

        self._c, self._hT = c, hT

        # Stage function of z = [x; u]: g(z) = [f; l; c], returned twice (value as aux).
        def g(z, p):
            parts = [f(z[:nx], z[nx:], p), l(z[:nx], z[nx:], p).reshape(1)]
            if ng:
                parts.append(c(z[:nx], z[nx:], p))
            out = torch.cat(parts)
            return out, out

        def jac_g(z, p):
            J, v = jacfwd(g, has_aux=True)(z, p)              # (nx+1+ng, n), (nx+1+ng,)
            return J, (J, v)

        def stage(z, p):                                      # H: (nx+1, n, n)
            return jacfwd(jac_g, has_aux=True)(z, p)

        def terminal(x, p):
            def lf_aux(y):                                    # [lf; h; h_I], (1 + nterm,)
                v = lf(y, p).reshape(1)
                v = torch.cat([v, hT(y, p)]) if nT else v
                return v, v

            def grad(y):
                gr, v = jacfwd(lf_aux, has_aux=True)(y)
                return gr, (gr, v)

            return jacfwd(grad, has_aux=True)(x)              # (1+nT, nx, nx), ((1+nT, nx), (1+nT,))

        p_dim = 0 if npar else None
        # One function for both orders: the dynamics Hessians cost next to nothing more here (the
        # forward pass pushes its n tangents through the whole reverse pass either way).
        stages = vmap(stage, in_dims=(0, p_dim))

        def everything(Z, P, xT, pT):                         # the one call per evaluation
            (H, (J, v)), (HT, (gT, vT)) = stages(Z, P), terminal(xT, pT)
            # every DenseDerivatives field (constraints' included) sliced and laid out in the graph
            return stacked_fields(v, J, H, vT, gT, HT, nx, torch.cat, torch.Tensor.contiguous)

        self._derivs = everything
        self._lvec = vmap(l, in_dims=(0, 0, p_dim))
        self._cvec = vmap(c, in_dims=(0, 0, p_dim)) if ng else None
        self._calls = 0                       # eager derivative evaluations so far
        self._compiled = None                 # the traced graph (or the eager function) once traced
        self._check(problem)
        # What runs every iteration, compiled by inductor as ``compile`` says (occore.derivatives.torch_compile).
        bounded = problem.u_lower is not None
        self._no_bounds = torch.zeros((T, nu), dtype=_DTYPE)
        # the problem's (read-only, fixed) bounds as tensors once, not copied at every rollout
        self._bounds = (problem.u_lower, problem.u_upper,
                        _tensor(problem.u_lower), _tensor(problem.u_upper)) if bounded else None
        self.fast = dict(
            derivatives=CompiledFunction("derivatives", lambda *a: self._derivative_fn(a)(*a),
                                         lambda *a: self._fx_graph(a), compile),
            rollout=CompiledFunction("rollout", self._rollout_eager,
                                     lambda *a: scan_rollout(f, l, lf, bool(npar)), compile),
            rollout_policy=CompiledFunction("rollout_policy", self._rollout_policy_eager,
                                            lambda *a: scan_rollout_policy(f, l, lf, bool(npar), bounded),
                                            compile),
            # the line search's first LINE_SEARCH_BATCH trials in one pass (see rollout_batch)
            rollout_policies=CompiledFunction("rollout_policies", self._rollout_policies_eager,
                                              lambda *a: scan_rollout_policy(f, l, lf, bool(npar), bounded,
                                                                             batched=True),
                                              compile))


    # -- construction checks ----------------------------------------------------------------------
    def _probe_constraints(self, problem) -> None:
        """Sizes of the constraint vectors from one call at (x0, 0); ShapeError unless 1-D."""
        x, u = self._x0.clone(), torch.zeros(self.nu, dtype=_DTYPE)
        extra = (self.P[0].clone(),) if self.npar else ()
        extra_T = (self.P[-1].clone(),) if self.npar else ()

        def size(argument, call):
            value = _to_tensor(argument, self._call(argument, call))
            if value.ndim > 1 or value.numel() == 0:
                raise ShapeError(argument, "(m,) with m >= 1", tuple(value.shape), "constraints are a 1-D tensor")
            return value.numel()

        if problem.path_constraints is not None:
            self.ng = size("path_constraints", lambda: problem.path_constraints(x, u, *extra))
        self._terminal_names = []
        for argument in ("terminal_constraints", "terminal_inequalities"):
            fn = getattr(problem, argument)
            if fn is not None:
                m = size(argument, lambda: fn(x, *extra_T))
                self._terminal_names.append(argument)
                self.nterm += m
                if argument == "terminal_constraints":
                    self.nh = m

    def _stage_p(self) -> torch.Tensor:
        """Stage parameters for the vmapped calls: (T, np), or an empty placeholder."""
        return self.P[: self.T]

    def _check(self, problem) -> None:
        """Probe each function at (x0, 0): values with the right shapes, then derivatives."""
        nx, nu = self.nx, self.nu
        x, u, p = self._x0.clone(), torch.zeros(nu, dtype=_DTYPE), self.P[0].clone()
        extra = (p,) if self.npar else ()
        extra_T = (self.P[-1].clone(),) if self.npar else ()
        probes = (("dynamics", lambda: problem.dynamics(x, u, *extra), (nx,)),
                  ("stage_cost", lambda: problem.stage_cost(x, u, *extra), ()),
                  ("terminal_cost", lambda: problem.terminal_cost(x, *extra_T), ()))
        for argument, call, expected in probes:
            value = _to_tensor(argument, self._call(argument, call))
            ok = value.shape == expected if expected else value.numel() == 1
            if not ok:
                raise ShapeError(argument, expected, tuple(value.shape),
                                 "the state is a 1-D tensor; costs must be scalars")
        # The same functions under torch.func (vmap of jacfwd of jacfwd), one stage each.
        z = torch.cat([x, u])[None]
        checks = [("dynamics", lambda zz, pp: self._f(zz[:nx], zz[nx:], pp), self.P[:1]),
                  ("stage_cost", lambda zz, pp: self._l(zz[:nx], zz[nx:], pp), self.P[:1]),
                  ("terminal_cost", lambda zz, pp: self._lf(zz[:nx], pp), self.P[-1:])]
        if self.ng:
            checks.append(("path_constraints", lambda zz, pp: self._c(zz[:nx], zz[nx:], pp), self.P[:1]))
        if self.nterm:
            checks.append((" and ".join(self._terminal_names), lambda zz, pp: self._hT(zz[:nx], pp), self.P[-1:]))
        for argument, fn, ps in checks:
            hess = vmap(jacfwd(jacfwd(fn)), in_dims=(0, 0 if self.npar else None))
            H = self._call(argument, lambda: hess(z, ps), "under torch.func (vmap of jacfwd)")
            if not torch.isfinite(H).all():
                log.debug("%s: non-finite derivatives at the probe point (x0, 0)", argument)

    @staticmethod
    def _call(argument, fn, where="on torch tensors"):
        try:
            return fn()
        except (ShapeError, DerivativeError, Warning):   # warnings made errors stay what they are
            raise
        except Exception as err:  # noqa: BLE001 - report which user function failed and why
            if _DATA_DEPENDENT in str(err):
                raise TraceError(
                    f"{argument} branches in Python on tensor values (if/while on a tensor, bool(), "
                    f".item() or float() of a tensor), which the torch backend cannot trace under "
                    f"torch.func (vmap of jacfwd); write the branch with torch.where / "
                    f"torch.clamp / torch.maximum, or use backend='casadi' (casadi.if_else) or "
                    f"backend='finite_difference'") from err
            raise DerivativeError(f"{argument} could not be evaluated {where}: "
                                  f"{type(err).__name__}: {err}") from err

    # -- values -----------------------------------------------------------------------------------
    def step_values(self, x, u, t):
        with torch.inference_mode():
            xt, ut, p = _tensor(x), _tensor(u), self.P[t]
            return self._f(xt, ut, p).numpy().copy(), float(self._l(xt, ut, p))

    def terminal_value(self, x):
        with torch.inference_mode():
            return float(self._lf(_tensor(x), self.P[self.T]))

    def constraint_step_values(self, x, u, t):
        with torch.inference_mode():
            return self._c(_tensor(x), _tensor(u), self.P[t]).numpy().copy()

    def terminal_constraint_values(self, x):
        with torch.inference_mode():
            return self._hT(_tensor(x), self.P[self.T]).numpy().copy()

    def constraint_values(self, xs, us):
        G = H = None
        with torch.inference_mode():
            if self.ng:
                G = self._cvec(_tensor(xs[:self.T]), _tensor(us), self._stage_p()).numpy().copy()
            if self.nterm:
                H = self._hT(_tensor(xs[self.T]), self.P[self.T]).numpy().copy()
        return G, H

    # no_grad, not inference_mode, around what may be compiled: tensors a user function creates
    # under inference mode fail the compiled function's guards (e.g. torch.as_tensor(numpy matrix))
    def rollout(self, us, x0):
        with torch.no_grad():
            X, cost = self.fast["rollout"](_tensor(x0), _tensor(us), self.P)
            return X.numpy(), float(cost)

    def _rollout_eager(self, x0, U, P):
        """States (T+1, nx) and cost () of controls U (T, nu), stage by stage."""
        f, xs = self._f, [x0]
        for t in range(self.T):
            xs.append(f(xs[-1], U[t], P[t]))
        X = torch.stack(xs)
        return X, self._lvec(X[:-1], U, P[: self.T]).sum() + self._lf(X[-1], P[self.T])

    def rollout_policy(self, xs_ref, us_ref, k, K, alpha, lower, upper, x0, shift=None):
        with torch.no_grad():
            base = _tensor(us_ref + alpha * np.asarray(k))     # u_ref + alpha k, all stages
            lo, hi = self._bound_tensors(lower, upper)
            args = (_tensor(x0), _tensor(xs_ref), base, _tensor(K), lo, hi, self.P)
            if shift is None:
                X, U, cost = self.fast["rollout_policy"](*args)
            else:     # multiple shooting (FDDP) closing its gaps partly: eager
                X, U, cost = self._rollout_policy_eager(*args, shift=_tensor(shift))
            return X.numpy(), U.numpy(), float(cost)

    @property
    def rollout_batch(self) -> int:
        """How many line-search trials :meth:`rollout_policies` rolls out in one pass: the compiled
        batched rollout costs about one rollout for up to :data:`LINE_SEARCH_BATCH` step lengths,
        so once the rollouts are compiled (or about to be) the line search asks for that many at once
        (measured: 2.0 trials per iteration on the cart-pole); eager, one at a time (1)."""
        single, batched = self.fast["rollout_policy"], self.fast["rollout_policies"]
        if batched.failed or single.compiled is None and single.mode != "always":
            return 1
        if batched.mode == "auto":     # "auto" found the rollouts worth compiling: these too, now
            batched.mode = "always"
        return LINE_SEARCH_BATCH

    def rollout_policies(self, xs_ref, us_ref, k, K, alphas, lower, upper, x0):
        """:meth:`rollout_policy` at each step length of ``alphas`` (at most :attr:`rollout_batch`
        of them), in one pass over the stages: a list of (xs, us, cost), one per alpha."""
        B = self.rollout_batch
        if len(alphas) > B:
            raise InputError(f"alphas: at most {B} step lengths per call, got {len(alphas)}")
        padded = list(alphas) + [alphas[-1]] * (B - len(alphas))  # one shape: one compilation
        with torch.no_grad():
            a = _tensor(padded)
            base = _tensor(us_ref)[:, None] + a[None, :, None] * _tensor(k)[:, None]   # (T, B, nu)
            lo, hi = self._bound_tensors(lower, upper)
            X, U, cost = self.fast["rollout_policies"](_tensor(x0), _tensor(xs_ref), base, _tensor(K),
                                                       lo, hi, self.P)
            X, U, cost = X.numpy(), U.numpy(), cost.numpy()
        return [(X[b], U[b], float(cost[b])) for b in range(len(alphas))]

    def _rollout_policies_eager(self, x0, Xr, base, Kt, lo, hi, P):
        """The batched rollout (base (T, B, nu)) one step length at a time: X (B, T+1, nx),
        U (B, T, nu), cost (B,)."""
        outs = [self._rollout_policy_eager(x0, Xr, base[:, b], Kt, lo, hi, P) for b in range(base.shape[1])]
        return tuple(torch.stack(parts) for parts in zip(*outs))

    def _bound_tensors(self, lower, upper):
        """The control bounds as (T, nu) tensors (the problem's own ones converted once)."""
        if lower is None:
            return self._no_bounds, self._no_bounds
        b = self._bounds
        ours = b is not None and lower is b[0] and upper is b[1]
        return (b[2], b[3]) if ours else (_tensor(lower), _tensor(upper))

    def _rollout_policy_eager(self, x0, Xr, base, Kt, lo, hi, P, shift=None):
        """u_t = clamp(base_t + K_t (x_t - Xr_t), lo_t, hi_t) (no clamp when unbounded),
        x_{t+1} = f(x_t, u_t) + shift_t, stage by stage: X (T+1, nx), U (T, nu), cost ()."""
        f, bounded = self._f, self.problem.u_lower is not None
        x, xs, us = x0, [x0], []
        for t in range(self.T):
            u = torch.addmv(base[t], Kt[t], x - Xr[t])
            if bounded:
                u = torch.clamp(u, lo[t], hi[t])     # = min(max(u, lo), hi)
            x = f(x, u, P[t])
            if shift is not None:
                x = x + shift[t]
            xs.append(x)
            us.append(u)
        X, U = torch.stack(xs), torch.stack(us)
        return X, U, self._lvec(X[:-1], U, P[: self.T]).sum() + self._lf(X[-1], P[self.T])

    # -- derivatives ------------------------------------------------------------------------------
    def _derivative_fn(self, args):
        """The vmapped derivative function: eager, or its FX trace once it has been called more
        than :attr:`trace_after` times."""
        if self._compiled is not None:
            return self._compiled
        self._calls += 1
        if self.trace_after is None or self._calls <= self.trace_after:
            return self._derivs
        return self._fx_graph(args)

    def _fx_graph(self, args):
        """The FX graph of the derivative function (traced at ``args`` on the first call)."""
        if self._compiled is None:
            self._compiled = self._trace(self._derivs, args)
        return self._compiled

    def _trace(self, eager, args):
        """``eager`` traced with make_fx into an FX graph (dead code removed); ``eager`` itself if
        tracing fails."""
        try:
            from torch.fx.experimental.proxy_tensor import make_fx

            gm = make_fx(eager)(*args)
            gm.graph.eliminate_dead_code()
            gm.recompile()
        except Exception as err:  # noqa: BLE001 - tracing is an optimisation; eager always works
            log.debug("torch backend: tracing the derivatives failed (%s: %s); staying eager",
                      type(err).__name__, err)
            return eager
        log.debug("torch backend: derivatives traced into an FX graph of %d nodes", len(gm.graph.nodes))
        return gm

    def derivatives(self, xs, us, second_order):
        T = self.T
        xs = np.asarray(xs, dtype=np.float64)
        Z = _tensor(np.concatenate([xs[:T], np.asarray(us, dtype=np.float64)], axis=1))   # (T, n)
        args = (Z, self._stage_p(), _tensor(xs[T]), self.P[T])
        fields = self.fast["derivatives"](*args)
        return from_fields({k: a.detach().numpy() for k, a in fields.items()
                            if second_order or k not in SECOND_ORDER_FIELDS}, second_order)
