"""DDPNOpt as a torch optimizer: state_dict, LR schedulers, dtype, options, bad input."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from nn_adapter import DDPNOpt
from nn_adapter.errors import UnsupportedModuleError
from nn_adapter.training import make_closure
from occore.errors import InputError


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 4, 6, generator=g, dtype=dtype),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _step(net, opt, x, y):
    return opt.step(make_closure(net, opt, x, y))


def _flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("curvature,hp", [("adam", {}), ("ekfac", dict(eigen_update_freq=2)),
                                          ("identity", dict(momentum=0.9)),
                                          ("rmsprop", dict(centered=True))])
def test_state_dict_round_trip_resumes_identically(curvature, hp):
    data = _data(6)
    net = _net()
    opt = DDPNOpt(net, lr=0.01, curvature=curvature, **hp)
    for x, y in data[:3]:
        _step(net, opt, x, y)
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_net = copy.deepcopy(net.state_dict())
    for x, y in data[3:]:
        _step(net, opt, x, y)
    net2 = _net()
    net2.load_state_dict(saved_net)
    opt2 = DDPNOpt(net2, lr=0.01, curvature=curvature, **hp)
    opt2.load_state_dict(saved_opt)
    for x, y in data[3:]:
        _step(net2, opt2, x, y)
    assert torch.equal(_flat(net), _flat(net2))


def test_lr_scheduler_works_through_param_groups():
    data = _data(5)
    ref_net, net = _net(), _net()
    ref = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.5)
    opt = DDPNOpt(net, lr=0.1, curvature="identity", momentum=0.5, feedback=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3) for o in (ref, opt)]
    for x, y in data:
        _step(ref_net, ref, x, y)
        _step(net, opt, x, y)
        for s in scheds:
            s.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 * 0.3 ** 2)
    assert (_flat(net) - _flat(ref_net)).abs().max() <= 1e-12


def test_float32_model_and_state_follow_the_model():
    net = _net(torch.float32)
    opt = DDPNOpt(net, lr=0.01, curvature="ekfac")
    for x, y in _data(2, dtype=torch.float32):
        loss = _step(net, opt, x, y)
    assert loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    st = opt.state[net[0].weight]
    assert st["QA"].dtype == torch.float32 and st["scale"].dtype == torch.float32


@pytest.mark.parametrize("options", [dict(eps_vxx=0.1), dict(second_order=True),
                                     dict(eps_vxx=0.1, second_order=True)])
def test_options_change_the_step_and_stay_finite(options):
    data = _data(3)
    base, net = _net(), _net()
    opt_b = DDPNOpt(base, lr=0.05, curvature="adam")
    opt = DDPNOpt(net, lr=0.05, curvature="adam", **options)
    for x, y in data:
        _step(base, opt_b, x, y)
        _step(net, opt, x, y)
    assert torch.isfinite(_flat(net)).all()
    assert (_flat(net) - _flat(base)).abs().max() > 1e-8


def test_user_inputs_are_not_modified():
    net = _net()
    opt = DDPNOpt(net, lr=0.05, curvature="adam")
    x, y = _data(1)[0]
    x0, y0 = x.clone(), y.clone()
    retained = {}

    def closure():
        opt.zero_grad()
        out = net(x)
        out.retain_grad()
        retained["out"] = out
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        retained["grad"] = out.grad.clone()
        return loss
    opt.step(closure)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.equal(retained["out"].grad, retained["grad"])


# -- bad input ------------------------------------------------------------------------------------
def test_step_without_closure_is_a_clear_error():
    opt = DDPNOpt(_net(), lr=0.01)
    with pytest.raises(InputError, match="closure"):
        opt.step()
    with pytest.raises(InputError, match="closure"):
        opt.step(lambda: None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_refuses_the_step(bad):
    net = _net()
    opt = DDPNOpt(net, lr=0.01, curvature="adam")
    x, y = _data(1)[0]
    _step(net, opt, x, y)
    before_params = _flat(net).clone()
    before_state = copy.deepcopy(opt.state_dict())

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) * bad
        loss.backward()
        return loss
    with pytest.warns(RuntimeWarning, match="not finite"):
        loss = opt.step(closure)
    assert not math.isfinite(float(loss.detach()))
    assert torch.equal(_flat(net), before_params)
    after = opt.state_dict()
    for k, st in before_state["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][name]))


def test_non_finite_gradient_refuses_the_step():
    net = _net()
    opt = DDPNOpt(net, lr=0.01)
    x, y = _data(1)[0]
    before = _flat(net).clone()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        net[4].bias.grad[0] = float("inf")
        return loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
    assert any("gradient is not finite" in str(w.message) for w in caught)
    assert torch.equal(_flat(net), before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"),
    (dict(curvature="newton"), "curvature"),
    (dict(feedback="yes"), "feedback"),
    (dict(eps_vxx=-1.0), "eps_vxx"),
    (dict(second_order=1), "second_order"),
    (dict(vxx_update="no"), "vxx_update"),
    (dict(curvature="adam", betas=(1.0, 0.9)), "betas"),
    (dict(curvature="adam", eps=0.0), "eps"),
    (dict(curvature="adam", beta1=0.9), "beta1"),
    (dict(curvature="identity", momentum=-0.1), "momentum"),
    (dict(curvature="identity", nesterov=True), "nesterov"),
    (dict(curvature="rmsprop", alpha=1.5), "alpha"),
    (dict(curvature="ekfac", damping=-1.0), "damping"),
    (dict(curvature="adam", weight_decay=-1.0), "weight_decay"),
])
def test_invalid_hyperparameters_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DDPNOpt(_net(), **{"lr": 0.01, **kwargs})


def test_a_branching_model_with_its_own_forward_trains_with_feedback():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)
            self.c = nn.Linear(2, 2)

        def forward(self, x):
            return self.c(torch.tanh(self.a(x) + self.b(x)))

    torch.manual_seed(0)
    net = Branchy().double()
    opt = DDPNOpt(net, lr=0.05, diagnostics=True)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    closure = make_closure(net, opt, x, y)
    first = float(opt.step(closure))
    for _ in range(30):
        last = float(opt.step(closure))
    assert last < first
    assert [d["module"] for d in opt.diagnostics] == ["a", "b", "c"]
    assert opt.diagnostics[2]["feedback_norm"] > 0


def test_models_that_cannot_be_optimised():
    with pytest.raises(TypeError, match="model"):
        DDPNOpt([nn.Linear(2, 2)], lr=0.01)
    with pytest.raises(ValueError, match="trainable"):
        DDPNOpt(nn.Sequential(nn.ReLU()), lr=0.01, feedback=False)


def test_module_called_twice_in_the_closure_is_refused():
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = DDPNOpt(net, lr=0.01)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    before = _flat(net).clone()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) + nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    with pytest.raises(InputError, match="2 times"):
        opt.step(closure)
    assert torch.equal(_flat(net), before)


def test_infinite_eps_vxx_is_refused():
    import pytest as _pytest
    from torch import nn as _nn

    from nn_adapter import DDPNOpt as _DDPNOpt

    with _pytest.raises(ValueError, match="eps_vxx"):
        _DDPNOpt(_nn.Sequential(_nn.Linear(2, 2)), lr=0.1, eps_vxx=float("inf"))


# -- torch.optim conventions with feedback ------------------------------------------------------
def _three():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def _xy(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_feedback_without_a_model_is_a_type_error_naming_model():
    net = _three()
    with pytest.raises(TypeError, match="model"):
        DDPNOpt(net.parameters(), lr=0.01)
    DDPNOpt(net.parameters(), lr=0.01, feedback=False)          # the base optimizer needs none


def test_passing_the_model_or_its_parameters_gives_the_same_steps():
    nets = [_three(), _three()]
    opts = [DDPNOpt(nets[0], lr=0.02), DDPNOpt(nets[1].parameters(), lr=0.02, model=nets[1])]
    for s in range(3):
        x, y = _xy(s)
        for net, opt in zip(nets, opts):
            opt.step(make_closure(net, opt, x, y))
    assert torch.equal(_flat(nets[0]), _flat(nets[1]))


def test_a_group_added_later_is_updated_and_becomes_a_stage():
    net = _three()
    first = list(net[0].parameters()) + list(net[2].parameters())
    opt = DDPNOpt(first, lr=0.02, model=net, diagnostics=True)
    last = [p.detach().clone() for p in net[4].parameters()]
    x, y = _xy()
    opt.step(make_closure(net, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(last, net[4].parameters()))
    assert [d["module"] for d in opt.diagnostics] == ["0", "2"]
    opt.add_param_group({"params": net[4].parameters(), "lr": 0.05})
    opt.step(make_closure(net, opt, x, y))
    assert not any(torch.equal(a, b) for a, b in zip(last, net[4].parameters()))
    assert [d["module"] for d in opt.diagnostics] == ["0", "2", "4"]


@pytest.mark.parametrize("curvature", ["adam", "ekfac"])
def test_state_dict_with_groups_resumes_bit_identically_with_feedback(curvature):
    def make(net):
        return DDPNOpt([{"params": net[0].parameters(), "lr": 0.03},
                        {"params": list(net[2].parameters()) + list(net[4].parameters()),
                         "weight_decay": 0.01, "decoupled_weight_decay": True}],
                       lr=0.01, curvature=curvature, model=net)
    net = _three()
    opt = make(net)
    for s in range(3):
        opt.step(make_closure(net, opt, *_xy(s)))
    saved_net, saved = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    for s in range(3, 6):
        opt.step(make_closure(net, opt, *_xy(s)))
    fresh = _three()
    fresh.load_state_dict(saved_net)
    fresh_opt = make(fresh)
    fresh_opt.load_state_dict(saved)
    for s in range(3, 6):
        fresh_opt.step(make_closure(fresh, fresh_opt, *_xy(s)))
    assert torch.equal(_flat(net), _flat(fresh))


def test_state_dict_of_another_curvature_is_refused():
    net = _three()
    opt = DDPNOpt(net, lr=0.01, curvature="adam")
    opt.step(make_closure(net, opt, *_xy()))
    other = DDPNOpt(net, lr=0.01, curvature="rmsprop")
    with pytest.raises(ValueError, match="adam"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_group_values_are_refused(bad):
    net = _three()
    with pytest.raises(ValueError, match="lr"):
        DDPNOpt([{"params": net[0].parameters(), "lr": bad}], lr=0.01, model=net)
    opt = DDPNOpt(net[0].parameters(), lr=0.01, model=net)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": net[2].parameters(), "weight_decay": bad})
    with pytest.raises(ValueError, match="eps"):
        DDPNOpt(net, lr=0.01, eps=bad)


@pytest.mark.parametrize("terminal", ["projected", "gradient"])
def test_a_summed_cross_entropy_is_refused_before_any_change(terminal):
    net = _three()
    opt = DDPNOpt(net, lr=0.01, terminal_hessian=terminal)
    x, y = _xy()
    opt.step(make_closure(net, opt, x, y))
    before, state = _flat(net).clone(), copy.deepcopy(opt.state_dict())

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y, reduction="sum")
        loss.backward()
        return loss
    fresh = DDPNOpt(net, lr=0.01, terminal_hessian=terminal)
    fresh.load_state_dict(copy.deepcopy(state))      # (torch's load_state_dict may alias)
    with pytest.raises(InputError, match="reduction='sum'"):
        fresh.step(closure)
    assert torch.equal(_flat(net), before)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


@pytest.mark.parametrize("loss", ["auto", "mse"])
def test_a_summed_squared_error_is_refused_before_any_change(loss):
    """MSELoss(reduction='sum') is told from a mean squared error by the loss value against its
    gradient (B |g|^2 / 4L = B, not 1/d); before, it trained with per-sample value gradients B
    times too small, silently with loss='mse'."""
    net = _three()
    x = _xy()[0]
    target = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    opt = DDPNOpt(net, lr=0.01, loss=loss)
    before = _flat(net).clone()

    def closure():
        opt.zero_grad()
        out = nn.functional.mse_loss(net(x), target, reduction="sum")
        out.backward()
        return out
    with pytest.raises(InputError, match="reduction='sum'"):
        opt.step(closure)
    assert torch.equal(_flat(net), before)


def test_a_mean_squared_error_of_any_output_shape_is_not_taken_for_a_sum():
    """torch's mean squared error (outputs (B, 2, 3)) and a sum over the output dimensions
    averaged over the batch both train; only the sum over the batch is refused."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3)))
    x = torch.randn(8, 4)
    target = torch.randn(8, 2, 3)
    for loss_fn in (nn.functional.mse_loss, lambda o, t: (o - t).square().flatten(1).sum(1).mean()):
        opt = DDPNOpt(net, lr=0.01, loss="mse")
        first = float(opt.step(make_closure(net, opt, x, target, loss_fn)))
        for _ in range(5):
            last = float(opt.step(make_closure(net, opt, x, target, loss_fn)))
        assert last < first


def test_a_step_on_a_closure_returning_the_live_loss_warns_nothing():
    """The closure returns the loss as torch.optim's do (it requires grad): DDPNOpt reads its
    value without torch's 'Converting a tensor with requires_grad=True to a scalar' warning."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = DDPNOpt(net.parameters(), model=net, lr=0.01)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(closure)
    assert loss.requires_grad and opt.refused_steps == 0
