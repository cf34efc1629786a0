"""Time per iteration and peak memory of every optimizer against the batch size (the DDPNOpt
paper's Figure 3 and Table 4; Liu, Chen & Theodorou, ICLR 2021), on this machine's CPU.

Network: the paper's FCN on DIGITS (``nn_adapter.networks.fcn``: 64-16-16-16-16-10, Tanh; the
paper measured on MNIST, whose 784-wide first layer makes vanilla DDP's dense local model
(25 k controls) far larger than this machine's memory: DIGITS keeps every optimizer on the plot).
Per (optimizer, batch size): one warm-up step, then the median time of ``--steps`` steps on
fixed random minibatches, all optimizers from the same weights, single-threaded, float32. Peak
memory: the peak of the bytes torch's allocator holds during one step above what it held before
(torch.profiler; numpy's own allocations are not counted). Vanilla DDP runs while its estimated
dense local model fits in 1 GiB.

    python benchmarks/paper/runtime_memory.py --quick    # batch 8 and 32, 2 steps (< 1 minute)
    python benchmarks/paper/runtime_memory.py            # batch 8 ... 256, 5 steps

Writes docs/results/runtime_memory_<mode>.md, .json and .png.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from common import figure, header, output_folder, save_figure

import torch
from torch import nn

from nn_adapter import NetworkProblem, data
from nn_adapter.memory import step_peak_bytes
from nn_adapter.networks import build_network
from nn_adapter.training import make_closure, make_optimizer
from occore.cli import OneLineParser  # noqa: E402

OPTIMIZERS = ["sgd-m", "adam", "ekfac", "ddpnopt", "emsa", "ddp"]
PAPER_TIME = {"adam": [0.065, 0.053, 0.048, 0.044, 0.045, 0.055], "ekfac": [0.100, 0.090, 0.090, 0.090, 0.090, 0.090],
              "ddpnopt": [0.110, 0.100, 0.095, 0.100, 0.100, 0.120], "emsa": [1.36, 1.38, 1.38, 1.52, 1.66, 1.91],
              "ddp": [0.38, 0.93, 3.0, None, None, None]}
PAPER_BATCHES = [8, 16, 32, 64, 128, 256]


def _step_fn(opt, model, x, y, loss_fn):
    if hasattr(opt, "step_batch"):
        return lambda: opt.step_batch(x, y, loss_fn)
    return lambda: opt.step(make_closure(model, opt, x, y, loss_fn))


def measure(name, split, batch, steps):
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = build_network("fcn", split.input_shape, split.num_classes, dataset="digits")
    if name == "ddp":
        prob = NetworkProblem(model, loss_fn, split.x_train[:batch], split.y_train[:batch])
        need = prob.local_model(prob.rollout(prob.initial_controls())).memory_estimate(True)
        if need > prob.memory_limit:
            return None
    opt = make_optimizer(name, model)
    g = torch.Generator().manual_seed(batch)
    batches = [torch.randint(0, len(split.x_train), (batch,), generator=g) for _ in range(steps + 2)]
    fns = [_step_fn(opt, model, split.x_train[i], split.y_train[i], loss_fn) for i in batches]
    fns[0]()                                   # warm-up
    peak = step_peak_bytes(fns[1], torch.device("cpu"))[1]
    times = []
    for fn in fns[2:]:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "peak_mib": peak / 2**20}


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 and 32, 2 steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    mode = "quick" if args.quick else "full"
    batches, steps = ([8, 32], 2) if args.quick else (PAPER_BATCHES, 5)
    out = output_folder(ap, args.out)
    split = data.load("digits")
    start = time.perf_counter()
    res = {n: {b: measure(n, split, b, steps) for b in batches} for n in OPTIMIZERS}
    lines = ["# Time per iteration and peak memory against batch size (FCN on DIGITS)\n",
             header(argv, mode, time.perf_counter() - start),
             "Median seconds per step (ratio to Adam's at the same batch size in brackets); the paper's "
             "Figure 3 (MNIST, GPU, digitised from the authors' slides) below ours where it has the point.\n",
             "| optimizer | " + " | ".join(f"B={b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for n in OPTIMIZERS:
        cells = []
        for b in batches:
            r = res[n][b]
            cells.append("n/a (memory)" if r is None else
                         f"{1e3 * r['seconds']:.2f} ms ({r['seconds'] / res['adam'][b]['seconds']:.1f}x)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
        if n in PAPER_TIME:
            p = dict(zip(PAPER_BATCHES, PAPER_TIME[n]))
            lines.append(f"| paper {n} | " + " | ".join(
                "-" if p.get(b) is None else f"{1e3 * p[b]:.0f} ms ({p[b] / PAPER_TIME['adam'][PAPER_BATCHES.index(b)]:.1f}x)"
                for b in batches) + " |")
    lines += ["\nPeak MiB allocated by torch during one step:\n",
              "| optimizer | " + " | ".join(f"B={b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for n in OPTIMIZERS:
        lines.append(f"| {n} | " + " | ".join("n/a" if res[n][b] is None else f"{res[n][b]['peak_mib']:.2f}"
                                             for b in batches) + " |")
    text = "\n".join(lines) + "\n"
    (out / f"runtime_memory_{mode}.md").write_text(text)
    (out / f"runtime_memory_{mode}.json").write_text(json.dumps(res, indent=1))
    fig, (a, b) = figure(1, 2, (11, 4))
    for n in OPTIMIZERS:
        pts = [(bs, r) for bs, r in res[n].items() if r is not None]
        a.plot([p[0] for p in pts], [p[1]["seconds"] for p in pts], "o-", label=n)
        b.plot([p[0] for p in pts], [p[1]["peak_mib"] for p in pts], "o-", label=n)
    a.set(xscale="log", yscale="log", xlabel="batch size", ylabel="seconds per step",
          title="time per iteration (median, 1 CPU thread)")
    b.set(xscale="log", yscale="log", xlabel="batch size", ylabel="MiB",
          title="peak memory allocated by torch in one step")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    save_figure(fig, "FCN 64-16x4-10 on DIGITS", out / f"runtime_memory_{mode}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
