"""nn_adapter.EKFAC against its dense definition (George et al. 2018), written independently."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from nn_adapter import EKFAC


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(8, 3)).double()


def _batches(n_steps, B=12):
    """B larger than every layer's input size: the Kronecker factors are nonsingular, so their
    eigenbases (and with them EKFAC) are unique."""
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (B,), generator=g)) for _ in range(n_steps)]


def _dense_statistics(net, x, y):
    """Per structured module: batch gradient matrix, A, G and per-sample gradient matrices."""
    params = dict(net.named_parameters())
    B = x.shape[0]

    def loss_i(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, y)
    outs, ins = {}, {}

    def keep(m, args, out):
        ins[m] = args[0]
        out.retain_grad()
        outs[m] = out
    hooks = [m.register_forward_hook(keep) for m in net if isinstance(m, (nn.Linear, nn.Conv2d))]
    F.cross_entropy(net(x), y, reduction="sum").backward()   # d(sum_i phi_i)/dh_i = dphi_i/dh_i
    for h in hooks:
        h.remove()
    stats = []
    for name, m in net.named_children():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(m, nn.Linear):      # (B, in) or (B, L, in): L positions share the weight
            a = ins[m].reshape(B, -1, m.in_features)
            gout = outs[m].grad.reshape(B, -1, m.out_features)
        else:
            a = F.unfold(ins[m], m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            gout = outs[m].grad.flatten(2).transpose(1, 2)
        if m.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        A = torch.einsum("bli,blj->ij", a, a) / (a.shape[0] * a.shape[1])
        G = torch.einsum("bli,blj->ij", gout, gout) / (a.shape[0] * a.shape[1])
        Gi = per_sample[f"{name}.weight"].reshape(B, gout.shape[-1], -1)
        if m.bias is not None:
            Gi = torch.cat([Gi, per_sample[f"{name}.bias"][..., None]], -1)
        stats.append((m, A, G, Gi))
    return stats


def _dense_run(net, batches, lr, damping, decay, eig_every, decoupled_wd=0.0, factor_every=1,
               run=None):
    """EKFAC by its definition, with explicit Kronecker matrices on vec(W|b) (``decoupled_wd``:
    the parameters shrink by 1 - lr wd before each update, as AdamW; ``factor_every``: A and G
    take in the batch at steps 1, 1 + factor_every, ...). ``run``: a dict that receives, per
    module, the final A, G, eigenbases and s (a vector over row-major vec(W|b))."""
    run = {} if run is None else run
    for step, (x, y) in enumerate(batches, start=1):
        net.zero_grad()
        stats = _dense_statistics(net, x, y)
        updates = []
        for m, A, G, Gi in stats:
            st = run.setdefault(m, {})
            if (step - 1) % factor_every == 0:
                st["A"] = A if step == 1 else decay * st["A"] + (1 - decay) * A
                st["G"] = G if step == 1 else decay * st["G"] + (1 - decay) * G
            refresh = (step - 1) % eig_every == 0
            if refresh:
                st["QA"] = torch.linalg.eigh(st["A"]).eigenvectors
                st["QG"] = torch.linalg.eigh(st["G"]).eigenvectors
            kron = torch.kron(st["QG"], st["QA"])                     # row-major vec
            s_b = ((Gi.reshape(len(Gi), -1) @ kron) ** 2).mean(0)
            st["s"] = s_b if refresh else decay * st["s"] + (1 - decay) * s_b
            P = kron @ torch.diag(lr / (st["s"] + damping)) @ kron.T
            mean_grad = Gi.mean(0).reshape(-1)
            updates.append((m, (-P @ mean_grad).reshape(Gi.shape[1:])))
        with torch.no_grad():
            for m, upd in updates:
                m.weight *= 1 - lr * decoupled_wd
                m.weight += upd[:, :m.weight[0].numel()].reshape(m.weight.shape)
                if m.bias is not None:
                    m.bias *= 1 - lr * decoupled_wd
                    m.bias += upd[:, -1]
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _step_with_closures(net, opt, batches):
    """One ``opt.step(closure)`` per batch, the closure computing the cross-entropy of ``net``."""
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.parametrize("steps,eig_every", [(1, 1), (5, 2)])
def test_ekfac_equals_dense_definition(steps, eig_every):
    batches = _batches(steps)
    hp = dict(lr=0.1, damping=1e-2, stat_decay=0.8)
    ours = _net()
    opt = EKFAC(ours, eigen_update_freq=eig_every, **hp)
    _step_with_closures(ours, opt, batches)
    ref = _dense_run(_net(), batches, hp["lr"], hp["damping"], hp["stat_decay"], eig_every)
    got = torch.cat([p.detach().flatten() for p in ours.parameters()])
    start = torch.cat([p.detach().flatten() for p in _net().parameters()])
    assert (ref - start).abs().max() > 1e-3
    assert (got - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("decoupled_wd", [0.0, 0.3])
def test_ekfac_params_style_groups_and_closure_free_steps_equal_dense_definition(decoupled_wd):
    """EKFAC(params, model=...) with one group per layer, stepped without a closure (the records
    of the user's own forward and backward pass), with and without decoupled weight decay."""
    batches = _batches(4)
    hp = dict(lr=0.1, damping=1e-2, stat_decay=0.8)
    ours = _net()
    layers = [m for m in ours if isinstance(m, (nn.Linear, nn.Conv2d))]
    opt = EKFAC([{"params": m.parameters()} for m in layers], model=ours, eigen_update_freq=2,
                weight_decay=decoupled_wd, decoupled_weight_decay=True, **hp)
    assert len(opt.param_groups) == 3
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.step()
    ref = _dense_run(_net(), batches, hp["lr"], hp["damping"], hp["stat_decay"], 2,
                     decoupled_wd)
    got = torch.cat([p.detach().flatten() for p in ours.parameters()])
    assert (got - ref).abs().max() <= 1e-10


def _sequence_net():
    """A bias-free Linear on (B, L, in) inputs (L = 3 positions sharing its weight), then a Linear
    with a bias on the flattened features."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).double()


@pytest.mark.parametrize("factor_every, eig_every", [(1, 3), (2, 1), (2, 3)])
def test_ekfac_on_positions_without_bias_and_sparse_factor_updates_equals_dense_definition(
        factor_every, eig_every):
    """Shared positions, no bias, and K-FAC factors refreshed only every ``factor_update_freq``
    steps (the eigenbases every ``eigen_update_freq``), against the dense definition; the batch
    size changes between steps (an epoch's last batch is smaller), so a wrong per-sample scale of
    A or G would weigh the batches wrongly in the running averages."""
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(b, 3, 4, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (b,), generator=g)) for b in (20, 32, 18, 40, 24, 17)]
    hp = dict(lr=0.2, damping=1e-2, stat_decay=0.7)
    ours = _sequence_net()
    opt = EKFAC(ours, factor_update_freq=factor_every, eigen_update_freq=eig_every, **hp)
    _step_with_closures(ours, opt, batches)
    ref = _dense_run(_sequence_net(), batches, hp["lr"], hp["damping"], hp["stat_decay"], eig_every,
                     factor_every=factor_every)
    got = torch.cat([p.detach().flatten() for p in ours.parameters()])
    start = torch.cat([p.detach().flatten() for p in _sequence_net().parameters()])
    assert (ref - start).abs().max() > 1e-3
    assert (got - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("factor_every, eig_every", [(1, 2), (3, 2)])
def test_ekfac_state_holds_the_running_factors_and_scales_of_the_definition(factor_every,
                                                                           eig_every):
    """The optimizer's state after five steps of changing batch sizes: A and G are the running
    averages of mean_(i,l) a a^T and mean_(i,l) g g^T (g the per-sample output gradient, B times
    the recorded one of the mean loss), and s the running second moment of the per-sample
    gradients in the current eigenbasis, each against the dense definition. The step sees A and
    G only through their eigenvectors, so their scale and sign are checked here."""
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(b, 2, 4, 4, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (b,), generator=g)) for b in (12, 20, 13, 16, 14)]
    hp = dict(lr=0.1, damping=1e-2, stat_decay=0.8)
    ours = _net()
    opt = EKFAC(ours, factor_update_freq=factor_every, eigen_update_freq=eig_every, **hp)
    _step_with_closures(ours, opt, batches)
    run = {}
    _dense_run(_net(), batches, hp["lr"], hp["damping"], hp["stat_decay"], eig_every,
               factor_every=factor_every, run=run)
    mine = [m for m in ours if isinstance(m, (nn.Linear, nn.Conv2d))]
    for m, ref in zip(mine, run.values()):
        st = opt.state[m.weight]
        for key in ("A", "G"):
            scale = ref[key].abs().max()
            assert scale > 1e-3
            assert (st[key] - ref[key]).abs().max() <= 1e-10 * scale, key
        s_ref = ref["s"].reshape(st["scale"].shape)
        assert (st["scale"] - s_ref).abs().max() <= 1e-9 * s_ref.abs().max()


def test_ekfac_other_parameters_get_a_diagonal_curvature():
    """A LayerNorm's weight: P = lr / (v + damping), v the running average of the squared batch
    gradient (decay ``stat_decay``), with L2 weight decay in the gradient (two steps)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    opt = EKFAC(net, lr=0.1, damping=0.5, stat_decay=0.6, weight_decay=0.2)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    w = net[1].weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss
    v = None
    for step in range(2):
        opt.step(closure)
        g = net[1].weight.grad + 0.2 * w
        v = g ** 2 if v is None else 0.6 * v + 0.4 * g ** 2
        w = w - 0.1 * g / (v + 0.5)
        assert (g.abs() > 1e-6).any()
        assert torch.allclose(net[1].weight.detach(), w, atol=1e-12)
        x = x.flip(0)


def test_ekfac_bad_input():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="damping"):
        EKFAC(net, damping=0.0)
    with pytest.raises(ValueError, match="eigen_update_freq"):
        EKFAC(net, eigen_update_freq=0)
    with pytest.raises(ValueError, match="stat_decay"):
        EKFAC(net, stat_decay=1.0)
    opt = EKFAC(net)
    assert opt.step() is None                # no gradients yet: nothing to do, as torch
    assert len(opt.state) == 0
    with pytest.raises(ValueError, match="closure"):
        opt.step("not a closure")
    with pytest.raises(TypeError, match="model"):
        EKFAC(net.parameters())


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2),
                                padding=(0, 2), dilation=(1, 2)), dict(kernel_size=3, stride=2),
                                dict(kernel_size=1, bias=False)])
def test_per_sample_conv_gradients_match_autograd(kw):
    from nn_adapter.curvature import find_blocks
    from nn_adapter.curvature.kron import per_sample_grads
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kw).double()
    x = torch.randn(5, 3, 7, 6, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    block = find_blocks(conv)[0]
    ref = []
    for i in range(5):
        grads = torch.autograd.grad(conv(x[i:i + 1]), block.params, g[i:i + 1])
        ref.append(torch.cat([grads[0].reshape(4, -1)] + ([grads[1][:, None]]
                                                            if len(grads) > 1 else []), 1))
    got = torch.cat([G for _, G in per_sample_grads(block, x, g)])
    assert torch.allclose(got, torch.stack(ref), atol=1e-12)


def test_ekfac_under_autocast_keeps_its_factors_in_the_parameters_dtype():
    """bfloat16 activations and gradients (CPU autocast) are recorded in float32, the modules'
    dtype: the factors and eigenbases are float32 (eigh has no bfloat16 kernel) and it trains."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(32, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = EKFAC(net.parameters(), model=net, lr=0.01)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    st = opt.state[net[0].weight]
    assert {st[k].dtype for k in ("A", "G", "QA", "QG", "scale")} == {torch.float32}


class _FixedBias(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x):
        return x + self.bias[:, None, None]


@pytest.mark.parametrize("how", ["frozen", "left_out"])
def test_ekfac_on_a_convolution_whose_bias_it_does_not_train_equals_dense_definition(how):
    """A Conv2d whose bias is frozen (or not given to the optimizer) is a weight-only block: the
    dense definition of the same network with that bias a constant. Before, the per-sample
    gradients kept a (garbage) bias column and EKFAC failed on the second conv's (12 + 1) x 12
    product."""
    batches = _batches(3)
    hp = dict(lr=0.1, damping=1e-2, stat_decay=0.8)
    ours = _net()
    if how == "frozen":
        ours[2].bias.requires_grad_(False)
        opt = EKFAC(ours, eigen_update_freq=2, **hp)
    else:
        opt = EKFAC([p for n, p in ours.named_parameters() if n != "2.bias"], model=ours,
                    eigen_update_freq=2, **hp)
    _step_with_closures(ours, opt, batches)
    start = _net()
    conv = nn.Conv2d(3, 2, 2, stride=2, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(start[2].weight)
    ref_net = nn.Sequential(start[0], start[1], conv, _FixedBias(start[2].bias), start[3], start[4])
    before = torch.cat([p.detach().flatten() for p in ref_net.parameters()])
    ref = _dense_run(ref_net, batches, hp["lr"], hp["damping"], hp["stat_decay"], 2)
    got = torch.cat([p.detach().flatten() for n, p in ours.named_parameters() if n != "2.bias"])
    assert torch.equal(ours[2].bias, _net()[2].bias)
    assert (ref - before).abs().max() > 1e-3
    assert (got - ref).abs().max() <= 1e-10


class _Branches(nn.Module):
    """A head computed but unused, and a layer run under no_grad (a frozen feature step)."""

    def __init__(self, extra=True):
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.a, self.aux, self.b = (nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 2),
                                              nn.Linear(6, 3))
        self.extra = extra

    def forward(self, x):
        if self.extra:
            with torch.no_grad():
                x = self.pre(x)
        h = torch.tanh(self.a(x))
        if self.extra:
            self.aux(h)
        return self.b(h)


def test_ekfac_leaves_modules_without_gradient_alone():
    """As torch.optim: layers whose parameters get no gradient (an unused head, a layer under
    no_grad) are not updated, and the others step as in a model without them (before: an
    InputError, 'no gradient reached' / 'ran 0 times')."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    ours, plain = _Branches().double(), _Branches(extra=False).double()
    with torch.no_grad():
        fixed = ours.pre(x)
    before = [p.detach().clone() for p in ours.parameters()]
    opts = [EKFAC(ours, lr=0.05), EKFAC(plain, lr=0.05)]
    for _ in range(3):
        for net, opt, inp in zip((ours, plain), opts, (x, fixed)):
            _step_with_closures(net, opt, [(inp, y)])
    for name in ("pre", "aux"):
        fresh = getattr(_Branches().double(), name)
        for p, q in zip(getattr(ours, name).parameters(), fresh.parameters()):
            assert torch.equal(p, q)
    for name in ("a", "b"):
        for p, q in zip(getattr(ours, name).parameters(), getattr(plain, name).parameters()):
            assert torch.allclose(p, q, atol=1e-14, rtol=0)
    assert not torch.equal(ours.a.weight, before[2])


@pytest.mark.parametrize("reentrant", [False, True])
def test_ekfac_under_activation_checkpointing_steps_as_without_it(reentrant):
    """torch.utils.checkpoint runs its region again in the backward pass (non-reentrant: the
    recomputation, not a second run, before counted as one: 'ran 2 times'; reentrant: the only
    run with gradients): the same steps as the model without the checkpoint."""
    import torch.utils.checkpoint as cp

    class Net(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.inner, self.mode = _net(), mode

        def forward(self, x):
            h = self.inner[:2](x)

            def body(h):                 # (tanh saves its output: the recomputation runs the
                return torch.tanh(self.inner[2](h))    # conv to its end, its hooks included)
            h = body(h) if self.mode is None else cp.checkpoint(body, h, use_reentrant=self.mode)
            return self.inner[4](self.inner[3](h))
    nets = [Net(reentrant), Net(None)]
    for n in nets:
        _step_with_closures(n, EKFAC(n, lr=0.1, damping=1e-2), _batches(3))
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.allclose(p, q, atol=1e-13, rtol=0)
    assert not torch.equal(nets[0].inner[2].weight, _net()[2].weight)
