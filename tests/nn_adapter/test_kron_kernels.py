"""nn_adapter/curvature/kron.py, one helper at a time, against independent references: the
patches against the module's own forward (F.linear / F.conv2d), the output-gradient positions
against a permute, the per-sample gradients against autograd on one sample at a time, the
chunks against their documented memory bound.

Shapes are chosen so that no two of batch, positions, input and output sizes coincide (a
transposed or wrongly indexed dimension then changes a shape or a value).
"""
import math

import pytest
import torch
from torch import nn

from nn_adapter.curvature import find_blocks
from nn_adapter.curvature import kron
from nn_adapter.curvature.kron import chunks, patches, per_sample_grads, positions

DT = torch.float64

_CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), padding=(0, 2), dilation=(1, 2)),
          dict(kernel_size=3, stride=2), dict(kernel_size=(2, 1), stride=(1, 2), bias=False)]


def _linear(bias, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 6, bias=bias).double()


def _conv(kw, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(3, 5, **kw).double()


def _inputs(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _weight_matrix(m):
    w = m.weight.detach().reshape(m.weight.shape[0], -1)
    return torch.cat([w, m.bias.detach()[:, None]], 1) if m.bias is not None else w


def _as_positions(m, y):
    """A module's output as (B, L, out), written without kron: a Linear's leading dimensions
    after the first are its positions, a convolution's are its H' W' pixels (row-major)."""
    if isinstance(m, nn.Conv2d):
        return y.permute(0, 2, 3, 1).reshape(y.shape[0], y.shape[2] * y.shape[3], y.shape[1])
    return y.reshape(y.shape[0], math.prod(y.shape[1:-1]), y.shape[-1])


def _autograd_per_sample(m, x, g):
    """Per-sample gradient matrices [dW | db] of <g_i, m(x_i)>, one sample at a time."""
    params = [p for p in m.parameters()]
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(m(x[i:i + 1]), params, g[i:i + 1])
        w = grads[0].reshape(grads[0].shape[0], -1)
        out.append(torch.cat([w, grads[1][:, None]], 1) if len(grads) > 1 else w)
    return torch.stack(out)


def _orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed),
                                       dtype=DT))
    return q


def _cases():
    """(module, input shape): Linear on (B, in), (B, L, in) and (B, L1, L2, in), with and without
    a bias; Conv2d with stride, padding, dilation, rectangular kernels, without a bias."""
    cases = []
    for bias in (True, False):
        for shape in ((7, 4), (7, 3, 4), (7, 2, 5, 4)):
            cases.append((f"linear{len(shape)}d-bias{bias}", lambda b=bias: _linear(b), shape))
    for i, kw in enumerate(_CONVS):
        cases.append((f"conv{i}", lambda kw=kw: _conv(kw), (7, 3, 8, 9)))
    return cases


_CASES = _cases()
_IDS = [c[0] for c in _CASES]


@pytest.mark.parametrize("name, make, shape", _CASES, ids=_IDS)
def test_patches_times_the_weight_matrix_is_the_module_output(name, make, shape):
    """a_l [W | b]^T = y_l at every position: the patches (with the ones column of a bias) are the
    module's input as the weight sees it."""
    m = make()
    block = find_blocks(m)[0]
    x = _inputs(shape)
    with torch.no_grad():
        y = _as_positions(m, m(x))
        a = patches(block, x)
    assert a.shape == (shape[0], y.shape[1], _weight_matrix(m).shape[1])
    assert torch.allclose(a @ _weight_matrix(m).T, y, rtol=0, atol=1e-12)
    if m.bias is not None:
        assert torch.equal(a[..., -1], torch.ones_like(a[..., -1]))
    if isinstance(m, nn.Linear):          # the input itself, position by position
        assert torch.equal(a[..., :m.in_features], x.reshape(shape[0], -1, m.in_features))


@pytest.mark.parametrize("name, make, shape", _CASES, ids=_IDS)
def test_positions_are_the_output_gradients_per_position(name, make, shape):
    m = make()
    block = find_blocks(m)[0]
    with torch.no_grad():
        g = torch.randn_like(m(_inputs(shape)))
    got = positions(block, g)
    assert torch.equal(got, _as_positions(m, g))


def _block_cotangent_and_reference(make, shape):
    """The module's block, an input batch, a random output cotangent g and autograd's per-sample
    gradients of <g_i, m(x_i)>."""
    m = make()
    x = _inputs(shape)
    with torch.no_grad():
        g = torch.randn_like(m(x))
    return find_blocks(m)[0], x, g, _autograd_per_sample(m, x, g)


@pytest.mark.parametrize("name, make, shape", _CASES, ids=_IDS)
@pytest.mark.parametrize("bases", [False, True])
def test_per_sample_grads_match_autograd_on_each_sample(name, make, shape, bases):
    """sum_l g_l a_l^T of each sample equals autograd's gradient of <g_i, m(x_i)> (the bias
    column last), rotated to Q_G^T G_i Q_A when bases are given; the slices cover the batch in
    order."""
    block, x, g, ref = _block_cotangent_and_reference(make, shape)
    q_g = q_a = None
    if bases:
        q_g, q_a = _orthogonal(ref.shape[1], 2), _orthogonal(ref.shape[2], 3)
        ref = q_g.T @ ref @ q_a
    parts = list(per_sample_grads(block, x, g, q_g, q_a))
    assert [i for sl, _ in parts for i in range(x.shape[0])[sl]] == list(range(x.shape[0]))
    got = torch.cat([G for _, G in parts])
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, make, shape", _CASES, ids=_IDS)
def test_per_sample_grads_into_a_buffer_fill_every_sample(name, make, shape):
    """``out=``: the (B, out, in[+1]) buffer receives every sample's gradient, bias column
    included (it starts as NaN, so a column left unwritten shows)."""
    block, x, g, ref = _block_cotangent_and_reference(make, shape)
    buf = torch.full(ref.shape, float("nan"), dtype=DT)
    for sl, G in per_sample_grads(block, x, g, out=buf):
        assert torch.equal(G, buf[sl])
    assert torch.allclose(buf, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [16, 17, 32, 33])
def test_convolution_gradients_in_sample_chunks_cover_the_batch_once(n):
    """Batches of one, several and an exact multiple of the convolution's sample chunks: each
    sample in exactly one non-empty slice, in order, with its own gradient."""
    m = _conv(_CONVS[2])
    block = find_blocks(m)[0]
    x = _inputs((n, 3, 5, 6))
    with torch.no_grad():
        g = torch.randn_like(m(x))
    parts = list(per_sample_grads(block, x, g))
    assert all(G.shape[0] == len(range(n)[sl]) > 0 for sl, G in parts)
    assert [i for sl, _ in parts for i in range(n)[sl]] == list(range(n))
    got = torch.cat([G for _, G in parts])
    assert torch.allclose(got, _autograd_per_sample(m, x, g), rtol=0, atol=1e-12)


def _per_sample_elements(m, x):
    """The unfolded elements one sample is charged with: its input, times the kernel area."""
    area = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
    return x[0].numel() * area


@pytest.mark.parametrize("limit", [1, 40, 100, 1000, 10 ** 6])
@pytest.mark.parametrize("name, make, shape", _CASES, ids=_IDS)
def test_chunks_are_the_largest_that_fit_the_element_limit(monkeypatch, limit, name, make, shape):
    """Consecutive non-empty slices covering the batch; each holds as many samples as fit in the
    limit (at least one), all but the last exactly that many."""
    monkeypatch.setattr(kron, "_CHUNK_ELEMS", limit)
    m = make()
    block = find_blocks(m)[0]
    x = _inputs(shape)
    fit = max(1, min(shape[0], limit // _per_sample_elements(m, x)))
    slices = list(chunks(block, x))
    assert [i for sl in slices for i in range(shape[0])[sl]] == list(range(shape[0]))
    sizes = [len(range(shape[0])[sl]) for sl in slices]
    assert sizes[:-1] == [fit] * (len(sizes) - 1) and 0 < sizes[-1] <= fit


def test_chunks_default_limit_keeps_a_small_batch_whole_and_splits_a_large_one():
    block = find_blocks(_linear(True))[0]
    assert list(chunks(block, torch.zeros(300, 4, dtype=DT))) == [slice(0, 300)]
    big = torch.zeros(600, 1 << 11, dtype=torch.float32)       # 2^20 elements hold 512 samples
    assert list(chunks(find_blocks(nn.Linear(1 << 11, 2))[0], big)) == [slice(0, 512),
                                                                        slice(512, 600)]


@pytest.mark.parametrize("module", [nn.Linear(4, 6), nn.Conv2d(3, 5, 3)])
def test_chunks_of_an_empty_batch_are_none(module):
    x = torch.zeros((0, 4) if isinstance(module, nn.Linear) else (0, 3, 8, 9))
    assert list(chunks(find_blocks(module)[0], x)) == []
