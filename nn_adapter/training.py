"""Minibatch training, to compare DDPNOpt with torch's optimizers and occore's own solvers side by side.

Every optimizer of one comparison starts from the same weights and sees the same minibatches in
the same order (both drawn from the run's seed; :attr:`TrainRecord.fingerprint` records them).
torch optimizers and DDPNOpt step through the closure protocol (``opt.step(closure)``); E-MSA
and vanilla DDP (:class:`SolverOptimizer`) run occore's solver on the minibatch as a
:class:`~nn_adapter.NetworkProblem`.

=====================  ==============================================================  =========
name                   what                                                            lr
=====================  ==============================================================  =========
``sgd-m``              ``torch.optim.SGD``, momentum 0.9 (the paper's SGD-m)            0.05
``sgd``                ``torch.optim.SGD`` without momentum                             0.05
``rmsprop``            ``torch.optim.RMSprop``                                          1e-3
``adam``               ``torch.optim.Adam``                                             3e-3
``ekfac``              :class:`nn_adapter.EKFAC`                                        3e-3
``ddpnopt``            :class:`nn_adapter.DDPNOpt`, Adam curvature                      3e-3
``ddpnopt-sgd``        DDPNOpt, identity curvature with momentum 0.9                    0.05
``ddpnopt-rmsprop``    DDPNOpt, RMSprop curvature                                       1e-3
``ddpnopt-ekfac``      DDPNOpt, EKFAC curvature                                         3e-3
``ddpnopt-2nd``        DDPNOpt, Adam curvature, ``second_order=True``                   3e-3
``emsa``               ``occore.EMSA``, one iteration per minibatch                     0.1
``ddp``                ``occore.DDP`` (vanilla, exact batched), one iteration per batch 1.0
=====================  ==============================================================  =========

For ``emsa`` the learning rate scales the feasibility weight, rho = 1 / (lr B) (B: the batch
size; see :func:`network_emsa`); for ``ddp`` it caps the step length alpha <= lr of the line
search (values above 1 are refused).
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from occore.errors import InputError, ShapeError
from occore.validation import is_integer, is_real

from .data import Split, batch_indices
from .errors import DataError
from .memory import resident_bytes, step_peak_bytes
# the networks live in nn_adapter.networks; imported here for the callers that take them from
# nn_adapter.training (one implementation)
from .networks import ResidualBlock, ResidualCNN, mlp, paper_cnn, residual_cnn  # noqa: F401

__all__ = ["OPTIMIZERS", "DEFAULT_LR", "TrainRecord", "SolverOptimizer", "network_emsa", "network_ddp",
           "make_closure", "make_optimizer", "train_classifier", "compare_optimizers", "fingerprint",
           "mlp", "paper_cnn", "ResidualBlock", "ResidualCNN", "residual_cnn"]

logger = logging.getLogger("nn_adapter")

#: Default learning rate of every optimizer name (the small classification problems of the CLI).
DEFAULT_LR = {"ddpnopt": 3e-3, "ddpnopt-sgd": 0.05, "ddpnopt-rmsprop": 1e-3, "ddpnopt-ekfac": 3e-3,
              "ddpnopt-2nd": 3e-3, "adam": 3e-3, "sgd-m": 0.05, "sgd": 0.05, "rmsprop": 1e-3, "ekfac": 3e-3,
              "emsa": 0.1, "ddp": 1.0}
OPTIMIZERS = tuple(DEFAULT_LR)
#: The optimizers that run an occore solver on the minibatch's control problem (small nets).
CORE_SOLVERS = ("emsa", "ddp")


def make_closure(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: Callable | None = None) -> Callable[[], torch.Tensor]:
    """The usual closure for ``optimizer.step(closure)``: zero_grad, forward, loss, backward.

    ``loss_fn`` defaults to cross-entropy.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> loss = opt.step(make_closure(net, opt, torch.randn(4, 2), torch.tensor([0, 1, 2, 0])))
        >>> loss.shape
        torch.Size([])
    """
    loss_fn = loss_fn or nn.functional.cross_entropy

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def _check_name(name) -> None:
    if not isinstance(name, str) or name not in DEFAULT_LR:
        raise InputError(f"unknown optimizer {name!r}; valid optimizers are {', '.join(OPTIMIZERS)}")


def check_lr(lr, name: str = "") -> None:
    """Refuse (InputError) a learning rate that is not a finite number > 0 (<= 1 for vanilla DDP,
    ``name`` "ddp"): the one rule of the API and of ``occore train --lr``."""
    if not is_real(lr) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"lr={lr!r}{f' (optimizer {name!r})' if name else ''}: expected a "
                         "finite number > 0")
    if name == "ddp" and lr > 1:
        raise InputError(f"lr={lr!r} (optimizer 'ddp'): vanilla DDP's lr caps the line search's "
                         "step length, 0 < lr <= 1")


# -- occore's solvers on minibatches ----------------------------------------------------------------
def network_emsa(batch_size: int, lr: float = 1.0):
    """E-MSA with the defaults of a minibatch network problem: one iteration, rho = 1 / (lr B).

    The costates of a mean loss carry its 1/B while the feasibility terms of the augmented
    Hamiltonian sum over the B samples, so the dense problems' rho = 1 is B times too stiff for a
    network (measured: ``occore.EMSA()`` barely moves the WINE loss in 20 iterations); the inner
    maximisation is L-BFGS with a strong-Wolfe line search (10 iterations, as the authors'
    L-BFGS-B), and the adaptive rho schedule carries from batch to batch.

    Example:
        >>> network_emsa(32).options.rho
        0.03125
    """
    import occore

    from .problem import per_sample_rho

    rho = per_sample_rho(lr * batch_size)      # 1 / (lr B): the learning rate divides it
    return occore.EMSA(max_iter=1, rho=rho, rho_min=rho, inner="lbfgs")


def network_ddp(lr: float = 1.0):
    """Vanilla DDP on a minibatch: one iteration of full second-order DDP (exact batched value
    Hessian), the line search's step lengths capped at ``lr`` (0 < lr <= 1).

    Example:
        >>> network_ddp(0.5).options.line_search.steps[0]
        0.5
    """
    from dataclasses import replace

    import occore

    if not (0 < lr <= 1):
        raise ValueError(f"lr={lr!r}: vanilla DDP's lr caps the line search's step length, 0 < lr <= 1")
    base = occore.DDP().options
    steps = tuple(lr * s for s in base.line_search.steps)
    return occore.DDP(replace(base, max_iter=1, line_search=replace(base.line_search, steps=steps)))


class SolverOptimizer:
    """An occore solver as a minibatch optimizer: per batch, ``model``'s weights are the initial
    controls of the batch's :class:`~nn_adapter.NetworkProblem`, one solver step is taken and its
    controls are loaded back into ``model``. The solver's regularisation (DDP's mu, E-MSA's rho)
    carries over from batch to batch.

    Args:
        model: an ``nn.Sequential`` the adapter can split into stages.
        solver: ``"emsa"``, ``"ddp"`` or an occore solver instance.
        lr: see :func:`network_emsa` / :func:`network_ddp` (None: 1.0); not taken with a solver
            instance, whose own options set its steps (InputError).
        memory_limit: bytes the dense DDP local model may use (see NetworkProblem).

    In a training loop: ``step_batch(x, y, loss_fn)`` per minibatch (it runs its own forward
    passes and derivatives; the model needs no ``backward``). ``state_dict()`` /
    ``load_state_dict()`` carry what passes from batch to batch, the regularisation ``mu``
    (E-MSA's rho) together with the solver's name and ``lr``, as plain numbers and strings
    (``torch.save`` / ``torch.load(weights_only=True)``): a run resumed from it and the model's
    ``state_dict`` continues exactly as the uninterrupted one. It is not a
    ``torch.optim.Optimizer``: no param groups (so no LR schedulers or ``GradScaler``), and
    ``step`` and ``zero_grad`` raise a ``TypeError`` that says to call ``step_batch``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        >>> opt = SolverOptimizer(net, "ddp")
        >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> before = opt.step_batch(x, y, nn.CrossEntropyLoss())
        >>> float(nn.CrossEntropyLoss()(net(x), y)) < before
        True
    """

    def __init__(self, model: nn.Module, solver="emsa", lr: float | None = None,
                 memory_limit: int | None = 2 ** 30):
        if (solver not in CORE_SOLVERS if isinstance(solver, str)
                else not (callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None)))):
            raise ValueError(f"solver={solver!r}: expected one of {', '.join(CORE_SOLVERS)} or an occore solver")
        if not isinstance(solver, str) and lr is not None:     # it would be ignored
            raise InputError(f"lr={lr!r} with the solver instance {type(solver).__name__}: its own "
                             "options set its steps; pass lr with solver 'emsa' or 'ddp', or leave it None")
        lr = 1.0 if lr is None else lr
        if isinstance(solver, str):
            check_lr(lr, solver)
        self.model, self.solver, self.lr, self.memory_limit = model, solver, float(lr), memory_limit
        self.mu: Optional[float] = None
        self.status = None

    def _solver(self, batch_size: int):
        if self.solver == "emsa":
            return network_emsa(batch_size, self.lr)
        if self.solver == "ddp":
            return network_ddp(self.lr)
        return self.solver

    def step_batch(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> float:
        """One solver iteration on the batch (x (B, ...), y (B,)); returns the loss before it."""
        from . import NetworkProblem

        solver = self._solver(len(x))
        prob = NetworkProblem(self.model, loss_fn, x, y, memory_limit=self.memory_limit)
        state = solver.init(prob, mu=self.mu)
        loss = state.traj.cost
        new, _ = solver.step(prob, state)
        self.mu, self.status = new.mu, new.status
        prob.load_into(self.model, new.traj.us)
        return loss

    def _solver_name(self) -> str:
        return self.solver if isinstance(self.solver, str) else type(self.solver).__name__

    def state_dict(self) -> dict:
        """``{"solver": its name (or the instance's class), "lr": float, "mu": float or None}``:
        what a resumed run needs besides the model's weights (the ``mu`` that carries over)."""
        return {"solver": self._solver_name(), "lr": self.lr, "mu": self.mu}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`: ``mu`` and ``lr`` (as torch optimizers restore theirs).

        Raises:
            TypeError: not a dict of :meth:`state_dict`'s entries.
            ValueError: saved with another solver (both named), or an invalid ``lr`` / ``mu``.
        """
        if not isinstance(state_dict, dict) or set(state_dict) != {"solver", "lr", "mu"}:
            raise TypeError("state_dict: expected the dict returned by SolverOptimizer.state_dict() "
                            "(entries 'solver', 'lr', 'mu')")
        saved, own = state_dict["solver"], self._solver_name()
        if saved != own:
            raise InputError(f"state_dict: saved by a SolverOptimizer with solver {saved!r}, but this "
                             f"one runs {own!r}; load it into a {saved!r} one")
        lr, mu = state_dict["lr"], state_dict["mu"]
        check_lr(lr, saved if isinstance(self.solver, str) else "")
        if mu is not None and (not is_real(mu) or not math.isfinite(mu) or mu < 0):
            raise InputError(f"state_dict: mu={mu!r}: expected None or a finite number >= 0")
        self.lr, self.mu = float(lr), None if mu is None else float(mu)

    def step(self, *args, **kwargs):
        """Not supported: raises ``TypeError`` (use :meth:`step_batch`)."""
        raise TypeError(self._unsupported("step"))

    def zero_grad(self, *args, **kwargs):
        """Not supported: raises ``TypeError`` (use :meth:`step_batch`, which needs no gradients)."""
        raise TypeError(self._unsupported("zero_grad"))

    def _unsupported(self, what: str) -> str:
        return (f"SolverOptimizer.{what}: an occore solver ({self._solver_name()!r}) takes the "
                "minibatch itself, not gradients of a backward pass; call "
                "step_batch(x, y, loss_fn) once per batch (it returns the loss before the step) "
                "instead of zero_grad / backward / step")


def make_optimizer(name: str, model: nn.Module, lr: float | None = None):
    """An optimizer by name (see the module's table); ``lr`` None: :data:`DEFAULT_LR`, else a
    finite number > 0 (<= 1 for ``ddp``; :class:`~occore.errors.InputError` otherwise).

    Example:
        >>> make_optimizer("sgd-m", nn.Linear(2, 1)).defaults["momentum"]
        0.9
    """
    from .ddpnopt import DDPNOpt
    from .ekfac import EKFAC

    _check_name(name)
    lr = DEFAULT_LR[name] if lr is None else lr
    check_lr(lr, name)
    params = model.parameters()
    factories = {
        "sgd-m": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
        "sgd": lambda: torch.optim.SGD(params, lr=lr),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr),
        "adam": lambda: torch.optim.Adam(params, lr=lr),
        "ekfac": lambda: EKFAC(model, lr=lr),
        "ddpnopt": lambda: DDPNOpt(model, lr=lr, curvature="adam"),
        "ddpnopt-sgd": lambda: DDPNOpt(model, lr=lr, curvature="identity", momentum=0.9),
        "ddpnopt-rmsprop": lambda: DDPNOpt(model, lr=lr, curvature="rmsprop"),
        "ddpnopt-ekfac": lambda: DDPNOpt(model, lr=lr, curvature="ekfac"),
        "ddpnopt-2nd": lambda: DDPNOpt(model, lr=lr, curvature="adam", second_order=True),
        "emsa": lambda: SolverOptimizer(model, "emsa", lr),
        "ddp": lambda: SolverOptimizer(model, "ddp", lr),
    }
    return factories[name]()


# -- the loop ----------------------------------------------------------------------------------------
@dataclass
class TrainRecord:
    """What one training run measured.

    Attributes:
        optimizer: its name.
        lr: its learning rate (None: not recorded).
        seed: the seed of the initial weights and the minibatch order.
        train_loss: mean minibatch loss of each epoch (before each step, as optimizers report it).
        test_accuracy: accuracy on the test split after each epoch (the model in eval mode).
        seconds: wall time of the optimisation steps (evaluation excluded).
        steps: optimisation steps taken.
        peak_memory: peak bytes of one step (the run's second, or its only one): parameters,
            gradients and optimizer state held before it plus the peak of what the step allocates
            (:mod:`nn_adapter.memory`; CUDA: the allocator's statistics, CPU: torch.profiler's
            memory events); None when not measured.
        untimed_steps: steps not counted in ``seconds`` (the one whose memory was measured runs
            under the profiler).
        fingerprint: digest of the initial weights and of the minibatch order (equal for every
            optimizer of one comparison and seed).
        stopped: why the run ended early ("" when it ran every epoch).
    """

    optimizer: str
    lr: Optional[float] = None
    seed: int = 0
    train_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    peak_memory: Optional[int] = None
    untimed_steps: int = 0
    fingerprint: str = ""
    stopped: str = ""

    @property
    def seconds_per_step(self) -> float:
        timed = self.steps - self.untimed_steps
        return self.seconds / timed if timed > 0 else float("nan")


def fingerprint(model: nn.Module, batches) -> str:
    """A short digest of ``model``'s weights (state dict, in order) and of a list of index batches."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for b in batches:
        h.update(b.numpy().astype("int64").tobytes())
    return h.hexdigest()[:16]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, predict=None) -> float:
    """Accuracy of ``model`` on (x, y) in eval mode (dropout off, batch norm on its running
    statistics, which the test data does not advance); every submodule's mode is restored.
    Predictions shaped unlike ``y`` (which ``==`` would broadcast) and, with the default argmax,
    labels no output can predict are refused."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
            pred = predict(out) if predict is not None else out.argmax(1)
    finally:
        for m, mode in modes:
            m.training = mode
    if not torch.is_tensor(pred) or pred.shape != y.shape:      # == would broadcast them
        what = "predict(outputs)" if predict is not None else "outputs.argmax(1)"
        raise ShapeError("data.y_test", f"{tuple(getattr(pred, 'shape', ()))} (the shape of {what})",
                         tuple(y.shape))
    if predict is None and y.numel() and not bool(((y >= 0) & (y < out.shape[1])).all()):
        raise DataError("data.y_test", f"class indices must lie in [0, {out.shape[1]}) (the "
                        f"model's outputs), got {float(y.min()):g}..{float(y.max()):g}")
    return float((pred == y).float().mean())


def _scalar(loss) -> float:
    return float(loss.detach() if torch.is_tensor(loss) else loss)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_classifier(model: nn.Module, data: Split, optimizer, epochs: int = 8, batch_size: int = 32,
                     seed: int = 0, loss_fn: Callable | None = None, name: str = "",
                     drop_last: bool = False, progress: Callable | None = None, predict=None,
                     measure_memory: bool = False, start_epoch: int = 1,
                     on_epoch_end: Callable | None = None) -> TrainRecord:
    """Train ``model`` in place on ``data`` with minibatches drawn by ``seed``.

    Args:
        model: the network (on its device; ``data`` is moved there batch by batch).
        data: the split; ``x_train`` (N, ...) is fed to ``model`` as it is.
        optimizer: a ``torch.optim.Optimizer`` (stepped with a closure) or an object with
            ``step_batch(x, y, loss_fn) -> loss`` (:class:`SolverOptimizer`).
        epochs, batch_size: epochs >= 1; batches of ``batch_size`` from a seeded permutation
            (:func:`nn_adapter.data.batch_indices`; the last partial batch kept unless ``drop_last``).
        loss_fn: defaults to cross-entropy; ``predict`` maps outputs to classes (default argmax).
        progress: ``progress(epoch, step, steps_per_epoch, loss, seconds)`` after every step
            (the CLI's progress bar; library code never prints).
        measure_memory: fill :attr:`TrainRecord.peak_memory` (the second step of this call, or
            its only one, then runs under the memory probe and is left out of the timing).
        start_epoch: the first epoch to run (>= 1; a resumed run: the model and optimizer hold the
            state after epoch ``start_epoch - 1``). The minibatches of every epoch are still drawn
            from ``seed``, so the later epochs see those of the whole run; the record holds the
            epochs run here.
        on_epoch_end: ``on_epoch_end(epoch, record)`` after each epoch's loss and accuracy are
            recorded (the CLI's checkpoints, :mod:`nn_adapter.train_runs`).

    A step whose loss is not finite stops the run (logged, :attr:`TrainRecord.stopped`), keeping
    what was measured so far.

    Raises:
        InputError: epochs, batch_size, start_epoch not ints >= 1, or seed not an int >= 0;
            ``drop_last`` with ``batch_size`` above the training samples (no step); a torch
            optimizer that holds none of ``model``'s parameters.
        ShapeError: a split whose targets do not match its samples one to one (before any
            step), or test predictions shaped unlike ``y_test`` (at the first evaluation).
        DataError: an empty training split (before any step), or with the default argmax
            test labels outside [0, C) of the model's C outputs (at the first evaluation).
        TypeError: ``model`` not a module, ``data`` not a split, ``optimizer`` neither a torch optimizer nor an object
            with ``step_batch``, or a callable argument that is not callable.
    """
    for arg, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                            ("start_epoch", start_epoch, 1), ("seed", seed, 0)):
        if not (is_integer(value) and value >= low):
            raise InputError(f"{arg}={value!r}: expected an int >= {low}")
    epochs, batch_size, start_epoch, seed = int(epochs), int(batch_size), int(start_epoch), int(seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not all(isinstance(getattr(data, a, None), torch.Tensor)
               for a in ("x_train", "y_train", "x_test", "y_test")):
        raise TypeError(f"data: expected an nn_adapter.data.Split (tensors x_train, y_train, "
                        f"x_test, y_test), got {type(data).__name__}")
    for part in ("train", "test"):
        xs, ys = getattr(data, f"x_{part}"), getattr(data, f"y_{part}")
        if xs.dim() == 0:
            raise ShapeError(f"data.x_{part}", "(N, ...)", (), "needs a sample axis")
        if ys.dim() == 0 or len(ys) != len(xs):
            raise ShapeError(f"data.y_{part}", f"({len(xs)}, ...) (one target per sample of "
                             f"data.x_{part})", tuple(ys.shape))
    if len(data.x_train) == 0:
        raise DataError("data.x_train", "is empty; training needs at least one sample")
    if drop_last and batch_size > len(data.x_train):
        raise InputError(f"batch_size={batch_size} with drop_last=True: the {len(data.x_train)} "
                         "training samples make no full batch, so no step would be taken; lower "
                         "batch_size or keep the partial batch (drop_last=False)")
    if not (isinstance(optimizer, torch.optim.Optimizer) or callable(getattr(optimizer, "step_batch", None))):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer or an object with "
                        f"step_batch(x, y, loss_fn), got {type(optimizer).__name__}")
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        held = [p for g in optimizer.param_groups for p in g["params"]]
        if held and not any(id(p) in own for p in held):      # it would train nothing, silently
            raise InputError("optimizer: holds none of model's parameters (built over another "
                             "model, or a copy of it?); build it over model.parameters()")
    for arg, fn in (("loss_fn", loss_fn), ("progress", progress), ("predict", predict),
                    ("on_epoch_end", on_epoch_end)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{arg}: expected None or a callable, got {type(fn).__name__}")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    record = TrainRecord(optimizer=name or type(optimizer).__name__, seed=seed)
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    plan = [batch_indices(n, batch_size, gen, drop_last) for _ in range(epochs)]
    record.fingerprint = fingerprint(model, [b for epoch in plan for b in epoch])
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    if hasattr(optimizer, "step_batch"):
        step = optimizer.step_batch
    else:
        def step(xb, yb, fn):
            return optimizer.step(make_closure(model, optimizer, xb, yb, fn))
    probe_at = None
    if measure_memory:
        planned = sum(len(b) for e, b in enumerate(plan, 1) if e >= start_epoch)
        probe_at = min(1, planned - 1)        # the optimizer's state exists after the first step
    taken = 0
    for epoch, batches in enumerate(plan, 1):
        if epoch < start_epoch:
            continue
        total, count = 0.0, 0
        for i, idx in enumerate(batches):
            xb, yb = data.x_train[idx].to(device), data.y_train[idx].to(device)
            if taken == probe_at:
                held = resident_bytes(model, optimizer)
                loss, peak = step_peak_bytes(lambda: _scalar(step(xb, yb, loss_fn)), device)
                record.peak_memory = held + peak
                record.untimed_steps += 1
            else:
                start = time.perf_counter()
                loss = _scalar(step(xb, yb, loss_fn))
                record.seconds += time.perf_counter() - start
            record.steps += 1
            taken += 1
            if not math.isfinite(loss):
                record.stopped = f"non-finite loss at epoch {epoch}, step {i + 1}"
                logger.warning("%s: %s, training stopped", record.optimizer, record.stopped)
                return record
            total, count = total + loss, count + 1
            if progress is not None:
                progress(epoch, i + 1, len(batches), loss, record.seconds)
        record.train_loss.append(total / max(count, 1))
        record.test_accuracy.append(_accuracy(model, x_test, y_test, predict))
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return record


def compare_optimizers(make_model: Callable[[], nn.Module], data: Split, names, epochs: int = 8,
                       batch_size: int = 32, lr=None, seed: int = 0, **train_options) -> dict:
    """Train one fresh model per optimizer name; ``{name: TrainRecord}``.

    Every model is ``make_model()`` called under ``torch.manual_seed(seed)`` (the same initial
    weights for every optimizer, whatever ran before) and sees the same minibatches (drawn from
    ``seed``). ``lr``: None (defaults), one number, or ``{name: lr}`` (missing names: defaults).
    ``train_options`` go to :func:`train_classifier` (``progress`` is then called with the
    optimizer's name first).

    Raises:
        InputError: before the first run, no name, an unknown name, a rate that is not a
            finite number > 0 (<= 1 for ``ddp``, as ``occore train --lr``) or an ``lr`` dict
            naming an optimizer not in ``names``, or a name given twice. TypeError: ``names``
            given as one string.
    """
    if isinstance(names, str):
        raise TypeError(f"names: expected a list of optimizer names, got the string {names!r} "
                        f"(write [{names!r}])")
    names = list(names)
    if not names:
        raise InputError(f"names: none given; valid optimizers are {', '.join(OPTIMIZERS)}")
    twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if twice:
        raise InputError(f"names: {twice} appear more than once; each name is one run and one "
                         "record of the result (a repeat would overwrite the first)")
    for name in names:                  # every name and rate checked before the first run
        _check_name(name)
        rate = lr.get(name) if isinstance(lr, dict) else lr
        if rate is not None:
            check_lr(rate, name)
    if isinstance(lr, dict) and set(lr) - set(names):
        raise InputError(f"lr: {sorted(set(lr) - set(names))} are not among names {names}")
    if isinstance(make_model, nn.Module) or not callable(make_model):
        raise TypeError(f"make_model: expected a callable returning a fresh model, got "
                        f"{type(make_model).__name__}")
    progress = train_options.pop("progress", None)
    records = {}
    for name in names:
        rate = lr.get(name) if isinstance(lr, dict) else lr
        torch.manual_seed(seed)
        model = make_model()
        opt = make_optimizer(name, model, rate)
        bar = None if progress is None else (lambda *a, _n=name: progress(_n, *a))
        records[name] = train_classifier(model, data, opt, epochs, batch_size, seed, name=name,
                                         progress=bar, **train_options)
        records[name].lr = DEFAULT_LR[name] if rate is None else rate
    return records
