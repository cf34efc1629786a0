"""Memory of one optimisation step: what the step allocates at its peak, and what is held between steps.

The one definition used by ``occore train``'s table (:func:`nn_adapter.training.train_classifier`),
``benchmarks/nn_step.py`` and ``benchmarks/paper/runtime_memory.py``:

- :func:`step_peak_bytes` ``(fn, device) -> (result, bytes)``: the peak of the bytes torch's
  allocator holds during ``fn()`` above what it held just before. On CUDA from the allocator's
  statistics; on CPU from torch.profiler's memory events (numpy's own allocations are not seen).
  Exact and repeatable, unlike the process's resident set, which the allocator's reuse of freed
  memory keeps flat after the first step.
- :func:`resident_bytes` ``(model, optimizer) -> bytes``: the storages of the parameters, their
  gradients and the optimizer's state tensors, each storage counted once.

The peak memory of a step is their sum, measured with the resident bytes taken before the step.

Example::

    >>> import torch
    >>> from nn_adapter.memory import resident_bytes, step_peak_bytes
    >>> net = torch.nn.Linear(4, 2)
    >>> resident_bytes(net, None)       # 8 weights + 2 biases, float32, no gradients yet
    40
    >>> out, peak = step_peak_bytes(lambda: torch.zeros(1000), torch.device("cpu"))
    >>> peak >= 4000
    True
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from typing import Callable, Optional

import torch

__all__ = ["resident_bytes", "step_peak_bytes"]


def resident_bytes(model: torch.nn.Module, optimizer: Optional[object] = None) -> int:
    """Bytes of the storages of ``model``'s parameters and gradients and of the tensors in
    ``optimizer.state`` (a torch optimizer's per-parameter dicts; an object without ``state``,
    or None, adds nothing). A storage shared by several tensors is counted once."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    tensors = []
    for p in model.parameters():
        tensors.append(p)
        if p.grad is not None:
            tensors.append(p.grad)
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict):
        for entry in state.values():
            if isinstance(entry, dict):
                tensors += [v for v in entry.values() if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def step_peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple:
    """``(fn(), peak)``: ``peak`` is the most bytes torch's allocator held during ``fn()`` above
    what it held just before (>= 0; frees of blocks allocated before ``fn()`` are not counted). ``device``: where ``fn`` allocates (``cuda``: the allocator's statistics
    of that device; anything else: torch.profiler's CPU memory events)."""
    if not callable(fn):
        raise TypeError(f"fn: expected a callable fn() (the step), got {type(fn).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: expected a torch.device or a device name such as "
                         f"'cpu' or 'cuda:0' ({str(err).splitlines()[0][:120]})") from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(torch.cuda.max_memory_allocated(device) - before, 0)
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    # in the order recorded ("Ev Idx": timestamps tie), leaving out frees of blocks allocated
    # before fn() began (the profiler reports them when an earlier profiled step allocated the
    # block: counted, they made the same step's peak differ from run to run)
    memory = sorted((e for e in events if e.get("name") == "[memory]"),
                    key=lambda e: (e["args"].get("Ev Idx", 0), e["ts"]))
    live, running, peak = set(), 0, 0
    for e in memory:
        nbytes, addr = e["args"]["Bytes"], e["args"].get("Addr")
        if nbytes >= 0:
            live.add(addr)
        elif addr in live:
            live.discard(addr)
        else:
            continue
        running += nbytes
        peak = max(peak, running)
    return result, peak


#: what torch's profiler itself writes on the process's stderr (its start and stop markers, the
#: allocator's note about blocks allocated before it started): not the user's business
_CHATTER = re.compile(r"USDT:.*profiler_(start|stop)|Memory block of unknown size was allocated before the profiling")


@contextlib.contextmanager
def _without_profiler_chatter():
    """Hold what is written on file descriptor 2 inside the block and pass it on afterwards,
    less the profiler's own lines (they come from C++, below Python's ``sys.stderr``)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):     # sys.stderr replaced (captured): the
        fd = 2                                        # profiler still writes on descriptor 2
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):     # no such descriptor (closed)
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not _CHATTER.search(line)]
            if kept:
                os.write(fd, "".join(kept).encode())
