"""A plain minibatch training loop, to compare DDPNOpt with torch's optimizers side by side.

Every optimizer starts from the same weights and sees the same minibatches; each step goes through
the closure protocol (``opt.step(closure)``) that DDPNOpt, LBFGS and the others all accept.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .data import Split

__all__ = ["OPTIMIZERS", "DEFAULT_LR", "TrainRecord", "make_closure", "make_optimizer",
           "train_classifier", "compare_optimizers", "mlp", "paper_cnn", "ResidualBlock", "ResidualCNN",
           "residual_cnn"]

logger = logging.getLogger("nn_adapter")

#: Learning rates that work for the small classification problems of the demo and the CLI.
DEFAULT_LR = {"ddpnopt": 3e-3, "ddpnopt-sgd": 0.05, "ddpnopt-rmsprop": 1e-3, "ddpnopt-ekfac": 3e-3,
              "adam": 3e-3, "sgd": 0.05, "rmsprop": 1e-3, "ekfac": 3e-3}
OPTIMIZERS = tuple(DEFAULT_LR)


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


def make_optimizer(name: str, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """An optimizer by name: ``ddpnopt`` (Adam curvature), ``ddpnopt-sgd`` (identity curvature with
    momentum 0.9), ``ddpnopt-rmsprop``, ``ddpnopt-ekfac``, ``adam``, ``sgd`` (momentum 0.9),
    ``rmsprop``, ``ekfac``.

    Example:
        >>> make_optimizer("sgd", nn.Linear(2, 1)).defaults["momentum"]
        0.9
    """
    from .ddpnopt import DDPNOpt
    from .ekfac import EKFAC

    if name not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers are {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else lr
    params = model.parameters()
    factories = {
        "ddpnopt": lambda: DDPNOpt(model, lr=lr, curvature="adam"),
        "ddpnopt-sgd": lambda: DDPNOpt(model, lr=lr, curvature="identity", momentum=0.9),
        "ddpnopt-rmsprop": lambda: DDPNOpt(model, lr=lr, curvature="rmsprop"),
        "ddpnopt-ekfac": lambda: DDPNOpt(model, lr=lr, curvature="ekfac"),
        "adam": lambda: torch.optim.Adam(params, lr=lr),
        "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr),
        "ekfac": lambda: EKFAC(model, lr=lr),
    }
    return factories[name]()


def mlp(n_in: int, n_out: int, width: int = 32, depth: int = 3, activation=nn.Tanh) -> nn.Sequential:
    """``depth`` Linear layers with ``activation`` between them: n_in -> width ... -> n_out.

    Example:
        >>> mlp(4, 2, width=8, depth=2)
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): Tanh()
          (2): Linear(in_features=8, out_features=2, bias=True)
        )
    """
    layers, width_in = [], n_in
    for _ in range(depth - 1):
        layers += [nn.Linear(width_in, width), activation()]
        width_in = width
    return nn.Sequential(*layers, nn.Linear(width_in, n_out))


def paper_cnn(in_channels: int = 1, size: int = 28, classes: int = 10, channels: int = 32
              ) -> nn.Sequential:
    """The DDPNOpt paper's CNN: 4 conv 3x3 (``channels``, ReLU, 2x2 max-pooling after the 2nd and
    4th), then Linear(channels * (size/4)^2, 128), ReLU, Linear(128, classes).

    Example:
        >>> paper_cnn()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    c, s = channels, size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c * s * s, 128), nn.ReLU(), nn.Linear(128, classes))


class ResidualBlock(nn.Module):
    """relu(x + conv(relu(conv(x)))): two 3x3 convolutions of ``channels`` and the identity skip.

    Example:
        >>> ResidualBlock(4)(torch.zeros(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResidualCNN(nn.Module):
    """A small residual CNN: 3x3 stem conv to ``channels`` (ReLU), ``blocks`` x :class:`ResidualBlock`,
    global average pooling, Linear(channels, classes). Not an ``nn.Sequential``: the skips are in
    the blocks' own ``forward``.

    Example:
        >>> ResidualCNN()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, classes: int = 10, channels: int = 32, blocks: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(blocks))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def residual_cnn(in_channels: int = 3, classes: int = 10, channels: int = 32, blocks: int = 3) -> ResidualCNN:
    """:class:`ResidualCNN` (CIFAR-like 3-channel inputs of any size by default).

    Example:
        >>> sum(p.numel() for p in residual_cnn().parameters())
        56714
    """
    return ResidualCNN(in_channels, classes, channels, blocks)


@dataclass
class TrainRecord:
    """What one training run measured, per epoch: mean training loss and test accuracy.

    Attributes:
        optimizer: its name.
        train_loss: mean minibatch loss of each epoch.
        test_accuracy: accuracy on the test split after each epoch.
        seconds: wall time of the optimisation steps (evaluation excluded).
    """

    optimizer: str
    train_loss: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    seconds: float = 0.0


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_ranks(value: float) -> float:
    """The mean of a number over the ranks (one all_reduce); the number itself on one process."""
    if _world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / _world()


def train_classifier(model: nn.Module, data: Split, optimizer: torch.optim.Optimizer, epochs: int = 8,
                     batch_size: int = 32, seed: int = 0, loss_fn: Callable | None = None,
                     name: str = "", checkpoint=None, resume=None) -> TrainRecord:
    """Train ``model`` in place on ``data`` with minibatches drawn by ``seed``.

    A step whose loss is not finite stops the run (logged), keeping what was measured so far.
    ``checkpoint``: a folder where a checkpoint is written at the end of every epoch
    (:mod:`nn_adapter.checkpoint`: model, optimizer, epoch, data order, RNG states, the record so
    far); ``resume``: a folder to continue from (its epochs are not run again, the record
    continues). Data-parallel (``torch.distributed`` initialised, the model a
    ``DistributedDataParallel``), every global minibatch is split into equal shards
    (:func:`nn_adapter.distributed.shard`) and the losses recorded are the global means.
    """
    from .checkpoint import load_checkpoint, save_checkpoint
    from .distributed import shard

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must be >= 1")
    if batch_size % _world():
        raise ValueError(f"batch_size={batch_size} is not divisible by the world size {_world()}")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    record = TrainRecord(optimizer=name or type(optimizer).__name__)
    gen = torch.Generator().manual_seed(seed)
    first = 1
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, gen)
        first = state.epoch + 1
        if isinstance(state.extra, dict):
            record = TrainRecord(**state.extra)
    n = len(data.x_train)
    evaluated = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for epoch in range(first, epochs + 1):
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        start = time.perf_counter()
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            xb, yb = shard(data.x_train[idx], data.y_train[idx])
            loss = optimizer.step(make_closure(model, optimizer, xb, yb, loss_fn))
            loss = _mean_over_ranks(float(loss.detach() if torch.is_tensor(loss) else loss))
            if loss != loss or abs(loss) == float("inf"):
                logger.warning("%s: non-finite loss, training stopped", record.optimizer)
                record.seconds += time.perf_counter() - start
                return record
            total, count = total + loss, count + 1
        record.seconds += time.perf_counter() - start
        record.train_loss.append(total / max(count, 1))
        record.test_accuracy.append(_accuracy(evaluated, data.x_test, data.y_test))
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, epoch, gen, extra=asdict(record))
    return record


def _train_one(job: tuple) -> TrainRecord:
    """One run of :func:`compare_optimizers` (in this process or a worker): the model built under
    ``seed`` (the same initial weights for every optimizer), wrapped in DistributedDataParallel
    when a process group is initialised."""
    make_model, data, name, epochs, batch_size, lr, seed, checkpoint, resume = job
    torch.manual_seed(seed)
    model = make_model()
    if _world() > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(name, model, lr)
    return train_classifier(model, data, opt, epochs, batch_size, seed, name=name,
                            checkpoint=checkpoint, resume=resume)


def compare_optimizers(make_model: Callable[[], nn.Module], data: Split, names, epochs: int = 8,
                       batch_size: int = 32, lr: float | None = None, seed: int = 0,
                       checkpoint=None, resume=None, workers: int = 1) -> dict:
    """Train one fresh copy of the same initial model per optimizer name; ``{name: TrainRecord}``.

    ``checkpoint`` / ``resume``: folders with one subfolder per optimizer name (see
    :func:`train_classifier`). ``workers`` > 1 runs the optimizers in that many processes
    (:func:`nn_adapter.distributed.parallel_map`; ``make_model`` and ``data`` must pickle): the
    records are those of a serial run, times aside.
    """
    from pathlib import Path

    from .distributed import parallel_map

    def sub(folder, name):
        return None if folder is None else Path(folder) / name

    jobs = [(make_model, data, name, epochs, batch_size, lr, seed, sub(checkpoint, name),
             sub(resume, name)) for name in names]
    return dict(zip(names, parallel_map(_train_one, jobs, workers)))
