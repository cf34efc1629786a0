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
    """Context manager recording ``inputs``, ``outputs``, ``out_grads``, ``in_grads`` of modules.

    Args:
        input_of: modules whose first positional input is recorded (detached).
        grad_of: modules whose output gradient is recorded (when the output requires grad).
        in_grad_of: modules whose gradient with respect to their first input is recorded
            (when that input requires grad).

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with Recorder([lin], [lin]) as rec:
        ...     lin(torch.ones(4, 3)).sum().backward()
        >>> rec.inputs[lin].shape, rec.out_grads[lin].shape
        (torch.Size([4, 3]), torch.Size([4, 2]))
    """

    def __init__(self, input_of: Iterable[nn.Module] = (), grad_of: Iterable[nn.Module] = (),
                 in_grad_of: Iterable[nn.Module] = (), output_of: Iterable[nn.Module] = ()):
        input_of, grad_of, in_grad_of = list(input_of), list(grad_of), list(in_grad_of)
        output_of = list(output_of)
        want_input = {id(m) for m in input_of}
        want_grad = {id(m) for m in grad_of}
        want_in_grad = {id(m) for m in in_grad_of}
        want_output = {id(m) for m in output_of}
        self._grad_of = grad_of
        self._modules = list({id(m): m for m in input_of + grad_of + in_grad_of + output_of}
                             .values())
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.outputs: dict[nn.Module, torch.Tensor] = {}
        self.out_grads: dict[nn.Module, torch.Tensor] = {}
        self.in_grads: dict[nn.Module, torch.Tensor] = {}
        self.calls: dict[nn.Module, int] = {}
        self._hooks = [self._make_hook(m, id(m) in want_input, id(m) in want_grad,
                                       id(m) in want_in_grad, id(m) in want_output)
                       for m in self._modules]
        self._handles: list = []

    def __enter__(self) -> "Recorder":
        self.release()
        self.calls.clear()
        self._handles = [m.register_forward_hook(h) for m, h in zip(self._modules, self._hooks)]
        return self

    def _make_hook(self, module: nn.Module, keep_input: bool, keep_grad: bool,
                   keep_in_grad: bool, keep_output: bool = False):
        calls, inputs, out_grads, in_grads = self.calls, self.inputs, self.out_grads, self.in_grads
        outputs = self.outputs

        def save(grad):
            out_grads[module] = grad.detach()

        def save_in(grad):
            in_grads[module] = grad.detach()

        def hook(mod, args, output):
            if not torch.is_grad_enabled():
                return
            calls[mod] = calls.get(mod, 0) + 1
            if keep_input and args:
                inputs[mod] = args[0].detach()
            if keep_output and isinstance(output, torch.Tensor):
                outputs[mod] = output.detach()
            if keep_grad and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(save)
            if keep_in_grad and args and isinstance(args[0], torch.Tensor) \
                    and args[0].requires_grad:
                args[0].register_hook(save_in)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def release(self) -> None:
        """Drop the recorded tensors (call when the step is done with them)."""
        self.inputs.clear()
        self.outputs.clear()
        self.out_grads.clear()
        self.in_grads.clear()

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
