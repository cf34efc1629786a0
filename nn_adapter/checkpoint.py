"""Training checkpoints that resume exactly: model, optimizer, epoch, data order, every RNG state.

:func:`save_checkpoint` writes, at the end of an epoch, one file ``checkpoint.pt`` in a folder:
the model's ``state_dict`` (the ``.module`` of a ``DistributedDataParallel``), the optimizer's
``state_dict``, the epoch, the state of the generator that draws the data order (and of the optimizer's own, DDPNOpt's
``generator``), the RNG states
of every rank (torch's CPU and CUDA generators, Python's ``random``, numpy's global generator),
the configuration of model and optimizer (to refuse a checkpoint of another one) and anything
the caller adds (``extra``: the history so far). Data-parallel, every rank calls it (the RNG
states are gathered) and rank 0 writes. The file is written to a temporary name in the same
folder, flushed to disk and renamed over the old one (``os.replace``, atomic), so a crash leaves
the previous checkpoint or the new one, never a partial file.

:func:`load_checkpoint` checks the file and the configuration before it changes anything, then
loads model and optimizer, sets the data-order generator and the RNG states of this rank, and
returns the epoch to continue after. Any number of ranks can resume a checkpoint: parameters and
optimizer state are the same on every rank; rank r takes the RNG states saved by rank r (a rank
the saving run did not have keeps its own, logged). Files are read with
``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers, strings and containers,
never code.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> order = torch.Generator().manual_seed(0)
    >>> folder = tempfile.mkdtemp()
    >>> path = save_checkpoint(folder, net, opt, epoch=1, data_order=order)
    >>> fresh = nn.Linear(3, 2)
    >>> state = load_checkpoint(folder, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    >>> state.epoch, torch.equal(fresh.weight, net.weight)
    (1, True)
"""
from __future__ import annotations

import io
import logging
import os
import pathlib
import pickle
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from occore.errors import InputError, OccoreError
from occore.validation import is_integer

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint",
           "checkpoint_path", "FILE_NAME"]

log = logging.getLogger("nn_adapter")

FILE_NAME = "checkpoint.pt"
FORMAT = 1
_IGNORED_HYPERPARAMETERS = ("params", "lr", "initial_lr")   # schedulers move lr; it is restored


class CheckpointError(OccoreError, ValueError):
    """A checkpoint that cannot be read or does not fit the model or optimizer.

    Attributes:
        path: the file (or folder) concerned; the message starts with it.

    Example:
        >>> str(CheckpointError("run/checkpoint.pt", "truncated"))
        'run/checkpoint.pt: truncated'
    """

    def __init__(self, path, detail: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {detail}")


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` read besides model and optimizer.

    Attributes:
        path: the file.
        epoch: the last completed epoch (continue with ``epoch + 1``).
        world_size: the number of ranks that saved it.
        extra: the caller's ``extra`` (None if none).
    """

    path: str
    epoch: int
    world_size: int
    extra: Any = None


def checkpoint_path(directory) -> pathlib.Path:
    """The checkpoint file of a folder (a path to a file is returned as it is)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a folder (str or path), got {type(directory).__name__}")
    p = pathlib.Path(directory)
    return p if p.suffix == ".pt" and not p.is_dir() else p / FILE_NAME


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _configuration(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What must match for a checkpoint to fit: the model's state entries (shape, dtype), the
    optimizer's class and options, and each param group's size and hyperparameters (not lr)."""
    state = _unwrap(model).state_dict()
    own = getattr(optimizer, "configuration", None)
    groups = [{"params": [list(p.shape) for p in g["params"]],
               **{k: v for k, v in g.items() if k not in _IGNORED_HYPERPARAMETERS}}
              for g in optimizer.param_groups]
    return {"model": {k: [list(v.shape), str(v.dtype)] for k, v in state.items()},
            "optimizer": {"class": type(optimizer).__name__,
                          "options": own() if callable(own) else {}, "groups": groups}}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _optimizer_generator(optimizer, method: str, *args):
    """Get or set the state of an optimizer's own generator (``optimizer.generator``, as
    DDPNOpt's sampled terminal Hessian has), if it has one."""
    gen = getattr(optimizer, "generator", None)
    if isinstance(gen, torch.Generator):
        return getattr(gen, method)(*args)
    return None


def _group(group):
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def _check_objects(model, optimizer, data_order) -> None:
    """TypeError naming the argument unless ``model`` is a module, ``optimizer`` a torch optimizer
    and ``data_order`` a generator or None; InputError naming ``optimizer`` when it optimizes a
    tensor that is not a parameter of ``model`` (both :func:`save_checkpoint` and
    :func:`load_checkpoint`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    _check_ownership(model, optimizer)
    if data_order is not None and not isinstance(data_order, torch.Generator):
        raise TypeError(f"data_order: expected a torch.Generator or None, got "
                        f"{type(data_order).__name__}")


def _check_ownership(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every tensor the optimizer updates must be a parameter of the model (the same tensor, not
    one of the same shape): an optimizer built over another model's parameters would load or save
    a state that training then applies to tensors the model does not have. A subset of the
    model's parameters is fine (frozen layers)."""
    own = {id(p) for p in _unwrap(model).parameters()}
    foreign = [(i, j, p) for i, g in enumerate(optimizer.param_groups)
               for j, p in enumerate(g["params"]) if id(p) not in own]
    if foreign:
        total = sum(len(g["params"]) for g in optimizer.param_groups)
        i, j, p = foreign[0]
        raise InputError(f"optimizer: its parameters are not the model's: {len(foreign)} of the "
                         f"{total} tensors it updates are not parameters of model (the first: "
                         f"param_groups[{i}]['params'][{j}], shape {tuple(p.shape)}); build the "
                         f"optimizer over this model's parameters (a subset of them is fine)")


def save_checkpoint(directory, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    data_order: Optional[torch.Generator] = None, extra: Any = None,
                    group=None) -> pathlib.Path:
    """Write the checkpoint of the end of ``epoch`` (see the module docstring).

    Data-parallel (``torch.distributed`` initialised), every rank of ``group`` must call it: the
    RNG states are gathered to rank 0, which writes, and a barrier returns when the file is in
    place.

    Args:
        directory: the folder (created if missing); the file is ``directory/checkpoint.pt``.
        model: the model (or its ``DistributedDataParallel``).
        optimizer: any torch optimizer.
        epoch: the epoch just completed (an int >= 0).
        data_order: the generator that draws the data order (its state is saved), or None.
        extra: tensors, numbers, strings and containers of them to keep (a history).
        group: the process group (None: the default one).

    Returns:
        the path of the file.

    Raises:
        TypeError: a model, optimizer or generator of the wrong type, or an ``extra`` that
            :func:`load_checkpoint` could not read back (a numpy array, an arbitrary object);
            nothing is written. ValueError: a bad epoch. InputError (a ValueError) naming
            ``optimizer``: it updates tensors that are not parameters of ``model`` (a checkpoint
            that could not be resumed); nothing is written. CheckpointError: ``directory`` (or a
            folder above it) is a file.
    """
    _check_objects(model, optimizer, data_order)
    if not (is_integer(epoch) and epoch >= 0):
        raise InputError(f"epoch: expected an int >= 0, got {epoch!r}")
    _check_extra_loads(extra)
    path = checkpoint_path(directory)
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise CheckpointError(directory, "is not a folder (a file is in its place); give the "
                              f"checkpoint's folder or a file name ending in .pt")
    group, world, rank = _group(group)
    rng = _rng_state()
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(rng, gathered, dst=0, group=group)
        rng_all = gathered
    else:
        rng_all = [rng]
    if rank == 0:
        content = {"format": FORMAT, "epoch": epoch, "world_size": world,
                   "configuration": _configuration(model, optimizer),
                   "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                   "data_order": data_order.get_state() if data_order is not None else None,
                   "optimizer_generator": _optimizer_generator(optimizer, "get_state"),
                   "rng": rng_all, "extra": extra}
        _write_atomically(path, content)
        log.info("checkpoint of epoch %d written to %s", epoch, path)
    if world > 1:
        dist.barrier(group=group)
    return path


def _check_extra_loads(extra) -> None:
    """Refuse an ``extra`` that :func:`load_checkpoint` could not read back (``torch.load`` with
    ``weights_only=True``: a numpy array, an arbitrary object, a function)."""
    buffer = io.BytesIO()
    try:
        torch.save(extra, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except (pickle.PickleError, TypeError, AttributeError) as err:   # (local objects: AttributeError)
        found = re.search(r"GLOBAL ([\w.]+)", str(err))     # what torch's unpickler refuses
        detail = (f"it holds a {found.group(1)}" if found else
                  f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        raise TypeError(f"extra: expected tensors, numbers, strings and lists, tuples or dicts of "
                        f"them (what a checkpoint can load back), got a value of type "
                        f"{type(extra).__name__} that would not load back ({detail})") from None


def _write_atomically(path: pathlib.Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(content, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:                                   # the rename itself on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise CheckpointError(path, "no checkpoint here (the file does not exist)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:      # truncated zip, bad pickle, not a torch file at all
        raise CheckpointError(path, f"not a readable checkpoint (corrupted or truncated): "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
    keys = {"format", "epoch", "world_size", "configuration", "model", "optimizer", "data_order",
            "optimizer_generator", "rng", "extra"}
    if not isinstance(content, dict) or not keys <= set(content):
        raise CheckpointError(path, "not a checkpoint of nn_adapter.checkpoint.save_checkpoint "
                              "(entries missing)")
    if content["format"] != FORMAT:
        raise CheckpointError(path, f"checkpoint format {content['format']!r}, this version "
                              f"reads format {FORMAT}")
    return content


def _differences(saved: dict, now: dict, where: str = "") -> list:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in list(dict.fromkeys(list(saved) + list(now))):
            name = f"{where}.{k}" if where else str(k)
            if k not in saved:
                out.append(f"{name} is new")
            elif k not in now:
                out.append(f"{name} is missing")
            else:
                out += _differences(saved[k], now[k], name)
        return out
    if isinstance(saved, (list, tuple)) and isinstance(now, (list, tuple)):
        if len(saved) != len(now):
            return [f"{where}: {len(saved)} entries saved, {len(now)} now"]
        return [d for i, (a, b) in enumerate(zip(saved, now))
                for d in _differences(a, b, f"{where}[{i}]")]
    return [] if saved == now else [f"{where}: saved {saved!r}, now {now!r}"]


def load_checkpoint(directory, model: nn.Module, optimizer: torch.optim.Optimizer,
                    data_order: Optional[torch.Generator] = None, group=None,
                    check_extra=None) -> Checkpoint:
    """Resume from the checkpoint in ``directory`` (a folder or the file itself).

    Everything is checked before anything is changed: a missing, corrupted or truncated file, or
    a checkpoint of another model (state entries, shapes, dtypes) or optimizer (class, options,
    param groups and their hyperparameters other than ``lr``) raises :class:`CheckpointError`
    naming the file and what differs, and leaves model, optimizer and generators as they were.

    Args:
        directory: the folder of :func:`save_checkpoint` (or the file).
        model, optimizer: built as for the saved run (any number of ranks).
        data_order: the generator of the data order: its state is set (None: not restored).
        group: the process group (None: the default one).
        check_extra: None, or ``check_extra(path, extra)`` called with the saved ``extra`` before
            anything else is compared (it raises :class:`CheckpointError` for a checkpoint of
            other settings, which then names those rather than the model's shapes they imply).

    Returns:
        a :class:`Checkpoint` (the epoch completed, the saving world size, ``extra``).

    Raises:
        TypeError: a model, optimizer, generator or ``check_extra`` of the wrong type.
        InputError (a ValueError) naming ``optimizer``: it updates tensors that are not
            parameters of ``model`` (built over another model of the same shapes); nothing is read.
        CheckpointError: see above.
    """
    _check_objects(model, optimizer, data_order)
    if check_extra is not None and not callable(check_extra):
        raise TypeError(f"check_extra: expected None or a callable check_extra(path, extra), got "
                        f"{type(check_extra).__name__}")
    path = checkpoint_path(directory)
    content = _read(path)
    if check_extra is not None:
        check_extra(path, content["extra"])
    diff = _differences(content["configuration"], _configuration(model, optimizer))
    if diff:
        raise CheckpointError(path, "saved for another model or optimizer configuration: "
                              + "; ".join(diff[:5]) + (" ..." if len(diff) > 5 else ""))
    if data_order is not None and content["data_order"] is None:
        raise CheckpointError(path, "has no data order saved (save_checkpoint without "
                              "data_order), but data_order was given")
    try:                   # (torch checks the groups before it changes the optimizer)
        optimizer.load_state_dict(content["optimizer"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(path, f"the optimizer state does not load: {err}") from None
    _unwrap(model).load_state_dict(content["model"])     # entries and shapes checked above
    if data_order is not None:
        data_order.set_state(content["data_order"])
    if content["optimizer_generator"] is not None:
        _optimizer_generator(optimizer, "set_state", content["optimizer_generator"])
    _, world, rank = _group(group)
    rng = content["rng"]
    if rank < len(rng):
        _set_rng_state(rng[rank])
    else:
        log.warning("%s: saved by %d ranks; rank %d keeps its own RNG states", path, len(rng),
                    rank)
    if world != content["world_size"]:
        log.info("%s: saved by %d ranks, resumed on %d", path, content["world_size"], world)
    return Checkpoint(str(path), int(content["epoch"]), int(content["world_size"]),
                      content["extra"])
