"""A ``torch.optim.Optimizer`` that takes each block's step from a curvature (the k of DDPNOpt).

Shared by :class:`nn_adapter.EKFAC` and :class:`nn_adapter.DDPNOpt`: it builds the parameter
blocks of every param group, validates each group's hyperparameters, runs the user's closure with
the curvature's hooks (or, without a closure, uses the gradients and the layer records of the
user's own forward and backward pass), refuses non-finite steps and applies ``u <- u + k`` with
each block's own group. DDPNOpt extends :meth:`CurvatureOptimizer._update` with the feedback pass.

Blocks and groups. With a ``model``, a ``Linear`` or ``Conv2d`` layer whose weight (and bias, if
optimised) are in one param group is one structured block; every other parameter (not in such a
layer, or without a model) is a diagonal block of its own. A layer whose weight and bias are in
different groups is split into two diagonal blocks by the diagonal curvatures (identity, rmsprop,
adam: the arithmetic is the same per parameter) and refused by ``ekfac`` (its Kronecker factors
cover weight and bias together), with an error naming the layer. Only the parameters that
require a gradient join a layer's block: a frozen one (``requires_grad=False``, given to the
optimizer or frozen later) is skipped by every step, its state kept, as torch.optim skips it; the
blocks follow freezing and unfreezing (checked by ``zero_grad`` and ``step``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from occore.errors import InputError

from ..errors import warn
from . import CURVATURES, make_curvature
from .base import Block, _structured_kind, find_blocks
from .records import LiveRecorder, Recorder

__all__ = ["CurvatureOptimizer"]

_CLOSURE_HELP = ("a closure that runs zero_grad, the forward pass, the loss and loss.backward() "
                 "and returns the loss")


def _structured_layers(model: nn.Module) -> dict:
    """``{id(param): (name, module, kind)}`` for the weight and bias of every Linear/Conv2d of
    ``model`` that can be a structured block (trainable or not: a frozen layer may be added to
    the optimizer later). A parameter already owned by an earlier module keeps its first owner."""
    layers, seen = {}, set()
    for name, module in model.named_modules():
        kind = _structured_kind(module)
        if kind is not None:
            params = [module.weight] + ([module.bias] if module.bias is not None else [])
            if all(id(p) not in seen for p in params):
                for p in params:
                    layers[id(p)] = (name, module, kind)
        seen.update(id(p) for p in module.parameters(recurse=False))
    return layers


def _check_loss(loss) -> None:
    """The closure's return value must be the loss: a one-element tensor or a real number."""
    if loss is None:
        raise InputError("closure: returned None; it must return the loss")
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or loss.is_complex():
            raise InputError(f"closure: returned a tensor of shape {tuple(loss.shape)} "
                             f"({loss.dtype}); it must return the loss, a one-element real tensor")
    elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise InputError(f"closure: returned {type(loss).__name__}; it must return the loss (a "
                         "tensor or a number)")


def loss_value(loss) -> Optional[float]:
    """A closure's loss as a float (None stays None); a tensor is detached first (``float()`` of
    one that requires grad warns in torch >= 2.9)."""
    if loss is None:
        return None
    return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base optimizer: ``u <- u + k`` with k the curvature's step, block by block, group by group.

    Args:
        params: an iterable of tensors or of param-group dicts (as every torch optimizer takes),
            or an ``nn.Module``: then it is also the ``model`` and its trainable parameters are
            optimised (one group).
        curvature: a name of ``nn_adapter.curvature.CURVATURES``.
        lr: learning rate (in the param groups, so LR schedulers work).
        model: the module whose ``Linear``/``Conv2d`` layers give structured blocks (see the module
            docstring). Optional for the diagonal curvatures (without it every parameter is a
            diagonal block, which changes nothing for them); needed by ``ekfac``. Parameters that
            are not in the model get diagonal blocks. A ``DistributedDataParallel`` model makes
            the optimizer data-parallel (:mod:`nn_adapter.distributed`): its ``.module`` is
            recorded and what the step needs across ranks is reduced over its process group.
        process_group: data-parallel over this ``torch.distributed`` group with a plain model:
            the optimizer then averages the gradients too (one collective with the loss).
        **hyperparameters: the curvature's hyperparameters, as torch names them (defaults of
            every group; a group dict may override any of them). All curvatures take
            ``weight_decay`` and ``decoupled_weight_decay`` (True: ``p <- p (1 - lr wd)`` before
            the step and no decay in the gradient, as ``torch.optim.AdamW``).

    Each group's hyperparameters are validated when the group is added (at construction, by
    :meth:`add_param_group` and by :meth:`load_state_dict`). ``step`` takes an optional closure:
    without one it uses the gradients left by the user's own backward pass and, for ``ekfac``,
    the layer inputs and output gradients of that forward and backward pass (recorded by a
    :class:`~nn_adapter.curvature.records.LiveRecorder` that lives as long as the optimizer).
    ``state_dict`` stores the curvature's name; loading one saved with another curvature is
    refused.

    For subclasses (DDPNOpt): the blocks are ``self._blocks``, :meth:`_group_of` gives a block's
    param group, and :meth:`_update_curvature`, :meth:`_factors_of`, :meth:`_apply` use it.

    Raises:
        TypeError: ``params`` or ``model`` of the wrong type, or ``ekfac`` without a model.
        ValueError: an unknown or invalid hyperparameter (named in the message; in any group),
            no parameters, or (``ekfac``) a layer split over two groups.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> opt = CurvatureOptimizer(net, "identity", lr=0.1)
        >>> def closure():
        ...     opt.zero_grad(); loss = net(torch.ones(3, 2)).pow(2).mean(); loss.backward()
        ...     return loss
        >>> float(opt.step(closure).detach()) >= 0.0
        True
        >>> opt = CurvatureOptimizer([{"params": [net.weight]}, {"params": [net.bias], "lr": 0.0}],
        ...                          "adam", lr=0.1, model=net)
        >>> bias = net.bias.detach().clone()
        >>> opt.zero_grad(); net(torch.ones(3, 2)).pow(2).mean().backward(); opt.step()
        >>> torch.equal(net.bias.detach(), bias)     # its group has lr 0
        True
    """

    def __init__(self, params, curvature: str, lr: float, *, model: Optional[nn.Module] = None,
                 process_group=None, **hyperparameters):
        from ..distributed import data_parallel

        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise TypeError("model: params is already a module (the model); pass either the "
                                "model alone or params=model.parameters() with model=model")
            model, collectives = data_parallel(params, process_group)
            blocks = find_blocks(model)
            if not blocks:
                raise InputError("model: has no trainable parameters")
            params = [p for b in blocks for p in b.params]
        elif model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module or None, got "
                            f"{type(model).__name__}")
        else:
            model, collectives = data_parallel(model, process_group)
        if isinstance(params, torch.Tensor) or isinstance(params, (str, bytes, dict)) \
                or not hasattr(params, "__iter__"):
            raise TypeError(f"params: expected an iterable of tensors or of param-group dicts, or "
                            f"the model (an nn.Module), got {type(params).__name__}")
        params = list(params)
        if not params:
            raise InputError("params: is empty; there is nothing to optimise")
        curv = make_curvature(curvature)
        unknown = sorted(set(hyperparameters) - set(curv.defaults))
        if unknown:
            raise InputError(f"invalid hyperparameter(s) {unknown} for curvature {curvature!r} "
                             f"(known: {sorted(curv.defaults)})")
        if curv.needs_records and model is None:
            raise TypeError(
                f"model: the {curvature!r} curvature preconditions the Linear/Conv2d layers from "
                "their recorded inputs and output gradients, so it needs the model: pass "
                "model=net together with params (for example net.parameters() or param-group "
                "dicts), or the model itself as params")
        defaults = dict(curv.defaults, lr=lr, **hyperparameters)
        curv.validate(defaults)
        self.curvature = curv
        self._model = model
        self.collectives = collectives
        self._layers = _structured_layers(model) if model is not None else {}
        self._blocks: list[Block] = []
        self._block_group: dict[Block, int] = {}
        self._rec = None
        self._live: Optional[LiveRecorder] = None
        self._ready = False
        self.refused_steps = 0      # steps refused for a non-finite loss, gradient or update
        super().__init__(params, defaults)
        self._ready = True
        self._refresh_recording()

    # -- param groups and blocks -------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (as ``torch.optim.Optimizer.add_param_group``) and its blocks.

        Missing hyperparameters take the constructor's values; the group's values are validated
        (a ``ValueError`` naming the hyperparameter and the group). Parameters of a Linear/Conv2d
        layer of the model get a structured block. ``param_group`` itself is not modified.

        Raises:
            TypeError: ``param_group`` is not a dict of parameters.
            ValueError: an invalid hyperparameter, a parameter already in a group, or (``ekfac``)
                a layer whose weight and bias would be in different groups.
        """
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"param_group: expected a dict with a 'params' entry, got "
                            f"{type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):        # (torch refuses sets)
            if not isinstance(params, nn.Module) and not hasattr(params, "__iter__"):
                raise TypeError(f"params: expected a tensor or an iterable of tensors, got "
                                f"{type(params).__name__}")
            params = [params] if isinstance(params, nn.Module) else list(params)
            for p in params:
                if isinstance(p, nn.Module):
                    raise TypeError(
                        f"params: got a module ({type(p).__name__}) where tensors were expected; "
                        "pass model.parameters() (with model=model for structured blocks) or "
                        "the model itself")
        group["params"] = params
        index = len(self.param_groups)
        self._validate_group(group, f"param group {index}")
        self._check_group_params(group["params"], index)
        super().add_param_group(group)
        try:
            blocks, block_group = self._make_blocks([g["params"] for g in self.param_groups])
        except Exception:
            self.param_groups.pop()
            raise
        self._blocks, self._block_group = blocks, block_group
        self._trainable = self._trainable_now()
        if self._ready:
            self._refresh_recording()

    def _trainable_now(self) -> tuple:
        return tuple(p.requires_grad for g in self.param_groups for p in g["params"])

    def _sync_blocks(self) -> None:
        """Rebuild the blocks when a parameter was frozen or unfrozen (``requires_grad``) since
        they were built (checked by :meth:`zero_grad` and at every step). A structured block
        that changes restarts its curvature state where that state covers the whole layer
        (``ekfac``: its Kronecker factors); the diagonal curvatures keep each parameter's."""
        now = self._trainable_now()
        if now == self._trainable:
            return
        blocks, block_group = self._make_blocks([g["params"] for g in self.param_groups])
        if self.curvature.needs_records:
            kept = {id(b) for b in self._blocks}
            for b in blocks:
                if id(b) not in kept:
                    for p in b.params:
                        self.state.pop(p, None)
        self._blocks, self._block_group, self._trainable = blocks, block_group, now
        self._refresh_recording()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; also takes note of parameters frozen or unfrozen
        since the last step (their blocks, :meth:`_make_blocks`)."""
        super().zero_grad(set_to_none)
        if self._ready:
            self._sync_blocks()

    def _check_group_params(self, params, index: int) -> None:
        """Refuse (``InputError``) complex parameters of a new group (``params``: a list or set)
        before it is added: the curvatures' moments and factors, and the feedback, are those of
        real parameters (torch.optim's Adam and RMSprop take a complex one as its real and
        imaginary parts, which these do not). Subclasses add their own checks."""
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise InputError(
                    f"params: parameter {i} of param group {index} (shape {tuple(p.shape)}) is "
                    f"complex ({p.dtype}); {type(self).__name__} optimises real parameters only: "
                    "hold it as real and imaginary parts (for example a real parameter of shape "
                    "(..., 2) read through torch.view_as_complex), or use a torch.optim "
                    "optimizer for it")

    def _validate_group(self, group: dict, where: str) -> None:
        """Raise ``InputError`` naming ``where`` and the hyperparameter unless the group (its
        missing values taken from the defaults) is valid for the curvature."""
        own = set(self.curvature.defaults) | {"lr"}
        others = {k for c in CURVATURES.values() for k in c.defaults} - own
        wrong = sorted(k for k in group if k in others)
        if wrong:
            raise InputError(f"{where}: invalid hyperparameter(s) {wrong} for curvature "
                             f"{self.curvature.name!r} (known: {sorted(own)})")
        merged = dict(self.defaults)
        merged.update((k, v) for k, v in group.items() if k != "params")
        try:
            self.curvature.validate(merged)
        except ValueError as err:
            raise InputError(f"{where}: {err}") from None

    def _make_blocks(self, groups: list) -> tuple[list, dict]:
        """Blocks of the parameters of ``groups`` (lists of tensors) and each block's group index.

        A structured block holds the layer's parameters that require a gradient (a frozen one is
        a diagonal block of its own, which steps skip while it has no gradient, as torch.optim
        does; a frozen weight leaves its bias a diagonal block). Blocks that are unchanged keep
        their identity (subclasses may hold them)."""
        where: dict[int, int] = {}
        for i, ps in enumerate(groups):
            for p in ps:
                where.setdefault(id(p), i)
        old = {(b.kind, tuple(id(p) for p in b.params)): b for b in self._blocks}
        blocks, block_group, done = [], {}, set()
        for i, ps in enumerate(groups):
            for p in ps:
                if id(p) in done:
                    continue
                kind, members, module = "diagonal", (p,), None
                layer = self._layers.get(id(p))
                if layer is not None and p.requires_grad and layer[1].weight.requires_grad \
                        and id(layer[1].weight) in where:
                    name, mod, structured = layer
                    own = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
                    inside = [q for q in own if id(q) in where and q.requires_grad]
                    if len({where[id(q)] for q in inside}) == 1:
                        kind, members, module = structured, tuple(inside), mod
                    elif self.curvature.needs_records:
                        raise InputError(
                            f"params: the weight and bias of layer {name or '<model>'!r} "
                            f"({type(mod).__name__}) are in different param groups; the "
                            f"{self.curvature.name!r} curvature preconditions them as one block, "
                            "so put both in the same group (or leave the bias out)")
                key = (kind, tuple(id(q) for q in members))
                block = old.get(key) or Block(kind, members, module)
                blocks.append(block)
                block_group[block] = where[id(members[0])]
                done.update(id(q) for q in members)
        return blocks, block_group

    def _group_of(self, block: Block) -> dict:
        """The param group of ``block``: its ``lr``, ``weight_decay`` and curvature
        hyperparameters (the live dict in ``self.param_groups``, so schedulers' changes show).

        Every block lies in one group (a layer split over groups is two diagonal blocks)."""
        return self.param_groups[self._block_group[block]]

    def _by_group(self, blocks: list) -> list:
        """``[(group, blocks of that group)]`` in the order the groups first appear."""
        parts: dict[int, list] = {}
        for b in blocks:
            parts.setdefault(self._block_group[b], []).append(b)
        return [(self.param_groups[i], bs) for i, bs in parts.items()]

    # -- recording -------------------------------------------------------------------------------
    def _recorder(self) -> Recorder:
        """The recorder of the closure path (built once by :meth:`_make_recorder`)."""
        if getattr(self, "_rec", None) is None:
            self._rec = self._make_recorder()
        return self._rec

    def _make_recorder(self) -> Recorder:
        mods = self._recorded_modules()
        return Recorder(mods, mods).name_modules(self._model)

    def _recorded_modules(self) -> list[nn.Module]:
        return [b.module for b in self._blocks if b.structured] if self.curvature.needs_records \
            else []

    def _refresh_recording(self) -> None:
        """(Re)build the recorders after the blocks changed: the closure recorder lazily, the
        live recorder of closure-less steps now (only when the curvature needs records)."""
        self._rec = None
        mods = CurvatureOptimizer._recorded_modules(self)
        live = self._live
        if live is not None and [id(m) for m in live._modules] == [id(m) for m in mods]:
            return
        self._live = (LiveRecorder(mods, mods).name_modules(self._model).attach() if mods
                      else None)
        if live is not None:
            if self._live is not None:     # what the old one recorded since the last step
                for m in self._live._modules:
                    for new, old in ((self._live.calls, live.calls),
                                     (self._live.inputs, live.inputs),
                                     (self._live.out_grads, live.out_grads)):
                        if m in old:
                            new[m] = old[m]
            live.detach()

    def _closure_free_reason(self) -> Optional[str]:
        """None when :meth:`step` can run without a closure, else the reason it cannot.

        Without a closure the step has the gradients of the user's backward pass and what the
        live recorder kept (the curvature's layer inputs and output gradients); that suffices
        when the closure recorder (:meth:`_make_recorder`) asks for nothing more. Subclasses may
        override this."""
        kept = self._live.wants if self._live is not None else Recorder().wants
        if getattr(self._recorder(), "wants", None) != kept:
            return (f"{type(self).__name__}.step records more of the forward pass than its "
                    f"layer inputs and output gradients here, so it needs {_CLOSURE_HELP}")
        return None

    # -- torch.amp.GradScaler --------------------------------------------------------------------
    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True where the curvature reads the records (``ekfac``): ``torch.amp.GradScaler.step``
        then hands :meth:`step` its scale (``self.grad_scale``, ``self.found_inf``) instead of
        unscaling the gradients itself, so that the recorded output gradients, scaled like the
        gradients by the scaled loss's backward, are unscaled with them (:meth:`_amp_unscale`).
        The diagonal curvatures read only ``.grad``, which GradScaler unscales as for any torch
        optimizer."""
        return self.curvature.needs_records

    def _amp_unscale(self, closure) -> bool:
        """Within ``GradScaler.step`` (``found_inf`` set by it): False when it found a non-finite
        gradient (the step is skipped, as GradScaler skips it for any optimizer); otherwise the
        gradients and the live records' output gradients are divided by the scale, and True.
        Outside GradScaler: True, nothing done.

        Raises:
            InputError: a closure (GradScaler takes none), or ``scaler.unscale_(optimizer)``
                called before ``scaler.step`` (the gradients are then unscaled but the scale
                of the records is not known to the optimizer).
        """
        found = self.__dict__.get("found_inf")
        if found is None:
            return True
        if closure is not None:
            del self.grad_scale, self.found_inf
            raise InputError("closure: torch.amp.GradScaler.step takes no closure (as for torch's "
                             "optimizers); run the scaled backward yourself, then scaler.step(opt)")
        scale = self.__dict__.get("grad_scale")
        skipped = scale is None or float(found.sum()) > 0
        if skipped and self._live is not None:     # (this pass's records go with the step)
            self._live.release()
        if scale is None:
            # GradScaler removes the two attributes after a step that returns; not after a raise
            del self.grad_scale, self.found_inf
            raise InputError(
                f"{type(self).__name__} ({self.curvature.name!r} curvature) with "
                "torch.amp.GradScaler: scaler.unscale_(optimizer) was called before "
                "scaler.step(optimizer); it unscales the gradients but not the layer records "
                "the curvature reads (their scale is then unknown here). Call scaler.step "
                "without unscale_ (to clip, clip the scaled gradients by the scaled norm, "
                "max_norm * scaler.get_scale())")
        if skipped:
            return False
        inv = scale.double().reciprocal().float()
        grads = [p.grad for p in self._params_with_grad()]
        if grads:
            torch._foreach_mul_(grads, inv)
        if self._live is not None:
            out = self._live.out_grads
            for m in list(out):
                out[m] = out[m] * inv.to(out[m].dtype)
        return True

    # -- the step ----------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One step, with every block's own param group.

        ``closure`` (optional, as for ``torch.optim.LBFGS``) clears the gradients, computes the
        loss, calls ``backward`` and returns the loss. Without it the step uses the ``.grad``
        of the user's own backward pass and, where the curvature needs them (``ekfac``), the
        layer inputs and output gradients of the forward pass that backward went through (each
        layer exactly once since the last step: evaluate under ``torch.no_grad()`` or without a
        backward in between). Parameters without a gradient are left alone.

        A step whose loss (the closure's return value) or any gradient is NaN or inf is refused:
        no parameter, no optimizer state and no param group changes, one ``RuntimeWarning`` is
        issued (through :func:`nn_adapter.errors.warn`) and the non-finite loss is returned, so
        a training loop can see it (``math.isfinite(loss)``) and decide (skip the batch, lower
        the learning rate, stop). The refused steps are counted in :attr:`refused_steps`.

        Returns:
            the loss the closure returned (None without a closure).

        Raises:
            InputError: a sparse gradient (before anything changes; torch.optim.Adam refuses it
                too), or a closure or records the step cannot use.
        """
        self._sync_blocks()
        if not self._amp_unscale(closure):
            return None
        if closure is None:
            return self._step_recorded()
        if not callable(closure):
            raise InputError(f"closure: expected None or {_CLOSURE_HELP}, got "
                             f"{type(closure).__name__}")
        rec = self._recorder()
        live = self._live
        try:
            if live is not None:
                live.paused = True
            with rec, torch.enable_grad():
                loss = closure()
            _check_loss(loss)
            if not self._agree(loss, self._records_error(rec), rec):
                return loss
            with torch.no_grad():
                self._update(rec)
        finally:
            rec.release()
            if live is not None:
                live.paused = False
                live.release()
        return loss

    def _step_recorded(self) -> None:
        """``step()`` without a closure: the user's gradients and the live recorder's records."""
        reason = self._closure_free_reason()
        if reason is not None:
            raise InputError(f"closure: {reason}")
        rec = self._live if self._live is not None else Recorder()
        try:
            if next(self._params_with_grad(), None) is None:
                return None
            if not self._agree(None, self._records_error(rec), rec):
                return None
            with torch.no_grad():
                self._update(rec)
        finally:
            rec.release()
        return None

    def _check_records(self, rec: Recorder) -> None:
        rec.check_complete(self._modules_with_grads(self._recorded_modules()))

    def _modules_with_grads(self, modules: list) -> list:
        """Those of ``modules`` whose (trainable) parameters got a gradient: one whose output
        does not reach the loss (an unused head, a branch under ``no_grad`` or detached) gets
        none and is left alone, as in torch.optim. All of them when none got one (a closure
        that does not call ``backward`` is an error)."""
        params = {id(m): [p for p in m.parameters(recurse=False) if p.requires_grad]
                  for m in modules}
        out = [m for m in modules if any(p.grad is not None for p in params[id(m)])]
        return out if out else list(modules)

    def _records_error(self, rec: Recorder) -> Optional[InputError]:
        """The error :meth:`_check_records` raises for these records, or None."""
        try:
            self._check_records(rec)
        except InputError as err:
            return err
        return None

    def _agree(self, loss, error: Optional[InputError], rec: Recorder) -> bool:
        """Whether to take the step, decided alike on every rank.

        False (a refused step, warned) when the loss (None: not known) or a gradient is not
        finite; ``error`` (the records' problem on this rank) is raised otherwise. Data-parallel,
        one collective (:class:`~nn_adapter.distributed.Collectives`) carries the loss, whether
        each rank's records are complete and :meth:`_agreement`'s numbers (and, with
        ``process_group=``, the gradients, which it averages): a non-finite loss or gradient on
        any rank refuses the step on all, records incomplete on any rank raise on all."""
        self._check_dense_grads()
        value = loss_value(loss)
        col = self.collectives
        if col is None:
            if value is not None and not math.isfinite(value):
                return self._refuse("loss", value)
            if not self._finite_grads(value):
                return False
            if error is not None:
                raise error
            return True
        grads = [p.grad for p in self._params_with_grad()] if col.average_gradients else []
        own = self._agreement(rec) if error is None else None
        sums = col.average_(grads, [0.0 if value is None else value, float(error is not None)]
                            + (own if own is not None else self._agreement_size() * [0.0]))
        total, failed = sums[0] / col.world_size, sums[1]
        if value is not None and not math.isfinite(total):
            return self._refuse("the loss of some rank", total)
        if not self._finite_grads(None if value is None else total):
            return False
        if error is not None:
            raise error
        if failed:
            raise InputError(f"model: the step was refused on {int(failed)} of "
                             f"{col.world_size} ranks (their records of the forward and backward "
                             "pass are incomplete; see their error)")
        self._agreed(sums[2:])
        return True

    def _agreement(self, rec: Recorder) -> list:
        """Numbers this rank adds to the agreement collective (summed over ranks, handed to
        :meth:`_agreed`); always :meth:`_agreement_size` of them. None here."""
        return []

    def _agreement_size(self) -> int:
        return 0

    def _agreed(self, sums: list) -> None:
        """Receives the sums of :meth:`_agreement` over the ranks."""

    def _reduce(self):
        """The in-place cross-rank average a curvature applies to its batch statistics, or None
        on one process."""
        return self.collectives.average_ if self.collectives is not None else None

    def _check_dense_grads(self) -> None:
        """``InputError`` (before anything changes) for a sparse gradient (an
        ``nn.Embedding(sparse=True)``), which the curvatures do not take, as ``torch.optim.Adam``
        refuses it."""
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise InputError(
                        f"params: parameter {j} of param group {i} (shape {tuple(p.shape)}) has a "
                        f"sparse gradient ({p.grad.layout}); {type(self).__name__} takes dense "
                        "gradients only: use sparse=False in its module (nn.Embedding), or step "
                        "that parameter with torch.optim.SparseAdam in an optimizer of its own")

    def _finite_grads(self, loss=None) -> bool:
        grads = [p.grad for p in self._params_with_grad()]
        if grads and not math.isfinite(float(torch.stack(torch._foreach_norm(grads)).sum())):
            return self._refuse("a gradient", loss)
        return True

    def _refuse(self, what: str, loss) -> bool:
        shown = f" (loss {loss})" if loss is not None else ""
        self.refused_steps += 1
        warn(f"{type(self).__name__}: {what} is not finite{shown}; step refused, parameters and "
             "optimizer state unchanged")
        return False

    def _params_with_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    def _grads_states(self, block: Block):
        """``(grads, states)`` of a block: one gradient (zeros where missing) and one optimizer
        state dict per parameter; its hyperparameters are :meth:`_group_of` the block."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block.params]
        return grads, [self.state[p] for p in block.params]

    def _decoupled_decay(self, group: dict, blocks: list) -> None:
        """``p <- p (1 - lr weight_decay)`` for the parameters with a gradient of ``blocks`` when
        the group's decay is decoupled (AdamW); the curvature then adds no decay itself."""
        wd = group["weight_decay"]
        if not group.get("decoupled_weight_decay", False) or wd == 0:
            return
        params = [p for b in blocks for p in b.params if p.grad is not None]
        if params:
            torch._foreach_mul_(params, 1 - group["lr"] * wd)

    def _update_curvature(self, rec: Recorder, factors: bool = True):
        """Update the curvature of every block that has gradients, each with its own group
        (batched per group), after the group's decoupled weight decay.

        Returns:
            ``{block: factors P}`` for those blocks (in block order), or (``factors=False``) the
            set of them.
        """
        blocks = [b for b in self._blocks if b.weight.grad is not None]
        out = {}
        for group, part in self._by_group(blocks):
            pairs = [self._grads_states(b) for b in part]
            grads, states = [g for g, _ in pairs], [s for _, s in pairs]
            self._decoupled_decay(group, part)
            self.curvature.update_all(part, grads, group, states, rec, self._reduce())
            if factors:
                out.update(zip(part, self.curvature.factors_all(part, group, states)))
        if not factors:
            return set(blocks)
        return {b: out[b] for b in blocks}

    def _factors_of(self, blocks: list) -> list:
        """Factors P of up-to-date blocks (computed now, batched per group), in ``blocks`` order."""
        out = {}
        for group, part in self._by_group(blocks):
            states = [[self.state[p] for p in b.params] for b in part]
            out.update(zip(part, self.curvature.factors_all(part, group, states)))
        return [out[b] for b in blocks]

    def _apply(self, block: Block, factors, extra=None) -> None:
        """u <- u + k - P extra for a block whose curvature is up to date (with its group)."""
        grads, states = self._grads_states(block)
        self.curvature.apply(block, grads, self._group_of(block), states, factors, extra)

    def _update(self, rec: Recorder) -> None:
        for block, factors in self._update_curvature(rec).items():
            self._apply(block, factors)

    # -- copies and pickles ----------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Everything but the recorders (rebuilt by :meth:`__setstate__`) and the hooks (as torch
        leaves them out): ``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state``
        and ``param_groups``, so a ``copy.deepcopy`` or pickle of this optimizer lost its blocks,
        curvature and options."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}
        for k in ("_rec", "_live", "_stage_cache"):      # (the last: DDPNOpt's stages)
            if k in state:
                state[k] = None
        return state

    def __setstate__(self, state: dict) -> None:
        """A copy's state (from :meth:`__getstate__`), or torch's ``load_state_dict``, which
        sets ``state`` and ``param_groups`` through here."""
        had = "differentiable" in state.get("defaults", self.__dict__.get("defaults", {}))
        super().__setstate__(state)
        if not had:                    # (torch adds it; no curvature takes it)
            self.defaults.pop("differentiable", None)
        if "_live" in state:           # a copy (not load_state_dict): its own recorders
            self._refresh_recording()

    # -- state ---------------------------------------------------------------------------------------
    def configuration(self) -> dict:
        """The options that define this optimizer beyond its param groups (a checkpoint of
        another configuration is refused: :func:`nn_adapter.checkpoint.load_checkpoint`)."""
        return {"curvature": self.curvature.name}

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` plus ``"curvature"``: the curvature's name."""
        state = super().state_dict()
        state["curvature"] = self.curvature.name
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` (as torch does), after checking it.

        Raises:
            ValueError: it was saved with another curvature (both named), one of its groups has
                an invalid hyperparameter, or its groups do not match this optimizer's.
        """
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise TypeError("state_dict: expected a dict returned by an optimizer's state_dict()")
        saved = state_dict.get("curvature")
        if saved is not None and saved != self.curvature.name:
            raise InputError(f"state_dict: saved by an optimizer with curvature {saved!r}, but "
                             f"this one uses curvature {self.curvature.name!r}; their states "
                             f"differ, so load it into a {saved!r} optimizer")
        for i, group in enumerate(state_dict["param_groups"]):
            self._validate_group(group, f"state_dict: param group {i}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "curvature"})
        for group in self.param_groups:       # a state_dict of an older version lacks new keys
            for k in self.curvature.defaults:
                group.setdefault(k, self.defaults[k])
