"""DDPNOpt (Liu, Chen & Theodorou, ICLR 2021): DDP once per minibatch, as a torch optimizer.

Layer t of the network is stage t, its input activation is the state x_t and its parameters are
the control u_t. One ``step(closure)``:

1. runs the closure (forward, loss, backward) with hooks that record each stage's input x_t and
   the gradient at its parametrised module's output (per sample: the value gradients);
2. takes the base optimizer's step k_t = -P_t Q_u for every stage from the curvature
   (``identity`` = SGD(-momentum), ``rmsprop``, ``adam``, ``ekfac``), P_t = E[Q_uu]^-1 with the
   learning rate included; with ``feedback=False`` that is all, and DDPNOpt *is* that optimizer;
3. with feedback, starts from a terminal value Hessian that does not grow with the loss (the
   Gauss-Newton Hessian of the loss, :mod:`nn_adapter.terminal`), sweeps back the per-sample
   factors of the value Hessians (:mod:`nn_adapter.feedback`, :mod:`nn_adapter.feedback_columns`)
   and runs Algorithm 3's additional forward pass: for t = 0..T-1, dx_t = xhat_t - x_t,
   u_t <- u_t + k_t + (1/B) sum_i K_t^(i) dx_t^(i), xhat_{t+1} = f_t(xhat_t, u_t), with
   K_t^(i) dx^(i) = -(P_t / mu_i) q_u^(i) (q_x^(i) . dx^(i)) and mu_i >= 1 the per-sample
   regularisation that keeps the sample's local model convex.

Cost (factorised feedback): the closure, one extra forward pass, and per stage a weight-gradient-
sized product; q_x . dx uses the gradients backpropagation already computed at each stage input
(no Jacobian-vector product), and a convolution stage is kept as its per-sample gradients
(needed for s anyway; smaller than its activations), so its inputs and cotangents are released
right after the backward sweep. ``s`` needs q_u^T P q_u per sample: free for Linear layers on
(B, n) inputs (rank one), the cost of per-sample gradients for convolutions.

The closure's loss must be the batch mean of per-sample losses (torch's default reduction).
Modules are recorded with hooks that exist only while the closure runs; each parametrised module
must run exactly once in it.

Reference: G.-H. Liu, T. Chen, E. A. Theodorou, "DDPNOpt: Differential Dynamic Programming
Neural Optimizer", ICLR 2021 (Algorithm 3, Propositions 2 and 3).
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Union

import torch
from torch import nn

from occore.errors import InputError

from .curvature.base import apply_p
from .curvature.optimizer import CurvatureOptimizer
from .curvature.records import Recorder
from .feedback import (CompactStage, StageView, feedback_grads, quad_form, run_module,
                       second_order_grads, tikhonov_grads)
from .feedback_columns import column_feedback, column_quad_forms, next_weights, pull_columns
from .feedback_dense import apply_gains, dense_gains
from .terminal import LOSSES, TERMINAL_HESSIANS, LossResolver, terminal_factor

__all__ = ["DDPNOpt"]

log = logging.getLogger("nn_adapter")

FEEDBACK_MODES = (True, False, "factorised", "dense")


class DDPNOpt(CurvatureOptimizer):
    """Differential Dynamic Programming Neural Optimizer with layer-wise feedback policies.

    Args:
        model: the network; with feedback, a chain of stages ``nn_adapter.stages.split_stages``
            can split (each parametrised module followed by its parameter-free modules).
        lr: learning rate (part of P; in the param group, so LR schedulers work).
        curvature: ``"identity"`` (SGD, with ``momentum``/``dampening``/``nesterov``),
            ``"rmsprop"`` (``alpha``, ``eps``, ``momentum``, ``centered``), ``"adam"`` (``betas``,
            ``eps``, ``amsgrad``) or ``"ekfac"`` (``damping``, ``stat_decay``,
            ``factor_update_freq``, ``eigen_update_freq``); all take ``weight_decay``.
        feedback: ``True`` / ``"factorised"`` (Proposition 3, the default), ``False`` (the base
            optimizer exactly) or ``"dense"`` (per-sample gains materialised, see
            :mod:`nn_adapter.feedback_dense`; small networks only).
        eps_vxx: Tikhonov term added to the value Hessians V_xx (finite, >= 0), Algorithm 3
            line 12. In the factorised feedback it enters each stage's gain as the state cost it
            amounts to, eps f_u^T f_x dx (the eps I of the next stage's V_xx pulled back one
            stage), and is not carried further back: carrying eps I through the Schur
            complements makes V_xx dense (n_t x n_t per sample). ``feedback="dense"`` carries
            it back exactly, so the two differ when eps_vxx > 0 (they agree exactly at 0).
        second_order: also expand the dynamics to second order (adds V_x . f_ux dx, the
            first-order change of the layer's own gradient, g dx^T for a Linear layer).
        vxx_update: carry V_xx = Q_xx - Q_ux^T Q_uu^-1 Q_ux back (the default, Proposition 3),
            with the per-sample regularisation mu_i below. With False, V_xx = Q_xx and no
            per-sample quadratic forms q_u^T P q_u are formed (for a convolution they cost as
            much as per-sample gradients), so there is no mu either.
        terminal_hessian: the terminal value Hessian V_xx^T, see :mod:`nn_adapter.terminal`:
            ``"projected"`` (default: the Gauss-Newton Hessian of the loss along the value
            gradient, no extra cost), ``"gauss_newton"`` (exact, C columns per sample: one extra
            backward of C cotangents), ``"sampled"`` (its Monte-Carlo rank-one sample, one extra
            backward) or ``"gradient"`` (the outer product V_x V_x^T of Proposition 3, which
            grows with the loss's gradient).
        loss: ``"auto"`` (softmax cross-entropy is recognised from the recorded output and
            gradient; anything else is taken as mean squared error, with a warning),
            ``"cross_entropy"`` or ``"mse"``: which loss's Gauss-Newton Hessian to use.
        feedback_bound: trust region of the feedback: per stage, ||P Q_ux dx|| is scaled down to
            at most ``feedback_bound`` times the open-loop step ||k|| (``math.inf``: no bound).
            The default 0.3 was chosen by ``benchmarks/lr_robustness.py`` (DIGITS and WINE, four
            curvatures, lr x0.1..x10, 5 seeds): unbounded, early-training feedback reaches 2.5x
            ||k|| and DDPNOpt ended worse than its base in 6 of 40 cells; with 1.0 in 8 (and
            one more divergence), with 0.3 in 4, none diverging more often than its base.
        diagnostics: record, at every step, ``optimizer.diagnostics``: one dict per stage with
            ``k_norm`` (||k||), ``feedback_norm`` (||P Q_ux dx|| as applied), ``ratio`` (their
            quotient) and ``clamped`` (the share of samples whose local model was not convex,
            mu_i > 1). Costs a few reductions and a host synchronisation per stage.
        seed: seed of the generator of ``terminal_hessian="sampled"``.
        **hyperparameters: the curvature's hyperparameters, named as torch names them.

    Each stage's gain is K^(i) = -(P / mu_i) Q_ux^(i) with mu_i = max(1, q_u^T P q_u) (rank one;
    lambda_max of the sample's Schur form with r columns): the smallest Levenberg-Marquardt factor
    that makes the sample's local model [[Q_xx, Q_xu], [Q_ux, mu P^-1]] convex, as mu makes Q_uu
    positive definite in classic DDP. V_x is the backpropagated gradient (not Eq. 5's
    Q_x - Q_ux^T Q_uu^-1 Q_u): the open-loop step k is then exactly the base optimizer's, so the
    feedback is the only difference from it (Proposition 2), and the feedback does not enter the
    base optimizer's moments or normaliser (it is a correction to this step, not a gradient).
    A step whose feedback would write a non-finite parameter is refused: parameters and
    optimizer state are restored and a ``RuntimeWarning`` is issued.

    Raises:
        ValueError: an invalid or unknown hyperparameter, named in the message.
        nn_adapter.errors.UnsupportedModuleError: a model whose stages cannot be found (with
            feedback on).

    Example:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = DDPNOpt(net, lr=0.01, curvature="adam")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = nn.functional.cross_entropy(net(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure).item()
        >>> for _ in range(20):
        ...     loss = opt.step(closure).item()
        >>> loss < first
        True
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, curvature: str = "adam",
                 feedback: Union[bool, str] = True, eps_vxx: float = 0.0,
                 second_order: bool = False, vxx_update: bool = True,
                 terminal_hessian: str = "projected", loss: str = "auto", diagnostics: bool = False,
                 seed: int = 0, feedback_bound: float = 0.3, **hyperparameters):
        if not any(feedback is m or (isinstance(m, str) and feedback == m)
                   for m in FEEDBACK_MODES):
            raise ValueError(f"invalid feedback: {feedback!r} (expected True, False, "
                             "'factorised' or 'dense')")
        if (not isinstance(eps_vxx, (int, float)) or isinstance(eps_vxx, bool) or not eps_vxx >= 0
                or not math.isfinite(eps_vxx)):
            raise ValueError(f"invalid eps_vxx: {eps_vxx!r} (expected a finite number >= 0)")
        if not isinstance(second_order, bool):
            raise ValueError(f"invalid second_order: {second_order!r} (expected a bool)")
        if not isinstance(vxx_update, bool):
            raise ValueError(f"invalid vxx_update: {vxx_update!r} (expected a bool)")
        if terminal_hessian not in TERMINAL_HESSIANS:
            raise ValueError(f"invalid terminal_hessian: {terminal_hessian!r} (expected one of "
                             f"{', '.join(TERMINAL_HESSIANS)})")
        if loss not in LOSSES:
            raise ValueError(f"invalid loss: {loss!r} (expected one of {', '.join(LOSSES)})")
        if not isinstance(diagnostics, bool):
            raise ValueError(f"invalid diagnostics: {diagnostics!r} (expected a bool)")
        if (not isinstance(feedback_bound, (int, float)) or isinstance(feedback_bound, bool)
                or not feedback_bound > 0):
            raise ValueError(f"invalid feedback_bound: {feedback_bound!r} (expected a number > 0, "
                             "or math.inf for no bound)")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"invalid seed: {seed!r} (expected an int)")
        super().__init__(model, curvature, lr, **hyperparameters)
        self.terminal_hessian = terminal_hessian
        self.feedback_bound = float(feedback_bound)
        self.record_diagnostics = diagnostics
        self.diagnostics = None
        self._clamped: dict = {}
        self._loss = LossResolver(loss)
        self._generator = torch.Generator().manual_seed(seed)
        self.feedback = "factorised" if feedback is True else feedback
        self.eps_vxx = float(eps_vxx)
        self.second_order = second_order
        self.vxx_update = vxx_update
        self._views: list[StageView] = []
        self._last_modules: list[nn.Module] = []
        if self.feedback:
            self._views, self._last_modules = self._find_stages(model)

    # -- stages ----------------------------------------------------------------------------------
    def _find_stages(self, model):
        from .stages import split_stages

        _, stages = split_stages(model)   # raises UnsupportedModuleError naming the module
        views, last, covered = [], [], set()
        for stage in stages:
            module = stage.modules[0]
            own = {id(p) for p in module.parameters()}
            blocks = [b for b in self._blocks if all(id(p) in own for p in b.params)]
            views.append(StageView(module, list(stage.modules[1:]), blocks))
            last.append(stage.modules[-1])
            covered.update(id(p) for b in blocks for p in b.params)
        missing = [p for b in self._blocks for p in b.params if id(p) not in covered]
        if missing:
            raise InputError(f"model: {len(missing)} trainable parameter(s) belong to no stage")
        return views, last

    def _recorded_modules(self):
        mods = super()._recorded_modules()
        return list({id(m): m for m in mods + [v.module for v in self._views]}.values())

    def _make_recorder(self) -> Recorder:
        inputs = self._recorded_modules()
        heads = [v.module for v in self._views[1:]]
        grads = super()._recorded_modules() + heads
        if self.second_order:
            grads += self._last_modules[1:]
        if self.feedback == "dense" or self.terminal_hessian != "gradient":
            grads += self._last_modules[-1:]
        outputs = self._last_modules[-1:] if self.terminal_hessian != "gradient" else []
        # q_x = h_x^T g is recorded where it saves a Jacobian-vector product (not for Linear)
        in_grads = [v.module for v in self._views[1:]
                    if not (v.structured and v.blocks[0].kind == "linear")]
        return Recorder(inputs, list({id(m): m for m in grads}.values()), in_grads, outputs)

    def _check_records(self, rec: Recorder) -> None:
        rec.check_complete([v.module for v in self._views], need_grads=False)
        rec.check_complete(super()._recorded_modules() + [v.module for v in self._views[1:]])

    # -- the update ------------------------------------------------------------------------------
    def _factors(self, view, updated):
        """The stage's factors P (one per block), or None when a block got no gradient.

        ``updated`` maps blocks to their factors, or is the set of updated blocks (then the
        factors are computed now)."""
        if not all(b in updated for b in view.blocks):
            return None
        if isinstance(updated, dict):
            return [updated[b] for b in view.blocks]
        return self._factors_of(view.blocks)

    def _update(self, rec: Recorder) -> None:
        if not self.feedback:
            return super()._update(rec)
        saved = self._snapshot()
        self.diagnostics = [] if self.record_diagnostics else None
        self._clamped = {}
        if self.feedback == "dense":
            self._update_dense(rec)
        else:
            self._update_factorised(rec)
        params = [p for b in self._blocks for p in b.params]
        if not math.isfinite(float(torch.stack(torch._foreach_norm(params)).sum())):
            self._restore(saved)
            msg = ("DDPNOpt: the feedback pass gave a non-finite parameter; step refused, "
                   "parameters and optimizer state unchanged")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _snapshot(self):
        """The parameters and the optimizer state, packed into one flat buffer per dtype and
        device (restored if the step is refused)."""
        params = [p for b in self._blocks for p in b.params]
        tensors = [p.detach() for p in params]
        layout = []                       # per parameter: None (no state) or {key: index | value}
        for p in params:
            if p not in self.state:
                layout.append(None)
                continue
            entry = {}
            for k, v in self.state[p].items():
                if isinstance(v, torch.Tensor):
                    entry[k] = len(tensors)
                    tensors.append(v.detach())
                else:
                    entry[k] = ("value", copy.deepcopy(v))
            layout.append(entry)
        groups: dict = {}
        for i, v in enumerate(tensors):
            groups.setdefault((v.dtype, v.device), []).append(i)
        packed = [(idx, torch.cat([tensors[i].reshape(-1) for i in idx])) for idx in groups.values()]
        return params, [v.shape for v in tensors], layout, packed

    def _restore(self, saved) -> None:
        params, shapes, layout, packed = saved
        values: dict = {}
        for idx, buf in packed:
            for i, part in zip(idx, buf.split([math.prod(shapes[i]) for i in idx])):
                values[i] = part.reshape(shapes[i])
        for i, p in enumerate(params):
            p.copy_(values[i])
        for p, entry in zip(params, layout):
            if entry is None:
                self.state.pop(p, None)
            else:
                self.state[p] = {k: values[v].clone() if isinstance(v, int) else v[1]
                                 for k, v in entry.items()}

    def _terminal(self, rec: Recorder):
        """``(Y, W)`` of :func:`nn_adapter.terminal.terminal_factor` for this batch."""
        if self.terminal_hessian == "gradient":
            return None, None
        out_mod = self._last_modules[-1]
        out, g = rec.outputs.get(out_mod), rec.out_grads.get(out_mod)
        if out is None or g is None:
            raise InputError("closure: the network output got no gradient; the closure must "
                             "call loss.backward() on a loss of the model's output")
        loss = self._loss(out, g)
        return terminal_factor(self.terminal_hessian, loss, out, g * out.shape[0], self._generator)

    def _update_factorised(self, rec: Recorder) -> None:
        updated = self._update_curvature(rec)      # {block: factors}, batched over the net
        y_out, w_out = self._terminal(rec)
        if y_out is None:
            feedback_of = self._recorded_feedback(rec, updated, w_out)
        else:
            feedback_of = self._column_feedback(rec, updated, y_out)
        self._forward_pass(rec, updated, feedback_of)

    def _forward_pass(self, rec: Recorder, updated, feedback_of) -> None:
        """Algorithm 3's additional forward pass: u_t <- u_t + k_t - P_t feedback_of(t, xhat_t)."""
        views = self._views
        xhat = rec.inputs[views[0].module]
        for t, view in enumerate(views):
            factors = self._factors(view, updated)
            if factors is not None:
                self._apply_stage(t, view, factors, feedback_of(t, view, xhat, factors))
            if t < len(views) - 1:
                for m in (view.module, *view.followers):
                    xhat = run_module(m, xhat)

    def _apply_stage(self, t, view, factors, delta) -> None:
        """u <- u + k - s P delta for one stage, s = min(1, bound ||k|| / ||P delta||).

        ``delta``: the stage's unpreconditioned feedback sums (per parameter), or None. Without a
        bound and diagnostics the curvature applies k - P delta itself (fused where it can be)."""
        bounded = delta is not None and math.isfinite(self.feedback_bound)
        if not bounded and self.diagnostics is None:
            i = 0
            for block, fac in zip(view.blocks, factors):
                n = len(block.params)
                self._apply(block, fac, delta[i:i + n] if delta is not None else None)
                i += n
            return
        group = self.param_groups[0]
        ks, pes, i = [], [], 0
        for block, fac in zip(view.blocks, factors):
            n = len(block.params)
            grads, states = self._grads_states(block)
            ks += self.curvature.direction(block, grads, group, states, fac)
            if delta is not None:
                pes += apply_p(block, fac, delta[i:i + n])
            i += n
        norms = torch.stack(torch._foreach_norm(ks + pes))
        k_norm, p_norm = norms[:len(ks)].norm(), norms[len(ks):].norm()
        scale = ((self.feedback_bound * k_norm / p_norm.clamp(min=1e-300)).clamp(max=1.0)
                 if bounded else torch.ones_like(k_norm))
        if self.diagnostics is not None:
            fb, kn = float(p_norm * scale), float(k_norm)
            self.diagnostics.append({"stage": t, "k_norm": kn, "feedback_norm": fb,
                                     "ratio": fb / kn if kn > 0 else 0.0,
                                     "bounded": bool(scale < 1),
                                     "clamped": self._clamped.get(t, 0.0)})
        if pes:
            torch._foreach_mul_(pes, scale.to(pes[0].dtype))
            torch._foreach_sub_(ks, pes)
        torch._foreach_add_([p for b in view.blocks for p in b.params], ks)

    def _recorded_feedback(self, rec, updated, w_out):
        """The rank-one feedback on the gradients backpropagation recorded (terminal columns =
        the value gradient; ``w_out``: per-sample terminal weight, None for 1)."""
        views = self._views
        n = rec.inputs[views[0].module].shape[0]
        compact: dict[int, CompactStage] = {}
        weights, mus = self._backward_sweep(rec, updated, compact,
                                            float(n) if w_out is None else w_out.sqrt() * n)
        scales = [None if mu is None else mu.reciprocal() for mu in mus]

        def feedback_of(t, view, xhat, factors):
            x = rec.inputs.pop(view.module, None)
            g = rec.out_grads.pop(view.module, None)
            v_next = rec.out_grads.pop(self._last_modules[t], g) if self.second_order else None
            if t in compact:
                return compact.pop(t).feedback(xhat, weights[t + 1], scales[t])
            if t == 0 or factors is None:
                return None
            v_next = v_next * x.shape[0] if v_next is not None else None
            g = g * _bcast(weights[t + 1], g)   # out of place: a user may hold these grads
            q_x = rec.in_grads.pop(view.module, None)
            if q_x is not None:
                q_x = q_x * _bcast(weights[t + 1], q_x)
            total = feedback_grads(view, x, xhat, g, q_x, overwrite=True, sample_scale=scales[t])
            return self._add_extras(t, view, x, xhat, v_next, total, mus[t])
        return feedback_of

    def _column_feedback(self, rec, updated, y_out):
        """The r-column feedback (:mod:`nn_adapter.feedback_columns`) for terminal columns y_out."""
        views = self._views
        T = len(views)
        inputs = [rec.inputs[v.module] for v in views]
        cols = pull_columns(views, inputs, y_out)
        ws: list = [None] * (T + 1)          # W at the output of stage t is ws[t + 1]
        mus: list = [None] * T
        for t in range(T - 1, 0, -1):
            ws[t] = ws[t + 1]
            factors = self._factors(views[t], updated)
            if self.vxx_update and factors is not None:
                nq = column_quad_forms(views[t], factors, inputs[t], cols[t].g)
                mus[t], ws[t] = next_weights(ws[t + 1], nq)
                if self.diagnostics is not None:
                    self._clamped[t] = float((mus[t] > 1).double().mean())
        stage_out = {}
        if self.second_order:
            n = inputs[0].shape[0]
            stage_out = {t: rec.out_grads[self._last_modules[t]] * n for t in range(1, T)}

        def feedback_of(t, view, xhat, factors):
            if t == 0 or factors is None:
                return None
            total = column_feedback(view, inputs[t], xhat, cols[t], ws[t + 1], mus[t])
            return self._add_extras(t, view, inputs[t], xhat, stage_out.get(t), total, mus[t])
        return feedback_of

    def _add_extras(self, t, view, x, xhat, v_next, total, mu=None) -> list:
        """Add the Tikhonov (eps_vxx) and second-order dynamics terms of stage t's feedback
        (per sample divided by the regularisation ``mu``, as the Gauss-Newton part is)."""
        if not (self.eps_vxx > 0 and t < len(self._views) - 1) and not self.second_order:
            return total
        dx = xhat - x
        if mu is not None:
            dx = dx / _bcast(mu, dx)
        if self.eps_vxx > 0 and t < len(self._views) - 1:
            total = [a + b for a, b in zip(total, tikhonov_grads(view, x, dx, self.eps_vxx))]
        if self.second_order:
            total = [a + b for a, b in zip(total, second_order_grads(view, x, dx, v_next))]
        return total

    def _update_dense(self, rec: Recorder) -> None:
        """``feedback="dense"``: per-sample gains materialised (:mod:`nn_adapter.feedback_dense`)."""
        updated = self._update_curvature(rec)
        views = self._views
        if not all(b in updated for v in views for b in v.blocks):
            raise InputError("feedback='dense' needs gradients for every stage's parameters")
        factors = [self._factors(v, updated) for v in views]
        inputs = [rec.inputs[v.module] for v in views]
        n = inputs[0].shape[0]
        stage_out = ([None] + [rec.out_grads[m] * n for m in self._last_modules[1:]]
                     if self.second_order else None)
        g_out = rec.out_grads[self._last_modules[-1]] * n
        y_out, w_out = self._terminal(rec)
        y = (g_out[:, None] if y_out is None else y_out).reshape(n, -1, g_out[0].numel())
        v_term = y.mT @ y if w_out is None else w_out[:, None, None] * (y.mT @ y)
        gains = dense_gains(views, factors, inputs, v_term, self.vxx_update, self.eps_vxx,
                            self.second_order, stage_out)

        def feedback_of(t, view, xhat, fac):
            return apply_gains(view, gains[t], xhat - inputs[t]) if t > 0 else None
        self._forward_pass(rec, updated, feedback_of)

    def _compactable(self, view: StageView, rec: Recorder) -> bool:
        return (view.structured and view.blocks[0].kind == "conv2d" and self.eps_vxx == 0
                and not self.second_order and view.module in rec.in_grads)

    def _backward_sweep(self, rec, updated, compact, w_out):
        """Per-sample weights w_t = B S_t of the recorded gradients and regularisations mu_t.

        z_t = w_t dL/dx_t, S_t = s_t ... s_{T-1} S_T (S_T^2: the terminal weight; a plain number
        while all factors are one). With rho = q_u^T P q_u of z_{t+1}, the sample's local model is
        convex iff rho <= 1; mu = max(1, rho) regularises its Q_uu to mu P^-1 (its gain is
        divided by mu) and s^2 = 1 - rho / mu >= 0. Convolution stages are turned into
        :class:`CompactStage` on the way (their inputs and cotangents released).

        Returns:
            ``(weights, mus)``: weights[t] for t = 0..T, mus[t] a (B,) tensor or None (mu = 1).
        """
        views = self._views
        T = len(views)
        weights: list = [w_out] * (T + 1)
        mus: list = [None] * T
        for t in range(T - 1, 0, -1):
            view = views[t]
            weights[t] = weights[t + 1]
            if not all(b in updated for b in view.blocks):
                continue
            need_rho = self.vxx_update
            if need_rho:
                factors = self._factors(view, updated)
            if self._compactable(view, rec):
                cs = compact[t] = CompactStage.build(
                    view.blocks[0], rec.inputs.pop(view.module), rec.out_grads.pop(view.module),
                    rec.in_grads.pop(view.module))
                if need_rho:
                    w = weights[t + 1]
                    rho = cs.quad_form(factors[0]) * (w * w if isinstance(w, float) else w.square())
            elif need_rho:   # rho(w g) = w^2 rho(g)
                w = weights[t + 1]
                rho = quad_form(view, factors, rec.inputs[view.module], rec.out_grads[view.module])
                rho = rho.mul_(w * w if isinstance(w, float) else w.square())
            if need_rho:
                if self.diagnostics is not None:
                    self._clamped[t] = float((rho > 1).double().mean())
                mu = rho.clamp(min=1.0)
                mus[t] = mu
                weights[t] = (1.0 - rho / mu).clamp_(min=0.0).sqrt_().mul_(weights[t + 1])
        return weights, mus


def _bcast(s, like: torch.Tensor):
    """A per-sample (B,) tensor shaped to broadcast against ``like`` (numbers pass through)."""
    if not isinstance(s, torch.Tensor):
        return s
    return s.reshape((s.shape[0],) + (1,) * (like.dim() - 1))
