"""feedback=False: DDPNOpt is exactly its base optimizer, update for update, in float64."""
import pytest
import torch
from torch import nn

from nn_adapter import EKFAC, DDPNOpt
from nn_adapter.curvature.optimizer import CurvatureOptimizer

STEPS = 6


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(),
                         nn.Linear(6, 3)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()


def _data(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(10, *shape, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (10,), generator=g) for _ in range(STEPS)]
    return xs, ys


def _run(net, opt, xs, ys):
    for x, y in zip(xs, ys):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return torch.cat([p.detach().flatten() for p in net.parameters()])


CASES = [
    ("identity", dict(), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ("identity", dict(momentum=0.9, weight_decay=1e-2),
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2)),
    ("identity", dict(momentum=0.8, dampening=0.3),
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.3)),
    ("identity", dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("identity", dict(weight_decay=0.05), lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.05)),
    ("rmsprop", dict(alpha=0.9, eps=1e-6, weight_decay=1e-3),
     lambda ps: torch.optim.RMSprop(ps, lr=0.1, alpha=0.9, eps=1e-6, weight_decay=1e-3)),
    ("rmsprop", dict(momentum=0.5, centered=True),
     lambda ps: torch.optim.RMSprop(ps, lr=0.1, momentum=0.5, centered=True)),
    ("adam", dict(betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-2),
     lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-2)),
    ("adam", dict(amsgrad=True), lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True)),
    ("adam", dict(betas=(0.8, 0.99), weight_decay=0.1, decoupled_weight_decay=True),
     lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.8, 0.99), weight_decay=0.1)),
    ("adam", dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
     lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1, amsgrad=True,
                                 decoupled_weight_decay=True)),
]


@pytest.mark.parametrize("make", [_net, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature,hp,torch_opt", CASES)
def test_feedback_off_equals_torch_optimizer(make, curvature, hp, torch_opt):
    xs, ys = _data((5,) if make is _net else (2, 5, 5))
    ref_net, our_net = make(), make()
    ref = _run(ref_net, torch_opt(ref_net.parameters()), xs, ys)
    ours = _run(our_net, DDPNOpt(our_net, lr=0.1, curvature=curvature, feedback=False, **hp),
                xs, ys)
    start = torch.cat([p.detach().flatten() for p in make().parameters()])
    assert (ref - start).abs().max() > 1e-3          # the steps did move the parameters
    assert (ours - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("make", [_net, _cnn], ids=["mlp", "cnn"])
def test_feedback_off_ekfac_equals_ekfac(make):
    xs, ys = _data((5,) if make is _net else (2, 5, 5))
    hp = dict(damping=1e-2, stat_decay=0.9, eigen_update_freq=3, factor_update_freq=2)
    a_net, b_net = make(), make()
    a = _run(a_net, EKFAC(a_net, lr=0.05, **hp), xs, ys)
    b = _run(b_net, DDPNOpt(b_net, lr=0.05, curvature="ekfac", feedback=False, **hp), xs, ys)
    start = torch.cat([p.detach().flatten() for p in make().parameters()])
    assert (a - start).abs().max() > 1e-3
    assert (a - b).abs().max() <= 1e-10


def _run_without_closure(net, opt, xs, ys):
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("make", [_net, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature,hp,torch_opt", CASES)
def test_params_style_base_optimizer_equals_torch_optimizer(make, curvature, hp, torch_opt):
    """The base of DDPNOpt(feedback=False), built from params and stepped without a closure."""
    xs, ys = _data((5,) if make is _net else (2, 5, 5))
    ref_net, our_net = make(), make()
    ref = _run(ref_net, torch_opt(ref_net.parameters()), xs, ys)
    ours = _run_without_closure(
        our_net, CurvatureOptimizer(our_net.parameters(), curvature, 0.1, model=our_net, **hp),
        xs, ys)
    assert (ours - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("make", [_net, _cnn], ids=["mlp", "cnn"])
def test_params_style_ekfac_without_closure_equals_ddpnopt_ekfac(make):
    xs, ys = _data((5,) if make is _net else (2, 5, 5))
    hp = dict(damping=1e-2, stat_decay=0.9, eigen_update_freq=3, factor_update_freq=2)
    a_net, b_net = make(), make()
    a = _run_without_closure(a_net, EKFAC(a_net.parameters(), lr=0.05, model=a_net, **hp), xs, ys)
    b = _run(b_net, DDPNOpt(b_net, lr=0.05, curvature="ekfac", feedback=False, **hp), xs, ys)
    assert (a - b).abs().max() <= 1e-10
