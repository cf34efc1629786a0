"""Identity curvature, Q_uu = I / lr: plain SGD, with optional (Nesterov) momentum as torch.optim.SGD."""
from __future__ import annotations

import torch

from .base import DiagonalCurvature, is_fraction, l2_coefficient, with_weight_decay

__all__ = ["IdentityCurvature"]


class IdentityCurvature(DiagonalCurvature):
    """SGD's curvature: P = lr I; k is exactly ``torch.optim.SGD``'s step.

    Hyperparameters (torch's names): ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``
    (``decoupled_weight_decay=True``: SGDW, the decay applied to the parameters, not the gradient).

    Example:
        >>> import torch
        >>> from nn_adapter.curvature import Block
        >>> c = IdentityCurvature()
        >>> p = torch.zeros(2)
        >>> c.step(Block("diagonal", (p,)), [torch.ones(2)], dict(c.defaults, lr=0.1), [{}])
        [tensor([-0.1000, -0.1000])]
    """

    name = "identity"
    defaults = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                    decoupled_weight_decay=False)

    def validate(self, hp):
        super().validate(hp)
        m, d = hp["momentum"], hp["dampening"]
        self.check("momentum", m, is_fraction(m), "0 <= momentum < 1")
        self.check("dampening", d, is_fraction(d, closed=True),
                   "0 <= dampening <= 1")
        self.check("nesterov", hp["nesterov"], isinstance(hp["nesterov"], bool), "a bool")
        if hp["nesterov"]:
            self.check("nesterov", True, m > 0 and d == 0,
                       "momentum > 0 and dampening == 0 with nesterov=True")

    def param_update(self, p, grad, group, state):
        momentum = group["momentum"]
        if momentum == 0:
            return
        d_p = with_weight_decay(p, grad, group)
        buf = state.get("momentum_buffer")
        if buf is None:
            state["momentum_buffer"] = torch.clone(d_p).detach()
        else:
            buf.mul_(momentum).add_(d_p, alpha=1 - group["dampening"])

    def param_scale(self, p, group, state):
        return torch.as_tensor(group["lr"], dtype=p.dtype, device=p.device)

    def param_effective_gradient(self, p, grad, group, state, extra=None):
        momentum = group["momentum"]
        if momentum != 0 and not group["nesterov"]:
            d = state["momentum_buffer"]
        else:
            wd = l2_coefficient(group)
            d = grad if wd == 0 else grad.add(p, alpha=wd)
            if momentum != 0:
                d = d.add(state["momentum_buffer"], alpha=momentum)
        return d.clone() if extra is None else torch.add(extra, d)

    def param_direction(self, p, grad, group, state, scale):
        momentum = group["momentum"]
        if momentum == 0:
            d_p = with_weight_decay(p, grad, group)
        elif group["nesterov"]:
            d_p = with_weight_decay(p, grad, group).add(state["momentum_buffer"], alpha=momentum)
        else:
            d_p = state["momentum_buffer"]
        return d_p * (-scale)
