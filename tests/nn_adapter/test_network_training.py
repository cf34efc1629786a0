"""occore's own solvers train networks through NetworkProblem (full batch)."""
import copy

import pytest
import torch
from sklearn.datasets import load_wine
from torch import nn

import occore
from nn_adapter import NetworkProblem


@pytest.fixture(scope="module")
def wine():
    X, y = load_wine(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return net, torch.tensor(X), torch.tensor(y)


@pytest.mark.parametrize("solver", [
    occore.DDP(max_iter=20),
    occore.ILQR(max_iter=20),
    # the costates carry the mean loss's 1/B while the feasibility terms sum over the batch:
    # rho is chosen on that scale (the default 1.0 also descends, more slowly)
    occore.EMSA(max_iter=20, rho=0.01, inner="lbfgs"),
], ids=["ddp", "ilqr", "emsa"])
def test_wine_mlp_loss_below_half_within_the_iterations(wine, solver):
    net, x, y = wine
    before = copy.deepcopy(net.state_dict())
    loss = nn.CrossEntropyLoss()
    prob = NetworkProblem(net, loss, x, y)
    initial = prob.rollout(prob.initial_controls()).cost
    res = solver.solve(prob)
    assert res.status in (occore.Status.MAX_ITER, occore.Status.CONVERGED), res.message
    assert 1 <= res.iterations <= 20 and len(res.history) == res.iterations
    assert res.cost < 0.5 * initial
    assert res.history[-1].cost == res.cost
    assert all(b.cost <= a.cost for a, b in zip(res.history, res.history[1:]))
    # the user's model is untouched; loading the result gives a model whose loss is Result.cost
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    trained = copy.deepcopy(net)
    prob.load_into(trained, res.us)
    with torch.no_grad():
        assert loss(trained(x), y).item() == res.cost


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_linear_network_quadratic_loss_one_ddp_iteration_is_least_squares(weight_decay):
    """No nonlinearity after the parameters and an MSE loss: linear dynamics in u, quadratic cost.
    (Frozen random tanh features in front are part of x_0.)"""
    torch.manual_seed(0)
    feat = nn.Linear(4, 5).double().requires_grad_(False)
    net = nn.Sequential(feat, nn.Tanh(), nn.Linear(5, 3).double())
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    prob = NetworkProblem(net, nn.MSELoss(), x, y, weight_decay=weight_decay)
    res = occore.DDP().solve(prob)
    assert res.converged and res.history[0].step == 1.0 and res.iterations <= 2
    # closed form: min 1/(B p) |A theta - Y|^2 + wd/2 |theta|^2 with A = [features, 1]
    A = torch.cat([torch.tanh(feat(x)), torch.ones(20, 1, dtype=torch.float64)], dim=1)
    c = 2.0 / y.numel()
    theta = torch.linalg.solve(c * A.T @ A + weight_decay * torch.eye(6, dtype=torch.float64), c * A.T @ y)
    torch.testing.assert_close(res.us[0]["weight"], theta[:5].T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.us[0]["bias"], theta[5], rtol=1e-10, atol=1e-10)
    assert res.history[0].cost == pytest.approx(res.cost, rel=1e-12)
