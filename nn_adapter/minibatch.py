"""The minibatch a closure recorded, as an occore control problem: DDPNOpt's one DDP iteration.

:class:`MinibatchProblem` implements :class:`occore.types.ControlProblem` for one minibatch: the
closure's forward pass is the rollout (states x_t = the inputs each stage's module saw, controls
u_t = its parameters, cost = the closure's loss), :meth:`MinibatchProblem.local_model` updates the
optimizer's curvature with the batch gradient (the derivatives at the trajectory) and returns a
:class:`MinibatchLocalModel`, whose ``backward(mu)`` is the layer-wise Bellman sweep of DDPNOpt's
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

from occore.errors import InputError
from occore.types import Policy, Trajectory

from .curvature.base import apply_p
from .feedback import feedback_grads, quad_form, second_order_grads, tikhonov_grads
from .feedback_columns import column_feedback, column_quad_forms, next_weights, pull_columns
from .feedback_dense import apply_gains, dense_gains
from .module_stages import replay
from .terminal import terminal_factor

__all__ = ["MinibatchProblem", "MinibatchLocalModel"]


class _Done(Exception):
    """Raised by the last stage's hook: the rest of the model's forward is not needed."""


class StageStep:
    """The open-loop step of one stage, applied with its feedback: u <- u + k - s P delta.

    ``s = min(1, bound ||k|| / ||P delta||)`` (the optimizer's ``feedback_bound``). Without a
    bound and diagnostics the curvature applies ``k - P delta`` itself (fused where it can)."""

    def __init__(self, opt, t: int, stage, factors):
        self.opt, self.t, self.stage, self.factors = opt, t, stage, factors

    def apply(self, delta) -> None:
        opt, stage, factors = self.opt, self.stage, self.factors
        bounded = delta is not None and math.isfinite(opt.feedback_bound)
        if not bounded and opt.diagnostics is None:
            i = 0
            for block, fac in zip(stage.blocks, factors):
                n = len(block.params)
                opt._apply(block, fac, delta[i:i + n] if delta is not None else None)
                i += n
            return
        ks, pes, i = [], [], 0
        for block, fac in zip(stage.blocks, factors):
            n = len(block.params)
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
        scale = ((opt.feedback_bound * k_norm / p_norm.clamp(min=1e-300)).clamp_(max=1.0)
                 if bounded else torch.ones_like(k_norm))
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
        torch._foreach_add_(stage.params, ks)


class MinibatchProblem:
    """One recorded minibatch as a :class:`occore.types.ControlProblem` (see the module docstring).

    Args:
        opt: the :class:`nn_adapter.DDPNOpt` (curvature, state, options).
        rec: its :class:`~nn_adapter.module_stages.StageRecorder` after the closure.
        stages: the :class:`~nn_adapter.module_stages.ModuleStage` list, in execution order.
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

    def local_model(self, traj: Trajectory, second_order: bool = False) -> "MinibatchLocalModel":
        """Update the curvature with the batch gradient; the local model at the recorded batch."""
        return MinibatchLocalModel(self, self.opt._update_curvature(self.rec))

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
            with torch.no_grad(), replay(rec):
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


class MinibatchLocalModel:
    """The local model of one minibatch (implements :class:`occore.types.LocalModel`).

    ``backward(mu)`` returns the policy of Algorithm 3 (mu: the state-form regularisation, see
    :meth:`backward`): ``k`` holds one
    :class:`StageStep` per stage (None for a stage without gradient), ``K`` one operator per stage
    of the measured input xhat_t, giving the unpreconditioned feedback sum
    (1/B) sum_i Q_ux^(i) dx^(i) / mu_i (None where there is no feedback: stage 0, whose input is
    the data). The expected decrease is not computed (NaN): the stochastic step does not use it.
    """

    def __init__(self, problem: MinibatchProblem, updated: dict):
        self.problem, self.updated = problem, updated
        self.second_order = False
        self.mu = 0.0

    # -- the protocol -----------------------------------------------------------------------------
    def backward(self, mu: float, second_order: bool = False):
        """The policy of Algorithm 3 with the state-form regularisation mu (V_xx' + mu I where it
        enters the gains: the feedback gains gain mu h_u^T h_x; Q_uu stays P^-1, so k is the base
        optimizer's step whatever mu); ``second_order`` adds the modules' own second derivatives
        contracted with V_x (DDP rather than iLQR)."""
        self.second_order = second_order
        self.mu = float(mu)
        opt, stages = self.problem.opt, self.problem.stages
        factors = [self._factors(s, mu) for s in stages]
        steps = [None if f is None else StageStep(opt, t, s, f)
                 for t, (s, f) in enumerate(zip(stages, factors))]
        ops = self._feedback(factors) if opt.feedback else [None] * len(stages)
        return Policy(k=steps, K=ops), (float("nan"), float("nan"))

    def control_gradient(self) -> list:
        """dJ/du_t per stage (the recorded gradients, block order)."""
        return [[p.grad for p in s.params] for s in self.problem.stages]

    def gradient_norm(self) -> float:
        grads = [g for gs in self.control_gradient() for g in gs if g is not None]
        return float(torch.stack(torch._foreach_norm(grads)).norm()) if grads else 0.0

    def costates(self):
        raise InputError("a minibatch local model has no costates (E-MSA runs on NetworkProblem)")

    # -- pieces -------------------------------------------------------------------------------------
    def _factors(self, stage, mu):
        if not all(b in self.updated for b in stage.blocks):
            return None
        return [self.updated[b] for b in stage.blocks]

    def _terminal(self):
        """``(Y, W)`` of :func:`nn_adapter.terminal.terminal_factor` for this batch."""
        opt, rec = self.problem.opt, self.problem.rec
        out, g = rec.model_output, rec.model_grad
        if opt.terminal_hessian == "gradient":
            if out is not None and g is not None:
                opt._loss.check_mean(out, g)
            return None, None
        loss = opt._loss(out, g, opt._agreed_loss)
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

    def _extras(self, t, stage, x, xhat, v_out, total, mu=None) -> list:
        """Add the regularisation (mu h_u^T h_x dx) and second-order terms of stage t's feedback (per sample
        divided by the regularisation ``mu``, as the Gauss-Newton part is)."""
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

    def _feedback(self, factors) -> list:
        """The value sweep and the feedback operators of every stage.

        The terminal factor gives the columns of the value Hessians at every module output:
        the recorded gradients themselves (rank one: ``projected``, ``gradient``) or the terminal
        columns pulled back through the model (``gauss_newton``, ``sampled``). One backward
        recursion (:meth:`_sweep`) gives each stage's per-sample weights W and regularisation mu;
        the gains are then held factorised (one weight-gradient-sized product per stage) or,
        with ``feedback="dense"``, materialised per sample (:mod:`nn_adapter.feedback_dense`)."""
        problem, opt = self.problem, self.problem.opt
        rec, stages, n = problem.rec, problem.stages, problem.batch_size
        T = len(stages)
        y_out, w_out = self._terminal()
        # Conv2d stages kept as per-sample gradients since the backward pass (the recorder's
        # ``compact``, see DDPNOpt._compact_builders)
        compact = {t: rec.compact.pop(s.module) for t, s in enumerate(stages)
                   if t > 0 and factors[t] is not None and s.module in rec.compact}
        if y_out is None:
            # columns = the recorded mean-loss gradients; W_T = (B S_T)^2 per sample
            w_term = float(n * n) if w_out is None else w_out * (n * n)

            def forms(t):                  # rho = q_u^T P q_u of the recorded gradients
                if t in compact:
                    return compact[t].quad_form(factors[t][0])
                s = stages[t]
                return quad_form(s, factors[t], rec.inputs[s.module], rec.out_grads[s.module])
            cols = None
        else:
            w_term = None
            cols = pull_columns(rec, stages, y_out)

            def forms(t):                  # N = G^T P G of the columns
                return column_quad_forms(stages[t], factors[t], rec.inputs[stages[t].module],
                                         cols[t].g)
        ws, mus = self._sweep(factors, forms, w_term)
        if opt._clamped and opt.collectives is not None:     # diagnostics: the global shares
            keys = sorted(opt._clamped)
            sums = opt.collectives.average_([], [opt._clamped[k] for k in keys])
            opt._clamped = {k: v / opt.collectives.world_size for k, v in zip(keys, sums)}
        if opt.feedback == "dense":
            return self._dense_ops(factors, cols, ws, mus)
        if cols is None:
            return self._rank_one_ops(factors, compact, ws, mus)
        return self._column_ops(factors, cols, ws, mus)

    def _sweep(self, factors, forms, w_term):
        """The backward recursion of the value Hessians' weights, for stages T-1 .. 1.

        With V_xx at a module output = Y W' Y^T (columns Y at that output, W' the weights of the
        stages after it) and N = G^T P G (G = h_u^T Y), the sample's local model is convex iff
        lambda_max(W'^1/2 N W'^1/2) <= 1; mu = max(1, lambda_max) regularises its Q_uu to
        mu P^-1 (its gain is divided by mu) and W = W' - W' N W' / mu
        (:func:`~nn_adapter.feedback_columns.next_weights`; r = 1: W = W' (1 - rho W' / mu)).

        Returns:
            ``(ws, mus)``: ws[t + 1] the weights at stage t's output (t = 0..T-1; a number, a
            (B,) tensor for rank one, (B, r, r) or None for the identity), mus[t] a (B,) tensor
            or None (mu = 1).
        """
        opt, T = self.problem.opt, self.problem.horizon
        ws: list = [w_term] * (T + 1)
        mus: list = [None] * T
        for t in range(T - 1, 0, -1):
            ws[t] = ws[t + 1]
            if factors[t] is None or not opt.vxx_update:
                continue
            mus[t], ws[t] = next_weights(ws[t + 1], forms(t))
            if opt.diagnostics is not None:
                opt._clamped[t] = float((mus[t] > 1).double().mean())
        return ws, mus

    def _rank_one_ops(self, factors, compact, ws, mus) -> list:
        """Feedback operators of the rank-one sweep: (1/B) sum_i w_i^2 q_u (q_x . dx) / mu_i."""
        problem = self.problem
        rec, stages, n = problem.rec, problem.stages, problem.batch_size
        ops: list = [None] * len(stages)
        for t in range(1, len(stages)):
            if factors[t] is None:
                continue
            stage = stages[t]
            w = ws[t + 1]

            def op(xhat, t=t, stage=stage, w=w, mu=mus[t]):
                if t in compact:
                    return compact.pop(t).feedback(
                        xhat, math.sqrt(w) if isinstance(w, float) else w.sqrt(),
                        None if mu is None else mu.reciprocal())
                x = rec.inputs.pop(stage.module)
                g = rec.out_grads.pop(stage.module)
                v_out = g * n if self.second_order else None
                q_x = rec.in_grads.pop(stage.module, None)
                # the terms are quadratic in the weighted cotangents sqrt(w) g: their per-sample
                # factor w / mu scales the coefficients (g itself is not written: a user may
                # hold these grads)
                total = feedback_grads(stage, x, xhat, g, q_x,
                                       sample_scale=w if mu is None else w / mu)
                return self._extras(t, stage, x, xhat, v_out, total, mus[t])
            ops[t] = op
        return ops

    def _column_ops(self, factors, cols, ws, mus) -> list:
        """Feedback operators of the r-column sweep (:func:`column_feedback`)."""
        problem = self.problem
        rec, stages, n = problem.rec, problem.stages, problem.batch_size
        inputs = [rec.inputs[s.module] for s in stages]
        ops: list = [None] * len(stages)
        for t in range(1, len(stages)):
            if factors[t] is None:
                continue

            def op(xhat, t=t):
                total = column_feedback(stages[t], inputs[t], xhat, cols[t], ws[t + 1], mus[t])
                v_out = rec.out_grads[stages[t].module] * n if self.second_order else None
                return self._extras(t, stages[t], inputs[t], xhat, v_out, total, mus[t])
            ops[t] = op
        return ops

    def _dense_ops(self, factors, cols, ws, mus) -> list:
        """``feedback="dense"``: the same sweep's gains materialised per sample."""
        problem = self.problem
        rec, stages, n = problem.rec, problem.stages, problem.batch_size
        if any(f is None for f in factors):
            raise InputError("feedback='dense' needs gradients for every stage's parameters")
        inputs = [rec.inputs[s.module] for s in stages]
        like = inputs[0]
        if cols is None:               # rank one: the recorded gradients, W a number or (B,)
            g = [None] + [rec.out_grads[s.module][:, None] for s in stages[1:]]
            w = [torch.as_tensor(v, dtype=like.dtype, device=like.device).expand(n)[:, None, None]
                 for v in ws]
        else:
            g, w = [None] + [c.g for c in cols[1:]], ws
        v_out = ([None] + [rec.out_grads[s.module] * n for s in stages[1:]]
                 if self.second_order else None)
        gains = dense_gains(stages, inputs, g, w, mus, self.mu, self.second_order, v_out)
        ops: list = [None] * len(stages)
        for t in range(1, len(stages)):
            ops[t] = (lambda xhat, t=t: apply_gains(stages[t], gains[t], xhat - inputs[t]))
        return ops


def _bcast(s, like: torch.Tensor):
    """A per-sample (B,) tensor shaped to broadcast against ``like`` (numbers pass through)."""
    if not isinstance(s, torch.Tensor):
        return s
    return s.reshape((s.shape[0],) + (1,) * (like.dim() - 1))
