"""The curvature optimizer (nn_adapter.curvature.optimizer) and its recorders
(nn_adapter.curvature.records) against independent references: the update of parameters given in
any order and in several groups against torch.optim.Adam / SGD / AdamW and against nn_adapter.EKFAC
built on the model alone, refused steps leaving every parameter, state and group as they were,
bad add_param_group / load_state_dict inputs refused naming the argument, and what the recorders
keep of a forward and backward pass against the tensors autograd gives. float64 throughout."""
import copy
import gc
import math

import pytest
import torch
from torch import nn

from nn_adapter import EKFAC
from nn_adapter.curvature import records
from nn_adapter.curvature.optimizer import CurvatureOptimizer
from nn_adapter.curvature.records import LiveRecorder, Recorder
from occore.errors import InputError

D = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=g, dtype=D), torch.randint(0, 3, (6,), generator=g))
            for _ in range(n)]


def _closure(net, opt, x, y, scale=1.0):
    def closure():
        opt.zero_grad()
        loss = scale * nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    return closure


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _side_by_side(net, opt, ref, ref_opt, steps):
    """``steps`` minibatches, each a step of ``opt`` on ``net`` and of ``ref_opt`` on ``ref``; returns
    the largest parameter difference of the two models."""
    for x, y in _batches(steps):
        opt.step(_closure(net, opt, x, y))
        ref_opt.step(_closure(ref, ref_opt, x, y))
    return (_flat(net) - _flat(ref)).abs().max()


def _state_copy(opt):
    return {id(p): copy.deepcopy(s) for p, s in opt.state.items()}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for name in a[k]:
            u, v = a[k][name], b[k][name]
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, name


# -- parameter order and groups --------------------------------------------------------------------
TORCH = {"identity": lambda ps, **hp: torch.optim.SGD(ps, **hp),
         "adam": lambda ps, **hp: torch.optim.Adam(ps, **hp)}
HP = {"identity": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
      "adam": dict(lr=0.05, betas=(0.8, 0.99), weight_decay=1e-2)}


def _reversed_groups(net):
    """Each layer's bias listed before its weight, the last layer's group first."""
    return [dict(params=[net[2].bias, net[2].weight], lr=0.02),
            dict(params=[net[0].bias, net[0].weight])]


@pytest.mark.parametrize("curvature", ["identity", "adam"])
def test_bias_before_weight_in_groups_equals_torch(curvature):
    net, ref = _net(), _net()
    opt = CurvatureOptimizer(_reversed_groups(net), curvature, model=net, **HP[curvature])
    ref_opt = TORCH[curvature](_reversed_groups(ref), **HP[curvature])
    # one structured block per layer, weight first, whatever order the group lists them in
    assert [(b.kind, b.params) for b in opt._blocks] == [
        ("linear", (net[2].weight, net[2].bias)), ("linear", (net[0].weight, net[0].bias))]
    diff = _side_by_side(net, opt, ref, ref_opt, 4)
    assert (_flat(ref) - _flat(_net())).abs().max() > 1e-3
    assert diff <= 1e-12


def test_ekfac_with_bias_before_weight_equals_ekfac_of_the_model():
    net, ref = _net(), _net()
    opt = EKFAC([dict(params=[net[2].bias, net[2].weight]),
                 dict(params=[net[0].bias, net[0].weight])], lr=0.1, model=net)
    ref_opt = EKFAC(ref, lr=0.1)
    assert sorted(b.kind for b in opt._blocks) == ["linear", "linear"]
    diff = _side_by_side(net, opt, ref, ref_opt, 4)
    assert (_flat(ref) - _flat(_net())).abs().max() > 1e-3
    assert diff <= 1e-12


# -- a closure without backward --------------------------------------------------------------------
def test_closure_without_backward():
    net = _net()
    x, y = _batches(1)[0]
    before = _flat(net).clone()
    opt = CurvatureOptimizer(net, "adam", 0.1)

    def no_backward(o):
        def closure():
            o.zero_grad()
            return nn.functional.cross_entropy(net(x), y)
        return closure
    loss = opt.step(no_backward(opt))       # no gradients: nothing to do, the loss returned
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(net(x), y)))
    assert torch.equal(_flat(net), before) and len(opt.state) == 0
    ekfac = EKFAC(net, lr=0.1)
    with pytest.raises(InputError, match=r"closure: no gradient reached .*'0' \(Linear\)"):
        ekfac.step(no_backward(ekfac))
    assert torch.equal(_flat(net), before) and len(ekfac.state) == 0


# -- refused steps ---------------------------------------------------------------------------------
def _make(curvature, params, net):
    if curvature == "ekfac":
        return EKFAC(params, lr=0.1, model=net)
    return CurvatureOptimizer(params, curvature, model=net, **HP[curvature])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("curvature", ["identity", "adam", "ekfac"])
def test_refused_step_changes_nothing_and_the_next_step_is_the_reference_one(curvature, bad):
    net, ref = _net(), _net()
    opt, ref_opt = _make(curvature, net, net), _make(curvature, ref, ref)
    (x0, y0), (x1, y1) = _batches(2)
    opt.step(_closure(net, opt, x0, y0))
    ref_opt.step(_closure(ref, ref_opt, x0, y0))
    params, state = _flat(net).clone(), _state_copy(opt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.warns(RuntimeWarning, match=r"loss is not finite.*step refused"):
        loss = opt.step(_closure(net, opt, x1, y1, scale=bad))
    assert not math.isfinite(float(loss.detach())) and opt.refused_steps == 1
    assert torch.equal(_flat(net), params)
    _same_state(_state_copy(opt), state)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    opt.step(_closure(net, opt, x1, y1))
    ref_opt.step(_closure(ref, ref_opt, x1, y1))
    assert torch.equal(_flat(net), _flat(ref)) and opt.refused_steps == 1


@pytest.mark.parametrize("curvature", ["identity", "adam"])
def test_nan_loss_with_groups_of_one_parameter(curvature):
    """A closure returning a non-finite number (not a tensor) with finite gradients, in groups of
    one parameter each: refused; then a finite step equals torch's."""
    net, ref = _net(), _net()
    opt = CurvatureOptimizer([dict(params=[p]) for p in net.parameters()], curvature, model=net,
                             **HP[curvature])
    ref_opt = TORCH[curvature]([dict(params=[p]) for p in ref.parameters()], **HP[curvature])
    assert [b.kind for b in opt._blocks] == ["diagonal"] * 4     # each layer split over groups
    x, y = _batches(1)[0]

    def nan_closure():
        _closure(net, opt, x, y)()
        return math.nan
    with pytest.warns(RuntimeWarning, match=r"loss is not finite \(loss nan\)"):
        assert math.isnan(opt.step(nan_closure))
    assert torch.equal(_flat(net), _flat(ref)) and len(opt.state) == 0
    diff = _side_by_side(net, opt, ref, ref_opt, 3)
    assert diff <= 1e-12


@pytest.fixture
def group_of_one():
    """A torch.distributed process group of this process alone (gloo)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _make_pg(curvature, net, group):
    if curvature == "ekfac":
        return EKFAC(net, lr=0.1, process_group=group)
    return CurvatureOptimizer(net, curvature, process_group=group, **HP[curvature])


@pytest.mark.parametrize("curvature", ["adam", "ekfac"])
def test_a_group_of_one_refuses_what_one_process_refuses_and_steps_alike(group_of_one, curvature):
    """The data-parallel agreement (one collective with the loss, the records' state and the
    gradients) on a process group of one rank: the steps of one process bit for bit, with and
    without a closure; a NaN loss with finite gradients, an infinite gradient with a finite loss
    and (ekfac) incomplete records refused or raised as on one process, nothing changed."""
    net, ref = _net(), _net()
    opt, ref_opt = _make_pg(curvature, net, group_of_one), _make_pg(curvature, ref, None)
    assert opt.collectives is not None and opt.collectives.average_gradients
    assert ref_opt.collectives is None
    (x0, y0), (x1, y1), (x2, y2) = _batches(3)
    for o, n in ((opt, net), (ref_opt, ref)):
        o.step(_closure(n, o, x0, y0))
        _closure(n, o, x1, y1)()
        assert o.step() is None
    assert (_flat(ref) - _flat(_net())).abs().max() > 1e-3
    assert torch.equal(_flat(net), _flat(ref))
    params, state = _flat(net).clone(), _state_copy(opt)

    def nan_loss():
        _closure(net, opt, x2, y2)()
        return math.nan
    with pytest.warns(RuntimeWarning, match=r"the loss of some rank is not finite \(loss nan\)"):
        assert math.isnan(opt.step(nan_loss))

    def inf_grad():
        loss = _closure(net, opt, x2, y2)()
        net[2].bias.grad[1] = math.inf
        return loss
    with pytest.warns(RuntimeWarning, match=r"a gradient is not finite \(loss [0-9.]+\)"):
        assert math.isfinite(float(opt.step(inf_grad).detach()))
    assert opt.refused_steps == 2
    if curvature == "ekfac":
        def twice():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x2), y2) + net(x2).sum() * 0
            loss.backward()
            return loss
        with pytest.raises(InputError, match=r"module '0' \(Linear\) ran 2 times"):
            opt.step(twice)
    assert torch.equal(_flat(net), params)
    _same_state(_state_copy(opt), state)
    for o, n in ((opt, net), (ref_opt, ref)):
        o.step(_closure(n, o, x2, y2))
    assert torch.equal(_flat(net), _flat(ref))


def test_ddpnopt_loss_recognition_on_a_group_of_one_is_the_plain_one(group_of_one):
    """DDPNOpt's loss recognition travels in the agreement after the loss and the records' state:
    on a DistributedDataParallel of one rank a summed cross-entropy is refused as by the plain
    DDPNOpt (the same error, nothing changed), and mean ones step as it does, bit for bit."""
    from nn_adapter import DDPNOpt
    net, ref = _net(), _net()
    ddp = nn.parallel.DistributedDataParallel(net)
    opts = [(DDPNOpt(ddp, lr=0.01, curvature="adam"), ddp),
            (DDPNOpt(ref, lr=0.01, curvature="adam"), ref)]

    def closure(opt, model, x, y, reduction):
        def run():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y, reduction=reduction)
            loss.backward()
            return loss
        return run
    batches = _batches(3)
    for opt, model in opts:
        with pytest.raises(InputError, match="closure: the loss is summed over the batch"):
            opt.step(closure(opt, model, *batches[0], "sum"))
    assert torch.equal(_flat(net), _flat(_net())) and torch.equal(_flat(ref), _flat(_net()))
    for x, y in batches:
        for opt, model in opts:
            opt.step(closure(opt, model, x, y, "mean"))
    assert (_flat(ref) - _flat(_net())).abs().max() > 1e-3
    assert torch.equal(_flat(net), _flat(ref))


# -- decoupled weight decay ------------------------------------------------------------------------
def test_decoupled_decay_per_group_and_only_where_there_is_a_gradient():
    """Two groups with their own decoupled decay (one of exactly 1) against torch.optim.AdamW, and
    a parameter that gets no gradient (outside the forward pass) neither decays nor moves, as in
    torch."""
    def groups(net, extra):
        return [dict(params=list(net[0].parameters()), weight_decay=1.0),
                dict(params=list(net[2].parameters()) + [extra], weight_decay=0.05, lr=0.02)]
    net, ref = _net(), _net()
    extra, ref_extra = (torch.ones(3, dtype=D, requires_grad=True) for _ in range(2))
    opt = CurvatureOptimizer(groups(net, extra), "adam", 0.05, model=net, betas=(0.8, 0.99),
                             decoupled_weight_decay=True)
    ref_opt = torch.optim.AdamW(groups(ref, ref_extra), lr=0.05, betas=(0.8, 0.99))
    diff = _side_by_side(net, opt, ref, ref_opt, 4)
    assert diff <= 1e-12
    assert torch.equal(extra, torch.ones(3, dtype=D))
    # the decay is the only difference to the same run without it
    plain = _net()
    p_opt = CurvatureOptimizer(groups(plain, torch.ones(3, dtype=D, requires_grad=True)), "adam",
                               0.05, model=plain, betas=(0.8, 0.99))
    for g in p_opt.param_groups:
        g["weight_decay"] = 0.0
    for x, y in _batches(4):
        p_opt.step(_closure(plain, p_opt, x, y))
    assert (_flat(plain) - _flat(net)).abs().max() > 1e-3


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("group,match", [
    (None, "param_group: expected a dict"), (5, "param_group: expected a dict"),
    ([torch.zeros(2)], "param_group: expected a dict"), ({"lr": 0.1}, "param_group: .*'params'"),
    ({"params": nn.Linear(2, 2)}, "params: got a module"),
    ({"params": [nn.Linear(2, 2)]}, "params: got a module"),
    ({"params": 3}, "params: expected a tensor or an iterable of tensors, got int"),
    ({"params": None}, "params: expected a tensor or an iterable of tensors, got NoneType"),
])
def test_add_param_group_refuses_what_is_not_a_group(group, match):
    net = _net()
    opt = CurvatureOptimizer(list(net[0].parameters()), "adam", 0.1, model=net)
    with pytest.raises(TypeError, match=match):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and len(opt._blocks) == 1


@pytest.mark.parametrize("state", [None, 5, [], {"state": {}}])
def test_load_state_dict_refuses_what_is_not_a_state_dict(state):
    net = _net()
    opt = CurvatureOptimizer(net, "adam", 0.1)
    with pytest.raises(TypeError, match="state_dict: expected a dict"):
        opt.load_state_dict(state)


# -- the recorders ---------------------------------------------------------------------------------
def _pass(net, x):
    """A forward and backward pass of a weighted loss, with autograd's own gradients at the
    first layer's input and at each Linear's output (the references)."""
    x = x.clone().requires_grad_(True)
    h0 = net[0](x)
    h0.retain_grad()
    out = net[2](net[1](h0))
    out.retain_grad()
    w = torch.arange(1.0, out.numel() + 1, dtype=D).reshape(out.shape)
    (w * out).sum().backward()
    return x, h0, out


def test_recorder_keeps_inputs_outputs_and_gradients_of_the_modules_asked_for():
    """Each list names a module of its own (the Sequential itself for the output), then one
    module in three lists (hooked once, counted once)."""
    net = _net()
    x = torch.randn(6, 4, dtype=D)
    ref_x, ref_h0, ref_out = _pass(copy.deepcopy(net), x)
    rec = Recorder(input_of=[net[2]], grad_of=[net[0]], in_grad_of=[net[1]],
                   output_of=[net]).name_modules(net)
    assert rec.wants == (frozenset({id(net[2])}), frozenset({id(net[0])}),
                         frozenset({id(net[1])}), frozenset({id(net)}))
    with rec:
        with torch.no_grad():
            net(torch.zeros(2, 4, dtype=D))          # not recorded: no grad
        got_x, got_h0, got_out = _pass(net, x)
    assert rec.calls == {net[0]: 1, net[1]: 1, net[2]: 1}   # _pass calls the layers one by one
    assert set(rec.inputs) == {net[2]} and torch.equal(rec.inputs[net[2]], torch.tanh(got_h0))
    assert set(rec.out_grads) == {net[0]} and torch.equal(rec.out_grads[net[0]], ref_h0.grad)
    assert set(rec.in_grads) == {net[1]} and torch.equal(rec.in_grads[net[1]], ref_h0.grad)
    assert rec.outputs == {}
    with rec:
        out = net(x)
        out.sum().backward()
    assert rec.calls == {net[0]: 1, net[1]: 1, net[2]: 1, net: 1}
    assert set(rec.outputs) == {net} and torch.equal(rec.outputs[net], out.detach())
    assert not any(t.requires_grad for d in (rec.inputs, rec.outputs, rec.out_grads,
                                             rec.in_grads) for t in d.values())
    assert rec.has_grad(net[0]) and not rec.has_grad(net[2])

    rec = Recorder(input_of=[net[2]], grad_of=[net[0], net[2]], in_grad_of=[net[0]],
                   output_of=[net[0]]).name_modules(net)
    with rec:
        got_x, got_h0, got_out = _pass(net, x)
    assert rec.calls == {net[0]: 1, net[2]: 1}
    assert set(rec.outputs) == {net[0]} and torch.equal(rec.outputs[net[0]], got_h0.detach())
    assert set(rec.out_grads) == {net[0], net[2]}
    assert torch.equal(rec.out_grads[net[0]], ref_h0.grad)
    assert torch.equal(rec.out_grads[net[2]], ref_out.grad)
    assert set(rec.in_grads) == {net[0]} and torch.equal(rec.in_grads[net[0]], ref_x.grad)
    rec.check_complete([net[0], net[2]])
    # outside the block nothing is recorded; release drops the tensors, not the counts
    _pass(net, x)
    assert rec.calls == {net[0]: 1, net[2]: 1}
    rec.release()
    assert not (rec.inputs or rec.outputs or rec.out_grads or rec.in_grads)
    assert rec.calls == {net[0]: 1, net[2]: 1}
    with rec:                                      # entering again starts the counts afresh
        pass
    assert rec.calls == {}


def test_recorder_check_complete_names_the_module_and_what_is_missing():
    net = _net()
    x = torch.randn(3, 4, dtype=D)
    rec = Recorder([net[0], net[2]], [net[0], net[2]]).name_modules(net)
    with rec:
        net[0](x).sum().backward()                 # the first layer once, the last never
    with pytest.raises(InputError, match=r"module '2' \(Linear\) ran 0 times in the closure"):
        rec.check_complete([net[0], net[2]])
    rec.check_complete([net[0]])
    with rec:
        net(x)                                     # ran once each, no backward
    with pytest.raises(InputError, match=r"closure: no gradient reached .*'0' \(Linear\)"):
        rec.check_complete([net[0]])
    rec.check_complete([net[0]], need_grads=False)
    with rec:
        (net(x).sum() + net[0](x).sum()).backward()
    with pytest.raises(InputError, match=r"module '0' \(Linear\) ran 2 times"):
        rec.check_complete([net[2], net[0]])
    rec.check_complete([net[2]])
    lone = nn.Linear(2, 2)
    assert Recorder([lone]).label(lone) == "Linear"          # no model: the type only
    assert Recorder([lone]).name_modules(None).names == {}


def test_recorder_input_of_a_module_called_with_a_tensor_keyword_only():
    class Scale(nn.Module):
        def forward(self, x=None):
            return 2 * x
    m = Scale()
    rec = Recorder([m], [m], [m])
    x = torch.ones(2, requires_grad=True)
    with rec:
        m(x=x).sum().backward()
    assert rec.calls == {m: 1} and rec.inputs == {} and rec.in_grads == {}
    assert torch.equal(rec.out_grads[m], torch.ones(2))


def test_live_recorder_keeps_the_passes_a_backward_went_through():
    net = _net()
    x = torch.randn(6, 4, dtype=D)
    ref_x, ref_h0, ref_out = _pass(copy.deepcopy(net), x)
    rec = LiveRecorder([net[0], net[2]], [net[2]]).name_modules(net).attach()
    try:
        assert rec.attached and rec.attach() is rec        # idempotent
        with torch.no_grad():
            net(x)                                 # no gradient: not recorded
        net(torch.zeros(2, 4, dtype=D))            # no backward reaches it: not recorded
        got_x, got_h0, _ = _pass(net, x)
        assert rec.calls == {net[0]: 1, net[2]: 1}
        assert torch.equal(rec.inputs[net[0]], x) and torch.equal(rec.inputs[net[2]],
                                                                  torch.tanh(got_h0).detach())
        assert set(rec.out_grads) == {net[2]} and torch.equal(rec.out_grads[net[2]], ref_out.grad)
        rec.check_complete([net[0], net[2]])
        _pass(net, x)                              # a second backpropagated pass is counted
        with pytest.raises(InputError, match=r"'0' \(Linear\) ran 2 times in the forward passes"
                                             r".*step\(\) without a closure"):
            rec.check_complete([net[0], net[2]])
        rec.release()
        assert rec.calls == {} and rec.inputs == {} and rec.out_grads == {}
        with pytest.raises(InputError, match="ran 0 times"):
            rec.check_complete([net[0]])
        rec.paused = True
        _pass(net, x)                              # paused at the forward
        assert rec.calls == {}
        rec.paused = False
        out = net(x)                               # seen at the forward, but paused at the
        rec.paused = True                          # backward: not recorded
        out.sum().backward()
        rec.paused = False
        assert rec.calls == {}
        with pytest.raises(TypeError, match="attach"):
            with rec:
                pass
    finally:
        rec.detach()
    assert not rec.attached and id(net[0]) not in records._WATCHED   # attached twice, unwatched
    _pass(net, x)
    assert rec.calls == {}


def test_live_recorder_skips_what_it_cannot_record():
    """A module only in ``grad_of`` keeps no input; a module called with a keyword input only
    keeps its output gradient and no input; an output that needs no gradient (frozen weights, an
    input without gradient) is skipped without error; a recorder collected between the forward
    and the backward pass is not written to."""
    class Scale(nn.Module):
        def forward(self, x=None):
            return 2 * x
    net = _net()
    scale = Scale()
    rec = LiveRecorder([net[0], scale], [net[0], net[2], scale]).attach()
    try:
        x = torch.randn(3, 4, dtype=D)
        out = net(x)
        (scale(x=out) * 0.5).sum().backward()
        assert rec.calls == {net[0]: 1, net[2]: 1, scale: 1}
        assert set(rec.inputs) == {net[0]} and torch.equal(rec.inputs[net[0]], x)
        assert set(rec.out_grads) == {net[0], net[2], scale}
        assert torch.equal(rec.out_grads[scale], torch.full((3, 3), 0.5, dtype=D))
        rec.release()
        net.requires_grad_(False)
        net(x)                                      # nothing needs a gradient: skipped
        assert rec.calls == {}
    finally:
        rec.detach()
    lin = nn.Linear(2, 2).to(D)
    gone = LiveRecorder([lin], [lin]).attach()
    out = lin(torch.ones(3, 2, dtype=D))
    calls = gone.calls
    del gone
    gc.collect()
    out.sum().backward()                            # the hook finds no recorder: nothing written
    assert calls == {}


def test_live_recorders_of_one_module_count_their_watchers():
    lin = nn.Linear(3, 2).to(D)
    x = torch.ones(4, 3, dtype=D)
    a = LiveRecorder([lin], [lin]).attach()
    b = LiveRecorder([lin], [lin]).attach()
    assert records._WATCHED[id(lin)] >= 2 and records._GLOBAL_HOOK is not None
    lin(x).sum().backward()
    assert a.calls == {lin: 1} and b.calls == {lin: 1}
    a.detach()
    a.detach()                                     # twice: unwatched once
    lin(x).sum().backward()
    assert a.calls == {} and b.calls == {lin: 2} and id(lin) in records._WATCHED
    b.detach()
    assert id(lin) not in records._WATCHED
    assert (records._GLOBAL_HOOK is None) == (not records._WATCHED)
    empty = LiveRecorder().attach()                # nothing to watch: never attached
    assert not empty.attached


def test_live_recorder_ignores_functorch_transforms():
    lin = nn.Linear(3, 2).to(D)
    rec = LiveRecorder([lin], [lin]).attach()
    try:
        x = torch.randn(5, 3, dtype=D)
        params = dict(lin.named_parameters())
        grads = torch.func.vmap(torch.func.grad(
            lambda xi: torch.func.functional_call(lin, params, (xi,)).sum()))(x)
        assert torch.allclose(grads, lin.weight.detach().sum(0).expand(5, 3))
        assert rec.calls == {} and rec.inputs == {}
        lin(x).sum().backward()
        assert rec.calls == {lin: 1}
    finally:
        rec.detach()
