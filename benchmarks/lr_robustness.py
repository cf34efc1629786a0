"""Learning-rate robustness of DDPNOpt beside its base optimizers (DDPNOpt paper, Fig. 4).

For every base optimizer and its DDPNOpt variant with identical hyperparameters (same learning
rate, same initial weights, same minibatch order per seed), over a grid of learning rates and
several seeds, on several data sets:

    sgd-m    torch.optim.SGD(momentum=0.9)  vs  DDPNOpt(curvature="identity", momentum=0.9)
    rmsprop  torch.optim.RMSprop            vs  DDPNOpt(curvature="rmsprop")
    adam     torch.optim.Adam               vs  DDPNOpt(curvature="adam")
    ekfac    nn_adapter.EKFAC               vs  DDPNOpt(curvature="ekfac")

Data sets and networks (the paper's setup): DIGITS (5 x Linear width 32, Tanh, batch 32,
20 epochs), WINE (5 x Linear width 10, Tanh, batch 8, 40 epochs) and a subsample of
Fashion-MNIST (the paper's CNN, batch 128, 3 epochs; skipped with a note when its IDX files are
not installed). Learning rates: each base's reference rate times (0.1, 0.3, 1, 3, 10).

It reports the final training loss, the test accuracy and the number of diverged seeds per cell
and writes ``lr_robustness.md``, ``lr_robustness.png`` (heat maps) and ``lr_robustness.json``
(every run) to ``--out`` (default ``docs/results``).

    python benchmarks/lr_robustness.py --quick --out /tmp/lrr          # < 1 minute
    python benchmarks/lr_robustness.py --datasets digits,wine --workers 2
    python benchmarks/lr_robustness.py --ddpnopt-option eps_vxx=0.1 --base-option weight_decay=1e-4

A run *diverged* when a training loss is not finite (the run stops there), a parameter is not
finite after a step (it stops there too), the step raised an exception, or its final training
loss (mean minibatch loss of the last epoch) exceeds the loss of the initial model on the whole
training set.

Five seeds cannot tell a small systematic effect from chaos where training is unstable (at the
largest rates a perturbation the size of rounding error changes which seeds end below their
initial loss). So every cell the five seeds flag (DDPNOpt worse by more than one std, or diverged
in more seeds than its base) is re-measured with ``--confirm-seeds`` seeds (default 20; the first
five are reused) and reported in its own table beside the five-seed verdict, which stays as it was.
``--from-json FILE`` takes the grid's runs from an earlier report's JSON (same code) and runs only
that confirmation.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nn_adapter import EKFAC, DDPNOpt  # noqa: E402
from nn_adapter import data as nn_data  # noqa: E402
from nn_adapter.training import make_closure, mlp, paper_cnn  # noqa: E402
from occore.cli import OneLineParser  # noqa: E402
from occore.output_paths import output_file_problem, output_folder_problem  # noqa: E402

__all__ = ["BASES", "REFERENCE_LR", "LR_FACTORS", "DATASETS", "run_grid", "train_run",
           "divergence_reason", "summarise", "write_report", "build_parser", "main"]

# -- the grid ------------------------------------------------------------------------------------
#: base name -> (DDPNOpt curvature, hyperparameters shared by both members of the pair)
BASES = {
    "sgd-m": ("identity", {"momentum": 0.9}),
    "rmsprop": ("rmsprop", {}),
    "adam": ("adam", {}),
    "ekfac": ("ekfac", {}),
}
REFERENCE_LR = {"sgd-m": 0.05, "rmsprop": 1e-3, "adam": 3e-3, "ekfac": 3e-3}
LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
QUICK_LR_FACTORS = (0.3, 1.0, 3.0)
VARIANTS = ("base", "ddpnopt")
CONFIRM_SEEDS = 20
DEFAULT_OUT = ROOT / "docs" / "results"
FMNIST_TRAIN, FMNIST_TEST = 2048, 1024


@dataclass(frozen=True)
class DatasetSpec:
    """One data set of the grid: its network, batch size and number of epochs."""

    name: str
    network: str
    batch: int
    epochs: int
    quick_epochs: int


DATASETS = {
    "digits": DatasetSpec("digits", "FCN 64-32-32-32-32-10 (5 x Linear, Tanh)", 32, 20, 2),
    "wine": DatasetSpec("wine", "FCN 13-10-10-10-10-3 (5 x Linear, Tanh)", 8, 40, 5),
    "fmnist": DatasetSpec("fmnist", "CNN 4 x Conv2d(3x3, 32) ReLU, 2x2 max-pool after the 2nd and "
                          "4th, Linear(32*7*7, 128), ReLU, Linear(128, 10)", 128, 3, 1),
}
DEFAULT_DATASETS = ("digits", "wine", "fmnist")
QUICK_DATASETS = ("digits", "wine")


def build_model(dataset: str) -> nn.Module:
    if dataset == "digits":
        return mlp(64, 10, width=32, depth=5, activation=nn.Tanh)
    if dataset == "wine":
        return mlp(13, 3, width=10, depth=5, activation=nn.Tanh)
    if dataset == "fmnist":
        return paper_cnn()
    raise ValueError(f"unknown dataset {dataset!r}")


def _standardise(split: nn_data.Split) -> nn_data.Split:
    """Features standardised with the training split's statistics (constant features: std 1)."""
    x_tr, x_te = split.x_train.double(), split.x_test.double()
    mean, std = x_tr.mean(0), x_tr.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    dt = split.x_train.dtype
    return nn_data.Split(((x_tr - mean) / std).to(dt), split.y_train,
                         ((x_te - mean) / std).to(dt), split.y_test)


def load_dataset(name: str, dtype: torch.dtype, fmnist_train: int = FMNIST_TRAIN,
                 fmnist_test: int = FMNIST_TEST, fmnist_root: Optional[str] = None):
    """``(Split or None, note)``; the note says what was loaded (or why nothing was)."""
    if name == "digits":
        s = _standardise(nn_data.load_digits(dtype=dtype))
        note = (f"DIGITS (scikit-learn): {len(s.x_train)} train / {len(s.x_test)} test samples, "
                "pixels scaled to [0, 1] by the loader, then standardised here with the training "
                "split's mean and std (constant pixels left at 0)")
        return s, note
    if name == "wine":
        s = nn_data.load_wine(dtype=dtype)
        return s, (f"WINE (scikit-learn): {len(s.x_train)} train / {len(s.x_test)} test samples, "
                   "features standardised by the loader with the training split's statistics")
    if name == "fmnist":
        root = Path(fmnist_root) if fmnist_root else nn_data.FASHION_MNIST_DIR
        try:
            s = nn_data.load_fashion_mnist(root, dtype=dtype, limit=max(fmnist_train, fmnist_test))
        except (OSError, ValueError) as err:   # occore.InputError is a ValueError
            msg = " ".join(str(err).split())
            return None, f"Fashion-MNIST SKIPPED: cannot read its IDX files in {root} ({msg})"
        s = nn_data.Split(s.x_train[:fmnist_train], s.y_train[:fmnist_train],
                          s.x_test[:fmnist_test], s.y_test[:fmnist_test])
        return s, (f"Fashion-MNIST ({root}): SUBSAMPLED to the first {len(s.x_train)} training "
                   f"and the first {len(s.x_test)} test images (of 60000 / 10000), pixels "
                   "scaled to [0, 1]")
    raise ValueError(f"unknown dataset {name!r}")


# -- one run -------------------------------------------------------------------------------------
def make_optimizer(base: str, variant: str, model: nn.Module, lr: float,
                   base_opts: Optional[dict] = None, ddp_opts: Optional[dict] = None):
    """The base optimizer of ``base`` or (``variant="ddpnopt"``) its DDPNOpt variant.

    ``base_opts`` go to both (torch names), ``ddp_opts`` to DDPNOpt only."""
    curvature, pair = BASES[base]
    shared = dict(pair, **(base_opts or {}))
    if variant == "ddpnopt":
        return DDPNOpt(model, lr=lr, curvature=curvature, **dict(shared, **(ddp_opts or {})))
    if base == "sgd-m":
        return torch.optim.SGD(model.parameters(), lr=lr, **shared)
    if base == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr, **shared)
    if base == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, **shared)
    if base == "ekfac":
        return EKFAC(model, lr=lr, **shared)
    raise ValueError(f"unknown base {base!r}")


def divergence_reason(final_loss: Optional[float], initial_loss: float,
                      stopped: Optional[str] = None) -> Optional[str]:
    """Why a run counts as diverged, or None when it did not.

    Args:
        final_loss: mean minibatch loss of the last epoch (None / NaN when the run stopped).
        initial_loss: loss of the initial model on the whole training set.
        stopped: the reason the run was stopped early (non-finite loss or parameter, exception).

    Example:
        >>> divergence_reason(float("nan"), 2.3)
        'non-finite final training loss'
        >>> divergence_reason(0.1, 2.3) is None
        True
    """
    if stopped:
        return stopped
    if final_loss is None or not math.isfinite(final_loss):
        return "non-finite final training loss"
    if final_loss > initial_loss:
        return f"final training loss {final_loss:.4g} > initial loss {initial_loss:.4g}"
    return None


def _full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    with torch.no_grad():
        total = 0.0
        for i in range(0, len(x), chunk):
            total += float(nn.functional.cross_entropy(model(x[i:i + chunk]), y[i:i + chunk],
                                                       reduction="sum"))
    return total / len(x)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    with torch.no_grad():
        correct = 0
        for i in range(0, len(x), chunk):
            correct += int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum())
    return correct / len(x)


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


def train_run(model: nn.Module, opt, data: nn_data.Split, epochs: int, batch: int,
              seed: int) -> dict:
    """Train ``model`` in place with minibatches drawn by ``torch.Generator().manual_seed(seed)``
    (the last partial batch dropped); every step is ``opt.step(make_closure(...))``.

    Returns a record: initial_loss, final_train_loss (None unless finite), train_loss_curve (one
    mean per completed epoch), test_accuracy, diverged, diverged_reason, steps, refused_steps,
    other_warnings, error, wall_s.
    """
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    initial = _full_loss(model, data.x_train, data.y_train)
    gen = torch.Generator().manual_seed(seed)
    n, device = len(data.x_train), data.x_train.device
    curve, steps, refused, other, stopped, error, last = [], 0, 0, [], None, None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for epoch in range(epochs):
                order = torch.randperm(n, generator=gen).to(device)
                total, count = 0.0, 0
                for i in range(0, n - batch + 1, batch):
                    idx = order[i:i + batch]
                    loss = opt.step(make_closure(model, opt, data.x_train[idx], data.y_train[idx]))
                    loss = float(loss.detach() if torch.is_tensor(loss) else loss)
                    steps += 1
                    for w in caught:
                        if "step refused" in str(w.message):
                            refused += 1
                        elif len(other) < 3 and str(w.message) not in other:
                            other.append(str(w.message))
                    caught.clear()
                    if not math.isfinite(loss):
                        stopped = f"non-finite loss at epoch {epoch + 1}, step {steps}"
                        break
                    if not all(bool(torch.isfinite(p).all()) for p in params):
                        stopped = f"non-finite parameter after step {steps} (epoch {epoch + 1})"
                        break
                    total, count = total + loss, count + 1
                if stopped:
                    break
                last = total / max(count, 1)
                curve.append(last)
        except Exception as err:  # noqa: BLE001 -- a failing optimizer is a result, not a crash
            error = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
            stopped = f"exception: {error}"
    final = last if stopped is None else None
    acc = _accuracy(model, data.x_test, data.y_test) if error is None else None
    reason = divergence_reason(final, initial, stopped)
    return {"initial_loss": initial, "final_train_loss": final if _finite(final) else None,
            "train_loss_curve": [c if math.isfinite(c) else None for c in curve],
            "test_accuracy": acc, "diverged": reason is not None, "diverged_reason": reason,
            "steps": steps, "refused_steps": refused, "other_warnings": other, "error": error,
            "wall_s": time.perf_counter() - start}


# -- the grid, in a pool -------------------------------------------------------------------------
_CTX: dict = {}


@contextlib.contextmanager
def _quiet_process():
    """One torch thread; DDPNOpt's logged warnings silenced (they are counted per run)."""
    lg = logging.getLogger("nn_adapter")
    level, threads = lg.level, torch.get_num_threads()
    lg.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        lg.setLevel(level)
        torch.set_num_threads(threads)


def _init_worker(ctx: dict) -> None:
    torch.set_num_threads(1)
    logging.getLogger("nn_adapter").setLevel(logging.ERROR)
    device = ctx["device"]
    data = {k: nn_data.Split(*(t.to(device) for t in (s.x_train, s.y_train, s.x_test, s.y_test)))
            for k, s in ctx["data"].items()}
    _CTX.clear()
    _CTX.update(ctx, data=data)


def _run_task(task: dict) -> list:
    """Both members of one pair for one (dataset, base, lr, seed): same start, same batches."""
    ds, base, lr, seed = task["dataset"], task["base"], task["lr"], task["seed"]
    data, device, dtype = _CTX["data"][ds], _CTX["device"], _CTX["dtype"]
    torch.manual_seed(seed)
    init = build_model(ds).to(device=device, dtype=dtype)
    out = []
    for variant in VARIANTS:
        model = copy.deepcopy(init)
        rec = dict(task, variant=variant)
        try:
            opt = make_optimizer(base, variant, model, lr, _CTX["base_opts"].get(base, {}),
                                 _CTX["ddp_opts"].get(base, {}))
        except Exception as err:  # noqa: BLE001
            msg = f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
            rec.update(initial_loss=None, final_train_loss=None, train_loss_curve=[],
                       test_accuracy=None, diverged=True, diverged_reason=f"exception: {msg}",
                       steps=0, refused_steps=0, other_warnings=[], error=msg, wall_s=0.0)
        else:
            rec.update(train_run(model, opt, data, task["epochs"], task["batch"], seed))
        out.append(rec)
    return out


def _split_opts(opts: Optional[dict], bases) -> dict:
    """``{key: v, "ekfac:key": v}`` -> ``{base: {key: v}}`` (a prefix limits it to one base)."""
    per = {b: {} for b in bases}
    for key, value in (opts or {}).items():
        if ":" in key:
            b, k = key.split(":", 1)
            if b in per:
                per[b][k] = value
        else:
            for b in per:
                per[b].setdefault(key, value)   # a prefixed option wins over a global one
    return per


def _mean_std(values) -> tuple:
    v = [x for x in values if _finite(x)]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0), len(v)


def summarise(records: list, seeds: int) -> list:
    """One row per (dataset, base, lr factor): means/stds over non-diverged seeds and a verdict.

    Verdict: ``worse`` when DDPNOpt's mean final loss exceeds the base's by more than one
    standard deviation of the base (sample std; 0 with one seed), ``better`` symmetrically,
    ``same`` otherwise; needs a non-diverged seed on both sides. ``more_divergent`` flags a cell
    where DDPNOpt diverged in more seeds than its base.
    """
    cells: dict = {}
    for r in records:
        cells.setdefault((r["dataset"], r["base"], r["lr_factor"]), []).append(r)
    rows = []
    for (ds, base, factor), recs in cells.items():
        row = {"dataset": ds, "base": base, "lr_factor": factor, "lr": recs[0]["lr"],
               "seeds": seeds, "stats": {}}
        for v in VARIANTS:
            rs = [r for r in recs if r["variant"] == v]
            ok = [r for r in rs if not r["diverged"]]
            row["stats"][v] = {
                "loss": _mean_std([r["final_train_loss"] for r in ok]),
                "acc": _mean_std([r["test_accuracy"] for r in ok]),
                "diverged": sum(r["diverged"] for r in rs),
                "errors": sum(r["error"] is not None for r in rs),
                "runs": len(rs),
                "refused": sum(r["refused_steps"] for r in rs),
            }
        (mb, sb, nb), (md, _, nd) = row["stats"]["base"]["loss"], row["stats"]["ddpnopt"]["loss"]
        if nb and nd:
            row["delta"] = md - mb
            row["verdict"] = ("worse" if md > mb + sb else "better" if md < mb - sb else "same")
        else:
            row["delta"] = None
            row["verdict"] = ("both diverged" if not nb and not nd else
                              "better (base diverged)" if nd else "worse (DDPNOpt diverged)")
        row["more_divergent"] = row["stats"]["ddpnopt"]["diverged"] > row["stats"]["base"]["diverged"]
        rows.append(row)
    return rows


def _sort_key(order_ds, order_b):
    return lambda r: (order_ds.index(r["dataset"]), order_b.index(r["base"]), r["lr_factor"],
                      r.get("seed", 0), VARIANTS.index(r.get("variant", "base")))


def run_grid(datasets=DEFAULT_DATASETS, bases=tuple(BASES), lr_factors=LR_FACTORS, seeds: int = 5,
             *, workers: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu",
             ddp_opts: Optional[dict] = None, base_opts: Optional[dict] = None,
             quick: bool = False, epochs: Optional[int] = None, fmnist_train: int = FMNIST_TRAIN,
             fmnist_test: int = FMNIST_TEST, fmnist_root: Optional[str] = None,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the grid; every run of every cell, in a deterministic order whatever ``workers``.

    Args:
        datasets, bases, lr_factors: the grid (names from ``DATASETS`` / ``BASES``).
        seeds: seeds 0..seeds-1 (initial weights and minibatch order).
        workers: processes (``multiprocessing``; one torch thread each); 1 runs in this process.
        ddp_opts, base_opts: extra DDPNOpt options / hyperparameters shared by both members of a
            pair; a key ``"base:name"`` applies to that base only.
        quick: each data set's ``quick_epochs`` instead of its ``epochs``; ``epochs`` overrides
            both.
        progress: called with one line per finished (dataset, base, lr) cell (default: stderr).

    Returns:
        ``{"records": [...], "rows": summarise(...), "notes": {dataset: note},
        "skipped": [dataset, ...], "settings": {...}, "wall_s": seconds}``.
    """
    if progress is None:
        def progress(line):
            print(line, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    code = _git_state()      # the code that runs, read before any run
    datasets, bases, lr_factors = list(datasets), list(bases), [float(f) for f in lr_factors]
    loaded, notes, skipped = {}, {}, []
    for ds in datasets:
        split, note = load_dataset(ds, dtype, fmnist_train, fmnist_test, fmnist_root)
        notes[ds] = note
        if split is None:
            skipped.append(ds)
            progress(f"[lr_robustness] {note}")
        else:
            loaded[ds] = split
    settings = {}
    tasks = []
    for ds in datasets:
        if ds not in loaded:
            continue
        spec = DATASETS[ds]
        ep = epochs if epochs is not None else (spec.quick_epochs if quick else spec.epochs)
        n = len(loaded[ds].x_train)
        settings[ds] = {"network": spec.network, "batch": spec.batch, "epochs": ep,
                        "n_train": n, "n_test": len(loaded[ds].x_test),
                        "steps_per_epoch": n // spec.batch}
        for base in bases:
            for f in lr_factors:
                for s in range(seeds):
                    tasks.append({"dataset": ds, "base": base, "lr_factor": f,
                                  "lr": REFERENCE_LR[base] * f, "seed": s, "epochs": ep,
                                  "batch": spec.batch})
    ctx = {"data": loaded, "device": device, "dtype": dtype,
           "ddp_opts": _split_opts(ddp_opts, bases), "base_opts": _split_opts(base_opts, bases)}
    records, done, n_cells = [], {}, len(tasks) // max(seeds, 1)
    finished = 0

    def collect(recs):
        nonlocal finished
        records.extend(recs)
        key = (recs[0]["dataset"], recs[0]["base"], recs[0]["lr_factor"])
        done.setdefault(key, []).extend(recs)
        if len(done[key]) == 2 * seeds:
            finished += 1
            row = summarise(done[key], seeds)[0]
            parts = []
            for v in VARIANTS:
                m = row["stats"][v]["loss"][0]
                parts.append(f"{v} loss {'—' if m is None else f'{m:.4f}'} "
                             f"div {row['stats'][v]['diverged']}/{seeds}")
            progress(f"[{finished}/{n_cells}] {key[0]} {key[1]} lr={row['lr']:.3g} "
                     f"(x{key[2]:g}): {' | '.join(parts)} -> {row['verdict']} "
                     f"({time.perf_counter() - t0:.0f} s)")

    _execute(tasks, ctx, workers, collect)
    records.sort(key=_sort_key(datasets, bases))
    rows = summarise(records, seeds)
    rows.sort(key=_sort_key(datasets, bases))
    return {"records": records, "rows": rows, "notes": notes, "skipped": skipped,
            "settings": settings, "datasets": [d for d in datasets if d in loaded],
            "bases": bases, "lr_factors": lr_factors, "seeds": seeds, "workers": workers,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "ddp_opts": dict(ddp_opts or {}), "base_opts": dict(base_opts or {}),
            "fmnist": [fmnist_train, fmnist_test], "fmnist_root": fmnist_root, "code": code,
            "confirm_seeds": 0, "confirmed": [],
            "wall_s": time.perf_counter() - t0}


def _execute(tasks: list, ctx: dict, workers: int, collect: Callable[[list], None]) -> None:
    """Run ``tasks`` (:func:`_run_task`) here or in a pool, ``collect`` each one's records."""
    with _quiet_process():
        if workers <= 1 or len(tasks) <= 1:
            saved = dict(_CTX)
            try:
                _init_worker(ctx)
                for task in tasks:
                    collect(_run_task(task))
            finally:
                _CTX.clear()
                _CTX.update(saved)
        else:
            method = "spawn" if str(ctx["device"]).startswith("cuda") else (
                "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            mp = multiprocessing.get_context(method)
            with mp.Pool(min(workers, len(tasks)), initializer=_init_worker,
                         initargs=(ctx,)) as pool:
                for recs in pool.imap_unordered(_run_task, tasks, chunksize=1):
                    collect(recs)


def flagged(row: dict) -> bool:
    """Whether a five-seed cell fails the issue's bar: DDPNOpt diverged in more seeds than its
    base, or its mean final loss is worse than the base's by more than one std."""
    return row["more_divergent"] or row["verdict"].startswith("worse")


def confirm(result: dict, confirm_seeds: int, *, workers: int = 1, datasets=None,
            progress: Optional[Callable[[str], None]] = None) -> dict:
    """Re-measure every :func:`flagged` cell of ``result`` (of ``datasets``; default all) with
    seeds 0..confirm_seeds-1 (the grid's own seeds reused, the others run now, same settings);
    adds the new runs to ``result["records"]`` (``"stage": "confirm"``) and their summaries to
    ``result["confirmed"]``. Returns ``result``."""
    if progress is None:
        def progress(line):
            print(line, file=sys.stderr, flush=True)
    seeds = result["seeds"]
    cells = [r for r in result["rows"]
             if flagged(r) and (datasets is None or r["dataset"] in datasets)]
    result["confirm_seeds"] = confirm_seeds
    result["confirm_datasets"] = sorted({r["dataset"] for r in cells})
    if confirm_seeds <= seeds or not cells:
        result["confirmed"] = []
        return result
    t0 = time.perf_counter()
    dtype = getattr(torch, result["dtype"])
    fm_train, fm_test = result.get("fmnist", [FMNIST_TRAIN, FMNIST_TEST])
    loaded = {ds: load_dataset(ds, dtype, fm_train, fm_test, result.get("fmnist_root"))[0]
              for ds in {r["dataset"] for r in cells}}
    bases = result["bases"]
    ctx = {"data": loaded, "device": result["device"], "dtype": dtype,
           "ddp_opts": _split_opts(result["ddp_opts"], bases),
           "base_opts": _split_opts(result["base_opts"], bases)}
    tasks = []
    for r in cells:
        st = result["settings"][r["dataset"]]
        tasks += [{"dataset": r["dataset"], "base": r["base"], "lr_factor": r["lr_factor"],
                   "lr": r["lr"], "seed": s, "epochs": st["epochs"], "batch": st["batch"],
                   "stage": "confirm"} for s in range(seeds, confirm_seeds)]
    new: list = []

    def collect(recs):
        new.extend(recs)
        progress(f"[confirm {len(new) // 2}/{len(tasks)}] {recs[0]['dataset']} {recs[0]['base']} "
                 f"x{recs[0]['lr_factor']:g} seed {recs[0]['seed']} "
                 f"({time.perf_counter() - t0:.0f} s)")

    _execute(tasks, ctx, workers, collect)
    order = _sort_key(result["datasets"], bases)
    result["records"] = sorted(result["records"] + new, key=order)
    keys = {(r["dataset"], r["base"], r["lr_factor"]) for r in cells}
    recs = [r for r in result["records"] if (r["dataset"], r["base"], r["lr_factor"]) in keys
            and r["seed"] < confirm_seeds]
    result["confirmed"] = sorted(summarise(recs, confirm_seeds), key=order)
    result["wall_s"] += time.perf_counter() - t0
    return result


def load_result(path) -> dict:
    """The grid of an earlier report's JSON (:func:`write_report`), its rows summarised again;
    runs of an earlier confirmation are dropped (:func:`confirm` runs them again)."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    grid = [r for r in payload["records"] if r.get("stage") != "confirm"]
    result = {k: v for k, v in payload.items()
              if k not in ("cells", "confirmed_cells", "summary", "records")}
    order = _sort_key(result["datasets"], result["bases"])
    result.update(records=sorted(grid, key=order), confirmed=[], confirm_seeds=0,
                  rows=sorted(summarise(grid, int(result["seeds"])), key=order))
    return result


# -- the report ----------------------------------------------------------------------------------
def _fmt(ms: tuple, scale: float = 1.0, digits: int = 4) -> str:
    m, s, n = ms
    if not n:
        return "—"
    return f"{m * scale:.{digits}g} ± {s * scale:.2g}"


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nn_adapter", "occore"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" + uncommitted changes in nn_adapter/occore" if dirty else "")


def _jsonable(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return repr(x)


def _summary_counts(rows) -> dict:
    return {"cells": len(rows),
            "more_divergent": sum(r["more_divergent"] for r in rows),
            "worse": sum(r["verdict"] == "worse" for r in rows),
            "better": sum(r["verdict"] == "better" for r in rows),
            "same": sum(r["verdict"] == "same" for r in rows)}


def summary_lines(result: dict) -> list:
    """The summary of the report, one line per data set and one for all of them."""
    lines = []
    groups = [(ds, [r for r in result["rows"] if r["dataset"] == ds]) for ds in result["datasets"]]
    for name, rows in groups + [("all data sets", result["rows"])]:
        c = _summary_counts(rows)
        lines.append(f"{name}: {c['cells']} cells; DDPNOpt diverged in more seeds than its base "
                     f"in {c['more_divergent']}; worse by more than one std in {c['worse']}; "
                     f"better by more than one std in {c['better']}; same in {c['same']}")
    n = result.get("confirm_seeds", 0)
    flags = [r for r in result["rows"] if flagged(r)]
    if n > result["seeds"] and flags:
        conf = result.get("confirmed", [])
        held = [r for r in conf if flagged(r)]
        lines.append(f"flagged cells re-measured with {n} seeds: {len(conf)}; still flagged: "
                     f"{len(held)} (more divergent {sum(r['more_divergent'] for r in held)}, "
                     f"worse by more than one std {sum(r['verdict'].startswith('worse') for r in held)})"
                     + (f"; not re-measured: {len(flags) - len(conf)}" if len(flags) > len(conf)
                        else ""))
    return lines


_TABLE_HEAD = ("| base | lr (factor) | base train loss | base test acc % | base diverged | "
               "DDPNOpt train loss | DDPNOpt test acc % | DDPNOpt diverged | Δ loss | refused | "
               "verdict |")
_TABLE_RULE = "|---|---|---|---|---|---|---|---|---|---|---|"


def _table_row(r: dict) -> str:
    b, d = r["stats"]["base"], r["stats"]["ddpnopt"]

    def div(v):
        return f"{v['diverged']}/{v['runs']}" + (f" ({v['errors']} err)" if v["errors"] else "")
    delta = "—" if r["delta"] is None else f"{r['delta']:+.3g}"
    flag = " ⚠ DDPNOpt diverged more" if r["more_divergent"] else ""
    return (f"| {r['base']} | {r['lr']:.3g} (×{r['lr_factor']:g}) | {_fmt(b['loss'])} | "
            f"{_fmt(b['acc'], 100, 3)} | {div(b)} | {_fmt(d['loss'])} | "
            f"{_fmt(d['acc'], 100, 3)} | {div(d)} | {delta} | "
            f"{b['refused']} / {d['refused']} | {r['verdict']}{flag} |")


def _not_confirmed(result: dict) -> str:
    """A sentence naming the flagged cells that were not re-measured (--confirm-datasets)."""
    done = set(result.get("confirm_datasets", []))
    left = [r for r in result["rows"] if flagged(r) and r["dataset"] not in done]
    if not left:
        return ""
    return (f" Not re-measured (--confirm-datasets): {len(left)} flagged cell(s) of "
            f"{', '.join(sorted({r['dataset'] for r in left}))}; they keep their "
            f"{result['seeds']}-seed verdict.")


def _markdown(result: dict, command: str) -> str:
    seeds = result["seeds"]
    L = ["# Learning-rate robustness: DDPNOpt vs its base optimizers", "",
         "Our measurements in the setting of Fig. 4 of the DDPNOpt paper (Liu, Chen & Theodorou, "
         "ICLR 2021): each base optimizer and its DDPNOpt variant with identical hyperparameters, "
         "from the same initial weights and with the same minibatches per seed.", "",
         f"- command: `{command}`",
         f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
         f"- code: git {result.get('code') or _git_state()}",
         f"- python {platform.python_version()}, torch {torch.__version__}",
         f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPU(s); "
         f"{result['workers']} worker process(es), one torch thread each; device "
         f"{result['device']}, {result['dtype']}",
         f"- seeds: {seeds} (0..{seeds - 1}); learning rate = reference lr x factor, factors "
         f"{', '.join(f'{f:g}' for f in result['lr_factors'])}; reference lrs: "
         + ", ".join(f"{b} {REFERENCE_LR[b]:g}" for b in result["bases"]),
         "- pairs: sgd-m = SGD(momentum=0.9) vs DDPNOpt(curvature='identity', momentum=0.9); "
         "rmsprop = RMSprop vs DDPNOpt('rmsprop'); adam = Adam vs DDPNOpt('adam'); "
         "ekfac = nn_adapter.EKFAC vs DDPNOpt('ekfac'); loss: cross-entropy (batch mean)",
         f"- extra DDPNOpt options (--ddpnopt-option): {result['ddp_opts'] or 'none'}",
         f"- hyperparameters shared by both members of a pair (--base-option): "
         f"{result['base_opts'] or 'none'}",
         f"- total wall time: {result['wall_s']:.1f} s", "", "## Data", ""]
    for ds, note in result["notes"].items():
        st = result["settings"].get(ds)
        extra = (f"; network {st['network']}; batch {st['batch']}, {st['epochs']} epoch(s) of "
                 f"{st['steps_per_epoch']} steps (last partial batch dropped)") if st else ""
        L.append(f"- **{ds}**: {note}{extra}")
    L += ["", "## Definitions", "",
          "- train loss: mean minibatch loss of the last epoch; test acc: accuracy (%) of the "
          "final model on the test split; both mean ± sample std over the seeds that did **not** "
          "diverge (— when none).",
          "- diverged k/N: seeds where a loss was not finite (run stopped), a parameter was not "
          "finite after a step (run stopped), the optimizer raised an exception, or the final "
          "train loss exceeded the initial model's loss on the whole training set.",
          "- refused: steps the optimizer refused (non-finite loss or gradient; RuntimeWarning "
          "counted, not shown), summed over the seeds, base / DDPNOpt.",
          "- verdict: *worse* when DDPNOpt's mean train loss exceeds the base's by more than one "
          "std of the base, *better* symmetrically, *same* otherwise (needs non-diverged seeds "
          "on both sides; the base's std is 0 with a single non-diverged seed, so any difference "
          "counts then); **⚠** marks a cell where DDPNOpt diverged in more seeds than its base.",
          ""]
    errors = [r for r in result["records"] if r["error"]]
    for ds in result["datasets"]:
        L += [f"## {ds}", "", _TABLE_HEAD, _TABLE_RULE]
        L += [_table_row(r) for r in result["rows"] if r["dataset"] == ds]
        L.append("")
    for ds in result["skipped"]:
        L += [f"## {ds}", "", f"Skipped: {result['notes'][ds]}", ""]
    n = result.get("confirm_seeds", 0)
    if n > seeds:
        L += [f"## Flagged cells re-measured with {n} seeds", "",
              f"Every cell above that the {seeds} seeds flag (*worse*, or **⚠**) run again with "
              f"seeds 0..{n - 1} (the first {seeds} are the runs above), same settings; the "
              "verdict uses the same rule." + _not_confirmed(result), ""]
        if result.get("confirmed"):
            L += ["| data | " + _TABLE_HEAD[2:], "|---" + _TABLE_RULE]
            L += [f"| {r['dataset']} " + _table_row(r) for r in result["confirmed"]]
        else:
            L.append("No cell was flagged.")
        L.append("")
    L += ["## Summary", ""] + [f"- {line}" for line in summary_lines(result)]
    if errors:
        L += ["", f"## Runs that raised an exception ({len(errors)})", ""]
        seen = {}
        for r in errors:
            seen.setdefault(r["error"], []).append(
                f"{r['dataset']}/{r['base']}/{r['variant']}/x{r['lr_factor']:g}/seed {r['seed']}")
        for msg, where in seen.items():
            L.append(f"- `{msg}` ({len(where)} run(s), e.g. {', '.join(where[:3])})")
    return "\n".join(L) + "\n"


def _heatmap(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dsets, bases, factors = result["datasets"], result["bases"], result["lr_factors"]
    n = max(len(dsets), 1)
    fig, axes = plt.subplots(n, 1, figsize=(1.9 * len(factors) + 3.6, (0.95 * len(bases) + 2.2) * n),
                             squeeze=False)
    if not dsets:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no data set could be run", ha="center", va="center")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d9d9d9")
    for ax, ds in zip(axes[:, 0], dsets):
        rows = {(r["base"], r["lr_factor"]): r for r in result["rows"] if r["dataset"] == ds}
        diff = np.full((len(bases), len(factors)), np.nan)
        for i, b in enumerate(bases):
            for j, f in enumerate(factors):
                r = rows.get((b, f))
                if r is not None and r["delta"] is not None:
                    diff[i, j] = r["delta"]
        lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
        lim = lim if lim > 0 else 1e-3
        im = ax.imshow(np.ma.masked_invalid(diff), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        for i, b in enumerate(bases):
            for j, f in enumerate(factors):
                r = rows.get((b, f))
                if r is None:
                    continue
                d = r["delta"]
                dark = d is not None and abs(d) > 0.6 * lim
                text = (f"lr {r['lr']:.2g}\n" + ("Δ n/a" if d is None else f"Δ {d:+.2g}") +
                        f"\n{r['stats']['base']['diverged']}/{r['seeds']} | {r['stats']['ddpnopt']['diverged']}/"
                        f"{r['seeds']}" + (" ⚠" if r["more_divergent"] else ""))
                ax.text(j, i, text, ha="center", va="center", fontsize=8.5,
                        color="white" if dark else "black")
        ax.set_xticks(range(len(factors)), [f"×{f:g}" for f in factors])
        ax.set_yticks(range(len(bases)), [f"{b} (ref lr {REFERENCE_LR[b]:g})" for b in bases])
        ax.set_xlabel("learning rate = reference lr × factor")
        st = result["settings"][ds]
        ax.set_title(f"{ds} ({st['epochs']} epochs, {result['seeds']} seeds): mean final train "
                     f"loss, DDPNOpt − base\nblue = DDPNOpt lower, red = higher, grey = no "
                     f"non-diverged seed; text: diverged seeds base | DDPNOpt", fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
        cb.set_label("Δ mean final training loss\n(DDPNOpt − base)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(result: dict, out_dir, command: str, json_path=None) -> dict:
    """Write ``lr_robustness.md``, ``lr_robustness.png`` and the JSON of every run;
    returns ``{"md": path, "png": path, "json": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "lr_robustness.md", "png": out / "lr_robustness.png",
             "json": Path(json_path) if json_path else out / "lr_robustness.json"}
    paths["md"].write_text(_markdown(result, command), encoding="utf-8")
    _heatmap(result, paths["png"])
    payload = {k: v for k, v in result.items() if k not in ("rows", "confirmed")}
    payload["confirmed_cells"] = [{"dataset": r["dataset"], "base": r["base"],
                                   "lr_factor": r["lr_factor"], "verdict": r["verdict"],
                                   "more_divergent": r["more_divergent"], "stats": r["stats"]}
                                  for r in result.get("confirmed", [])]
    payload.update(command=command, summary=summary_lines(result))
    payload["cells"] = [{"dataset": r["dataset"], "base": r["base"], "lr_factor": r["lr_factor"],
                         "lr": r["lr"], "delta": r["delta"], "verdict": r["verdict"],
                         "more_divergent": r["more_divergent"],
                         "stats": r["stats"]} for r in result["rows"]]
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False),
                             encoding="utf-8")
    return paths


# -- command line --------------------------------------------------------------------------------
def _option(text: str):
    key, sep, raw = text.partition("=")
    name = key.split(":", 1)[-1]
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value or base:key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return key, value


def _factors(text: str):
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return tuple(vals)


def _names(valid):
    def parse(text: str):
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in names if v not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown name(s) {bad or [text]}; valid: "
                                             f"{', '.join(valid)}")
        return tuple(dict.fromkeys(names))
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lr_robustness.py", description=__doc__.splitlines()[0])
    p.add_argument("--datasets", type=_names(tuple(DATASETS)), default=None,
                   help=f"comma-separated from {', '.join(DATASETS)} (default "
                        f"{','.join(DEFAULT_DATASETS)}; --quick: {','.join(QUICK_DATASETS)})")
    p.add_argument("--bases", type=_names(tuple(BASES)), default=tuple(BASES),
                   help=f"comma-separated from {', '.join(BASES)} (default all)")
    p.add_argument("--lr-factors", type=_factors, default=None,
                   help="factors of each base's reference lr (default 0.1,0.3,1,3,10; --quick: "
                        "0.3,1,3)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 5; --quick 2)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs for every data set (default: digits 20, wine 40, fmnist 3; "
                        "--quick: 2, 5, 1)")
    p.add_argument("--ddpnopt-option", action="append", type=_option, default=[],
                   metavar="KEY=VALUE", help="extra DDPNOpt keyword option (repeatable; value "
                   "parsed by ast.literal_eval, else a string); 'ekfac:KEY=VALUE' for one base")
    p.add_argument("--base-option", action="append", type=_option, default=[],
                   metavar="KEY=VALUE", help="hyperparameter given to both members of every pair "
                   "(torch names, e.g. weight_decay=1e-4); 'adam:KEY=VALUE' for one base")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--fmnist-train", type=int, default=FMNIST_TRAIN,
                   help=f"Fashion-MNIST training images used (default {FMNIST_TRAIN})")
    p.add_argument("--fmnist-test", type=int, default=FMNIST_TEST,
                   help=f"Fashion-MNIST test images used (default {FMNIST_TEST})")
    p.add_argument("--fmnist-root", default=None,
                   help=f"folder of the Fashion-MNIST IDX files (default {nn_data.FASHION_MNIST_DIR})")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode (< 1 min on 2 cores): digits and wine, 2 / 5 epochs, 2 seeds, "
                        "lr factors 0.3,1,3")
    p.add_argument("--confirm-seeds", type=int, default=None,
                   help="re-measure every flagged cell (DDPNOpt worse by more than one std, or "
                        "diverged in more seeds) with seeds 0..N-1 (default 20; --quick: 0 = off)")
    p.add_argument("--confirm-datasets", type=_names(tuple(DATASETS)), default=None,
                   help="re-measure the flagged cells of these data sets only (default all)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="take the grid's runs from an earlier report's JSON (its data sets, bases, "
                        "learning rates, seeds and options; grid options here are ignored) and "
                        "run only the confirmation")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--json", default=None, help="path of the JSON of all runs (default "
                                                "OUT/lr_robustness.json)")
    return p




def _check_options(parser, bases, base_opts: dict, ddp_opts: dict) -> None:
    """Build every requested optimizer on a tiny network, so a bad option fails before any run."""
    b_per, d_per = _split_opts(base_opts, bases), _split_opts(ddp_opts, bases)
    unknown = {k.split(":", 1)[0] for k in list(base_opts) + list(ddp_opts) if ":" in k} - set(BASES)
    if unknown:
        parser.error(f"unknown base(s) {sorted(unknown)} in an option prefix; valid: "
                     f"{', '.join(BASES)}")
    for base in bases:
        for variant in VARIANTS:
            net = mlp(3, 2, width=4, depth=2)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    make_optimizer(base, variant, net, REFERENCE_LR[base], b_per[base],
                                   d_per[base])
            except Exception as err:  # noqa: BLE001
                flag = "--ddpnopt-option" if variant == "ddpnopt" and ddp_opts else "--base-option"
                parser.error(f"{flag}: {base} ({'DDPNOpt' if variant == 'ddpnopt' else 'base'}): "
                             f"{type(err).__name__}: {err}" + (
                                 " (prefix it with a base, e.g. ekfac:KEY=VALUE, to give it to "
                                 "one pair only)" if len(bases) > 1 else ""))


def _check_confirm_seeds(parser, confirm_seeds: int, grid_seeds: int) -> None:
    """``--confirm-seeds`` must be 0 or more than the grid's seeds (exit 2 otherwise)."""
    if confirm_seeds and confirm_seeds <= grid_seeds:
        parser.error(f"--confirm-seeds: expected 0 or more than the grid's {grid_seeds} "
                     f"seeds, got {confirm_seeds}")


def main(argv=None) -> int:
    """Run the grid and write the report; 0 on success, exit status 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    datasets = args.datasets or (QUICK_DATASETS if args.quick else DEFAULT_DATASETS)
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    factors = args.lr_factors or (QUICK_LR_FACTORS if args.quick else LR_FACTORS)
    if seeds < 1:
        parser.error(f"--seeds: expected an integer >= 1, got {seeds}")
    if args.workers < 1:
        parser.error(f"--workers: expected an integer >= 1, got {args.workers}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs: expected an integer >= 1, got {args.epochs}")
    if args.fmnist_train < 1 or args.fmnist_test < 1:
        parser.error("--fmnist-train / --fmnist-test: expected integers >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    out = Path(args.out)
    err = output_folder_problem(args.out)
    if err:
        parser.error(f"--out: {err}")
    if args.json is not None:
        parent = Path(args.json).absolute().parent          # created if missing
        err = output_folder_problem(str(parent)) or (
            output_file_problem(args.json) if parent.is_dir() else None)
        if err:
            parser.error(f"--json: {err}")
    confirm_seeds = (args.confirm_seeds if args.confirm_seeds is not None else
                     (0 if args.quick else CONFIRM_SEEDS))
    if confirm_seeds < 0:
        parser.error(f"--confirm-seeds: expected an integer >= 0, got {confirm_seeds}")
    command = "python benchmarks/lr_robustness.py" + (" " + shlex.join(argv) if argv else "")
    if args.from_json:
        try:
            result = load_result(args.from_json)
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.error(f"--from-json: {args.from_json}: not a report of this script ({err})")
        command += f" (grid runs from: {result.pop('command', '?')})"
    else:
        base_opts, ddp_opts = dict(args.base_option), dict(args.ddpnopt_option)
        _check_options(parser, args.bases, base_opts, ddp_opts)
        _check_confirm_seeds(parser, confirm_seeds, seeds)      # before the grid runs
        dtype = torch.float64 if args.dtype == "float64" else torch.float32
        result = run_grid(datasets, args.bases, factors, seeds, workers=args.workers, dtype=dtype,
                          device=args.device, ddp_opts=ddp_opts, base_opts=base_opts,
                          quick=args.quick, epochs=args.epochs, fmnist_train=args.fmnist_train,
                          fmnist_test=args.fmnist_test, fmnist_root=args.fmnist_root)
    _check_confirm_seeds(parser, confirm_seeds, result["seeds"])
    confirm(result, confirm_seeds, workers=args.workers, datasets=args.confirm_datasets)
    paths = write_report(result, out, command, args.json)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {paths['md']}, {paths['png']}, {paths['json']} ({result['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
