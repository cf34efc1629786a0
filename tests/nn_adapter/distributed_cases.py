"""Cases of the data-parallel tests, run the same way on one process (the whole batch) and on each
rank of a process group (its shard): ``run_case(name)`` gives the parameters after every step.

Imported by the spawned processes of :func:`nn_adapter.distributed.launch` (module-level
functions, numpy results: nothing in them refers to the process that made them).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from nn_adapter.training import make_closure
from torch import nn
from torch.nn.parallel import DistributedDataParallel

STEPS, B = 5, 64

# name: (optimizer, options, wrapping): wrapping "ddp" (DistributedDataParallel) or "group"
# (a plain model and process_group=)
CASES = {
    "ddpnopt-adam": ("ddpnopt", dict(curvature="adam", lr=0.02), "ddp"),
    "ddpnopt-ekfac": ("ddpnopt", dict(curvature="ekfac", lr=0.05, eigen_update_freq=2), "ddp"),
    "ddpnopt-adam-group": ("ddpnopt", dict(curvature="adam", lr=0.02), "group"),
    "ddpnopt-ekfac-group": ("ddpnopt", dict(curvature="ekfac", lr=0.05, eigen_update_freq=2),
                            "group"),
    "ddpnopt-identity-sampled": ("ddpnopt", dict(curvature="identity", lr=0.05, momentum=0.9,
                                                 terminal_hessian="sampled"), "ddp"),
    "ddpnopt-rmsprop-gn-dense": ("ddpnopt", dict(curvature="rmsprop", lr=0.01, feedback="dense",
                                                 terminal_hessian="gauss_newton",
                                                 diagnostics=True), "ddp"),
    "ddpnopt-adam-nofeedback": ("ddpnopt", dict(curvature="adam", lr=0.02, feedback=False), "ddp"),
    "ekfac": ("ekfac", dict(lr=0.05, eigen_update_freq=2), "ddp"),
    "ekfac-group-noclosure": ("ekfac", dict(lr=0.05, eigen_update_freq=2), "group-noclosure"),
    # steps without a factor update (2, 4), one of them refreshing the eigenbases (4)
    "ekfac-sparse-factors": ("ekfac", dict(lr=0.05, factor_update_freq=2, eigen_update_freq=3),
                             "ddp"),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(),
                         nn.Linear(8, 4)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (torch.randn(B, 6, generator=g, dtype=torch.float64),
               torch.randint(0, 4, (B,), generator=g))


def flat(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def run_case(name: str) -> dict:
    """Parameters after each step and the optimizer's collectives per step (on this rank)."""
    from nn_adapter import DDPNOpt, EKFAC
    from nn_adapter.distributed import shard

    kind, options, wrapping = CASES[name]
    net = make_model()
    distributed = dist.is_initialized()
    model = net
    extra = {}
    if distributed and wrapping == "ddp":
        model = DistributedDataParallel(net)
    elif distributed:
        extra = dict(process_group=dist.group.WORLD)
    cls = DDPNOpt if kind == "ddpnopt" else EKFAC
    opt = cls(model.parameters(), model=model, **options, **extra)
    params, calls, clamped = [], [], []
    for x, y in batches():
        xb, yb = shard(x, y)
        before = opt.collectives.calls if opt.collectives is not None else 0
        if wrapping == "group-noclosure":
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        else:
            opt.step(make_closure(model, opt, xb, yb))
        calls.append((opt.collectives.calls if opt.collectives is not None else 0) - before)
        params.append(flat(net))
        if getattr(opt, "diagnostics", None):
            clamped.append([d["clamped"] for d in opt.diagnostics])
    return {"params": params, "calls": calls, "clamped": clamped}


def _called_twice_on_rank_1(net, opt, xb, yb):
    """The error a step raises when rank 1 alone calls the model twice in its closure (None if
    it does not raise)."""
    def twice():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xb), yb)
        if dist.get_rank() == 1:
            net(xb)
        loss.backward()
        return loss
    try:
        opt.step(twice)
    except ValueError as err:
        return str(err)
    return None


def refusals() -> dict:
    """Rank 1 alone gets a non-finite loss, then alone calls the model twice: the first step is
    refused on both ranks, the second raises on both."""
    from nn_adapter import DDPNOpt
    from nn_adapter.distributed import shard

    net = make_model()
    opt = DDPNOpt(net.parameters(), model=net, lr=0.02, process_group=dist.group.WORLD)
    rank = dist.get_rank()
    x, y = next(batches())
    xb, yb = x[:32], y[:32]
    if rank == 1:
        xb = xb.clone()
        xb[0, 0] = float("nan")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        return loss
    before = flat(net)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
    out = {"unchanged": bool(np.array_equal(before, flat(net))),
           "warned": any("refused" in str(w.message) for w in caught)}
    xb = x[:32]
    out["error"] = _called_twice_on_rank_1(net, opt, xb, yb)
    try:
        shard(torch.zeros(63))
    except ValueError as err:
        out["shard_error"] = str(err)
    out["params"] = flat(net)
    # EKFAC (no agreement numbers of its own): rank 1 alone calls the model twice
    from nn_adapter import EKFAC

    enet = make_model()
    eopt = EKFAC(enet.parameters(), model=enet, lr=0.02, process_group=dist.group.WORLD)
    before = flat(enet)
    out["ekfac_error"] = _called_twice_on_rank_1(enet, eopt, xb, yb)
    out["ekfac_unchanged"] = bool(np.array_equal(before, flat(enet)))
    return out


def worker(names, resume_folder=None, epochs=0) -> dict:
    """Every case named, the refusals, then (with ``resume_folder``) the resumption of a
    checkpoint saved by one process, trained on to ``epochs`` (one process group for all)."""
    torch.set_num_threads(1)
    out = {name: run_case(name) for name in names}
    out["refusals"] = refusals()
    if resume_folder is not None:
        from checkpoint_run import train
        out["resumed"] = train(resume_folder, epochs, resume=True, dropout=False)
    return out


def seeded_run(seed: int) -> np.ndarray:
    """One independent training run (parallel_map against a serial loop)."""
    from nn_adapter import DDPNOpt

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    opt = DDPNOpt(net, lr=0.02)
    for x, y in batches():
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return flat(net)
