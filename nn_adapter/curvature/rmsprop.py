"""RMSprop curvature, Q_uu = diag(sqrt(E[Q_u^2]) + eps) / lr, as torch.optim.RMSprop."""
from __future__ import annotations

import torch

from .base import (DiagonalCurvature, is_finite_number, is_fraction, l2_coefficient,
                   with_weight_decay)

__all__ = ["RMSpropCurvature"]


class RMSpropCurvature(DiagonalCurvature):
    """RMSprop's adaptive diagonal: P = lr / (sqrt(v) + eps); k is ``torch.optim.RMSprop``'s step.

    Hyperparameters (torch's names): ``alpha``, ``eps``, ``weight_decay``, ``momentum``,
    ``centered`` (then v is the running variance), ``decoupled_weight_decay``.

    Example:
        >>> import torch
        >>> from nn_adapter.curvature import Block
        >>> c = RMSpropCurvature()
        >>> p = torch.zeros(1)
        >>> k = c.step(Block("diagonal", (p,)), [torch.ones(1)], dict(c.defaults, lr=0.01), [{}])
        >>> round(float(k[0]), 4)
        -0.1
    """

    name = "rmsprop"
    defaults = dict(alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                    decoupled_weight_decay=False)

    def validate(self, hp):
        super().validate(hp)
        a, e, m = hp["alpha"], hp["eps"], hp["momentum"]
        self.check("alpha", a, is_fraction(a), "0 <= alpha < 1")
        self.check("eps", e, is_finite_number(e, strict=True), "a finite number > 0")
        self.check("momentum", m, is_fraction(m), "0 <= momentum < 1")
        self.check("centered", hp["centered"], isinstance(hp["centered"], bool), "a bool")

    def _avg(self, group, state):
        sq = state["square_avg"]
        if group["centered"]:
            ga = state["grad_avg"]
            return sq.addcmul(ga, ga, value=-1).sqrt_().add_(group["eps"])
        return sq.sqrt().add_(group["eps"])

    def param_update(self, p, grad, group, state):
        if "square_avg" not in state:
            state["step"] = 0
            state["square_avg"] = torch.zeros_like(p)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(p)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p)
        state["step"] += 1
        grad = with_weight_decay(p, grad, group)
        alpha = group["alpha"]
        state["square_avg"].mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if group["centered"]:
            state["grad_avg"].lerp_(grad, 1 - alpha)
        if group["momentum"] > 0:
            state["momentum_buffer"].mul_(group["momentum"]).addcdiv_(grad,
                                                                     self._avg(group, state))

    def param_scale(self, p, group, state):
        return self._avg(group, state).reciprocal_().mul_(group["lr"])

    def param_effective_gradient(self, p, grad, group, state, extra=None):
        if group["momentum"] > 0:
            return None
        wd = l2_coefficient(group)
        d = grad if wd == 0 else grad.add(p, alpha=wd)
        return d.clone() if extra is None else torch.add(extra, d)

    def param_direction(self, p, grad, group, state, scale):
        if group["momentum"] > 0:
            return state["momentum_buffer"] * (-group["lr"])
        return with_weight_decay(p, grad, group) * scale.neg()
