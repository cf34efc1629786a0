"""Forward/backward hooks that record module inputs and output gradients during a closure.

K-FAC style curvatures and DDPNOpt's feedback need, for some modules, the input each one saw in
the forward pass of the user's closure and the gradient of the loss with respect to its output.
:class:`Recorder` registers the hooks for the duration of a ``with`` block only, so nothing stays
alive between steps. The recorded tensors are detached references (no copies).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from occore.errors import InputError

__all__ = ["Recorder"]


class Recorder:
    """Context manager recording ``inputs[m]`` and ``out_grads[m]`` for chosen modules.

    Args:
        input_of: modules whose first positional input is recorded (detached).
        grad_of: modules whose output gradient is recorded (when the output requires grad).

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with Recorder([lin], [lin]) as rec:
        ...     lin(torch.ones(4, 3)).sum().backward()
        >>> rec.inputs[lin].shape, rec.out_grads[lin].shape
        (torch.Size([4, 3]), torch.Size([4, 2]))
    """

    def __init__(self, input_of: Iterable[nn.Module] = (), grad_of: Iterable[nn.Module] = ()):
        self._input_of = list(input_of)
        self._grad_of = list(grad_of)
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.out_grads: dict[nn.Module, torch.Tensor] = {}
        self.calls: dict[nn.Module, int] = {}
        self._handles: list = []

    def __enter__(self) -> "Recorder":
        want_input = set(map(id, self._input_of))
        want_grad = set(map(id, self._grad_of))
        for module in {id(m): m for m in self._input_of + self._grad_of}.values():
            self._handles.append(module.register_forward_hook(
                self._make_hook(id(module) in want_input, id(module) in want_grad)))
        return self

    def _make_hook(self, keep_input: bool, keep_grad: bool):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return
            self.calls[module] = self.calls.get(module, 0) + 1
            if keep_input and inputs:
                self.inputs[module] = inputs[0].detach()
            if keep_grad and isinstance(output, torch.Tensor) and output.requires_grad:
                def save(grad, module=module):
                    self.out_grads[module] = grad.detach()
                output.register_hook(save)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def check_complete(self, modules: Iterable[nn.Module], need_grads: bool = True) -> None:
        """Raise ``InputError`` unless each module ran exactly once and, if asked, got a gradient."""
        for m in modules:
            n = self.calls.get(m, 0)
            if n != 1:
                raise InputError(
                    f"model: module {m.__class__.__name__} ran {n} times in the closure's forward "
                    "pass; the optimizer needs each parametrised module to run exactly once")
            if need_grads and m in self._grad_of and m not in self.out_grads:
                raise InputError(
                    f"closure: no gradient reached the output of {m.__class__.__name__}; "
                    "the closure must call loss.backward()")
