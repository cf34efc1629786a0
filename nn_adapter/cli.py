"""``occore train``: optimisers side by side on a classification data set, over seeds.

    occore train --dataset wine --optimizers ddpnopt,adam,emsa --seeds 3 --plot t.png
    occore train --dataset digits --net fcn --epochs 10 --lr 0.01,adam=0.003 --json runs.json
    occore train --dataset fashion-mnist --net cnn --n-train 5000 --batch-size 128
    occore train --net mypkg.nets:small_cnn ...     # your own builder(input_shape, num_classes)

Every option is checked before any training (a bad one is one line on stderr and exit status 2).
For each seed, every optimizer starts from the same initial weights and sees the same minibatches.
Each run shows a progress bar (epoch, loss, throughput) on stderr; then a table of the mean +- std
over the seeds of the final training loss, test accuracy, time per step and peak memory.

The command is a plugin of the ``occore`` command line: ``pyproject.toml`` declares
:data:`COMMAND` in the entry-point group ``occore.commands`` under the name ``train``, and
``occore train ...`` hands every argument after ``train`` to :func:`main`. The work is a list of
(optimizer, seed) runs (:func:`run_all`), independent of each other.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

from occore.cli import Command, OneLineParser
from occore.errors import InputError, OccoreError
from occore.output_paths import check_outputs

from . import data as datasets
from .training import CORE_SOLVERS, DEFAULT_LR, OPTIMIZERS, check_lr

__all__ = ["main", "build_parser", "COMMAND", "parse_lr", "check_args", "run_all", "summarize"]


class UsageError(Exception):
    """A bad command line: the message is the one line printed after ``occore train:``."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="occore train", description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--dataset", default="digits", choices=list(datasets.DATASETS),
                   help="the data set (default digits; file-based ones read from --data-dir)")
    p.add_argument("--data-dir", default=None, help="folder of a file-based data set (default: its usual place)")
    p.add_argument("--n-train", type=int, default=None, help="subsample the training split (seeded)")
    p.add_argument("--n-test", type=int, default=None, help="subsample the test split (seeded)")
    p.add_argument("--net", default="fcn",
                   help="fcn, cnn, sigmoid-mlp, residual-cnn, or module:function (default fcn)")
    p.add_argument("--width", type=int, default=None, help="hidden width / channels (default: the net's)")
    p.add_argument("--depth", type=int, default=None, help="number of layers (default: the net's)")
    p.add_argument("--optimizers", default="ddpnopt,adam,sgd-m",
                   help=f"comma-separated, from: {', '.join(OPTIMIZERS)}")
    p.add_argument("--epochs", type=int, default=8, help="passes over the training split (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    p.add_argument("--drop-last", action="store_true", help="drop the last partial batch of each epoch")
    p.add_argument("--lr", default=None,
                   help="one learning rate for all, and/or per optimizer: 0.01,adam=0.003 (default: per optimizer)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (runs per optimizer)")
    p.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed, seed+1, ...)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small nets: 1 is fastest)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="training loss and test accuracy per epoch, mean and seed band per optimizer")
    p.add_argument("--json", default=None, metavar="FILE", help="every run's record and the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from . import train_runs

    train_runs.add_arguments(p)      # --checkpoint, --resume, --nproc, --workers
    return p


_FLOAT32_MAX = 3.4028234663852886e38
#: the most torch threads ``--threads`` may ask for: more threads than CPUs is allowed (they share
#: them), but OpenMP tries to start every one (10**9 aborted the process)
MAX_THREADS = max(256, 4 * (os.cpu_count() or 1))
_LARGEST_SEED = 2**64 - 1        # torch.manual_seed takes no larger one


def parse_lr(spec, names) -> dict:
    """``{name: lr}`` from ``--lr``: "0.01" (all), "adam=0.003,ddpnopt=0.01", or both ("0.01,adam=0.003").

    Raises:
        UsageError: a malformed entry, a name not among ``names``, a rate given twice, or a value
            that is not a finite number > 0 and at most the largest float32 (or above 1 for
            ``ddp``, whose lr caps the step length).

    Example:
        >>> parse_lr("0.01,adam=0.003", ["adam", "sgd-m"])
        {'adam': 0.003, 'sgd-m': 0.01}
    """
    rates = {n: DEFAULT_LR[n] for n in names}
    if spec is None:
        return rates
    common, own = None, {}
    for part in (p.strip() for p in spec.split(",")):
        key, eq, value = part.rpartition("=")
        try:
            v = float(value)
        except ValueError:
            raise UsageError(f"--lr: {part!r} is not a number or NAME=number") from None
        try:
            check_lr(v)
        except InputError as err:
            raise UsageError(f"--lr: {part!r}: {err}") from None
        if v > _FLOAT32_MAX:          # torch's float32 update cannot take it (an overflow error)
            raise UsageError(f"--lr: {part!r}: a learning rate must be at most {_FLOAT32_MAX:.3g} "
                             "(the largest float32: the networks' weights are float32)")
        if not eq:
            if common is not None:
                raise UsageError(f"--lr: {spec!r} gives the common learning rate twice")
            common = v
        elif key not in names:
            raise UsageError(f"--lr: {key!r} is not one of the --optimizers ({', '.join(names)})")
        elif key in own:
            raise UsageError(f"--lr: {spec!r} gives the learning rate of {key} twice")
        else:
            own[key] = v
    for n in names:
        rates[n] = own.get(n, common if common is not None else rates[n])
    if "ddp" in rates:
        try:
            check_lr(rates["ddp"], "ddp")
        except InputError as err:
            raise UsageError(f"--lr: {err}") from None
    return rates


def check_args(args) -> dict:
    """Every option checked before any work; returns what the run needs (names, rates, device,
    network builder). Raises :class:`UsageError` with the one-line message."""
    import torch

    from .networks import resolve_network

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in DEFAULT_LR]
    if bad or not names:
        raise UsageError(f"unknown optimizer(s) {bad}; valid optimizers are {', '.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--optimizers: {args.optimizers!r} names an optimizer twice")
    for option, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--seeds", args.seeds, 1), ("--seed", args.seed, 0),
                               ("--threads", args.threads, 1), ("--width", args.width, 1),
                               ("--depth", args.depth, 2), ("--n-train", args.n_train, 1),
                               ("--n-test", args.n_test, 1)):
        if value is not None and value < low:
            raise UsageError(f"{option} must be >= {low}, got {value}")
    if args.threads > MAX_THREADS:      # OpenMP would try to start them all (and abort)
        raise UsageError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    if args.seed + args.seeds - 1 > _LARGEST_SEED:
        raise UsageError(f"--seed {args.seed} with --seeds {args.seeds}: seeds must be at most "
                         f"{_LARGEST_SEED} (2**64 - 1, torch's largest)")
    rates = parse_lr(args.lr, names)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UsageError(f"--device {args.device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: expected cpu or cuda[:N]")
    try:
        check_outputs(args.plot, args.json)
    except OccoreError as err:
        raise UsageError(str(err)) from None
    if not args.no_progress:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            raise UsageError("progress bars need tqdm (pip install tqdm), or pass --no-progress") from None
    try:
        build = resolve_network(args.net)
    except InputError as err:
        raise UsageError(f"--net: {err}") from None
    return {"names": names, "rates": rates, "device": device, "build": build}


def _load(args):
    try:
        return datasets.load(args.dataset, args.data_dir, n_train=args.n_train, n_test=args.n_test)
    except (OSError, ValueError) as err:   # DatasetNotFoundError, DataFormatError, InputError
        raise UsageError(f"cannot load {args.dataset}: {err}") from None


def _check_with_data(args, cfg, split):
    """The checks that need the data: batch size, the network on these samples, and what the
    core solvers (E-MSA, vanilla DDP) need (a chain of stages; DDP's dense local model in memory)."""
    import torch
    from torch import nn

    from occore.errors import OccoreError

    n = len(split.x_train)
    if args.batch_size > n:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {n} training samples of {args.dataset}")
    torch.manual_seed(args.seed)
    try:
        net = cfg["build"](split.input_shape, split.num_classes, dataset=args.dataset, width=args.width,
                           depth=args.depth)
    except OccoreError as err:
        raise UsageError(f"--net {args.net}: {err}") from None
    except Exception as err:   # a user's builder failing is reported in one line
        raise UsageError(f"--net {args.net}: building it failed ({type(err).__name__}: {err})") from None
    if not isinstance(net, nn.Module):
        raise UsageError(f"--net {args.net} returned a {type(net).__name__}, expected an nn.Module")
    try:
        with torch.no_grad():
            out = net(split.x_train[:2])
    except Exception as err:
        raise UsageError(f"--net {args.net} does not take {args.dataset}'s samples of shape "
                         f"{split.input_shape}: {type(err).__name__}: {err}") from None
    if out.shape != (2, split.num_classes):
        raise UsageError(f"--net {args.net} gives outputs {tuple(out.shape[1:])} for {split.num_classes} classes")
    for name in (n for n in cfg["names"] if n in CORE_SOLVERS):
        from . import NetworkProblem

        try:
            prob = NetworkProblem(net, nn.CrossEntropyLoss(), split.x_train[:args.batch_size],
                                  split.y_train[:args.batch_size])
            lm = prob.local_model(prob.rollout(prob.initial_controls()))
            need = lm.memory_estimate(second_order=name == "ddp")
        except OccoreError as err:
            raise UsageError(f"{name} needs a network occore can split into stages: {err}") from None
        if name == "ddp" and need > prob.memory_limit:
            raise UsageError(f"ddp: vanilla DDP's dense local model needs about {need / 2**20:.0f} MiB for "
                             f"this network at batch {args.batch_size} (limit {prob.memory_limit / 2**20:.0f} "
                             "MiB); use a smaller --width or --batch-size, or ddpnopt")
    return net


def _bar(args, total_runs):
    """A progress callback per run (tqdm on stderr): epoch, loss, samples per second."""
    if args.no_progress:
        return lambda name, seed, steps: None
    from tqdm import tqdm

    count = [0]

    def open_bar(name, seed, steps):
        count[0] += 1
        bar = tqdm(total=steps, desc=f"[{count[0]}/{total_runs}] {name} seed {seed}", file=sys.stderr,
                   mininterval=0.5, leave=True, unit="step", dynamic_ncols=True)
        return bar
    return open_bar


def run_all(args, cfg, split) -> list:
    """Every (optimizer, seed) run, seeds outer; a list of TrainRecords (lr attached)."""
    from .training import compare_optimizers

    import torch

    torch.set_num_threads(args.threads)
    device = cfg["device"]
    split = datasets.Split(split.x_train.to(device), split.y_train.to(device), split.x_test.to(device),
                           split.y_test.to(device), classes=split.num_classes, name=split.name)
    per_epoch = (len(split.x_train) // args.batch_size if args.drop_last
                 else -(-len(split.x_train) // args.batch_size))
    open_bar = _bar(args, len(cfg["names"]) * args.seeds)
    records = []
    for seed in range(args.seed, args.seed + args.seeds):
        bars = {}

        def progress(name, epoch, step, steps, loss, seconds, _seed=seed):
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = open_bar(name, _seed, args.epochs * per_epoch)
            if bar is not None:
                done = (epoch - 1) * steps + step
                bar.set_postfix_str(f"epoch {epoch}/{args.epochs} loss {loss:.4f} "
                                    f"{done * args.batch_size / max(seconds, 1e-9):.0f} samples/s", refresh=False)
                bar.update(1)
                if done == bar.total:
                    bar.close()

        def make_model():
            return cfg["build"](split.input_shape, split.num_classes, dataset=args.dataset, width=args.width,
                                depth=args.depth).to(device)
        recs = compare_optimizers(make_model, split, cfg["names"], args.epochs, args.batch_size,
                                  cfg["rates"], seed, drop_last=args.drop_last, progress=progress,
                                  measure_memory=True)
        for bar in bars.values():
            if bar is not None:
                bar.close()
        records += recs.values()
    return records


def _mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records, names) -> dict:
    """Per optimizer: mean and std over its seeds of the final training loss, the final test
    accuracy, the time per step and the peak memory; ``runs`` and ``stopped`` (runs ended early)."""
    out = {}
    for name in names:
        rs = [r for r in records if r.optimizer == name]
        nan = float("nan")
        out[name] = {
            "lr": rs[0].lr, "runs": len(rs), "stopped": sum(bool(r.stopped) for r in rs),
            "train_loss": _mean_std([r.train_loss[-1] if r.train_loss and not r.stopped else nan for r in rs]),
            "test_accuracy": _mean_std([r.test_accuracy[-1] if r.test_accuracy and not r.stopped else nan
                                        for r in rs]),
            "seconds_per_step": _mean_std([r.seconds_per_step for r in rs]),
            "peak_memory_mib": _mean_std([r.peak_memory / 2**20 if r.peak_memory is not None else nan
                                          for r in rs]),
        }
    return out


def _pm(ms, fmt):
    m, s = ms
    return "-" if m != m else f"{format(m, fmt)} +- {format(s, fmt)}"


def print_table(summary, file=None) -> None:
    file = file or sys.stdout
    print(f"{'optimizer':16s} {'lr':>8s} {'final train loss':>18s} {'test acc [%]':>15s} "
          f"{'ms/step':>15s} {'peak MiB':>15s} runs", file=file)
    for name, s in summary.items():
        acc = (100 * s["test_accuracy"][0], 100 * s["test_accuracy"][1])
        ms = (1e3 * s["seconds_per_step"][0], 1e3 * s["seconds_per_step"][1])
        note = f" ({s['stopped']} diverged)" if s["stopped"] else ""
        print(f"{name:16s} {s['lr']:8.2g} {_pm(s['train_loss'], '.4f'):>18s} {_pm(acc, '.2f'):>15s} "
              f"{_pm(ms, '.2f'):>15s} {_pm(s['peak_memory_mib'], '.3f'):>15s} {s['runs']}{note}", file=file)


def plot_records(records, names, path, title) -> None:
    """Two panels, training loss (log scale) and test accuracy per epoch: the mean over seeds per
    optimizer, with a band from the seeds' minimum to their maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = max(sum(r.optimizer == n for r in records) for n in names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, ax, label in (("train_loss", axes[0], "mean training loss per epoch"),
                           ("test_accuracy", axes[1], "test accuracy after each epoch")):
        for name in names:
            curves = [getattr(r, key) for r in records if r.optimizer == name and getattr(r, key)]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            a = np.array([c[:n] for c in curves])
            epochs = np.arange(1, n + 1)
            (line,) = ax.plot(epochs, a.mean(0), label=name)
            if len(a) > 1:
                ax.fill_between(epochs, a.min(0), a.max(0), color=line.get_color(), alpha=0.2, lw=0)
        ax.set(xlabel="epoch", ylabel=label.split(" per")[0].split(" after")[0],
               title=f"{label}\n(mean over {seeds} seed{'s' * (seeds > 1)}"
                     f"{', band: min-max' if seeds > 1 else ''})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions() -> dict:
    import numpy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"}


def main(argv=None) -> int:
    from . import train_runs

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:          # --help (0) or a malformed command line (2, one line)
        return done.code
    try:
        cfg = check_args(args)
        split = _load(args)
        net = _check_with_data(args, cfg, split)
        problem = train_runs.check(args, cfg, split)
        if problem:
            raise UsageError(problem)
    except UsageError as err:
        print(f"occore train: {err}", file=sys.stderr)
        return 2
    from occore.errors import OccoreError

    try:             # checkpoints, --nproc, --workers, torchrun: nn_adapter.train_runs
        records = train_runs.run(args, cfg, split) if train_runs.wanted(args) else run_all(args, cfg, split)
    except KeyboardInterrupt:
        print("occore train: interrupted", file=sys.stderr)
        return 130
    except (train_runs.RunError, OccoreError) as err:   # e.g. a user network the adapter refuses mid-run
        print(f"occore train: {err}", file=sys.stderr)
        return 1
    if records is None:              # a rank of a torchrun job other than 0: rank 0 reports
        return 0
    summary = summarize(records, cfg["names"])
    widths = "x".join(str(m.out_features) for m in net.modules() if hasattr(m, "out_features"))
    title = (f"{args.dataset} ({len(split.x_train)} train / {len(split.x_test)} test), {args.net} "
             f"({sum(p.numel() for p in net.parameters())} weights), batch {args.batch_size}, {args.epochs} epochs")
    print(f"{title}; {args.seeds} seed(s) from {args.seed}, the same initial weights and minibatches for "
          "every optimizer")
    print_table(summary)
    if args.plot:
        plot_records(records, cfg["names"], args.plot, title)
        print(f"plot: {args.plot}")
    if args.json:
        from dataclasses import asdict

        doc = {"command": ["occore", "train", *(sys.argv[1:] if argv is None else argv)],
               "versions": _versions(), "title": title, "layers": widths,
               "summary": summary, "runs": [dict(asdict(r), lr=r.lr) for r in records]}
        Path(args.json).write_text(json.dumps(doc, indent=1))
        print(f"json: {args.json}")
    return 0


COMMAND = Command(help="train networks: DDPNOpt beside torch's optimizers, E-MSA and DDP (occore train --help)",
                  main=main)


if __name__ == "__main__":
    raise SystemExit(main())
