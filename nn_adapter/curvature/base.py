"""The shared curvature E[Q_uu] of DDPNOpt and its baselines: blocks, matrix views, the base class.

A curvature turns the batch gradient Q_u of a parameter block into the base optimizer's step
``k = -P Q_u`` (momentum and bias corrections included) and exposes its inverse curvature ``P``
(learning rate included) in a factored form that covers every curvature here::

    P V = Q_G ((Q_G^T V Q_A) * D) Q_A^T        (V: a block gradient seen as an (out, in) matrix)

with ``Q_G`` / ``Q_A`` orthogonal (``None`` meaning identity) and ``D`` an elementwise scaling of the
block's matrix view. Diagonal curvatures (SGD, RMSprop, Adam) have no bases; EKFAC has both.

A *block* is the unit a curvature works on: a ``Linear`` or ``Conv2d`` module (weight and bias
together; the bias is the last column of the matrix view) or a single other parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from occore.errors import InputError
from occore.validation import is_real

__all__ = ["Block", "Curvature", "find_blocks", "as_matrix", "from_matrix", "apply_factors",
           "apply_p", "l2_coefficient", "with_weight_decay", "is_finite_number", "is_fraction"]

BLOCK_KINDS = ("linear", "conv2d", "diagonal")


@dataclass(frozen=True, eq=False)
class Block:
    """Parameters a curvature treats together.

    Attributes:
        kind: ``"linear"``, ``"conv2d"`` (weight and optional bias of one module) or
            ``"diagonal"`` (one parameter of any shape).
        params: ``(weight, bias)``, ``(weight,)`` or ``(param,)``; live parameters.
        module: the owning module for ``linear``/``conv2d`` blocks, else ``None``.

    Example:
        >>> blocks = find_blocks(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)))
        >>> [b.kind for b in blocks]
        ['linear', 'diagonal', 'diagonal']
    """

    kind: str
    params: tuple
    module: Optional[nn.Module] = None

    @property
    def weight(self) -> torch.Tensor:
        return self.params[0]

    @property
    def has_bias(self) -> bool:
        return len(self.params) == 2

    @property
    def structured(self) -> bool:
        """True for blocks with a matrix view (``linear`` and ``conv2d``)."""
        return self.kind != "diagonal"


def _structured_kind(module: nn.Module) -> Optional[str]:
    if type(module) is nn.Linear:
        return "linear"
    if (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)):
        return "conv2d"
    return None


def find_blocks(model: nn.Module) -> list[Block]:
    """Blocks of every trainable parameter of ``model``, in ``model.parameters()`` order.

    ``nn.Linear`` and ``nn.Conv2d`` (one group, zero padding) give one structured block; every
    other trainable parameter is a diagonal block of its own.
    """
    blocks: list[Block] = []
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        kind = _structured_kind(module)
        if kind is not None and own and module.weight.requires_grad:
            params = [module.weight] + ([module.bias] if module.bias is not None
                                        and module.bias.requires_grad else [])
            if all(id(p) not in seen for p in params):
                blocks.append(Block(kind, tuple(params), module))
                seen.update(id(p) for p in params)
        for p in own:
            if id(p) not in seen:
                blocks.append(Block("diagonal", (p,)))
                seen.add(id(p))
    return blocks


def as_matrix(block: Block, tensors) -> torch.Tensor:
    """Matrix view ``[W | b]`` of per-parameter tensors of a structured block.

    Args:
        block: a ``linear`` or ``conv2d`` block.
        tensors: one tensor per block parameter, each of shape (*lead, *param.shape).

    Returns:
        (*lead, out, in[+1]); ``in`` is ``in_features`` or ``C_in * kh * kw``.
    """
    w = tensors[0]
    nlead = w.dim() - block.weight.dim()
    lead, out = w.shape[:nlead], block.weight.shape[0]
    mat = w.reshape(*lead, out, -1)
    if block.has_bias:
        mat = torch.cat([mat, tensors[1].reshape(*lead, out, 1)], dim=-1)
    return mat


def from_matrix(block: Block, mat: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`as_matrix` (leading batch dimensions are kept)."""
    lead = mat.shape[:-2]
    wshape = block.weight.shape
    n_in = math.prod(wshape[1:])
    out = [mat[..., :n_in].reshape(*lead, *wshape)]
    if block.has_bias:
        out.append(mat[..., n_in].reshape(*lead, wshape[0]))
    return out


def apply_factors(factors, mat: torch.Tensor) -> torch.Tensor:
    """``Q_G ((Q_G^T M Q_A) * D) Q_A^T`` for factors ``(Q_G, Q_A, D)``; M may have leading dims."""
    q_g, q_a, d = factors
    if isinstance(d, list):
        raise TypeError("apply_factors: per-parameter scalings act on parameters, not matrices")
    if q_g is not None:
        mat = q_g.mT @ mat
    if q_a is not None:
        mat = mat @ q_a
    mat = mat * d
    if q_a is not None:
        mat = mat @ q_a.mT
    if q_g is not None:
        mat = q_g @ mat
    return mat


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise InputError(f"invalid {name}: {value!r} (expected {expected})")


def is_finite_number(value, minimum: float = 0.0, strict: bool = False) -> bool:
    """True for a finite real number (an int, a float or a one-element tensor, not a bool) that is
    ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return False
        value = float(value)
    elif not is_real(value):
        return False
    return math.isfinite(value) and (value > minimum if strict else value >= minimum)


def is_fraction(value, closed: bool = False) -> bool:
    """True for a finite real number (not a bool) in [0, 1) ([0, 1] when ``closed``)."""
    return is_finite_number(value) and (float(value) <= 1.0 if closed else float(value) < 1.0)


class Curvature:
    """Base class: hyperparameters and the two operations every curvature offers.

    Subclasses set ``name`` and ``defaults`` (hyperparameters named as torch names them) and
    implement :meth:`update` (the curvature state), :meth:`factors` (the inverse curvature P
    after the update, in factored form) and :meth:`direction` (the base optimizer's step k).

    Hyperparameters live in the optimizer's param group (so LR schedulers work); state tensors
    live in the optimizer's per-parameter ``state`` dicts (so ``state_dict`` round-trips).

    Example:
        >>> from nn_adapter.curvature import make_curvature
        >>> make_curvature("adam").defaults["betas"]
        (0.9, 0.999)
    """

    name = "base"
    defaults: dict[str, Any] = {}
    needs_records = False  # True when step() needs the recorded module inputs / output grads

    # -- hyperparameters -------------------------------------------------------------------
    def validate(self, hp: dict) -> None:
        """Raise ``InputError`` (a ``ValueError``) naming the first invalid hyperparameter.

        ``lr`` and ``weight_decay`` must be finite and >= 0, ``decoupled_weight_decay`` a bool
        (True: ``p <- p (1 - lr weight_decay)`` before the step, as ``torch.optim.AdamW``, and
        no decay in the gradient; see :func:`l2_coefficient`).
        """
        _check("lr", hp.get("lr"), is_finite_number(hp.get("lr")), "a finite number >= 0")
        wd = hp.get("weight_decay", 0.0)
        _check("weight_decay", wd, is_finite_number(wd), "a finite number >= 0")
        dec = hp.get("decoupled_weight_decay", False)
        _check("decoupled_weight_decay", dec, isinstance(dec, bool), "a bool")

    @staticmethod
    def check(name: str, value, ok: bool, expected: str) -> None:
        """Raise ``ValueError("invalid <name>: ...")`` unless ``ok``."""
        _check(name, value, ok, expected)

    # -- the operations --------------------------------------------------------------------
    def update(self, block: Block, grads: list, group: dict, states: list[dict],
               record=None) -> None:
        """Update the block's curvature state (moments, factors...) with this batch.

        Args:
            block: the parameter block.
            grads: batch gradients Q_u, one per block parameter (weight decay not yet added).
            group: the param group (hyperparameters).
            states: the optimizer state dict of each block parameter (updated in place).
            record: recorded module inputs/output gradients (``needs_records`` curvatures).
        """
        raise NotImplementedError

    def factors(self, block: Block, group: dict, states: list[dict]):
        """Inverse curvature P after :meth:`update`: ``(Q_G, Q_A, D)``, see the module docstring.

        ``D`` is either a tensor shaped like the block's matrix view (with the bases), or a list
        of per-parameter scalings, one tensor per parameter broadcastable to its shape (then
        ``Q_G = Q_A = None``).
        """
        raise NotImplementedError

    def direction(self, block: Block, grads: list, group: dict, states: list[dict],
                  factors) -> list[torch.Tensor]:
        """The base optimizer's step k after :meth:`update` (one tensor per parameter)."""
        raise NotImplementedError

    def direction_with(self, block: Block, grads: list, group: dict, states: list[dict],
                       factors, extra: list) -> list[torch.Tensor]:
        """``k - P extra``: the step plus the preconditioned feedback ``extra`` (per parameter)."""
        ks = self.direction(block, grads, group, states, factors)
        return [k.sub_(e) for k, e in zip(ks, apply_p(block, factors, extra))]

    def apply(self, block: Block, grads: list, group: dict, states: list[dict], factors,
              extra: list = None) -> None:
        """``u <- u + k - P extra`` in place (``extra``: feedback sums per parameter, or None)."""
        ks = (self.direction(block, grads, group, states, factors) if extra is None else
              self.direction_with(block, grads, group, states, factors, extra))
        for p, k in zip(block.params, ks):
            p.add_(k)

    def step(self, block: Block, grads: list, group: dict, states: list[dict],
             record=None) -> list[torch.Tensor]:
        """``update`` then ``direction``: the base optimizer's step k for one block."""
        self.update(block, grads, group, states, record)
        return self.direction(block, grads, group, states, self.factors(block, group, states))

    # -- many blocks at once (subclasses may batch these with torch._foreach_* ops) ----------
    def update_all(self, blocks: list, grads: list, group: dict, states: list,
                   record=None, reduce=None) -> None:
        """:meth:`update` for several blocks; ``grads`` and ``states`` are lists per block.

        ``reduce``: data-parallel, a function that averages a list of tensors over the ranks in
        place (:meth:`nn_adapter.distributed.Collectives.average_`), for statistics of the
        recorded batch shard (the gradients are averaged already); None on one process. A
        curvature whose :meth:`update` reads the records must override this method and reduce
        its batch statistics with it."""
        if reduce is not None and self.needs_records:
            raise NotImplementedError(f"{type(self).__name__}: data-parallel updates of a "
                                      "curvature that reads the records need update_all")
        for b, g, s in zip(blocks, grads, states):
            self.update(b, g, group, s, record)

    def factors_all(self, blocks: list, group: dict, states: list) -> list:
        """:meth:`factors` for several blocks."""
        return [self.factors(b, group, s) for b, s in zip(blocks, states)]


class DiagonalCurvature(Curvature):
    """A curvature that treats every parameter on its own with a diagonal P.

    Subclasses implement, for one parameter, :meth:`param_update` (the state),
    :meth:`param_scale` (the diagonal of P) and :meth:`param_direction` (k given that diagonal).
    """

    def param_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict,
                     state: dict) -> None:
        raise NotImplementedError

    def param_scale(self, p: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        """The diagonal of P for one parameter (a tensor of p's shape, or a 0-dim tensor)."""
        raise NotImplementedError

    def param_direction(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict,
                        scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def param_effective_gradient(self, p: torch.Tensor, grad: torch.Tensor, group: dict,
                                 state: dict, extra=None):
        """d + extra (a new tensor) with k = -P d, or None where k is not of that form."""
        return None

    def direction_with(self, block, grads, group, states, factors, extra):
        out = []
        for p, g, st, scale, e in zip(block.params, grads, states, factors[2], extra):
            d = self.param_effective_gradient(p, g, group, st, e)
            if d is None:
                out.append(self.param_direction(p, g, group, st, scale).sub_(e * scale))
            else:
                out.append(d.mul_(scale).neg_())
        return out

    def apply(self, block, grads, group, states, factors, extra=None):
        extra = extra if extra is not None else [None] * len(block.params)
        for p, g, st, scale, e in zip(block.params, grads, states, factors[2], extra):
            d = self.param_effective_gradient(p, g, group, st, e)
            if d is None:
                k = self.param_direction(p, g, group, st, scale)
                p.add_(k if e is None else k.sub_(e * scale))
            else:
                p.addcmul_(d, scale, value=-1)

    def params_update(self, params: list, grads: list, group: dict, states: list) -> None:
        """:meth:`param_update` for a flat list of parameters (override to batch it)."""
        for p, g, s in zip(params, grads, states):
            self.param_update(p, g, group, s)

    def params_scale(self, params: list, group: dict, states: list) -> list:
        """:meth:`param_scale` for a flat list of parameters (override to batch it)."""
        return [self.param_scale(p, group, s) for p, s in zip(params, states)]

    def update(self, block, grads, group, states, record=None):
        self.params_update(list(block.params), grads, group, states)

    def factors(self, block, group, states):
        return None, None, self.params_scale(list(block.params), group, states)

    def update_all(self, blocks, grads, group, states, record=None, reduce=None):
        self.params_update([p for b in blocks for p in b.params], [g for gs in grads for g in gs],
                           group, [s for ss in states for s in ss])

    def factors_all(self, blocks, group, states):
        scales = self.params_scale([p for b in blocks for p in b.params], group,
                                   [s for ss in states for s in ss])
        out, i = [], 0
        for b in blocks:
            out.append((None, None, scales[i:i + len(b.params)]))
            i += len(b.params)
        return out

    def direction(self, block, grads, group, states, factors):
        return [self.param_direction(p, g, group, s, d)
                for p, g, s, d in zip(block.params, grads, states, factors[2])]


def apply_p(block: Block, factors, tensors: list) -> list[torch.Tensor]:
    """P applied to one block's parameter-shaped tensors (new tensors)."""
    if isinstance(factors[2], list):
        return list(torch._foreach_mul(tensors, factors[2]))
    return from_matrix(block, apply_factors(factors, as_matrix(block, tensors)))


def l2_coefficient(group: dict):
    """The weight decay a curvature adds to the gradient: ``weight_decay``, or 0 when the group's
    decay is decoupled (``decoupled_weight_decay=True``: the optimizer then shrinks the
    parameters itself before the step, as ``torch.optim.AdamW``).

    Example:
        >>> l2_coefficient(dict(weight_decay=0.1)), l2_coefficient(
        ...     dict(weight_decay=0.1, decoupled_weight_decay=True))
        (0.1, 0.0)
    """
    if group.get("decoupled_weight_decay", False):
        return 0.0
    return group.get("weight_decay", 0.0)


def with_weight_decay(p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
    """``grad + weight_decay * p`` (a new tensor when an L2 decay is on), as torch does; ``grad``
    itself when the decay is off or decoupled (:func:`l2_coefficient`)."""
    wd = l2_coefficient(group)
    return grad.add(p, alpha=wd) if wd != 0 else grad


CurvatureFactory = Callable[[], Curvature]
