"""Data-parallel DDPNOpt and EKFAC on ``torch.distributed``; a torchrun-style launcher; a process map.

Data parallelism. Every rank holds the same model and optimizer and its own shard of each global
batch (:func:`shard`: equal, contiguous shards; a world size that does not divide the batch is an
error). Give the optimizer the model wrapped in ``torch.nn.parallel.DistributedDataParallel``
(then DDP averages the parameter gradients during ``backward``, and the optimizer records and
re-runs the wrapped ``.module``), or the plain model and ``process_group=`` (then the optimizer
averages the gradients itself)::

    model = DistributedDataParallel(net)                   # gloo on CPU, NCCL on GPUs
    opt = DDPNOpt(model.parameters(), model=model, lr=3e-3, curvature="adam")
    xb, yb = shard(x, y)                                   # this rank's part of the global batch
    opt.step(make_closure(model, opt, xb, yb))             # loss: the mean over the shard

What the optimizer reduces across the ranks (:class:`Collectives`, all ``all_reduce`` with SUM on
flat buffers, one per dtype and device): per step

===========================================  ==================================================
collective                                   content
===========================================  ==================================================
1 agreement                                  the loss, whether the step's records are complete,
                                             DDPNOpt's loss recognition (and, with
                                             ``process_group=``, the gradients in the same
                                             buffer): a step refused on one rank is refused on
                                             all
EKFAC: 1 (2 on eigenbasis refresh steps)     the batch Kronecker factors A, G and the
                                             eigenvalue corrections s (the refresh needs the
                                             averaged A, G before s can be formed)
DDPNOpt feedback: 1 per stage with feedback  (1/B) sum_i Q_ux^(i) dx^(i) of the stage, before it
(T - 1 for T stages)                         is applied (the next stage's input depends on it)
``diagnostics=True``: 1                      the stages' shares of regularised samples
===========================================  ==================================================

plus DDP's own gradient buckets when the model is a ``DistributedDataParallel``. Per-sample
quantities (the value-Hessian weights, the regularisation mu_i, the terminal columns) stay on
their rank. Everything a rank computes from reduced numbers is computed identically on every rank,
so all ranks hold bit-identical parameters and optimizer states after every step; R ranks with
b samples each give the step of one process with R b samples (to rounding) for models without
batch statistics. A training-mode batch norm normalises with its rank's statistics (as under
DDP; use ``SyncBatchNorm`` semantics elsewhere), and dropout draws from each rank's own RNG.
``terminal_hessian="sampled"`` draws the samples of the whole global batch on every rank (the same
generator state everywhere) and keeps its rows, so it too equals the single process.

Processes. :func:`launch` starts N local processes the way ``torchrun --standalone`` does (it is
torch's own elastic launcher), with a process group initialised in each; on several machines run
the same function under ``torchrun`` (see :func:`init_from_environment`). :func:`parallel_map`
runs independent jobs (one training run per optimizer and seed) in separate processes and
returns their results in order, as a serial loop would.
"""
from __future__ import annotations

import logging
import math  # noqa: F401  (the example of parallel_map)
import signal
import time
import uuid
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from occore.errors import InputError
from occore.validation import is_integer

__all__ = ["Collectives", "data_parallel", "shard", "launch", "init_from_environment",
           "parallel_map"]

log = logging.getLogger("nn_adapter")


class Collectives:
    """The collective calls of one optimizer on one process group, counted and timed.

    Args:
        group: a ``torch.distributed`` process group (``None``: the default group).
        average_gradients: True when the optimizer must average the parameter gradients itself
            (a plain model with ``process_group=``); False under ``DistributedDataParallel``.

    Attributes:
        world_size, rank: of ``group``.
        calls: all_reduce calls made so far; seconds: wall time spent in them (waiting for the
            slowest rank included).

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> col = Collectives()
        >>> t = torch.ones(3)
        >>> col.average_([t], extra=[2.0]), t.tolist(), col.calls
        ([2.0], [1.0, 1.0, 1.0], 1)
        >>> dist.destroy_process_group()
    """

    def __init__(self, group=None, average_gradients: bool = True):
        if not dist.is_available() or not dist.is_initialized():
            raise InputError("process_group: torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first (launch() and torchrun "
                             "do it)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.average_gradients = average_gradients
        self.calls = 0
        self.seconds = 0.0

    def _all_reduce(self, buf: torch.Tensor) -> None:
        start = time.perf_counter()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def average_(self, tensors: Sequence[torch.Tensor], extra: Sequence[float] = ()) -> list:
        """Average ``tensors`` in place over the ranks and sum the numbers ``extra``.

        One ``all_reduce`` per (dtype, device) of the tensors; the numbers travel in the first
        floating-point buffer of at least single precision (in a float64 buffer of their own when
        there is none). Nothing is sent when both are empty.

        Args:
            tensors: tensors of any shapes (views are written through).
            extra: numbers summed over the ranks (flags, a loss).

        Returns:
            the sums of ``extra`` (floats), in order.
        """
        groups: dict = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        extra = [float(v) for v in extra]
        carrier = next((k for k in groups if k[0] in (torch.float32, torch.float64)), None)
        sums = extra
        if extra and carrier is None:
            buf = torch.tensor(extra, dtype=torch.float64)
            self._all_reduce(buf)
            sums = buf.tolist()
        for key, ts in groups.items():
            parts = [t.reshape(-1) for t in ts]
            if key == carrier and extra:
                parts.append(torch.tensor(extra, dtype=key[0], device=key[1]))
            buf = torch.cat(parts)
            self._all_reduce(buf)
            n = sum(t.numel() for t in ts)
            buf[:n].div_(self.world_size)
            if key == carrier and extra:
                sums = buf[n:].tolist()
            for t, part in zip(ts, buf[:n].split([t.numel() for t in ts])):
                t.copy_(part.view_as(t))
        return sums


def data_parallel(model: Optional[nn.Module], process_group=None):
    """The module to record and the :class:`Collectives` of an optimizer.

    Args:
        model: the optimizer's model: a plain module, a ``DistributedDataParallel`` (its
            ``.module`` is recorded, its process group used, its gradients already averaged), or
            None.
        process_group: a process group for a plain model (the optimizer averages the gradients),
            or None.

    Returns:
        ``(module, collectives)``: the unwrapped module (or None) and a :class:`Collectives` (None
        when the optimizer runs on one process).

    Raises:
        InputError: ``process_group`` given with a DDP model of another group, or without
            ``torch.distributed`` initialised.
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if ddp:
        if process_group is not None and process_group is not model.process_group:
            raise InputError("process_group: the model is a DistributedDataParallel, whose own "
                             "process group is used; do not pass another one")
        return model.module, Collectives(model.process_group, average_gradients=False)
    if process_group is None:
        return model, None
    return model, Collectives(process_group, average_gradients=True)


def shard(*tensors: torch.Tensor, group=None):
    """This rank's shard of a global batch: rows [r b, (r + 1) b) of every tensor, b = B / R.

    Without ``torch.distributed`` initialised (one process) the tensors come back unchanged.

    Args:
        tensors: the global batch, (B, ...) each (the same B).
        group: the process group (None: the default group).

    Returns:
        one tensor (a view) when one was given, else a tuple.

    Raises:
        InputError: the world size does not divide the batch size (both named), or the tensors'
            batch sizes differ.

    Example:
        >>> shard(torch.arange(6)).tolist()          # one process: the whole batch
        [0, 1, 2, 3, 4, 5]
    """
    if not tensors:
        raise InputError("shard: give the batch's tensors")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise InputError(f"shard: the tensors have different batch sizes {sorted(sizes)}")
    batch = sizes.pop()
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    else:
        world, rank = 1, 0
    if batch % world:
        raise InputError(f"batch_size: {batch} is not divisible by the world size {world}; "
                         "data-parallel steps need equal shards (choose a batch size that is a "
                         f"multiple of {world})")
    b = batch // world
    out = tuple(t[rank * b:(rank + 1) * b] for t in tensors)
    return out[0] if len(out) == 1 else out


def init_from_environment(backend: str = "gloo") -> None:
    """``init_process_group`` from the variables torchrun and :func:`launch` set (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT); nothing when already initialised.

    On several machines, start the same script on each with, for example::

        torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
                 --rdzv_endpoint=HOST:29400 --rdzv_id=job1 train.py
    """
    if not dist.is_initialized():
        dist.init_process_group(backend)


def _entry(fn: Callable, backend: str, args: tuple, kwargs: dict):
    init_from_environment(backend)
    try:
        return fn(*args, **kwargs)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, nproc: int, *args, backend: str = "gloo", **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` local processes with a process group, torchrun-style.

    torch's elastic launcher (what ``torchrun --standalone --nproc_per_node=N`` runs) starts the
    processes with RANK, LOCAL_RANK, WORLD_SIZE and a free rendezvous port; each initialises the
    default process group (``backend``), calls ``fn`` and destroys the group.

    Args:
        fn: a module-level function (it is pickled into spawned processes), as are the arguments.
        nproc: the number of processes (an int >= 1).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPUs).

    Returns:
        the return values of ``fn``, by rank.

    Raises:
        InputError: ``nproc`` is not an int >= 1.
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError: a process failed
            (with its traceback).
    """
    if not (is_integer(nproc) and nproc >= 1):
        raise InputError(f"nproc: expected an int >= 1, got {nproc!r}")
    if not callable(fn):
        raise InputError(f"fn: expected a function, got {type(fn).__name__}")
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"nn_adapter-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.05,
                          start_method="spawn")
    log.info("launching %d processes (%s)", nproc, backend)
    # the elastic agent installs handlers of SIGTERM, SIGINT, SIGHUP and SIGQUIT in this process
    # and leaves them; the caller's are put back
    saved = {s: signal.getsignal(s) for s in _SIGNALS}
    try:
        results = elastic_launch(config, _entry)(fn, backend, args, kwargs)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return [results[r] for r in range(nproc)]


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
                 if hasattr(signal, n))


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def parallel_map(fn: Callable, items: Sequence, workers: int = 1, threads: int = 1) -> list:
    """``[fn(item) for item in items]``, in ``workers`` processes; the results in order.

    :func:`occore.comparison.parallel.parallel_map` (spawned processes) with ``threads`` torch
    threads in each, so a run that seeds itself gives what it gives serially. With ``workers=1``
    the calls run here, one after another.

    Args:
        fn: a module-level function (pickled); items: its arguments (pickled).
        workers: processes at once (an int >= 1). threads: torch threads in each.

    Raises:
        InputError: ``workers`` or ``threads`` is not an int >= 1.

    Example:
        >>> parallel_map(math.sqrt, [1.0, 4.0, 9.0])
        [1.0, 2.0, 3.0]
    """
    from occore.comparison.parallel import parallel_map as _map

    if not (is_integer(threads) and threads >= 1):
        raise InputError(f"threads: expected an int >= 1, got {threads!r}")
    return _map(fn, items, workers, _worker_init, (threads,))
