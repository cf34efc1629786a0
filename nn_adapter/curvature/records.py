"""Hooks that record module inputs and output gradients for the curvatures and DDPNOpt's feedback.

K-FAC style curvatures and DDPNOpt's feedback need, for some modules, the input each one saw in
the forward pass and the gradient of the loss with respect to its output. Two recorders:

- :class:`Recorder` registers per-module hooks for the duration of a ``with`` block only (the
  user's closure), so nothing stays alive between steps;
- :class:`LiveRecorder` records for the optimizer's lifetime, for ``step()`` without a closure: it
  keeps the forward passes that a backward pass went through since it was last released.

The recorded tensors are detached references (no copies), except under autocast: an activation
or gradient in another floating dtype than its module's own parameters (bfloat16 / float16 of a
float32 module) is recorded in the parameters' dtype (:func:`detached`), which the curvatures
and the feedback compute in. Both refer to the modules they record by identity: a
``copy.deepcopy`` of the model never writes into the original's records.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from occore.errors import InputError

__all__ = ["Recorder", "LiveRecorder", "detached", "recording"]


def recording(seen: bool = False) -> bool:
    """True where a module call is one to record: gradients on, and, for a module already
    recorded in this pass (``seen``), not inside a backward pass, where a
    ``torch.utils.checkpoint`` region runs again to recompute what it did not keep (the call was
    recorded when the forward first ran it; a reentrant checkpoint's first run is without
    gradients, so its call in the backward pass is the one recorded)."""
    return torch.is_grad_enabled() and not (seen and _graph_task_id() != -1)


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def detached(t: torch.Tensor, like: Optional[nn.Module]) -> torch.Tensor:
    """``t`` detached, and in the dtype of ``like``'s own parameters (or of the first parameter
    of ``like`` itself when it has none of its own) where autocast made it another floating dtype;
    otherwise a reference, no copy.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> detached(torch.ones(1, 2, dtype=torch.bfloat16), lin).dtype
        torch.float32
    """
    t = t.detach()
    if like is None or not t.is_floating_point():
        return t
    # the first of ``like.parameters(recurse=False)``, read from the registry directly (this runs
    # for every recorded tensor of every step; the generator machinery cost more than the rest)
    p = next((q for q in like._parameters.values() if q is not None), None)
    if p is None:
        p = next(like.parameters(), None)
    return t if p is None or p.dtype == t.dtype else t.to(p.dtype)


def _functorch_wrapped(t) -> bool:
    """True for a tensor of a ``torch.func`` transform (vmap, grad...): never recorded."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return isinstance(t, torch.Tensor) and check is not None and check(t)


class Recorder:
    """Context manager recording ``inputs``, ``outputs``, ``out_grads``, ``in_grads`` of modules.

    Args:
        input_of: modules whose first positional input is recorded (detached).
        grad_of: modules whose output gradient is recorded (when the output requires grad).
        in_grad_of: modules whose gradient with respect to their first input is recorded
            (when that input requires grad).
        output_of: modules whose output is recorded (detached).

    Attributes:
        inputs, outputs, out_grads, in_grads: ``{module: tensor}`` of the last recorded pass.
        calls: ``{module: n}``, how often each module ran with grad enabled inside the block.
        wants: what is recorded, four frozensets of module ids (input_of, grad_of, in_grad_of,
            output_of): two recorders with equal ``wants`` record the same things.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with Recorder([lin], [lin]) as rec:
        ...     lin(torch.ones(4, 3)).sum().backward()
        >>> rec.inputs[lin].shape, rec.out_grads[lin].shape
        (torch.Size([4, 3]), torch.Size([4, 2]))
    """

    #: where the recorded passes ran, for the messages of :meth:`check_complete`
    context = "in the closure's forward pass"

    def __init__(self, input_of: Iterable[nn.Module] = (), grad_of: Iterable[nn.Module] = (),
                 in_grad_of: Iterable[nn.Module] = (), output_of: Iterable[nn.Module] = ()):
        input_of, grad_of, in_grad_of = list(input_of), list(grad_of), list(in_grad_of)
        output_of = list(output_of)
        want_input = {id(m) for m in input_of}
        want_grad = {id(m) for m in grad_of}
        want_in_grad = {id(m) for m in in_grad_of}
        want_output = {id(m) for m in output_of}
        self.wants = tuple(frozenset(w) for w in (want_input, want_grad, want_in_grad,
                                                  want_output))
        self._grad_of = grad_of
        self.names: dict = {}       # {module: its qualified name in the model}, for messages
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

        def hook(mod, args, output):
            # ``mod is not module``: a deep copy of the model made while the hooks were registered
            # (it shares this function); it must not write into these records
            if mod is not module or not recording(mod in calls):
                return
            calls[mod] = calls.get(mod, 0) + 1
            if keep_input and args:
                inputs[mod] = detached(args[0], mod)
            if keep_output and isinstance(output, torch.Tensor):
                outputs[mod] = detached(output, mod)
            if keep_grad and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: out_grads.__setitem__(mod, detached(grad, mod)))
            if keep_in_grad and args and isinstance(args[0], torch.Tensor) \
                    and args[0].requires_grad:
                args[0].register_hook(lambda grad: in_grads.__setitem__(mod, detached(grad, mod)))
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

    def name_modules(self, model: Optional[nn.Module]) -> "Recorder":
        """Name the recorded modules in messages by their qualified names in ``model``."""
        if model is not None:
            self.names = {m: n for n, m in model.named_modules() if n}
        return self

    def label(self, module: nn.Module) -> str:
        """``'layer.0' (Linear)`` when the module's name is known, else ``Linear``."""
        kind = type(module).__name__
        name = self.names.get(module)
        return f"{name!r} ({kind})" if name else kind

    def has_grad(self, module: nn.Module) -> bool:
        """True when the gradient at the module's output was recorded (in any form)."""
        return module in self.out_grads

    def check_complete(self, modules: Iterable[nn.Module], need_grads: bool = True) -> None:
        """Raise ``InputError`` unless each module ran exactly once and, if asked, got a gradient."""
        for m in modules:
            n = self.calls.get(m, 0)
            if n != 1:
                raise InputError(
                    f"model: module {self.label(m)} ran {n} times {self.context}; "
                    "the optimizer needs each parametrised module to run exactly once")
            if need_grads and m in self._grad_of and not self.has_grad(m):
                raise InputError(
                    f"closure: no gradient reached the output of module {self.label(m)}; "
                    "the closure must call loss.backward() (a module whose output the loss does "
                    "not use is left alone when its parameters have no gradient: "
                    "zero_grad(set_to_none=True), torch's default)")


# -- the live recorders: one global forward hook, filtered by module identity ---------------------
_LIVE: "weakref.WeakSet[LiveRecorder]" = weakref.WeakSet()
_WATCHED: dict[int, int] = {}   # id(module) -> number of attached recorders that record it
_GLOBAL_HOOK = None             # the handle of the global hook while a module is watched


def _global_forward_hook(mod, args, output):
    if id(mod) in _WATCHED:     # the fast path for every other module of the process
        for rec in _LIVE:
            rec._forward(mod, args, output)


def _unwatch(ids) -> None:
    """Forget the modules of a detached (or collected) recorder; drop the hook when none is left."""
    global _GLOBAL_HOOK
    for i in ids:
        n = _WATCHED.get(i, 0) - 1
        if n > 0:
            _WATCHED[i] = n
        else:
            _WATCHED.pop(i, None)
    if _GLOBAL_HOOK is not None and not _WATCHED:
        _GLOBAL_HOOK.remove()
        _GLOBAL_HOOK = None


class LiveRecorder(Recorder):
    """Records the inputs and output gradients of modules for as long as it is attached.

    For ``optimizer.step()`` without a closure: the optimizer attaches one at construction, the
    user runs the forward and backward passes, and the step reads what was recorded. A module's
    record is kept when a backward pass reaches its output: the input of that forward and the
    gradient at its output, and ``calls`` counts such passes. A forward whose output no backward
    reaches (an evaluation with grad enabled) is not recorded; two backpropagated forwards of
    one module since the last :meth:`release` are (and :meth:`check_complete` refuses them).

    It hooks no module: one global forward hook (``torch.nn.modules.module
    .register_module_forward_hook``) serves every attached recorder and ignores modules it was not
    built for, so the model still pickles (``torch.save(model)``) and a ``copy.deepcopy`` of it
    is not recorded. The hook exists while some LiveRecorder is attached; a recorder is detached
    by :meth:`detach` or when it is garbage-collected. ``paused`` stops the recording (the
    optimizer pauses it while a closure runs under its own :class:`Recorder`).

    Args:
        input_of: modules whose first positional input is recorded.
        grad_of: modules whose output gradient is recorded.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> rec = LiveRecorder([lin], [lin]).attach()
        >>> with torch.no_grad():
        ...     _ = lin(torch.ones(5, 3))          # not recorded: no gradient
        >>> lin(torch.ones(4, 3)).sum().backward()
        >>> rec.calls[lin], rec.inputs[lin].shape, rec.out_grads[lin].shape
        (1, torch.Size([4, 3]), torch.Size([4, 2]))
        >>> rec.detach()
    """

    context = "in the forward passes that a backward pass went through since the last step"

    def __init__(self, input_of: Iterable[nn.Module] = (), grad_of: Iterable[nn.Module] = ()):
        super().__init__(input_of, grad_of)
        self._by_id = {id(m): m for m in self._modules}
        self._want_input, self._want_grad = self.wants[0], self.wants[1]
        self.paused = False
        self._finalizer = None

    def attach(self) -> "LiveRecorder":
        """Start recording (idempotent); returns self."""
        global _GLOBAL_HOOK
        if self._modules and self._finalizer is None:
            ids = list(self._by_id)
            for i in ids:
                _WATCHED[i] = _WATCHED.get(i, 0) + 1
            _LIVE.add(self)
            self._finalizer = weakref.finalize(self, _unwatch, ids)
            if _GLOBAL_HOOK is None:
                _GLOBAL_HOOK = register_module_forward_hook(_global_forward_hook)
        return self

    def detach(self) -> None:
        """Stop recording and drop what was recorded."""
        _LIVE.discard(self)
        if self._finalizer is not None:
            self._finalizer()          # runs _unwatch once
            self._finalizer = None
        self.release()

    @property
    def attached(self) -> bool:
        """True while recording (between :meth:`attach` and :meth:`detach`)."""
        return self._finalizer is not None

    def __enter__(self):
        raise TypeError("LiveRecorder: records while attached; use attach() / detach()")

    def release(self) -> None:
        """Drop the recorded tensors and the pass counts."""
        super().release()
        self.calls.clear()

    def _forward(self, mod, args, output) -> None:
        key = id(mod)
        if self.paused or self._by_id.get(key) is not mod or not torch.is_grad_enabled():
            return
        if not (isinstance(output, torch.Tensor) and output.requires_grad) \
                or _functorch_wrapped(output):
            return
        x = detached(args[0], mod) if key in self._want_input and args \
            and isinstance(args[0], torch.Tensor) else None
        keep_grad = key in self._want_grad
        ref = weakref.ref(self)

        def commit(grad):
            rec = ref()
            if rec is None or rec.paused:
                return
            rec.calls[mod] = rec.calls.get(mod, 0) + 1
            if x is not None:
                rec.inputs[mod] = x
            if keep_grad:
                rec.out_grads[mod] = detached(grad, mod)
        output.register_hook(commit)

    def check_complete(self, modules: Iterable[nn.Module], need_grads: bool = True) -> None:
        """Raise ``InputError`` unless each module went through exactly one forward and backward
        pass since the last release."""
        for m in modules:
            n = self.calls.get(m, 0)
            if n != 1:
                raise InputError(
                    f"model: module {self.label(m)} ran {n} times {self.context}; "
                    "step() without a closure needs exactly one forward and backward pass of "
                    "each parametrised module per step (run evaluation passes under "
                    "torch.no_grad(), or pass a closure)")
