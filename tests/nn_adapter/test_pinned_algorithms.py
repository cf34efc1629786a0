"""Issue 13, class 9 (nn_adapter side): tests a wrong implementation cannot pass.

- ``eps_vxx`` (Algorithm 3, line 12: V_xx + eps I at each module's output) against a closed form
  on a two-layer network, in both feedback modes: its effect on the last layer is exactly
  -P (eps / B) sum_i h_u^(i)T h_x^(i) dx^(i) = -P eps mean_i [(W dx_i) [a_i; 1]^T], so a flipped
  sign, a lost 1/B or a dropped term fails.
- The inverse curvature P that preconditions the feedback, for SGD, RMSprop (plain, centered)
  and Adam (plain, AMSGrad), against the state torch.optim's own optimizer holds after the same
  steps (the feedback uses P alone, which the update-for-update reductions do not separate
  from the first moment).
- The per-parameter path of the diagonal curvatures (parameters whose step counts differ, as
  when one gets no gradient in some steps) against torch.optim.Adam / RMSprop update for update.

EKFAC is pinned against its dense definition in test_ekfac.py and the base optimizers update
for update in test_ddpnopt_reductions.py.
"""
import copy
import math

import pytest
import torch
from torch import nn

from nn_adapter import DDPNOpt

B = 6


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


def _closure(opt, net, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    return closure


def _adam_p(opt, p, lr):
    st, group = opt.state[p], opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    return lr / ((st["exp_avg_sq"] / (1 - beta2 ** st["step"])).sqrt() + eps)


@pytest.mark.parametrize("feedback", ["factorised", "dense"])
@pytest.mark.parametrize("curvature,lr", [("identity", 0.5), ("adam", 0.05)])
def test_eps_vxx_adds_minus_p_eps_hu_hx_dx_to_the_last_layer(feedback, curvature, lr):
    eps = 0.7
    x, y = _batch(1)
    runs = {}
    for e in (0.0, eps):
        net = _net()
        opt = DDPNOpt(net, lr=lr, curvature=curvature, feedback=feedback, eps_vxx=e,
                      vxx_update=False, feedback_bound=math.inf)
        before = copy.deepcopy(net)          # (one step from the same start: eps acts on each)
        opt.step(_closure(opt, net, x, y))
        runs[e] = (before, net, opt)
    before, net, opt = runs[eps]
    base = runs[0.0][1]
    # stage 0 (x_0 fixed, no feedback) does not see eps at all
    assert torch.equal(net[0].weight, base[0].weight) and torch.equal(net[0].bias, base[0].bias)
    with torch.no_grad():
        a = torch.tanh(before[0](x))                      # the last layer's input, nominal
        dx = torch.tanh(net[0](x)) - a                    # and its change in the feedback pass
        hx_dx = dx @ before[2].weight.T                   # h_x dx = W dx, (B, 3)
        q_w = eps * hx_dx.T @ a / B                       # (eps/B) sum_i h_u^T h_x dx_i: (W dx) a^T
        q_b = eps * hx_dx.mean(0)
    if curvature == "identity":
        p_w = p_b = lr
    else:
        p_w, p_b = _adam_p(opt, net[2].weight, lr), _adam_p(opt, net[2].bias, lr)
    got_w = net[2].weight.detach() - base[2].weight.detach()
    got_b = net[2].bias.detach() - base[2].bias.detach()
    assert dx.abs().max() > 1e-3 and q_w.abs().max() > 1e-4          # the term is not negligible
    torch.testing.assert_close(got_w, -p_w * q_w, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(got_b, -p_b * q_b, rtol=1e-9, atol=1e-13)


CURVATURES = [
    ("identity", dict(), lambda ps: torch.optim.SGD(ps, lr=0.1),
     lambda st, g, lr: torch.full_like(g, lr)),
    ("identity", dict(momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
     lambda st, g, lr: torch.full_like(g, lr)),
    ("rmsprop", dict(alpha=0.9, eps=1e-3),
     lambda ps: torch.optim.RMSprop(ps, lr=0.1, alpha=0.9, eps=1e-3),
     lambda st, g, lr: lr / (st["square_avg"].sqrt() + 1e-3)),
    ("rmsprop", dict(alpha=0.9, eps=1e-3, centered=True, momentum=0.5),
     lambda ps: torch.optim.RMSprop(ps, lr=0.1, alpha=0.9, eps=1e-3, centered=True, momentum=0.5),
     lambda st, g, lr: lr / ((st["square_avg"] - st["grad_avg"] ** 2).sqrt() + 1e-3)),
    ("adam", dict(betas=(0.8, 0.95), eps=1e-3),
     lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.95), eps=1e-3),
     lambda st, g, lr: lr / ((st["exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))).sqrt() + 1e-3)),
    ("adam", dict(betas=(0.8, 0.95), eps=1e-3, amsgrad=True),
     lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.95), eps=1e-3, amsgrad=True),
     lambda st, g, lr: lr / ((st["max_exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))).sqrt()
                             + 1e-3)),
]


@pytest.mark.parametrize("curvature,hp,make_torch,p_of_torch_state", CURVATURES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CURVATURES)])
def test_the_feedback_preconditioner_p_equals_torch_optimizers_state(curvature, hp, make_torch,
                                                                     p_of_torch_state):
    net, twin = _net(), _net()
    opt = DDPNOpt(net, lr=0.1, curvature=curvature, feedback=False, **hp)
    ref = make_torch(twin.parameters())
    for s in range(5):
        x, y = _batch(20 + s)
        opt.step(_closure(opt, net, x, y))
        ref.step(_closure(ref, twin, x, y))
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)   # same iterates, same grads
    factors = opt._factors_of(opt._blocks)
    for block, (q_g, q_a, scales) in zip(opt._blocks, factors):
        assert q_g is None and q_a is None              # diagonal curvatures: no bases
        for p, scale in zip(block.params, scales):
            twin_p = dict(zip(map(id, net.parameters()), twin.parameters()))[id(p)]
            assert set(opt.state[p]) == set(ref.state[twin_p])      # the same state, no more
            want = p_of_torch_state(ref.state[twin_p], twin_p.grad, 0.1)
            scale = torch.broadcast_to(torch.as_tensor(scale, dtype=want.dtype), want.shape)
            torch.testing.assert_close(scale, want, rtol=1e-10, atol=1e-14)


class _TwoHeads(nn.Module):
    """``head_b`` runs only when asked: its step count falls behind ``head_a``'s."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.head_a = nn.Linear(4, 3).double()
        self.head_b = nn.Linear(4, 3).double()

    def forward(self, x, use_b):
        return self.head_a(x) + (self.head_b(x) if use_b else 0.0)


@pytest.mark.parametrize("curvature,hp,make_torch", [
    ("adam", dict(betas=(0.8, 0.9)), lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9))),
    ("rmsprop", dict(centered=True), lambda ps: torch.optim.RMSprop(ps, lr=0.05, centered=True)),
    ("identity", dict(momentum=0.9, nesterov=True),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
])
def test_parameters_with_different_step_counts_follow_torch(curvature, hp, make_torch):
    net, twin = _TwoHeads(), _TwoHeads()
    opt = DDPNOpt(net.parameters(), lr=0.05, curvature=curvature, feedback=False, **hp)
    ref = make_torch(twin.parameters())
    for s, use_b in enumerate([True, False, False, True, False, True]):
        x, y = _batch(40 + s)
        for o, m in ((opt, net), (ref, twin)):
            o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x, use_b), y).backward()
            o.step()
        for a, b in zip(net.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if curvature != "identity":          # (SGD keeps no step count)
        assert opt.state[net.head_b.weight]["step"] == 3 != opt.state[net.head_a.weight]["step"]


@pytest.mark.parametrize("curvature,hp,make_torch", [
    ("identity", dict(momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ("rmsprop", dict(alpha=0.9, weight_decay=1.0),
     lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, weight_decay=1.0)),
    ("adam", dict(betas=(0.8, 0.9), weight_decay=0.1),
     lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)),
    ("adam", dict(amsgrad=True, weight_decay=1.0),
     lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True, weight_decay=1.0)),
])
@pytest.mark.parametrize("diagnostics", [False, True], ids=["fused", "diagnostics"])
def test_the_feedback_path_open_loop_step_is_torchs_over_many_steps(curvature, hp, make_torch,
                                                                     diagnostics):
    """One parametrised module: x_0 is fixed, so there is no feedback and DDPNOpt's feedback
    path (its own k, :mod:`nn_adapter.minibatch`; with diagnostics through the curvature's
    ``direction``, else fused in ``apply``) must be the base optimizer's step, at every step
    (bias corrections beta^t, not beta t)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    twin = copy.deepcopy(net)
    lr = make_torch([torch.zeros(1, requires_grad=True)]).defaults["lr"]
    opt = DDPNOpt(net, lr=lr, curvature=curvature, feedback=True, loss="mse",
                  diagnostics=diagnostics, **hp)
    ref = make_torch(twin.parameters())
    for s in range(6):
        x, y = _batch(60 + s)
        for o, m in ((opt, net), (ref, twin)):
            def closure(o=o, m=m):
                o.zero_grad()
                loss = nn.functional.mse_loss(m(x), nn.functional.one_hot(y, 3).double())
                loss.backward()
                return loss
            o.step(closure)
        for a, b in zip(net.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
