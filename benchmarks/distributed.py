"""Data-parallel throughput of DDPNOpt, EKFAC and Adam on the paper's CNN: 1 and 2 processes.

The DDPNOpt paper's CNN (``nn_adapter.training.paper_cnn``: 4 conv 3x3 with 32 channels, ReLU,
2x2 max-pooling after the 2nd and 4th, then Linear(32*7*7, 128), ReLU, Linear(128, 10)) on
random 28x28 inputs (float32), global batch 128, trained data-parallel with torch.distributed
(gloo, CPU): the model wrapped in ``DistributedDataParallel``, each of N processes (one torch
thread each, started by ``nn_adapter.distributed.launch``) steps on its shard of 128 / N samples.

Reported per optimizer and process count: samples per second (global batch x steps / wall time
of the timed steps, rank 0, between barriers), the speed-up over one process and the scaling
efficiency (speed-up / N), the collectives per step and the time spent in them per step: DDP's
gradient all-reduce (timed by a comm hook that all-reduces each bucket synchronously, so it does
not overlap the backward pass here) plus the optimizer's own collectives
(``optimizer.collectives``: agreement, EKFAC statistics, one per stage of DDPNOpt's feedback).

    python benchmarks/distributed.py [--steps 20] [--warmup 3] [--batch 128] [--quick]
                                     [--optimizers 'DDPNOpt-adam fb=on,Adam (torch)']

``--quick`` is a smoke test (DDPNOpt-adam only, batch 8, 1 warm-up and 2 timed steps).
On a 2-core machine the 2-process run has both cores; the 1-process run uses one.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nn_adapter import EKFAC, DDPNOpt  # noqa: E402
from nn_adapter.distributed import launch, shard  # noqa: E402
from nn_adapter.training import make_closure, paper_cnn  # noqa: E402
from occore.cli import OneLineParser  # noqa: E402

OPTIMIZERS = {
    "DDPNOpt-adam fb=on": lambda m: DDPNOpt(m, lr=1e-3, curvature="adam"),
    "DDPNOpt-ekfac fb=on": lambda m: DDPNOpt(m, lr=0.01, curvature="ekfac", eigen_update_freq=20),
    "EKFAC (ours)": lambda m: EKFAC(m, lr=0.01, eigen_update_freq=20),
    "Adam (torch)": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
}


class _Timer:
    """The state of :func:`_timed_all_reduce`: seconds and calls so far."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0


def _timed_all_reduce(state: _Timer, bucket):
    """A DDP comm hook that all-reduces each gradient bucket synchronously and times it."""
    buf = bucket.buffer()
    start = time.perf_counter()
    dist.all_reduce(buf)
    state.seconds += time.perf_counter() - start
    state.calls += 1
    buf.div_(dist.get_world_size())
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def _measure(name: str, batch: int, warmup: int, steps: int) -> dict:
    """On every rank: time ``steps`` steps of ``name`` after ``warmup`` (rank 0's figures)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(paper_cnn())
    hook = _Timer()
    model.register_comm_hook(hook, _timed_all_reduce)
    opt = OPTIMIZERS[name](model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(4)]
    own = getattr(opt, "collectives", None)

    def step(i):
        x, y = shard(*data[i % len(data)])
        opt.step(make_closure(model, opt, x, y))

    for i in range(warmup):
        step(i)
    dist.barrier()
    hook.seconds = hook.calls = 0
    base_s, base_c = (own.seconds, own.calls) if own is not None else (0.0, 0)
    times = []
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    dist.barrier()
    wall = time.perf_counter() - start
    own_s = own.seconds - base_s if own is not None else 0.0
    own_c = own.calls - base_c if own is not None else 0
    return {"samples_per_s": batch * steps / wall, "step_ms": 1e3 * statistics.median(times),
            "collective_ms": 1e3 * (hook.seconds + own_s) / steps,
            "ddp_calls": hook.calls / steps, "own_calls": own_c / steps}


def _all(names, batch, warmup, steps) -> dict:
    return {name: _measure(name, batch, warmup, steps) for name in names}


def run(names, batch: int, warmup: int, steps: int, procs=(1, 2)) -> dict:
    """``{procs: {name: figures}}`` (rank 0's figures of each launch)."""
    for n in procs:
        if batch % n:
            raise ValueError(f"batch_size: {batch} is not divisible by {n} processes")
    return {n: launch(_all, n, list(names), batch, warmup, steps)[0] for n in procs}


def table(results: dict, batch: int) -> str:
    procs = sorted(results)
    lines = [f"paper CNN, 28x28x1 inputs, global batch {batch}, float32, gloo, 1 thread per "
             "process",
             f"{'optimizer':22s} {'procs':>5s} {'batch/rank':>10s} {'samples/s':>10s} "
             f"{'step [ms]':>9s} {'speed-up':>8s} {'efficiency':>10s} {'collectives':>11s} "
             f"{'in them [ms]':>12s} {'share':>6s}"]
    for name in results[procs[0]]:
        base = results[procs[0]][name]["samples_per_s"]
        for n in procs:
            r = results[n][name]
            speed = r["samples_per_s"] / base
            calls = f"{r['ddp_calls']:.0f}+{r['own_calls']:.0f}" if n > 1 else "-"
            share = r["collective_ms"] / r["step_ms"] if r["step_ms"] else 0.0
            lines.append(f"{name if n == procs[0] else '':22s} {n:5d} {batch // n:10d} "
                         f"{r['samples_per_s']:10.1f} {r['step_ms']:9.1f} {speed:7.2f}x "
                         f"{100 * speed / n:9.0f}% {calls:>11s} {r['collective_ms']:12.2f} "
                         f"{100 * share:5.1f}%")
    lines.append("collectives: DDP gradient buckets + the optimizer's own (agreement, EKFAC "
                 "statistics, one per feedback stage); time: wall time inside them per step")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated, from: {', '.join(OPTIMIZERS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        p.error(f"unknown optimizer(s) {bad}; valid: {', '.join(OPTIMIZERS)}")
    if args.quick:
        names, args.batch, args.warmup, args.steps = names[:1], 8, 1, 2
    if min(args.steps, args.warmup + 1, args.batch) < 1:
        p.error("--steps and --batch must be >= 1, --warmup >= 0")
    print(table(run(names, args.batch, args.warmup, args.steps), args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
