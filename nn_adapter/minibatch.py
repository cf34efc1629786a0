"""The minibatch a closure recorded, as an occore control problem: DDPNOpt's one DDP iteration.

:class:`MinibatchProblem` implements :class:`occore.types.ControlProblem` for one minibatch: the
closure's forward pass is the rollout (states x_t = the inputs each stage's module saw, controls
u_t = its parameters, cost = the closure's loss), :meth:`MinibatchProblem.local_model` updates the
optimizer's curvature with the batch gradient (the derivatives at the trajectory) and returns the
one network local model (:class:`~nn_adapter.local_model.NetworkLocalModel`) with the Q source
:class:`CurvatureQ`: its ``backward(mu)`` is the layer-wise Bellman sweep of DDPNOpt's
Algorithm 3 with Q_uu = P^-1 (P: the curvature's inverse, learning rate included) and the core's
regularisation mu in its state form (V_xx' + mu I where it enters the gains: here Q_ux only, Q_uu
being the curvature's; DDPNOpt's ``eps_vxx``, Algorithm 3 line 12), and
:meth:`MinibatchProblem.rollout_policy` is Algorithm 3's additional forward pass: the model's own
``forward`` re-run on the closure's inputs (same dropout masks; batch-norm running statistics
untouched), each stage's parameters updated, just before its module runs, from the measured
deviation of its input. occore's solver runs these in its ``step`` with ``stochastic=True`` (one
full step, no cost check).

The Bellman sweep (per sample i, stages in execution order, value Hessians factorised as
V_xx = Y W Y^T with columns Y pulled back by backpropagation; see :mod:`nn_adapter.feedback` and
:mod:`nn_adapter.feedback_columns` for the derivation and the kernels):

- k_t = -P_t Q_u: the base optimizer's step (momentum and bias corrections included);
- K_t^(i) dx = -(P_t / mu_i) Q_ux^(i) dx with mu_i >= 1 the per-sample factor that keeps the
  sample's local model convex (its Q_uu is mu_i P^-1 where q_u^T P q_u > 1);
- V_x is the backpropagated gradient (so k is exactly the base optimizer's step).

In a model that is not a chain (skip connections), the value Hessian at a module's output is its
terminal columns pulled back through the whole graph, weighted by the per-sample factors of the
stages that run after it; for a chain this is the exact per-sample recursion.
"""
from __future__ import annotations

import math

import torch
from torch.func import jacrev, vmap

from occore.errors import InputError
from occore.types import Policy, Trajectory

from .curvature.base import apply_p
from .errors import MemoryLimitError
from .feedback import feedback_grads, quad_form, second_order_grads, tikhonov_grads
from .feedback_columns import column_feedback, column_quad_forms, next_weights, pull_columns
from .local_model import DenseGains, FactorisedGains, NetworkLocalModel
from .module_stages import autocast_off, fast_pooling, replay
from .terminal import terminal_factor

__all__ = ["MinibatchProblem", "CurvatureQ", "dense_gain"]


class _Done(Exception):
    """Raised by the last stage's hook: the rest of the model's forward is not needed."""


class StageStep:
    """The open-loop step of one stage, applied with its feedback: u <- u + k - s P delta.

    ``s = min(1, bound ||k|| / ||P delta||)`` (the optimizer's ``feedback_bound``). Without a
    bound and diagnostics the curvature applies ``k - P delta`` itself (fused where it can). A
    block without gradient (factors None: a parameter the forward did not use) is left alone."""

    def __init__(self, opt, t: int, stage, factors):
        self.opt, self.t, self.stage, self.factors = opt, t, stage, factors

    def apply(self, delta) -> None:
        opt, stage, factors = self.opt, self.stage, self.factors
        bounded = delta is not None and math.isfinite(opt.feedback_bound)
        if not bounded and opt.diagnostics is None:
            i = 0
            for block, fac in zip(stage.blocks, factors):
                n = len(block.params)
                if fac is not None:
                    opt._apply(block, fac, delta[i:i + n] if delta is not None else None)
                i += n
            return
        ks, pes, params, i = [], [], [], 0
        for block, fac in zip(stage.blocks, factors):
            n = len(block.params)
            if fac is None:
                i += n
                continue
            params += block.params
            grads, states = opt._grads_states(block)
            ks += opt.curvature.direction(block, grads, opt._group_of(block), states, fac)
            if delta is not None:
                pes += apply_p(block, fac, delta[i:i + n])
            i += n
        norms = torch.stack(torch._foreach_norm(ks + pes))
        if pes:                       # one entry per parameter each: ||k||, ||P delta||
            k_norm, p_norm = torch.linalg.vector_norm(norms.view(2, -1), dim=1).unbind()
        else:
            k_norm = norms.norm()
            p_norm = torch.zeros_like(k_norm)
        # (the smallest normal number of the dtype: a zero feedback of a zero step, a stage
        # without gradient, gets scale 0, not 0 / 0)
        scale = ((k_norm * opt.feedback_bound).div_(p_norm.clamp(min=torch.finfo(p_norm.dtype).tiny))
                 .clamp_(max=1.0) if bounded else torch.ones_like(k_norm))
        if opt.diagnostics is not None:
            fb, kn = float(p_norm * scale), float(k_norm)
            opt.diagnostics.append({"stage": self.t, "module": stage.name, "k_norm": kn,
                                    "feedback_norm": fb, "ratio": fb / kn if kn > 0 else 0.0,
                                    "bounded": bool(scale < 1),
                                    "clamped": opt._clamped.get(self.t, 0.0)})
        if pes:
            torch._foreach_mul_(pes, scale if scale.dtype == pes[0].dtype
                                else scale.to(pes[0].dtype))
            torch._foreach_sub_(ks, pes)
        torch._foreach_add_(params, ks)


class MinibatchProblem:
    """One recorded minibatch as a :class:`occore.types.ControlProblem` (see the module docstring).

    Args:
        opt: the :class:`nn_adapter.DDPNOpt` (curvature, state, options).
        rec: its :class:`~nn_adapter.module_stages.StageRecorder` after the closure.
        stages: the :class:`~nn_adapter.stages.Stage` list, in execution order.
        loss: the closure's loss (a float).

    Attributes:
        horizon: T, the number of stages.
    """

    def __init__(self, opt, rec, stages: list, loss: float):
        self.opt, self.rec, self.stages = opt, rec, stages
        self.horizon = len(stages)
        self.loss = loss
        self.batch_size = rec.inputs[stages[0].module].shape[0]

    def initial_controls(self) -> list:
        """The live parameters of every stage (block order); the step updates them in place."""
        return [s.params for s in self.stages]

    def trajectory(self) -> Trajectory:
        """The closure's rollout: x_t the recorded stage inputs (None for a stage kept in compact
        form since the backward pass), u_t the parameters, its loss."""
        return Trajectory(xs=[self.rec.inputs.get(s.module) for s in self.stages],
                          us=self.initial_controls(), cost=self.loss)

    def rollout(self, us) -> Trajectory:
        """Not available: the loss of a minibatch is known only through the closure."""
        raise InputError("a minibatch problem has no loss function of its own: its rollout is the "
                         "closure's forward pass (MinibatchProblem.trajectory)")

    def local_model(self, traj: Trajectory, second_order: bool = False) -> NetworkLocalModel:
        """Update the curvature with the batch gradient; the network local model at the recorded
        batch (:class:`CurvatureQ`, gains factorised or, with ``feedback="dense"``, dense)."""
        gains = DenseGains() if self.opt.feedback == "dense" else FactorisedGains()
        return NetworkLocalModel(CurvatureQ(self, self.opt._update_curvature(self.rec)), gains)

    def rollout_policy(self, ref: Trajectory, policy: Policy, alpha: float) -> Trajectory:
        """Algorithm 3's additional forward pass (full steps only, ``alpha`` = 1): the model's
        forward re-run on the closure's inputs, stage t's parameters set to
        u_t + k_t - P_t K_t(xhat_t) just before its module runs on xhat_t. The parameters are
        updated in place; the returned cost is NaN (the closure's loss function is not known)."""
        if alpha != 1.0:
            raise InputError(f"alpha={alpha!r}: a minibatch step is a full step (alpha = 1)")
        rec, stages = self.rec, self.stages
        col = self.opt.collectives
        index = {id(s.module): t for t, s in enumerate(stages)}
        state = {"next": 0, "busy": False}
        last = len(stages) - 1

        def pre(module, args):
            if state["busy"]:          # the module evaluated inside a stage's own update
                return
            t = index[id(module)]
            if t != state["next"]:
                raise InputError(
                    f"model: stage {stages[t].name!r} ran out of order in the feedback pass (the "
                    "model's forward took another path on the same inputs)")
            state["next"] = t + 1
            step, op = policy.k[t], policy.K[t]
            if step is not None:
                state["busy"] = True
                try:
                    with autocast_off(rec.autocast):    # the update in the parameters' dtype
                        delta = op(args[0]) if op is not None else None
                        if delta is not None and col is not None:
                            col.average_(delta)      # the batch mean over all ranks' samples
                        step.apply(delta)
                finally:
                    state["busy"] = False
            if t == last:
                raise _Done

        handles = [s.module.register_forward_pre_hook(pre) for s in stages]
        try:
            with torch.no_grad(), replay(rec), fast_pooling(rec.model):
                rec.model(*rec.model_args, **(rec.model_kwargs or {}))
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        if state["next"] != len(stages):
            raise InputError(f"model: only {state['next']} of {len(stages)} stages ran in the "
                             "feedback pass (the model's forward took another path)")
        return Trajectory(xs=None, us=self.initial_controls(), cost=float("nan"))


class CurvatureQ:
    """DDPNOpt's Q terms on one minibatch: the Q source of :class:`~nn_adapter.NetworkLocalModel`
    (implements its protocol; the sweep loop is ``NetworkLocalModel.backward``).

    Per sample i, stages in execution order (see the module docstring): Q_uu = P^-1 (P: the
    curvature's inverse, learning rate included), Q_u the recorded gradient, Q_ux^(i) = G W' Y^T
    with the value Hessian at the module output V_xx'^(i) = Y W' Y^T (columns Y pulled back by
    backpropagation: the recorded gradients for a rank-one terminal factor, the pulled-back
    terminal columns otherwise) and G = h_u^T Y. The regularised solve is per sample:
    N = G^T P G, mu_i = max(1, lambda_max(W'^1/2 N W'^1/2)) the smallest multiple of P^-1 that
    keeps the sample's local model convex, k = -P Q_u (the base optimizer's step, a
    :class:`StageStep`), K^(i) = -P Q_ux^(i) / mu_i; the value update W = W' - W' N W' / mu_i
    (:func:`~nn_adapter.feedback_columns.next_weights`), V_x the backpropagated gradient. The
    state-form mu (``eps_vxx``) adds mu h_u^T h_x to every stage's Q_ux (the Tikhonov term), and
    ``second_order`` the module's own V_x . h_ux. The expected decrease is not computed (NaN):
    the stochastic step does not use it.

    Gains: :class:`~nn_adapter.local_model.FactorisedGains` gives each stage t >= 1 an operator
    of the measured input xhat_t returning the unpreconditioned feedback sum
    (1/B) sum_i Q_ux^(i) dx^(i) / mu_i; :class:`~nn_adapter.local_model.DenseGains` the same sum
    from the per-sample matrices (:func:`dense_gain`). Stage 0 (its input is the data) has none.

    Args:
        problem: the :class:`MinibatchProblem`.
        updated: ``{block: factors}`` of the curvature after this batch's update.
    """

    def __init__(self, problem: MinibatchProblem, updated: dict):
        self.problem, self.updated = problem, updated
        self.horizon = problem.horizon
        self.second_order = False
        self.mu = 0.0

    # -- the Q source protocol ----------------------------------------------------------------------
    def begin(self, mu: float, second_order: bool, record: bool = False):
        """The curvature factors of every stage and the terminal value: W_T (a number for the
        rank-one factor, None for the identity on r columns, whose columns are pulled back
        here through the model)."""
        self.second_order, self.mu = second_order, float(mu)
        problem, opt = self.problem, self.problem.opt
        rec, stages, n = problem.rec, problem.stages, problem.batch_size
        self.factors = [self._factors(s) for s in stages]
        y_out, w_out = self._terminal()
        # Conv2d stages kept as per-sample gradients since the backward pass (the recorder's
        # ``compact``, see DDPNOpt._compact_builders)
        self.compact = {t: rec.compact.pop(s.module) for t, s in enumerate(stages)
                        if t > 0 and self.factors[t] is not None and s.module in rec.compact}
        if y_out is None:
            # columns = the recorded mean-loss gradients; W_T = (B S_T)^2 per sample
            self.cols = None
            return float(n * n) if w_out is None else w_out * (n * n)
        self.cols = pull_columns(rec, stages, y_out)
        return None

    def q_terms(self, t: int, w_next):
        """W' at stage t's output and N = G^T P G (rho = q_u^T P q_u with one column), None at
        t = 0 or without ``vxx_update``; None for a stage without gradient."""
        if self.factors[t] is None:
            return None
        forms = None
        if t > 0 and self.problem.opt.vxx_update:
            forms = self._forms(t)
        return w_next, forms

    def solve(self, t: int, q):
        """The per-sample regularisation mu_i (B,) (None: 1) and W (see the class docstring)."""
        w_next, forms = q
        if forms is None:
            return None, w_next
        mu, w = next_weights(w_next, forms)
        opt = self.problem.opt
        if opt.diagnostics is not None:
            opt._clamped[t] = float((mu > 1).double().mean())
        return mu, w

    def feedforward(self, t: int, q, step) -> "StageStep":
        """k_t: the base optimizer's step of stage t (applied with its feedback)."""
        return StageStep(self.problem.opt, t, self.problem.stages[t], self.factors[t])

    def value_update(self, t: int, q, step):
        """W at stage t's input."""
        return step[1]

    def end(self) -> tuple[float, float]:
        """Data-parallel diagnostics: the global shares of clamped samples; (NaN, NaN)."""
        opt = self.problem.opt
        if opt._clamped and opt.collectives is not None:
            keys = sorted(opt._clamped)
            sums = opt.collectives.average_([], [opt._clamped[k] for k in keys])
            opt._clamped = {k: v / opt.collectives.world_size for k, v in zip(keys, sums)}
        return float("nan"), float("nan")

    def gain_operator(self, t: int, q, step):
        """Stage t's factorised feedback operator (None at t = 0): with a rank-one terminal
        factor (1/B) sum_i w_i^2 q_u (q_x . dx) / mu_i, one weight gradient
        (:func:`~nn_adapter.feedback.feedback_grads`); with r columns
        :func:`~nn_adapter.feedback_columns.column_feedback`."""
        if t == 0:
            return None
        problem = self.problem
        rec, stage, n = problem.rec, problem.stages[t], problem.batch_size
        w_next, mu = q[0], step[0]
        if self.cols is not None:
            x, cols = rec.inputs[stage.module], self.cols[t]

            def column_op(xhat):
                total = column_feedback(stage, x, xhat, cols, w_next, mu)
                v_out = rec.out_grads[stage.module] * n if self.second_order else None
                return self._extras(stage, x, xhat, v_out, total, mu)
            return column_op
        compact = self.compact

        def op(xhat):
            if t in compact:
                w = math.sqrt(w_next) if isinstance(w_next, float) else w_next.sqrt()
                return compact.pop(t).feedback(xhat, w, None if mu is None else mu.reciprocal())
            x = rec.inputs.pop(stage.module)
            g = rec.out_grads.pop(stage.module)
            v_out = g * n if self.second_order else None
            q_x = rec.in_grads.pop(stage.module, None)
            # the terms are quadratic in the weighted cotangents sqrt(w) g: their per-sample
            # factor w / mu scales the coefficients (g itself is not written: a user may hold
            # these grads)
            total = feedback_grads(stage, x, xhat, g, q_x,
                                   sample_scale=w_next if mu is None else w_next / mu)
            return self._extras(stage, x, xhat, v_out, total, mu)
        return op

    def dense_gain(self, t: int, q, step):
        """Stage t's feedback from its per-sample matrices Q_ux^(i) / mu_i (:func:`dense_gain`),
        as an operator of the measured input (None at t = 0)."""
        if t == 0:
            return None
        problem = self.problem
        rec, stage, n = problem.rec, problem.stages[t], problem.batch_size
        x = rec.inputs[stage.module]
        w_next, mu = q[0], step[0]
        if self.cols is None:          # rank one: the recorded gradients, W a number or (B,)
            y = rec.out_grads[stage.module][:, None]
            w_next = torch.as_tensor(w_next, dtype=x.dtype, device=x.device).expand(n)[:, None, None]
        else:
            y = self.cols[t].g
        v_out = rec.out_grads[stage.module] * n if self.second_order else None
        gain = dense_gain(stage, x, y, w_next, mu, self.mu, self.second_order, v_out)
        return lambda xhat: _unflatten((gain @ (xhat - x).reshape(n, -1, 1)).mean(0).reshape(-1),
                                       stage.params)

    # -- the rest of the local model ----------------------------------------------------------------
    def control_gradient(self) -> list:
        """dJ/du_t per stage (the recorded gradients, block order)."""
        return [[p.grad for p in s.params] for s in self.problem.stages]

    def gradient_norm(self) -> float:
        grads = [g for gs in self.control_gradient() for g in gs if g is not None]
        return float(torch.stack(torch._foreach_norm(grads)).norm()) if grads else 0.0

    def costates(self):
        raise InputError("a minibatch local model has no costates (E-MSA runs on NetworkProblem)")

    def memory_estimate(self, second_order: bool = False) -> int:
        raise InputError("a minibatch local model has no memory estimate (that of exact batched "
                         "DDP is NetworkProblem's)")

    # -- pieces -------------------------------------------------------------------------------------
    def _factors(self, stage):
        """The curvature factors of each block of ``stage`` (None for a block without gradient:
        a parameter its module's forward did not use, held fixed, its per-sample gradients
        zero), or None when no block has a gradient."""
        factors = [self.updated.get(b) for b in stage.blocks]
        return None if all(f is None for f in factors) else factors

    def _forms(self, t: int) -> torch.Tensor:
        """N = G^T P G of stage t's columns ((B, r, r)), or rho = q_u^T P q_u of the recorded
        gradients ((B,)) with the rank-one factor."""
        rec, stage, factors = self.problem.rec, self.problem.stages[t], self.factors[t]
        if self.cols is not None:
            return column_quad_forms(stage, factors, rec.inputs[stage.module], self.cols[t].g)
        if t in self.compact:
            return self.compact[t].quad_form(factors[0])
        return quad_form(stage, factors, rec.inputs[stage.module], rec.out_grads[stage.module])

    def _terminal(self):
        """``(Y, W)`` of :func:`nn_adapter.terminal.terminal_factor` for this batch."""
        opt, rec = self.problem.opt, self.problem.rec
        out, g = rec.model_output, rec.model_grad
        value = self.problem.loss
        if opt.terminal_hessian == "gradient":
            if out is not None and g is not None:
                opt._loss.check_mean(out, g, value=value)
            return None, None
        loss = opt._loss(out, g, opt._agreed_loss, value)
        col = opt.collectives
        if opt.terminal_hessian == "sampled" and col is not None and col.world_size > 1:
            # draw for the whole global batch (the same generator state on every rank) and keep
            # this rank's rows: the samples of one process with the global batch
            n = out.shape[0]
            rows = slice(col.rank * n, (col.rank + 1) * n)
            full = out.new_zeros((n * col.world_size,) + out.shape[1:])
            full[rows] = out
            y, w = terminal_factor("sampled", loss, full, None, opt._generator)
            return y[rows], w
        return terminal_factor(opt.terminal_hessian, loss, out, g * out.shape[0], opt._generator)

    def _extras(self, stage, x, xhat, v_out, total, mu=None) -> list:
        """Add the state-form regularisation (mu h_u^T h_x dx) and second-order terms of a
        stage's feedback (per sample divided by the per-sample ``mu``, as the Gauss-Newton part
        is)."""
        eps = self.mu > 0
        if not eps and not self.second_order:
            return total
        dx = xhat - x
        if mu is not None:
            dx = dx / _bcast(mu, dx)
        if eps:
            total = [a + b for a, b in zip(total, tikhonov_grads(stage, x, dx, self.mu))]
        if self.second_order:
            total = [a + b for a, b in zip(total, second_order_grads(stage, x, dx, v_out))]
        return total


def _unflatten(vec: torch.Tensor, like: list) -> list:
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def dense_gain(stage, x: torch.Tensor, y: torch.Tensor, w_next, mu, eps_vxx: float = 0.0,
               second_order: bool = False, v_out: torch.Tensor = None,
               max_elements: int = 50_000_000) -> torch.Tensor:
    """Per-sample Q_ux^(i) / mu_i of one stage, (B, m, n) (``feedback="dense"``: small networks
    and the oracle): the module Jacobians h_x^(i), h_u^(i) (``vmap(jacrev)``), the value Hessian
    at the module output V^(i) = Y W' Y^T, Q_ux = h_u^T V h_x (+ eps h_u^T h_x, + V_x . h_ux with
    second order), divided by mu_i (K^(i) = -P Q_ux^(i) / mu_i).

    Args:
        stage: the :class:`~nn_adapter.stages.Stage`.
        x: nominal module inputs x_t, (B, ...).
        y: the columns Y at the module output (B, r, ...).
        w_next: the weights W' at the output (B, r, r), or None (identity).
        mu: the per-sample regularisation (B,) or None (1).
        eps_vxx, second_order: as in :class:`nn_adapter.DDPNOpt`.
        v_out: per-sample value gradients at the module output (second order only).
        max_elements: refuse (:class:`~nn_adapter.errors.MemoryLimitError`, before anything is
            computed) beyond this many numbers in the stage's matrices (memory grows like
            B (n_t^2 + m_t n_t)).
    """
    B = x.shape[0]
    params = [p.detach() for p in stage.params]
    y = y.reshape(B, y.shape[1], -1).mT                                 # (B, n_out, r)
    n_in, n_out, m = x[0].numel(), y.shape[1], sum(p.numel() for p in params)
    count = B * (n_in * n_in + (m + n_out) * (n_in + n_out)) + m * m
    if count > max_elements:
        size = x.element_size()
        raise MemoryLimitError(count * size, max_elements * size,
                               f"feedback='dense': stage {stage.index} (module {stage.name!r}) needs "
                               f"{count} numbers, more than {max_elements}; batch {B}, inputs {n_in}, "
                               f"outputs {n_out}, parameters {m}",
                               "use the factorised feedback (feedback=True) for networks of this size")
    u = torch.cat([p.reshape(-1) for p in params])
    shape = x.shape[1:]

    def h(xi, uu):
        return stage.module_fn(_unflatten(uu, params), xi.reshape(shape)[None])[0].reshape(-1)

    xf = x.reshape(B, -1)
    hx = vmap(jacrev(h, 0), in_dims=(0, None))(xf, u)                    # (B, n_out, n_in)
    hu = vmap(jacrev(h, 1), in_dims=(0, None))(xf, u)                    # (B, n_out, m)
    V = (y if w_next is None else y @ w_next) @ y.mT                     # Y W' Y^T
    qux = hu.mT @ V @ hx
    if mu is not None:
        qux = qux / mu[:, None, None]
    extra = eps_vxx * hu.mT @ hx if eps_vxx else None
    if second_order:
        v = v_out.reshape(B, -1)

        def vhx(xi, uu, vi):   # V_x . h_x, its u-Jacobian is V_x . h_ux
            return jacrev(h, 0)(xi, uu).T @ vi

        so = vmap(jacrev(vhx, 1), in_dims=(0, None, 0))(xf, u, v).mT
        extra = so if extra is None else extra + so
    if extra is not None:            # the extra terms are divided by mu as well
        qux = qux + (extra if mu is None else extra / mu[:, None, None])
    return qux


def _bcast(s, like: torch.Tensor):
    """A per-sample (B,) tensor shaped to broadcast against ``like`` (numbers pass through)."""
    if not isinstance(s, torch.Tensor):
        return s
    return s.reshape((s.shape[0],) + (1,) * (like.dim() - 1))
