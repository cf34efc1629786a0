"""E-MSA on networks: the per-stage augmented Hamiltonian and its maximisation (Li, Chen, Tai & E,
JMLR 2018; the authors' code ``msalib/layers.py::msa_minus_H_aug``).

For stage t, with x_t, x_{t+1} the current states and p_t, p_{t+1} the current costates (all of
the whole batch), and H_t(x, p, v) = sum_i p^(i) . f_t(x^(i), v) - wd/2 |v|^2::

    Ht_t(v) = H_t(x_t, p_{t+1}, v) - rho/2 |x_{t+1} - f_t(x_t, v)|^2
              - rho/2 |p_t - dH_t/dx(x_t, p_{t+1}, v)|^2

The costate-feasibility term needs dH_t/dx as a function of v, hence a double backward. Each stage
is maximised independently (a loop over the stages; the authors' code runs them sequentially too),
by torch.optim.LBFGS ("lbfgs", strong-Wolfe line search, as the authors' L-BFGS-B with about 10
iterations) or by gradient ascent with Armijo backtracking from ``inner.step_size`` ("gradient").
Networks have no control bounds, so no projection is needed.
"""
from __future__ import annotations

import numpy as np
import torch

from occore.errors import InputError

__all__ = ["stage_hamiltonian", "hamiltonian_grad", "maximize_hamiltonian"]


def stage_hamiltonian(problem, t: int, traj, costates, rho: float, v: dict) -> torch.Tensor:
    """Ht_t(v) as a 0-d tensor with its graph (``v`` may require grad).

    Args:
        problem: the NetworkProblem.
        t: the stage.
        traj: the current trajectory (its xs).
        costates: p_0..p_T (tensors shaped like the states).
        rho: feasibility weight >= 0.
        v: candidate parameters of stage t.
    """
    stage = problem.stages[t]
    x = traj.xs[t].detach()
    track_x = rho > 0 and x.is_floating_point()
    if track_x:
        x = x.clone().requires_grad_(True)
    out = stage.forward(v, x)
    H = (costates[t + 1].detach() * out).sum()
    if problem.weight_decay:
        H = H - 0.5 * problem.weight_decay * sum((w * w).sum() for w in v.values())
    if rho == 0:
        return H
    value = H - 0.5 * rho * ((traj.xs[t + 1].detach() - out) ** 2).sum()
    if track_x:
        (dHdx,) = torch.autograd.grad(H, x, create_graph=True)
        value = value - 0.5 * rho * ((costates[t].detach() - dHdx) ** 2).sum()
    return value


def _leaf(u: dict) -> dict:
    return {k: w.detach().clone().requires_grad_(True) for k, w in u.items()}


def hamiltonian_grad(problem, traj, costates, rho: float, us):
    """Ht_t(us_t) for every stage, (T,) float64, and dHt_t/du_t (one parameter dict per stage)."""
    values, grads = [], []
    with torch.enable_grad():
        for t in range(problem.horizon):
            v = _leaf(us[t])
            val = stage_hamiltonian(problem, t, traj, costates, float(rho), v)
            g = torch.autograd.grad(val, list(v.values()))
            values.append(val.detach())
            grads.append({k: gk.detach() for k, gk in zip(v, g)})
    return torch.stack(values).double().cpu().numpy().astype(np.float64), grads


def _gradient_ascent(objective, params, inner, max_halvings: int = 30):
    """Gradient ascent on -objective with Armijo backtracking (1e-4) from ``inner.step_size``;
    an iteration with no ascending step ends the loop (the stage keeps its best point)."""
    for _ in range(inner.iterations):
        value = objective()
        g = torch.autograd.grad(value, params)
        gg = float(sum((gw * gw).sum() for gw in g))
        if gg == 0.0:
            return
        start = [w.detach().clone() for w in params]
        step = inner.step_size
        with torch.no_grad():
            for _ in range(max_halvings):
                for w, w0, gw in zip(params, start, g):
                    w.copy_(w0 - step * gw)
                with torch.enable_grad():
                    trial = float(objective().detach())
                if trial <= float(value.detach()) - 1e-4 * step * gg:
                    break
                step *= 0.5
            else:
                for w, w0 in zip(params, start):
                    w.copy_(w0)
                return


def maximize_hamiltonian(problem, traj, costates, rho: float, inner):
    """Maximise each Ht_t from ``traj.us`` with ``inner`` (method, iterations, step_size).

    Returns new controls (fresh tensors; ``traj.us`` is not modified).
    """
    method = inner.method
    if method not in problem.inner_methods:
        raise InputError(f"inner.method={method!r}: a NetworkProblem supports "
                         f"{', '.join(problem.inner_methods)}")
    rho = float(rho)
    new = []
    with torch.enable_grad():
        for t in range(problem.horizon):
            v = _leaf(traj.us[t])
            params = list(v.values())

            def objective():
                return -stage_hamiltonian(problem, t, traj, costates, rho, v)
            if method == "lbfgs":
                opt = torch.optim.LBFGS(params, lr=inner.step_size, max_iter=inner.iterations,
                                        line_search_fn="strong_wolfe")

                def closure():
                    opt.zero_grad()
                    loss = objective()
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                _gradient_ascent(objective, params, inner)
            new.append({k: w.detach() for k, w in v.items()})
    return new
