"""NetworkProblem: exact rollouts, costs, load_into, the feedback pass, bad input, no mutation."""
import copy

import pytest
import torch
from torch import nn

import occore
from nn_adapter import NetworkProblem, UnsupportedModuleError
from nn_adapter.errors import DtypeError
from occore.errors import InputError, ShapeError
from occore.types import ControlProblem, Policy


def mlp_data(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    return net, nn.CrossEntropyLoss(), torch.randn(9, 5, dtype=dtype), torch.randint(0, 3, (9,))


def cnn_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 2, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(2, 4), nn.Softplus(), nn.Linear(4, 3))
    return net, nn.CrossEntropyLoss(), torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("make", [mlp_data, cnn_data])
def test_rollout_reproduces_the_model_bit_for_bit(make):
    net, loss, x, y = make()
    prob = NetworkProblem(net, loss, x, y)
    assert isinstance(prob, ControlProblem)
    traj = prob.rollout(prob.initial_controls())
    with torch.no_grad():
        out = net(x)
        assert torch.equal(traj.xs[-1], out)
        assert traj.cost == loss(out, y).item()
    assert len(traj.xs) == prob.horizon + 1 and traj.xs[0] is prob.x0
    assert isinstance(traj.cost, float) and traj.xs[-1].dtype == torch.float32


def test_weight_decay_cost_and_dtype_following():
    net, loss, x, y = mlp_data(torch.float64)
    prob = NetworkProblem(net, loss, x.float(), y, weight_decay=0.3)   # float32 inputs are cast
    assert prob.inputs.dtype == torch.float64 and x.dtype == torch.float64
    traj = prob.rollout(prob.initial_controls())
    with torch.no_grad():
        expected = loss(net(x.float().double()), y).item() + 0.15 * sum(float((p * p).sum()) for p in net.parameters())
    assert traj.cost == pytest.approx(expected, rel=1e-14)


def test_initial_controls_are_copies_and_load_into_round_trips():
    net, loss, x, y = mlp_data()
    prob = NetworkProblem(net, loss, x, y)
    us = prob.initial_controls()
    assert us[0]["weight"] is not net[0].weight
    assert all(torch.equal(us[t][k], p) for t, s in enumerate(prob.stages) for k, p in s.param_dict().items())
    us[0]["weight"].add_(1.0)                        # editing the copy leaves the model alone
    assert not torch.equal(us[0]["weight"], net[0].weight)
    other = copy.deepcopy(net)
    params_before = [id(p) for p in other.parameters()]
    prob.load_into(other, us)
    assert [id(p) for p in other.parameters()] == params_before
    back = NetworkProblem(other, loss, x, y).initial_controls()
    assert all(torch.equal(back[t][k], us[t][k]) for t in range(prob.horizon) for k in us[t])
    with pytest.raises(ShapeError, match="model"):
        prob.load_into(nn.Sequential(nn.Linear(5, 7)), us)
    with pytest.raises(ShapeError, match=r"us\[1\]"):
        prob.load_into(other, [us[0], {"weight": us[1]["weight"]}, us[2]])


def test_rollout_policy_applies_feedforward_and_feedback():
    net, loss, x, y = mlp_data(torch.float64)
    prob = NetworkProblem(net, loss, x, y)
    ref = prob.rollout(prob.initial_controls())
    torch.manual_seed(3)
    k = [{n: torch.randn_like(v) for n, v in u.items()} for u in ref.us]
    m = [sum(v.numel() for v in u.values()) for u in ref.us]
    K = [torch.randn(m[t], ref.xs[t].numel(), dtype=torch.float64) * 0.1 for t in range(prob.horizon)]
    pol = Policy(k=k, K=K)
    assert prob.rollout_policy(ref, pol, 0.0).cost == ref.cost      # dx = 0 along the reference
    new = prob.rollout_policy(ref, pol, 0.5)
    # replay by hand: u_t = ref + 0.5 k + K dx, states through the model's own layers
    xt = ref.xs[0]
    for t, stage in enumerate(prob.stages):
        du = K[t] @ (xt - ref.xs[t]).reshape(-1)
        u = prob.unflatten(t, du)
        u = {n: ref.us[t][n] + 0.5 * k[t][n] + u[n] for n in u}
        for n in u:
            torch.testing.assert_close(new.us[t][n], u[n], rtol=0, atol=1e-15)
        xt = stage.forward(u, xt)
        torch.testing.assert_close(new.xs[t + 1], xt, rtol=0, atol=0)
    # operator form of K gives the same trajectory
    op = Policy(k=k, K=[(lambda dx, M=M: M @ dx) for M in K])
    assert prob.rollout_policy(ref, op, 0.5).cost == new.cost
    # K_0 = None (no feedback): dx_0 is zero anyway
    assert prob.rollout_policy(ref, Policy(k=k, K=[None] + K[1:]), 0.5).cost == new.cost


class Pair(nn.Module):
    def forward(self, x):
        return x, x


@pytest.mark.parametrize("args, error, words", [
    ((nn.Sequential(nn.Linear(5, 3), nn.GRU(3, 3)),), UnsupportedModuleError, ["'1'", "GRU"]),
    ((nn.Sequential(nn.Linear(5, 3), nn.Dropout()).train(),), UnsupportedModuleError, ["eval"]),
    ((nn.Sequential(nn.Linear(4, 3)),), ShapeError, ["inputs", "'0'", "Linear"]),
    ((nn.Sequential(nn.Linear(5, 3), Pair()),), ShapeError, ["stage 0 output"]),
])
def test_bad_models_and_inputs(args, error, words):
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.raises(error) as err:
        NetworkProblem(args[0], nn.CrossEntropyLoss(), x, y)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("followers, words", [
    # a follower refusing its input's shape: it is named with that shape, not the stage's head
    ((nn.Unflatten(1, (3, 3)), nn.Flatten(), nn.Linear(9, 3)),
     ["module '2' input", "(6, 4)", "'2' (Unflatten)"]),
    # a follower returning a tuple: it is named, and the module that cannot take the tuple
    ((nn.Unflatten(1, (1, 4)), nn.MaxPool1d(2, return_indices=True), nn.Flatten(), nn.Linear(2, 3)),
     ["module '3' output", "one tensor", "tuple", "'4' (Flatten)"]),
])
def test_a_failing_follower_is_named_not_the_head_of_its_stage(followers, words):
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), *followers)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.raises(ShapeError) as err:
        NetworkProblem(net, nn.CrossEntropyLoss(), x, y)
    for w in words:
        assert w in str(err.value)
    assert "'0' (Linear)" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_refused_before_any_work(dtype):
    """DDP's Cholesky solves have no half-precision kernel and E-MSA's L-BFGS overflows in
    float16: a DtypeError naming the model's dtype at construction (was: NotImplementedError
    from inside DDP's first backward pass, or a RuntimeError from inside torch's L-BFGS)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    with pytest.raises(DtypeError) as err:
        NetworkProblem(net, nn.CrossEntropyLoss(), torch.randn(6, 3), torch.randint(0, 3, (6,)))
    assert f"model: expected float32 or float64 parameters, got {dtype}" in str(err.value)
    assert "model.float()" in str(err.value)


def test_bad_targets_loss_and_options():
    net, loss, x, y = mlp_data()
    with pytest.raises(ShapeError, match="targets.*9"):
        NetworkProblem(net, loss, x, y[:5])
    with pytest.raises(InputError, match="scalar"):
        NetworkProblem(net, nn.CrossEntropyLoss(reduction="none"), x, y)
    with pytest.raises(InputError, match="loss_fn"):
        NetworkProblem(net, "mse", x, y)
    with pytest.raises(ShapeError, match=r"targets: expected shape \(9, 3\), got \(9,\)"):
        NetworkProblem(net, nn.MSELoss(), x, y.float())     # (9, 3) outputs vs (9,) targets
    with pytest.raises(InputError, match="inputs"):
        NetworkProblem(net, loss, x.numpy(), y)
    with pytest.raises(InputError, match="NaN"):
        NetworkProblem(net, loss, x * float("nan"), y)
    with pytest.raises(InputError, match="weight_decay"):
        NetworkProblem(net, loss, x, y, weight_decay=-1.0)
    prob = NetworkProblem(net, loss, x, y)
    with pytest.raises(ShapeError, match="us"):
        prob.rollout(prob.initial_controls()[:2])


def test_a_solve_modifies_nothing_the_user_passed():
    net, loss, x, y = mlp_data(torch.float64)
    state = copy.deepcopy(net.state_dict())
    x0, y0 = x.clone(), y.clone()
    prob = NetworkProblem(net, loss, x, y, weight_decay=1e-3)
    res = occore.ILQR(max_iter=2).solve(prob)
    assert res.cost < prob.rollout(prob.initial_controls()).cost
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(xt.data_ptr() != x.data_ptr() for xt in res.xs)      # nothing handed out aliases x
    assert all(isinstance(p, nn.Parameter) and p.grad is None for p in net.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_model_to_cuda():
    net, loss, x, y = mlp_data(torch.float64)
    net = net.cuda()
    prob = NetworkProblem(net, loss, x, y)          # CPU data is moved (copied) to the model
    assert prob.inputs.is_cuda and not x.is_cuda
    traj = prob.rollout(prob.initial_controls())
    with torch.no_grad():
        assert torch.equal(traj.xs[-1], net(x.cuda()))
    res = occore.ILQR(max_iter=2).solve(prob)
    assert res.cost < traj.cost and res.us[0]["weight"].is_cuda


def test_controls_of_the_wrong_type_or_dtype_get_typed_errors():
    import torch as _torch
    from torch import nn as _nn

    from nn_adapter import NetworkProblem as _NP
    from occore.errors import InputError as _IE

    net = _nn.Sequential(_nn.Linear(2, 3), _nn.Tanh(), _nn.Linear(3, 1)).double()
    prob = _NP(net, _nn.MSELoss(), _torch.randn(4, 2, dtype=_torch.float64), _torch.randn(4, 1, dtype=_torch.float64))
    us = prob.initial_controls()
    bad = [dict(us[0]), {k: v.float() for k, v in us[1].items()}]
    with pytest.raises(_IE, match=r"us\[1\]\['weight'\].*float64"):
        prob.rollout(bad)
    bad = [dict(us[0]), {k: v.tolist() for k, v in us[1].items()}]
    with pytest.raises(_IE, match="expected a tensor"):
        prob.rollout(bad)


def test_a_parametrized_layer_is_a_stage_and_a_spectral_norm_in_training_mode_is_refused():
    """weight_norm / spectral_norm (torch.nn.utils.parametrizations): the layer is one stage
    whose controls are its originals (its `parametrizations` container is part of it, not a
    ModuleDict of the network, as it was refused before): the rollout is the model's, the
    control gradient autograd's, and a solve trains it. A spectral norm in training mode writes
    its buffers at every read of the weight: refused, naming the layer (eval mode works)."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    weight_norm(net[2])
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    prob = NetworkProblem(net, nn.CrossEntropyLoss(), x, y)
    assert prob.stages[1].param_names == ("bias", "parametrizations.weight.original0",
                                          "parametrizations.weight.original1")
    traj = prob.rollout(prob.initial_controls())
    assert torch.equal(traj.xs[-1], net(x))
    grads = prob.local_model(traj).control_gradient()
    nn.CrossEntropyLoss()(net(x), y).backward()
    for stage, g in zip(prob.stages, grads):
        for name, p in stage.param_dict().items():
            assert torch.allclose(g[name], p.grad, atol=1e-14, rtol=0)
    res = occore.ILQR(max_iter=5).solve(prob)
    assert res.cost < 0.7 * traj.cost
    prob.load_into(net, res.us)
    assert nn.CrossEntropyLoss()(net(x), y).item() == pytest.approx(res.cost, rel=1e-12)
    torch.manual_seed(0)
    sn = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    spectral_norm(sn[2])
    with pytest.raises(UnsupportedModuleError, match=r"module '2' \(ParametrizedLinear\) is in "
                       r"training mode, where its spectral_norm.*model.eval\(\)"):
        NetworkProblem(sn, nn.CrossEntropyLoss(), x, y)
    state = copy.deepcopy(sn.eval().state_dict())
    prob = NetworkProblem(sn, nn.CrossEntropyLoss(), x, y)
    occore.ILQR(max_iter=2).solve(prob)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), sn.state_dict().values()))
