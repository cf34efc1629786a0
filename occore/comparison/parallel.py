"""Independent jobs in separate processes, results in order: ``occore compare --workers N``.

One implementation for occore's comparisons and nn_adapter's training runs
(:func:`nn_adapter.distributed.parallel_map` adds its torch thread setting).
"""
from __future__ import annotations

import multiprocessing
from typing import Callable, Sequence

from ..errors import InputError
from ..validation import is_integer

__all__ = ["parallel_map"]


def parallel_map(fn: Callable, items: Sequence, workers: int = 1, initializer: Callable = None,
                 initargs: tuple = ()) -> list:
    """``[fn(item) for item in items]`` in up to ``workers`` processes; the results in order.

    The processes are spawned (a fresh interpreter each, never a fork of this one), so a job that
    seeds itself gives what it gives serially. With ``workers=1`` (or one item) the jobs run here,
    one after another, and ``initializer`` is not called.

    Args:
        fn: a module-level function (it is pickled), items: its arguments (pickled).
        workers: processes at once, an int >= 1.
        initializer, initargs: run once in each process before its first job.

    Raises:
        InputError: ``workers`` is not an int >= 1.

    Example:
        >>> parallel_map(abs, [-1, 2, -3])
        [1, 2, 3]
    """
    if not (is_integer(workers) and workers >= 1):
        raise InputError(f"workers: expected an int >= 1, got {workers!r}")
    items = list(items)
    if workers == 1 or len(items) <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(items)),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=initializer, initargs=initargs) as pool:
        return list(pool.map(fn, items))
