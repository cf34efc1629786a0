"""Receding-horizon control (occore.MPC) in closed loop: per-call latency and whether the goal is reached.

    python benchmarks/mpc.py                       # pendulum and cart-pole swing-ups from moved states
    python benchmarks/mpc.py --steps 300 --problems cartpole

For each problem (started from a moved initial state; the plant is the problem's own dynamics) and
each controller (a solver run to convergence at every step, or a fixed number of iterations per
step, the real-time iteration), the table gives the latency of a controller call: median, 99th
percentile and maximum over the warm calls (the first call, a cold solve from zero controls, is
reported apart), the mean number of iterations per call, and the distance of the final state to the
goal (max norm). Single-threaded (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import occore  # noqa: E402
from occore.cli import OneLineParser  # noqa: E402

#: moved initial states (the reference problems start from 0)
STARTS = {"pendulum": [0.5, -1.0], "cartpole": [0.2, 0.0, 0.4, 0.0], "pendulum_box": [0.5, -1.0],
          "cartpole_track": [0.3, 0.0, 0.3, 0.0]}

CONTROLLERS = {   # label -> (solver factory, iterations per call, state guess of the cold call)
    "ilqr, converged": (occore.ILQR, None, False),
    "ilqr, 1 it (RTI)": (occore.ILQR, 1, False),
    "ilqr, 2 it": (occore.ILQR, 2, False),
    "ddp, converged": (occore.DDP, None, False),
    "fddp, converged": (occore.FDDP, None, True),    # xs0: the linear interpolation start -> goal
    "fddp, 1 it (RTI)": (occore.FDDP, 1, True),
    "cddp, converged": (occore.CDDP, None, False),
    "cddp, 3 it": (occore.CDDP, 3, False),
}


class _Counting:
    """An MPC wrapper that records the iterations of every call."""

    def __init__(self, mpc):
        self.mpc, self.iterations = mpc, []
        self.problem = mpc.problem

    def __call__(self, x):
        u = self.mpc.control(x)
        self.iterations.append(self.mpc.result.iterations)
        return u


def main(argv=None):
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="pendulum,cartpole,cartpole_track", help="comma-separated names")
    ap.add_argument("--steps", type=int, default=200, help="closed-loop steps per run")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.problems.split(",")]
    unknown = [n for n in names if n not in occore.problems.GOALS]
    if unknown:
        ap.error(f"--problems: unknown problem(s) {unknown}; valid (problems with a goal): "
                 f"{', '.join(occore.problems.GOALS)}")
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: expected an integer >= 1")
    head = (f"{'problem':<15} {'controller':<18} {'cold ms':>8} {'median ms':>10} {'p99 ms':>8} {'max ms':>8} "
            f"{'it/call':>8} {'final dist':>11}")
    print(f"occore.MPC, {args.steps} closed-loop steps, latency over the warm calls (all but the first)\n")
    print(head)
    print("-" * len(head))
    for name in names:
        prob = occore.problems.make(name)
        goal = np.array(occore.problems.GOALS[name])
        for label, (cls, iterations, guess) in CONTROLLERS.items():
            solver = cls()
            if prob.constraint_kinds and not all(k in solver.supported_constraints for k in prob.constraint_kinds):
                continue
            start = STARTS.get(name, prob.x0)
            xs0 = np.linspace(start, goal, prob.horizon + 1) if guess else None
            ctl = _Counting(occore.MPC(prob, solver, iterations=iterations, xs0=xs0))
            run = occore.simulate(ctl, prob, args.steps, x0=STARTS.get(name))
            warm = run.latencies[1:] * 1e3
            dist = float(np.max(np.abs(run.xs[-1] - goal)))
            print(f"{name:<15} {label:<18} {run.latencies[0] * 1e3:>8.2f} {np.median(warm):>10.3f} "
                  f"{np.percentile(warm, 99):>8.3f} {warm.max():>8.3f} {np.mean(ctl.iterations[1:]):>8.2f} "
                  f"{dist:>11.1e}")
        print()


if __name__ == "__main__":
    main()
