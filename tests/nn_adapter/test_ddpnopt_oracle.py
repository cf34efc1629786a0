"""A dense per-sample DDP oracle for DDPNOpt's feedback on any model, with torch.func (tests only).

Stages are the modules owning parameters, in the order the model runs them (found here with
hooks, independently of nn_adapter). For every sample it materialises, per stage t (last to
first): J_t = d out / d h_t (the Jacobian of the model's output with respect to the module's
output, through the whole graph: skips included), the module Jacobians h_x, h_u, and carries an
output-space matrix M (C x C, M_T = the terminal value Hessian):

    V_h = J_t^T M J_t,  Q_xx = h_x^T V_h h_x,  Q_ux = h_u^T V_h h_x (+ eps h_u^T h_x,
    + V_x . h_ux with second order),  mu = the smallest factor >= 1 making
    [[Q_xx, Q_xu], [Q_ux, mu P^-1]] positive semi-definite,  K^(i) = -P Q_ux / mu,
    M <- M - M J_t h_u P h_u^T J_t^T M / mu.

For a chain this is exact per-sample DDP (V_xx = Q_xx - Q_ux^T P Q_ux / mu at the stage input,
pulled back through the activation); for a graph it is its definition. Then Algorithm 3's
additional forward pass on a copy of the model: each stage's parameters set to
u_base + (1/B) sum_i K^(i) dx^(i) just before it runs. Independent of nn_adapter except for P.
"""
import copy

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from nn_adapter.feedback import precondition


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(vec, like):
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def stage_modules(model, x):
    """Modules owning trainable parameters, in the order ``model(x)`` runs them."""
    order, handles = [], []
    for m in model.modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: order.append(mod) if mod not in order else None))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return order


def stage_controls(model, x):
    """Flattened parameters of each stage (``named_parameters(recurse=False)`` order)."""
    return [_flat([p.detach() for p in m.parameters(recurse=False)]) for m in stage_modules(model, x)]


def dense_P(stage, factors):
    """P of one stage as an (m, m) matrix over the flattened stage parameters (block order)."""
    params = stage.params
    m = sum(p.numel() for p in params)
    eye = torch.eye(m, dtype=params[0].dtype)
    cols = [_flat(precondition(stage, factors, _unflat(eye[j], params))) for j in range(m)]
    return torch.stack(cols, 1)


def convexifying_mu(P, qxx, qux):
    """The smallest mu >= 1 with [[Q_xx, Q_xu], [Q_ux, mu P^-1]] positive semi-definite:
    mu = lambda_max(Q_ux Q_xx^+ Q_xu P) (the Schur complement in u must be >= 0)."""
    m = qux @ torch.linalg.pinv(qxx, hermitian=True, rtol=1e-10) @ qux.T @ P
    return max(1.0, torch.linalg.eigvals(m).real.max().item())


def _module_fn(module, u, like, x):
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return functional_call(module, dict(zip(names, _unflat(u, like))), (x[None],))[0]


def dense_step(model, x, u_base, P, per_sample_loss, terminal="gradient", eps_vxx=0.0,
               vxx_update=True, second_order=False):
    """Parameters of each stage after one DDPNOpt step computed densely, per sample.

    Args:
        model: the network at the nominal parameters (not modified).
        x: the batch (B, ...).
        u_base: list (per stage) of flattened u + k (the base optimizer's result).
        P: list of dense (m_t, m_t) inverse curvatures.
        per_sample_loss: phi(y, i) for one sample's output and its index.
        terminal: "gradient" (V_x V_x^T), "gauss_newton" (the loss Hessian H; cross-entropy on
            logits and mean squared error are their own Gauss-Newton), "projected"
            ((V_x^T H V_x / |V_x|^4) V_x V_x^T).

    Returns:
        list of flattened new controls per stage.
    """
    mods = stage_modules(model, x)
    T, B = len(mods), x.shape[0]
    likes = [[p.detach() for p in m.parameters(recurse=False)] for m in mods]
    u_nom = [_flat(lk) for lk in likes]
    gains = [[None] * B for _ in range(T)]
    nominal_in = [[None] * B for _ in range(T)]
    for i in range(B):
        xi = x[i:i + 1]
        ins, outs = {}, {}

        def rec_pre(mod, args):
            ins[mod] = args[0][0].detach()

        def rec_post(mod, args, out):
            outs[mod] = out[0].detach()
        hs = [m.register_forward_pre_hook(rec_pre) for m in mods]
        hs += [m.register_forward_hook(rec_post) for m in mods]
        with torch.no_grad():
            y = model(xi)[0]
        for h in hs:
            h.remove()
        phi = lambda yy: per_sample_loss(yy, i)  # noqa: E731
        vx = jacrev(phi)(y).reshape(-1)
        H = hessian(phi)(y).reshape(vx.numel(), vx.numel())
        if terminal == "gauss_newton":
            M = H
        elif terminal == "projected":
            M = (vx @ H @ vx) / (vx @ vx) ** 2 * torch.outer(vx, vx)
        else:
            M = torch.outer(vx, vx)
        for t in range(T - 1, -1, -1):
            mod = mods[t]
            nominal_in[t][i] = ins[mod]

            def out_of(delta, mod=mod):   # the model's output with h_t moved by delta
                h = mod.register_forward_hook(lambda m_, a_, o: o + delta.reshape(o.shape))
                try:
                    return model(xi)[0].reshape(-1)
                finally:
                    h.remove()
            J = jacrev(out_of)(torch.zeros(outs[mod].numel(), dtype=x.dtype))     # (C, n_out)
            f = lambda xx, uu, mod=mod, lk=likes[t]: _module_fn(mod, uu, lk, xx).reshape(-1)  # noqa
            hx = jacrev(f, 0)(ins[mod], u_nom[t]).reshape(-1, ins[mod].numel())
            hu = jacrev(f, 1)(ins[mod], u_nom[t])
            Vh = J.T @ M @ J
            qxx, qux = hx.T @ Vh @ hx, hu.T @ Vh @ hx
            mu = convexifying_mu(P[t], qxx, qux) if vxx_update else 1.0
            if eps_vxx:
                qux = qux + eps_vxx * hu.T @ hx
            if second_order:
                v = J.T @ vx

                def vhx(uu, f=f, xx=ins[mod]):
                    return jacrev(f, 0)(xx, uu).reshape(-1, xx.numel()).T @ v
                qux = qux + jacrev(vhx)(u_nom[t]).T
            gains[t][i] = -P[t] @ qux / mu
            if vxx_update:
                G = J @ hu
                M = M - M @ G @ P[t] @ G.T @ M / mu
                M = 0.5 * (M + M.T)
    twin = copy.deepcopy(model)
    tmods = stage_modules(twin, x)
    new = [None] * T

    def pre(mod, args):
        t = tmods.index(mod)
        dx = args[0].detach() - torch.stack(nominal_in[t])
        du = sum(gains[t][i] @ dx[i].reshape(-1) for i in range(B)) / B if t > 0 else 0.0
        new[t] = u_base[t] + du
        with torch.no_grad():
            for p, v in zip(mod.parameters(recurse=False), _unflat(new[t], likes[t])):
                p.copy_(v)
    hs = [m.register_forward_pre_hook(pre) for m in tmods]
    with torch.no_grad():
        twin(x)
    for h in hs:
        h.remove()
    return new


# -- the oracle checked against closed forms --------------------------------------------------------
def test_oracle_jacobian_through_a_skip_is_the_whole_graph():
    """J = d out / d h_t includes the skip: on out = l2(a + tanh(l1(a))) the Jacobian at l1's
    output is l2.W diag(1 - tanh^2)."""
    torch.manual_seed(0)
    l1, l2 = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = l1, l2

        def forward(self, a):
            return self.l2(a + torch.tanh(self.l1(a)))
    net = Net()
    a = torch.randn(1, 3, dtype=torch.float64)
    assert stage_modules(net, a) == [l1, l2]
    h = l1(a).detach()[0]
    want = l2.weight.detach() * (1 - torch.tanh(h) ** 2)

    def out_of(delta):
        hk = l1.register_forward_hook(lambda m_, a_, o: o + delta.reshape(o.shape))
        try:
            return net(a)[0]
        finally:
            hk.remove()
    got = jacrev(out_of)(torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(got, want, atol=1e-12)


def test_convexifying_mu_makes_the_local_model_psd():
    torch.manual_seed(1)
    A = torch.randn(4, 2, dtype=torch.float64)
    G = torch.randn(3, 2, dtype=torch.float64)
    qxx, qux = A @ A.T, G @ A.T
    P = torch.eye(3, dtype=torch.float64) * 5.0
    mu = convexifying_mu(P, qxx, qux)
    full = torch.cat([torch.cat([qxx, qux.T], 1), torch.cat([qux, mu * torch.linalg.inv(P)], 1)])
    assert mu > 1 and torch.linalg.eigvalsh(full).min() > -1e-9
    full = torch.cat([torch.cat([qxx, qux.T], 1),
                      torch.cat([qux, 0.99 * mu * torch.linalg.inv(P)], 1)])
    assert torch.linalg.eigvalsh(full).min() < -1e-9
