"""Declare a problem with casadi operations and solve it with DDP and iLQR.

Run: .venv/bin/python examples/quickstart.py
"""
import casadi as ca

import occore

dt = 0.05


def dynamics(x, u):                   # pendulum, semi-implicit Euler; x = (angle, rate)
    w = x[1] + dt * (-15 * ca.sin(x[0]) + 3 * u[0])
    return ca.vertcat(x[0] + dt * w, w)


def stage_cost(x, u):
    return 0.5 * dt * ((x[0] - ca.pi) ** 2 + 0.1 * x[1] ** 2 + 0.1 * u[0] ** 2)


def terminal_cost(x):
    return 50 * (x[0] - ca.pi) ** 2 + 5 * x[1] ** 2


prob = occore.Problem(dynamics, stage_cost, terminal_cost, x0=[0.0, 0.0], nu=1, horizon=100,
                      u_lower=-2.0, u_upper=2.0)
for solver in (occore.DDP(), occore.ILQR()):
    res = solver.solve(prob)
    print(res.summary())
print("max |u| =", abs(res.us).max())
