"""Stages: grouping rules, exact evaluation through functional_call, refusals."""
import pytest
import torch
from torch import nn

from nn_adapter.errors import UnsupportedModuleError
from nn_adapter.stages import split_stages
from occore.errors import OccoreError


class Residual(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


def run_stages(split, x):
    x = split.apply_pre(x)
    for s in split.stages:
        x = s.forward(s.param_dict(), x)
    return x


def test_mlp_grouping_and_exact_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Dropout(0.3),
                        Residual(4), nn.Linear(4, 2), nn.Softplus()).eval()
    split = split_stages(net)
    assert [type(m).__name__ for m in split.pre] == ["Flatten"]
    assert [s.names for s in split.stages] == [("1", "2", "3"), ("4",), ("5", "6")]
    assert split.stages[1].param_names == ("lin.weight", "lin.bias")
    assert [s.index for s in split.stages] == [0, 1, 2]
    x = torch.randn(5, 2, 3)
    assert torch.equal(run_stages(split, x), net(x))
    # params() are the live tensors
    assert split.stages[0].param_dict()["weight"] is net[1].weight


def test_cnn_with_pooling_batchnorm_eval():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8, 3), nn.Identity())
    net[1].running_mean.uniform_(); net[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    split = split_stages(net)
    assert [s.names for s in split.stages] == [("0",), ("1", "2", "3", "4"), ("5", "6")]
    x = torch.randn(4, 1, 6, 6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert torch.equal(run_stages(split, x), net(x))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_explicit_stage_list():
    lin1, lin2 = nn.Linear(3, 3), nn.Linear(3, 1)
    split = split_stages([(lin1, nn.ReLU()), lin2, nn.Sigmoid()])
    assert [s.names for s in split.stages] == [("0.0", "0.1"), ("1", "2")]
    x = torch.randn(2, 3)
    ref = torch.sigmoid(lin2(torch.relu(lin1(x))))
    assert torch.equal(run_stages(split, x), ref)


def test_forward_uses_given_params_without_touching_module():
    lin = nn.Linear(2, 2)
    stage = split_stages(nn.Sequential(lin)).stages[0]
    w0 = lin.weight.detach().clone()
    p = {"weight": torch.zeros(2, 2), "bias": torch.ones(2)}
    assert torch.equal(stage.forward(p, torch.randn(3, 2)), torch.ones(3, 2))
    assert torch.equal(lin.weight, w0) and isinstance(lin.weight, nn.Parameter)


@pytest.mark.parametrize("model, words", [
    (nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), ["'1'", "Dropout", "eval"]),
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), ["'1'", "BatchNorm1d", "eval"]),
    # without running statistics (in either mode) it normalises with the batch's; the
    # per-sample Jacobians failed inside torch ("Expected more than 1 value per channel")
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)),
     ["'1'", "BatchNorm1d", "track_running_stats=False", "couples the samples"]),
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)).eval(),
     ["'1'", "BatchNorm1d", "track_running_stats=True"]),
    (nn.Sequential(nn.LSTM(2, 2)), ["'0'", "LSTM"]),
    (nn.Sequential(nn.ReLU()), ["no module with trainable parameters"]),
    (nn.Linear(2, 2), ["Linear", "nn.Sequential"]),
    ([(nn.ReLU(), nn.Linear(2, 2))], ["ReLU", "head"]),
    ([(nn.Linear(2, 2), nn.Linear(2, 2))], ["'0.1'", "own"]),
    ([3], ["int"]),
])
def test_refusals_name_the_module(model, words):
    with pytest.raises(UnsupportedModuleError) as err:
        split_stages(model)
    assert isinstance(err.value, OccoreError) and isinstance(err.value, TypeError)
    for w in words:
        assert w in str(err.value)
    assert "Supported" in str(err.value) or "Sequential" in str(err.value)


@pytest.mark.parametrize("value", [None, 0, "no"])
def test_check_mode_must_be_a_bool(value):
    """None or 0 would skip the training-mode checks silently, "no" would run them."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())          # training mode: refused when checked
    with pytest.raises(TypeError, match=f"check_mode={value!r}: expected True or False"):
        split_stages(net, check_mode=value)
    assert len(split_stages(net, check_mode=False).stages) == 1


def test_shared_and_partly_frozen_parameters():
    lin = nn.Linear(2, 2)
    with pytest.raises(UnsupportedModuleError, match="shared"):
        split_stages(nn.Sequential(nn.Sequential(lin), nn.Sequential(lin)))
    lin.bias.requires_grad_(False)
    with pytest.raises(UnsupportedModuleError, match="frozen"):
        split_stages(nn.Sequential(lin))
    # a fully frozen module is a parameter-free follower
    frozen = nn.Linear(2, 2).requires_grad_(False)
    split = split_stages(nn.Sequential(nn.Linear(2, 2), frozen))
    assert len(split.stages) == 1 and split.stages[0].modules[1] is frozen


def test_a_shared_activation_instance_counts_at_every_place():
    """nn.Sequential(L1, act, L2, act, L3) with one Tanh object: both places are in the stages."""
    import torch
    from nn_adapter import NetworkProblem

    act = nn.Tanh()
    net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 2)).double()
    pre, stages = split_stages(net)
    assert [len(s.modules) for s in stages] == [2, 2, 1]
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    prob = NetworkProblem(net, nn.MSELoss(), x, y)
    traj = prob.rollout(prob.initial_controls())
    assert torch.equal(traj.xs[-1], net(x))


@pytest.mark.parametrize("shape,slopes", [((5,), 1), ((4, 3), 1), ((4, 3), 3),
                                          ((2, 3, 4), 3), ((2, 3, 2, 2), 3)])
def test_prelu_is_torchs_in_values_and_derivatives(shape, slopes):
    """nn_adapter.stages.prelu (where the stages evaluate a PReLU) = F.prelu: values and the
    Jacobians in x and in the slopes (torch's own, outside vmap)."""
    from torch.func import jacrev

    from nn_adapter.stages import prelu
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x.view(-1)[0] = 0.0                                  # the kink: both take the slope side
    w = torch.linspace(-0.5, 0.5, slopes, dtype=torch.float64)
    assert torch.equal(prelu(x, w), torch.nn.functional.prelu(x, w))
    for argnum in (0, 1):
        got = jacrev(prelu, argnums=argnum)(x, w)
        want = jacrev(torch.nn.functional.prelu, argnums=argnum)(x, w)
        assert torch.equal(got, want)
