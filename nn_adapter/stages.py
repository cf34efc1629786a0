"""Split a network into layer-indexed stages x_{t+1} = f_t(x_t, u_t) (DDPNOpt, Liu et al. 2021, Eq. 6).

:class:`Stage` is the one stage type of the network side. Here (:func:`split_stages`, the chain
stages of :class:`~nn_adapter.NetworkProblem`) stage t is one module with parameters (the *head*
h_t, ``Stage.module``, whose parameters are the control u_t) followed by the parameter-free modules
after it (activations, pooling, flatten, dropout in eval mode...), so f_t = sigma_t o h_t. DDPNOpt
finds its stages with hooks instead (:func:`nn_adapter.module_stages.module_stages`: the
parametrised modules in the order the model's own forward runs them, no followers). Leading parameter-free modules (a ``Flatten`` before the first ``Linear``, say)
form the *pre* block: x_0 = pre(inputs) is fixed, not a control.

What can be a head: ``Linear``, ``Conv1d``, ``Conv2d``, ``BatchNorm`` (eval mode, its running
statistics), and any user module with parameters (a residual block, a nested ``nn.Sequential``), as
long as it maps one tensor to one tensor. What can follow: any module without parameters (modules
whose parameters are all frozen count as parameter-free). Refused, with
:class:`~nn_adapter.errors.UnsupportedModuleError`:

- dropout (any ``_DropoutNd``) in training mode: it is random, so a rollout would not be a
  function of the controls; call ``model.eval()`` first (in eval mode dropout is the identity);
- batch/instance norm tracking running statistics, in training mode: its forward would use batch
  statistics and write to the running buffers; call ``model.eval()``;
- a batch norm without running statistics (``track_running_stats=False``), in any mode: it
  normalises with the batch's statistics, coupling the samples;
- a layer with a ``spectral_norm`` parametrization in training mode (its power iteration writes
  its buffers whenever the weight is read; other parametrizations, ``weight_norm``, are heads
  whose controls are their originals); call ``model.eval()``;
- modules that do not map one tensor to one tensor (recurrent layers, attention, transformers) and
  containers that are not callable (``ModuleList``, ``ModuleDict``);
- a head with some parameters frozen and others not, and parameters shared between stages.

Why NetworkProblem takes chains only (not the hook-recorded stages of any model): its rollouts,
Jacobians, E-MSA Hamiltonians and exact batched DDP need each stage as a function
x_{t+1} = f_t(x_t, u_t) of a Markov state. In a model that is not a chain (a skip h + g(h)) the
input of a module is not one: a later module's input depends on an activation the skip carries
past it, so exact DDP on the module inputs would drop the skip's share of V_xx, and the state
would have to be every activation alive at each cut, which a hook recording does not give (it
sees module calls, not the tensors the forward keeps). DDPNOpt needs no such state (its value
Hessians are terminal columns pulled back through the whole graph by autograd). A residual block
can still be one stage of a chain: any module with parameters mapping one tensor to one tensor
is a head.

The mode is checked when the stages are split: a model switched back to training mode afterwards
is the caller's responsibility.

Evaluation goes through :func:`torch.func.functional_call` on the head with the given parameter
dict, then calls the followers in order: the user's modules are never mutated or wrapped (forward
hooks the user registered on them do run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch  # noqa: F401  (used by the doctests)
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from .errors import UnsupportedModuleError

__all__ = ["Stage", "Stages", "split_stages", "prelu", "uses_batch_statistics"]

SUPPORTED = ("stage heads: Linear, Conv1d, Conv2d, BatchNorm (eval mode) or any module with "
             "parameters mapping one tensor to one tensor; followers: parameter-free modules "
             "(activations, pooling, Flatten, Dropout in eval mode); the model: nn.Sequential or a "
             "list of stages, each a module or a tuple (head, *followers)")

# Types that do not map one tensor to one tensor, or are not callable.
_REFUSED = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder,
            nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
            nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


@dataclass(eq=False)
class Stage:
    """Stage t of a network, x_{t+1} = f_t(x_t, u_t): the module h_t owning the parameters u_t,
    then the parameter-free ``followers`` after it, f_t = followers o h_t.

    The one stage type of the network side. :func:`split_stages` makes the chain stages of
    :class:`~nn_adapter.NetworkProblem` (with followers; its rollouts run the whole stage,
    :meth:`forward`); :func:`nn_adapter.module_stages.module_stages` makes DDPNOpt's stages, the
    modules in the order the model's own forward runs them (no followers: whatever runs between
    two modules enters through the recorded gradients and the measured inputs; per-sample
    quantities use the module alone, :meth:`module_fn`).

    Attributes:
        module: h_t, the module whose parameters are the control u_t.
        name: its name in the model (e.g. ``"0"``, ``"layer1.conv"``), for messages.
        blocks: DDPNOpt's curvature blocks of its parameters (one structured block for ``Linear``
            and ``Conv2d``, else one diagonal block per parameter); empty for NetworkProblem.
        param_names: the module's parameter names (e.g. ``("weight", "bias")``), in control
            order: block order with blocks, else ``named_parameters`` order.
        followers: the parameter-free modules after the module (chain stages only).
        follower_names: their names in the model.
        index: t, the position among the stages.
        stats: for a training-mode batch norm (DDPNOpt), the (mean, var) of the recorded batch,
            held fixed in :meth:`module_fn` (None otherwise).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
        >>> stage = split_stages(net).stages[0]
        >>> stage.names, stage.param_names, stage.numel
        (('0', '1'), ('weight', 'bias'), 8)
        >>> x = torch.randn(5, 3)
        >>> torch.equal(stage.forward(stage.param_dict(), x), net(x))
        True
    """

    module: nn.Module
    name: str
    blocks: list = field(default_factory=list)
    param_names: tuple = ()
    followers: tuple = ()
    follower_names: tuple = ()
    index: int = 0
    stats: tuple = None

    def __post_init__(self):
        if not self.param_names:
            if self.blocks:
                ids = {id(p): n for n, p in self.module.named_parameters()}
                self.param_names = tuple(ids[id(p)] for b in self.blocks for p in b.params)
            else:
                self.param_names = tuple(n for n, _ in self.module.named_parameters())

    @property
    def modules(self) -> tuple:
        """(module, *followers)."""
        return (self.module,) + tuple(self.followers)

    @property
    def names(self) -> tuple:
        """The names of :attr:`modules` in the model."""
        return (self.name,) + tuple(self.follower_names)

    @property
    def structured(self) -> bool:
        """True for a ``Linear`` or ``Conv2d`` stage with its curvature block (closed-form
        per-sample products)."""
        return len(self.blocks) == 1 and self.blocks[0].structured

    @property
    def params(self) -> list:
        """The live parameters, in ``param_names`` order (no copy)."""
        if self.blocks:
            return [p for b in self.blocks for p in b.params]
        named = dict(self.module.named_parameters())
        return [named[n] for n in self.param_names]

    def param_dict(self) -> dict[str, Tensor]:
        """The live parameters by name (no copy)."""
        return dict(zip(self.param_names, self.params))

    @property
    def numel(self) -> int:
        """Number of scalar parameters (the control size of the stage)."""
        return sum(p.numel() for p in self.params)

    def freeze_statistics(self, x: Tensor) -> None:
        """Hold the statistics of a batch norm that normalises with the batch's (training mode,
        or without running statistics in any mode) at those of the batch ``x`` (B, C, ...)."""
        m = self.module
        if uses_batch_statistics(m):
            dims = [0] + list(range(2, x.dim()))
            self.stats = (x.mean(dims), x.var(dims, unbiased=False))
        else:
            self.stats = None

    def module_fn(self, params: list, x: Tensor) -> Tensor:
        """h_t(x; params), the module alone, with the given tensors (``param_names`` order); x
        may be any batch, including one sample (a batch norm then uses the frozen statistics of
        the recorded batch). The user's module is never mutated (``functional_call``)."""
        if self.stats is not None:
            p = dict(zip(self.param_names, params))
            return F.batch_norm(x, self.stats[0], self.stats[1], p.get("weight"), p.get("bias"),
                                False, 0.0, self.module.eps)
        if type(self.module) is nn.PReLU and self.param_names == ("weight",):
            return prelu(x, params[0])
        return functional_call(self.module, dict(zip(self.param_names, params)), (x,))

    def forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """f_t(x, u): the module with parameters ``params`` applied to ``x``, then the followers.

        Args:
            params: one tensor per name of ``param_names``, shaped like the module's parameters.
            x: the stage input (batch first), e.g. (B, n_t).

        Returns:
            The stage output, e.g. (B, n_{t+1}).
        """
        y = self.module_fn([params[k] for k in self.param_names], x)
        for module in self.followers:
            y = prelu(y, module.weight) if type(module) is nn.PReLU else module(y)
        return y


def uses_batch_statistics(module: nn.Module) -> bool:
    """True for a batch norm whose forward normalises with the statistics of its input batch: in
    training mode, or in any mode without running statistics (``track_running_stats=False``),
    as torch's own ``_BatchNorm.forward`` decides.

    Example:
        >>> uses_batch_statistics(nn.BatchNorm1d(3).eval()), uses_batch_statistics(
        ...     nn.BatchNorm1d(3, track_running_stats=False).eval())
        (False, True)
    """
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or (module.running_mean is None and module.running_var is None))


def prelu(x: Tensor, weight: Tensor) -> Tensor:
    """``F.prelu(x, weight)`` (one slope, or one per channel: dimension 1, or 0 for a 1-D x) as
    ``where(x > 0, x, weight x)``: the same values and derivatives, but torch's own prelu fails
    under ``vmap(jacrev(...))`` with a batched input (its backward mixes the batch and channel
    sizes), which the per-sample Jacobians of NetworkProblem's DDP take.

    Example:
        >>> x, w = torch.randn(4, 3, 2), torch.tensor([0.1, 0.2, 0.3])
        >>> torch.equal(prelu(x, w), F.prelu(x, w))
        True
    """
    if weight.numel() > 1 and x.dim() > 1:
        weight = weight.view(-1, *([1] * (x.dim() - 2)))
    return torch.where(x > 0, x, weight * x)


class Stages(NamedTuple):
    """The result of :func:`split_stages` (unpacks as ``pre, stages``).

    Attributes:
        pre: leading parameter-free modules, applied to the inputs to give x_0.
        stages: the stages, t = 0..T-1.

    Example:
        >>> from torch import nn
        >>> pre, stages = split_stages(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(),
        ...                                          nn.Linear(3, 2)))
        >>> len(pre), len(stages)
        (1, 2)
    """

    pre: list
    stages: list

    def apply_pre(self, x: Tensor) -> Tensor:
        """x_0 = pre(inputs)."""
        for module in self.pre:
            x = module(x)
        return x


def _describe(name: str, module: nn.Module) -> str:
    return f"module {name!r} ({type(module).__name__})"


def _trainable(module: nn.Module, name: str) -> bool:
    """True if ``module`` has parameters that are controls; refuses a partly frozen module."""
    flags = [p.requires_grad for p in module.parameters()]
    if any(flags) and not all(flags):
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        raise UnsupportedModuleError(
            f"{_describe(name, module)} has frozen parameters {frozen} next to trainable ones; "
            f"freeze all or none of a stage's parameters. Supported: {SUPPORTED}")
    return any(flags)


def _check(module: nn.Module, name: str, check_mode: bool = True) -> None:
    """Refuse types and training-mode behaviours the adapter cannot handle (recursively; the
    ``parametrizations`` container of a parametrized layer, ``weight_norm`` and the like, is
    part of the layer, not a module of the network)."""
    inner = {id(m) for sub in module.modules() if parametrize.is_parametrized(sub)
             for m in sub.parametrizations.modules()}
    for sub_name, sub in module.named_modules(prefix=name):
        if id(sub) in inner:
            continue
        where = _describe(sub_name, sub)
        if check_mode and parametrize.is_parametrized(sub) and any(
                p.training and type(p).__name__ == "_SpectralNorm"
                for p in sub.parametrizations.modules()):
            raise UnsupportedModuleError(
                f"{where} is in training mode, where its spectral_norm parametrization runs a "
                "power iteration, writing its buffers, whenever the weight is read; call "
                f"model.eval(). Supported: {SUPPORTED}")
        if isinstance(sub, _REFUSED):
            raise UnsupportedModuleError(
                f"{where} does not map one tensor to one tensor. Supported: {SUPPORTED}")
        if check_mode and sub.training and isinstance(sub, nn.modules.dropout._DropoutNd):
            raise UnsupportedModuleError(
                f"{where} is in training mode, where it is random; call model.eval() (dropout "
                f"counts as the identity in eval mode). Supported: {SUPPORTED}")
        if (check_mode and sub.training and isinstance(sub, nn.modules.batchnorm._NormBase)
                and sub.track_running_stats):
            raise UnsupportedModuleError(
                f"{where} is in training mode, where it uses batch statistics and updates its "
                f"running buffers; call model.eval(). Supported: {SUPPORTED}")
        if check_mode and uses_batch_statistics(sub):
            raise UnsupportedModuleError(
                f"{where} has no running statistics (track_running_stats=False), so it normalises "
                "with the batch's statistics in every mode, which couples the samples (a stage "
                "must map each sample on its own); use track_running_stats=True and "
                f"model.eval(), or nn_adapter.DDPNOpt. Supported: {SUPPORTED}")


def _items(model) -> list[tuple[str, object]]:
    if isinstance(model, nn.Sequential):
        # _modules keeps a module that appears twice (a shared activation); named_children() would
        # drop the repeat and silently change the network
        return list(model._modules.items())
    if isinstance(model, (list, tuple)) and not isinstance(model, nn.Module):
        return [(str(i), item) for i, item in enumerate(model)]
    raise UnsupportedModuleError(
        f"model: cannot split a {type(model).__name__} into stages; pass an nn.Sequential or a "
        f"list of stages. Supported: {SUPPORTED}")


def split_stages(model: nn.Sequential | Sequence, check_mode: bool = True) -> Stages:
    """Split ``model`` into a pre block and stages (see the module docstring for the rules).

    Args:
        model: an ``nn.Sequential`` (children grouped as described above), or a list whose items
            are modules (grouped the same way) or tuples ``(head, *followers)`` (one explicit
            stage each; the head must have trainable parameters, the followers none).
        check_mode: refuse dropout and batch norm in training mode (False only to locate
            parameters, as :meth:`NetworkProblem.load_into` does).

    Returns:
        ``Stages(pre, stages)``.

    Raises:
        UnsupportedModuleError: a module cannot be handled (its name and class are given), a
            parameter is shared between stages, or the model has no trainable parameter.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> pre, stages = split_stages(net)
        >>> [type(m).__name__ for m in pre], [s.names for s in stages]
        (['Flatten'], [('1', '2'), ('3',)])
    """
    if not isinstance(check_mode, bool):
        raise TypeError(f"check_mode={check_mode!r}: expected True or False")
    pre: list = []
    groups: list[tuple[list, list]] = []   # (modules, names) per stage
    for name, item in _items(model):
        if isinstance(item, tuple):
            if not item or not all(isinstance(m, nn.Module) for m in item):
                raise UnsupportedModuleError(
                    f"stage {name!r}: an explicit stage must be a non-empty tuple of modules. "
                    f"Supported: {SUPPORTED}")
            names = [f"{name}.{j}" for j in range(len(item))]
            for m, n in zip(item, names):
                _check(m, n, check_mode)
            if not _trainable(item[0], names[0]):
                raise UnsupportedModuleError(
                    f"{_describe(names[0], item[0])}: the head of an explicit stage needs "
                    f"trainable parameters. Supported: {SUPPORTED}")
            for m, n in zip(item[1:], names[1:]):
                if _trainable(m, n):
                    raise UnsupportedModuleError(
                        f"{_describe(n, m)} follows the head of stage {name!r} but has "
                        f"parameters; make it a stage of its own. Supported: {SUPPORTED}")
            groups.append((list(item), names))
            continue
        if not isinstance(item, nn.Module):
            raise UnsupportedModuleError(
                f"item {name!r} is a {type(item).__name__}, not a module. Supported: {SUPPORTED}")
        _check(item, name, check_mode)
        if _trainable(item, name):
            groups.append(([item], [name]))
        elif groups:
            groups[-1][0].append(item)
            groups[-1][1].append(name)
        else:
            pre.append(item)
    if not groups:
        raise UnsupportedModuleError(
            f"model: no module with trainable parameters, so no stage. Supported: {SUPPORTED}")
    stages, seen = [], {}
    for t, (modules, names) in enumerate(groups):
        param_names = tuple(n for n, _ in modules[0].named_parameters())
        for pname, p in modules[0].named_parameters():
            if id(p) in seen and seen[id(p)] != t:
                raise UnsupportedModuleError(
                    f"{_describe(names[0], modules[0])}: parameter {pname!r} is shared with stage "
                    f"{seen[id(p)]}; controls must belong to one stage. Supported: {SUPPORTED}")
            seen[id(p)] = t
        stages.append(Stage(modules[0], names[0], param_names=param_names,
                            followers=tuple(modules[1:]), follower_names=tuple(names[1:]),
                            index=t))
    return Stages(pre, stages)
