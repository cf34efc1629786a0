"""The kernels of nn_adapter/feedback.py and nn_adapter/feedback_columns.py, one stage at a time,
against a dense oracle: per-sample gradients and Jacobians from plain autograd on one sample, the
inverse curvature P as an explicit matrix (diag(D) in the Kronecker basis Q_G (x) Q_A), and the
documented formulas evaluated with those matrices.

Each path of the kernels is reached: the rank-one Linear path (2-D inputs) and the general one
(3-D inputs), Conv2d (stride, padding, dilation), a module without a closed form (LayerNorm) and a
container with a Linear block and a parameter of its own (one block held fixed), diagonal and
eigenbasis factors, sample counts that are not a multiple of the chunks.
"""
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

from nn_adapter.curvature.base import Block, find_blocks
from nn_adapter.feedback import (CompactStage, compact_conv, feedback_grads, precondition,
                                 quad_form, sample_dots, second_order_grads, tikhonov_grads)
from nn_adapter.feedback_columns import (StageColumns, column_feedback, column_quad_forms,
                                         next_weights)
from nn_adapter.stages import Stage

DT = torch.float64


class Gated(nn.Module):
    """A container stage: a Linear block and a parameter of its own (a diagonal block)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return torch.tanh(self.inner(x)) * self.gate + x


def _module(kind, bias=True):
    torch.manual_seed(11)
    if kind in ("linear", "linear3d"):
        m = nn.Linear(3, 2, bias=bias)
    elif kind == "conv":
        m = nn.Conv2d(2, 3, 2, stride=2, padding=1, dilation=1, bias=bias)
    elif kind == "conv_dil":
        m = nn.Conv2d(1, 2, 3, stride=1, padding=2, dilation=2, bias=bias)
    elif kind == "layernorm":
        m = nn.LayerNorm(3)
        with torch.no_grad():                     # not the identity at initialisation
            m.weight.copy_(torch.tensor([0.7, 1.2, -0.4]))
            m.bias.copy_(torch.tensor([0.1, -0.3, 0.2]))
    else:
        m = Gated()
    return m.to(DT)


def _stage(kind, bias=True):
    m = _module(kind, bias)
    return Stage(m, "s", find_blocks(m))


def _inputs(stage, kind, n, seed=0, r=None):
    """Module inputs x (B, ...) and cotangents g at its output (B, ...) or columns (B, r, ...)."""
    gen = torch.Generator().manual_seed(seed)
    shape = {"linear": (3,), "linear3d": (4, 3), "conv": (2, 5, 4), "conv_dil": (1, 5, 5),
             "layernorm": (3,), "gated": (3,)}[kind]
    x = torch.randn(n, *shape, generator=gen, dtype=DT)
    with torch.no_grad():
        out = stage.module(x)
    lead = (n,) if r is None else (n, r)
    g = torch.randn(*lead, *out.shape[1:], generator=gen, dtype=DT)
    return x, g


# -- the oracle ----------------------------------------------------------------------------------
def sample_grads(stage, xi, gi):
    """grad_u [gi . h(xi; u)] of one sample, by autograd on a batch of one (block order)."""
    params = stage.params
    out = stage.module(xi[None])
    return [t.detach() for t in torch.autograd.grad((out * gi[None]).sum(), params)]


def block_vector(block, tensors):
    """The block's tensors flattened in its matrix view [W | b], row by row."""
    if not block.structured:
        return tensors[0].reshape(-1)
    out = block.weight.shape[0]
    cols = [tensors[0].reshape(out, -1)]
    if block.has_bias:
        cols.append(tensors[1].reshape(out, 1))
    return torch.cat(cols, 1).reshape(-1)


def stage_vector(stage, tensors):
    vs, i = [], 0
    for block in stage.blocks:
        k = len(block.params)
        vs.append(block_vector(block, tensors[i:i + k]))
        i += k
    return torch.cat(vs)


def block_P(block, fac):
    """The explicit (m, m) inverse curvature of one block in the order of :func:`block_vector`."""
    size = sum(p.numel() for p in block.params)
    if fac is None:
        return torch.zeros(size, size, dtype=DT)
    q_g, q_a, d = fac
    if isinstance(d, list):
        return torch.diag(torch.cat([block_vector(block, [s.expand_as(p) for s, p in
                                                          zip(d, block.params)])]))
    out, cols = d.shape
    a = torch.eye(out, dtype=DT) if q_g is None else q_g
    b = torch.eye(cols, dtype=DT) if q_a is None else q_a
    k = torch.kron(a.T.contiguous(), b.T.contiguous())  # vec(Q_G^T V Q_A) = kron(Q_G^T, Q_A^T) vec(V), row-major
    return k.T @ torch.diag(d.reshape(-1)) @ k


def stage_P(stage, factors):
    return torch.block_diag(*[block_P(b, f) for b, f in zip(stage.blocks, factors)])


def _orth(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))[0]


def _factors(stage, form, seed=1):
    """Curvature factors of every block: ``"diag"`` (per-parameter scalings, some broadcast),
    ``"eigen"`` (Q_G, Q_A, D), ``"left"`` / ``"right"`` (one basis), ``"plain"`` (D alone),
    ``"fixed"`` / ``"fixed_last"`` (the first / last block held fixed, eigen factors for the
    others)."""
    gen = torch.Generator().manual_seed(seed)
    facs = []
    for j, block in enumerate(stage.blocks):
        if (form == "fixed" and j == 0) or (form == "fixed_last" and j == len(stage.blocks) - 1):
            facs.append(None)
            continue
        if not block.structured or form == "diag":
            d = []
            for k, p in enumerate(block.params):
                shape = p.shape if k == 0 else ()          # a scalar scaling broadcast
                d.append(0.2 + torch.rand(shape, generator=gen, dtype=DT))
            facs.append((None, None, d))
            continue
        out = block.weight.shape[0]
        cols = block.weight[0].numel() + block.has_bias
        q_g = _orth(out, gen) if form in ("eigen", "left", "fixed", "fixed_last") else None
        q_a = _orth(cols, gen) if form in ("eigen", "right", "fixed", "fixed_last") else None
        facs.append((q_g, q_a, 0.2 + torch.rand(out, cols, generator=gen, dtype=DT)))
    return facs


def jac_x(stage, xi):
    """The module's Jacobian at one sample with respect to its input, (h, x) flattened."""
    params = [p.detach() for p in stage.params]
    j = jacrev(lambda xx: stage.module_fn(params, xx[None])[0])(xi)
    out_numel = j.numel() // xi.numel()
    return j.reshape(out_numel, xi.numel())


def _close(got, want, tol=1e-10):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= tol * scale, (a, b)


KINDS = ["linear", "linear3d", "conv", "conv_dil", "layernorm", "gated"]
STRUCTURED = ["linear", "linear3d", "conv", "conv_dil"]


# -- sample_dots -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, chunk, width", [(37, None, 4), (5, 2, 4), (3, 16, 4), (1, 1, 4),
                                             (5, None, 2 ** 15 + 3)])   # (default chunks of 2 samples)
def test_sample_dots_are_the_per_sample_dot_products_in_float64(n, chunk, width):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(n, 2, 3, width, generator=gen)
    x = torch.randn(n, 2, 3, width, generator=gen)
    got = sample_dots(q, x, chunk) if chunk is not None else sample_dots(q, x)
    want = torch.stack([(q[i].double() * x[i].double()).sum() for i in range(n)])
    assert got.dtype == torch.float64 and got.shape == (n,)
    assert torch.allclose(got, want, rtol=1e-14, atol=1e-14)
    assert torch.equal(q, q.clone())          # the inputs are not written


def factor_cases(test):
    """Parametrise ``test`` over every stage kind x factor form x with / without bias (:func:`_case`)."""
    for mark in (pytest.mark.parametrize("bias", [True, False]),
                 pytest.mark.parametrize("form", ["diag", "eigen", "left", "right", "plain",
                                                  "fixed", "fixed_last"]),
                 pytest.mark.parametrize("kind", KINDS)):
        test = mark(test)
    return test


def _case(kind, form, bias):
    """The stage of a factor_cases case (skipped where the combination does not exist)."""
    if not bias and kind in ("layernorm", "gated"):
        pytest.skip("no bias option")
    if form.startswith("fixed") and kind in STRUCTURED:
        pytest.skip("a structured stage has one block")
    return _stage(kind, bias)


# -- quad_form and precondition --------------------------------------------------------------------
@factor_cases
def test_quad_form_is_q_u_P_q_u_per_sample(kind, form, bias):
    stage = _case(kind, form, bias)
    x, g = _inputs(stage, kind, 5)
    facs = _factors(stage, form)
    P = stage_P(stage, facs)
    want = torch.stack([(lambda v: v @ P @ v)(stage_vector(stage, sample_grads(stage, x[i], g[i])))
                        for i in range(5)])
    got = quad_form(stage, facs, x, g)
    assert torch.allclose(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv", "gated"])
@pytest.mark.parametrize("form", ["diag", "eigen", "fixed", "fixed_last"])
def test_precondition_is_the_dense_P(kind, form):
    if form.startswith("fixed") and kind != "gated":
        pytest.skip("a structured stage has one block")
    stage = _stage(kind)
    facs = _factors(stage, form)
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=gen, dtype=DT) for p in stage.params]
    got = precondition(stage, facs, v)
    assert [t.shape for t in got] == [p.shape for p in stage.params]
    assert torch.allclose(stage_vector(stage, got), stage_P(stage, facs) @ stage_vector(stage, v),
                          rtol=1e-11, atol=1e-12)


# -- feedback_grads, tikhonov_grads, second_order_grads --------------------------------------------
def _dx(x, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(x.shape, generator=gen, dtype=DT)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [None, "tensor", "float32", "number"])
@pytest.mark.parametrize("given_qx", [False, True])
def test_feedback_grads_are_the_mean_of_q_u_times_q_x_dx(kind, scale, given_qx):
    stage = _stage(kind)
    n = 5
    x, g = _inputs(stage, kind, n)
    xhat = x + _dx(x)
    jx = [jac_x(stage, x[i]) for i in range(n)]
    q_x = torch.stack([(jx[i].T @ g[i].reshape(-1)).reshape(x.shape[1:]) for i in range(n)])
    s = {None: torch.ones(n, dtype=DT), "tensor": torch.linspace(0.5, 2.0, n, dtype=DT),
         "float32": torch.linspace(0.5, 2.0, n), "number": torch.full((n,), 0.7, dtype=DT)}[scale]
    arg = {None: None, "tensor": s, "float32": s, "number": 0.7}[scale]
    want = [torch.zeros_like(p) for p in stage.params]
    for i in range(n):
        c = g[i].reshape(-1) @ (jx[i] @ (xhat[i] - x[i]).reshape(-1))
        for w, v in zip(want, sample_grads(stage, x[i], g[i])):
            w += float(s[i]) * c * v / n
    g0 = g.clone()
    got = feedback_grads(stage, x, xhat, g, q_x if given_qx else None, arg)
    _close(got, want)
    assert torch.equal(g, g0)                # the recorded gradients are not written


@pytest.mark.parametrize("kind", KINDS)
def test_tikhonov_grads_are_eps_over_B_h_u_T_h_x_dx(kind):
    stage = _stage(kind)
    n, eps = 4, 0.3
    x, _ = _inputs(stage, kind, n)
    dx = _dx(x)
    want = [torch.zeros_like(p) for p in stage.params]
    for i in range(n):
        hdx = (jac_x(stage, x[i]) @ dx[i].reshape(-1)).reshape(stage.module(x[:1]).shape[1:])
        for w, v in zip(want, sample_grads(stage, x[i], hdx)):
            w += eps * v / n
    _close(tikhonov_grads(stage, x, dx, eps), want)


@pytest.mark.parametrize("kind", KINDS)
def test_second_order_grads_are_d_du_of_v_dot_h_x_dx(kind):
    """(1/B) sum_i d/du [v_i . h_x(x_i; u) dx_i]: the derivative of the exact Jacobian-vector
    product by central differences in every parameter entry."""
    stage = _stage(kind)
    n = 3
    x, v = _inputs(stage, kind, n, seed=2)
    dx = _dx(x)
    base = [p.detach().clone() for p in stage.params]

    def value(ps):
        total = 0.0
        for i in range(n):
            j = jacrev(lambda xx: stage.module_fn(ps, xx[None])[0])(x[i])
            j = j.reshape(-1, x[i].numel())
            total += float(v[i].reshape(-1) @ (j @ dx[i].reshape(-1)))
        return total / n

    h = 1e-5
    want = []
    for k, p in enumerate(base):
        d = torch.zeros_like(p)
        for idx in range(p.numel()):
            up = [q.clone() for q in base]
            dn = [q.clone() for q in base]
            up[k].view(-1)[idx] += h
            dn[k].view(-1)[idx] -= h
            d.view(-1)[idx] = (value(up) - value(dn)) / (2 * h)
        want.append(d)
    got = second_order_grads(stage, x, dx, v)
    _close(got, want, 1e-7)
    if kind == "linear":           # closed form: V_x dx^T for the weight, nothing for the bias
        assert torch.allclose(got[0], v.T @ dx / n, rtol=1e-12, atol=1e-14)
        assert torch.equal(got[1], torch.zeros_like(got[1]))


# -- compact convolutions --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "conv_dil"])
@pytest.mark.parametrize("bias", [True, False])
def test_compact_stage_holds_the_per_sample_gradients_and_their_forms(kind, bias):
    stage = _stage(kind, bias)
    block = stage.blocks[0]
    n = 20                               # more than the chunk of 16 samples
    x, g = _inputs(stage, kind, n, seed=4)
    gen = torch.Generator().manual_seed(9)
    q_x = torch.randn(x.shape, generator=gen, dtype=DT)
    cs = CompactStage.build(block, x, g, q_x)
    per = [sample_grads(stage, x[i], g[i]) for i in range(n)]
    vecs = torch.stack([stage_vector(stage, t) for t in per])
    assert torch.allclose(cs.grads.reshape(n, -1), vecs, rtol=1e-12, atol=1e-13)
    assert torch.allclose(cs.qx_dot_x, (q_x * x).flatten(1).sum(1), rtol=1e-13, atol=1e-13)
    _close(cs.batch_grads(), [sum(t[k] for t in per) for k in range(len(block.params))])
    for form in ("diag", "eigen", "left", "right"):
        facs = _factors(stage, form)
        P = stage_P(stage, facs)
        want = torch.einsum("ia,ab,ib->i", vecs, P, vecs)
        assert torch.allclose(cs.quad_form(facs[0]), want, rtol=1e-11, atol=1e-12)
    xhat = x + _dx(x)
    c = ((xhat - x) * q_x).flatten(1).sum(1)
    s = torch.linspace(0.5, 1.5, n, dtype=DT)
    w_t = torch.linspace(0.2, 1.1, n, dtype=DT)
    for w, scale, weight in ((0.7, None, torch.full((n,), 0.49, dtype=DT)),
                             (w_t, None, w_t.square()), (w_t, s.float(), w_t.square() * s)):
        want = [sum(weight[i] * c[i] * per[i][k] for i in range(n)) / n
                for k in range(len(block.params))]
        _close(cs.feedback(xhat, w, scale), want, 1e-6 if scale is not None else 1e-10)


@pytest.mark.parametrize("owned", ["bias", "no bias", "bias not owned", "bias frozen"])
def test_compact_conv_is_the_convolution_and_sinks_the_compact_stage(owned):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=owned != "no bias").to(DT)
    twin = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=owned != "no bias").to(DT)
    twin.load_state_dict(conv.state_dict())
    if owned == "bias frozen":
        conv.bias.requires_grad_(False)
        twin.bias.requires_grad_(False)
    block = (Block("conv2d", (conv.weight,), conv) if owned == "bias not owned"
             else find_blocks(conv)[0])
    x = torch.randn(4, 2, 7, 6, dtype=DT, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    got = []
    y = compact_conv(block, x, got.append)
    y2 = twin(x2)
    assert torch.allclose(y, y2, rtol=1e-13, atol=1e-13)
    g = torch.randn(y.shape, dtype=DT)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-12, atol=1e-13)
    for p, q in zip(conv.parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-13)
    (cs,) = got
    assert cs.block is block and torch.allclose(cs.q_x, x2.grad, rtol=1e-12, atol=1e-13)
    stage = Stage(conv, "c", [block])
    vecs = torch.stack([stage_vector(stage, sample_grads(stage, x[i].detach(), g[i]))
                        for i in range(4)])
    assert torch.allclose(cs.grads.reshape(4, -1), vecs, rtol=1e-12, atol=1e-13)


# -- the r-column terminal feedback ----------------------------------------------------------------
def _column_vectors(stage, x, g):
    n, r = g.shape[:2]
    return [[stage_vector(stage, sample_grads(stage, x[i], g[i, a])) for a in range(r)]
            for i in range(n)]


@factor_cases
def test_column_quad_forms_are_G_T_P_G_per_sample(kind, form, bias):
    stage = _case(kind, form, bias)
    n, r = 11, 3                       # not a multiple of the chunk of 8 samples
    x, g = _inputs(stage, kind, n, r=r)
    facs = _factors(stage, form)
    P = stage_P(stage, facs)
    want = torch.stack([(lambda G: G @ P @ G.T)(torch.stack(vs))
                        for vs in _column_vectors(stage, x, g)])
    got = column_quad_forms(stage, facs, x, g)
    assert got.shape == (n, r, r)
    assert torch.allclose(got, want, rtol=1e-11, atol=1e-12)
    for chunk in (2, 11):                # more chunks; one chunk of exactly the batch
        assert torch.allclose(column_quad_forms(stage, facs, x, g, chunk=chunk), want,
                              rtol=1e-11, atol=1e-12)


def test_column_quad_forms_of_one_column_are_quad_form():
    for kind in KINDS:
        stage = _stage(kind)
        x, g = _inputs(stage, kind, 4)
        facs = _factors(stage, "eigen")
        assert torch.allclose(column_quad_forms(stage, facs, x, g[:, None])[:, 0, 0],
                              quad_form(stage, facs, x, g), rtol=1e-11, atol=1e-12)


def _psd(n, r, gen, rank=None):
    a = torch.randn(n, r, rank or r, generator=gen, dtype=DT)
    return a @ a.mT


@pytest.mark.parametrize("with_w", [False, True])
def test_next_weights_convexify_each_sample_with_the_smallest_mu(with_w):
    gen = torch.Generator().manual_seed(7)
    n, r = 6, 3
    N = _psd(n, r, gen)
    N[:2] *= 1e-3                                    # two convex samples: mu = 1
    N[2:] *= 10.0                                    # the others not
    W1 = _psd(n, r, gen, rank=2) + 0.1 * torch.eye(r, dtype=DT) if with_w else None
    mu, W = next_weights(W1, N)
    wp = W1 if with_w else torch.eye(r, dtype=DT).expand(n, r, r)
    # lambda_max(W'^1/2 N W'^1/2) = the largest eigenvalue of W' N (similar matrices)
    lam = torch.linalg.eigvals(wp @ N).real.max(1).values
    assert torch.allclose(mu, lam.clamp(min=1.0), rtol=1e-10)
    assert (mu[:2] == 1.0).all() and (mu[2:] > 1.0).all()
    assert torch.allclose(W, wp - wp @ N @ wp / mu[:, None, None], rtol=1e-10, atol=1e-12)
    assert torch.allclose(W, W.mT, rtol=0, atol=0)
    assert (torch.linalg.eigvalsh(W) >= -1e-10).all()
    # the local model [[W', W' G^T], [G W', mu P^-1]] with N = G^T P G is PSD at mu, not below
    # (Schur complement: W' - W' N W' / mu)
    for m, bad in ((mu, False), (mu * 0.9, True)):
        ev = torch.linalg.eigvalsh(wp - wp @ N @ wp / m[:, None, None])[:, 0]
        assert ((ev[2:] < -1e-8).all() if bad else (ev >= -1e-10).all())


def test_next_weights_of_one_column_are_the_closed_form():
    n = torch.tensor([0.2, 0.5, 2.0, 4.0], dtype=DT)
    w = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=DT)
    for w_next in (w, 0.8):
        mu, W = next_weights(w_next, n)
        lam = n * w_next
        assert torch.allclose(mu, torch.clamp(lam, min=1.0), rtol=1e-15)
        assert torch.allclose(W, (1 - lam / torch.clamp(lam, min=1.0)) * w_next, rtol=1e-14,
                              atol=1e-15)
    mu, W = next_weights(w, n)
    assert mu.tolist() == [1.0, 1.5, 1.0, 8.0] and torch.allclose(
        W, torch.tensor([0.8, 0.0, 0.0, 0.0], dtype=DT), atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_w, with_mu", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_column_feedback_is_the_mean_of_G_W_Y_T_dx_over_mu(kind, with_w, with_mu):
    stage = _stage(kind)
    n, r = 5, 2
    x, g = _inputs(stage, kind, n, r=r)
    gen = torch.Generator().manual_seed(8)
    q_x = torch.randn((n, r) + x.shape[1:], generator=gen, dtype=DT)
    xhat = x + _dx(x)
    W1 = _psd(n, r, gen) if with_w else None
    mu = torch.linspace(1.0, 3.0, n, dtype=DT) if with_mu else None
    c = torch.stack([((xhat - x) * q_x[:, a]).flatten(1).sum(1) for a in range(r)], 1)
    e = c if W1 is None else torch.einsum("iab,ib->ia", W1, c)
    if mu is not None:
        e = e / mu[:, None]
    want = [torch.zeros_like(p) for p in stage.params]
    for i in range(n):
        for a in range(r):
            for w, v in zip(want, sample_grads(stage, x[i], g[i, a])):
                w += e[i, a] * v / n
    got = column_feedback(stage, x, xhat, StageColumns(g, q_x), W1, mu)
    _close(got, want)
    if kind == "linear" and not with_w:       # one column: the rank-one feedback_grads
        one = column_feedback(stage, x, xhat, StageColumns(g[:, :1], q_x[:, :1]), None, mu)
        ref = feedback_grads(stage, x, xhat, g[:, 0], q_x[:, 0],
                             None if mu is None else 1.0 / mu)
        _close(one, ref)


def test_oracle_block_P_matches_the_documented_factored_form():
    """The oracle itself: v^T P v with the Kronecker matrix is sum (Q_G^T V Q_A)^2 D."""
    gen = torch.Generator().manual_seed(4)
    q_g, q_a = _orth(3, gen), _orth(4, gen)
    d = torch.rand(3, 4, generator=gen, dtype=DT)
    V = torch.randn(3, 4, generator=gen, dtype=DT)
    lin = nn.Linear(3, 3).to(DT)
    block = find_blocks(lin)[0]
    P = block_P(block, (q_g, q_a, d))
    assert math.isclose(float(V.reshape(-1) @ P @ V.reshape(-1)),
                        float(((q_g.T @ V @ q_a) ** 2 * d).sum()), rel_tol=1e-12)
    assert torch.allclose(P, P.T, atol=1e-14)


class Mul(nn.Module):
    """A stage called with a second argument: x * w * k."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x, k=1.0):
        return x * self.w * k


class SkipNet(nn.Module):
    """A skip past the second Linear, a Linear reading the data (its input needs no gradient),
    a stage called with a second argument, dropout between stages, and a keyword argument of
    the model's call."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.l4 = nn.Linear(3, 4)
        self.mul = Mul(4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x, gain=1.0):
        a = torch.tanh(self.l1(x))
        b = torch.tanh(self.l2(a)) + torch.tanh(self.l4(x))
        return gain * self.l3(self.drop(self.mul(a + b, 3.0)))


def test_pull_columns_are_the_terminal_columns_pulled_back_through_the_graph():
    """At a stage's output: J^T y with J the Jacobian of the model output with respect to that
    output (skip, dropout mask and the call's keyword argument included); at its input: through
    the module alone (zero for a module reading the data, whose input needs no gradient)."""
    from nn_adapter.feedback_columns import pull_columns
    from nn_adapter.module_stages import StageRecorder, module_stages

    torch.manual_seed(0)
    net = SkipNet().to(DT)
    mods = [net.l1, net.l2, net.l4, net.mul, net.l3]
    n, r = 4, 3
    x = torch.randn(n, 3, dtype=DT)
    with StageRecorder(net, mods, mods) as rec:
        net(x, gain=2.5).sum().backward()
    stages = module_stages(net, find_blocks(net), rec.order)
    assert [s.module for s in stages] == mods
    y = torch.randn(n, r, 2, dtype=DT)
    state = torch.get_rng_state()
    cols = pull_columns(rec, stages, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(cols) == 5 and cols[0] is None

    for t in (1, 2, 3, 4):
        module = mods[t]

        def through(delta, module=module):
            # the model with delta added at the module's output, the closure's dropout mask
            h = module.register_forward_hook(lambda m, a, out: out + delta)
            try:
                torch.set_rng_state(rec.rng[0])
                return net(x, gain=2.5)
            finally:
                h.remove()
                torch.set_rng_state(state)

        with torch.no_grad():
            h_out = module(rec.inputs[module], *((3.0,) if module is net.mul else ()))
        J = jacrev(through)(torch.zeros_like(h_out))          # (B, 2, B, h)
        want_out = torch.einsum("iakd,ira->irkd", J, y).diagonal(0, 0, 2).movedim(-1, 0)
        assert cols[t].g.shape == (n, r) + h_out.shape[1:]
        assert torch.allclose(cols[t].g, want_out, rtol=1e-12, atol=1e-13)
        assert cols[t].q_x.shape == (n, r) + rec.inputs[module].shape[1:]
        if module is net.l4:
            assert torch.equal(cols[t].q_x, torch.zeros_like(cols[t].q_x))
            continue
        if module is net.mul:                  # d(x w k)/dx = diag(w k), k = 3
            want = cols[t].g * (net.mul.w.detach() * 3.0)
            assert torch.allclose(cols[t].q_x, want, rtol=1e-12, atol=1e-13)
            continue
        want_in = torch.stack([torch.stack([
            (jac_x(stages[t], rec.inputs[module][i]).T @ cols[t].g[i, a].reshape(-1))
            for a in range(r)]) for i in range(n)])
        assert torch.allclose(cols[t].q_x, want_in.reshape(cols[t].q_x.shape), rtol=1e-12,
                              atol=1e-13)
