"""The reference problems of REFERENCE.md, and constrained ones, written with the public API.

:data:`NAMES`: the classic set (REFERENCE.md section 1). :data:`CONSTRAINED`: problems with
constraints beyond control bounds, solved by :class:`occore.CDDP` (and IPOPT):

- ``unicycle_obstacles``: the unicycle (d) around two circular obstacles, path constraints
  r_i^2 - |p - c_i|^2 <= 0 with (c, r) = ((-0.8, -0.6), 0.1) and ((-0.35, -0.15), 0.12);
- ``cartpole_track``: the cart-pole swing-up (c) on a short track, state bounds |x_cart| <= 0.8;
- ``pendulum_terminal``: the pendulum (b) over T = 50 without terminal cost, with the exact terminal
  state x_T = [pi, 0] (terminal equality);
- ``quadrotor``: a planar quadrotor (x, z, theta, xd, zd, thetad; rotor thrusts about hover, box
  -m g / 2 <= u <= m g, i.e. 0 to 1.5 m g per rotor) flying from rest at 0 to (2, 1) in T = 60
  steps of 0.05 s, with the tilt limit cos(theta) >= cos(0.3) (a path constraint).

    >>> import occore
    >>> occore.problems.make("cartpole")
    Problem(cartpole: nx=4, nu=1, horizon=100, backend='casadi')
    >>> occore.problems.make("cartpole_track").constraint_kinds
    ('state bounds',)
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from ..problem import Problem
from .ops import ops_for

__all__ = ["NAMES", "CONSTRAINED", "OPTIMA", "GOALS", "make"]

#: Optimal costs from the zero guess (CasADi + IPOPT, tol 1e-10; REFERENCE.md for the classic set;
#: the constrained ones: ``occore.reference.ipopt(make(name)).cost``, IPOPT's rolled-out controls).
OPTIMA = {
    "lqr": 5.1236462178827455,
    "pendulum": 3.0385011694458868,
    "cartpole": 4.4023792224929466,
    "unicycle": 17.416031378943753,
    "pendulum_box": 11.119271377572945,
    "unicycle_obstacles": 17.53315540237959,
    "cartpole_track": 6.312361978092744,
    "pendulum_terminal": 3.0385101690112246,
    "quadrotor": 20.217107651003413,
}
#: the classic reference set (REFERENCE.md), solved by every solver
NAMES = ("lqr", "pendulum", "cartpole", "unicycle", "pendulum_box")
#: problems with state, path or terminal constraints (CDDP and IPOPT)
CONSTRAINED = ("unicycle_obstacles", "cartpole_track", "pendulum_terminal", "quadrotor")

#: the goal state x_g of each problem's tracking cost (for state guesses such as FDDP's linear
#: interpolation x0 -> x_g, and for checking that closed-loop control reaches it)
GOALS = {
    "lqr": (0.0, 0.0, 0.0, 0.0),
    "pendulum": (math.pi, 0.0),
    "cartpole": (0.0, 0.0, math.pi, 0.0),
    "unicycle": (0.0, 0.0, 0.0),
    "pendulum_box": (math.pi, 0.0),
    "unicycle_obstacles": (0.0, 0.0, 0.0),
    "cartpole_track": (0.0, 0.0, math.pi, 0.0),
    "pendulum_terminal": (math.pi, 0.0),
    "quadrotor": (2.0, 1.0, 0.0, 0.0, 0.0, 0.0),
}

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

    l, lf = _tracking(GOALS["lqr"], [1.0] * 4, [0.1, 0.1], [10.0] * 4)
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[1.0, -1.0, 0.5, 2.0], nu=2, horizon=100)


def _pendulum(ops, bounded=False):
    dt = 0.05

    def f(x, u):
        th, w = x[0], x[1]
        w_next = w + dt * (-15.0 * ops.sin(th) + 3.0 * u[0])
        return ops.stack([th + dt * w_next, w_next])

    l, lf = _tracking(GOALS["pendulum"], [dt, 0.1 * dt], [0.1 * dt], [100.0, 10.0])
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

    l, lf = _tracking(GOALS["cartpole"], [dt, 0.1 * dt, dt, 0.1 * dt], [0.01 * dt], [100.0, 10.0, 100.0, 10.0])
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[0.0] * 4, nu=1, horizon=100)


def _unicycle(ops):
    dt = 0.1

    def f(x, u):
        v, w = u[0], u[1]
        return ops.stack([x[0] + v * ops.cos(x[2]) * dt, x[1] + v * ops.sin(x[2]) * dt, x[2] + w * dt])

    l, lf = _tracking(GOALS["unicycle"], [1.0] * 3, [1.0, 1.0], [100.0] * 3)
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[-1.0, -1.0, 1.0], nu=2, horizon=50)


OBSTACLES = ((-0.8, -0.6, 0.1), (-0.35, -0.15, 0.12))   # (centre x, centre y, radius)


def _unicycle_obstacles(ops):
    spec = _unicycle(ops)

    def g(x, u):
        return ops.stack([r * r - (x[0] - cx) ** 2 - (x[1] - cy) ** 2 for cx, cy, r in OBSTACLES])

    return dict(spec, path_constraints=g)


def _cartpole_track(ops):
    inf = math.inf
    return dict(_cartpole(ops), x_lower=[-0.8, -inf, -inf, -inf], x_upper=[0.8, inf, inf, inf])


def _pendulum_terminal(ops):
    spec = _pendulum(ops)

    def h(x):
        return ops.stack([x[0] - GOALS["pendulum_terminal"][0], x[1] - GOALS["pendulum_terminal"][1]])

    return dict(spec, terminal_cost=lambda x: 0.0 * x[0], terminal_constraints=h, horizon=50)


def _quadrotor(ops):
    dt, m, g, arm, inertia, tilt = 0.05, 1.0, 9.81, 0.25, 0.05, 0.3

    def f(x, u):
        thrust, th = m * g + u[0] + u[1], x[2]
        return ops.stack([x[0] + dt * x[3], x[1] + dt * x[4], x[2] + dt * x[5],
                          x[3] - dt * thrust * ops.sin(th) / m, x[4] + dt * (thrust * ops.cos(th) / m - g),
                          x[5] + dt * arm * (u[0] - u[1]) / inertia])

    def tilt_limit(x, u):
        return ops.stack([math.cos(tilt) - ops.cos(x[2])])

    l, lf = _tracking(GOALS["quadrotor"], [10 * dt, 10 * dt, dt, dt, dt, dt], [0.1 * dt, 0.1 * dt],
                      [100.0, 100.0, 10.0, 10.0, 10.0, 10.0])
    return dict(dynamics=f, stage_cost=l, terminal_cost=lf, x0=[0.0] * 6, nu=2, horizon=60,
                u_lower=-m * g / 2, u_upper=m * g, path_constraints=tilt_limit)


_BUILDERS = {
    "lqr": _lqr,
    "pendulum": _pendulum,
    "cartpole": _cartpole,
    "unicycle": _unicycle,
    "pendulum_box": lambda ops: _pendulum(ops, bounded=True),
    "unicycle_obstacles": _unicycle_obstacles,
    "cartpole_track": _cartpole_track,
    "pendulum_terminal": _pendulum_terminal,
    "quadrotor": _quadrotor,
}


def make(name: str, backend: str = "casadi", horizon: int | None = None, backend_options=None) -> Problem:
    """Build reference problem ``name`` (one of :data:`NAMES`) for ``backend``.

    Args:
        name: one of :data:`NAMES` ("lqr", "pendulum", "cartpole", "unicycle", "pendulum_box") or of
            :data:`CONSTRAINED`.
        backend: "casadi", "torch" or "finite_difference".
        horizon: override the horizon T (the optimum of :data:`OPTIMA` holds only for the default).
        backend_options: passed to :class:`occore.Problem` (e.g. ``{"compile": "always"}`` for torch).
    """
    if name not in _BUILDERS:
        raise InputError(f"unknown problem {name!r}; valid problems are {', '.join(NAMES + CONSTRAINED)}")
    spec = _BUILDERS[name](ops_for(backend))
    if horizon is not None:
        spec["horizon"] = horizon
    return Problem(**spec, backend=backend, name=name, backend_options=backend_options)
