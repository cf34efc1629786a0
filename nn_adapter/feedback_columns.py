"""DDPNOpt's factorised feedback with an r-column terminal factor (Gauss-Newton exact or sampled).

With V_xx^T(i) = Y_T W_T Y_T^T (columns Y_T (C, r) per sample, see :mod:`nn_adapter.terminal`) and
the layer-wise Gauss-Newton expansion f = sigma o h, every value Hessian keeps the form
V_xx^{t+1}(i) = Y' W' Y'^T, where Y' = (d x_T / d x_{t+1})^T Y_T are the terminal columns pulled
back by backpropagation and W' is an (r, r) matrix per sample. With G = f_u^T Y' (m, r) and
Y = f_x^T Y' (the columns one stage further back)::

    Q_xx = Y W' Y^T,   Q_ux = G W' Y^T,   K^(i) dx = -P G W' (Y^T dx)
    V_xx = Q_xx - Q_ux^T P Q_ux = Y (W' - W' N W') Y^T,   N = G^T P G   (r, r)

so the stage's feedback is one weight gradient with cotangent sum_a e_a (f-space column a), with
e = W' (Y^T dx). Where a sample's local model [[Q_xx, Q_xu], [Q_ux, P^-1]] is not convex
(lambda_max(W'^1/2 N W'^1/2) > 1), its Q_uu is regularised to mu P^-1 (see :func:`next_weights`):
its gain is divided by mu and W = W' - W' N W' / mu stays positive semi-definite. W_T = I. With
one column this is the recursion of :mod:`nn_adapter.feedback` (W = S^2, mu = max(1, rho)).

The columns need one extra backward pass of r cotangents through the network (no weight
gradients): :func:`pull_columns`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import vjp, vmap

from .curvature.base import as_matrix
from .curvature.records import detached
from .curvature.kron import per_sample_grads
from .feedback import _weight_grads, sample_dots
from .module_stages import replay
from .stages import Stage

__all__ = ["StageColumns", "pull_columns", "column_quad_forms", "column_feedback",
           "next_weights"]


class StageColumns(NamedTuple):
    """The columns of one stage: at its module output (``g``, (B, r, *h)) and input (``q_x``)."""

    g: torch.Tensor
    q_x: torch.Tensor


def pull_columns(rec, stages: list, y_out: torch.Tensor) -> list:
    """Pull the terminal columns back through the model to every stage t >= 1.

    One forward pass of the model on the closure's inputs (replayed: same dropout masks, running
    statistics untouched) and one backward pass of the r columns as a batch of cotangents
    (``is_grads_batched``); no weight gradients.

    Args:
        rec: the :class:`~nn_adapter.module_stages.StageRecorder` of the closure.
        stages: the stages, in execution order.
        y_out: terminal columns at the model's output (B, r, ...).

    Returns:
        a list with ``None`` at t = 0 and a :class:`StageColumns` for t >= 1: the columns at the
        module's output (B, r, *h) and at its input through this module only (B, r, *x).
    """
    T = len(stages)
    want = {id(s.module): t for t, s in enumerate(stages) if t > 0}
    ins: dict = {}
    outs: dict = {}

    def pre(module, args):
        x = args[0].view_as(args[0])          # consumed by this module only
        ins[want[id(module)]] = x
        return (x,) + tuple(args[1:])

    def post(module, args, output):
        outs[want[id(module)]] = output

    handles = []
    for s in stages[1:]:
        handles += [s.module.register_forward_pre_hook(pre), s.module.register_forward_hook(post)]
    idx = sorted(want.values())
    y = y_out.transpose(0, 1)                                       # (r, B, ...)
    try:
        # backward inside the replay: a training-mode batch norm saved its running statistics,
        # which the replay restores in place only afterwards
        with torch.enable_grad(), replay(rec):
            out = rec.model(*rec.model_args, **(rec.model_kwargs or {}))
            # the gradient at a module's output is the column pulled back through everything
            # after it (skips included); at the view of its input, through the module alone
            pairs = [(t, v) for t in idx for v in (outs[t], ins[t])]
            live = [v for _, v in pairs if v.requires_grad]
            grads = iter(torch.autograd.grad(out, live, y.to(out.dtype), is_grads_batched=True,
                                             allow_unused=True, materialize_grads=True)
                         if live else ())
            got = [next(grads) if v.requires_grad else v.new_zeros((y.shape[0],) + v.shape)
                   for _, v in pairs]
    finally:
        for h in handles:
            h.remove()
    res: list = [None] * T
    for j, t in enumerate(idx):
        module = stages[t].module            # (in its parameters' dtype under autocast)
        res[t] = StageColumns(detached(got[2 * j].transpose(0, 1), module),
                              detached(got[2 * j + 1].transpose(0, 1), module))
    return res


def column_quad_forms(stage: Stage, factors: list, x: torch.Tensor, g: torch.Tensor,
                      chunk: int = 8) -> torch.Tensor:
    """N^(i) = G^(i)T P G^(i) per sample, (B, r, r), for G^(i) = h_u^T g^(i) (columns of g).

    Args:
        stage: the stage; factors: its blocks' ``(Q_G, Q_A, D)``.
        x: module inputs (B, ...); g: column cotangents at the module output (B, r, *h).
    """
    n, r = g.shape[:2]
    out = x.new_zeros(n, r, r)
    if stage.structured and stage.blocks[0].kind == "linear" and x.dim() == 2:
        block, (q_g, q_a, d) = stage.blocks[0], factors[0]
        gg = g @ q_g if q_g is not None else g                       # (B, r, out)
        xa = torch.cat([x, x.new_ones(n, 1)], 1) if block.has_bias else x
        if isinstance(d, list):
            dw = d[0].expand_as(block.weight)
            dmat = torch.cat([dw, d[1].expand_as(block.params[1])[:, None]], 1) \
                if block.has_bias else dw
        else:
            dmat = d
            xa = xa @ q_a if q_a is not None else xa
        s = xa.square() @ dmat.mT                                    # (B, out)
        return torch.einsum("iaj,ibj,ij->iab", gg, gg, s)
    for i0 in range(0, n, chunk):
        sl = slice(i0, min(n, i0 + chunk))
        xs = x[sl].repeat_interleave(r, 0)
        gs = g[sl].flatten(0, 1)
        rows = _whitened_rows(stage, factors, xs, gs).reshape(sl.stop - sl.start, r, -1)
        out[sl] = rows @ rows.mT
    return out


def _whitened_rows(stage: Stage, factors: list, x: torch.Tensor, g: torch.Tensor):
    """Per-sample gradients h_u^T g_i in P's eigenbasis times sqrt(D), flattened: (B, m)."""
    parts = []
    if stage.structured:
        block, (q_g, q_a, d) = stage.blocks[0], factors[0]
        if isinstance(d, list):
            d = as_matrix(block, [s.expand_as(p) for s, p in zip(d, block.params)])
            q_g = q_a = None
        grads = torch.cat([gr for _, gr in per_sample_grads(block, x, g, q_g, q_a)])
        return (grads * d.sqrt()).flatten(1)
    params = [p.detach() for p in stage.params]

    def one(xi, gi):
        _, pull = vjp(lambda ps: stage.module_fn(ps, xi[None]), params)
        return pull(gi[None])[0]

    grads = list(vmap(one)(x, g))
    for block, fac in zip(stage.blocks, factors):
        part = [grads.pop(0) for _ in block.params]
        if fac is None:           # a block held fixed (no gradient): no rows
            continue
        q_g, q_a, d = fac
        if isinstance(d, list):
            parts += [(gr * s.sqrt()).flatten(1) for gr, s in zip(part, d)]
            continue
        mat = as_matrix(block, part)
        mat = q_g.mT @ mat if q_g is not None else mat
        mat = mat @ q_a if q_a is not None else mat
        parts.append((mat * d.sqrt()).flatten(1))
    return torch.cat(parts, 1)


def next_weights(w_next, n: torch.Tensor):
    """The per-sample regularisation mu and W = W' - W' N W' / mu.

    The sample's local model [[Q_xx, Q_xu], [Q_ux, P^-1]] with Q_xx = Y W' Y^T, Q_ux = G W' Y^T is
    convex iff lambda_max(W'^1/2 N W'^1/2) <= 1 (N = G^T P G); mu = max(1, lambda_max) is the
    smallest multiple of P^-1 that makes it so (Levenberg-Marquardt per sample), its gain is
    K = -P Q_ux / mu and W is positive semi-definite by construction.

    Args:
        w_next: W': (B, r, r) or None (the identity); with one column a number or (B,) tensor.
        n: N: (B, r, r), or (B,) with one column (rho = q_u^T P q_u).

    Returns:
        ``(mu, W)``: (B,) and W shaped like ``w_next`` ((B, r, r) for None; (B,) with one column).
    """
    if n.dim() == 1:                          # one column: closed form
        lam = n * w_next
        mu = lam.clamp(min=1.0)
        return mu, (1.0 - lam / mu).clamp_(min=0.0).mul_(w_next)
    if w_next is None:
        lam = torch.linalg.eigvalsh(0.5 * (n + n.mT))[:, -1]
        mu = lam.clamp(min=1.0)
        w = torch.eye(n.shape[-1], dtype=n.dtype, device=n.device) - n / mu[:, None, None]
    else:
        evals, evecs = torch.linalg.eigh(0.5 * (w_next + w_next.mT))
        half = (evecs * evals.clamp(min=0.0).sqrt()[:, None, :]) @ evecs.mT
        m = half @ n @ half
        lam = torch.linalg.eigvalsh(0.5 * (m + m.mT))[:, -1]
        mu = lam.clamp(min=1.0)
        w = w_next - w_next @ n @ w_next / mu[:, None, None]
    return mu, 0.5 * (w + w.mT)


def column_feedback(stage: Stage, x: torch.Tensor, xhat: torch.Tensor, cols: StageColumns,
                    w_next, mu: torch.Tensor = None) -> list:
    """(1/B) sum_i Q_ux^(i) dx^(i) / mu_i = (1/B) h_u^T [sum_a e_a g_a], e = W' (Y^T dx) / mu.

    Args:
        w_next: W' of the stage output (B, r, r), or None (identity: the last stage).
        mu: the per-sample regularisation (B,), or None (1).
    """
    n, r = cols.q_x.shape[:2]
    c = torch.stack([sample_dots(cols.q_x[:, a], xhat) - sample_dots(cols.q_x[:, a], x)
                     for a in range(r)], 1).to(x.dtype)                 # (B, r)
    e = c if w_next is None else (w_next @ c[:, :, None])[:, :, 0]
    if mu is not None:
        e = e / mu[:, None]
    cot = torch.einsum("ia,ia...->i...", e / n, cols.g)
    if stage.structured:
        return _weight_grads(stage.blocks[0], x, cot)
    params = [p.detach() for p in stage.params]
    _, pull = vjp(lambda ps: stage.module_fn(ps, x), params)
    return list(pull(cot)[0])
