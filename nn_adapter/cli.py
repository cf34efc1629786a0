"""``occore train``: DDPNOpt and torch's optimizers side by side on a classification data set.

    occore train --dataset digits --optimizers ddpnopt,adam,sgd --plot train.png
    occore train --nproc 2 --checkpoint run/      # data-parallel on 2 processes, a checkpoint per epoch
    occore train --resume run/ --epochs 12        # continue those runs (any --nproc)
    occore train --workers 2                      # the optimizers in 2 processes at once

The command is a plugin of the ``occore`` command line: ``pyproject.toml`` declares
:data:`COMMAND` in the entry-point group ``occore.commands`` under the name ``train``, and
``occore train ...`` hands every argument after ``train`` to :func:`main`.
"""
from __future__ import annotations

import argparse
import sys

from occore.cli import Command

from .training import DEFAULT_LR, OPTIMIZERS, compare_optimizers, mlp

__all__ = ["main", "build_parser", "COMMAND"]

DATASETS = ("digits", "wine", "fashion-mnist")


def _load(name: str, data_dir: str | None):
    from . import data

    if name == "digits":
        return data.load_digits()
    if name == "wine":
        return data.load_wine()
    return data.load_fashion_mnist(data_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="occore train", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--optimizers", default="ddpnopt,adam,sgd",
                   help=f"comma-separated, from: {', '.join(OPTIMIZERS)}")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for all (default: per optimizer)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (small nets: 1 is fastest)")
    p.add_argument("--plot", default=None, help="PNG of training loss and test accuracy per epoch")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="write a checkpoint per optimizer (DIR/<optimizer>/) at the end of every epoch")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the runs checkpointed in DIR (any --nproc), up to --epochs")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel on N local processes (torch.distributed, gloo; torchrun-style); "
                        "on several machines run `torchrun ... -m nn_adapter.cli ...`")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train the optimizers in N processes at once (same table as serial, times aside)")
    return p


def _check_scaling(args) -> str | None:
    """The message of the first bad --nproc / --workers / --checkpoint / --resume, or None."""
    import pathlib

    from .checkpoint import checkpoint_path

    for name in ("nproc", "workers"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.nproc > 1 and args.workers > 1:
        return "--nproc and --workers: choose one (data-parallel runs or parallel runs)"
    world = args.nproc if args.nproc > 1 else _torchrun_world()
    if args.batch_size % world:
        return f"--batch-size {args.batch_size} is not divisible by the {world} processes"
    if args.resume is not None:
        for name in args.optimizers.split(","):
            path = checkpoint_path(pathlib.Path(args.resume) / name.strip())
            if name.strip() and not path.is_file():
                return f"--resume: no checkpoint {path}"
    if args.checkpoint is not None:
        try:
            pathlib.Path(args.checkpoint).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"--checkpoint: cannot create {args.checkpoint}: {err.strerror}"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in DEFAULT_LR]
    if bad or not names:
        print(f"occore train: unknown optimizer(s) {bad}; valid optimizers are {', '.join(OPTIMIZERS)}",
              file=sys.stderr)
        return 2
    problem = _check_scaling(args)
    if problem:
        print(f"occore train: {problem}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.nproc > 1:
        from .distributed import launch

        return max(launch(_rank_main, args.nproc, argv))
    if _torchrun_world() > 1:              # started by torchrun: this process is one rank
        from .distributed import init_from_environment

        init_from_environment()
        try:
            return _rank_main(argv)
        finally:
            import torch.distributed as dist

            dist.destroy_process_group()
    return _train(args, names)


def _torchrun_world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ else 1


def _rank_main(argv) -> int:
    """One rank of a data-parallel run (a process group is initialised): rank 0 reports."""
    import torch.distributed as dist

    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    return _train(args, names, report=dist.get_rank() == 0)


def _train(args, names, report: bool = True) -> int:
    import functools

    import torch

    from .checkpoint import CheckpointError

    torch.set_num_threads(args.threads)
    try:
        data = _load(args.dataset, args.data_dir)
    except (OSError, ValueError) as err:
        print(f"occore train: cannot load {args.dataset}: {err}", file=sys.stderr)
        return 2
    x = data.x_train.reshape(len(data.x_train), -1)
    flat = type(data)(x, data.y_train, data.x_test.reshape(len(data.x_test), -1), data.y_test)
    try:
        records = compare_optimizers(functools.partial(mlp, x.shape[1], data.num_classes, args.width,
                                                       args.depth), flat, names, args.epochs,
                                     args.batch_size, args.lr, args.seed, checkpoint=args.checkpoint,
                                     resume=args.resume, workers=args.workers)
    except CheckpointError as err:
        print(f"occore train: --resume: {err}", file=sys.stderr)
        return 2
    if not report:
        return 0
    print(f"{args.dataset}: MLP {x.shape[1]}-{'-'.join([str(args.width)] * (args.depth - 1))}-"
          f"{data.num_classes} (tanh), batch {args.batch_size}, {args.epochs} epochs, same initial weights")
    print(f"{'optimizer':16s} {'lr':>8s} {'train loss':>11s} {'test acc':>9s} {'time [s]':>9s}")
    for name, rec in records.items():
        lr = DEFAULT_LR[name] if args.lr is None else args.lr
        loss = rec.train_loss[-1] if rec.train_loss else float("nan")
        acc = rec.test_accuracy[-1] if rec.test_accuracy else float("nan")
        print(f"{name:16s} {lr:8.2g} {loss:11.4f} {100 * acc:8.2f}% {rec.seconds:9.2f}")
    if args.plot:
        _plot(records, args.plot, args.dataset)
        print(f"plot: {args.plot}")
    return 0


COMMAND = Command(help="train networks: DDPNOpt beside torch's optimizers (options: occore train --help)",
                  main=main)


def _plot(records, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rec in records.items():
        epochs = range(1, len(rec.train_loss) + 1)
        a.plot(epochs, rec.train_loss, label=name)
        b.plot(epochs, rec.test_accuracy, label=name)
    a.set(xlabel="epoch", ylabel="training loss", yscale="log", title=title)
    b.set(xlabel="epoch", ylabel="test accuracy", title=title)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
