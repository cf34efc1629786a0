"""Adam curvature, Q_uu = diag(sqrt(v_hat) + eps) / lr, as torch.optim.Adam (L2 weight decay)."""
from __future__ import annotations

import math

import torch

from .base import DiagonalCurvature, is_finite_number, is_fraction, l2_coefficient

__all__ = ["AdamCurvature"]


class AdamCurvature(DiagonalCurvature):
    """Adam's adaptive diagonal: P = lr / (sqrt(v / (1 - beta2^t)) + eps).

    k is ``torch.optim.Adam``'s step ``-P m / (1 - beta1^t)``; the feedback is preconditioned by
    the same P (the first-moment average is the step direction, not part of the curvature).
    Hyperparameters (torch's names): ``betas``, ``eps``, ``weight_decay``, ``amsgrad``,
    ``decoupled_weight_decay`` (True: AdamW, ``torch.optim.AdamW``'s step exactly).

    Example:
        >>> import torch
        >>> from nn_adapter.curvature import Block
        >>> c = AdamCurvature()
        >>> p = torch.zeros(1)
        >>> k = c.step(Block("diagonal", (p,)), [torch.full((1,), 3.0)], dict(c.defaults, lr=0.1),
        ...            [{}])
        >>> round(float(k[0]), 6)   # Adam's first step is -lr sign(g)
        -0.1
    """

    name = "adam"
    defaults = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                    decoupled_weight_decay=False)

    def validate(self, hp):
        super().validate(hp)
        b, e = hp["betas"], hp["eps"]
        ok = (isinstance(b, (tuple, list)) and len(b) == 2
              and all(is_fraction(x) for x in b))
        self.check("betas", b, ok, "a pair of numbers in [0, 1)")
        self.check("eps", e, is_finite_number(e, strict=True), "a finite number > 0")
        self.check("amsgrad", hp["amsgrad"], isinstance(hp["amsgrad"], bool), "a bool")

    def _denom(self, group, state):
        bc2 = 1 - group["betas"][1] ** state["step"]
        sq = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        return (sq.sqrt() / math.sqrt(bc2)).add_(group["eps"])

    @staticmethod
    def _init_state(p, group, state):
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)

    def params_update(self, params, grads, group, states):
        """The moments of all parameters at once with ``torch._foreach_*`` (the only update path:
        :meth:`DiagonalCurvature.update` and ``update_all`` both come here)."""
        for p, st in zip(params, states):
            self._init_state(p, group, st)
            st["step"] += 1
        beta1, beta2 = group["betas"]
        wd = l2_coefficient(group)
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        avgs = [st["exp_avg"] for st in states]
        sqs = [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
        if group["amsgrad"]:
            maxes = [st["max_exp_avg_sq"] for st in states]
            torch._foreach_maximum_(maxes, sqs)

    def params_scale(self, params, group, states):
        steps = {st["step"] for st in states}
        if len(steps) != 1:
            return super().params_scale(params, group, states)
        bc2 = 1 - group["betas"][1] ** steps.pop()
        key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
        scale = list(torch._foreach_sqrt([st[key] for st in states]))
        torch._foreach_div_(scale, math.sqrt(bc2))
        torch._foreach_add_(scale, group["eps"])
        torch._foreach_reciprocal_(scale)
        torch._foreach_mul_(scale, group["lr"])
        return scale

    def param_scale(self, p, group, state):
        return self._denom(group, state).reciprocal_().mul_(group["lr"])

    def param_effective_gradient(self, p, grad, group, state, extra=None):
        inv_bc1 = 1.0 / (1 - group["betas"][0] ** state["step"])
        if extra is None:
            return state["exp_avg"].mul(inv_bc1)
        return torch.add(extra, state["exp_avg"], alpha=inv_bc1)

    def direction(self, block, grads, group, states, factors):
        """k = -P m / (1 - beta1^t) of the block's parameters, batched (each with its own step
        count; this replaces the per-parameter ``param_direction`` of diagonal curvatures)."""
        ks = torch._foreach_mul([st["exp_avg"] for st in states], factors[2])
        steps = {st["step"] for st in states}
        beta1 = group["betas"][0]
        # one step count (the usual case): one scalar, the same factor as the list's, cheaper
        torch._foreach_mul_(ks, -1.0 / (1 - beta1 ** steps.pop()) if len(steps) == 1
                            else [-1.0 / (1 - beta1 ** st["step"]) for st in states])
        return list(ks)
