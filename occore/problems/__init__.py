"""The reference problems of REFERENCE.md, written with the public API.

    >>> import occore
    >>> occore.problems.make("cartpole")
    Problem(cartpole: nx=4, nu=1, horizon=100, backend='casadi')
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from ..problem import Problem
from .ops import ops_for

__all__ = ["NAMES", "OPTIMA", "make"]

#: Optimal costs from the zero guess (CasADi + IPOPT, tol 1e-10; REFERENCE.md).
OPTIMA = {
    "lqr": 5.1236462178827455,
    "pendulum": 3.0385011694458868,
    "cartpole": 4.4023792224929466,
    "unicycle": 17.416031378943753,
    "pendulum_box": 11.119271377572945,
}
NAMES = tuple(OPTIMA)

LQR_A = np.array([[0.0668, -0.0702, 0.3404, 0.0558],
                  [-0.2847, 0.1922, 0.6932, 0.5034],
                  [-0.3741, -0.6727, -0.3313, 0.0220],
                  [-1.2359, -0.1163, -0.6623, -0.3892]])
LQR_B = np.array([[-0.5443, -0.3163],
                  [0.4116, 1.0425],
                  [-0.1285, 1.3665],
                  [-0.6652, 0.3515]])


def _quad(v, goal, weights):
    """1/2 sum_i w_i (v_i - goal_i)^2, written with scalar operations only."""
    return 0.5 * sum(w * (v[i] - g) ** 2 for i, (g, w) in enumerate(zip(goal, weights)) if w)


def _tracking(goal, q, r, qf):
    def stage_cost(x, u):
        return _quad(x, goal, q) + _quad(u, [0.0] * len(r), r)

    def terminal_cost(x):
        return _quad(x, goal, qf)

    return stage_cost, terminal_cost


def _lqr(ops):
    def f(x, u):
        return ops.matmul(LQR_A, x) + ops.matmul(LQR_B, u)

    l, lf = _tracking([0.0] * 4, [1.0] * 4, [0.1, 0.1], [10.0] * 4)
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[1.0, -1.0, 0.5, 2.0], nu=2, horizon=100)


def _pendulum(ops, bounded=False):
    dt = 0.05

    def f(x, u):
        th, w = x[0], x[1]
        w_next = w + dt * (-15.0 * ops.sin(th) + 3.0 * u[0])
        return ops.stack([th + dt * w_next, w_next])

    l, lf = _tracking([math.pi, 0.0], [dt, 0.1 * dt], [0.1 * dt], [100.0, 10.0])
    extra = dict(u_lower=-2.0, u_upper=2.0) if bounded else {}
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[0.0, 0.0], nu=1, horizon=100, **extra)


def _cartpole(ops):
    dt, mc, mp, hl, g = 0.05, 1.0, 0.1, 0.5, 9.8
    M = mc + mp

    def f(x, u):
        pos, vel, th, thd = x[0], x[1], x[2], x[3]
        s, c = -ops.sin(th), -ops.cos(th)           # angle measured from hanging down
        temp = (u[0] + mp * hl * thd ** 2 * s) / M
        thdd = (g * s - c * temp) / (hl * (4.0 / 3.0 - mp * c ** 2 / M))
        xdd = temp - mp * hl * thdd * c / M
        return ops.stack([pos + dt * vel, vel + dt * xdd, th + dt * thd, thd + dt * thdd])

    l, lf = _tracking([0.0, 0.0, math.pi, 0.0], [dt, 0.1 * dt, dt, 0.1 * dt], [0.01 * dt], [100.0, 10.0, 100.0, 10.0])
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[0.0] * 4, nu=1, horizon=100)


def _unicycle(ops):
    dt = 0.1

    def f(x, u):
        v, w = u[0], u[1]
        return ops.stack([x[0] + v * ops.cos(x[2]) * dt, x[1] + v * ops.sin(x[2]) * dt, x[2] + w * dt])

    l, lf = _tracking([0.0] * 3, [1.0] * 3, [1.0, 1.0], [100.0] * 3)
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[-1.0, -1.0, 1.0], nu=2, horizon=50)


_BUILDERS = {
    "lqr": _lqr,
    "pendulum": _pendulum,
    "cartpole": _cartpole,
    "unicycle": _unicycle,
    "pendulum_box": lambda ops: _pendulum(ops, bounded=True),
}


def make(name: str, backend: str = "casadi", horizon: int | None = None, backend_options=None) -> Problem:
    """Build reference problem ``name`` (one of :data:`NAMES`) for ``backend``.

    Args:
        name: "lqr", "pendulum", "cartpole", "unicycle" or "pendulum_box".
        backend: "casadi", "torch" or "finite_difference".
        horizon: override the horizon T (the optimum of :data:`OPTIMA` holds only for the default).
        backend_options: passed to :class:`occore.Problem` (e.g. ``{"compile": "always"}`` for torch).
    """
    if name not in _BUILDERS:
        raise InputError(f"unknown problem {name!r}; valid problems are {', '.join(NAMES)}")
    spec = _BUILDERS[name](ops_for(backend))
    if horizon is not None:
        spec["horizon"] = horizon
    return Problem(**spec, backend=backend, name=name, backend_options=backend_options)
