"""The DDPNOpt paper's accuracy table (Table 3; Liu, Chen & Theodorou, ICLR 2021), ours beside it.

Rows: WINE and DIGITS (FCN), Fashion-MNIST (FCN and CNN, the CNN standing in for the paper's CNN
rows), MNIST / SVHN / CIFAR-10 when their files are present. Columns: SGD-m, RMSprop, Adam, EKFAC,
E-MSA, vanilla DDP (where its dense local model fits in memory), DDPNOpt. Networks:
:mod:`nn_adapter.networks` (``fcn``: 5 linear layers, width 10/16/32, Tanh on WINE/DIGITS;
``cnn``: 4 conv 3x3 of 32 channels + 2 linear layers).

Protocol (the same for every optimizer): its learning rate is chosen from the grid
default x {1/9, 1/3, 1, 3, 9} (:data:`common.LR_FACTORS`; for vanilla DDP, whose lr caps a step
length, the same grid ending at 1; the defaults are ``nn_adapter.training.DEFAULT_LR``)
by the validation accuracy after training seed 0 on 80% of the training split (the other 20%
held out; ties go to the lower final training loss); then seeds 0..N-1 train on the whole training split with that rate and the test
accuracy after the last epoch is reported as mean +- std (sample std). Every optimizer of one
seed starts from the same weights and sees the same minibatches.

    python benchmarks/paper/accuracy.py --quick      # WINE only, 3 epochs, 2 seeds (< 1 min)
    python benchmarks/paper/accuracy.py --medium     # WINE as in full; DIGITS, Fashion-MNIST shorter (~35 min)
    python benchmarks/paper/accuracy.py              # the full table (10 seeds on the small sets, ~1.5-2 h)
    python benchmarks/paper/accuracy.py --only fcn:wine,fcn:digits    # rows of the full table

Fashion-MNIST and the other file sets are subsampled (seeded; the row says how many samples),
the test split to max(2000, n_train / 5) samples.

Writes docs/results/accuracy_<mode>.md and .json.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time

from common import header, lr_grid, output_folder

import torch

from nn_adapter import data
from nn_adapter.networks import build_network
from nn_adapter.training import compare_optimizers
from occore.cli import OneLineParser  # noqa: E402

COLUMNS = ["sgd-m", "rmsprop", "adam", "ekfac", "emsa", "ddp", "ddpnopt"]
#: The paper's Table 3 (test accuracy in %, mean of 10 seeds; the authors' slides, digest section J.1).
PAPER = {
    ("fcn", "wine"): [94.35, 98.10, 98.13, 94.60, 93.56, 98.00, 98.18],
    ("fcn", "digits"): [95.36, 94.33, 94.98, 95.24, 94.87, 91.68, 95.13],
    ("fcn", "mnist"): [92.65, 91.89, 92.54, 92.73, 90.24, 90.42, 93.30],
    ("fcn", "fashion-mnist"): [82.49, 83.87, 84.36, 84.12, 82.04, 81.98, 84.98],
    ("cnn", "mnist"): [97.94, 98.05, 98.04, 98.02, 96.48, None, 98.09],
    ("cnn", "svhn"): [89.00, 88.41, 87.76, 90.63, 79.45, None, 90.70],
    ("cnn", "cifar10"): [71.26, 70.52, 70.04, 71.85, 61.42, None, 71.92],
}

# (net, dataset, batch, epochs, seeds, n_train): subsampled where 2 cores cannot afford more
# (E-MSA on the CNN: about 4 s per step of batch 128 on one core, hence the CNN rows' 2000 samples)
FULL = [("fcn", "wine", 16, 20, 10, None), ("fcn", "digits", 32, 10, 10, None),
        ("fcn", "fashion-mnist", 32, 3, 3, 10000), ("cnn", "fashion-mnist", 128, 3, 3, 2000),
        ("fcn", "mnist", 32, 3, 3, 10000), ("cnn", "mnist", 128, 3, 3, 2000),
        ("cnn", "svhn", 128, 3, 3, 2000), ("cnn", "cifar10", 128, 3, 3, 2000)]
MEDIUM = [("fcn", "wine", 16, 20, 10, None), ("fcn", "digits", 32, 5, 3, None),
          ("fcn", "fashion-mnist", 32, 2, 2, 5000), ("cnn", "fashion-mnist", 128, 2, 2, 1024)]
QUICK = [("fcn", "wine", 32, 3, 2, None)]


def _fits(net_name, split, name, batch) -> bool:
    """Vanilla DDP only where its dense local model fits in the problem's memory limit."""
    if name != "ddp":
        return True
    from torch import nn

    from nn_adapter import NetworkProblem

    net = build_network(net_name, split.input_shape, split.num_classes, dataset=split.name)
    prob = NetworkProblem(net, nn.CrossEntropyLoss(), split.x_train[:batch], split.y_train[:batch])
    return prob.local_model(prob.rollout(prob.initial_controls())).memory_estimate(True) <= prob.memory_limit


def run_row(net_name, dataset, batch, epochs, seeds, n_train, log):
    split = data.load(dataset, n_train=n_train, n_test=None if n_train is None else max(2000, n_train // 5))
    make = lambda: build_network(net_name, split.input_shape, split.num_classes, dataset=dataset)  # noqa: E731
    names = [n for n in COLUMNS if _fits(net_name, split, n, batch)]
    val = data.validation_split(split, 0.2, seed=0)
    chosen, search = {}, {}
    for name in names:
        scores = []
        for lr in lr_grid(name):
            rec = compare_optimizers(make, val, [name], epochs, batch, {name: lr}, seed=0)[name]
            ok = rec.test_accuracy and not rec.stopped
            scores.append((rec.test_accuracy[-1] if ok else -1.0, -rec.train_loss[-1] if ok else -math.inf, lr))
        search[name] = scores
        chosen[name] = max(scores)[2]        # best validation accuracy; ties: lower training loss
        log(f"  {dataset}/{net_name} {name}: validation accuracy per lr "
            f"{[(f'{lr:.3g}', round(a, 4)) for a, _, lr in scores]} -> lr {chosen[name]:.3g}")
    runs = {n: [] for n in names}
    for seed in range(seeds):
        recs = compare_optimizers(make, split, names, epochs, batch, chosen, seed=seed)
        for n, r in recs.items():
            runs[n].append(r)
    cells = {}
    for n in names:
        accs = [100 * r.test_accuracy[-1] for r in runs[n] if r.test_accuracy and not r.stopped]
        cells[n] = {"lr": chosen[n], "mean": statistics.fmean(accs) if accs else float("nan"),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "diverged": sum(bool(r.stopped) for r in runs[n]),
                    "ms_per_step": 1e3 * statistics.fmean(r.seconds_per_step for r in runs[n]),
                    "accuracies": accs, "search": search[n]}
    return {"net": net_name, "dataset": dataset, "batch": batch, "epochs": epochs, "seeds": seeds,
            "train": len(split.x_train), "test": len(split.x_test), "cells": cells}


def markdown(rows, head, skipped=()) -> str:
    lines = [f"# Test accuracy (%), ours beside the paper's Table 3\n", head,
             "Protocol: learning rate per optimizer from default x {1/9, 1/3, 1, 3, 9} (vanilla DDP: the same grid ending at 1), chosen on a 20% validation "
             "split (seed 0; ties: the lower training loss); then mean +- std of the test accuracy after the last epoch over the seeds. "
             "Paper: mean of 10 seeds, no std printed, its epochs and learning rates unknown.\n",
             "| net | data (train/test) | batch, epochs, seeds | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        ours = []
        for n in COLUMNS:
            c = row["cells"].get(n)
            if c is None:
                ours.append("n/a (memory)")
            else:
                div = f", {c['diverged']} diverged" if c["diverged"] else ""
                ours.append(f"{c['mean']:.2f} +- {c['std']:.2f} (lr {c['lr']:.2g}{div})")
        lines.append(f"| {row['net']} | {row['dataset']} ({row['train']}/{row['test']}) | "
                     f"{row['batch']}, {row['epochs']}, {row['seeds']} | " + " | ".join(ours) + " |")
        paper = PAPER.get((row["net"], row["dataset"]))
        if paper:
            lines.append(f"| | paper | | " + " | ".join("N/A" if v is None else f"{v:.2f}" for v in paper) + " |")
    for note in skipped:
        lines.append(f"\nNot run: {note}")
    lines.append("\nms per step (mean over seeds):\n")
    lines.append("| net | data | " + " | ".join(COLUMNS) + " |")
    lines.append("|---|---|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append(f"| {row['net']} | {row['dataset']} | " + " | ".join(
            f"{row['cells'][n]['ms_per_step']:.2f}" if n in row["cells"] else "-" for n in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="WINE only, 3 epochs, 2 seeds (< 1 minute)")
    mode.add_argument("--medium", action="store_true", help="WINE as in full, DIGITS and Fashion-MNIST shorter")
    ap.add_argument("--only", default=None, metavar="NET:DATA,...",
                    help="only these rows of the mode's plan, e.g. fcn:wine,fcn:digits (file name says so)")
    ap.add_argument("--out", default=None, help="output folder (default docs/results)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    name = "quick" if args.quick else "medium" if args.medium else "full"
    plan = QUICK if args.quick else MEDIUM if args.medium else FULL
    if args.only:
        wanted = [tuple(r.split(":")) for r in args.only.split(",")]
        unknown = [w for w in wanted if w not in [(r[0], r[1]) for r in plan]]
        if unknown:
            ap.error(f"--only: {unknown} not in the {name} plan {[f'{r[0]}:{r[1]}' for r in plan]}")
        plan = [r for r in plan if (r[0], r[1]) in wanted]
        name += "_" + "_".join(f"{n}-{d}" for n, d in wanted)
    out = output_folder(ap, args.out)
    start, rows, skipped = time.perf_counter(), [], []
    for net_name, dataset, batch, epochs, seeds, n_train in plan:
        try:
            rows.append(run_row(net_name, dataset, batch, epochs, seeds, n_train, print))
        except FileNotFoundError as err:
            skipped.append(f"{net_name} on {dataset}: {str(err).splitlines()[0]}")
            print(f"  skipped {skipped[-1]}")
    text = markdown(rows, header(argv, name, time.perf_counter() - start), skipped)
    (out / f"accuracy_{name}.md").write_text(text)
    (out / f"accuracy_{name}.json").write_text(json.dumps(rows, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
