"""E-MSA through the protocol on other problems: a network (nn_adapter) and the torch backend."""
import numpy as np
import pytest

import occore

torch = pytest.importorskip("torch")


def test_emsa_trains_a_small_network_monotonically():
    nn_problem = pytest.importorskip("nn_adapter.problem")
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    before = [p.detach().clone() for p in net.parameters()]
    prob = nn_problem.NetworkProblem(net, nn.CrossEntropyLoss(), x, y)
    res = occore.EMSA(max_iter=8, rho=0.1).solve(prob)        # inner "auto": the problem's lbfgs
    accepted = [h.cost for h in res.history if h.accepted]
    assert res.status is occore.Status.MAX_ITER and res.iterations == 8
    assert accepted and np.all(np.diff(accepted) <= 0)
    assert res.cost < 0.8 * prob.rollout(prob.initial_controls()).cost
    assert all(isinstance(h.stop, float) and np.isfinite(h.stop) for h in res.history)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))   # the model is untouched
    res = occore.EMSA(max_iter=3, inner=occore.InnerSolver("gradient", iterations=3, step_size=0.5)).solve(prob)
    assert res.cost <= prob.rollout(prob.initial_controls()).cost
    with pytest.raises(occore.InputError, match="lbfgs"):
        occore.EMSA(max_iter=1, inner="newton").solve(prob)


def test_torch_backend_gives_the_same_iterates():
    a = occore.EMSA(max_iter=10).solve(occore.problems.make("unicycle", backend="torch", horizon=20))
    b = occore.EMSA(max_iter=10).solve(occore.problems.make("unicycle", horizon=20))
    np.testing.assert_allclose(a.us, b.us, rtol=0, atol=1e-9)
    assert [h.accepted for h in a.history] == [h.accepted for h in b.history]


def test_emsa_defaults_train_a_network_the_problem_chooses_rho():
    """occore.EMSA() with its defaults takes rho from the problem (1/B for a mean loss): the
    loss of the WINE network falls from about 1.05 to below 0.05 in 20 iterations (with rho = 1
    it stays near 0.74)."""
    nn_problem = pytest.importorskip("nn_adapter.problem")
    from torch import nn

    from nn_adapter.data import load_wine

    torch.manual_seed(0)
    d = load_wine()
    net = nn.Sequential(nn.Linear(13, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                        nn.Linear(10, 3)).double()
    prob = nn_problem.NetworkProblem(net, nn.CrossEntropyLoss(), d.x_train.double(), d.y_train)
    assert prob.emsa_rho == pytest.approx(1.0 / prob.batch_size)
    j0 = prob.rollout(prob.initial_controls()).cost
    res = occore.EMSA(max_iter=20).solve(prob)
    assert res.history[0].regularization <= prob.emsa_rho * 1.0001
    assert j0 > 0.9 and res.cost < 0.05
    fixed = occore.EMSA(max_iter=20, rho=1.0).solve(prob)      # an explicit rho wins
    assert fixed.history[0].regularization >= 0.9 and fixed.cost > 10 * res.cost
    assert occore.EMSA().init(prob).mu == pytest.approx(prob.emsa_rho)
    assert occore.EMSA().init(occore.problems.make("lqr")).mu == 1.0   # dense problems: rho = 1
