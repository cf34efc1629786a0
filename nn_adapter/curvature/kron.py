"""Per-sample views of Linear and Conv2d blocks: input patches, output gradients, gradients.

For a structured block the gradient of one sample's loss is ``sum_l g_l a_l^T`` over positions l
(one position for a Linear layer on (B, in) inputs, H'W' for a convolution), with ``a_l`` the input
patch (a trailing 1 when the block has a bias) and ``g_l`` the output gradient. These helpers
produce the pieces in sample chunks so that no (B, L, C k k) unfold of a whole batch is held.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .base import Block

__all__ = ["patches", "positions", "chunks", "per_sample_grads"]

_CHUNK_ELEMS = 1 << 20  # elements of one chunk's unfolded patches (cache-sized)


def patches(block: Block, x: torch.Tensor) -> torch.Tensor:
    """Input patches ``a`` of a block, (B, L, in[+1]) (ones appended when the block has a bias)."""
    m = block.module
    if block.kind == "linear":
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        a = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    if block.has_bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def positions(block: Block, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as (B, L, out)."""
    if block.kind == "linear":
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.flatten(2).transpose(1, 2)


def chunks(block: Block, x: torch.Tensor) -> Iterator[slice]:
    """Sample slices small enough to unfold at once."""
    n = x.shape[0]
    per_sample = max(1, x[:1].numel())
    if block.kind == "conv2d":
        per_sample *= block.module.kernel_size[0] * block.module.kernel_size[1]
    size = max(1, min(n, _CHUNK_ELEMS // per_sample))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _sample_slices(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _conv_grads_shifted(m, x: torch.Tensor, g: torch.Tensor, out=None) -> torch.Tensor:
    """Per-sample weight gradients of a stride-1 Conv2d without an unfold, (b, out, C kh kw [+1])
    (the bias column, if any, is left for the caller to fill).

    With the input padded and flattened row by row (row length Wp), the input patch entry at
    kernel offset (u, v) of every output position is one contiguous slice of length Ho * Wp
    (the Wp - Wo extra columns of each row meet zero output gradients). So each of the kh * kw
    offsets is one batched matrix product (out, Ho Wp) x (Ho Wp, C), on views.
    """
    (ph, pw), (dh, dw), (kh, kw) = m.padding, m.dilation, m.kernel_size
    b, c = x.shape[:2]
    ho, wo = g.shape[2:]
    wp = x.shape[3] + 2 * pw
    extra = -(-((kw - 1) * dw) // wp) if kw > 1 else 0
    xp = F.pad(x, (pw, pw, ph, ph + extra)).flatten(2)          # (b, C, rows * Wp)
    ge = F.pad(g, (0, wp - wo)).flatten(2)                      # (b, out, Ho * Wp)
    length = ho * wp
    n_w = c * kh * kw
    if out is None:
        out = x.new_empty(b, g.shape[1], n_w + (m.bias is not None))
    view = out[:, :, :n_w].unflatten(2, (c, kh * kw))
    for u in range(kh):
        for v in range(kw):
            off = u * dh * wp + v * dw
            view[..., u * kw + v] = torch.bmm(ge, xp[:, :, off:off + length].transpose(1, 2))
    return out


def per_sample_grads(block: Block, x: torch.Tensor, g: torch.Tensor, q_g=None, q_a=None,
                     out: torch.Tensor = None) -> Iterator[tuple[slice, torch.Tensor]]:
    """Per-sample gradient matrices ``sum_l g_l a_l^T`` in the bases (Q_G, Q_A), chunk by chunk.

    Args:
        block: a structured block.
        x: recorded inputs of the module, (B, ...).
        g: output gradients of the module, (B, ...) (already scaled as the caller wants).
        q_g, q_a: optional orthogonal bases (out, out) and (in[+1], in[+1]).
        out: optional (B, out, in[+1]) buffer that receives all chunks (no bases then).

    Yields:
        ``(slice, G)`` with G of shape (b, out, in[+1]) for the samples in ``slice``.
    """
    m = block.module
    shifted = block.kind == "conv2d" and tuple(m.stride) == (1, 1)
    for sl in (_sample_slices(x.shape[0], 16) if shifted else chunks(block, x)):
        if shifted:
            dest = out[sl] if out is not None else None
            grads = _conv_grads_shifted(m, x[sl], g[sl], dest)
            if block.has_bias:
                torch.sum(g[sl], (2, 3), out=grads[:, :, -1])
            yield sl, _rotate(grads, q_g, q_a)
            continue
        else:
            gg = positions(block, g[sl])                      # (b, L, out)
            if block.kind == "linear":
                a = x[sl].reshape(gg.shape[0], -1, x.shape[-1])
            else:
                a = F.unfold(x[sl], m.kernel_size, m.dilation, m.padding, m.stride)
                a = a.transpose(1, 2)
            grads = gg.transpose(1, 2) @ a                    # (b, out, in)
            bias = gg.sum(1) if block.has_bias else None
        if bias is not None:
            grads = torch.cat([grads, bias.unsqueeze(2)], dim=2)
        if out is not None:
            out[sl] = grads
        yield sl, _rotate(grads, q_g, q_a)


def _rotate(grads, q_g, q_a):
    if q_a is not None:
        grads = grads @ q_a
    if q_g is not None:
        grads = q_g.mT @ grads
    return grads
