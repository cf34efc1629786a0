"""The curvature base (nn_adapter.curvature.base) against independent references: the matrix view
with leading batch dimensions against an explicit concatenation, P applied through its factors
against the dense matrix (Q_G x Q_A) diag(D) (Q_G x Q_A)^T, the feedback step u + k - P e of the
diagonal curvatures against torch.optim's own step minus a hand-computed P e, the number checks
at their boundaries, and the base class's loop over blocks. float64 throughout."""
import math

import pytest
import torch
from torch import nn

from nn_adapter.curvature import make_curvature
from nn_adapter.curvature.base import (Block, Curvature, apply_p, as_matrix, from_matrix,
                                       is_finite_number, is_fraction, l2_coefficient,
                                       with_weight_decay)

D = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("layer", ["linear", "linear-nobias", "conv2d"])
def test_matrix_view_with_leading_dims_is_the_explicit_concatenation(layer):
    g = _gen()
    mod = {"linear": nn.Linear(3, 4), "linear-nobias": nn.Linear(3, 4, bias=False),
           "conv2d": nn.Conv2d(2, 4, 3)}[layer].double()
    params = tuple(p for p in (mod.weight, mod.bias) if p is not None)
    block = Block("conv2d" if layer == "conv2d" else "linear", params, mod)
    lead = (2, 5)
    tensors = [torch.randn(*lead, *p.shape, generator=g, dtype=D) for p in params]
    mat = as_matrix(block, tensors)
    n_in = math.prod(mod.weight.shape[1:])
    expected = torch.empty(*lead, 4, n_in + len(params) - 1, dtype=D)
    for i in range(lead[0]):
        for j in range(lead[1]):
            expected[i, j, :, :n_in] = tensors[0][i, j].reshape(4, n_in)
            if len(params) == 2:
                expected[i, j, :, n_in] = tensors[1][i, j]
    assert torch.equal(mat, expected)
    back = from_matrix(block, mat)
    assert len(back) == len(tensors)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))
    # without leading dims, the same view as one slice of it
    assert torch.equal(as_matrix(block, [t[1, 3] for t in tensors]), expected[1, 3])


def _orthogonal(n, g):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q.contiguous()


@pytest.mark.parametrize("bases", ["both", "g-only", "a-only", "none"])
def test_apply_p_equals_the_dense_matrix(bases):
    g = _gen(3)
    mod = nn.Linear(3, 4).double()
    block = Block("linear", (mod.weight, mod.bias), mod)
    q_g = _orthogonal(4, g) if bases in ("both", "g-only") else None
    q_a = _orthogonal(4, g) if bases in ("both", "a-only") else None
    d = torch.rand(4, 4, generator=g, dtype=D) + 0.1
    eye = torch.eye(4, dtype=D)
    kron = torch.kron(q_g if q_g is not None else eye, q_a if q_a is not None else eye)
    dense = kron @ torch.diag(d.flatten()) @ kron.T        # row-major vec of the (4, 3+1) view
    grads = [torch.randn(4, 3, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D)]
    v = torch.cat([grads[0], grads[1][:, None]], dim=1).flatten()
    pw, pb = apply_p(block, (q_g, q_a, d), grads)
    assert torch.allclose(torch.cat([pw, pb[:, None]], dim=1).flatten(), dense @ v,
                          rtol=0, atol=1e-12)


def test_apply_p_with_per_parameter_scalings_multiplies_each():
    g = _gen(4)
    ts = [torch.randn(3, 2, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)]
    scales = [torch.rand(3, 2, generator=g, dtype=D), torch.tensor(0.3, dtype=D)]
    out = apply_p(None, (None, None, scales), ts)
    assert torch.equal(out[0], ts[0] * scales[0]) and torch.equal(out[1], ts[1] * 0.3)


# -- the feedback step u <- u + k - P e of the diagonal curvatures ----------------------------------
# (curvature, hyperparameters, torch optimizer, P by hand from torch's state after its step)
def _p_rmsprop(group, st):
    return group["lr"] / (st["square_avg"].sqrt() + group["eps"])


def _p_adam(group, st):
    b1, b2 = group["betas"]
    t = float(st["step"])
    return group["lr"] / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["eps"])


def _p_sgd(group, st):
    return torch.full_like(st["momentum_buffer"], group["lr"])


CASES = {
    # momentum > 0: k is not -P d, the step is param_direction's (P e subtracted on its own)
    "rmsprop-momentum": ("rmsprop", dict(lr=0.01, momentum=0.9, alpha=0.9, eps=1e-3,
                                         weight_decay=0.1), torch.optim.RMSprop, _p_rmsprop),
    # k = -P d: the effective-gradient path, P (d + e)
    "rmsprop": ("rmsprop", dict(lr=0.01, alpha=0.9, eps=1e-3), torch.optim.RMSprop, _p_rmsprop),
    "adam": ("adam", dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1),
             torch.optim.Adam, _p_adam),
    "sgd-momentum": ("identity", dict(lr=0.1, momentum=0.9, weight_decay=0.1), torch.optim.SGD,
                     _p_sgd),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("via", ["apply", "direction_with"])
def test_feedback_step_is_torch_step_minus_p_e(case, via):
    name, hp, torch_opt, p_of = CASES[case]
    g = _gen(5)
    params = [torch.randn(3, 2, generator=g, dtype=D), torch.randn(4, generator=g, dtype=D)]
    curv = make_curvature(name)
    group = dict(curv.defaults, **hp)
    ref = [p.clone().requires_grad_() for p in params]
    opt = torch_opt(ref, **hp)
    ours = [p.clone() for p in params]
    block = Block("diagonal", tuple(ours))          # two parameters in one block
    states = [{}, {}]
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
        extra = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
        for r, gr in zip(ref, grads):
            r.grad = gr.clone()
        opt.step()
        with torch.no_grad():
            p_e = [p_of(opt.param_groups[0], opt.state[r]) * e for r, e in zip(ref, extra)]
            for r, pe in zip(ref, p_e):
                r.sub_(pe)                        # torch's step, then - P e
        curv.update(block, grads, group, states)
        factors = curv.factors(block, group, states)
        if via == "apply":
            curv.apply(block, grads, group, states, factors, extra)
        else:
            for p, k in zip(ours, curv.direction_with(block, grads, group, states, factors,
                                                      extra)):
                p.add_(k)
        for r, p in zip(ref, ours):
            assert torch.allclose(p, r.detach(), rtol=0, atol=1e-13), f"step {step}"


# -- number checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, kwargs, ok", [
    (0.0, {}, True), (2, {}, True), (torch.tensor([0.5]), {}, True),
    (torch.ones(2), {}, False),                 # more than one element: not a number
    (torch.zeros(0), {}, False), (torch.tensor(1 + 1j), {}, False), (True, {}, False),
    ("1", {}, False), (None, {}, False), (math.inf, {}, False), (math.nan, {}, False),
    (-1e-12, {}, False), (1.0, dict(minimum=1.0), True), (1.0, dict(minimum=1.0, strict=True),
                                                        False),
    (0.0, dict(strict=True), False), (1e-300, dict(strict=True), True),
])
def test_is_finite_number(value, kwargs, ok):
    assert is_finite_number(value, **kwargs) is ok


@pytest.mark.parametrize("value, closed, ok", [
    (0.0, False, True), (0.999, False, True), (1.0, False, False), (1.0, True, True),
    (1.0 + 1e-12, True, False), (-0.0, True, True), (-1e-12, True, False), (True, True, False),
])
def test_is_fraction(value, closed, ok):
    assert is_fraction(value, closed) is ok


def test_validation_of_a_tensor_hyperparameter_is_a_value_error():
    curv = make_curvature("identity")
    with pytest.raises(ValueError, match="invalid lr"):
        curv.validate(dict(curv.defaults, lr=torch.ones(2)))
    curv.validate(dict(curv.defaults, lr=torch.tensor(0.1)))
    curv.validate(dict(curv.defaults, lr=0.1, momentum=0.5, dampening=1.0))   # closed at 1
    with pytest.raises(ValueError, match="invalid dampening"):
        curv.validate(dict(curv.defaults, lr=0.1, dampening=1.5))


def test_l2_coefficient_and_with_weight_decay():
    p, grad = torch.tensor([2.0, -1.0], dtype=D), torch.tensor([0.5, 0.25], dtype=D)
    assert l2_coefficient({}) == 0.0 and l2_coefficient(dict(weight_decay=0.1)) == 0.1
    assert l2_coefficient(dict(weight_decay=0.1, decoupled_weight_decay=True)) == 0.0
    assert with_weight_decay(p, grad, {}) is grad
    assert with_weight_decay(p, grad, dict(weight_decay=0.1, decoupled_weight_decay=True)) is grad
    for wd in (0.1, 1.0):
        out = with_weight_decay(p, grad, dict(weight_decay=wd))
        assert out is not grad and torch.equal(out, grad + wd * p)


# -- the base class's loop over blocks --------------------------------------------------------------
class _Counting(Curvature):
    """A curvature that reads records (as EKFAC) but keeps the base class's update_all."""

    needs_records = True

    def __init__(self):
        self.calls = []

    def update(self, block, grads, group, states, record=None):
        self.calls.append((block, record))


def test_base_update_all_updates_each_block_and_refuses_a_reduce_it_cannot_do():
    curv = _Counting()
    blocks = [Block("diagonal", (torch.zeros(2),)), Block("diagonal", (torch.zeros(3),))]
    rec = object()
    curv.update_all(blocks, [[None], [None]], {}, [[{}], [{}]], rec)
    assert curv.calls == [(blocks[0], rec), (blocks[1], rec)]
    with pytest.raises(NotImplementedError, match="update_all"):
        curv.update_all(blocks, [[None], [None]], {}, [[{}], [{}]], rec, reduce=lambda ts: ts)
