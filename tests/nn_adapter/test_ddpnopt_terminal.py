"""DDPNOpt's terminal value Hessian: loss recognition, options, refusal of non-finite steps and the
diagnostics (the factorised-vs-dense checks are in test_ddpnopt_feedback.py)."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from nn_adapter import DDPNOpt
from nn_adapter.terminal import detect_loss, loss_hessian_factor
from nn_adapter.training import make_closure


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 3)).to(dtype)


def _data(dtype=torch.float64, n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("kwargs,name", [
    (dict(terminal_hessian="exact"), "terminal_hessian"),
    (dict(terminal_hessian=None), "terminal_hessian"),
    (dict(loss="nll"), "loss"),
    (dict(diagnostics="yes"), "diagnostics"),
    (dict(seed=1.5), "seed"),
])
def test_invalid_terminal_options_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DDPNOpt(_net(), lr=0.01, **kwargs)


def test_cross_entropy_is_recognised_and_mse_is_not():
    out = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (7,))
    g, = torch.autograd.grad(nn.functional.cross_entropy(out, y), out)
    assert detect_loss(out.detach(), g) == "cross_entropy"
    g, = torch.autograd.grad(nn.functional.mse_loss(out, torch.randn(7, 4, dtype=out.dtype)), out)
    assert detect_loss(out.detach(), g) is None
    g, = torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), out)
    assert detect_loss(out.detach(), g) == "sum"
    out32 = out.detach().float().requires_grad_(True)
    g, = torch.autograd.grad(nn.functional.cross_entropy(out32, y), out32)
    assert detect_loss(out32.detach(), g) == "cross_entropy"


SOFT = torch.softmax(torch.randn(6, 4, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(3)), 1)


@pytest.mark.parametrize("loss", [
    lambda o, y: nn.functional.cross_entropy(o, y, label_smoothing=0.2),
    lambda o, y: nn.functional.cross_entropy(o, SOFT),
    lambda o, y: nn.functional.nll_loss(torch.log_softmax(o, 1), y),
])
def test_soft_targets_and_label_smoothing_are_cross_entropy_with_its_gauss_newton_hessian(loss):
    out = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    g, = torch.autograd.grad(loss(out, y), out)
    assert detect_loss(out.detach(), g) == "cross_entropy"
    # the per-sample Hessian of B * (the batch loss) is the factor's diag(p) - p p^T
    h = torch.func.hessian(lambda o: loss(o, y) * 6)(out.detach())            # (B, C, B, C)
    a = loss_hessian_factor("cross_entropy", out.detach())
    for i in range(6):
        assert torch.allclose(a[i].T @ a[i], h[i, :, i], atol=1e-12)
    # a loss that only looks like it (rows of B grad not summing to zero) is not
    g2, = torch.autograd.grad(loss(out, y) + 1e-2 * out.sum(), out)
    assert detect_loss(out.detach(), g2) is None


def test_gauss_newton_factor_is_the_loss_hessian():
    out = torch.randn(5, 4, dtype=torch.float64)
    a = loss_hessian_factor("cross_entropy", out)                 # (B, C, C), rows = columns a_c
    for i in range(5):
        h = torch.func.hessian(lambda o: nn.functional.cross_entropy(o[None], torch.tensor([2])))(
            out[i])
        assert torch.allclose(a[i].T @ a[i], h, atol=1e-12)
    m = loss_hessian_factor("mse", out)
    t = torch.randn(4, dtype=torch.float64)
    h = torch.func.hessian(lambda o: nn.functional.mse_loss(o, t))(out[0])
    assert torch.allclose(m[0].T @ m[0], h, atol=1e-12)


def test_unrecognised_loss_with_auto_warns_once_and_trains():
    net = _net()
    x, _ = _data()
    t = torch.randn(8, 3, dtype=torch.float64)
    opt = DDPNOpt(net, lr=0.01, curvature="adam")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = float(opt.step(make_closure(net, opt, x, t, nn.functional.mse_loss)))
        for _ in range(30):
            last = float(opt.step(make_closure(net, opt, x, t, nn.functional.mse_loss)))
    msgs = [w for w in caught if "mean squared error" in str(w.message)]
    assert len(msgs) == 1
    assert last < first
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # an explicit loss: no warning
        opt = DDPNOpt(net, lr=0.01, curvature="adam", loss="mse")
        opt.step(make_closure(net, opt, x, t, nn.functional.mse_loss))


def test_feedback_that_would_write_a_non_finite_parameter_is_refused():
    """float32 and lr 1e30: the open-loop step is finite, the feedback overflows."""
    net = _net(torch.float32)
    x, y = _data(torch.float32)
    base = copy.deepcopy(net)
    opt_base = DDPNOpt(base, lr=1e30, curvature="identity", feedback=False)
    opt_base.step(make_closure(base, opt_base, x, y))
    assert torch.isfinite(_flat(base)).all()
    for terminal in ("projected", "gradient", "gauss_newton"):
        twin = copy.deepcopy(net)
        opt = DDPNOpt(twin, lr=1e30, curvature="identity", momentum=0.9,
                      terminal_hessian=terminal)
        before = _flat(twin).clone()
        with pytest.warns(RuntimeWarning, match="non-finite parameter"):
            opt.step(make_closure(twin, opt, x, y))
        assert torch.equal(_flat(twin), before)
        assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values())
    # with state from earlier steps, the state is restored too
    twin = copy.deepcopy(net)
    opt = DDPNOpt(twin, lr=1e-3, curvature="adam")
    opt.step(make_closure(twin, opt, x, y))
    saved, before = copy.deepcopy(opt.state_dict()), _flat(twin).clone()
    opt.param_groups[0]["lr"] = 1e30
    with pytest.warns(RuntimeWarning, match="non-finite parameter"):
        opt.step(make_closure(twin, opt, x, y))
    assert torch.equal(_flat(twin), before)
    after = opt.state_dict()
    for k, st in saved["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][name]))


def test_diagnostics_report_the_feedback_ratio_and_clamping():
    """ratio = ||P feedback|| / ||k|| per stage, checked against the parameters of a feedback-off
    twin (plain SGD: k = -lr g exactly)."""
    net = _net()
    x, y = _data()
    start = [p.detach().clone() for p in net.parameters()]
    off = copy.deepcopy(net)
    opt_off = DDPNOpt(off, lr=0.5, curvature="identity", feedback=False)
    opt_off.step(make_closure(off, opt_off, x, y))
    opt = DDPNOpt(net, lr=0.5, curvature="identity", diagnostics=True, feedback_bound=math.inf)
    opt.step(make_closure(net, opt, x, y))
    assert [d["stage"] for d in opt.diagnostics] == [0, 1, 2]
    params_on, params_off = list(net.parameters()), list(off.parameters())
    for t, d in enumerate(opt.diagnostics):
        sl = slice(2 * t, 2 * t + 2)
        k = math.sqrt(sum(float((b - a).square().sum())
                          for a, b in zip(start[sl], params_off[sl])))
        fb = math.sqrt(sum(float((c - b).square().sum())
                           for b, c in zip(params_off[sl], params_on[sl])))
        assert d["k_norm"] == pytest.approx(k, rel=1e-9)
        assert d["feedback_norm"] == pytest.approx(fb, rel=1e-7, abs=1e-15)
        assert d["ratio"] == pytest.approx(fb / k, rel=1e-7, abs=1e-15)
        assert 0.0 <= d["clamped"] <= 1.0
    assert opt.diagnostics[0]["ratio"] == 0.0 and opt.diagnostics[2]["ratio"] > 0
    plain = DDPNOpt(_net(), lr=0.5, curvature="identity")
    plain.step(make_closure(plain._model, plain, x, y))
    assert plain.diagnostics is None
