"""DDPNOpt (Liu, Chen & Theodorou, ICLR 2021): DDP once per minibatch, as a torch optimizer.

Stage t is the t-th module owning trainable parameters in the order the model's own ``forward``
runs them (:mod:`nn_adapter.module_stages`: any module graph, custom ``forward``, skips); its input
is the state x_t and its parameters are the control u_t. One ``step(closure)`` is one iteration of
occore's DDP/iLQR loop (``stochastic=True``: one full step, no cost check) on the minibatch the
closure recorded (:mod:`nn_adapter.minibatch`):

1. runs the closure (forward, loss, backward) with hooks that record each stage's input x_t and
   the gradient at its module's output (per sample: the value gradients), and the model's call;
2. takes the base optimizer's step k_t = -P_t Q_u for every stage from the curvature
   (``identity`` = SGD(-momentum), ``rmsprop``, ``adam``, ``ekfac``), P_t = E[Q_uu]^-1 with the
   learning rate included; with ``feedback=False`` that is all, and DDPNOpt *is* that optimizer;
3. with feedback, starts from a terminal value Hessian that does not grow with the loss (the
   Gauss-Newton Hessian of the loss, :mod:`nn_adapter.terminal`), sweeps back the per-sample
   factors of the value Hessians (the one network sweep, :mod:`nn_adapter.local_model`, with the
   Q source :class:`nn_adapter.minibatch.CurvatureQ`; kernels: :mod:`nn_adapter.feedback`,
   :mod:`nn_adapter.feedback_columns`) and runs Algorithm 3's additional forward pass, the model's forward re-run on the closure's
   inputs (same dropout masks, batch-norm running statistics advanced once per step): just before
   stage t's module runs on xhat_t, dx_t = xhat_t - x_t and
   u_t <- u_t + k_t + (1/B) sum_i K_t^(i) dx_t^(i), with
   K_t^(i) dx^(i) = -(P_t / mu_i) q_u^(i) (q_x^(i) . dx^(i)) and mu_i >= 1 the per-sample
   regularisation that keeps the sample's local model convex.

Cost (factorised feedback): the closure, one extra forward pass, and per stage a weight-gradient-
sized product; q_x . dx uses the gradients backpropagation already computed at each stage input
(no Jacobian-vector product). ``s`` needs q_u^T P q_u per sample: free for Linear layers on
(B, n) inputs (rank one); for a convolution (after the first stage, with the default rank-one
terminal factor and no ``eps_vxx`` / ``second_order``) the closure's backward itself forms the
per-sample weight gradients, as one grouped weight-gradient kernel whose sum is the weight
gradient (:func:`nn_adapter.feedback.compact_conv`, so no second weight gradient), and the stage
is kept as them and its input gradient from then on: its input and output gradient are dropped
during the backward pass, and nothing is kept of the first stage but its input.

The closure's loss must be the batch mean of per-sample losses (torch's default reduction), and
the model must return the one tensor the loss is computed from (its Gauss-Newton curvature is taken
there; a tuple or dict output is refused, except with ``terminal_hessian="gradient"``).
Modules are recorded with hooks that exist only while the closure runs; the closure must call the
model once, and each parametrised module must run exactly once in it (weight sharing is refused
with an error naming the module). A parameter that gets no gradient (one its module's forward does
not use, or of a module whose output the loss does not use: an unused head, a branch under
``no_grad``) is held fixed in the feedback pass as in the base optimizer; the rest trains.
A parameter of a module that does not run, used by the forward of a parametrised module
around it (a ``MultiheadAttention``'s ``out_proj``), is part of that module's stage; one
that gets a gradient with no such module around it is refused (naming it).
A ``torch.compile``'d model is refused (pass the original
module).

Reference: G.-H. Liu, T. Chen, E. A. Theodorou, "DDPNOpt: Differential Dynamic Programming
Neural Optimizer", ICLR 2021 (Algorithm 3, Propositions 2 and 3).
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Optional, Union

import torch
from torch import nn

from occore.errors import InputError
from occore.solvers.ddp import DDP, ILQR
from occore.solvers.options import Regularization
from occore.validation import is_integer, is_real

from .curvature.optimizer import CurvatureOptimizer, loss_value
from .errors import UnsupportedModuleError, warn
from .feedback import compact_conv
from .minibatch import MinibatchProblem
from .module_stages import StageRecorder, _owners, fixed_parametrizations, module_stages
from .stages import uses_batch_statistics
from .terminal import DETECT, LOSSES, RANK_ONE, TERMINAL_HESSIANS, LossResolver, detect_loss

__all__ = ["DDPNOpt"]

FEEDBACK_MODES = (True, False, "factorised", "dense")


class DDPNOpt(CurvatureOptimizer):
    """Differential Dynamic Programming Neural Optimizer with layer-wise feedback policies.

    Args:
        params: the parameters to optimise: an iterable of tensors or of param-group dicts (each
            group with its own ``lr``, ``weight_decay`` and curvature hyperparameters, as in
            torch.optim), or the model itself (then it is also ``model``).
        lr: learning rate (part of P; in the param groups, so LR schedulers work).
        curvature: ``"identity"`` (SGD, with ``momentum``/``dampening``/``nesterov``),
            ``"rmsprop"`` (``alpha``, ``eps``, ``momentum``, ``centered``), ``"adam"`` (``betas``,
            ``eps``, ``amsgrad``) or ``"ekfac"`` (``damping``, ``stat_decay``,
            ``factor_update_freq``, ``eigen_update_freq``); all take ``weight_decay``.
        feedback: ``True`` / ``"factorised"`` (Proposition 3, the default), ``False`` (the base
            optimizer exactly) or ``"dense"`` (per-sample gains materialised, see
            :func:`nn_adapter.minibatch.dense_gain`; small networks only: beyond its size limit
            ``step`` raises :class:`~nn_adapter.errors.MemoryLimitError` before any change).
        eps_vxx: Tikhonov term added to the value Hessians V_xx (finite, >= 0), Algorithm 3
            line 12: it is occore's regularisation mu in its state form (V_xx' + mu I where it
            enters the gains, as in the dense Riccati sweep), the mu of this step's solver
            iteration. Q_uu is the curvature's, so it enters the feedback gains only: each stage
            gains eps h_u^T h_x dx (h: the stage's module, its output the next state); it is not
            carried back through the Schur complements (that would make V_xx dense, n_t x n_t
            per sample), in the dense mode neither.
        second_order: also expand the modules to second order (adds V_x . h_ux dx, the
            first-order change of the module's own gradient, g dx^T for a Linear layer; the
            curvature of the activations between modules is not included).
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
        loss: ``"auto"`` (softmax cross-entropy, with class labels, soft targets or label
            smoothing, is recognised from the recorded output and gradient; anything else is
            taken as mean squared error, with a warning),
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
        model: the module the closure calls (keyword). Needed with feedback (its forward is
            recorded and re-run) and by ``ekfac`` (its Linear/Conv2d layers); any module graph
            whose parametrised modules each run once per forward. A ``DistributedDataParallel``
            makes the step data-parallel (its ``.module`` is recorded and re-run; see
            :mod:`nn_adapter.distributed` for what is reduced and how many collectives a step
            makes).
        process_group: data-parallel over this ``torch.distributed`` group with a plain model
            (the optimizer then averages the gradients too).
        **hyperparameters: the curvature's hyperparameters, named as torch names them; all
            curvatures take ``weight_decay`` and ``decoupled_weight_decay`` (as AdamW).

    Each stage's gain is K^(i) = -(P / mu_i) Q_ux^(i) with mu_i = max(1, q_u^T P q_u) (rank one;
    lambda_max of the sample's Schur form with r columns): the smallest Levenberg-Marquardt factor
    that makes the sample's local model [[Q_xx, Q_xu], [Q_ux, mu P^-1]] convex, as mu makes Q_uu
    positive definite in classic DDP. V_x is the backpropagated gradient (not Eq. 5's
    Q_x - Q_ux^T Q_uu^-1 Q_u): the open-loop step k is then exactly the base optimizer's, so the
    feedback is the only difference from it (Proposition 2), and the feedback does not enter the
    base optimizer's moments or normaliser (it is a correction to this step, not a gradient).
    A step whose loss or gradient is not finite, or whose feedback would write a non-finite
    parameter, is refused: parameters, optimizer state and param groups stay as they were, one
    ``RuntimeWarning`` is issued, :attr:`refused_steps` counts it and ``step`` returns the
    closure's loss (see :meth:`CurvatureOptimizer.step`).

    Raises:
        InputError: (a ``ValueError``) an invalid or unknown option or hyperparameter, named in
            the message (in any group).
        TypeError: feedback (or ``ekfac``) without a model, or params / model of the wrong type.
        nn_adapter.errors.UnsupportedModuleError: a ``torch.compile``'d model (with feedback).

    At ``step``, with feedback: an ``InputError`` when the closure does not call the model
    exactly once, a parametrised module runs more than once (weight sharing, named), or the
    feedback pass's forward takes another path than the closure's.

    Example:
        >>> import torch
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = DDPNOpt(net.parameters(), lr=0.01, curvature="adam", model=net)
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

    def __init__(self, params, lr: float = 1e-3, curvature: str = "adam",
                 feedback: Union[bool, str] = True, eps_vxx: float = 0.0,
                 second_order: bool = False, vxx_update: bool = True,
                 terminal_hessian: str = "projected", loss: str = "auto", diagnostics: bool = False,
                 seed: int = 0, feedback_bound: float = 0.3, *, model: nn.Module = None,
                 process_group=None, **hyperparameters):
        if not any(feedback is m or (isinstance(m, str) and feedback == m)
                   for m in FEEDBACK_MODES):
            raise InputError(f"invalid feedback: {feedback!r} (expected True, False, "
                             "'factorised' or 'dense')")
        if not (is_real(eps_vxx) and math.isfinite(eps_vxx) and eps_vxx >= 0):
            raise InputError(f"invalid eps_vxx: {eps_vxx!r} (expected a finite number >= 0)")
        if not isinstance(second_order, bool):
            raise InputError(f"invalid second_order: {second_order!r} (expected a bool)")
        if not isinstance(vxx_update, bool):
            raise InputError(f"invalid vxx_update: {vxx_update!r} (expected a bool)")
        if terminal_hessian not in TERMINAL_HESSIANS:
            raise InputError(f"invalid terminal_hessian: {terminal_hessian!r} (expected one of "
                             f"{', '.join(TERMINAL_HESSIANS)})")
        if loss not in LOSSES:
            raise InputError(f"invalid loss: {loss!r} (expected one of {', '.join(LOSSES)})")
        if not isinstance(diagnostics, bool):
            raise InputError(f"invalid diagnostics: {diagnostics!r} (expected a bool)")
        if not (is_real(feedback_bound) and feedback_bound > 0):
            raise InputError(f"invalid feedback_bound: {feedback_bound!r} (expected a number > 0, "
                             "or math.inf for no bound)")
        if not is_integer(seed):
            raise InputError(f"invalid seed: {seed!r} (expected an int)")
        self.feedback = "factorised" if feedback is True else feedback   # (checks the groups)
        super().__init__(params, curvature, lr, model=model, process_group=process_group,
                         **hyperparameters)
        if feedback is not False and self._model is None:
            raise TypeError("model: DDPNOpt's feedback re-runs the model's forward, so it needs "
                            "the model: pass model=net together with params (for example "
                            "net.parameters() or param-group dicts), or the model itself as "
                            "params; feedback=False needs no model")
        self.terminal_hessian = terminal_hessian
        self.feedback_bound = float(feedback_bound)
        self.record_diagnostics = diagnostics
        self.diagnostics = None
        self._clamped: dict = {}
        self._loss = LossResolver(loss)
        self._agreed_loss = DETECT
        self._generator = torch.Generator().manual_seed(int(seed))
        self.eps_vxx = float(eps_vxx)
        self.second_order = second_order
        self.vxx_update = vxx_update
        self._stage_cache = None
        self._closure_result: dict = {}
        self.last_iteration = None
        # one iteration of occore's loop per step: a full step, no cost check; its mu (state form)
        # is eps_vxx
        solver = DDP if second_order else ILQR
        self._solver = solver(max_iter=1, stochastic=True,
                              regularization=Regularization(initial=0.0, minimum=0.0))

    def _check_group_params(self, params, index: int) -> None:
        """With feedback, the parameters must be the model's (``InputError`` otherwise: the
        feedback pass updates them while the model's forward runs their modules), and real
        (:meth:`CurvatureOptimizer._check_group_params`)."""
        super()._check_group_params(params, index)
        if not self.feedback or self._model is None:    # (no model: refused after the groups)
            return
        owned = {id(p) for p in self._model.parameters()}
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and id(p) not in owned:
                raise InputError(
                    f"params: parameter {i} of param group {index} (shape {tuple(p.shape)}) is "
                    f"not a parameter of model ({type(self._model).__name__}); DDPNOpt's "
                    "feedback updates each parameter as the model's forward reaches its module: "
                    "register it in the model, or use feedback=False")

    # -- recording --------------------------------------------------------------------------------
    def _make_recorder(self):
        if not self.feedback:
            return super()._make_recorder()
        params = {id(p) for b in self._blocks for p in b.params}
        owners = [m for _, m in _owners(self._model, params)]
        linear = {id(b.module) for b in self._blocks if b.kind == "linear"}
        # q_x = h_x^T g of the per-sample h: the backpropagated input gradient of a batch norm
        # on its batch's statistics also runs through them, which h holds fixed
        # (Stage.freeze_statistics); its q_x . dx is then a Jacobian-vector product of h
        per_sample = [m for m in owners if id(m) not in linear and not uses_batch_statistics(m)]
        return StageRecorder(self._model, owners, per_sample,
                             compact=self._compact_builders(owners),
                             first_grad=self.curvature.needs_records).name_modules(self._model)

    def _compact_builders(self, owners) -> dict:
        """``{module: forward}`` for the Conv2d stages kept as per-sample gradients from the
        backward pass on (:func:`~nn_adapter.feedback.compact_conv`): with the factorised
        feedback of a rank-one terminal factor, no Tikhonov or second-order term and a curvature
        that does not read the records (they are dropped)."""
        if (self.feedback != "factorised" or self.eps_vxx != 0 or self.second_order
                or self.terminal_hessian not in RANK_ONE or self.curvature.needs_records):
            return {}
        out = {}
        for m in owners:
            own = {id(p) for p in m.parameters(recurse=False)}
            mine = [b for b in self._blocks if all(id(p) in own for p in b.params)]
            if len(mine) == 1 and mine[0].kind == "conv2d":
                out[m] = functools.partial(compact_conv, mine[0])
        return out

    def _check_records(self, rec) -> None:
        if not self.feedback:
            return super()._check_records(rec)
        rec.check_model_call()
        rec.check_late()
        rec.check_complete(rec.order, need_grads=False)
        rec.check_complete(self._modules_with_grads(super()._recorded_modules()))
        if self.terminal_hessian != "gradient" and rec.model_output_kind is not None:
            raise UnsupportedModuleError(
                f"model: returns a {rec.model_output_kind}, not one tensor; the terminal "
                f"curvature (terminal_hessian={self.terminal_hessian!r}) is the loss's "
                "Gauss-Newton Hessian at the model's output, so the model must return the one "
                "tensor the loss is computed from (wrap it in a module that does), or pass "
                "terminal_hessian='gradient' or feedback=False")
        if self.terminal_hessian != "gradient" and (rec.model_output is None
                                                    or rec.model_grad is None):
            raise InputError("closure: the model's output got no gradient; the closure must call "
                             "loss.backward() on a loss of the model's output (a tensor)")

    def _agreement_size(self) -> int:
        return 2 if self.feedback else 0

    def _agreement(self, rec) -> list:
        """Data-parallel: whether this rank's shard shows a mean cross-entropy / a loss summed
        over the batch (the loss recognition must agree, :meth:`_agreed`)."""
        if not self.feedback:
            return []
        found = None
        if not self._loss.settled and rec.model_output is not None and rec.model_grad is not None:
            found = detect_loss(rec.model_output, rec.model_grad, self._closure_value())
        return [float(found == "cross_entropy"), float(found == "sum")]

    def _agreed(self, sums: list) -> None:
        if self.feedback:
            world = self.collectives.world_size
            self._agreed_loss = ("sum" if sums[1] else
                                 "cross_entropy" if sums[0] == world else None)

    def _closure_value(self) -> Optional[float]:
        """The loss the closure of this step returned, as a float (None: not a number)."""
        try:
            return loss_value(self._closure_result.get("loss"))
        except (TypeError, ValueError, RuntimeError):
            return None

    def _stages(self, rec) -> list:
        """The stages of this step's forward (cached while the execution order stays the same)."""
        key = (tuple(id(m) for m in rec.order), tuple(id(b) for b in self._blocks))
        if self._stage_cache is None or self._stage_cache[0] != key:
            stages = module_stages(self._model, self._blocks, rec.order)
            staged = {id(b) for s in stages for b in s.blocks}
            self._stage_cache = (key, stages, [b for b in self._blocks if id(b) not in staged])
        stages, unstaged = self._stage_cache[1:]
        for b in unstaged:
            if any(p.grad is not None and bool(p.grad.any()) for p in b.params):
                self._refuse_unstaged(b)
        rec.check_stages(stages)
        rec.check_complete(self._modules_with_grads([s.module for s in stages[1:]]))
        for s in stages:
            s.freeze_statistics(rec.inputs.get(s.module))
        return stages

    def _refuse_unstaged(self, block) -> None:
        """``UnsupportedModuleError`` for a parameter that got a gradient although its module did
        not run (and no module around it that ran owns parameters): no stage updates it."""
        names = {id(p): n for n, p in self._model.named_parameters()}
        pname = names.get(id(block.params[0]), "?")
        owner = next((m for m in self._model.modules()
                      if any(p is block.params[0] for p in m.parameters(recurse=False))), None)
        mname = pname.rpartition(".")[0]
        raise UnsupportedModuleError(
            f"model: parameter {pname!r} got a gradient, but its module {mname!r} "
            f"({type(owner).__name__}) did not run in the forward (another module's forward uses "
            "the parameter directly); DDPNOpt's feedback updates each parameter as its module "
            "runs, so this one would never be updated: call the module itself in the forward "
            "(or use the parameter inside a module that owns parameters and runs), or use "
            "feedback=False")

    # -- the step --------------------------------------------------------------------------------
    def step(self, closure=None):
        """One DDPNOpt step (see the class docstring); with feedback ``closure`` is required (it
        clears the gradients, calls the model once, computes the loss, calls ``backward`` and
        returns the loss). Returns the loss the closure returned."""
        if not self.feedback:
            return super().step(closure)
        if closure is None or not callable(closure):
            raise InputError("closure: DDPNOpt with feedback needs a closure that runs zero_grad, "
                             "the model, the loss and loss.backward() and returns the loss")
        box = {}

        def recorded():
            box["loss"] = closure()
            return box["loss"]
        self._closure_result = box
        return super().step(recorded)

    def _update(self, rec) -> None:
        if not self.feedback:
            return super()._update(rec)
        saved = self._snapshot()
        self.diagnostics = [] if self.record_diagnostics else None
        self._clamped = {}
        cost = float(loss_value(self._closure_result.pop("loss")))
        try:
            with fixed_parametrizations(self._model):
                problem = MinibatchProblem(self, rec, self._stages(rec), cost)
                state = self._solver.init(problem, traj=problem.trajectory(), mu=self.eps_vxx)
                state, self.last_iteration = self._solver.step(problem, state)
        except BaseException:
            self._restore(saved)         # an error mid-step (a bad closure) changes nothing
            raise
        params = [p for b in self._blocks for p in b.params]
        if not math.isfinite(float(torch.stack(torch._foreach_norm(params)).sum())):
            self._restore(saved)
            self.refused_steps += 1
            warn("DDPNOpt: the feedback pass gave a non-finite parameter; step refused, "
                 "parameters and optimizer state unchanged")

    # -- state ------------------------------------------------------------------------------------
    def configuration(self) -> dict:
        """The curvature and the feedback options (see :meth:`CurvatureOptimizer.configuration`)."""
        return dict(super().configuration(), feedback=self.feedback, eps_vxx=self.eps_vxx,
                    second_order=self.second_order, vxx_update=self.vxx_update,
                    terminal_hessian=self.terminal_hessian, feedback_bound=self.feedback_bound)

    @property
    def generator(self) -> torch.Generator:
        """The generator of ``terminal_hessian="sampled"`` (seeded by ``seed``; the same state on
        every rank). Not in :meth:`state_dict` (an optimizer loading another's state keeps its own
        seed); :func:`nn_adapter.checkpoint.save_checkpoint` saves it with the RNG states."""
        return self._generator

    def _snapshot(self):
        """Copies of the parameters and of the optimizer state's tensors (restored if the step is
        refused). Called under ``torch.no_grad``."""
        params = [p for b in self._blocks for p in b.params]
        tensors = list(params)
        layout = []                       # per parameter: None (no state) or {key: index | value}
        state = self.state
        for p in params:
            own = state.get(p)          # (one lookup: a tensor's hash is a Python call)
            if own is None:
                layout.append(None)
                continue
            entry = {}
            for k, v in own.items():
                if isinstance(v, torch.Tensor):
                    entry[k] = len(tensors)
                    tensors.append(v)
                else:             # numbers (the step count) are immutable: no copy needed
                    entry[k] = ("value", v if isinstance(v, (int, float, bool, type(None)))
                                else copy.deepcopy(v))
            layout.append(entry)
        return params, layout, [t.clone() for t in tensors]

    def _restore(self, saved) -> None:
        params, layout, copies = saved
        torch._foreach_copy_(params, copies[:len(params)])
        for p, entry in zip(params, layout):
            if entry is None:
                self.state.pop(p, None)
            else:             # the copies are this snapshot's own: they become the state
                self.state[p] = {k: copies[v] if isinstance(v, int) else v[1]
                                 for k, v in entry.items()}
