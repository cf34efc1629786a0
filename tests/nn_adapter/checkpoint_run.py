"""A small training run with a checkpoint at the end of every epoch, for the kill-and-resume tests.

``python checkpoint_run.py FOLDER EPOCHS [--resume]`` trains (resuming from FOLDER's checkpoint
with ``--resume``) and writes the final parameters to ``FOLDER/final.npy``; :func:`train` is the
same in this process (and, data-parallel, on each rank of a process group: shards of each batch,
rank 0 writes the checkpoints).
"""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from nn_adapter.training import make_closure
from torch import nn

N, BATCH = 128, 16


def saved_epoch(path: pathlib.Path):
    """The epoch of the checkpoint file ``path``, or None while there is none (or it is being replaced)."""
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


def kill_after(command, env, checkpoint: pathlib.Path, epoch: int, poll: float = 0.002) -> int:
    """Start ``command``, SIGKILL it (a real kill, wherever it is) once ``checkpoint`` holds epoch
    >= ``epoch``; returns the epoch the checkpoint holds after the kill."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while (saved_epoch(checkpoint) or 0) < epoch:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(poll)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return saved_epoch(checkpoint)


def data():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(N, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (N,), generator=g))


def make_model(dropout: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 12), nn.Tanh()] + ([nn.Dropout(0.2)] if dropout else []) \
        + [nn.Linear(12, 4)]
    return nn.Sequential(*layers).double()


def train(folder, epochs: int, resume: bool = False, dropout: bool = True,
          curvature: str = "adam") -> np.ndarray:
    """Parameters after ``epochs`` epochs of DDPNOpt (feedback on), checkpointing each epoch."""
    from nn_adapter import DDPNOpt
    from nn_adapter.checkpoint import load_checkpoint, save_checkpoint
    from nn_adapter.distributed import shard

    torch.set_num_threads(1)
    x, y = data()
    net = make_model(dropout)
    model = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    opt = DDPNOpt(model.parameters(), model=model, lr=0.02, curvature=curvature,
                  terminal_hessian="sampled")
    order = torch.Generator().manual_seed(3)
    start = load_checkpoint(folder, model, opt, order).epoch if resume else 0
    for epoch in range(start + 1, epochs + 1):
        perm = torch.randperm(N, generator=order)
        for i in range(0, N, BATCH):
            xb, yb = shard(x[perm[i:i + BATCH]], y[perm[i:i + BATCH]])

            opt.step(make_closure(model, opt, xb, yb))
        save_checkpoint(folder, model, opt, epoch, order)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy().copy()


if __name__ == "__main__":
    folder, epochs = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    final = train(folder, epochs, resume="--resume" in sys.argv)
    np.save(folder / "final.npy", final)
