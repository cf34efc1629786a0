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


def _conv_grads_grouped(m, x: torch.Tensor, g: torch.Tensor, out=None,
                        bias: bool = False) -> torch.Tensor:
    """Per-sample weight gradients of a Conv2d without an unfold, (b, out, C kh kw [+1]) (the
    bias column, with ``bias``: the block's bias, not the module's, which may be frozen or in no
    param group, is left for the caller to fill).

    The b samples are the b groups of one grouped convolution (channels of all samples side by
    side), whose weight gradient is the per-sample weight gradients stacked: one call of the
    backend's own weight-gradient kernel (about the cost of the batch's weight gradient).
    """
    b, c = x.shape[:2]
    o = g.shape[1]
    w = torch.nn.grad.conv2d_weight(x.reshape(1, b * c, *x.shape[2:]),
                                    (b * o, c) + tuple(m.kernel_size),
                                    g.reshape(1, b * o, *g.shape[2:]), m.stride, m.padding,
                                    m.dilation, b).reshape(b, o, -1)
    if out is None:
        return torch.cat([w, w.new_empty(b, o, 1)], 2) if bias else w
    out[:, :, :w.shape[2]] = w
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
    if block.kind == "conv2d":
        for sl in _sample_slices(x.shape[0], 16):
            grads = _conv_grads_grouped(m, x[sl], g[sl], out[sl] if out is not None else None,
                                        block.has_bias)
            if block.has_bias:
                torch.sum(g[sl], (2, 3), out=grads[:, :, -1])
            yield sl, _rotate(grads, q_g, q_a)
        return
    for sl in chunks(block, x):
        gg = positions(block, g[sl])                          # (b, L, out)
        grads = gg.transpose(1, 2) @ x[sl].reshape(gg.shape[0], -1, x.shape[-1])  # (b, out, in)
        if block.has_bias:
            grads = torch.cat([grads, gg.sum(1).unsqueeze(2)], dim=2)
        if out is not None:
            out[sl] = grads
        yield sl, _rotate(grads, q_g, q_a)


def _rotate(grads, q_g, q_a):
    if q_a is not None:
        grads = grads @ q_a
    if q_g is not None:
        grads = q_g.mT @ grads
    return grads
