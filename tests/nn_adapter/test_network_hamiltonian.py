"""E-MSA hooks of NetworkProblem: augmented Hamiltonian values, gradients, maximisation."""
import numpy as np
import pytest
import torch
from torch import nn

from nn_adapter import NetworkProblem
from occore.errors import InputError
from occore.solvers.emsa import InnerSolver


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    prob = NetworkProblem(net, nn.CrossEntropyLoss(), x, y, weight_decay=0.01)
    traj = prob.rollout(prob.initial_controls())
    lm = prob.local_model(traj)
    return prob, traj, lm


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def test_at_the_current_controls_the_feasibility_terms_vanish(setup):
    prob, traj, lm = setup
    p = lm.costates()
    v0, g0 = prob.hamiltonian_grad(traj, p, 0.0, traj.us)
    v1, g1 = prob.hamiltonian_grad(traj, p, 5.0, traj.us)
    assert v0.shape == (prob.horizon,) and v0.dtype == np.float64
    np.testing.assert_allclose(v1, v0, rtol=1e-13, atol=1e-15)
    for t in range(prob.horizon):
        # dHt/du = dH/du = -dJ/du at the current controls, whatever rho
        torch.testing.assert_close(flat(g0[t]), -flat(lm.control_gradient()[t]), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(flat(g1[t]), flat(g0[t]), rtol=1e-12, atol=1e-14)
        H = float((p[t + 1] * traj.xs[t + 1]).sum()) - 0.005 * float((flat(traj.us[t]) ** 2).sum())
        assert v0[t] == pytest.approx(H, rel=1e-13)


def test_gradient_with_the_double_backward_term_matches_finite_differences(setup):
    prob, traj, lm = setup
    p, rho = lm.costates(), 2.0
    torch.manual_seed(1)
    us = [{k: v + 0.3 * torch.randn_like(v) for k, v in u.items()} for u in traj.us]
    vals, grads = prob.hamiltonian_grad(traj, p, rho, us)
    for t in range(prob.horizon):
        d = {k: torch.randn_like(v) for k, v in us[t].items()}
        eps = 1e-6
        plus = [dict(u) for u in us]
        minus = [dict(u) for u in us]
        plus[t] = {k: v + eps * d[k] for k, v in us[t].items()}
        minus[t] = {k: v - eps * d[k] for k, v in us[t].items()}
        fd = (prob.hamiltonian_grad(traj, p, rho, plus)[0][t]
              - prob.hamiltonian_grad(traj, p, rho, minus)[0][t]) / (2 * eps)
        assert float(flat(grads[t]) @ flat(d)) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # the feasibility terms are really there away from the current controls
    assert np.all(vals < prob.hamiltonian_grad(traj, p, 0.0, us)[0])


@pytest.mark.parametrize("method", ["lbfgs", "gradient"])
def test_maximisation_raises_every_stage_and_leaves_the_trajectory(setup, method):
    prob, traj, lm = setup
    p = lm.costates()
    before = [{k: v.clone() for k, v in u.items()} for u in traj.us]
    inner = InnerSolver(method=method, iterations=10, step_size=1.0 if method == "lbfgs" else 0.5)
    new = prob.maximize_hamiltonian(traj, p, 1.0, inner)
    assert all(torch.equal(before[t][k], traj.us[t][k]) for t in range(prob.horizon) for k in before[t])
    old_vals, _ = prob.hamiltonian_grad(traj, p, 1.0, traj.us)
    new_vals, _ = prob.hamiltonian_grad(traj, p, 1.0, new)
    assert np.all(new_vals > old_vals)
    assert not any(v.requires_grad for u in new for v in u.values())


def test_unknown_inner_method_is_named(setup):
    prob, traj, lm = setup
    with pytest.raises(InputError, match="lbfgs, gradient"):
        prob.maximize_hamiltonian(traj, lm.costates(), 1.0, InnerSolver(method="newton"))


def _linear_setup(wd=0.3):
    """Two Linear stages without activations: each stage Hamiltonian is a concave quadratic."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    prob = NetworkProblem(net, nn.CrossEntropyLoss(), x, y, weight_decay=wd)
    traj = prob.rollout(prob.initial_controls())
    p = prob.local_model(traj).costates()
    torch.manual_seed(3)
    us = [{k: v + 0.2 * torch.randn_like(v) for k, v in u.items()} for u in traj.us]
    return prob, traj, p, us


def _by_hand(traj, p, t, rho, wd, u):
    """Ht_t of a Linear stage written out (a 0-d tensor): H = sum_i p'_i . (W x_i + b) - wd/2 |u|^2,
    minus rho/2 |x' - (W x + b)|^2 and rho/2 |p - W^T p'|^2 (dH/dx = W^T p' per sample)."""
    W, b = u["weight"], u["bias"]
    x, x1, pt, p1 = traj.xs[t], traj.xs[t + 1], p[t], p[t + 1]
    out = x @ W.T + b
    H = (p1 * out).sum() - 0.5 * wd * ((W * W).sum() + (b * b).sum())
    return H - 0.5 * rho * ((x1 - out) ** 2).sum() - 0.5 * rho * ((pt - p1 @ W) ** 2).sum()


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0, 3.0])
def test_stage_hamiltonian_equals_its_definition(rho):
    """Every term, for feasibility weights below, at and above 1, away from the current controls."""
    prob, traj, p, us = _linear_setup()
    vals, _ = prob.hamiltonian_grad(traj, p, rho, us)
    for t in range(prob.horizon):
        assert vals[t] == pytest.approx(float(_by_hand(traj, p, t, rho, 0.3, us[t])), rel=1e-12)


@pytest.mark.parametrize("method,iterations,step,atol", [("gradient", 400, 1.0, 1e-6),
                                                         ("lbfgs", 50, 1.0, 1e-4)])
def test_maximisation_reaches_the_maximiser_of_a_concave_stage(method, iterations, step, atol):
    """On a linear network each Ht_t is a concave quadratic in (W, b): its maximiser is one Newton
    step from anywhere (Hessian by autograd); both inner methods reach it."""
    prob, traj, p, us = _linear_setup()
    rho = 0.5
    new = prob.maximize_hamiltonian(traj, p, rho, InnerSolver(method=method, iterations=iterations,
                                                               step_size=step))
    for t in range(prob.horizon):
        shapes = {k: v.shape for k, v in traj.us[t].items()}
        sizes = [v.numel() for v in traj.us[t].values()]

        def f(z):
            parts = torch.split(z, sizes)
            u = {k: part.reshape(shapes[k]) for k, part in zip(shapes, parts)}
            return _by_hand(traj, p, t, rho, 0.3, u)
        z0 = flat(traj.us[t]).detach()
        g = torch.func.grad(f)(z0)
        h = torch.func.hessian(f)(z0)
        assert float(torch.linalg.eigvalsh(h).max()) < 0           # concave
        best = z0 - torch.linalg.solve(h, g)
        assert float((flat(new[t]) - best).abs().max()) < atol     # (L-BFGS: torch's stopping tolerances)
