"""The kernels of nn_adapter/terminal.py on their own, against independent computations: the
Gauss-Newton factor on outputs of any shape (autograd Hessians), the Monte-Carlo column (its
second moment over many draws), the projected weight g^T H g / |g|^4, the loss recognition at its
edges (two classes, half precision, a batch of one) and the resolver's memory."""
import math

import pytest
import torch
from torch import nn

from nn_adapter.terminal import LossResolver, detect_loss, loss_hessian_factor, terminal_factor


def _ce_hessian(o):
    """Hessian of softmax cross-entropy at logits o (C,), label-independent: diag(p) - p p^T."""
    return torch.func.hessian(lambda z: nn.functional.cross_entropy(z[None], torch.tensor([0])))(o)


def _mse_hessian(o):
    """Hessian of the per-sample mean squared error at o (any shape), flattened (d, d)."""
    t = torch.zeros_like(o)
    h = torch.func.hessian(lambda z: nn.functional.mse_loss(z, t))(o)
    return h.reshape(o.numel(), o.numel())


@pytest.mark.parametrize("n", [1, 3])
def test_gauss_newton_columns_on_any_output_shape(n):
    """Columns A (B, r, *out[1:]) with sum_c a_c a_c^T = the per-sample loss Hessian, a batch of
    one and an output with two trailing dimensions (mean squared error) included."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(n, 4, dtype=torch.float64, generator=g)
    a = loss_hessian_factor("cross_entropy", out)
    assert a.shape == (n, 4, 4)
    for i in range(n):
        assert torch.allclose(a[i].T @ a[i], _ce_hessian(out[i]), atol=1e-12)
    out = torch.randn(n, 2, 3, dtype=torch.float64, generator=g)
    a = loss_hessian_factor("mse", out)
    assert a.shape == (n, 6, 2, 3)
    for i in range(n):
        m = a[i].reshape(6, 6)
        assert torch.allclose(m.T @ m, _mse_hessian(out[i]), atol=1e-12)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sampled_column_has_the_gauss_newton_hessian_as_second_moment(loss):
    """E[y y^T] = H for the one-column Monte-Carlo factor, per sample (many draws of a fixed
    generator; tolerance a few standard errors); cross-entropy columns are p - e_yhat exactly."""
    g = torch.Generator().manual_seed(1)
    shape = (2, 3) if loss == "cross_entropy" else (2, 2, 2)
    out = torch.randn(*shape, dtype=torch.float64, generator=g)
    draws = 4000
    acc = 0.0
    for _ in range(draws // 200):
        big = out.repeat(200, *([1] * (out.dim() - 1)))
        y, w = terminal_factor("sampled", loss, big, torch.zeros_like(big), generator=g)
        assert w is None and y.shape == (big.shape[0], 1) + tuple(out.shape[1:])
        y = y.reshape(200, out.shape[0], -1)
        if loss == "cross_entropy":
            hit = torch.softmax(big, 1).reshape(200, out.shape[0], -1) - y
            assert torch.allclose(hit.sum(-1), torch.ones(200, out.shape[0], dtype=hit.dtype))
            assert torch.allclose(hit.max(-1).values, torch.ones_like(hit[..., 0]))
        acc = acc + torch.einsum("kbi,kbj->bij", y, y)
    moment = acc / draws
    for i in range(out.shape[0]):
        h = _ce_hessian(out[i]) if loss == "cross_entropy" else _mse_hessian(out[i])
        assert (moment[i] - h).abs().max() < 4 * h.abs().max() / math.sqrt(draws) * 3


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_projected_weight_is_the_rayleigh_quotient_over_the_norm_squared(loss):
    """W_i = g_i^T H_i g_i / |g_i|^4 (outputs with two trailing dimensions for mean squared
    error), and 0 for a sample whose gradient is zero."""
    g = torch.Generator().manual_seed(2)
    shape = (4, 5) if loss == "cross_entropy" else (4, 2, 3)
    out = torch.randn(*shape, dtype=torch.float64, generator=g)
    grad = torch.randn(*shape, dtype=torch.float64, generator=g)
    grad[2] = 0.0
    y, w = terminal_factor("projected", loss, out, grad.clone())
    assert y is None and w.shape == (4,)
    for i in range(4):
        v = grad[i].reshape(-1)
        h = _ce_hessian(out[i]) if loss == "cross_entropy" else _mse_hessian(out[i])
        expected = 0.0 if i == 2 else float(v @ h @ v) / float(v @ v) ** 2
        assert float(w[i]) == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert terminal_factor("gradient", loss, out, grad) == (None, None)


def _grad(loss_fn, out):
    out = out.detach().requires_grad_(True)
    g, = torch.autograd.grad(loss_fn(out), out)
    return out.detach(), g


def test_loss_recognition_at_its_edges():
    """Two classes are recognised (one class, a 3-D output, mismatched shapes are not);
    half-precision gradients are recognised with their own tolerance; B and C are not confused."""
    y = torch.tensor([0, 1, 1, 0, 1])
    out = torch.randn(5, 2, dtype=torch.float64)
    assert detect_loss(*_grad(lambda o: nn.functional.cross_entropy(o, y), out)) == "cross_entropy"
    assert detect_loss(*_grad(lambda o: nn.functional.cross_entropy(o, y, reduction="sum"),
                              out)) == "sum"
    one = torch.randn(5, 1, dtype=torch.float64)
    assert detect_loss(one, torch.zeros_like(one)) is None
    out3 = torch.randn(5, 2, 3, dtype=torch.float64)
    y3 = torch.randint(0, 2, (5, 3))
    assert detect_loss(*_grad(lambda o: nn.functional.cross_entropy(o, y3), out3)) is None
    o, g = _grad(lambda o: nn.functional.cross_entropy(o, y), out)
    assert detect_loss(o, g[:4]) is None
    # a batch of 3 with 6 classes: the factor B is the batch size, not the number of classes
    y6 = torch.tensor([5, 0, 2])
    out6 = torch.randn(3, 6, dtype=torch.float64)
    assert detect_loss(*_grad(lambda o: nn.functional.cross_entropy(o, y6), out6)) == "cross_entropy"
    # bfloat16: the gradient's rounding (about 4e-3 relative) needs the wider tolerance
    big = torch.randn(64, 10, generator=torch.Generator().manual_seed(4)) * 3
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(5))
    o16, g16 = _grad(lambda o: nn.functional.cross_entropy(o, labels), big.to(torch.float16))
    assert detect_loss(o16, g16) == "cross_entropy"
    # and the wider tolerance still separates a mean squared error
    om, gm = _grad(lambda o: nn.functional.mse_loss(o, torch.zeros_like(o)), big.to(torch.float16))
    assert detect_loss(om, gm) is None


def test_resolver_remembers_cross_entropy_only():
    """An unrecognised loss is checked again at the next step (not settled); cross-entropy once
    recognised is settled; a summed cross-entropy is refused, but not for a batch of one (where
    the sum is the mean)."""
    res = LossResolver("auto")
    out = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    with pytest.warns(RuntimeWarning, match="not softmax cross-entropy"):
        assert res(*_grad(lambda o: nn.functional.mse_loss(o, torch.zeros_like(o)), out)) == "mse"
    assert not res.settled
    assert res(*_grad(lambda o: nn.functional.cross_entropy(o, y), out)) == "cross_entropy"
    assert res.settled and res.loss == "cross_entropy"
    fresh = LossResolver("auto")
    with pytest.raises(ValueError, match="reduction='sum'"):
        fresh(*_grad(lambda o: nn.functional.cross_entropy(o, y, reduction="sum"), out))
    single = LossResolver("cross_entropy")
    o1, g1 = _grad(lambda o: nn.functional.cross_entropy(o, y[:1], reduction="sum"), out[:1])
    assert single(o1, g1) == "cross_entropy"


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sampled_column_of_a_batch_of_one(loss):
    """A batch of one gets one column of the output's shape (mean squared error: sqrt(2/d)
    times a standard normal draw, d the size of one sample's output)."""
    out = torch.randn(1, 2, 3, dtype=torch.float64) if loss == "mse" else torch.randn(1, 4)
    g = torch.Generator().manual_seed(6)
    y, _ = terminal_factor("sampled", loss, out, torch.zeros_like(out), generator=g)
    assert y.shape == (1, 1) + tuple(out.shape[1:])
    if loss == "mse":
        eps = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(6))
        assert torch.allclose(y[:, 0], eps * math.sqrt(2 / 6), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_small_gradient_of_another_loss_is_not_taken_for_cross_entropy(dtype):
    """softmax(out) - B grad is close to a probability vector whenever the gradient is small (a
    regression near its fit): only a cross-entropy's rows sum to zero relative to their size.
    Before, such a batch was recognised as cross-entropy, and settled for the rest of training."""
    g = torch.Generator().manual_seed(6)
    out = torch.randn(8, 3, generator=g, dtype=torch.float64).to(dtype)
    near = out + 1e-6 * torch.randn(8, 3, generator=g, dtype=torch.float64).to(dtype)
    for loss in (lambda o: nn.functional.mse_loss(o, near),
                 lambda o: nn.functional.huber_loss(o, near, delta=0.5)):
        o, grad = _grad(loss, out)
        assert 0 < grad.abs().max() < 1e-6
        assert detect_loss(o, grad) is None
    assert detect_loss(out, torch.zeros_like(out)) is None       # no gradient: nothing to recognise
    res = LossResolver("auto")
    with pytest.warns(RuntimeWarning, match="not softmax cross-entropy"):
        assert res(*_grad(lambda o: nn.functional.mse_loss(o, near), out)) == "mse"
    assert not res.settled


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("classes", [3, 100])
def test_a_confident_cross_entropy_is_still_recognised(dtype, classes):
    """Rows of B grad = p - e_y of norm ~1e-6 (the model nearly sure of each label), with
    labels, label smoothing and soft targets: still cross-entropy, in float32 too."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, classes, (16,), generator=g)
    out = (torch.randn(16, classes, generator=g, dtype=torch.float64)
           + 20.0 * nn.functional.one_hot(y, classes)).to(dtype)
    soft = torch.softmax(out.double() * 0.999, 1).to(dtype)
    for loss in (lambda o: nn.functional.cross_entropy(o, y),
                 lambda o: nn.functional.cross_entropy(o, y, label_smoothing=0.1),
                 lambda o: nn.functional.cross_entropy(o, soft)):
        o, grad = _grad(loss, out)
        assert detect_loss(o, grad) == "cross_entropy"
    o, grad = _grad(lambda o: nn.functional.cross_entropy(o, y), out)
    assert grad.abs().max() * 16 < 1e-4            # (small: the relative check is what decides)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_squared_error_is_told_by_its_value(dtype):
    """With the loss value, a squared error summed over the batch -> "sum" (outputs (B, 2, 3));
    torch's mean squared error, one summed over the output only (c = 1), Huber, L1 and an MSE
    plus a penalty -> None; without the value the sum is not told either."""
    g = torch.Generator().manual_seed(2)
    out = torch.randn(6, 2, 3, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randn(6, 2, 3, generator=g, dtype=torch.float64).to(dtype)
    cases = [(None, lambda o: nn.functional.mse_loss(o, t)),
             ("sum", lambda o: nn.functional.mse_loss(o, t, reduction="sum")),
             (None, lambda o: (o - t).square().flatten(1).sum(1).mean())]
    for expect, fn in cases:
        o = out.clone().requires_grad_(True)
        loss = fn(o)
        grad, = torch.autograd.grad(loss, o)
        assert detect_loss(o.detach(), grad, float(loss.detach())) == expect
        assert detect_loss(o.detach(), grad) is None
    for fn in (lambda o: nn.functional.huber_loss(o, t, delta=0.5), lambda o: nn.functional.l1_loss(o, t),
               lambda o: nn.functional.mse_loss(o, t) + 1e-3 * o.square().sum()):
        o = out.clone().requires_grad_(True)
        loss = fn(o)
        grad, = torch.autograd.grad(loss, o)
        assert detect_loss(o.detach(), grad, float(loss.detach())) is None
    res = LossResolver("mse")
    o = out.clone().requires_grad_(True)
    loss = nn.functional.mse_loss(o, t, reduction="sum")
    with pytest.raises(ValueError, match="reduction='sum'"):
        res(o.detach(), torch.autograd.grad(loss, o)[0], value=float(loss.detach()))
