"""Factorised feedback against a dense per-sample oracle, and the first-order check."""
import copy
import math

import pytest
import torch
from torch import nn

from nn_adapter import DDPNOpt
from nn_adapter.feedback import feedback_grads, second_order_grads
from nn_adapter.stages import split_stages
from nn_adapter.training import make_closure

from test_ddpnopt_oracle import dense_P, dense_step

B = 6


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3)).double()


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()


def _generic():
    """Heads without a structured path (LayerNorm, Conv1d): the torch.func route."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Unflatten(1, (2, 3)),
                         nn.Conv1d(2, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).double()


def _nested():
    """A BatchNorm head (eval mode) and a nested head with two Linear layers inside."""
    bn = nn.BatchNorm1d(5).eval()
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), bn,
                         nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4)), nn.ReLU(),
                         nn.Linear(4, 3)).double()


def _batch(make, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 5, 5) if make is _cnn else (4,)
    return (torch.randn(B, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


def _closure(net, opt, x, y):
    return make_closure(net, opt, x, y)


def _stage_controls(net):
    return [torch.cat([p.detach().reshape(-1) for p in s.params().values()])
            for s in split_stages(net).stages]


def _compare(make, curvature, lr, terminal="projected", warmup=2, vxx_update=True, regression=False,
             **hp):
    hp = dict(hp, vxx_update=vxx_update, terminal_hessian=terminal, feedback_bound=math.inf)
    torch.manual_seed(3)
    net = make()
    opt = DDPNOpt(net, lr=lr, curvature=curvature, **hp)
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
    u_nominal = _stage_controls(net)
    twin = copy.deepcopy(net)
    twin_opt = DDPNOpt(twin, lr=lr, curvature=curvature, feedback=False,
                       **{k: v for k, v in hp.items() if k not in ("vxx_update",
                                                                   "terminal_hessian",
                                                                   "feedback_bound")})
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_opt.step(make_closure(twin, twin_opt, x, y, loss_fn))
    u_base = _stage_controls(twin)
    nominal = copy.deepcopy(net)
    opt.step(make_closure(net, opt, x, y, loss_fn))
    u_fact = _stage_controls(net)
    group = opt.param_groups[0]
    P = [dense_P(v, [opt.curvature.factors(b, group, [opt.state[p] for p in b.params])
                     for b in v.blocks]) for v in opt._views]
    pre, stages = split_stages(nominal)

    def phi(out, i):
        return (loss_fn or nn.functional.cross_entropy)(out[None], y[i:i + 1])

    u_dense = dense_step(stages, pre, u_nominal, u_base, P, x, phi, terminal=terminal,
                         vxx_update=vxx_update)
    fb = max((a - b).abs().max().item() for a, b in zip(u_fact, u_base))
    diff = max((a - b).abs().max().item() for a, b in zip(u_fact, u_dense))
    fb_dense = torch.cat([a - b for a, b in zip(u_dense, u_base)])
    fb_fact = torch.cat([a - b for a, b in zip(u_fact, u_base)])
    rel = ((fb_dense - fb_fact).norm() / fb_dense.norm()).item()
    return fb, diff, rel


@pytest.mark.parametrize("make", [_mlp, _cnn, _generic, _nested],
                         ids=["mlp", "cnn", "generic", "nested"])
@pytest.mark.parametrize("curvature,lr", [("identity", 0.3), ("adam", 0.02), ("ekfac", 0.05),
                                          ("rmsprop", 0.01)])
def test_factorised_equals_dense_gauss_newton(make, curvature, lr):
    fb, diff, _ = _compare(make, curvature, lr)
    assert fb > 1e-6            # the feedback did change the step
    assert diff <= 1e-10


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


def test_run_module_max_pool_fast_path_is_exact():
    from nn_adapter.feedback import run_module
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    x[0, 0, 0, 0] = float("nan")
    for k, s in [(2, None), (3, 3), ((2, 3), (2, 3)), (2, 1)]:
        m = nn.MaxPool2d(k, s)
        a, b = m(x), run_module(m, x)
        assert a.shape == b.shape
        assert torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0))


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


@pytest.mark.parametrize("stage_index", [0, 1])
def test_first_order_check(stage_index):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x0 = torch.randn(B, 4, dtype=torch.float64)
    opt = DDPNOpt(net, lr=1.0, curvature="identity", second_order=True, feedback_bound=math.inf)
    view = opt._views[stage_index]
    stages = split_stages(net).stages
    states = [x0]
    for s in stages:
        states.append(s.forward(s.params(), states[-1]).detach())
    x = states[stage_index]

    def mean_loss_from(t, xt):
        out = xt
        for s in stages[t:]:
            out = s.forward(s.params(), out)
        return NegLog()(out).mean()

    def grad_u(xt):
        return torch.autograd.grad(mean_loss_from(stage_index, xt), view.params)

    # value gradients at the stage (per sample: B x the batch-mean gradient)
    out = view.module_fn(view.params, x)
    h = out.detach().requires_grad_(True)
    y = h
    for m in view.followers:
        y = m(y)
    y_leaf = y.detach().requires_grad_(True)
    g_next = torch.autograd.grad(mean_loss_from(stage_index + 1, y_leaf), y_leaf)[0] * B
    g_h = torch.autograd.grad(y, h, g_next)[0]
    q_u = grad_u(x)
    dx = torch.randn_like(x)
    errs = {}
    for scale in (1e-2, 1e-3):
        d = dx * scale
        fb = feedback_grads(view, x, x + d, g_h)
        fb2 = second_order_grads(view, x, d, g_next)
        pred = torch.cat([(a + b + c).reshape(-1) for a, b, c in zip(q_u, fb, fb2)])
        zeroth = torch.cat([a.reshape(-1) for a in q_u])
        true = torch.cat([a.reshape(-1) for a in grad_u(x + d)])
        errs[scale] = ((pred - true).norm().item(), (zeroth - true).norm().item())
    # with the feedback the error is second order, without it first order
    assert errs[1e-3][0] < errs[1e-2][0] / 50
    assert errs[1e-3][1] > errs[1e-2][1] / 20
    assert errs[1e-3][0] < 1e-3 * errs[1e-3][1]


def test_tikhonov_term_is_eps_fu_fx_dx():
    from torch.func import jacrev

    from nn_adapter.feedback import tikhonov_grads
    torch.manual_seed(0)
    net = _generic()
    opt = DDPNOpt(net, lr=0.1)
    view = opt._views[0]
    x = torch.randn(B, 4, dtype=torch.float64)
    dx = torch.randn_like(x)
    got = torch.cat([t.reshape(-1) for t in tikhonov_grads(view, x, dx, 0.3)])
    params = [p.detach() for p in view.params]
    sizes = [p.numel() for p in params]

    def f(xi, u):
        ps = [c.reshape(p.shape) for c, p in zip(torch.split(u, sizes), params)]
        return view.stage_fn(ps, xi[None])[0]
    u = torch.cat([p.reshape(-1) for p in params])
    want = sum(jacrev(f, 1)(x[i], u).T @ (jacrev(f, 0)(x[i], u) @ dx[i]) for i in range(B))
    assert torch.allclose(got, 0.3 * want / B, atol=1e-12)


def test_dense_feedback_refuses_large_networks():
    from nn_adapter.feedback_dense import dense_gains
    torch.manual_seed(0)
    net = _mlp()
    opt = DDPNOpt(net, lr=0.1, feedback="dense")
    x = torch.randn(B, 4, dtype=torch.float64)
    inputs = [x, torch.tanh(net[0](x)).detach(), torch.tanh(net[2](torch.tanh(net[0](x)))).detach()]
    with pytest.raises(ValueError, match="dense"):
        dense_gains(opt._views, [None] * 3, inputs, torch.randn(B, 3, 3, dtype=torch.float64),
                    max_elements=10)


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
