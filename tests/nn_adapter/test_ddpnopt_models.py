"""DDPNOpt with feedback on real models: custom forward, residual blocks, dropout and batch norm in
training mode, weight sharing, torch.compile, data-dependent paths."""
import copy
import math
import re

import pytest
import torch
from torch import nn

from nn_adapter import DDPNOpt
from nn_adapter.errors import UnsupportedModuleError
from nn_adapter.training import make_closure
from occore.errors import InputError


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.l3(self.drop(torch.tanh(self.l2(self.drop(torch.tanh(self.l1(x)))))))


def _data(n=32, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_feedback_pass_sees_the_closures_dropout_masks():
    """The feedback pass re-runs the model's forward with the RNG state of the closure's forward:
    the stage inputs it measures differ from the recorded ones only through the updated
    parameters (so with lr = 0 they are identical), and the global RNG stream is unchanged."""
    torch.manual_seed(0)
    net = DropNet().double().train()
    opt = DDPNOpt(net, lr=0.0, curvature="identity")
    x, y = _data()
    seen = {}

    def spy(mod, args):
        if not torch.is_grad_enabled():
            seen.setdefault(mod, []).append(args[0].clone())
    recorded = {}

    def rec(mod, args):
        if torch.is_grad_enabled():
            recorded[mod] = args[0].detach().clone()
    hooks = [m.register_forward_pre_hook(spy) for m in (net.l2, net.l3)]
    hooks += [m.register_forward_pre_hook(rec) for m in (net.l2, net.l3)]
    torch.manual_seed(5)
    opt.step(make_closure(net, opt, x, y))
    after_step = torch.rand(3)
    torch.manual_seed(5)
    with torch.enable_grad():
        nn.functional.cross_entropy(net(x), y)
    after_forward = torch.rand(3)
    for h in hooks:
        h.remove()
    assert torch.equal(after_step, after_forward)          # the RNG stream moved once
    for m in (net.l2,):
        assert torch.equal(seen[m][0], recorded[m])      # same masks: identical inputs at lr = 0
        assert (recorded[m] == 0).float().mean() > 0.3   # dropout was active


def test_dropout_model_trains_with_feedback():
    """Training-mode dropout: DDPNOpt's loss falls as its base optimizer's does."""
    x, y = _data(64)
    final = {}
    for feedback in (True, False):
        torch.manual_seed(0)
        net = DropNet().double().train()
        opt = DDPNOpt(net, lr=0.01, curvature="adam", feedback=feedback)
        closure = make_closure(net, opt, x, y)
        losses = [float(opt.step(closure)) for _ in range(80)]
        final[feedback] = sum(losses[-10:]) / 10
        assert final[feedback] < 0.85 * sum(losses[:5]) / 5
    assert final[True] < 1.1 * final[False]


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(x))))


def test_batch_norm_running_statistics_advance_once_per_step():
    torch.manual_seed(0)
    net = BNNet().double().train()
    twin = BNNet().double().train()
    twin.load_state_dict(net.state_dict())
    opt = DDPNOpt(net, lr=0.01, curvature="adam", terminal_hessian="gauss_newton")
    x, y = _data()
    opt.step(make_closure(net, opt, x, y))
    assert int(net.bn.num_batches_tracked) == 1
    with torch.no_grad():
        twin(x)                                   # one training-mode forward from the same start
    assert torch.allclose(net.bn.running_mean, twin.bn.running_mean, atol=0, rtol=0)
    assert torch.allclose(net.bn.running_var, twin.bn.running_var, atol=0, rtol=0)
    assert not torch.equal(net.bn.weight, twin.bn.weight)     # the affine parameters were trained


def test_batch_norm_model_trains_with_feedback():
    torch.manual_seed(0)
    net = BNNet().double().train()
    opt = DDPNOpt(net, lr=0.02, curvature="adam")
    x, y = _data(64)
    closure = make_closure(net, opt, x, y)
    losses = [float(opt.step(closure)) for _ in range(40)]
    assert math.isfinite(losses[-1]) and losses[-1] < 0.7 * losses[0]


def test_weight_sharing_is_refused_naming_the_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    net = Shared().double()
    opt = DDPNOpt(net, lr=0.01)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(InputError, match=r"module 'inner' \(Linear\) ran 2 times"):
        opt.step(make_closure(net, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


class _Tied(nn.Module):
    """Two Linear modules holding the same weight tensor (tied weights), each run once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_tied_weights_are_refused_with_feedback_naming_both_modules():
    """The per-sample feedback of stage 'a' would see only its own share of the tied weight's
    gradient; without feedback DDPNOpt is Adam on the tied parameters."""
    torch.manual_seed(0)
    net = _Tied().double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    opt = DDPNOpt(net.parameters(), model=net, lr=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(UnsupportedModuleError, match=r"parameter 'weight' of module 'b' \(Linear\) is also "
                       r"a parameter of module 'a' \(Linear\).*weight sharing.*feedback=False"):
        opt.step(make_closure(net, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    twin = copy.deepcopy(net)
    plain = DDPNOpt(net.parameters(), model=net, lr=0.01, feedback=False)
    adam = torch.optim.Adam(twin.parameters(), lr=0.01)
    for _ in range(3):
        plain.step(make_closure(net, plain, x, y))
        adam.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        adam.step()
    assert net.b.weight is net.a.weight
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


class _Recurrent(nn.Module):
    """A Linear, then an LSTM (returns a tuple), then a Linear; or the LSTM first."""

    def __init__(self, lstm_first=False):
        super().__init__()
        self.lstm_first = lstm_first
        self.pre = nn.Linear(6, 6)
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        if self.lstm_first:
            return self.out(self.rnn(x.reshape(-1, 2, 3))[0][:, -1])
        h = torch.tanh(self.pre(x)).reshape(-1, 2, 3)
        return self.out(self.rnn(h)[0][:, -1])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.pre(x)).reshape(-1, 2, 4)
        return self.out(self.attn(h, h, h)[0].mean(1))


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 6))

    def forward(self, x, k=1.0):
        return x * self.w * k


class _ExtraArgument(nn.Module):
    """A stage after the first called with a further argument (positional or keyword): its
    per-sample gradients would be taken of module(x) alone (wrong numbers, not an error)."""

    def __init__(self, keyword=False):
        super().__init__()
        self.keyword = keyword
        self.pre = nn.Linear(6, 6)
        self.scale = _Scale()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        return self.out(self.scale(h, k=3.0) if self.keyword else self.scale(h, 3.0))


@pytest.mark.parametrize("make,module,why", [
    (lambda: _Recurrent(), "'rnn' (LSTM)", "returns a tuple"),
    (_Attention, "'attn' (MultiheadAttention)", "takes 3 tensor inputs"),
    (_ExtraArgument, "'scale' (_Scale)", "called with further arguments \\(1 positional\\)"),
    (lambda: _ExtraArgument(keyword=True), "'scale' (_Scale)", "further arguments \\(keyword 'k'\\)"),
])
def test_a_stage_that_is_not_one_tensor_to_one_tensor_is_refused_naming_it(make, module, why):
    net = make().double()
    opt = DDPNOpt(net.parameters(), model=net, lr=0.01)
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(UnsupportedModuleError, match=re.escape(module) + ".*" + why + ".*feedback=False"):
        opt.step(make_closure(net, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    plain = DDPNOpt(net.parameters(), model=net, lr=0.01, feedback=False)   # the way out it names
    plain.step(make_closure(net, plain, x, y))
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


class _TwoOutputs(nn.Module):
    """Returns the logits and a hidden feature, as a tuple or a dict."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.as_dict = as_dict
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return {"logits": self.out(h), "h": h} if self.as_dict else (self.out(h), h)


@pytest.mark.parametrize("as_dict,kind", [(False, "tuple"), (True, "dict")])
def test_a_model_returning_several_tensors_is_refused_naming_what_it_returns(as_dict, kind):
    """The terminal Gauss-Newton curvature is taken at the model's output, which must be one
    tensor; the outer-product terminal factor reads only the last stage and trains such a model."""
    torch.manual_seed(0)
    net = _TwoOutputs(as_dict).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    pick = (lambda o: o["logits"]) if as_dict else (lambda o: o[0])

    def closure_of(opt):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(pick(net(x)), y)
            loss.backward()
            return loss.detach()
        return closure

    opt = DDPNOpt(net.parameters(), model=net, lr=0.05)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(UnsupportedModuleError, match=f"model: returns a {kind}, not one tensor.*"
                       "terminal_hessian='gradient' or feedback=False"):
        opt.step(closure_of(opt))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    outer = DDPNOpt(net.parameters(), model=net, lr=0.05, terminal_hessian="gradient")
    losses = [float(outer.step(closure_of(outer))) for _ in range(20)]
    assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0]


def test_a_recurrent_first_stage_trains_with_feedback():
    """The first stage's input is fixed (no feedback there), so any module may come first."""
    torch.manual_seed(0)
    net = _Recurrent(lstm_first=True).double()
    opt = DDPNOpt(net.parameters(), model=net, lr=0.02, curvature="adam")
    x = torch.randn(32, 6, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    closure = make_closure(net, opt, x, y)
    losses = [float(opt.step(closure)) for _ in range(30)]
    assert math.isfinite(losses[-1]) and losses[-1] < 0.8 * losses[0]


def test_a_compiled_model_gets_a_clear_error():
    net = nn.Sequential(nn.Linear(3, 2))
    compiled = torch.compile(net)
    with pytest.raises(UnsupportedModuleError, match="_orig_mod"):
        opt = DDPNOpt(compiled, lr=0.01)
        opt.step(make_closure(compiled, opt, torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_a_forward_that_changes_path_in_the_feedback_pass_is_an_error():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            h = self.a(x) if self.calls % 2 else self.b(x)
            return self.out(torch.tanh(h))

    net = Gate().double()
    opt = DDPNOpt(net, lr=0.01)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    with pytest.raises(InputError, match="another path"):
        opt.step(make_closure(net, opt, x, y))


def test_the_model_must_be_called_once_in_the_closure():
    net = nn.Sequential(nn.Linear(3, 2)).double()
    opt = DDPNOpt(net, lr=0.01)
    x = torch.randn(4, 3, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        with torch.no_grad():
            pass
        loss = net[0](x).square().mean()      # the model itself is never called
        loss.backward()
        return loss
    with pytest.raises(InputError, match="called 0 times"):
        opt.step(closure)


class DigitsResNet(nn.Module):
    """8x8 DIGITS images: a stem conv, one residual block (custom forward), a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        return self.head(nn.functional.max_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("curvature,lr", [("adam", 1e-2), ("ekfac", 1e-2)])
def test_a_residual_network_trains_on_digits(curvature, lr):
    """A custom forward with a residual block on a real data set (DIGITS): the training loss
    falls as its base optimizer's does, and the test accuracy is well above chance."""
    from nn_adapter.data import load_digits
    data = load_digits(images=True)
    x, y = data.x_train[:512], data.y_train[:512]
    final = {}
    for feedback in (True, False):
        torch.manual_seed(0)
        net = DigitsResNet()
        opt = DDPNOpt(net.parameters(), lr=lr, curvature=curvature, model=net, feedback=feedback)
        g = torch.Generator().manual_seed(0)
        for epoch in range(8):
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = opt.step(make_closure(net, opt, x[idx], y[idx]))
        with torch.no_grad():
            final[feedback] = (nn.functional.cross_entropy(net(x), y).item(),
                               (net(data.x_test).argmax(1) == data.y_test).float().mean().item())
    assert final[True][0] < 0.05 * math.log(10)
    assert final[True][0] < 2.0 * final[False][0] + 0.02          # near convergence: noise
    assert final[True][1] > 0.9


class _SeesAutocast(nn.Module):
    """Parameter-free: notes, at every call, whether CPU autocast is on."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return torch.tanh(x)


def _autocast_closure(net, opt, x, y):
    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach()
    return closure


@pytest.mark.parametrize("options", [dict(), dict(terminal_hessian="gauss_newton"),
                                     dict(feedback="dense"), dict(curvature="ekfac")])
def test_a_closure_under_autocast_trains_with_feedback_in_the_parameters_dtype(options):
    """bfloat16 autocast in the closure: the records are taken in the parameters' dtype (float32),
    the feedback pass re-runs the forward under the same autocast and the update itself outside
    it; the parameters stay float32 and the loss falls."""
    torch.manual_seed(0)
    seen = _SeesAutocast()
    net = nn.Sequential(nn.Linear(6, 16), seen, nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(32, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = DDPNOpt(net.parameters(), model=net, **dict(dict(lr=0.01, curvature="adam"), **options))
    closure = _autocast_closure(net, opt, x, y)
    losses = [float(opt.step(closure)) for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0] and opt.refused_steps == 0
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in net.parameters())
    # each step: the closure's forward, the feedback pass (and with r columns their pull-back)
    assert len(seen.seen) >= 2 * 25 and all(seen.seen)


def test_a_cnn_closure_under_autocast_trains_with_feedback():
    """The compact convolutions are not used under CPU autocast (they are float32 kernels)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(16, 1, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long()
    opt = DDPNOpt(net.parameters(), model=net, lr=0.01, curvature="adam")
    closure = _autocast_closure(net, opt, x, y)
    losses = [float(opt.step(closure)) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0] and opt.refused_steps == 0


class _AttentionFirst(nn.Module):
    """A MultiheadAttention first: its forward uses its out_proj's weights directly (out_proj,
    a module of its own, never runs)."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.att(x, x, x)[0]).flatten(1))


def test_parameters_a_stage_uses_through_a_module_that_does_not_run_are_trained():
    """out_proj belongs to the attention's stage (the first: no feedback), so with feedback its
    first step is the one without; before, it was never updated."""
    torch.manual_seed(0)
    nets = [_AttentionFirst().double()]
    nets.append(copy.deepcopy(nets[0]))
    start = copy.deepcopy(nets[0])
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    opts = [DDPNOpt(n, lr=0.01, curvature="adam", feedback=fb)
            for n, fb in zip(nets, (True, False))]
    for n, o in zip(nets, opts):
        o.step(make_closure(n, o, x, y))
    fb, base = (dict(n.named_parameters()) for n in nets)
    for name in ("att.out_proj.weight", "att.out_proj.bias", "att.in_proj_weight"):
        assert not torch.equal(fb[name], dict(start.named_parameters())[name])
        assert torch.allclose(fb[name], base[name], atol=1e-14, rtol=0)
    assert (fb["fc.weight"] - base["fc.weight"]).abs().max() > 1e-8   # the feedback is on


class _Gate(nn.Module):
    """Owns a gate and a Linear child it applies functionally (the child never runs)."""

    def __init__(self, own: bool):
        super().__init__()
        torch.manual_seed(1)
        lin = nn.Linear(5, 5)
        if own:
            self.weight, self.bias = lin.weight, lin.bias
        else:
            self.lin = lin
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        lin = self.lin if hasattr(self, "lin") else self
        w, b = lin.weight, lin.bias
        return torch.tanh(nn.functional.linear(x, w, b)) * self.gate


def test_a_later_stage_using_a_childs_parameters_gets_their_feedback():
    """The child's parameters are part of the stage of the module that uses them: the same steps
    as a module owning them itself (whose feedback the dense oracle checks)."""
    nets = []
    for own in (False, True):
        torch.manual_seed(0)
        nets.append(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), _Gate(own), nn.Linear(5, 3)).double())
    x, y = _data(16, 4, seed=2)
    opts = [DDPNOpt(n, lr=0.05, curvature="adam", feedback_bound=math.inf) for n in nets]
    twin = copy.deepcopy(nets[0])
    base = DDPNOpt(twin, lr=0.05, curvature="adam", feedback=False)
    for _ in range(3):
        for n, o in zip(nets + [twin], opts + [base]):
            o.step(make_closure(n, o, x, y))
    a, b = (dict(n.named_parameters()) for n in nets)
    assert torch.allclose(a["2.lin.weight"], b["2.weight"], atol=1e-13, rtol=0)
    assert torch.allclose(a["2.lin.bias"], b["2.bias"], atol=1e-13, rtol=0)
    assert (a["2.lin.weight"] - twin[2].lin.weight).abs().max() > 1e-6    # with its feedback


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return nn.functional.linear(torch.tanh(self.l1(x)), self.l2.weight, self.l2.bias)


def test_a_parameter_used_outside_any_stage_is_refused_naming_it():
    """l2's weights are used by the model's own forward (no stage owns them): with feedback no
    stage would update them; refused before anything changes. Without feedback it is Adam."""
    torch.manual_seed(0)
    net = _Functional().double()
    x, y = _data(8, 4)
    opt = DDPNOpt(net, lr=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(UnsupportedModuleError, match=r"parameter 'l2.weight' got a gradient, but "
                       r"its module 'l2' \(Linear\) did not run.*feedback=False"):
        opt.step(make_closure(net, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) and not opt.state
    twin = copy.deepcopy(net)
    adam = torch.optim.Adam(twin.parameters(), lr=0.01)
    opt = DDPNOpt(net, lr=0.01, feedback=False)
    for _ in range(2):
        opt.step(make_closure(net, opt, x, y))
        adam.step(make_closure(twin, adam, x, y))
    assert all(torch.allclose(a, b, atol=1e-15, rtol=0)
               for a, b in zip(net.parameters(), twin.parameters()))


class _AuxHead(nn.Module):
    """An auxiliary head that runs but whose output the loss does not use (``use_aux=False``:
    the same model without it)."""

    def __init__(self, use_aux=True):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.aux, self.b = nn.Linear(6, 8), nn.Linear(8, 2), nn.Linear(8, 3)
        self.use_aux = use_aux

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.use_aux:
            self.aux(h)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("curvature,options", [("adam", {}), ("ekfac", {}),
                                               ("adam", dict(terminal_hessian="gauss_newton"))])
def test_a_module_whose_output_the_loss_does_not_use_is_left_alone(curvature, options):
    """Its parameters get no gradient, so (as in torch.optim) they are not updated and the rest
    trains exactly as without the module; before, the step failed with 'no gradient reached the
    output of module 'aux'; the closure must call loss.backward()'."""
    x, y = _data(16)
    nets = [_AuxHead(True).double(), _AuxHead(False).double()]
    aux = nets[0].aux.weight.detach().clone()
    opts = [DDPNOpt(n, lr=0.02, curvature=curvature, **options) for n in nets]
    for _ in range(3):
        for n, o in zip(nets, opts):
            o.step(make_closure(n, o, x, y))
    a, b = (dict(n.named_parameters()) for n in nets)
    assert torch.equal(nets[0].aux.weight, aux) and nets[0].aux.weight.grad is None
    for name in ("a.weight", "a.bias", "b.weight", "b.bias"):
        assert torch.allclose(a[name], b[name], atol=1e-14, rtol=0), name
    assert not torch.equal(a["a.weight"], _AuxHead().double().a.weight)


class _SpareGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return torch.tanh(x) * self.gate


@pytest.mark.parametrize("curvature", ["adam", "ekfac"])
@pytest.mark.parametrize("feedback", ["factorised", "dense"])
def test_an_unused_child_of_a_stage_changes_nothing(curvature, feedback):
    """A Linear child of a stage's module that its forward never uses joins that stage without
    a gradient: the steps are those of the model without it, which stays as it was."""
    x, y = _data(16)
    nets = []
    for spare in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), _SpareGate(), nn.Linear(8, 3)).double()
        if spare:
            net[1].spare = nn.Linear(8, 8).double()
        nets.append(net)
    spare = copy.deepcopy(nets[0][1].spare)
    opts = [DDPNOpt(n, lr=0.02, curvature=curvature, feedback=feedback,
                    terminal_hessian="gauss_newton") for n in nets]
    for _ in range(3):
        for n, o in zip(nets, opts):
            o.step(make_closure(n, o, x, y))
    a, b = (dict(n.named_parameters()) for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert all(torch.equal(p, q) for p, q in zip(nets[0][1].spare.parameters(), spare.parameters()))


class _WeightNormed(nn.Module):
    """Linear(5, 4) with weight g v / ||v|| (rows) from its own parameters: what weight_norm's
    parametrization computes."""

    def __init__(self, lin):
        super().__init__()
        self.v = nn.Parameter(lin.weight.detach().clone())
        self.g = nn.Parameter(lin.weight.detach().norm(dim=1, keepdim=True))
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return nn.functional.linear(x, weight, self.bias)


@pytest.mark.parametrize("curvature", ["adam", "identity"])
def test_a_weight_normed_layer_is_one_stage_with_its_parametrization(curvature):
    """torch.nn.utils.parametrizations.weight_norm: the originals (owned by a ParametrizationList
    that runs, without an input, whenever the weight is read) belong to the layer's stage; the
    feedback equals that of a module computing the same weight from its own parameters. Before,
    a KeyError inside the backward sweep."""
    from torch.nn.utils.parametrizations import weight_norm
    x, y = _data(16, 4)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3)).double()
    own = copy.deepcopy(base)
    own[2] = _WeightNormed(base[2])
    weight_norm(base[2])
    nets = [base, own]
    opts = [DDPNOpt(n, lr=0.05, curvature=curvature, feedback_bound=math.inf) for n in nets]
    twin = copy.deepcopy(own)
    plain = DDPNOpt(twin, lr=0.05, curvature=curvature, feedback=False)
    for _ in range(3):
        for n, o in zip(nets + [twin], opts + [plain]):
            o.step(make_closure(n, o, x, y))
    wn = base[2].parametrizations.weight
    assert torch.allclose(wn.original0, own[2].g, atol=1e-13, rtol=0)
    assert torch.allclose(wn.original1, own[2].v, atol=1e-13, rtol=0)
    assert torch.allclose(base[2].bias, own[2].bias, atol=1e-13, rtol=0)
    assert torch.allclose(base[4].weight, own[4].weight, atol=1e-13, rtol=0)
    assert (own[2].v - twin[2].v).abs().max() > 1e-6          # with feedback


def test_a_spectral_norm_in_training_mode_iterates_once_per_step():
    """spectral_norm's power iteration runs at every read of the weight in training mode: once
    in the closure's forward (as with torch.optim), and the rest of the step (per-sample
    functions, the feedback pass) sees the closure's weight. So the step equals that of the same
    net in eval mode whose vectors took that one iteration beforehand, and the vectors are
    Adam's; before, the step read the weight 4 times, iterating each time."""
    from torch.nn.utils.parametrizations import spectral_norm
    x, y = _data(16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                        nn.Linear(8, 3)).double()
    spectral_norm(net[2])
    adam_net, ref = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        ref[2].weight                     # the closure's one power iteration
    ref.eval()
    for n in (net, ref):
        opt = DDPNOpt(n, lr=0.02, curvature="adam", feedback_bound=math.inf)
        opt.step(make_closure(n, opt, x, y))
    adam = torch.optim.Adam(adam_net.parameters(), lr=0.02)
    adam.step(make_closure(adam_net, adam, x, y))
    sn = [m[2].parametrizations.weight[0] for m in (net, ref, adam_net)]
    assert torch.equal(sn[0]._u, sn[2]._u) and torch.equal(sn[0]._v, sn[2]._v)
    assert torch.equal(sn[0]._u, sn[1]._u)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-14, rtol=0)
    assert net[2].parametrizations.weight[0].training


class _Checkpointed(nn.Module):
    """A CNN whose middle block runs under torch.utils.checkpoint (``mode``: None, no
    checkpoint; else its use_reentrant)."""

    def __init__(self, mode):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                   nn.Linear(32, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.mode = mode

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        if self.mode is None:
            h = self.block(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.mode)
        return self.head(h)


@pytest.mark.parametrize("curvature", ["adam", "ekfac"])
def test_activation_checkpointing_steps_as_without_it(curvature):
    """A non-reentrant checkpoint runs its region again inside the backward pass; those calls
    are not new module runs (before: 'ran 2 times'), so DDPNOpt with feedback steps exactly as
    without the checkpoint. A reentrant one first runs its region without gradients: refused
    with feedback, naming the module and the way out, before anything changes."""
    import torch.utils.checkpoint  # noqa: F401
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    nets = [_Checkpointed(False).double(), _Checkpointed(None).double()]
    opts = [DDPNOpt(n, lr=0.02, curvature=curvature) for n in nets]
    for _ in range(3):
        for n, o in zip(nets, opts):
            o.step(make_closure(n, o, x, y))
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.allclose(p, q, atol=1e-14, rtol=0)
    assert not torch.equal(nets[0].block[3].weight, _Checkpointed(None).double().block[3].weight)
    net = _Checkpointed(True).double()
    before = copy.deepcopy(net.state_dict())
    opt = DDPNOpt(net, lr=0.02, curvature=curvature)
    with pytest.raises(UnsupportedModuleError, match=r"module 'block.0' \(Conv2d\) ran with "
                       r"gradients only inside the backward pass.*use_reentrant=False"):
        opt.step(make_closure(net, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(before.values(), net.state_dict().values()))
