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
