"""DDPNOpt's stage step and feedback pass (nn_adapter/minibatch.py) against independent references:
the documented feedback_bound rule u <- u + k - s P delta, s = min(1, bound ||k|| / ||P delta||),
rebuilt from an open-loop twin and an unbounded twin; the diagnostics recomputed from those
parameters and from per-sample autograd gradients; a stationary point; the closure's keyword
arguments in the feedback pass; and :func:`nn_adapter.minibatch.dense_gain` against the mixed
second derivatives of autograd."""
import copy
import math

import pytest
import torch
from torch import nn

from nn_adapter import DDPNOpt
from nn_adapter.errors import MemoryLimitError
from nn_adapter.curvature import find_blocks
from nn_adapter.minibatch import dense_gain
from nn_adapter.stages import Stage
from nn_adapter.training import make_closure

from test_ddpnopt_feedback import TanhLinear  # tanh(x W^T + b): second derivatives in (x, u) of its own

B = 6


def _layernorm_head():
    """Two stages; the second (LayerNorm: weight and bias, two diagonal blocks) has feedback."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5)).double()


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (B,), generator=g))


def _after_one_step(**options):
    torch.manual_seed(1)
    net = _layernorm_head()
    with torch.no_grad():
        net[2].weight.uniform_(0.5, 1.5)
        net[2].bias.uniform_(-0.5, 0.5)
    x, y = _data()
    start = [p.detach().clone() for p in net.parameters()]
    opt = DDPNOpt(net, lr=0.05, curvature="adam", **options)
    opt.step(make_closure(net, opt, x, y))
    return start, [p.detach().clone() for p in net.parameters()], opt


def _norm(ts):
    return math.sqrt(sum(float(t.square().sum()) for t in ts))


@pytest.mark.parametrize("bound", [0.05, 1e6], ids=["binding", "not-binding"])
def test_feedback_bound_rule_on_a_stage_of_two_blocks(bound):
    """Stage 0 takes k alone; stage 1 (two blocks) k - s P delta, with P delta measured by an
    unbounded twin (the fused path) and k by a feedback-off twin; diagnostics are those norms."""
    start, open_loop, _ = _after_one_step(feedback=False)
    _, unbounded, _ = _after_one_step(feedback_bound=math.inf)
    _, bounded, opt = _after_one_step(feedback_bound=bound, diagnostics=True)
    for a, b, c in zip(open_loop[:2], unbounded[:2], bounded[:2]):
        assert torch.allclose(a, b, rtol=0, atol=1e-14) and torch.allclose(a, c, rtol=0, atol=1e-14)
    k = [a - s for a, s in zip(open_loop[2:], start[2:])]
    p_delta = [a - b for a, b in zip(open_loop[2:], unbounded[2:])]
    assert min(_norm([d]) for d in p_delta) > 1e-6          # both blocks have feedback
    s = min(1.0, bound * _norm(k) / _norm(p_delta))
    assert (s < 0.5) if bound < 1 else (s == 1.0)
    for got, a, d in zip(bounded[2:], open_loop[2:], p_delta):
        assert torch.allclose(got, a - s * d, rtol=0, atol=1e-12)
    d0, d1 = opt.diagnostics
    assert (d0["stage"], d1["stage"]) == (0, 1)
    assert d0["k_norm"] == pytest.approx(_norm([a - b for a, b in zip(open_loop[:2], start[:2])]),
                                         rel=1e-10)
    assert d0["feedback_norm"] == 0.0 and d0["ratio"] == 0.0
    assert d0["bounded"] is False and d0["clamped"] == 0.0     # stage 0: no feedback, no mu
    assert d1["k_norm"] == pytest.approx(_norm(k), rel=1e-10)
    assert d1["feedback_norm"] == pytest.approx(s * _norm(p_delta), rel=1e-9)
    assert d1["ratio"] == pytest.approx(s * _norm(p_delta) / _norm(k), rel=1e-9)
    assert d1["bounded"] is (bound < 1)


def test_a_stationary_point_leaves_the_parameters_unchanged_with_a_feedback_bound():
    """Zero gradient (targets = the outputs): k = 0 and P delta = 0 on every stage; the bounded
    step is exactly zero (no 0/0) and the diagnostics report zero ratios."""
    torch.manual_seed(0)
    net = _layernorm_head()
    x, _ = _data()
    target = net(x).detach()
    before = [p.detach().clone() for p in net.parameters()]
    opt = DDPNOpt(net, lr=0.1, curvature="identity", feedback_bound=0.1, diagnostics=True,
                  terminal_hessian="gradient")
    opt.step(make_closure(net, opt, x, target, nn.functional.mse_loss))
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)
    assert [(d["k_norm"], d["feedback_norm"], d["ratio"]) for d in opt.diagnostics] == [
        (0.0, 0.0, 0.0)] * 2
    assert opt.diagnostics[0]["bounded"] is False


def test_a_stage_without_gradient_in_float32_is_not_a_non_finite_step():
    """A dead ReLU layer in float32: its stage and the one before it get exactly zero gradients
    (k = 0 and P delta = 0, where a 0 / 0 in the bound's scale refused every step), and the layer
    after it sees dx = 0: with feedback DDPNOpt is plain SGD here, step for step, never refused."""
    def net_and_data():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(),
                            nn.Linear(5, 3))
        with torch.no_grad():
            net[2].bias.fill_(-100.0)
        g = torch.Generator().manual_seed(3)
        return net, torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)

    net, x, y = net_and_data()
    opt = DDPNOpt(net, lr=0.1, curvature="identity")
    twin, _, _ = net_and_data()
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        opt.step(make_closure(net, opt, x, y))
        sgd.step(make_closure(twin, sgd, x, y))
    assert opt.refused_steps == 0
    assert not torch.equal(net[4].bias, net_and_data()[0][4].bias)     # the last layer trains
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clamped_share_is_the_share_of_samples_whose_model_is_not_convex():
    """Last stage, rank-one terminal (W' = B^2), identity curvature (P = lr I): mu_i > 1 exactly
    when lr ||d loss_i / d u||^2 > 1, loss_i the sample's own loss (per-sample autograd)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _data(3)
    y = y % 3
    last = list(net[2].parameters())
    sq = []
    for i in range(B):
        gs = torch.autograd.grad(nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), last)
        sq.append(sum(float(g.square().sum()) for g in gs))
    sq = sorted(sq)
    for j in (2, 4):                      # 1 / lr between the j-th and (j+1)-th smallest
        lr = 2 / (sq[j - 1] + sq[j])
        twin = copy.deepcopy(net)
        opt = DDPNOpt(twin, lr=lr, curvature="identity", terminal_hessian="gradient",
                      diagnostics=True)
        opt.step(make_closure(twin, opt, x, y))
        expected = sum(lr * s > 1 for s in sq) / B
        assert expected == (B - j) / B
        assert opt.diagnostics[1]["clamped"] == pytest.approx(expected, abs=1e-15)
        assert opt.diagnostics[0]["clamped"] == 0.0


class Scaled(nn.Module):
    """forward(x, scale=...): the scale changes the path's values, not its modules."""

    def __init__(self, fixed=None):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.fixed = fixed

    def forward(self, x, scale=1.0):
        if self.fixed is not None:
            scale = self.fixed
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)) * scale)))


def test_the_feedback_pass_reruns_the_model_with_the_closures_keyword_arguments():
    """net(x, scale=2) in the closure = a model with the scale 2 built in, step for step."""
    x, y = _data(5)
    y = y % 3
    nets = []
    for fixed in (None, 2.0):
        torch.manual_seed(0)
        nets.append(Scaled(fixed).double())
    reference = Scaled(1.0).double()
    reference.load_state_dict(nets[0].state_dict())
    opts = [DDPNOpt(n, lr=0.05, curvature="adam") for n in nets + [reference]]
    for _ in range(2):
        for net, opt in zip(nets + [reference], opts):
            def closure(net=net, opt=opt):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x, scale=2.0), y)
                loss.backward()
                return loss
            opt.step(closure)
    flat = [torch.cat([p.detach().flatten() for p in n.parameters()]) for n in
            nets + [reference]]
    assert torch.allclose(flat[0], flat[1], rtol=0, atol=1e-13)
    assert (flat[0] - flat[2]).abs().max() > 1e-6      # scale 1 in the feedback pass differs


def test_the_feedback_pass_stops_at_the_last_stage():
    """The last stage's module and what runs after it are not evaluated again after the closure
    (its parameters are updated in its pre-hook; nothing after it has feedback)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh()).double()
    calls = {"last": 0, "tail": 0}
    net[2].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))
    net[3].register_forward_hook(lambda *a: calls.__setitem__("tail", calls["tail"] + 1))
    x, y = _data(2)
    opt = DDPNOpt(net, lr=0.05, curvature="adam")
    opt.step(make_closure(net, opt, x, y % 3))
    assert calls == {"last": 1, "tail": 1}


# -- dense_gain: Q_ux^(i) / mu_i against autograd's mixed second derivatives ----------------------
def _dense_case(n, seed=0):
    torch.manual_seed(seed)
    module = TanhLinear(3, 4).double()
    stage = Stage(module, "h", find_blocks(module))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, 4, generator=g, dtype=torch.float64)               # r = 2 columns
    a = torch.randn(n, 2, 2, generator=g, dtype=torch.float64)
    w = a @ a.mT + 0.1 * torch.eye(2, dtype=torch.float64)
    mu = 1.0 + torch.rand(n, generator=g, dtype=torch.float64) * 3
    v_out = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return stage, x, y, w, mu, v_out


def _mixed_hessian(stage, xi, A, v):
    """d^2/du dx of 1/2 (h - h0)^T A (h - h0) + v . h at (x_i, u): h_u^T A h_x + v . h_ux."""
    params = [p.detach() for p in stage.params]
    sizes = [p.numel() for p in params]
    u0 = torch.cat([p.reshape(-1) for p in params])
    h0 = stage.module_fn(params, xi[None])[0].detach()

    def f(z):
        xx, uu = z[:3], z[3:]
        ps = [c.reshape(p.shape) for c, p in zip(torch.split(uu, sizes), params)]
        h = stage.module_fn(ps, xx[None])[0]
        d = h - h0
        return 0.5 * d @ A @ d + (0.0 if v is None else v @ h)
    hess = torch.autograd.functional.hessian(f, torch.cat([xi, u0]))
    return hess[3:, :3]


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("weights", [False, True], ids=["identity-W", "W"])
@pytest.mark.parametrize("with_mu", [False, True], ids=["mu1", "mu"])
@pytest.mark.parametrize("eps,second_order", [(None, False), (0.0, False), (0.3, False),
                                              (0.0, True), (0.3, True)],
                         ids=["default", "plain", "eps", "second_order", "eps+second_order"])
def test_dense_gain_is_the_mixed_second_derivative(n, weights, with_mu, eps, second_order):
    stage, x, y, w, mu, v_out = _dense_case(n)
    w = w if weights else None
    mu = mu if with_mu else None
    kwargs = {} if eps is None else dict(eps_vxx=eps, second_order=second_order,
                                         v_out=v_out if second_order else None)
    got = dense_gain(stage, x, y, w, mu, **kwargs)
    assert got.shape == (n, 16, 3)
    for i in range(n):
        V = y[i].T @ (w[i] if w is not None else torch.eye(2, dtype=x.dtype)) @ y[i]
        A = V + (eps or 0.0) * torch.eye(4, dtype=x.dtype)
        want = _mixed_hessian(stage, x[i], A, v_out[i] if second_order else None)
        if mu is not None:
            want = want / mu[i]
        assert want.abs().max() > 1e-3
        assert torch.allclose(got[i], want, rtol=1e-10, atol=1e-12)


def test_dense_gain_refuses_exactly_beyond_max_elements():
    """The count is B (n_in^2 + (m + n_out)(n_in + n_out)) + m^2 numbers (n_out the module's
    output size, not the number of columns r): at that many it runs, one fewer it refuses."""
    stage, x, y, w, mu, _ = _dense_case(5)
    n_b, n_in, n_out, m, r = 5, 3, 4, 16, 2
    assert y.shape == (n_b, r, n_out)
    count = n_b * (n_in * n_in + (m + n_out) * (n_in + n_out)) + m * m
    assert dense_gain(stage, x, y, w, mu, max_elements=count).shape == (n_b, m, n_in)
    with pytest.raises(MemoryLimitError, match="dense"):
        dense_gain(stage, x, y, w, mu, max_elements=count - 1)


@pytest.mark.parametrize("options", [dict(second_order=True),
                                     dict(second_order=True, eps_vxx=0.01)],
                         ids=["second_order", "eps+second_order"])
def test_second_order_terms_with_terminal_columns_equal_the_dense_oracle(options):
    """The Gauss-Newton terminal (r columns pulled back, not the recorded gradients): the
    module's own V_x . h_ux term uses the per-sample value gradient B dL/dout."""
    from test_ddpnopt_feedback import _compare, _mlp
    fb, diff, rel = _compare(_mlp, "adam", 0.05, terminal="gauss_newton", **options)
    assert fb > 1e-6 and rel <= 1e-10 and diff <= 1e-10 * max(1.0, fb)
    plain = _compare(_mlp, "adam", 0.05, terminal="gauss_newton",
                     eps_vxx=options.get("eps_vxx", 0.0))
    assert abs(plain[0] - fb) > 1e-6                 # the second-order term is not negligible


class DetachedOut(nn.Module):
    """Returns detached class probabilities (no gradient reaches them) and keeps the logits for
    the loss."""

    def __init__(self, keep=True):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.keep = keep

    def forward(self, x):
        self.logits = self.b(torch.tanh(self.a(x)))
        return torch.softmax(self.logits, 1).detach() if self.keep else self.logits


def test_gradient_terminal_needs_no_gradient_at_the_models_output():
    """terminal_hessian='gradient' uses the stages' records only: a model whose output (detached
    probabilities) gets no gradient steps as a twin returning the logits does."""
    x, y = _data(4)
    y = y % 3
    nets = []
    for keep in (True, False):
        torch.manual_seed(0)
        nets.append(DetachedOut(keep).double())
    opts = [DDPNOpt(n, lr=0.05, curvature="adam", terminal_hessian="gradient", loss="cross_entropy")
            for n in nets]
    for _ in range(2):
        for net, opt in zip(nets, opts):
            def closure(net=net, opt=opt):
                opt.zero_grad()
                net(x)
                loss = nn.functional.cross_entropy(net.logits, y)
                loss.backward()
                return loss
            opt.step(closure)
    a, b = (torch.cat([p.detach().flatten() for p in n.parameters()]) for n in nets)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in DetachedOut().double().parameters()])
    assert (a - start).abs().max() > 1e-3


class _Scaled(nn.Module):
    """x * w, with a second parameter its forward never uses."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.unused = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.w


@pytest.mark.parametrize("options", [
    dict(curvature="adam"),
    dict(curvature="identity", momentum=0.9, feedback_bound=math.inf),
    dict(curvature="rmsprop", terminal_hessian="gauss_newton"),
    dict(curvature="adam", feedback="dense"),
    dict(curvature="adam", diagnostics=True, eps_vxx=0.1),
    dict(curvature="ekfac", second_order=True),
], ids=["adam", "sgd-m-unbounded", "rmsprop-columns", "dense", "diagnostics-eps", "ekfac-2nd"])
def test_a_parameter_unused_in_forward_is_held_fixed_and_the_rest_of_its_stage_trains(options):
    """A stage whose module owns a parameter its forward does not use: that parameter has no
    gradient and stays as it is; every other parameter moves exactly as in a twin where the
    unused parameter is frozen (requires_grad=False, so not a control at all)."""
    def build(freeze):
        torch.manual_seed(2)
        net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), _Scaled(5), nn.Linear(5, 3)).double()
        if freeze:
            net[2].unused.requires_grad_(False)
        return net

    x, y = _data(4)
    y = y % 3
    net, twin = build(False), build(True)
    unused = net[2].unused.detach().clone()
    w0 = net[2].w.detach().clone()
    opt = DDPNOpt(net, lr=0.05, **options)
    ref = DDPNOpt(twin, lr=0.05, **options)
    for _ in range(3):
        opt.step(make_closure(net, opt, x, y))
        ref.step(make_closure(twin, ref, x, y))
    assert torch.equal(net[2].unused, unused)
    assert not torch.allclose(net[2].w, w0)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
