"""`make demo`: the classic-control comparison, then a small network trained through nn_adapter.

1. DDP, iLQR, E-MSA and CasADi+IPOPT on the five reference problems (one table; docs/compare.png).
2. A tanh MLP 13-8-3 trained full-batch on WINE by occore's own DDP, iLQR and E-MSA through
   nn_adapter.NetworkProblem (layers are stages, weights are controls, the loss is the terminal cost).
3. A small MLP trained on DIGITS (bundled with scikit-learn) with DDPNOpt and with Adam.

Run: .venv/bin/python examples/demo.py [--quick]
"""
from __future__ import annotations

import pathlib
import sys
import time

import occore

HERE = pathlib.Path(__file__).resolve().parent


def classic(max_iter: int, plot: pathlib.Path | None) -> None:
    print("== 1. Classic control: every solver from the zero guess on the reference problems ==\n")
    t0 = time.perf_counter()
    comp = occore.compare("all", ["ddp", "ilqr", "emsa", "ipopt"], max_iter=max_iter, progress=True)
    print(comp.table())
    if plot is not None:
        comp.plot(plot)
        print(f"\nplot: {plot}")
    print(f"\n(E-MSA is first-order-like: it creeps on the swing-ups, as its authors' method does; "
          f"comparison took {time.perf_counter() - t0:.1f} s)\n")


def network_as_control_problem(iterations: int = 20) -> None:
    print("== 2. Training as a control problem: the same solvers on a network (WINE, full batch) ==\n")
    import torch
    from sklearn.datasets import load_wine
    from torch import nn

    from nn_adapter import NetworkProblem

    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (and contend on 2 cores)
    X, y = load_wine(return_X_y=True)
    x, y = torch.tensor((X - X.mean(0)) / X.std(0)), torch.tensor(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    prob = NetworkProblem(net, nn.CrossEntropyLoss(), x, y)
    print(f"initial loss {prob.rollout(prob.initial_controls()).cost:.4f}")
    print(f"{'solver':8s} {'status':10s} {'iters':>5s} {'loss':>10s} {'train acc':>9s} {'time [s]':>9s}")
    for solver in (occore.DDP(max_iter=iterations), occore.ILQR(max_iter=iterations),
                   occore.EMSA(max_iter=iterations, rho=0.01)):
        res = solver.solve(prob)
        trained = nn.Sequential(nn.Linear(13, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        prob.load_into(trained, res.us)
        with torch.no_grad():
            acc = float((trained(x).argmax(1) == y).double().mean())
        print(f"{res.solver:8s} {res.status.name:10s} {res.iterations:5d} {res.cost:10.4g} {acc:9.3f} "
              f"{res.wall_time:9.2f}")
    print()


def network() -> None:
    print("== 3. DDPNOpt, a torch optimizer with layer-wise feedback, vs Adam on DIGITS ==\n")
    sys.path.insert(0, str(HERE))
    from train_digits import main as train_main

    train_main()


def main(argv=None) -> None:
    from occore.cli import OneLineParser
    from occore.errors import OccoreError
    from occore.output_paths import check_outputs

    parser = OneLineParser(prog="demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cap every solver at 300 iterations")
    parser.add_argument("--plot", default="compare.png", help="where to draw the comparison ('' for none)")
    args = parser.parse_args(argv)
    try:                    # before the comparison, not after it
        check_outputs(args.plot or None)
    except OccoreError as err:
        parser.error(str(err))
    classic(300 if args.quick else 3000, pathlib.Path(args.plot) if args.plot else None)
    network_as_control_problem()
    network()


if __name__ == "__main__":
    main()
