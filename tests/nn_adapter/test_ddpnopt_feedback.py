"""Factorised feedback against a dense per-sample oracle, and the first-order check."""
import copy
import math

import pytest
import torch
from torch import nn

from nn_adapter import DDPNOpt
from nn_adapter.errors import MemoryLimitError
from nn_adapter.feedback import feedback_grads, second_order_grads
from nn_adapter.stages import Stage
from nn_adapter.training import make_closure

from test_ddpnopt_oracle import dense_P, dense_step, stage_controls, stage_modules

B = 6


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3)).double()


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()


def _generic():
    """Modules without a structured path (LayerNorm, Conv1d): the torch.func route."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Unflatten(1, (2, 3)),
                         nn.Conv1d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).double()


def _nested():
    """A BatchNorm (eval mode) and a nested Sequential: each parametrised module is a stage."""
    bn = nn.BatchNorm1d(5).eval()
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), bn,
                         nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4)), nn.ReLU(),
                         nn.Linear(4, 3)).double()


class Scale(nn.Module):
    """A module owning a parameter of its own (per-channel scale): a diagonal-block stage."""

    def __init__(self, channels):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, channels)[:, None, None])

    def forward(self, x):
        return x * self.gain


class ResidualCNN(nn.Module):
    """A custom forward with a residual block (conv, tanh, conv, scale + identity skip)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.scale = Scale(2)
        self.fc = nn.Linear(50, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = torch.tanh(h + self.scale(self.c2(torch.tanh(self.c1(h)))))
        return self.fc(h.flatten(1))


class SkipMLP(nn.Module):
    """Linear layers whose inputs also feed a skip connection, and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        a = torch.tanh(self.l1(x))
        return self.l3(self.norm(a + torch.tanh(self.l2(a))))


class GatedBlock(nn.Module):
    """A module owning a parameter *and* a child stage (a container stage), not first."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        return torch.tanh(self.inner(x)) * self.gate + x


def _container():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), GatedBlock(), nn.Linear(5, 3)).double()


def _normalised():
    """GroupNorm and PReLU: parametrised modules without a closed form, between two Linears."""
    return nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4), nn.PReLU(),
                         nn.Flatten(), nn.Linear(8, 3)).double()


def _residual():
    return ResidualCNN().double()


def _skip():
    return SkipMLP().double()


def _batch(make, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 5, 5) if make in (_cnn, _residual) else (4,)
    return (torch.randn(B, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


def _closure(net, opt, x, y):
    return make_closure(net, opt, x, y)


def _stage_P(opt, net, x):
    """Dense P of every stage (from the optimizer's curvature after its last update)."""
    out = []
    for m in stage_modules(net, x):
        own = {id(p) for p in m.parameters(recurse=False)}
        blocks = [b for b in opt._blocks if all(id(p) in own for p in b.params)]
        stage = Stage(m, "", blocks)
        out.append(dense_P(stage, [opt.curvature.factors(b, opt._group_of(b),
                                                         [opt.state[p] for p in b.params])
                                   for b in blocks]))
    return out


def _compare(make, curvature, lr, terminal="projected", warmup=2, vxx_update=True, regression=False,
             eps_vxx=0.0, second_order=False, groups=None, **hp):
    """(feedback size, max |factorised - dense oracle|, relative difference) after one step.

    ``groups``: optional function of the network giving param-group dicts."""
    hp = dict(hp, vxx_update=vxx_update, terminal_hessian=terminal, feedback_bound=math.inf,
              eps_vxx=eps_vxx, second_order=second_order)
    torch.manual_seed(3)
    net = make()
    params = groups(net) if groups is not None else net.parameters()
    opt = DDPNOpt(params, lr=lr, curvature=curvature, model=net, **hp)
    loss_fn = None

    def batch(seed):
        x, y = _batch(make, seed)
        if regression:   # float targets, mean squared error
            y = torch.randn(B, 3, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        return x, y

    if regression:
        loss_fn = nn.functional.mse_loss
    for s in range(warmup):
        opt.step(make_closure(net, opt, *batch(100 + s), loss_fn))
    x, y = batch(7)
    twin = copy.deepcopy(net)
    twin_params = groups(twin) if groups is not None else twin.parameters()
    twin_opt = DDPNOpt(twin_params, lr=lr, curvature=curvature, feedback=False, model=twin,
                       **{k: v for k, v in hp.items() if k not in (
                           "vxx_update", "terminal_hessian", "feedback_bound", "eps_vxx",
                           "second_order")})
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_opt.step(make_closure(twin, twin_opt, x, y, loss_fn))
    u_base = stage_controls(twin, x)
    nominal = copy.deepcopy(net)
    opt.step(make_closure(net, opt, x, y, loss_fn))
    u_fact = stage_controls(net, x)
    P = _stage_P(opt, net, x)

    def phi(out, i):
        return (loss_fn or nn.functional.cross_entropy)(out[None], y[i:i + 1])

    u_dense = dense_step(nominal, x, u_base, P, phi, terminal=terminal, eps_vxx=eps_vxx,
                         vxx_update=vxx_update, second_order=second_order)
    fb = max((a - b).abs().max().item() for a, b in zip(u_fact, u_base))
    diff = max((a - b).abs().max().item() for a, b in zip(u_fact, u_dense))
    fb_dense = torch.cat([a - b for a, b in zip(u_dense, u_base)])
    fb_fact = torch.cat([a - b for a, b in zip(u_fact, u_base)])
    rel = ((fb_dense - fb_fact).norm() / fb_dense.norm()).item()
    return fb, diff, rel


MODELS = [_mlp, _cnn, _generic, _nested, _residual, _skip, _container, _normalised]
IDS = ["mlp", "cnn", "generic", "nested", "residual", "skip", "container", "normalised"]


@pytest.mark.parametrize("make", MODELS, ids=IDS)
@pytest.mark.parametrize("curvature,lr", [("identity", 0.3), ("adam", 0.02), ("ekfac", 0.05),
                                          ("rmsprop", 0.01)])
def test_factorised_equals_dense_gauss_newton(make, curvature, lr):
    fb, diff, _ = _compare(make, curvature, lr)
    assert fb > 1e-6            # the feedback did change the step
    assert diff <= 1e-10


@pytest.mark.parametrize("curvature,lr", [("adam", 0.02), ("ekfac", 0.05), ("identity", 0.3)])
def test_param_groups_give_each_stage_its_own_preconditioner(curvature, lr):
    """Two groups with their own lr and weight decay: the feedback uses each stage's own P."""
    def groups(net):
        return [{"params": list(net.l1.parameters()) + list(net.l3.parameters())},
                {"params": list(net.l2.parameters()) + list(net.norm.parameters()),
                 "lr": lr * 3, "weight_decay": 0.01}]
    fb, diff, _ = _compare(_skip, curvature, lr, groups=groups)
    assert fb > 1e-6 and diff <= 1e-10
    fb0, diff0, _ = _compare(_skip, curvature, lr)
    assert abs(fb - fb0) > 1e-8                 # the groups made a difference


def _two_stage():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("make,curvature,lr,options", [
    (m, c, lr, o) for m in (_mlp, _cnn, _generic)
    for c, lr, o in (("adam", 0.02, {}), ("ekfac", 0.05, {}), ("rmsprop", 0.01, {}),
                     ("adam", 0.05, dict(vxx_update=False)))
] + [(_two_stage, "identity", 0.3, dict(second_order=True))])
def test_factorised_equals_feedback_dense(make, curvature, lr, options):
    """DDPNOpt(feedback="dense") (gains materialised per sample) = the factorised feedback.

    With second-order dynamics the dense V_xx also carries the V_x . f_ux part of Q_ux, which
    the rank-one factorisation cannot; they agree where no V_xx is carried back (two stages).
    """
    data = [_batch(make, s) for s in (11, 12, 13)]
    nets, opts = [], []
    for mode in ("factorised", "dense"):
        torch.manual_seed(3)
        net = make()
        nets.append(net)
        opts.append(DDPNOpt(net, lr=lr, curvature=curvature, feedback=mode,
                            **{"feedback_bound": math.inf, **options}))
    for x, y in data:
        for net, opt in zip(nets, opts):
            opt.step(_closure(net, opt, x, y))
    a, b = (torch.cat([p.detach().flatten() for p in n.parameters()]) for n in nets)
    torch.manual_seed(3)
    start = torch.cat([p.detach().flatten() for p in make().parameters()])
    assert (a - start).abs().max() > 1e-3
    assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_without_vxx_update_equals_dense_with_vxx_equal_qxx(make):
    fb, diff, _ = _compare(make, "adam", 0.05, vxx_update=False)
    assert fb > 1e-6 and diff <= 1e-10


def test_value_scale_is_active_in_these_tests():
    """The s factors (clamped or not) matter here: with and without the V_xx update differ."""
    a = _compare(_mlp, "adam", 0.05)
    b = _compare(_mlp, "adam", 0.05, vxx_update=False)
    assert a[1] <= 1e-10 and b[1] <= 1e-10
    assert abs(a[0] - b[0]) > 1e-8


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("terminal", ["gauss_newton", "projected", "gradient"])
@pytest.mark.parametrize("curvature,lr", [("adam", 0.05), ("ekfac", 0.05)])
def test_terminal_hessians_equal_their_dense_definition(make, terminal, curvature, lr):
    """Factorised feedback from each terminal value Hessian = per-sample dense DDP from it
    (the Gauss-Newton Hessian of cross-entropy on the logits is its exact Hessian)."""
    fb, diff, _ = _compare(make, curvature, lr, terminal=terminal)
    assert fb > 1e-6
    assert diff <= 1e-10


@pytest.mark.parametrize("terminal", ["gauss_newton", "projected"])
def test_mean_squared_error_terminal_equals_its_dense_definition(terminal):
    fb, diff, _ = _compare(_mlp, "adam", 0.05, terminal=terminal, regression=True, loss="mse")
    assert fb > 1e-6 and diff <= 1e-10


@pytest.mark.parametrize("make", [_generic, _nested], ids=["generic", "nested"])
@pytest.mark.parametrize("terminal", ["gauss_newton", "projected"])
def test_terminal_hessians_on_unstructured_heads(make, terminal):
    """LayerNorm, Conv1d, BatchNorm (eval) and nested heads: the torch.func routes."""
    fb, diff, _ = _compare(make, "adam", 0.05, terminal=terminal)
    assert fb > 1e-6 and diff <= 1e-10


def test_clamped_value_hessians_match_the_dense_projection():
    """At a large learning rate the per-sample V_xx of the exact terminal factor loses negative
    eigenvalues (the local model is not convex there); the r-column recursion projects exactly as
    the dense one does."""
    torch.manual_seed(3)
    net = _mlp()
    opt = DDPNOpt(net, lr=2.0, curvature="identity", terminal_hessian="gauss_newton",
                  feedback_bound=math.inf,
                  diagnostics=True)
    opt.step(_closure(net, opt, *_batch(_mlp, 5)))
    assert max(d["clamped"] for d in opt.diagnostics) > 0
    fb, diff, _ = _compare(_mlp, "identity", 2.0, terminal="gauss_newton", warmup=0)
    assert fb > 1e-6 and diff <= 1e-10


def test_sampled_terminal_averages_to_the_gauss_newton_one():
    """E[y y^T] = H: with V_xx = Q_xx (every stage linear in the terminal Hessian) the feedback of
    the Monte-Carlo sampled factor averages to the exact one; tolerance 5 standard errors."""
    torch.manual_seed(3)
    net = _mlp()
    x, y = _batch(_mlp, 7)
    base = DDPNOpt(net, lr=0.05, curvature="adam", vxx_update=False)
    base.step(_closure(net, base, *_batch(_mlp, 8)))

    def after(terminal, seed=0, feedback=True):
        twin = copy.deepcopy(net)
        opt = DDPNOpt(twin, lr=0.05, curvature="adam", vxx_update=False, feedback=feedback,
                      feedback_bound=math.inf,
                      terminal_hessian=terminal, seed=seed)
        opt.load_state_dict(copy.deepcopy(base.state_dict()))
        opt.step(_closure(twin, opt, x, y))
        return torch.cat([p.detach().flatten() for p in twin.parameters()])

    open_loop = after("gradient", feedback=False)
    exact = after("gauss_newton") - open_loop
    draws = torch.stack([after("sampled", seed=s) - open_loop for s in range(400)])
    mean, se = draws.mean(0), draws.std(0) / 20
    assert exact.abs().max() > 1e-5
    assert ((mean - exact).abs() <= 5 * se + 1e-12).all()
    assert (mean - exact).norm() < 0.1 * exact.norm()


# -- first-order check: Q_u + Q_ux dx = d/du J_t(x + dx, u) + O(|dx|^2) ----------------------------
class NegLog(nn.Module):
    """phi(y) = -log(a.y + c): its Hessian is exactly grad phi grad phi^T (the GN outer product)."""

    def forward(self, y):
        return -torch.log(y @ torch.tensor([0.3, -0.2, 0.5], dtype=y.dtype) + 4.0)


class TanhLinear(nn.Module):
    """tanh(x W^T + b) as one module: its own second derivatives include tanh''."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return torch.tanh(x @ self.weight.T + self.bias)


@pytest.mark.parametrize("stage_index", [0, 1])
def test_first_order_check(stage_index):
    """With the exact terminal Hessian and the module's own second derivatives, the feedback sums
    are the exact first-order change of the stage's gradient (here nothing lies between modules)."""
    from nn_adapter.curvature import find_blocks
    torch.manual_seed(0)
    net = nn.Sequential(TanhLinear(4, 5), nn.Linear(5, 3)).double()
    x0 = torch.randn(B, 4, dtype=torch.float64)
    module = net[stage_index]
    stage = Stage(module, str(stage_index), find_blocks(module))
    states = [x0]
    for m in net:
        states.append(m(states[-1]).detach())
    x = states[stage_index]

    def mean_loss_from(t, xt):
        out = xt
        for m in list(net)[t:]:
            out = m(out)
        return NegLog()(out).mean()

    def grad_u(xt):
        return torch.autograd.grad(mean_loss_from(stage_index, xt), stage.params)

    h = stage.module_fn(stage.params, x).detach().requires_grad_(True)
    g_h = torch.autograd.grad(mean_loss_from(stage_index + 1, h), h)[0] * B
    q_u = grad_u(x)
    dx = torch.randn_like(x)
    errs = {}
    for scale in (1e-2, 1e-3):
        d = dx * scale
        fb = feedback_grads(stage, x, x + d, g_h)
        fb2 = second_order_grads(stage, x, d, g_h)
        pred = torch.cat([(a + b + c).reshape(-1) for a, b, c in zip(q_u, fb, fb2)])
        zeroth = torch.cat([a.reshape(-1) for a in q_u])
        true = torch.cat([a.reshape(-1) for a in grad_u(x + d)])
        errs[scale] = ((pred - true).norm().item(), (zeroth - true).norm().item())
    # with the feedback the error is second order, without it first order
    assert errs[1e-3][0] < errs[1e-2][0] / 50
    assert errs[1e-3][1] > errs[1e-2][1] / 20
    assert errs[1e-3][0] < 1e-3 * errs[1e-3][1]


@pytest.mark.parametrize("make", [_mlp, _residual, _skip], ids=["mlp", "residual", "skip"])
@pytest.mark.parametrize("options", [dict(eps_vxx=0.01), dict(second_order=True)],
                         ids=["eps_vxx", "second_order"])
def test_tikhonov_and_second_order_terms_equal_the_dense_oracle(make, options):
    """The eps term is not damped by mu (Q_uu stays the curvature's), so it can be large: the
    comparison is relative to the feedback."""
    fb, diff, rel = _compare(make, "adam", 0.05, **options)
    assert fb > 1e-6 and rel <= 1e-10 and diff <= 1e-10 * max(1.0, fb)


def test_tikhonov_term_is_eps_hu_hx_dx():
    from torch.func import jacrev

    from nn_adapter.curvature import find_blocks
    from nn_adapter.feedback import tikhonov_grads
    torch.manual_seed(0)
    norm = nn.LayerNorm(4).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    stage = Stage(norm, "norm", find_blocks(norm))
    x = torch.randn(B, 4, dtype=torch.float64)
    dx = torch.randn_like(x)
    got = torch.cat([t.reshape(-1) for t in tikhonov_grads(stage, x, dx, 0.3)])
    params = [p.detach() for p in stage.params]
    sizes = [p.numel() for p in params]

    def f(xi, u):
        ps = [c.reshape(p.shape) for c, p in zip(torch.split(u, sizes), params)]
        return stage.module_fn(ps, xi[None])[0]
    u = torch.cat([p.reshape(-1) for p in params])
    want = sum(jacrev(f, 1)(x[i], u).T @ (jacrev(f, 0)(x[i], u) @ dx[i]) for i in range(B))
    assert torch.allclose(got, 0.3 * want / B, atol=1e-12)


def test_dense_feedback_refuses_large_networks():
    from nn_adapter.curvature import find_blocks
    from nn_adapter.minibatch import dense_gain
    torch.manual_seed(0)
    net = _mlp()
    stages = [Stage(m, str(i), find_blocks(m)) for i, m in enumerate(net) if
              isinstance(m, nn.Linear)]
    x = torch.randn(B, 4, dtype=torch.float64)
    inputs = [x, torch.tanh(net[0](x)).detach(), torch.tanh(net[2](torch.tanh(net[0](x)))).detach()]
    cols = [None, torch.randn(B, 1, 4, dtype=torch.float64), torch.randn(B, 1, 3, dtype=torch.float64)]
    with pytest.raises(MemoryLimitError, match="dense"):
        dense_gain(stages[2], inputs[2], cols[2], None, None, max_elements=10)


@pytest.mark.parametrize("running", [True, False], ids=["training-mode", "no-running-stats-eval"])
def test_factorised_feedback_equals_the_dense_one_through_a_batch_norm_on_batch_statistics(running):
    """The per-sample stage of a batch norm normalising with its batch's statistics (training
    mode, or track_running_stats=False in eval mode) holds the recorded batch's statistics fixed.
    The factorised q_x . dx took the backpropagated input gradient, which also runs through them
    (bn.weight then differed from the dense gains' by ~7 % of the feedback); without running
    statistics in eval mode they were not held at all (the dense gains used each sample's own;
    a difference above the feedback itself). Both modes now agree to rounding."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(48, 3)
            self.bn = nn.BatchNorm2d(3, track_running_stats=running)

        def forward(self, x):
            return self.fc(nn.functional.avg_pool2d(torch.tanh(self.bn(self.conv(x))), 2).flatten(1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    nets = {}
    for mode in ("dense", True, False):
        torch.manual_seed(1)
        nets[mode] = net = Net().double().train()
        net.bn.train(running)
        opt = DDPNOpt(net.parameters(), lr=1e-3, model=net, feedback=mode, feedback_bound=math.inf)
        for _ in range(2):
            opt.step(make_closure(net, opt, x, y))
    for name, p in nets["dense"].named_parameters():
        q, r = dict(nets[True].named_parameters())[name], dict(nets[False].named_parameters())[name]
        feedback = float((q - r).abs().max())
        assert float((p - q).abs().max()) <= 1e-10 * feedback, name
        if name.startswith("bn"):
            assert feedback > 1e-6


def test_dense_feedback_too_large_is_a_memory_limit_error_before_any_change():
    """A model with a custom forward and a residual block whose second stage's dense gains are
    beyond the limit: MemoryLimitError (was a plain ValueError naming the stage's index only)
    naming the module (the last stage's gains come first) and the way out; parameters,
    optimizer state and step count untouched."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.a, self.out = nn.Linear(4, 2000), nn.Linear(2000, 2000), nn.Linear(2000, 3)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            return self.out(h + torch.tanh(self.a(h)))
    torch.manual_seed(0)
    net = Residual()
    opt = DDPNOpt(net.parameters(), lr=0.01, model=net, feedback="dense")
    x, y = torch.randn(B, 4), torch.randint(0, 3, (B,))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(MemoryLimitError, match=r"stage 2 \(module 'out'\) needs .*feedback=True") as err:
        opt.step(make_closure(net, opt, x, y))
    assert err.value.estimate > err.value.limit == 50_000_000 * 4
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert len(opt.state) == 0


def test_feedback_coefficient_keeps_its_digits_in_float32():
    """c = q . xhat - q . x with a tiny dx: float64 accumulation keeps ~7 digits (plain float32 bmm
    lost 1-15% here)."""
    from nn_adapter.feedback import sample_dots
    torch.manual_seed(0)
    q = torch.randn(32, 2048)
    x = torch.randn(32, 2048) + 3.0
    dx = 1e-5 * torch.randn(32, 2048)
    xhat = x + dx
    exact = (q.double() * (xhat.double() - x.double())).sum(1)
    c = sample_dots(q, xhat) - sample_dots(q, x)
    assert torch.allclose(c, exact, rtol=1e-9, atol=1e-12)
    naive = (q * xhat).sum(1) - (q * x).sum(1)
    assert ((naive.double() - exact).abs() / exact.abs()).max() > 1e-3   # what float32 alone loses


@pytest.mark.parametrize("bound", [0.01, 0.001])
def test_feedback_bound_caps_the_feedback_and_dense_agrees(bound):
    """||P Q_ux dx|| <= bound ||k|| per stage (diagnostics), the same in the dense mode."""
    data = [_batch(_mlp, s) for s in (21, 22, 23)]
    nets, opts = [], []
    for mode in ("factorised", "dense"):
        torch.manual_seed(3)
        nets.append(_mlp())
        opts.append(DDPNOpt(nets[-1], lr=0.3, curvature="identity", feedback=mode,
                            feedback_bound=bound, diagnostics=True))
    d = []
    for x, y in data:
        for net, opt in zip(nets, opts):
            opt.step(_closure(net, opt, x, y))
        d += opts[0].diagnostics
    assert all(s["ratio"] <= bound * (1 + 1e-9) for s in d)
    assert any(s.get("bounded") for s in d)
    a, b = (torch.cat([p.detach().flatten() for p in n.parameters()]) for n in nets)
    assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("make", [_cnn, _residual])
def test_compact_convolutions_leave_the_closure_the_gradients_of_autograd(make):
    """A Conv2d stage's backward forms its per-sample gradients (compact_conv) and returns their
    sum as the weight gradient: every parameter's .grad after the closure is autograd's own, a
    bias left out of the optimizer included, and the stage is kept compact (no input record)."""
    torch.manual_seed(0)
    net = make()
    x, y = _batch(make, 4)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    weights = [p for n, p in net.named_parameters() if not n.endswith("bias")]
    opt = DDPNOpt(weights, lr=0.0, curvature="identity", model=net)
    nn.functional.cross_entropy(net(x), y).backward()
    expected = [p.grad.clone() for p in net.parameters()]
    seen = {}
    original = type(opt)._update

    def spy(self, rec):
        seen.update(compact=set(rec.compact), inputs=set(rec.inputs))
        return original(self, rec)
    opt._update = spy.__get__(opt)
    net.zero_grad()                       # the closure clears the optimizer's parameters only
    opt.step(_closure(net, opt, x, y))
    for p, g in zip(net.parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-12, atol=1e-14)
    assert seen["compact"] == set(convs[1:]) and not seen["inputs"] & set(convs[1:])
    assert convs[0] in seen["inputs"] and "forward" not in convs[1].__dict__


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2),
                                dict(kernel_size=(2, 3), stride=(3, 2), padding=(1, 0)),
                                dict(kernel_size=3, dilation=2, padding=2, stride=2),
                                dict(kernel_size=1, stride=3)])
@pytest.mark.parametrize("size", [(7, 9), (8, 8)])
def test_compact_input_gradient_is_autograds(kw, size):
    """The input gradient of a compact convolution (a transposed convolution with the output
    padding that a stride drops) equals autograd's, odd and even sizes, strides, dilation."""
    from nn_adapter.feedback import conv2d_input_grad
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, **kw).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    out = m(x)
    g = torch.randn_like(out)
    expected, = torch.autograd.grad(out, x, g)
    got = conv2d_input_grad(m, x.shape, m.weight.detach(), g)
    assert got.shape == x.shape
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
