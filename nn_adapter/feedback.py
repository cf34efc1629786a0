"""Factorised layer-wise feedback of DDPNOpt (Liu, Chen & Theodorou, ICLR 2021, Proposition 3).

With a rank-one terminal value Hessian V_xx^T = w_T z_T z_T^T (z_T = V_x at the output, and w_T the
terminal weight of :mod:`nn_adapter.terminal`: 1 for the gradient outer product, the Gauss-Newton
Rayleigh quotient for ``"projected"``), every value Hessian stays rank one along the backward
pass::

    q_x = f_x^T z',  q_u = f_u^T z',  Q_ux = q_u q_x^T,  rho = q_u^T P q_u,
    mu = max(1, rho),  K dx = -(P / mu) q_u (q_x . dx),  V_xx = (1 - rho / mu) q_x q_x^T

(P = E[Q_uu]^-1, learning rate included). The sample's local model [[Q_xx, Q_xu], [Q_ux, P^-1]] is
convex iff rho <= 1; where it is not, its Q_uu is regularised to mu P^-1 with the smallest mu that
restores convexity (per-sample Levenberg-Marquardt): the sample's gain is divided by mu and its
value Hessian is zero instead of negative. Because z' enters linearly, z_t = S_t (B dL/dx_t) with
S_t = s_t s_{t+1} ... s_{T-1} sqrt(w_T) a per-sample scalar (s^2 = 1 - rho / mu) and dL/dx_t the
gradient the closure's backward already computed (the loss is a batch mean, so the per-sample value
gradient is B times it). The feedback of one stage is then

    (1/B) sum_i Q_ux^(i) dx^(i) / mu_i = (1/B) f_u^T [c * g],  c_i = g_i . (h_x dx_i) / mu_i,
    g = S B dL/dh

with h the stage's parametrised module (its output gradient dL/dh is recorded by a hook): one
Jacobian-vector product h_x dx (for Linear and Conv2d the layer itself without its bias) and one
vector-Jacobian product with per-sample weighted cotangents (a weight gradient). Options add
``eps_vxx h_u^T h_x dx`` (Tikhonov term on the value Hessian at the module output) and
``V_x . h_ux dx`` (second-order term of the module, one double-backward through it). The stage
is the module alone (:class:`~nn_adapter.stages.Stage`): whatever runs between two
modules (activations, skips) enters through the recorded gradients and the measured inputs. :mod:`nn_adapter.feedback_columns` is the same
recursion for an r-column terminal factor.

Everything here works on one stage and returns *unpreconditioned* sums shaped like the
parameters; DDPNOpt applies P.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import jvp, vjp, vmap

from .curvature.base import Block, apply_p, as_matrix, from_matrix
from .curvature.kron import patches, per_sample_grads
from .stages import Stage

__all__ = ["quad_form", "precondition", "feedback_grads", "tikhonov_grads",
           "second_order_grads", "CompactStage", "compact_conv"]


# -- pieces of a structured (Linear / Conv2d) module ------------------------------------------------
#: sample_dots widens at most 16 samples and at most this many elements at a time (a float64 buffer
#: of at most 2 MiB: one that outgrows the caches costs more than its loop saves; measured on
#: (128, N) float32 inputs, one thread: N = 1e5, 16 samples at a time 26 ms, 2 at a time 9.4 ms;
#: the same numbers)
DOT_CHUNK_ELEMENTS = 2 ** 18


def sample_dots(q: torch.Tensor, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Per-sample dot products q^(i) . x^(i) accumulated in float64, (B,) float64.

    The feedback coefficient q_x . dx is formed as q_x . xhat - q_x . x (so no activation-sized dx is
    kept); in float32 that difference of two large numbers would lose most digits when dx is small,
    so both dots are accumulated in float64, ``chunk`` samples at a time (bounded extra memory;
    default: 16, fewer where 16 samples would exceed :data:`DOT_CHUNK_ELEMENTS`).
    """
    n = x.shape[0]
    q2, x2 = q.reshape(n, -1), x.reshape(n, -1)
    if chunk is None:
        chunk = max(1, min(16, DOT_CHUNK_ELEMENTS // max(1, q2.shape[1])))
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    # one buffer for all chunks (a fresh float64 chunk each time can cost its page faults: 3x
    # slower for (128, 32768) inputs when timed alone, about 5% inside a step)
    buf = torch.empty(min(chunk, n), q2.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        # a float32 product is exact in float64: widen one factor, multiply in place by the other
        wide = buf[:min(chunk, n - i)]
        wide.copy_(q2[i:i + chunk]).mul_(x2[i:i + chunk])
        torch.sum(wide, 1, out=out[i:i + chunk])
    return out


def _linear_part(block: Block, weight: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """h_x dx: the layer applied to dx without its bias."""
    m = block.module
    if block.kind == "linear":
        return F.linear(dx, weight)
    return F.conv2d(dx, weight, None, m.stride, m.padding, m.dilation, m.groups)


def _weight_grads(block: Block, x: torch.Tensor, cot: torch.Tensor) -> list[torch.Tensor]:
    """f_u^T cot summed over the batch: the layer's weight (and bias) gradient for cotangent cot."""
    m = block.module
    if block.kind == "linear":
        # (matrices already, the usual (B, n) case: no reshape views)
        c2 = cot if cot.dim() == 2 else cot.reshape(-1, cot.shape[-1])
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = [c2.mT @ x2]
        bias_dims = 0
    else:
        out = [torch.nn.grad.conv2d_weight(x, block.weight.shape, cot, m.stride, m.padding,
                                           m.dilation, m.groups)]
        c2 = cot.transpose(0, 1).flatten(1)
        bias_dims = 1
    if block.has_bias:
        out.append(c2.sum(bias_dims))
    return out


# -- the per-sample quadratic form q_u^T P q_u -----------------------------------------------------
def quad_form(stage: Stage, factors: list, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """rho_i = q_u^(i)T P q_u^(i) for q_u^(i) = h_u^T g_i, per sample.

    Args:
        stage: the stage.
        factors: the curvature's ``(Q_G, Q_A, D)`` of each block of the stage (None for a block
            held fixed: no term).
        x: the module's inputs, (B, ...).
        g: per-sample output cotangents of the module, (B, ...).

    Returns:
        (B,) tensor.
    """
    if stage.structured:
        block, (q_g, q_a, d) = stage.blocks[0], factors[0]
        if block.kind == "linear" and x.dim() == 2:   # rank-one per-sample gradients
            g2 = (g @ q_g if q_g is not None else g).square()
            if isinstance(d, list):   # diagonal: no bias column needed
                d = [s if s.shape == p.shape else s.expand_as(p) for s, p in zip(d, block.params)]
                rho = (g2 @ d[0]).mul_(x.square()).sum(1)
                if block.has_bias:
                    rho = torch.addmv(rho, g2, d[1])
                return rho
            a = patches(block, x)[:, 0]
            a = a @ q_a if q_a is not None else a
            return ((g2 @ d) * a.square()).sum(1)
        if isinstance(d, list):
            d = as_matrix(block, [s.expand_as(p) for s, p in zip(d, block.params)])
        rho = x.new_empty(x.shape[0])
        for sl, grads in per_sample_grads(block, x, g, q_g, q_a):
            rho[sl] = (grads.square() * d).sum((1, 2))
        return rho
    params = [p.detach() for p in stage.params]

    def one(xi, gi):
        _, pull = vjp(lambda ps: stage.module_fn(ps, xi[None]), params)
        return pull(gi[None])[0]

    grads = list(vmap(one)(x, g))   # per-sample gradients of every parameter, (B, *p.shape)
    rho = x.new_zeros(x.shape[0])
    for block, fac in zip(stage.blocks, factors):
        part = [grads.pop(0) for _ in block.params]
        if fac is None:
            continue
        q_g, q_a, d = fac
        if isinstance(d, list):
            for gr, s in zip(part, d):
                rho += (gr.square() * s).flatten(1).sum(1)
            continue
        mat = as_matrix(block, part)
        mat = q_g.mT @ mat if q_g is not None else mat
        mat = mat @ q_a if q_a is not None else mat
        rho += (mat.square() * d).flatten(1).sum(1)
    return rho


def precondition(stage: Stage, factors: list, grads: list) -> list[torch.Tensor]:
    """P applied to a stage's parameter-shaped tensors (one per parameter, block order; zeros
    for a block held fixed, factors None)."""
    out, i = [], 0
    for block, fac in zip(stage.blocks, factors):
        n = len(block.params)
        out += (apply_p(block, fac, grads[i:i + n]) if fac is not None
                else [torch.zeros_like(g) for g in grads[i:i + n]])
        i += n
    return out


# -- the feedback sums ---------------------------------------------------------------------------
def feedback_grads(stage: Stage, x: torch.Tensor, xhat: torch.Tensor, g: torch.Tensor,
                   q_x: torch.Tensor = None,
                   sample_scale: torch.Tensor = None) -> list[torch.Tensor]:
    """(1/B) sum_i q_u^(i) (q_x^(i) . dx^(i)), the factorised Q_ux dx averaged over the batch.

    Args:
        stage: the stage (its parameters are the nominal u_t).
        x: nominal module inputs x_t, (B, ...).
        xhat: states of the additional forward pass, (B, ...); dx = xhat - x.
        g: per-sample cotangents at the module output, h-space image of z_{t+1}, (B, ...).
        q_x: optional ``h_x^T g`` (B, ...), the same cotangents pulled back to the module input
            (backpropagation already computed them); without it a Jacobian-vector product
            ``h_x dx`` is evaluated instead.
        sample_scale: optional per-sample factors (B,) of the terms, or one number (w_i / mu_i:
            the weight of the sample's value Hessian over its regularisation).

    Returns:
        one tensor per stage parameter (block order), shaped like it.
    """
    n = x.shape[0]
    params = None if stage.structured else [p.detach() for p in stage.params]
    if q_x is not None:   # c_i = q_x^(i) . (xhat_i - x_i), no temporary dx
        c = (sample_dots(q_x, xhat) - sample_dots(q_x, x)).to(x.dtype)
    else:
        dx = xhat - x
        if stage.structured:
            block = stage.blocks[0]
            dh = _linear_part(block, block.weight, dx)
        else:
            _, dh = jvp(lambda xx: stage.module_fn(params, xx), (x,), (dx,))
        del dx
        c = dh.mul_(g)
        c = (c if c.dim() == 2 else c.reshape(n, -1)).sum(1)
        del dh
    if isinstance(sample_scale, torch.Tensor) and sample_scale.dtype != c.dtype:
        sample_scale = sample_scale.to(c.dtype)
    if sample_scale is not None:
        c = c.mul_(sample_scale)
    c = c.div_(n).reshape((n,) + (1,) * (g.dim() - 1))
    cot = g * c                   # (g is not written: a user may hold the recorded gradients)
    if stage.structured:
        return _weight_grads(stage.blocks[0], x, cot)
    _, pull = vjp(lambda ps: stage.module_fn(ps, x), params)
    return list(pull(cot)[0])


@dataclass(eq=False)
class CompactStage:
    """A Conv2d stage kept as per-sample gradients instead of its inputs and cotangents.

    q_u^T P q_u needs the per-sample gradients (B, out, C k k [+1]) anyway, and they are
    smaller than the layer's input and output activations of a wide layer; keeping them (plus
    q_x and q_x . x) lets the step drop x and g as soon as the backward pass has gone through
    the layer (:func:`compact_conv` builds it there).

    Attributes:
        block: the Conv2d block.
        grads: per-sample gradients of the recorded cotangents g, (B, out, in[+1]).
        q_x: h_x^T g, the recorded gradients at the module input, (B, C, H, W).
        qx_dot_x: per-sample q_x . x, (B,) float64 (see :func:`sample_dots`).
    """

    block: Block
    grads: torch.Tensor
    q_x: torch.Tensor
    qx_dot_x: torch.Tensor

    @classmethod
    def build(cls, block: Block, x: torch.Tensor, g: torch.Tensor, q_x: torch.Tensor):
        n = x.shape[0]
        w = block.weight
        grads = x.new_empty(n, w.shape[0], w[0].numel() + block.has_bias)
        for _ in per_sample_grads(block, x, g, out=grads):
            pass
        return cls(block, grads, q_x, sample_dots(q_x, x))

    def batch_grads(self) -> list[torch.Tensor]:
        """The batch's weight (and bias) gradient: the per-sample gradients summed."""
        return from_matrix(self.block, self.grads.sum(0))

    def quad_form(self, factors) -> torch.Tensor:
        """q_u^T P q_u per sample for the recorded cotangents (scale by w^2 for w g)."""
        q_g, q_a, d = factors
        if isinstance(d, list):
            d = as_matrix(self.block, [s.expand_as(p) for s, p in zip(d, self.block.params)])
        rho = self.grads.new_empty(self.grads.shape[0])
        step = 16
        for i in range(0, len(rho), step):
            gr = self.grads[i:i + step]
            gr = q_g.mT @ gr if q_g is not None else gr
            gr = gr @ q_a if q_a is not None else gr
            rho[i:i + step] = (gr.square() * d).sum((1, 2))
        return rho

    def feedback(self, xhat: torch.Tensor, w, sample_scale: torch.Tensor = None
                 ) -> list[torch.Tensor]:
        """(1/B) sum_i c_i q_u^(i), c_i = q_x^(i) . dx^(i), for cotangents w_i g_i (each term
        times ``sample_scale[i]`` when given)."""
        n = xhat.shape[0]
        c = (sample_dots(self.q_x, xhat) - self.qx_dot_x).to(xhat.dtype)
        c = c * (w * w / n if isinstance(w, float) else w.square() / n)
        if sample_scale is not None:
            c = c * sample_scale.to(c.dtype)
        mat = torch.einsum("i,iab->ab", c, self.grads)
        return from_matrix(self.block, mat)


def conv2d_input_grad(m: torch.nn.Conv2d, shape, weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient of ``m``'s convolution with respect to its input of ``shape`` (B, C, H, W) for
    output cotangents ``g``: the transposed convolution, with the output padding that restores
    the rows and columns a stride drops. (``torch.nn.grad.conv2d_input`` computes the same through
    the backward kernel with an expanded dummy input, measured 4x slower on CPU.)"""
    pad = tuple(
        size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, out, s, p, d, k in zip(shape[2:], g.shape[2:], m.stride, m.padding, m.dilation,
                                         weight.shape[2:]))
    return F.conv_transpose2d(g, weight, None, m.stride, m.padding, pad, m.groups, m.dilation)


class _CompactConv(torch.autograd.Function):
    """A Conv2d whose backward forms the per-sample weight gradients (one grouped weight-gradient
    kernel, :func:`~nn_adapter.curvature.kron.per_sample_grads`) and returns their sum as the
    weight gradient, so the stage's :class:`CompactStage` costs no second weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, block, sink):
        m = block.module
        ctx.save_for_backward(x, weight)
        ctx.block, ctx.sink = block, sink
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        block = ctx.block
        m = block.module
        q_x = conv2d_input_grad(m, x.shape, weight, g)
        stage = CompactStage.build(block, x.detach(), g.detach(), q_x.detach())
        ctx.sink(stage)
        grads = stage.batch_grads()
        if block.has_bias:
            bias = grads[1]
        else:             # a bias the optimizer does not own
            bias = g.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return q_x, grads[0], bias, None, None


def compact_conv(block: Block, x: torch.Tensor, sink) -> torch.Tensor:
    """The block's Conv2d applied to ``x``; its backward hands the stage's :class:`CompactStage`
    (the recorded output cotangents as per-sample gradients) to ``sink`` and accumulates their
    sum as the weight gradient (the same gradient, summed in another order)."""
    return _CompactConv.apply(x, block.weight, block.module.bias, block, sink)


def tikhonov_grads(stage: Stage, x: torch.Tensor, dx: torch.Tensor, eps: float
                   ) -> list[torch.Tensor]:
    """(eps/B) sum_i h_u^(i)T h_x^(i) dx^(i): the Q_ux dx term of V_xx + eps I at the module's
    output (Algorithm 3, line 12, at the stage where it is added)."""
    params = [p.detach() for p in stage.params]
    _, hdx = jvp(lambda xx: stage.module_fn(params, xx), (x,), (dx,))
    _, pull = vjp(lambda ps: stage.module_fn(ps, x), params)
    return [t * (eps / x.shape[0]) for t in pull(hdx)[0]]


def second_order_grads(stage: Stage, x: torch.Tensor, dx: torch.Tensor, v_out: torch.Tensor
                       ) -> list[torch.Tensor]:
    """(1/B) sum_i V_x^(i) . h_ux^(i) dx^(i): the first-order change of the module's own gradient
    (g dx^T for a Linear layer), one double-backward through the module.

    Args:
        v_out: per-sample value gradients at the module output, (B, ...).
    """
    params = [p.detach().requires_grad_(True) for p in stage.params]
    with torch.enable_grad():
        _, hdx = jvp(lambda xx: stage.module_fn(params, xx), (x,), (dx,))
        total = (v_out * hdx).sum() / x.shape[0]
        grads = torch.autograd.grad(total, params, allow_unused=True)
    return [torch.zeros_like(p) if gr is None else gr.detach() for p, gr in zip(params, grads)]
