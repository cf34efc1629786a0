"""A ``torch.optim.Optimizer`` that takes each block's step from a curvature (the k of DDPNOpt).

Shared by :class:`nn_adapter.EKFAC` and :class:`nn_adapter.DDPNOpt`: it validates the
hyperparameters, runs the user's closure with the curvature's hooks, refuses non-finite steps and
applies ``u <- u + k``. DDPNOpt extends :meth:`_update` with the feedback pass.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from occore.errors import InputError

from . import make_curvature
from .base import Block, find_blocks
from .records import Recorder

__all__ = ["CurvatureOptimizer"]

log = logging.getLogger("nn_adapter")


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base optimizer: ``u <- u + k`` with k the curvature's step, over all trainable parameters.

    Args:
        model: the network (its trainable parameters are optimised).
        curvature: a name of ``nn_adapter.curvature.CURVATURES``.
        lr: learning rate (in the param group, so LR schedulers work).
        **hyperparameters: the curvature's hyperparameters, as torch names them.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown or invalid hyperparameter (named in the message), or a model
            without trainable parameters.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> opt = CurvatureOptimizer(net, "identity", lr=0.1)
        >>> def closure():
        ...     opt.zero_grad(); loss = net(torch.ones(3, 2)).pow(2).mean(); loss.backward()
        ...     return loss
        >>> float(opt.step(closure).detach()) >= 0.0
        True
    """

    def __init__(self, model: nn.Module, curvature: str, lr: float, **hyperparameters):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        curv = make_curvature(curvature)
        unknown = sorted(set(hyperparameters) - set(curv.defaults))
        if unknown:
            raise ValueError(f"invalid hyperparameter(s) {unknown} for curvature {curvature!r} "
                             f"(known: {sorted(curv.defaults)})")
        defaults = dict(curv.defaults, lr=lr, **hyperparameters)
        curv.validate(defaults)
        blocks = find_blocks(model)
        if not blocks:
            raise ValueError("model: has no trainable parameters")
        super().__init__([p for b in blocks for p in b.params], defaults)
        self.curvature = curv
        self._model = model
        self._blocks: list[Block] = blocks

    # -- recording -------------------------------------------------------------------------------
    def _recorder(self) -> Recorder:
        if getattr(self, "_rec", None) is None:
            self._rec = self._make_recorder()
        return self._rec

    def _make_recorder(self) -> Recorder:
        mods = self._recorded_modules()
        return Recorder(mods, mods)

    def _recorded_modules(self) -> list[nn.Module]:
        return [b.module for b in self._blocks if b.structured] if self.curvature.needs_records \
            else []

    # -- the step ----------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One step. ``closure`` clears the gradients, computes the loss, calls ``backward`` and
        returns the loss (as for ``torch.optim.LBFGS``); the step is refused (parameters and state
        unchanged, a ``RuntimeWarning``) when the loss or a gradient is not finite.

        Returns:
            the loss the closure returned.
        """
        if closure is None or not callable(closure):
            raise InputError(f"closure: {type(self).__name__}.step needs a closure that runs "
                             "zero_grad, the forward pass, the loss and loss.backward() and "
                             "returns the loss")
        rec = self._recorder()
        try:
            with rec, torch.enable_grad():
                loss = closure()
            if not self._finite(loss):
                return loss
            self._check_records(rec)
            with torch.no_grad():
                self._update(rec)
        finally:
            rec.release()
        return loss

    def _check_records(self, rec: Recorder) -> None:
        rec.check_complete(self._recorded_modules())

    def _finite(self, loss) -> bool:
        if loss is None:
            raise InputError("closure: returned None; it must return the loss")
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        bad = "loss" if not math.isfinite(value) else None
        grads = [p.grad for p in self._params_with_grad()]
        if bad is None and grads and not math.isfinite(
                float(torch.stack(torch._foreach_norm(grads)).sum())):
            bad = "a gradient"
        if bad is not None:
            msg = (f"{type(self).__name__}: {bad} is not finite (loss {value}); step refused, "
                   "parameters and optimizer state unchanged")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return False
        return True

    def _params_with_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p

    def _grads_states(self, block: Block):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block.params]
        return grads, [self.state[p] for p in block.params]

    def _update_curvature(self, rec: Recorder, factors: bool = True):
        """Update the curvature of every block that has gradients.

        Returns:
            ``{block: factors P}`` for those blocks, or (``factors=False``) the set of them.
        """
        group = self.param_groups[0]
        blocks = [b for b in self._blocks if b.weight.grad is not None]
        pairs = [self._grads_states(b) for b in blocks]
        grads, states = [g for g, _ in pairs], [s for _, s in pairs]
        self.curvature.update_all(blocks, grads, group, states, rec)
        if not factors:
            return set(blocks)
        return dict(zip(blocks, self.curvature.factors_all(blocks, group, states)))

    def _factors_of(self, blocks: list) -> list:
        """Factors P of up-to-date blocks (computed now, batched)."""
        return self.curvature.factors_all(
            blocks, self.param_groups[0], [[self.state[p] for p in b.params] for b in blocks])

    def _apply(self, block: Block, factors, extra=None) -> None:
        """u <- u + k - P extra for a block whose curvature is up to date."""
        grads, states = self._grads_states(block)
        self.curvature.apply(block, grads, self.param_groups[0], states, factors, extra)

    def _update(self, rec: Recorder) -> None:
        for block, factors in self._update_curvature(rec).items():
            self._apply(block, factors)
