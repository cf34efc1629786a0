"""DDPNOpt-adam with feedback of several source trees side by side, beside torch Adam.

The step-time regression check of ``benchmarks/nn_step.py``: every tree's ``DDPNOpt(net, lr=1e-3,
curvature="adam")`` (its defaults) and one torch Adam run in one process, interleaved step by step
on the same minibatches (same data, model and measures as ``nn_step.py``: median CPU time of the
process per step, single thread, float32; peak memory = parameters, gradients and optimizer state
+ the peak allocated during one step). Each tree is a checkout of this repository (with its C
extension built); make one of an older commit with
``git archive COMMIT | tar -x -C /tmp/old && (cd /tmp/old && python setup.py -q build_ext --inplace)``.

    python benchmarks/nn_step_versions.py /tmp/old . [--net mlp|cnn|resnet] [--steps 200]

Prints per tree: ms/step, x Adam, peak MiB, x Adam, and both ratios against the first tree.
"""
from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nn_step  # noqa: E402  (this repository's harness: models, data, memory measure)
from occore.cli import OneLineParser  # noqa: E402  (nn_step put the repository on sys.path)


def load_ddpnopt(tree: str):
    """The ``DDPNOpt`` class of the source tree ``tree`` (its ``nn_adapter`` and ``occore``
    replace any loaded before; build the optimizers before loading the next tree, so that imports
    done inside its functions resolve within it)."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("nn_adapter", "occore")]:
        del sys.modules[name]
    sys.path.insert(0, str(Path(tree).resolve()))
    try:
        return importlib.import_module("nn_adapter").DDPNOpt
    finally:
        sys.path.pop(0)


def main(argv=None) -> dict:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+", help="source trees (repository checkouts)")
    ap.add_argument("--net", choices=tuple(nn_step.MODELS), default="mlp")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per optimizer")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: expected an integer >= 1")
    for tree in args.trees:       # else the import would silently find another tree's nn_adapter
        if not (Path(tree) / "nn_adapter" / "__init__.py").is_file():
            ap.error(f"{tree}: not a source tree of this repository (no nn_adapter/__init__.py there)")
    torch.set_num_threads(1)
    batch = 32 if args.net == "mlp" else 128
    warmup = 2
    data, note = nn_step.batches(args.net, batch, args.steps + warmup + 1)
    runs = {}
    torch.manual_seed(0)
    net = nn_step.MODELS[args.net]()
    runs["Adam (torch)"] = (net, torch.optim.Adam(net.parameters(), lr=1e-3), [])
    labels = [f"DDPNOpt-adam fb=on [{i}: {tree}]" for i, tree in enumerate(args.trees)]
    for label, tree in zip(labels, args.trees):
        ddpnopt = load_ddpnopt(tree)
        torch.manual_seed(0)
        net = nn_step.MODELS[args.net]()
        runs[label] = (net, ddpnopt(net, lr=1e-3, curvature="adam"), [])
    closure = nn_step.make_closure
    for i, (xb, yb) in enumerate(data[:-1]):
        for net, opt, times in runs.values():
            t0 = time.process_time()
            opt.step(closure(net, opt, xb, yb))
            if i >= warmup:
                times.append(time.process_time() - t0)
    xb, yb = data[-1]
    res = {label: (statistics.median(times), nn_step.peak_step_bytes(net, opt, xb, yb))
           for label, (net, opt, times) in runs.items()}
    t_adam, m_adam = res["Adam (torch)"]
    first = res[labels[0]]
    print(f"torch {torch.__version__}, 1 thread, float32, {args.net} (batch {batch}, {note}), "
          f"{args.steps} steps interleaved, median CPU time per step")
    print(f"  {'optimizer':44s} {'ms/step':>8s} {'x Adam':>7s} {'peak MiB':>9s} {'x Adam':>7s} "
          f"{'time x first':>12s} {'mem x first':>11s}")
    for label, (t, m) in res.items():
        print(f"  {label:44s} {1e3 * t:8.3f} {t / t_adam:7.2f} {m / 2**20:9.3f} {m / m_adam:7.2f} "
              f"{t / first[0]:12.2f} {m / first[1]:11.2f}")
    return res


if __name__ == "__main__":
    main()
