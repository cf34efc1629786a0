"""Stages of any torch model, as the model itself runs them (DDPNOpt on a minibatch).

Stage t is the t-th module, in the order the model's own ``forward`` calls them, that *owns*
trainable parameters (``named_parameters(recurse=False)``): a ``Linear``, a ``Conv2d``, a
``BatchNorm``, a user module with an ``nn.Parameter`` of its own. Its input is the state x_t (the
first positional argument it was called with), its parameters are the control u_t. Whatever runs
between two stages (activations, pooling, skip connections, a custom ``forward``'s arithmetic) is
part of the dynamics; nothing needs to be an ``nn.Sequential``.

What each stage records during the closure (:class:`StageRecorder`): its input x_t, the gradient
of the loss at its output (the value gradient, per sample) and, for modules without a closed form,
the gradient at its input *through this module only* (q_x = h_x^T g; the input is replaced by a
view of itself that only this module consumes, so a skip connection's share is not included;
not for a training-mode batch norm, whose backpropagated input gradient also runs through the
batch statistics that the per-sample stage holds fixed).
The model's own call is recorded too (its arguments, output and the RNG state before it), so the
additional forward pass can re-run the model's forward with the same dropout masks
(:func:`replay`).

Per-sample quantities of a stage treat the module as a function of one sample: a training-mode
batch norm is then evaluated with the statistics of the recorded batch held fixed
(:meth:`nn_adapter.stages.Stage.module_fn`). A module that runs twice in one forward, or a
parameter of two modules that both run (weight sharing, tied weights), is refused with an error
naming it.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from occore.errors import InputError

from .curvature.records import Recorder, detached, recording
from .errors import UnsupportedModuleError
from .stages import Stage

__all__ = ["module_stages", "StageRecorder", "replay", "autocast_state", "autocast_off",
           "fast_pooling", "fixed_parametrizations"]


def _owners(model: nn.Module, params: set) -> list:
    """(name, module) of the modules that own (directly) some of ``params``; for the
    parametrizations of a parametrized module (``torch.nn.utils.parametrizations.weight_norm``
    and the like: a ``ParametrizationList`` owns the original tensors and runs, without an input,
    whenever the weight is read), the parametrized module itself: its stage holds them."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        own = [p for p in module.parameters(recurse=False) if id(p) in params]
        if isinstance(module, ParametrizationList):
            name = name.rpartition(".")[0].rpartition(".")[0]     # <module>.parametrizations.<x>
            module = modules[name]
        if own and all(module is not m for _, m in out):
            out.append((name, module))
    return out


def module_stages(model: nn.Module, blocks: list, order: list) -> list:
    """The stages of ``model`` in execution order.

    Args:
        model: the network.
        blocks: the optimizer's curvature blocks (every trainable parameter in exactly one).
        order: the modules with parameters, in the order they first ran (a recorder's
            ``order``).

    Returns:
        a :class:`~nn_adapter.stages.Stage` (no followers) per module that owns a parameter of ``blocks`` and ran (the
        parameters of modules that did not run get no gradient and are not updated, as in
        torch.optim). A module that did not run but sits inside one that did (the ``out_proj``
        of a ``MultiheadAttention``, whose forward uses its weights directly) has its blocks in
        the stage of the nearest such ancestor: they are part of that module's function.

    Raises:
        UnsupportedModuleError: a trainable parameter of two modules that both ran (tied
            weights), naming the parameter and both modules.
    """
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    ran = {names.get(id(m)): m for m in order}
    owner_path: dict = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owner_path.setdefault(id(p), n)
    inside: dict = {}             # id(ancestor that ran) -> blocks of its descendants that did not
    for b in blocks:
        path = owner_path.get(id(b.params[0]))
        if path is None or path in ran:
            continue
        while path:
            path = path.rpartition(".")[0]
            if path in ran:
                inside.setdefault(id(ran[path]), []).append(b)
                break
    stages = []
    first_owner: dict = {}
    for module in order:
        for pname, p in module.named_parameters(recurse=False):
            other = first_owner.setdefault(id(p), module)
            if other is not module and p.requires_grad:
                raise UnsupportedModuleError(
                    f"model: parameter {pname!r} of module {names.get(id(module))!r} "
                    f"({type(module).__name__}) is also a parameter of module "
                    f"{names.get(id(other))!r} ({type(other).__name__}), and both run in the "
                    "forward (weight sharing); DDPNOpt's feedback needs each parameter in one "
                    "stage (use feedback=False for this model)")
        own = {id(p) for p in module.parameters(recurse=False)}
        mine = [b for b in blocks if all(id(p) in own for p in b.params)]
        mine += inside.get(id(module), [])
        if mine:
            stages.append(Stage(module, names.get(id(module), type(module).__name__), mine,
                                index=len(stages)))
    return stages


def _check_model(model: nn.Module) -> None:
    compiled = getattr(torch, "_dynamo", None)
    opt_mod = getattr(getattr(compiled, "eval_frame", None), "OptimizedModule", None)
    if opt_mod is not None and isinstance(model, opt_mod):
        raise UnsupportedModuleError(
            "model: a torch.compile'd module cannot be recorded stage by stage (its forward runs "
            "as one compiled graph, without module hooks); pass the original module as model= "
            "(model._orig_mod) and use it, uncompiled, in the closure")


class StageRecorder(Recorder):
    """Records, while the closure runs, what DDPNOpt's feedback needs of the model and its stages.

    A :class:`~nn_adapter.curvature.records.Recorder` (same attributes, so curvatures read it)
    whose hooks also record the order the modules ran in, the gradient at a module's input
    *through that module only*, and the model's own call.

    Attributes (filled inside ``with``):
        order: the modules owning parameters, in the order they first ran.
        inputs, out_grads, in_grads, calls: per module (as ``Recorder``): the input x_t, the
            gradient at the output, the gradient at the input through this module only (modules
            in ``in_grad_of``), how many times it ran.
        model_args, model_kwargs, rng: the model's call and the RNG states just before it.
        model_output, model_grad: the model's output and the gradient of the loss at it
            (None unless the model returns one tensor).
        model_output_kind: None, or the type's name of a model output that is not one tensor
            (a tuple, a dict).

    Args:
        model: the network (its call is recorded).
        modules: the modules owning trainable parameters (the candidate stages).
        in_grad_of: modules whose gradient at the input is recorded (through them only).
        compact: ``{module: forward}`` for modules kept in a compact form: inside the block,
            the module (not the first to run, its input requiring grad) is evaluated as
            ``forward(x, sink)`` (:func:`nn_adapter.feedback.compact_conv`), whose backward
            hands ``sink`` what replaces the module's recorded input, output gradient and input
            gradient, kept in ``compact[module]`` (the activation-sized records are dropped
            while autograd still holds its own).
        first_grad: record the gradient at the output of the first module that runs (False
            when nothing reads it: the first stage has no feedback).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> with StageRecorder(net, [net[2], net[0]], [net[2]]) as rec:
        ...     net(torch.randn(5, 3)).sum().backward()
        >>> rec.order == [net[0], net[2]], rec.in_grads[net[2]].shape
        (True, torch.Size([5, 4]))
    """

    def __init__(self, model: nn.Module, modules, in_grad_of=(), compact=None,
                 first_grad: bool = True):
        _check_model(model)
        modules = list({id(m): m for m in modules}.values())
        super().__init__(modules, modules, in_grad_of)
        self.model = model
        self._in_grad = {id(m) for m in in_grad_of}
        self._compact_fns = dict(compact or {})
        self._swapped: list = []
        self._first_grad = first_grad
        self.compact: dict = {}
        self._ids = {id(m) for m in modules}
        self.order: list = []
        self.model_args = self.model_kwargs = self.rng = None
        self.model_output = self.model_grad = self.model_output_kind = None
        self.model_calls = 0
        self._posted: set = set()
        self._model_posted = False
        self.late: list = []
        self.unsupported: dict = {}
        self.autocast: tuple = ()

    # -- hooks -----------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        if not recording(module in self.calls) or id(module) not in self._ids:
            return None
        n = self.calls.get(module, 0)
        self.calls[module] = n + 1
        if n:
            return None
        self.order.append(module)
        if torch.is_grad_enabled() and not recording(True):
            self.late.append(module)      # first run in a backward pass: a reentrant checkpoint
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        others = [a for a in args[1:] if isinstance(a, torch.Tensor) and a.requires_grad]
        if others:
            self.unsupported[module] = (f"takes {1 + len(others)} tensor inputs that depend on the "
                                        "parameters (a stage's state is its first input only)")
        elif len(args) > 1 or kwargs:
            extra = [f"{len(args) - 1} positional"] if len(args) > 1 else []
            extra += [f"keyword {', '.join(map(repr, kwargs))}"] if kwargs else []
            self.unsupported[module] = (
                f"is called with further arguments ({' and '.join(extra)}); the per-sample "
                "gradients and the feedback re-evaluate a stage as module(x) on its input alone")
        self.inputs[module] = detached(x, module)
        if id(module) in self._in_grad and x.requires_grad:
            x = x.view_as(x)              # consumed by this module only: its grad is h_x^T g
            x.register_hook(lambda grad: self._input_grad(module, detached(grad, module)))
            return (x,) + tuple(args[1:]), kwargs
        return None

    def _input_grad(self, module, grad) -> None:
        if module not in self.compact:
            self.in_grads[module] = grad

    def _compact_forward(self, module, forward, x, *args, **kwargs):
        """The module's call inside the block: ``forward(x, sink)`` where it can be kept compact
        (its first call, not the first module, input requiring grad, no autocast)."""
        if (args or kwargs or not isinstance(x, torch.Tensor) or not x.requires_grad
                or not torch.is_grad_enabled() or autocast_state()
                or self.calls.get(module) != 1 or self.order[0] is module):
            return type(module).forward(module, x, *args, **kwargs)

        def sink(stage):
            self.inputs.pop(module, None)
            self.out_grads.pop(module, None)
            self.compact[module] = stage
        return forward(x, sink)

    def _post(self, module, args, output):
        if (not recording(module in self._posted) or id(module) not in self._ids
                or self.calls.get(module, 0) != 1):
            return
        self._posted.add(module)
        if isinstance(output, torch.Tensor):
            if output.requires_grad and (self._first_grad or module is not self.order[0]):
                output.register_hook(lambda grad: self.out_grads.__setitem__(module, detached(grad, module)))
        else:
            self.unsupported.setdefault(module, f"returns a {type(output).__name__}, not one tensor")

    def _model_pre(self, module, args, kwargs):
        if module is self.model and recording(self.model_calls > 0):
            self.model_calls += 1
            self.model_args, self.model_kwargs = args, kwargs
            self.rng = _rng_state(args, kwargs)
            self.autocast = autocast_state()

    def _model_post(self, module, args, kwargs, output):
        if module is not self.model or not recording(self._model_posted):
            return
        self._model_posted = True
        if not isinstance(output, torch.Tensor):
            self.model_output_kind = type(output).__name__
            return
        self.model_output = detached(output, module)
        if output.requires_grad:
            output.register_hook(lambda grad: setattr(self, "model_grad", detached(grad, module)))

    def __enter__(self) -> "StageRecorder":
        self.release()
        h = [self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
             self.model.register_forward_hook(self._model_post, with_kwargs=True)]
        for m in self._modules:
            h.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            h.append(m.register_forward_hook(self._post))
        self._handles = h
        self._swapped = []
        for m, fn in self._compact_fns.items():
            self._swapped.append((m, m.__dict__.get("forward")))
            m.forward = functools.partial(self._compact_forward, m, fn)
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for m, own in self._swapped:
            if own is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own
        self._swapped = []

    def release(self) -> None:
        """Drop everything recorded."""
        super().release()
        self.compact.clear()
        self.calls.clear()
        self.order = []
        self.model_args = self.model_kwargs = self.rng = None
        self.model_output = self.model_grad = self.model_output_kind = None
        self.model_calls = 0
        self._posted = set()
        self._model_posted = False
        self.late = []
        self.unsupported = {}
        self.autocast = ()

    def has_grad(self, module) -> bool:
        return module in self.out_grads or module in self.compact

    def check_stages(self, stages) -> None:
        """Raise ``UnsupportedModuleError`` for a stage after the first whose call the feedback
        cannot treat as x_{t+1} = h(x_t; u_t): one tensor in, one tensor out (the first stage's
        input is fixed, so any module may come first)."""
        for stage in stages[1:]:
            why = self.unsupported.get(stage.module)
            if why:
                raise UnsupportedModuleError(
                    f"model: module {stage.name!r} ({type(stage.module).__name__}) {why}; DDPNOpt's "
                    "feedback needs each parametrised module after the first to map one tensor to "
                    "one tensor (use feedback=False for this model)")

    def check_late(self) -> None:
        """Raise ``UnsupportedModuleError`` for a parametrised module whose first recorded run
        was inside the backward pass (a ``torch.utils.checkpoint`` with ``use_reentrant=True``
        runs its region without gradients in the forward, then again in the backward)."""
        if self.late:
            m = self.late[0]
            raise UnsupportedModuleError(
                f"model: module {self.label(m)} ran with gradients only inside the backward pass "
                "(a torch.utils.checkpoint with use_reentrant=True recomputes its region there); "
                "DDPNOpt's feedback needs the modules recorded in the order the forward runs "
                "them: use checkpoint(..., use_reentrant=False), or feedback=False")

    def check_model_call(self) -> None:
        """Raise ``InputError`` unless the model was called exactly once in the closure."""
        if self.model_calls != 1:
            raise InputError(
                f"model: was called {self.model_calls} times in the closure; DDPNOpt's feedback "
                "re-runs the model's forward on the closure's inputs, so the closure must call "
                "the model (the module given as model=) exactly once")


def autocast_state() -> tuple:
    """((device type, dtype), ...) of the autocast regions active here (empty: none)."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")
                 if torch.is_autocast_enabled(d))


def autocast_off(state: tuple):
    """A context that switches off the autocast regions of ``state`` (:func:`autocast_state`;
    empty, the usual case: a context that does nothing)."""
    if not state:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device, _ in state:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _tiling_max(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(x, k)`` (stride k, no padding) as maxima of strided views of x."""
    h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
    x = x[..., :h, :w]
    rows = x[..., 0::k, :]
    for i in range(1, k):
        rows = torch.maximum(rows, x[..., i::k, :])
    out = rows[..., 0::k]
    for j in range(1, k):
        out = torch.maximum(out, rows[..., j::k])
    return out


def _tiles(m: nn.MaxPool2d):
    """The window size k of a max-pooling whose windows tile its input (square kernel equal to its
    stride, no padding, dilation 1, floor mode, no indices), else None."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    k, stride = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size)
    if (k[0] == k[1] == stride[0] == stride[1] and pair(m.padding) == (0, 0)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices):
        return k[0]
    return None


@contextlib.contextmanager
def fast_pooling(model: nn.Module):
    """Inside the block (no gradients), each ``nn.MaxPool2d`` of ``model`` whose windows tile
    its input runs, on CPU float inputs, as maxima of strided views: the same numbers as torch's
    kernel, which on CPU costs about 14x more (18 ms against 1.3 ms for a 128 x 32 x 28 x 28
    input, one thread; 10 of the 30 ms of the paper CNN's feedback pass). For DDPNOpt's
    additional forward pass only: with gradients, a tie would route them otherwise."""
    swapped = []
    for m in model.modules():
        k = _tiles(m) if isinstance(m, nn.MaxPool2d) else None
        if k is None or "forward" in m.__dict__:
            continue

        def forward(x, m=m, k=k):
            if (torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.device.type != "cpu"
                    or not x.is_floating_point() or x.dim() not in (3, 4)):
                return type(m).forward(m, x)
            return _tiling_max(x, k)
        m.forward = forward
        swapped.append(m)
    try:
        yield
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def fixed_parametrizations(model: nn.Module):
    """Inside the block, the parametrizations of ``model``'s parametrized layers (``torch.nn.utils
    .parametrizations``) are in eval mode: a ``spectral_norm`` then reads its weight with the
    power-iteration vectors the closure's forward left (the closure's weight, for the same
    parameters) instead of iterating again at every read, so its buffers advance once per step
    and the step's per-sample functions and feedback pass see the closure's function."""
    changed = [m for p in model.modules() if isinstance(p, ParametrizationList)
               for m in p.modules() if m.training]
    for m in changed:
        m.training = False
    try:
        yield
    finally:
        for m in changed:
            m.training = True


def _devices(args, kwargs) -> list:
    seen = []
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.device.type == "cuda" and v.device not in seen:
            seen.append(v.device)
    return seen


def _rng_state(args, kwargs):
    cuda = [(d, torch.cuda.get_rng_state(d)) for d in _devices(args, kwargs)]
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replay(rec: StageRecorder):
    """Run a block with the RNG states the closure's forward started from (same dropout masks),
    in the autocast regions the model was called in (the same mixed precision), and the batch
    norms' running statistics unchanged (they advance once per step, in the closure); afterwards
    the RNG states are what they were before the block."""
    cpu_now = torch.get_rng_state()
    cuda_now = [(d, torch.cuda.get_rng_state(d)) for d, _ in rec.rng[1]]
    norms = [m for m in rec.model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
             and m.track_running_stats]
    saved = [[b.clone() if b is not None else None
              for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    torch.set_rng_state(rec.rng[0])
    for d, s in rec.rng[1]:
        torch.cuda.set_rng_state(s, d)
    try:
        with contextlib.ExitStack() as regions:
            for device, dtype in rec.autocast:
                regions.enter_context(torch.autocast(device, dtype=dtype))
            yield
    finally:
        torch.set_rng_state(cpu_now)
        for d, s in cuda_now:
            torch.cuda.set_rng_state(s, d)
        for m, bufs in zip(norms, saved):
            for name, b in zip(("running_mean", "running_var", "num_batches_tracked"), bufs):
                if b is not None:
                    getattr(m, name).copy_(b)
