"""The feedback pass's max-pooling (nn_adapter.module_stages.fast_pooling): the same numbers as
torch's max_pool2d, only where its windows tile the input and no gradient is taken, and DDPNOpt's
steps bit for bit those with torch's kernel."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nn_adapter import DDPNOpt, minibatch
from nn_adapter.module_stages import _tiling_max, fast_pooling


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (3, 5, 6), (1, 2, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiling_max_is_max_pool2d(k, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x.view(-1)[::7] = -float("inf")
    x.view(-1)[3] = float("nan")
    x.view(-1)[5] = float("inf")
    ref, out = F.max_pool2d(x, k), _tiling_max(x, k)
    assert out.shape == ref.shape
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(0.0), ref.nan_to_num(0.0))


def test_fast_pooling_swaps_only_tiling_pools_without_gradients_and_restores_them():
    tiling = [nn.MaxPool2d(2), nn.MaxPool2d((3, 3), stride=3)]
    other = [nn.MaxPool2d(2, stride=1), nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
             nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(2, return_indices=True), nn.MaxPool2d((2, 3))]
    net = nn.Sequential(*tiling, nn.Sequential(*other))
    x = torch.randn(2, 3, 12, 12)
    with fast_pooling(net):
        assert all("forward" in m.__dict__ for m in tiling)
        assert not any("forward" in m.__dict__ for m in other)
        with torch.no_grad():
            for m in tiling:
                assert torch.equal(m(x), type(m).forward(m, x))
        xg = x.clone().requires_grad_()
        tiling[0](xg).sum().backward()           # with gradients: torch's kernel (its tie rule)
        ref = x.clone().requires_grad_()
        F.max_pool2d(ref, 2).sum().backward()
        assert torch.equal(xg.grad, ref.grad)
    assert not any("forward" in m.__dict__ for m in tiling + other)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3)).double()


def test_ddpnopt_steps_are_bit_for_bit_those_with_torchs_pooling(monkeypatch):
    x = torch.randn(8, 1, 13, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3

    def run():
        net = _cnn()
        opt = DDPNOpt(net.parameters(), model=net, lr=0.01, curvature="adam")
        for _ in range(3):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss.detach()
            opt.step(closure)
        return [p.detach().clone() for p in net.parameters()]
    fast = run()
    monkeypatch.setattr(minibatch, "fast_pooling", lambda model: contextlib.nullcontext())
    plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert not all(torch.equal(a, b) for a, b in zip(fast, [p.detach() for p in _cnn().parameters()]))
