"""torch.optim conventions of the curvature optimizers (nn_adapter.curvature.optimizer, EKFAC):
params / param groups, add_param_group, step() without a closure, decoupled weight decay,
state_dict, and bad input. float64 wherever exactness is asserted."""
import copy
import gc
import io
import logging
import math
import weakref

import pytest
import torch
from torch import nn

from nn_adapter import EKFAC
from nn_adapter.curvature import records
from nn_adapter.curvature.optimizer import CurvatureOptimizer
from nn_adapter.curvature.records import LiveRecorder
from occore.errors import InputError

CURVATURES = ["identity", "rmsprop", "adam", "ekfac"]

# per curvature: (hyperparameters of group A, of group B) -- each group differs in lr, weight decay
# and a curvature hyperparameter
GROUP_HP = {
    "identity": (dict(lr=0.1, weight_decay=1e-2, momentum=0.9),
                 dict(lr=0.03, weight_decay=0.0, momentum=0.5, nesterov=True)),
    "rmsprop": (dict(lr=0.01, weight_decay=1e-2, alpha=0.9),
                dict(lr=0.003, weight_decay=0.0, eps=1e-4, centered=True)),
    "adam": (dict(lr=0.05, weight_decay=1e-2, betas=(0.8, 0.99)),
             dict(lr=0.01, weight_decay=0.0, eps=1e-6, amsgrad=True)),
    "ekfac": (dict(lr=0.1, weight_decay=1e-2, damping=1e-2),
              dict(lr=0.05, weight_decay=0.0, damping=0.1, stat_decay=0.8)),
}


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).double()


def _data(n, seed=1, batch=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _loss(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def _closure(net, opts, x, y):
    def closure():
        for o in opts:
            o.zero_grad()
        loss = _loss(net, x, y)
        loss.backward()
        return loss
    return closure


def _step(net, opt, x, y, closure=True):
    """One step, with a closure or with the user's own forward/backward and step()."""
    if closure:
        return opt.step(_closure(net, [opt], x, y))
    _closure(net, [opt], x, y)()
    return opt.step()


def _groups(net, curvature, split=False):
    """Group A: the first Linear and the LayerNorm, group B: the last Linear (``split``: the
    last Linear's bias in group A instead)."""
    hp_a, hp_b = GROUP_HP[curvature]
    a = list(net[0].parameters()) + list(net[2].parameters())
    b = [net[3].weight] if split else list(net[3].parameters())
    if split:
        a.append(net[3].bias)
    return [dict(params=a, **hp_a), dict(params=b, **hp_b)]


def _make(params, curvature, net, **hp):
    hp = dict(hp)
    lr = hp.pop("lr", 0.05)
    if curvature == "ekfac":
        return EKFAC(params, lr=lr, model=net, **hp)
    return CurvatureOptimizer(params, curvature, lr, model=net, **hp)


# -- param groups ---------------------------------------------------------------------------------
@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no_closure"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_two_groups_equal_two_separate_optimizers(curvature, closure):
    data = _data(5)
    net, ref = _net(), _net()
    opt = _make(_groups(net, curvature), curvature, net)
    ref_groups = _groups(ref, curvature)
    ref_opts = [_make(g["params"], curvature, ref, **{k: v for k, v in g.items() if k != "params"})
                for g in ref_groups]
    for x, y in data:
        _step(net, opt, x, y, closure)
        _closure(ref, ref_opts, x, y)()      # one forward and backward, then both steps
        for o in ref_opts:
            o.step()
    assert (_flat(ref) - _flat(_net())).abs().max() > 1e-3
    assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12
    if curvature == "ekfac":
        assert "QA" in opt.state[net[3].weight]          # the layers stayed structured


TORCH = {"identity": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam}


@pytest.mark.parametrize("split", [False, True], ids=["layers", "split_layer"])
@pytest.mark.parametrize("curvature", ["identity", "rmsprop", "adam"])
def test_groups_equal_torch_optimizer_with_the_same_groups(curvature, split):
    """Diagonal curvatures against torch's own optimizer with the same groups (a layer whose
    weight and bias are in different groups is split into diagonal blocks), with a scheduler."""
    data = _data(6)
    net, ref = _net(), _net()
    opt = _make(_groups(net, curvature, split), curvature, net)
    ref_opt = TORCH[curvature](_groups(ref, curvature, split))
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref_opt)]
    for x, y in data:
        _step(net, opt, x, y)
        ref_opt.step(_closure(ref, [ref_opt], x, y))
        for s in scheds:
            s.step()
    if split:
        assert [b.kind for b in opt._blocks].count("diagonal") == 4
    assert (_flat(ref) - _flat(_net())).abs().max() > 1e-3
    assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12


def test_group_of_gives_each_block_its_group():
    net = _net()
    opt = _make(_groups(net, "adam"), "adam", net)
    lrs = {id(b.module) if b.structured else id(b.weight): opt._group_of(b)["lr"]
           for b in opt._blocks}
    assert lrs[id(net[0])] == 0.05 and lrs[id(net[2].weight)] == 0.05 and lrs[id(net[3])] == 0.01
    assert [b.kind for b in opt._blocks] == ["linear", "diagonal", "diagonal", "linear"]


@pytest.mark.parametrize("curvature", CURVATURES)
def test_add_param_group_params_are_updated(curvature):
    data = _data(6)
    net, ref = _net(), _net()
    hp_a, hp_b = GROUP_HP[curvature]
    first = list(net[0].parameters()) + list(net[2].parameters())
    opt = _make(first, curvature, net, **hp_a)
    ref_opts = [_make(list(ref[0].parameters()) + list(ref[2].parameters()), curvature, ref,
                      **hp_a)]
    for i, (x, y) in enumerate(data):
        if i == 2:
            before = net[3].weight.detach().clone()
            opt.add_param_group(dict(params=list(net[3].parameters()), **hp_b))
            # the new group's missing hyperparameters are the constructor's (as in torch)
            ref_opts.append(_make(list(ref[3].parameters()), curvature, ref, **{**hp_a, **hp_b}))
        _step(net, opt, x, y, closure=i % 2 == 0)
        _closure(ref, ref_opts, x, y)()
        for o in ref_opts:
            o.step()
        if i == 2:
            assert not torch.equal(net[3].weight.detach(), before)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == hp_b["lr"]
    assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12
    if curvature == "ekfac":
        assert "QA" in opt.state[net[3].weight]


def test_add_param_group_of_a_layer_unfrozen_later_is_structured():
    net = _net()
    for p in net[3].parameters():
        p.requires_grad_(False)
    opt = EKFAC(net, lr=0.05)                 # the model's trainable parameters only
    assert len(opt.param_groups[0]["params"]) == 4
    for p in net[3].parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": net[3].parameters(), "lr": 0.01})
    assert opt._blocks[-1].kind == "linear" and opt._blocks[-1].module is net[3]
    x, y = _data(1)[0]
    _step(net, opt, x, y, closure=False)
    assert opt.state[net[3].weight]["QA"].shape == (8, 8)


def test_parameters_outside_the_model_get_diagonal_blocks():
    net = _net()
    temperature = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = EKFAC([{"params": net.parameters()}, {"params": [temperature], "lr": 0.01}], lr=0.05,
                model=net)
    assert opt._blocks[-1].kind == "diagonal" and opt._blocks[-1].weight is temperature
    x, y = _data(1)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(net(x) * temperature, y).backward()
    g = temperature.grad.clone()
    opt.step()                               # first step: v = g^2, P = lr / (v + damping)
    assert torch.allclose(temperature.detach(), 1 - 0.01 * g / (g ** 2 + 1e-3), atol=1e-14)


def test_params_style_equals_model_style():
    data = _data(4)
    nets = [_net(), _net(), _net()]
    opts = [EKFAC(nets[0], lr=0.05, damping=0.01), EKFAC(nets[1].parameters(), lr=0.05,
                                                         damping=0.01, model=nets[1]),
            CurvatureOptimizer(nets[2], "ekfac", 0.05, damping=0.01)]
    for x, y in data:
        for net, opt in zip(nets, opts):
            _step(net, opt, x, y)
    assert torch.equal(_flat(nets[0]), _flat(nets[1])) and torch.equal(_flat(nets[0]),
                                                                        _flat(nets[2]))


def test_diagonal_curvatures_need_no_model():
    data = _data(4)
    net, ref = _net(), _net()
    opt = CurvatureOptimizer(net.parameters(), "adam", 0.05)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    assert all(b.kind == "diagonal" for b in opt._blocks)
    for x, y in data:
        _step(net, opt, x, y, closure=False)
        ref_opt.step(_closure(ref, [ref_opt], x, y))
    assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12


# -- step() without a closure ---------------------------------------------------------------------
@pytest.mark.parametrize("curvature", CURVATURES)
def test_step_without_closure_equals_closure_step(curvature):
    data = _data(5)
    a, b = _net(), _net()
    opt_a, opt_b = (_make(_groups(n, curvature), curvature, n) for n in (a, b))
    for x, y in data:
        loss = _step(a, opt_a, x, y, closure=True)
        assert torch.isfinite(loss)
        assert _step(b, opt_b, x, y, closure=False) is None
    assert torch.equal(_flat(a), _flat(b))


def _ekfac_pair():
    a, b = _net(), _net()
    return a, EKFAC(a, lr=0.1, damping=1e-2), b, EKFAC(b, lr=0.1, damping=1e-2)


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no_closure"])
def test_evaluation_forward_with_grad_between_steps_changes_nothing(closure):
    data, (xe, _) = _data(3), _data(1, seed=7)[0]
    a, opt_a, b, opt_b = _ekfac_pair()
    for x, y in data:
        _step(a, opt_a, x, y, closure=closure)
        b(xe).sum()                          # an evaluation with grad enabled, no backward
        _step(b, opt_b, x, y, closure=closure)
        b(xe)
    assert torch.equal(_flat(a), _flat(b))


def test_deepcopy_and_torch_save_of_the_model_do_not_touch_the_records():
    data = _data(3)
    a, opt_a, b, opt_b = _ekfac_pair()
    twin = copy.deepcopy(b)                  # after the optimizer was built
    buf = io.BytesIO()
    torch.save(b, buf)                       # the whole module still pickles
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for x, y in data:
        _step(a, opt_a, x, y, closure=False)
        for other in (twin, loaded):         # forward and backward of the copies: not recorded
            _loss(other, x * 2, y).backward()
        _step(b, opt_b, x, y, closure=False)
    assert torch.equal(_flat(a), _flat(b))


def test_module_run_twice_or_not_at_all_is_a_clear_error():
    net = _net()
    opt = EKFAC(net, lr=0.1)
    x, y = _data(1)[0]
    before = _flat(net).clone()
    opt.zero_grad()
    (_loss(net, x, y) + _loss(net, x, y)).backward()
    with pytest.raises(InputError, match=r"module '0' \(Linear\) ran 2 times"):
        opt.step()
    assert torch.equal(_flat(net), before) and len(opt.state) == 0
    _step(net, opt, x, y, closure=False)
    with pytest.raises(InputError, match="ran 0 times"):
        opt.step()                           # gradients left, but no new forward and backward
    opt.zero_grad()
    assert opt.step() is None                # no gradients: nothing to do


def test_step_without_closure_refuses_non_finite_gradients():
    net = _net()
    opt = EKFAC(net, lr=0.1)
    x, y = _data(1)[0]
    before = _flat(net).clone()
    opt.zero_grad()
    _loss(net, x, y).backward()
    net[3].bias.grad[0] = math.inf
    with pytest.warns(RuntimeWarning, match="gradient is not finite"):
        assert opt.step() is None
    assert torch.equal(_flat(net), before) and len(opt.state) == 0
    _step(net, opt, x, y, closure=False)     # the next step records afresh
    assert "QA" in opt.state[net[0].weight]


def test_live_recorder_is_dropped_with_its_optimizer():
    lin = nn.Linear(2, 2)
    opt = EKFAC(lin, lr=0.1)
    live = weakref.ref(opt._live)
    assert live().attached and id(lin) in records._WATCHED and records._GLOBAL_HOOK is not None
    del opt
    gc.collect()
    assert live() is None and id(lin) not in records._WATCHED
    assert (records._GLOBAL_HOOK is None) == (not records._WATCHED)
    rec = LiveRecorder([lin], [lin]).attach()
    lin(torch.ones(3, 2)).sum().backward()
    assert rec.calls[lin] == 1
    rec.detach()
    lin(torch.ones(3, 2)).sum().backward()
    assert rec.calls == {} and not rec.attached and id(lin) not in records._WATCHED


# -- decoupled weight decay -----------------------------------------------------------------------
@pytest.mark.parametrize("make_ref", [
    lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.99), weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.99), weight_decay=0.1,
                                decoupled_weight_decay=True),
], ids=["AdamW", "Adam_decoupled"])
@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no_closure"])
def test_decoupled_adam_equals_torch_adamw(make_ref, closure):
    data = _data(6)
    net, ref = _net(), _net()
    opt = CurvatureOptimizer(net.parameters(), "adam", 0.05, model=net, betas=(0.8, 0.99),
                             weight_decay=0.1, decoupled_weight_decay=True)
    ref_opt = make_ref(ref.parameters())
    for x, y in data:
        _step(net, opt, x, y, closure)
        ref_opt.step(_closure(ref, [ref_opt], x, y))
    assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12
    l2 = _net()
    l2_opt = CurvatureOptimizer(l2.parameters(), "adam", 0.05, betas=(0.8, 0.99),
                                weight_decay=0.1)
    for x, y in data:
        _step(l2, l2_opt, x, y)
    assert (_flat(l2) - _flat(net)).abs().max() > 1e-4      # L2 and decoupled differ


@pytest.mark.parametrize("curvature", CURVATURES)
def test_decoupled_decay_shrinks_then_steps_without_decay(curvature):
    """Per group: decoupled = p <- p (1 - lr wd), then the step of the same optimizer with no
    weight decay (group B keeps its L2 decay)."""
    data = _data(5)
    net, ref = _net(), _net()
    groups = _groups(net, curvature)
    groups[0].update(weight_decay=0.2, decoupled_weight_decay=True)
    groups[1].update(weight_decay=0.05)
    opt = _make(groups, curvature, net)
    ref_groups = _groups(ref, curvature)
    ref_groups[0].update(weight_decay=0.0)
    ref_groups[1].update(weight_decay=0.05)
    ref_opt = _make(ref_groups, curvature, ref)
    lr = ref_groups[0]["lr"]
    for x, y in data:
        _step(net, opt, x, y)
        _closure(ref, [ref_opt], x, y)()
        with torch.no_grad():
            for p in ref_groups[0]["params"]:
                p.mul_(1 - lr * 0.2)
        ref_opt.step()
    assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12


# -- state_dict -----------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", CURVATURES)
def test_state_dict_with_groups_resumes_bit_identically(curvature):
    data = _data(6)
    net = _net()
    opt = _make(_groups(net, curvature), curvature, net)
    for x, y in data[:3]:
        _step(net, opt, x, y)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "net": net.state_dict()}, buf)
    for i, (x, y) in enumerate(data[3:]):
        _step(net, opt, x, y, closure=i % 2 == 0)
    buf.seek(0)
    saved = torch.load(buf)
    assert saved["opt"]["curvature"] == curvature
    net2 = _net(seed=3)
    net2.load_state_dict(saved["net"])
    opt2 = _make(_groups(net2, curvature), curvature, net2)
    opt2.load_state_dict(saved["opt"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for i, (x, y) in enumerate(data[3:]):
        _step(net2, opt2, x, y, closure=i % 2 == 0)
    assert torch.equal(_flat(net), _flat(net2))


def test_state_dict_of_another_curvature_is_refused():
    net = _net()
    adam = CurvatureOptimizer(net.parameters(), "adam", 0.01)
    _step(net, adam, *_data(1)[0])
    ekfac = EKFAC(net, lr=0.01)
    with pytest.raises(InputError, match="'adam'.*'ekfac'"):
        ekfac.load_state_dict(adam.state_dict())
    assert len(ekfac.state) == 0
    state = adam.state_dict()
    state["param_groups"][0]["lr"] = math.nan
    with pytest.raises(ValueError, match="lr"):
        CurvatureOptimizer(net.parameters(), "adam", 0.01).load_state_dict(state)


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature,hp,name", [
    ("identity", dict(lr=math.nan), "lr"), ("adam", dict(lr=math.inf), "lr"),
    ("rmsprop", dict(lr=-0.1), "lr"), ("identity", dict(weight_decay=math.inf), "weight_decay"),
    ("adam", dict(weight_decay=math.nan), "weight_decay"), ("adam", dict(eps=math.inf), "eps"),
    ("rmsprop", dict(eps=math.nan), "eps"), ("ekfac", dict(damping=math.inf), "damping"),
    ("ekfac", dict(weight_decay=-1.0), "weight_decay"),
    ("adam", dict(decoupled_weight_decay=1), "decoupled_weight_decay"),
    ("adam", dict(momentum=0.9), "momentum"),
])
def test_bad_hyperparameters_name_themselves(curvature, hp, name):
    net = _net()
    with pytest.raises(ValueError, match=name):              # in the constructor
        _make(net.parameters(), curvature, net, **hp)
    with pytest.raises(ValueError, match=f"param group 1.*{name}"):    # in a group dict
        _make([{"params": net[0].parameters()}, dict(params=net[3].parameters(), **hp)],
              curvature, net)
    opt = _make(list(net[0].parameters()), curvature, net)
    group = dict(params=list(net[3].parameters()), **hp)
    kept = dict(group)
    with pytest.raises(ValueError, match=name):              # in add_param_group
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and len(opt._blocks) == 1 and group == kept


def test_add_param_group_does_not_modify_its_argument():
    net = _net()
    opt = _make(list(net[0].parameters()), "adam", net)
    group = {"params": list(net[3].parameters()), "lr": 0.1}
    opt.add_param_group(group)
    assert sorted(group) == ["lr", "params"]


def test_ekfac_needs_the_model_and_whole_layers():
    net = _net()
    with pytest.raises(TypeError, match="model="):
        EKFAC(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model"):
        CurvatureOptimizer([{"params": net.parameters()}], "ekfac", 0.1)
    with pytest.raises(ValueError, match="layer '3' \\(Linear\\).*same group"):
        EKFAC(_groups(net, "ekfac", split=True), model=net)
    opt = EKFAC(list(net[0].parameters()) + [net[3].weight], model=net)
    with pytest.raises(ValueError, match="layer '3'"):
        opt.add_param_group({"params": [net[3].bias]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("params,error,match", [
    ([nn.Linear(2, 2)], TypeError, "model"),
    (torch.zeros(2, requires_grad=True), TypeError, "params"),
    ([], ValueError, "params"),
    (nn.Sequential(nn.ReLU()), ValueError, "trainable"),
    (5, TypeError, "params"),
])
def test_bad_params(params, error, match):
    with pytest.raises(error, match=match):
        CurvatureOptimizer(params, "adam", 0.1)


def test_bad_model_and_closure():
    net = _net()
    with pytest.raises(TypeError, match="model"):
        CurvatureOptimizer(net.parameters(), "adam", 0.1, model="net")
    with pytest.raises(TypeError, match="model"):
        CurvatureOptimizer(net, "adam", 0.1, model=_net())
    opt = CurvatureOptimizer(net, "adam", 0.1)
    with pytest.raises(InputError, match="closure"):
        opt.step(3)


def test_nn_adapter_logger_has_a_null_handler():
    assert any(isinstance(h, logging.NullHandler)
               for h in logging.getLogger("nn_adapter").handlers)


def test_closure_recorder_ignores_a_deep_copy_made_while_it_records():
    lin = nn.Linear(3, 2).double()
    x = torch.ones(4, 3, dtype=torch.float64)
    with records.Recorder([lin], [lin]) as rec:
        twin = copy.deepcopy(lin)            # copies the registered hooks too
        twin(torch.zeros(6, 3, dtype=torch.float64)).sum().backward()
        (2 * lin(x)).sum().backward()
    assert rec.calls == {lin: 1} and rec.inputs[lin].shape == (4, 3)
    assert torch.equal(rec.out_grads[lin], torch.full((4, 2), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_ddpnopt_without_feedback_steps_without_a_closure(curvature):
    from nn_adapter import DDPNOpt
    data = _data(3)
    a, b = _net(), _net()
    opt_a, opt_b = (DDPNOpt(n, lr=0.01, curvature=curvature, feedback=False) for n in (a, b))
    for x, y in data:
        _step(a, opt_a, x, y, closure=True)
        _step(b, opt_b, x, y, closure=False)
    assert torch.equal(_flat(a), _flat(b))
    with pytest.raises(InputError, match="closure"):
        DDPNOpt(_net(), lr=0.01, curvature=curvature).step()


def test_named_parameters_are_accepted():
    net, ref = _net(), _net()
    opt = CurvatureOptimizer(net.named_parameters(), "adam", 0.05, model=net)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    assert opt.param_groups[0]["param_names"][0] == "0.weight" and opt._blocks[0].kind == "linear"
    for x, y in _data(3):
        _step(net, opt, x, y, closure=False)
        ref_opt.step(_closure(ref, [ref_opt], x, y))
    assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12


# -- frozen parameters ------------------------------------------------------------------------------
def _freeze_schedule(net, i):
    """Before step i: layer 0's weight frozen throughout, the last layer's bias frozen for steps
    2 and 3 (after it has momentum) and trained again from step 4."""
    net[0].weight.requires_grad_(False)
    net[3].bias.requires_grad_(not 2 <= i < 4)


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no_closure"])
@pytest.mark.parametrize("feedback", [False, True], ids=["open_loop", "feedback"])
@pytest.mark.parametrize("curvature", ["identity", "rmsprop", "adam"])
def test_frozen_parameters_are_skipped_as_torch_skips_them(curvature, feedback, closure):
    """A parameter without a gradient (requires_grad=False, in the params or frozen later) is
    left alone and its state kept, as torch.optim does, while its layer's other parameter
    trains; feedback=False equals torch's optimizer update for update."""
    from nn_adapter import DDPNOpt

    if feedback and not closure:
        pytest.skip("the feedback needs a closure")
    hp = GROUP_HP[curvature][0]
    data = _data(6)
    net, ref = _net(), _net()
    _freeze_schedule(net, 0)
    _freeze_schedule(ref, 0)
    opt = DDPNOpt(net.parameters(), model=net, curvature=curvature, feedback=feedback, **hp)
    ref_opt = TORCH[curvature](ref.parameters(), **hp)
    w0 = net[0].weight.detach().clone()
    for i, (x, y) in enumerate(data):
        _freeze_schedule(net, i)
        _freeze_schedule(ref, i)
        bias = net[3].bias.detach().clone()
        _step(net, opt, x, y, closure)
        ref_opt.step(_closure(ref, [ref_opt], x, y))
        assert torch.equal(net[3].bias, bias) == (2 <= i < 4)
    assert torch.equal(net[0].weight, w0)
    assert not torch.equal(net[0].bias, _net()[0].bias)
    if not feedback:
        assert (_flat(net) - _flat(ref)).abs().max() <= 1e-12


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no_closure"])
def test_ekfac_layer_with_a_frozen_bias_equals_the_layer_without_bias(closure):
    """EKFAC preconditions a layer whose bias is frozen (at zero) as the same layer without a
    bias: the bias stays, the weight's Kronecker factor has no ones column."""
    data = _data(4)
    net = _net()
    with torch.no_grad():
        net[0].bias.zero_()
    net[0].bias.requires_grad_(False)
    ref = _net()
    lin = nn.Linear(5, 7, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(ref[0].weight)
    ref[0] = lin
    opt = EKFAC(net.parameters(), lr=0.1, damping=1e-2, model=net)    # the frozen bias included
    ref_opt = EKFAC(ref, lr=0.1, damping=1e-2)
    for x, y in data:
        _step(net, opt, x, y, closure)
        _step(ref, ref_opt, x, y, closure)
    assert torch.equal(net[0].bias, torch.zeros(7, dtype=torch.float64))
    assert opt.state[net[0].weight]["A"].shape == (5, 5)
    assert not torch.equal(net[0].weight, _net()[0].weight)
    assert (_flat(net)[: 35] - lin.weight.flatten()).abs().max() <= 1e-12
    assert (_flat(net)[42:] - _flat(ref)[35:]).abs().max() <= 1e-12


def test_ekfac_layer_unfrozen_later_restarts_its_factors():
    """A layer frozen at construction (its parameters given to the optimizer) and unfrozen later
    becomes one structured block (its Kronecker factors start then) and trains, with and
    without a closure."""
    data = _data(4)
    net = _net()
    for p in net[0].parameters():
        p.requires_grad_(False)
    opt = EKFAC(net.parameters(), lr=0.1, model=net)
    _step(net, opt, *data[0])
    assert net[0].weight not in opt.state
    for p in net[0].parameters():
        p.requires_grad_(True)
    w = net[0].weight.detach().clone()
    _step(net, opt, *data[1], closure=False)
    _step(net, opt, *data[2])
    assert opt.state[net[0].weight]["A"].shape == (6, 6) and opt.state[net[0].weight]["step"] == 2
    assert not torch.equal(net[0].weight, w)


class _Bag(nn.Module):
    """An embedding (sparse gradients when ``sparse``) and a linear head, for two tokens a sample."""

    def __init__(self, sparse):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(10, 4, sparse=sparse).double(), nn.Linear(8, 3).double()

    def forward(self, idx):
        return self.head(self.emb(idx).flatten(1))


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no_closure"])
@pytest.mark.parametrize("curvature,feedback", [(c, False) for c in CURVATURES]
                         + [("adam", True), ("ekfac", True)])
def test_sparse_gradients_are_refused_before_any_change(curvature, feedback, closure):
    """As torch.optim.Adam refuses sparse gradients, with an error that says so; nothing changes."""
    from nn_adapter import DDPNOpt

    if feedback and not closure:
        pytest.skip("the feedback needs a closure")
    idx, y = torch.randint(0, 10, (6, 2), generator=torch.Generator().manual_seed(0)), \
        torch.tensor([0, 1, 2, 0, 1, 2])
    for sparse in (False, True):
        net = _Bag(sparse)
        opt = DDPNOpt(net.parameters(), model=net, lr=0.1, curvature=curvature, feedback=feedback)
        before = _flat(net)

        def c():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(idx), y)
            loss.backward()
            return loss
        if not sparse:
            opt.step(c) if closure else (c(), opt.step())
            assert not torch.equal(_flat(net), before)
            continue
        with pytest.raises(InputError, match="sparse gradient"):
            opt.step(c) if closure else (c(), opt.step())
        assert torch.equal(_flat(net), before) and not any(opt.state.values())


@pytest.mark.parametrize("curvature,feedback", [(c, False) for c in CURVATURES]
                         + [("adam", True)])
def test_complex_parameters_are_refused_clearly(curvature, feedback):
    """Complex parameters are refused by name at construction and by add_param_group (the
    curvatures' moments are those of real numbers: measured, Adam's and RMSprop's steps differed
    from torch's, which takes a complex parameter as its real and imaginary parts)."""
    from nn_adapter import DDPNOpt

    torch.manual_seed(0)
    lin = nn.Linear(4, 2, dtype=torch.complex128)
    for params in (lin, lin.parameters()):
        with pytest.raises(InputError, match=r"parameter 0 of param group 0 .*complex128"):
            DDPNOpt(params, model=lin, curvature=curvature, feedback=feedback)
    net = nn.Sequential(nn.Linear(4, 2).double(), lin)
    opt = DDPNOpt(net[0].parameters(), model=net, curvature=curvature, feedback=feedback)
    with pytest.raises(InputError, match="param group 1 .*complex"):
        opt.add_param_group({"params": lin.parameters()})
    assert len(opt.param_groups) == 1 and [b.module for b in opt._blocks] == [net[0]]


# -- torch.amp.GradScaler -----------------------------------------------------------------------------
def _scaled_steps(curvature, scale, n=4):
    """``n`` closure-free steps of a float32 net, through a GradScaler of ``init_scale`` ``scale``
    (None: plain backward and step); the parameters and the optimizer."""
    from nn_adapter import DDPNOpt

    net = _net().float()
    opt = DDPNOpt(net.parameters(), model=net, lr=0.05, curvature=curvature, feedback=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    for x, y in _data(n):
        opt.zero_grad()
        loss = _loss(net, x.float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return _flat(net), opt


@pytest.mark.parametrize("curvature", CURVATURES)
def test_grad_scaler_steps_equal_the_unscaled_steps(curvature):
    """GradScaler's power-of-two scale is exact, so its steps equal the plain ones bit for bit:
    for ekfac the recorded output gradients are unscaled with the gradients (they were 1024
    times too large in its Kronecker factors before)."""
    plain, _ = _scaled_steps(curvature, None)
    scaled, _ = _scaled_steps(curvature, 1024.0)
    assert not torch.equal(plain, _flat(_net().float()))
    assert torch.equal(plain, scaled)


def test_grad_scaler_skips_an_inf_step_and_refuses_an_early_unscale():
    net = _net().float()
    opt = EKFAC(net, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data(1)[0]
    opt.zero_grad()
    scaler.scale(_loss(net, x.float(), y)).backward()
    net[0].weight.grad[0, 0] = math.inf
    before = _flat(net)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(_flat(net), before) and not any(opt.state.values())
    assert scaler.get_scale() == 512.0 and opt.refused_steps == 0    # skipped, not refused

    def scaled_step(unscale=False):
        opt.zero_grad()                # each step has its own pass's records only
        scaler.scale(_loss(net, x.float(), y)).backward()
        if unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    scaled_step()
    assert opt.state[net[0].weight]["step"] == 1 and not torch.equal(_flat(net), before)
    before = _flat(net)
    with pytest.raises(InputError, match="unscale_"):
        scaled_step(unscale=True)
    assert torch.equal(_flat(net), before)
    scaler.update()
    scaled_step()
    assert opt.state[net[0].weight]["step"] == 2 and not torch.equal(_flat(net), before)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["ekfac_no_closure", "ddpnopt_adam_feedback"])
def test_copy_of_model_and_optimizer_continues_as_the_original(kind, copier):
    """``copy.deepcopy((model, opt))`` (or a pickle round trip) is an independent optimizer of
    the copied model that continues exactly as the original (torch.optim's __getstate__ keeps only
    defaults, state and param_groups: the copy had lost its blocks and options)."""
    import pickle

    from nn_adapter import DDPNOpt

    closure = kind != "ekfac_no_closure"
    data = _data(5)
    net = _net()
    opt = (EKFAC(net, lr=0.1, damping=1e-2) if not closure else
           DDPNOpt(net.parameters(), model=net, lr=0.05, curvature="adam"))
    for x, y in data[:2]:
        _step(net, opt, x, y, closure)
    pair = copy.deepcopy((net, opt)) if copier == "deepcopy" else \
        pickle.loads(pickle.dumps((net, opt)))
    net2, opt2 = pair
    assert opt2._model is net2 and opt2.param_groups[0]["params"][0] is net2[0].weight
    assert sorted(opt2.defaults) == sorted(opt.defaults)
    at_copy = _flat(net)
    for x, y in data[2:]:
        _step(net2, opt2, x, y, closure)
    assert torch.equal(_flat(net), at_copy)              # the copy's steps leave the original
    for x, y in data[2:]:
        _step(net, opt, x, y, closure)
    assert not torch.equal(_flat(net), at_copy)
    assert torch.equal(_flat(net), _flat(net2))
