"""The terminal value Hessian of DDPNOpt: a curvature of the loss that does not grow with the loss.

DDPNOpt starts its backward Bellman pass from per-sample terminal value derivatives
V_x^T = grad phi (phi: one sample's loss, B times its share of the batch-mean loss) and
V_xx^T = a positive semi-definite matrix held in factored form::

    V_xx^T(i) = Y^(i) W^(i) Y^(i)T,      Y^(i): (C, r) columns,  W^(i): (r, r) (or a scalar when r = 1)

The factor's columns are carried back through the stages by vector-Jacobian products and W by the
small (r, r) recursion of :mod:`nn_adapter.feedback`. The choices (``terminal_hessian=``):

``"gauss_newton"``
    The Gauss-Newton Hessian of the loss with respect to the network output, exactly, as r
    columns per sample: softmax cross-entropy H = diag(p) - p p^T = A A^T with columns
    a_c = sqrt(p_c) (e_c - p) (r = C); mean squared error H = (2/d) I (r = d). Costs one extra
    backward pass of r cotangents through the network (no weight gradients).
``"sampled"``
    An unbiased rank-one sample of it, as in K-FAC's Monte-Carlo Fisher: y = grad_out of
    -log p(y_hat | out) with y_hat drawn from the model's own prediction (cross-entropy:
    p - e_yhat; mean squared error: sqrt(2/d) eps, eps ~ N(0, I)); E[y y^T] = H. One extra
    backward pass of one cotangent.
``"projected"`` (the default)
    The Gauss-Newton Hessian restricted to the direction of the value gradient g = V_x^T:
    (g^T H g / |g|^4) g g^T, the rank-one matrix along g with H's curvature along g. Its columns
    are the gradients backpropagation already computed, so it costs nothing beyond today's
    rank-one feedback; its norm is g^T H g / |g|^2 <= ||H|| (<= 1/2 for cross-entropy) whatever the
    loss, where the gradient outer product's is |g|^2.
``"gradient"``
    The outer product g g^T of the paper's Proposition 3 ("z = grad phi for GN"). It grows with the
    loss's gradient, and with it the feedback: kept as an option for comparison.

The loss is recognised from what the closure reveals (the network output and the gradient at
it): softmax cross-entropy on logits when B * dL/dout = softmax(out) - onehot for every sample
(``loss="auto"``, the default), else it must be named (``loss="cross_entropy"`` / ``"mse"``). An
unrecognised loss with ``"auto"`` is taken as mean squared error (a bounded curvature), with a
warning once per optimizer. Either loss summed over the batch (``reduction="sum"``; a squared
error is told by the loss's value against its gradient) is refused.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from occore.errors import InputError

from .errors import warn

__all__ = ["TERMINAL_HESSIANS", "RANK_ONE", "LOSSES", "detect_loss", "terminal_factor", "loss_hessian_factor"]

TERMINAL_HESSIANS = ("projected", "gauss_newton", "sampled", "gradient")
#: the kinds whose columns are the recorded gradients themselves (r = 1, ``Y`` is None)
RANK_ONE = ("projected", "gradient")
DETECT = object()   # LossResolver: run detect_loss (no result given)
LOSSES = ("auto", "cross_entropy", "mse")


def detect_loss(out: torch.Tensor, grad: torch.Tensor, value: Optional[float] = None) -> Optional[str]:
    """``"cross_entropy"`` when ``B grad = softmax(out) - t`` row by row with each ``t`` a
    probability vector (class labels, soft targets, label smoothing: their Gauss-Newton Hessian
    diag(p) - p p^T is the same), ``"sum"`` when ``grad = softmax(out) - onehot`` itself
    (cross-entropy with labels summed over the batch, ``reduction="sum"``, or, given the loss's
    ``value``, a squared error summed over the batch: :func:`_summed_squared_error`), else None.

    A cross-entropy scaled by a factor below 1 passes as one with soft targets (its Gauss-Newton
    Hessian is then taken too large by the inverse factor). The rows of a cross-entropy's
    gradient sum to zero (up to the gradient's rounding) whatever its size, which is checked
    relative to the gradient: a small gradient of another loss (a regression near its fit, whose
    ``softmax(out) - B grad`` is then close to a probability vector) is not taken for one, nor is
    a gradient that is zero (it says nothing about the loss).

    Args:
        out: network outputs (B, C).
        grad: the gradient of the batch loss at ``out`` (B, C).
    """
    if out.shape != grad.shape:
        return None
    if out.dim() != 2 or out.shape[1] < 2:
        return "sum" if _summed_squared_error(out, grad, value) else None
    p = torch.softmax(out.double(), 1)
    tol = 1e-3 if out.dtype in (torch.float16, torch.bfloat16) else 1e-4
    bg = grad.double() * out.shape[0]
    size = bg.abs().sum(1)
    if not float(size.max()) > 0:
        return None
    t = p - bg                                  # the targets, if it is cross-entropy
    # (a row sum of B grad is rounding only: up to about C eps of the coarser of the two dtypes,
    # the output's under autocast)
    eps = max(torch.finfo(out.dtype).eps, torch.finfo(grad.dtype).eps)
    allowed = (size * tol + out.shape[1] * eps).clamp_(max=tol)
    if float(t.min()) >= -tol and bool((bg.sum(1).abs() <= allowed).all()):
        return "cross_entropy"
    resid = grad.double() - p                   # = -onehot for a summed cross-entropy
    label = resid.argmin(1)
    resid[torch.arange(len(label), device=label.device), label] += 1.0
    if float(resid.abs().max()) <= tol or _summed_squared_error(out, grad, value):
        return "sum"
    return None


def _summed_squared_error(out: torch.Tensor, grad: torch.Tensor, value: Optional[float]) -> bool:
    """Whether the loss ``value`` and its gradient are those of a squared error summed over the
    batch (``nn.MSELoss(reduction="sum")``).

    A loss (1/B) sum_i c |out_i - t_i|^2 has the gradient g_i = 2 c (out_i - t_i) / B, so
    c = B |g|^2 / (4 L) whatever the targets: c = 1/d for torch's mean squared error (d the size
    of one sample's output) and c = B for the sum over the batch (B > 1). Another loss (or one
    with a penalty added) gives c = B only by coincidence, to the tolerance below.
    """
    n = out.shape[0]
    if value is None or not (math.isfinite(value) and value > 0) or n <= 1 or out.numel() == 0:
        return False
    eps = max(torch.finfo(out.dtype).eps, torch.finfo(grad.dtype).eps)
    tol = min(1e-2, max(1e-8, 1e3 * eps))
    c = n * float(grad.double().square().sum()) / (4.0 * value)
    return abs(c / n - 1.0) <= tol


def loss_hessian_factor(loss: str, out: torch.Tensor) -> torch.Tensor:
    """Columns A of the per-sample Gauss-Newton Hessian H = A A^T of the loss, (B, r, *out[1:]).

    cross-entropy: a_c = sqrt(p_c) (e_c - p), r = C; mean squared error: sqrt(2/d) e_k, r = d.
    """
    n = out.shape[0]
    if loss == "cross_entropy":
        p = torch.softmax(out, 1)
        sq = p.sqrt()
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return sq[:, :, None] * (eye[None] - p[:, None, :])         # (B, C, C): row c = a_c
    d = out[0].numel()
    eye = torch.eye(d, dtype=out.dtype, device=out.device) * math.sqrt(2.0 / d)
    return eye.reshape(1, d, *out.shape[1:]).expand(n, d, *out.shape[1:]).clone()


def _sample(loss: str, out: torch.Tensor, generator) -> torch.Tensor:
    """One Monte-Carlo column per sample, (B, 1, *out[1:]), with E[y y^T] = H."""
    if loss == "cross_entropy":
        p = torch.softmax(out, 1)
        draw = torch.multinomial(p.double().cpu(), 1, generator=generator).to(out.device)
        y = p.clone()
        y.scatter_add_(1, draw, -torch.ones_like(y[:, :1]))
        return y[:, None]
    eps = torch.randn(out.shape, dtype=out.dtype, generator=generator, device="cpu").to(out.device)
    return (eps * math.sqrt(2.0 / out[0].numel()))[:, None]


def _rayleigh(loss: str, out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample g^T H g / |g|^4 (0 where g = 0), (B,)."""
    g2 = g.reshape(g.shape[0], -1)
    sq = g2.square()
    norm2 = sq.sum(1)
    if loss == "cross_entropy":
        p = torch.softmax(out, 1)
        ghg = sq.mul_(p).sum(1) - p.mul_(g2).sum(1).square()
    else:
        ghg = norm2 * (2.0 / g2.shape[1])
    # g = 0 gives ghg = 0 exactly (every term has a factor g), so the clamp makes it 0, not NaN
    return ghg.div_(norm2.square().clamp_(min=torch.finfo(g.dtype).tiny))


def terminal_factor(kind: str, loss: str, out: torch.Tensor, g: torch.Tensor, generator=None):
    """The terminal factor of ``kind`` for outputs ``out`` and per-sample value gradients ``g``.

    Args:
        kind: one of :data:`TERMINAL_HESSIANS`.
        loss: ``"cross_entropy"`` or ``"mse"`` (unused for ``"gradient"``).
        out: network outputs (B, ...).
        g: per-sample value gradients at the output, B dL/dout, (B, ...).
        generator: a ``torch.Generator`` (CPU) for ``"sampled"``.

    Returns:
        ``(Y, W)``: ``Y`` is None when the columns are the recorded gradients themselves (r = 1),
        else (B, r, *out[1:]); ``W`` is a per-sample (B,) weight (r = 1) or None (identity).
    """
    if kind == "gradient":
        return None, None
    if kind == "projected":
        return None, _rayleigh(loss, out, g)
    if kind == "gauss_newton":
        return loss_hessian_factor(loss, out), None
    return _sample(loss, out, generator), None


class LossResolver:
    """Resolves ``loss="auto"``: cross-entropy once recognised stays recognised; an unrecognised
    loss is checked again at the next step (and taken as mean squared error, warned once). A
    cross-entropy or squared error summed over the batch is refused (:meth:`check_mean`)."""

    def __init__(self, loss: str):
        self.loss = loss
        self._warned = False
        self._recognised = False

    @property
    def settled(self) -> bool:
        """True once the loss is recognised (later steps skip :func:`detect_loss`)."""
        return self._recognised

    def check_mean(self, out: torch.Tensor, g_mean: torch.Tensor, found=DETECT,
                   value: Optional[float] = None):
        """Raise ``InputError`` for a cross-entropy or squared error summed over the batch;
        returns what :func:`detect_loss` found (checked until cross-entropy is recognised).
        ``found``: what was found already (data-parallel: the ranks' agreed result), instead of
        detecting; ``value``: the batch's loss (None: not known)."""
        if self._recognised:
            return self.loss
        if found is DETECT:
            found = detect_loss(out, g_mean, value)
        if found == "sum" and out.shape[0] > 1:
            raise InputError(
                "closure: the loss is summed over the batch (reduction='sum'); DDPNOpt needs the "
                "batch mean of per-sample losses (reduction='mean', torch's default): its "
                "per-sample value gradients are B times the gradients of the mean")
        if found == "cross_entropy":
            self._recognised = True
        return found

    def __call__(self, out: torch.Tensor, g_mean: torch.Tensor, found=DETECT,
                 value: Optional[float] = None) -> str:
        found = self.check_mean(out, g_mean, found, value)
        if self.loss != "auto":
            return self.loss
        if found == "cross_entropy":
            self.loss = found          # recognised once: later steps skip the check
            return found
        if not self._warned:
            self._warned = True
            msg = ("DDPNOpt: the loss is not softmax cross-entropy on the network output; its terminal Gauss-Newton curvature is taken as mean "
                   "squared error's (2/d) I. Pass loss='mse' or loss='cross_entropy' to say which, "
                   "or terminal_hessian='gradient'")
            warn(msg)
        return "mse"
