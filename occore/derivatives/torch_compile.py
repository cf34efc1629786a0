"""Compiled whole-horizon functions of the torch backend (inductor, C++ wrapper; see :func:`compile_graph`).

What runs every iteration of DDP / iLQR on a torch problem is (a) one derivative evaluation of the
whole horizon and (b) one or more closed-loop rollouts (the line search), plus the open-loop
rollout of E-MSA and of ``init``. Eagerly, each is hundreds to thousands of tiny torch calls (a
rollout: T stages times the dynamics' operations), and their dispatch costs 5-15 ms per call on a
CPU. Compiled, each is one call of generated C++ code, traced by ``make_fx`` and compiled by
``torch._inductor.compile`` without dynamo (:func:`compile_graph`: a call costs about 8 us of
Python, not the 20-50 us of ``torch.compile``'s frame evaluation and guards):

* derivatives: the FX graph of the vmapped ``jacrev`` / ``jacfwd`` function (see
  :mod:`occore.derivatives.torch`) compiled by inductor, returning every field of the local model
  already sliced and laid out;
* rollouts: the stage recursion written as the ``scan`` operator (a loop in the
  generated code, :data:`UNROLL` stages per iteration, not T unrolled copies of the stage:
  compiling it costs seconds, not minutes), compiled by inductor; the line search's first trials
  in one batched pass (``scan_rollout_policy(batched=True)``: the generated loop's cost is its
  per-stage overhead, about 2 us, far above a small model's arithmetic, so four trials cost about
  1.5 rollouts).

Inductor generates and builds C++ code with the system's C++ compiler (``g++``); compiling the
four functions of one problem takes about 10-30 s on a 2-core machine (inductor caches the result
on disk, in ``$TORCHINDUCTOR_CACHE_DIR``, so a later process with the same problem compiles faster).

Modes (``backend_options={"compile": ...}`` of :class:`occore.Problem`):

* ``"auto"`` (default): a function is compiled once the time spent evaluating it eagerly reaches
  :data:`AUTO_AFTER_SECONDS` (the rent-or-buy rule: whatever happens, at most about twice the time
  of the better choice in hindsight); short solves never pay for a compilation.
* ``"always"``: compiled at the first call (benchmarks, MPC, many solves of one problem).
* ``"never"``: eager (and FX-traced derivatives) only.

A compilation that fails (no C++ compiler, an operation inductor cannot compile) is logged as a
warning once and that function stays eager: compilation is an optimisation, eager always works.
The compiled functions are checked in the tests to agree with the eager ones to 1e-12.
"""
from __future__ import annotations

import logging
import time
import types
import warnings

import torch

__all__ = ["MODES", "AUTO_AFTER_SECONDS", "CompiledFunction", "compile_graph", "scan_rollout", "scan_rollout_policy"]

log = logging.getLogger("occore")

MODES = ("auto", "always", "never")
#: "auto" compiles a function once this many seconds were spent evaluating it eagerly.
AUTO_AFTER_SECONDS = 10.0
#: inductor options: the C++ wrapper removes the Python glue between the generated kernels
#: (measured: a pendulum rollout 0.9 ms with the Python wrapper, 0.29 ms with the C++ one).
INDUCTOR_OPTIONS = {"cpp_wrapper": True}


class CompiledFunction:
    """A function of tensors, replaced by its compiled version (:func:`compile_graph`) as ``mode`` says.

    Args:
        name: label for the log ("derivatives", "rollout", "rollout_policy").
        eager: the eager function, called until (and unless) the compiled one is ready.
        compilable: ``compilable(*args)`` -> the function to hand to :func:`compile_graph` (same
            arguments and results as ``eager``; built lazily at the first call's ``args``, e.g. an
            FX graph of ``eager``).
        mode: one of :data:`MODES`.
        after_seconds: eager seconds before "auto" compiles.

    Attributes:
        compiled: the compiled function once it exists (None before, and for good after a failure).
        compile_seconds: time the compilation took (0 until then).
        eager_seconds: time spent in eager calls so far.
    """

    def __init__(self, name, eager, compilable, mode="auto", after_seconds=AUTO_AFTER_SECONDS):
        self.name, self.eager, self.compilable, self.mode = name, eager, compilable, mode
        self.after_seconds = float(after_seconds)
        self.compiled = None
        self.failed = False
        self.compile_seconds = 0.0
        self.eager_seconds = 0.0

    def _due(self) -> bool:
        if self.failed or self.mode == "never":
            return False
        return self.mode == "always" or self.eager_seconds >= self.after_seconds

    def __call__(self, *args):
        if self.compiled is not None:
            return self.compiled(*args)
        if self._due():
            out = self._compile(args)
            if out is not None:
                return out
        t0 = time.perf_counter()
        out = self.eager(*args)
        self.eager_seconds += time.perf_counter() - t0
        return out

    def _compile(self, args):
        """Compiles (the first call of a compiled function is its compilation) and returns the first
        results, or None (logged, and never tried again) when compilation fails."""
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():   # inductor's own deprecation notices are not the user's
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                fn = self.compilable(*args)
                try:
                    compiled = compile_graph(fn, args)
                    out = compiled(*args)
                except Exception as err:  # noqa: BLE001 - e.g. a constant tensor made inside a scan body
                    log.debug("torch backend: %s: make_fx + inductor failed (%s: %s); torch.compile instead",
                              self.name, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                    compiled = torch.compile(_own_code(fn), fullgraph=True, dynamic=False,
                                             options=INDUCTOR_OPTIONS)
                    out = compiled(*args)
                fn = compiled
        except Exception as err:  # noqa: BLE001 - compilation is an optimisation; eager always works
            self.failed = True
            log.warning("torch backend: compiling %s failed (%s: %s); it stays eager", self.name,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None
        self.compile_seconds = time.perf_counter() - t0
        self.compiled = fn
        log.info("torch backend: %s compiled in %.1f s", self.name, self.compile_seconds)
        return out


def _own_code(fn):
    """``fn`` with a code object of its own (for the ``torch.compile`` fallback of
    :meth:`CompiledFunction._compile`): dynamo keeps its compiled versions per code object, so the
    rollouts of every problem (closures of one function) would otherwise share one cache and, past
    ``torch._dynamo.config.recompile_limit`` of them in a process, silently run eager."""
    if not isinstance(fn, types.FunctionType):
        return fn            # an FX GraphModule has generated code of its own
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


def compile_graph(fn, args):
    """``fn`` (a function of tensors returning a tuple or dict of tensors) compiled by inductor for
    inputs shaped as ``args``: traced by ``make_fx`` (fake tensors: no computation) into a graph of
    aten operations, which ``torch._inductor.compile`` compiles without dynamo. The result is
    called with tensors of the shapes, strides and dtypes of ``args`` (checked by the generated
    code, which raises otherwise) and returns what ``fn`` returns.

    Why not ``torch.compile``: every call of a ``torch.compile``-d function runs dynamo's frame
    evaluation and guards (about 20-50 us on this machine for the backend's functions, against
    about 8 us for a direct call of the compiled graph); what those guards protect (new shapes,
    other Python constants in the closures) cannot change here: the backend calls each function
    with one set of shapes, and the graph bakes in the constants the user's functions close over,
    as the casadi backend's symbolic trace and the derivatives' FX trace do."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._pytree import tree_flatten

    layout = []

    def flat(*a):
        leaves, spec = tree_flatten(fn(*a))
        layout.append(spec)
        return tuple(leaves)

    graph = make_fx(flat, tracing_mode="fake")(*args)
    compiled = torch._inductor.compile(graph, list(args), options=INDUCTOR_OPTIONS)
    spec = layout[0]
    if spec.type is dict:
        keys = tuple(spec.context)
        return lambda *a: dict(zip(keys, compiled(*a)))
    if spec.type is tuple and spec.num_leaves == spec.num_children:
        return lambda *a: tuple(compiled(*a))
    from torch.utils._pytree import tree_unflatten

    return lambda *a: tree_unflatten(list(compiled(*a)), spec)


def _scan(body, init, xs):
    """``scan(body, init, xs)`` for :func:`compile_graph`'s trace: the scan operator itself, called
    with flat lists of tensors. (``torch._higher_order_ops.scan.scan``, its front end, runs dynamo
    on a function of its own at each call; under ``make_fx`` the second problem's rollout of a
    process could then be traced with the first one's loop body, and fail in inductor.) Under
    dynamo (the ``torch.compile`` fallback of :meth:`CompiledFunction._compile`), the front end."""
    from torch._higher_order_ops.scan import scan, scan_op
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if torch.compiler.is_dynamo_compiling():   # the torch.compile fallback: dynamo traces the front end
        return scan(body, init, xs)

    init_leaves, init_spec = tree_flatten(init)
    xs_leaves, xs_spec = tree_flatten(xs)
    n, out_spec = len(init_leaves), []

    def combine(*leaves):
        carry, y = body(tree_unflatten(list(leaves[:n]), init_spec), tree_unflatten(list(leaves[n:]), xs_spec))
        y_leaves, spec = tree_flatten(y)
        out_spec.append(spec)
        return [*tree_flatten(carry)[0], *y_leaves]

    out = scan_op(combine, init_leaves, xs_leaves, additional_inputs=())
    return tree_unflatten(list(out[:n]), init_spec), tree_unflatten(list(out[n:]), out_spec[0])


#: stages per iteration of the generated loop: its fixed overhead per iteration (allocations,
#: handle moves, the counter; about 2.5 us, against about 0.05 us of arithmetic for a pendulum
#: stage) is paid once per UNROLL stages
UNROLL = 10


def stage_scan(step, init, xs, unroll: int = UNROLL):
    """``scan(step, init, xs)`` (outputs stacked over the leading stage dimension of ``xs``, a tuple
    of tensors, or one) with ``unroll`` stages per loop iteration: the first T mod unroll stages
    straight-line, the others in a loop of T // unroll iterations whose body is ``unroll`` calls
    of ``step`` (same operations in the same order: the same numbers as one stage per iteration)."""
    from torch.utils._pytree import tree_map

    T = (xs[0] if isinstance(xs, tuple) else xs).shape[0]
    q, r = divmod(T, unroll)

    def run(carry, inp, n):
        ys = []
        for j in range(n):
            carry, y = step(carry, tree_map(lambda a: a[j], inp))
            ys.append(y)
        return carry, ys

    def stack(ys):
        return tree_map(lambda *a: torch.stack(a), *ys)

    carry, head = run(init, xs, r)
    parts = [stack(head)] if r else []
    if q:
        def body(c, inp):
            c, ys = run(c, inp, unroll)
            return c, stack(ys)

        rest = tree_map(lambda a: a[r:].reshape(q, unroll, *a.shape[1:]), xs)
        carry, ys = _scan(body, carry, rest)
        parts.append(tree_map(lambda a: a.reshape(q * unroll, *a.shape[2:]), ys))
    return carry, parts[0] if len(parts) == 1 else tree_map(lambda *a: torch.cat(a), *parts)


def scan_rollout(f, l, lf, has_params: bool):
    """The open-loop rollout as a scan over the stages: ``(x0 (nx,), U (T, nu), P (T+1, np)) ->
    (X (T+1, nx), cost ())``; f, l, lf are the backend's normalised stage functions. Only the
    dynamics run inside the loop; the stage costs of all stages are one vmapped call after it."""
    lvec = torch.func.vmap(l, in_dims=(0, 0, 0 if has_params else None))

    def rollout(x0, U, P):
        def step(x, inp):
            u, p = inp if has_params else (inp, None)
            xn = f(x, u, p)
            return xn, xn

        _, X = stage_scan(step, x0, (U, P[:-1]) if has_params else U)
        X = torch.cat([x0[None], X])
        return X, lvec(X[:-1], U, P[:-1] if has_params else None).sum() + lf(X[-1], P[-1])

    return rollout


def scan_rollout_policy(f, l, lf, has_params: bool, bounded: bool, batched: bool = False):
    """The closed-loop rollout u_t = clamp(base_t + K_t (x_t - Xr_t)) as a scan over the stages:
    ``(x0, Xr (T+1, nx), base (T, nu), K (T, nu, nx), lo (T, nu), hi (T, nu), P (T+1, np)) ->
    (X (T+1, nx), U (T, nu), cost ())``, with base = u_ref + alpha k; the stage costs after the loop.

    ``batched``: B rollouts of the same policy at once (the line search's step lengths), base
    (T, B, nu) -> X (B, T+1, nx), U (B, T, nu), cost (B,): one pass over the stages whatever B, so
    B trials cost about one (the per-stage overhead of the generated loop dominates, not the work)."""
    lvec = torch.func.vmap(l, in_dims=(0, 0, 0 if has_params else None))
    fb = torch.func.vmap(f, in_dims=(0, 0, None))

    def fstep(x, u, p):     # the carry keeps one layout (vmap of A @ x would give it transposed strides)
        return fb(x, u, p).contiguous() if batched else f(x, u, p)

    def cost(X, U, P):
        return lvec(X[:-1], U, P[:-1] if has_params else None).sum() + lf(X[-1], P[-1])

    def rollout_policy(x0, Xr, base, K, lo, hi, P):
        def step(x, inp):
            xr, b, Kt, a, c, p = inp if has_params else (*inp, None)
            # K (x - xr) as a product and a sum over nx, not addmv / matmul: inductor fuses these
            # into the stage's kernel, where a matrix product is an extern BLAS call per stage
            u = b + (Kt * (x - xr).unsqueeze(-2)).sum(-1)
            if bounded:
                u = torch.clamp(u, a, c)
            xn = fstep(x, u, p)
            return xn, (xn, u)

        xs = (Xr[:-1], base, K, lo, hi) + ((P[:-1],) if has_params else ())
        start = x0.expand(base.shape[1], -1).clone() if batched else x0
        _, (X, U) = stage_scan(step, start, xs)
        if not batched:
            X = torch.cat([x0[None], X])
            return X, U, cost(X, U, P)
        X = torch.cat([start[None], X]).transpose(0, 1)           # (B, T+1, nx)
        U = U.transpose(0, 1)                                     # (B, T, nu)
        return X, U, torch.func.vmap(cost, in_dims=(0, 0, None))(X, U, P)

    return rollout_policy
