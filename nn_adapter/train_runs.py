"""``occore train`` at scale: checkpoints that resume exactly, data-parallel runs, runs in parallel.

    occore train --optimizers ddpnopt,adam --seeds 2 --checkpoint runs/   # a checkpoint per epoch
    occore train --optimizers ddpnopt,adam --seeds 2 --resume runs/       # continue, e.g. after a kill
    occore train --nproc 2 --batch-size 64 ...        # each run data-parallel on 2 local processes
    torchrun --nproc-per-node 4 ... -m occore.cli train ...   # under torchrun: one rank per process
    occore train --workers 2 ...                      # the (optimizer, seed) runs, 2 at a time

**Checkpoints.** With ``--checkpoint DIR`` every (optimizer, seed) run writes
``DIR/<optimizer>-seed<seed>/checkpoint.pt`` at the end of each epoch with
:func:`nn_adapter.checkpoint.save_checkpoint`: the model, the optimizer's ``state_dict``, the
epoch, the data order (the state of the generator the next epoch's permutation is drawn from), the
RNG states of every rank, the run's settings and its record so far; rank 0 writes a temporary
file, renamed over the old one, so a kill or a failed write leaves the previous checkpoint.
``--resume DIR`` continues every run from its checkpoint (a run without one, not started when the
command was killed, starts from its first epoch) and writes the next checkpoints to DIR (or to
``--checkpoint``). A resumed run ends with the parameters and the record of the uninterrupted run:
its later epochs see the minibatches the whole run draws from its seed, and every RNG continues
where it was. ``--epochs`` may grow; any number of processes may resume. A checkpoint of other
settings (data set, samples, network, batch, optimizer, lr, seed) or of another model or optimizer
configuration, and a corrupted one, are refused before any work, as is a fresh
``--checkpoint DIR`` over checkpoints already there.

**Data-parallel.** ``--nproc N`` runs every (optimizer, seed) run on N local processes, started
by torch's elastic launcher as ``torchrun --standalone`` does
(:func:`nn_adapter.distributed.launch`); an ``occore train`` that ``torchrun`` started (RANK,
WORLD_SIZE and MASTER_ADDR in its environment) is one rank of such a run, on any number of
machines. Every rank builds the same (seeded) model, wraps it in ``DistributedDataParallel`` and
takes its equal shard of every minibatch (:func:`nn_adapter.distributed.shard`), so the steps are
those of one process with the whole minibatch, to rounding (DDPNOpt and EKFAC reduce what they need;
see :mod:`nn_adapter.distributed`). The recorded loss is the mean over the ranks; rank 0 reports.
gloo on CPU; NCCL with ``--device cuda``, rank r on ``cuda:<LOCAL_RANK>``. A world size that does
not divide the batch (or the last partial batch, unless ``--drop-last``) is refused. occore's own
solvers (``emsa``, ``ddp``) run on one process only.

**Parallel runs.** ``--workers N`` runs the independent (optimizer, seed) runs in N processes
(:func:`nn_adapter.distributed.parallel_map`, ``--threads`` torch threads each, no progress bars):
the records, and so the table, are those of the serial run, times and memory aside.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

from occore.output_paths import output_folder_problem

__all__ = ["RunError", "add_arguments", "check", "wanted", "run", "run_folder"]

#: Settings a checkpoint must have been written with to be resumed: the CLI options.
SETTINGS = ("--dataset", "--n-train", "--net", "--width", "--depth", "--batch-size", "--drop-last",
            "--optimizers", "--lr", "--seed")


class RunError(Exception):
    """A run that could not go on (a checkpoint not written, a data-parallel process failed):
    the message is one line."""


class _Refused(Exception):
    """A bad option found by :func:`check`; the message is the one line."""


def add_arguments(parser) -> None:
    """The options of this module, in their own group of ``parser`` (``occore train --help``)."""
    g = parser.add_argument_group("checkpoints, data-parallel runs, parallel runs")
    g.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a checkpoint per run (DIR/<optimizer>-seed<seed>/) at the end of every epoch")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the runs checkpointed in DIR (up to --epochs, any --nproc); "
                        "the next checkpoints go there too unless --checkpoint says otherwise")
    g.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="each run data-parallel on N local processes (torchrun-style; gloo on CPU, "
                        "NCCL on CUDA); on several machines start occore train with torchrun")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run the (optimizer, seed) runs in N processes at once (the same table)")


def _environment() -> tuple:
    """(world size, rank, local rank) of a process torchrun started; (1, 0, 0) otherwise."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return 1, 0, 0
    try:
        return int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        return 1, 0, 0


def wanted(args) -> bool:
    """Whether ``args`` ask for anything of this module (else the CLI's plain serial loop runs)."""
    return bool(args.checkpoint is not None or args.resume is not None or args.nproc != 1
                or args.workers != 1 or _environment()[0] > 1)


def run_folder(directory, name: str, seed: int) -> Path:
    """The checkpoint folder of the run (``name``, ``seed``) in ``directory``."""
    return Path(directory) / f"{name}-seed{seed}"


def _runs(args, cfg) -> list:
    """The (optimizer, seed) runs in the CLI's order: seeds outer, optimizers inner."""
    return [(name, seed) for seed in range(args.seed, args.seed + args.seeds) for name in cfg["names"]]


def _output(args) -> Optional[str]:
    return args.checkpoint if args.checkpoint is not None else args.resume


def _settings(args, split, name: str, seed: int, rate: float) -> dict:
    return {"--dataset": args.dataset, "--n-train": len(split.x_train), "--net": args.net,
            "--width": args.width, "--depth": args.depth, "--batch-size": args.batch_size,
            "--drop-last": bool(args.drop_last), "--optimizers": name, "--lr": float(rate),
            "--seed": seed}


def _plan(args, n: int, seed: int, epochs: int) -> tuple:
    """The minibatches of the first ``epochs`` epochs of the run and the data-order generator after
    them (train_classifier draws every epoch's permutation from a generator seeded with ``seed``)."""
    import torch

    from .data import batch_indices

    gen = torch.Generator().manual_seed(seed)
    batches = [b for _ in range(epochs) for b in batch_indices(n, args.batch_size, gen, args.drop_last)]
    return batches, gen


# -- one run ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    net: object            # the plain module (evaluated, fingerprinted)
    model: object          # what the optimizer steps: net, or its DistributedDataParallel
    optimizer: object
    rate: float
    settings: dict
    start: int = 1         # the first epoch to run
    before: Optional[dict] = None   # the record of the epochs before ``start`` (a resumed run)
    fingerprint: str = ""  # of the initial weights and every minibatch of the whole run


def _prepare(args, cfg, split, name: str, seed: int, world: int, device) -> _Run:
    """The run's model and optimizer, from its checkpoint when resumed.

    The model is built under ``torch.manual_seed(seed)``, as :func:`nn_adapter.training.compare_optimizers`
    does (the same initial weights for every optimizer of a seed).

    Raises:
        nn_adapter.checkpoint.CheckpointError: the run's checkpoint cannot be resumed.
    """
    import torch

    from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint
    from .training import fingerprint, make_optimizer

    torch.manual_seed(seed)
    net = cfg["build"](split.input_shape, split.num_classes, dataset=args.dataset, width=args.width,
                       depth=args.depth).to(device)
    model = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    rate = cfg["rates"][name]
    run = _Run(net, model, make_optimizer(name, model, rate), rate, _settings(args, split, name, seed, rate))
    path = checkpoint_path(run_folder(args.resume, name, seed)) if args.resume is not None else None
    if path is None or not path.exists():
        return run
    run.fingerprint = fingerprint(net, _plan(args, len(split.x_train), seed, args.epochs)[0])
    order = torch.Generator()

    def same_settings(path, extra):
        saved = extra.get("settings") if isinstance(extra, dict) else None
        if not isinstance(saved, dict) or not isinstance(extra.get("record"), dict):
            raise CheckpointError(path, "not a checkpoint of occore train --checkpoint (no run settings)")
        for key in SETTINGS:
            if saved.get(key) != run.settings[key]:
                raise CheckpointError(path, f"written by a run with {key} {saved.get(key)}, this one "
                                      f"has {key} {run.settings[key]}")
    state = load_checkpoint(path, model, run.optimizer, data_order=order, check_extra=same_settings)
    if state.epoch > args.epochs:
        raise CheckpointError(path, f"holds epoch {state.epoch}, beyond --epochs {args.epochs}")
    if not torch.equal(order.get_state(), _plan(args, len(split.x_train), seed, state.epoch)[1].get_state()):
        raise CheckpointError(path, "its data order is not the one this run draws from --seed "
                              "(written by another version of torch?)")
    run.start, run.before = state.epoch + 1, state.extra["record"]
    return run


def _merge(run: _Run, record):
    """The record of a whole run: the checkpoint's (epochs before the resume) and this one's."""
    if run.before is None:
        return record
    from .training import TrainRecord

    whole = TrainRecord(**run.before)
    whole.fingerprint = run.fingerprint      # (this part's record has the resumed weights')
    whole.train_loss = whole.train_loss + record.train_loss
    whole.test_accuracy = whole.test_accuracy + record.test_accuracy
    whole.seconds += record.seconds
    whole.steps += record.steps
    whole.untimed_steps += record.untimed_steps
    peaks = [p for p in (whole.peak_memory, record.peak_memory) if p is not None]
    whole.peak_memory = max(peaks) if peaks else None
    whole.stopped = record.stopped
    return whole


class _DataParallelStep:
    """``step_batch`` for :func:`nn_adapter.training.train_classifier` on one rank: this rank's
    shard of the global minibatch, one step of the optimizer on the DistributedDataParallel model,
    the mean loss over the ranks (one more all_reduce)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    @property
    def state(self) -> dict:
        """The optimizer's state (what :func:`nn_adapter.memory.resident_bytes` counts)."""
        return self.optimizer.state

    def step_batch(self, x, y, loss_fn) -> float:
        import torch
        import torch.distributed as dist

        from .distributed import shard
        from .training import make_closure

        xb, yb = shard(x, y)
        loss = self.optimizer.step(make_closure(self.model, self.optimizer, xb, yb, loss_fn))
        loss = loss.detach() if torch.is_tensor(loss) else loss
        total = torch.tensor([float(loss)], dtype=torch.float64, device=x.device)
        dist.all_reduce(total)
        return float(total) / dist.get_world_size()


def _run_one(args, cfg, split, name: str, seed: int, world: int = 1, device=None, bars=None):
    """One (optimizer, seed) run, checkpointed and resumed as asked; its whole TrainRecord."""
    from .checkpoint import save_checkpoint
    from .training import train_classifier

    device = device if device is not None else cfg["device"]
    run = _prepare(args, cfg, split, name, seed, world, device)
    out = _output(args)
    on_epoch_end = None
    if out is not None:
        folder = run_folder(out, name, seed)

        def on_epoch_end(epoch, record):
            extra = {"settings": run.settings, "record": dataclasses.asdict(_merge(run, record))}
            try:
                save_checkpoint(folder, run.model, run.optimizer, epoch,
                                data_order=_plan(args, len(split.x_train), seed, epoch)[1], extra=extra)
            except OSError as err:
                raise RunError(f"cannot write the checkpoint of {name} seed {seed} in {folder}: "
                               f"{err.strerror or err}; the last checkpoint written is kept") from None
    bar, progress = bars(name, seed, run.start) if bars is not None else (None, None)
    step = _DataParallelStep(run.model, run.optimizer) if world > 1 else run.optimizer
    try:
        record = train_classifier(run.net, split, step, args.epochs, args.batch_size, seed, name=name,
                                  drop_last=args.drop_last, progress=progress, measure_memory=True,
                                  start_epoch=run.start, on_epoch_end=on_epoch_end)
    finally:
        if bar is not None:
            bar.close()
    record = _merge(run, record)
    record.lr = run.rate
    return record


def _progress_bars(args, n: int, total: int):
    """``bars(name, seed, start) -> (bar, progress)``: a tqdm bar on stderr per run, as the CLI's
    serial loop shows (a resumed run's bar starts at its first epoch); None with --no-progress."""
    if args.no_progress:
        return None
    from tqdm import tqdm

    per_epoch = n // args.batch_size if args.drop_last else -(-n // args.batch_size)
    count = [0]

    def bars(name, seed, start):
        count[0] += 1
        bar = tqdm(total=args.epochs * per_epoch, initial=min(start - 1, args.epochs) * per_epoch,
                   desc=f"[{count[0]}/{total}] {name} seed {seed}", file=sys.stderr, mininterval=0.5,
                   leave=True, unit="step", dynamic_ncols=True)

        def progress(epoch, step, steps, loss, seconds):
            done = (epoch - start) * steps + step
            bar.set_postfix_str(f"epoch {epoch}/{args.epochs} loss {loss:.4f} "
                                f"{done * args.batch_size / max(seconds, 1e-9):.0f} samples/s", refresh=False)
            bar.update(1)
        return bar, progress
    return bars


def _on_device(split, device):
    from . import data as datasets

    return datasets.Split(split.x_train.to(device), split.y_train.to(device), split.x_test.to(device),
                          split.y_test.to(device), classes=split.num_classes, name=split.name)


def _serial(args, cfg, split, world: int = 1, rank: int = 0, local_rank: int = 0) -> list:
    """Every run, one after another, on this process (one rank of a data-parallel run when
    ``world`` > 1: a process group is initialised)."""
    import torch

    torch.set_num_threads(args.threads)
    device = cfg["device"]
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    split = _on_device(split, device)
    runs = _runs(args, cfg)
    bars = _progress_bars(args, len(split.x_train), len(runs)) if rank == 0 else None
    return [_run_one(args, cfg, split, name, seed, world, device, bars) for name, seed in runs]


# -- data-parallel and parallel runs --------------------------------------------------------------------
def _backend(cfg) -> str:
    return "nccl" if cfg["device"].type == "cuda" else "gloo"


def _data_parallel(args, cfg, split):
    """This rank's part of every run (the default process group is initialised); the records on
    rank 0, None on the others."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    records = _serial(args, cfg, split, world, rank, local_rank)
    return records if rank == 0 else None


def _rank(args):
    """A process of ``--nproc`` (started by :func:`nn_adapter.distributed.launch`)."""
    from . import cli

    try:
        return _data_parallel(args, cli.check_args(args), cli._load(args))
    except RunError as err:                  # one line; the launcher stops the other ranks
        print(f"occore train: {err}", file=sys.stderr)
        raise SystemExit(1) from None


_LOADED: dict = {}     # a worker process's data set, loaded by its first job


def _job(job):
    """One run of ``--workers`` in a worker process (the data loaded once per process)."""
    from . import cli

    args, name, seed = job
    cfg = cli.check_args(args)
    key = (args.dataset, args.data_dir, args.n_train, args.n_test)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = cli._load(args)
    return _run_one(args, cfg, _on_device(_LOADED[key], cfg["device"]), name, seed)


def run(args, cfg, split):
    """Every (optimizer, seed) run as ``args`` ask (see the module docstring): their TrainRecords
    in the CLI's order, or None on a rank other than 0 of a torchrun job.

    Raises:
        RunError: a checkpoint could not be written, or a data-parallel process failed.
    """
    world = _environment()[0]
    if world > 1:                                  # this process is one rank of a torchrun job
        import torch.distributed as dist

        from .distributed import init_from_environment

        init_from_environment(_backend(cfg))
        try:
            return _data_parallel(args, cfg, split)
        finally:
            dist.destroy_process_group()
    if args.nproc > 1:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        from .distributed import launch

        try:
            return launch(_rank, args.nproc, args, backend=_backend(cfg))[0]
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            raise RunError(f"process {rank} of the data-parallel run failed (exit code "
                           f"{failure.exitcode}); see its message above") from None
    if args.workers > 1:
        from .distributed import parallel_map

        jobs = [(args, name, seed) for name, seed in _runs(args, cfg)]
        return parallel_map(_job, jobs, args.workers, threads=args.threads)
    return _serial(args, cfg, split)


# -- the checks before any work -------------------------------------------------------------------------
def check(args, cfg, split) -> Optional[str]:
    """The one-line message of the first bad option of this module, or None; nothing is trained
    and nothing written. A resumed run's checkpoint is read and loaded into a model and optimizer
    built for the check (a corrupted one, or one of other settings, fails here)."""
    try:
        _check(args, cfg, split)
    except _Refused as err:
        return str(err)
    return None


def _check(args, cfg, split) -> None:
    import torch

    from .checkpoint import CheckpointError, checkpoint_path
    from .training import CORE_SOLVERS

    for option, value in (("--nproc", args.nproc), ("--workers", args.workers)):
        if value < 1:
            raise _Refused(f"{option} must be >= 1, got {value}")
    env_world, _, local_rank = _environment()
    if env_world > 1 and args.nproc > 1:
        raise _Refused(f"--nproc {args.nproc}: this process is one of the {env_world} that torchrun "
                       "started (WORLD_SIZE); leave --nproc out under torchrun")
    world = max(args.nproc, env_world)
    core = [n for n in cfg["names"] if n in CORE_SOLVERS]
    if world > 1:
        if args.workers > 1:
            raise _Refused("--workers with a data-parallel run: choose --nproc N (each run on N "
                           "processes) or --workers N (N runs at once)")
        if core:
            raise _Refused(f"--optimizers {core[0]}: occore's solvers (emsa, ddp) run on one process; "
                           "leave them out of a data-parallel run")
        if args.batch_size % world:
            raise _Refused(f"--batch-size {args.batch_size} is not divisible by the world size {world}: "
                           "each process takes an equal shard of every minibatch")
        n, last = len(split.x_train), len(split.x_train) % args.batch_size
        if last and not args.drop_last and last % world:
            raise _Refused(f"--batch-size {args.batch_size}: the last minibatch of each epoch has {last} "
                           f"of the {n} samples, not divisible by the world size {world}; add "
                           "--drop-last or choose another --batch-size")
        if cfg["device"].type == "cuda":
            need = args.nproc if env_world == 1 else local_rank + 1
            if torch.cuda.device_count() < need:
                raise _Refused(f"--device {args.device}: {need} processes need {need} CUDA devices, "
                               f"{torch.cuda.device_count()} here")
    if (args.checkpoint is not None or args.resume is not None) and core:
        raise _Refused(f"--optimizers {core[0]}: occore's solvers have no optimizer state_dict with "
                       "param groups for the checkpoint files; --checkpoint and --resume take torch "
                       "optimizers, DDPNOpt and EKFAC")
    runs = _runs(args, cfg)
    for option, folder in (("--checkpoint", args.checkpoint), ("--resume", args.resume)):
        if folder is not None:
            _check_writable(option, folder)
    if args.resume is not None:
        if not Path(args.resume).is_dir():
            raise _Refused(f"--resume {args.resume}: no such folder")
        found = [r for r in runs if checkpoint_path(run_folder(args.resume, *r)).exists()]
        if not found:
            raise _Refused(f"--resume {args.resume}: no checkpoint of these runs there (expected "
                           f"{checkpoint_path(run_folder(args.resume, *runs[0]))}, ...)")
        for name, seed in found:
            try:
                _prepare(args, cfg, split, name, seed, 1, cfg["device"])
            except CheckpointError as err:
                raise _Refused(f"--resume: {err}") from None
    out = args.checkpoint
    if out is not None:
        if args.resume is None or Path(out).resolve() != Path(args.resume).resolve():
            for r in runs:
                path = checkpoint_path(run_folder(out, *r))
                if path.exists():
                    raise _Refused(f"--checkpoint {out}: {path} holds a checkpoint already; continue "
                                   f"it with --resume {out}, or choose another folder")


def _check_writable(option: str, folder: str) -> None:
    """The checkpoint folder of ``option`` (a name, not empty) exists and is writable, or can be
    created (its nearest existing parent is a writable folder)."""
    problem = output_folder_problem(folder)
    if problem is not None:
        raise _Refused(f"{option}: {problem}")
