"""Train a small MLP on DIGITS with DDPNOpt and with Adam; print test accuracy and wall time.

Run: .venv/bin/python examples/train_digits.py     (a few seconds on 2 CPU cores)

DDPNOpt here uses Adam's curvature with the layer-wise feedback of Liu, Chen & Theodorou (ICLR
2021); with ``feedback=False`` it would be Adam update for update. Both runs start from the same
weights and see the same minibatches.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nn_adapter import DDPNOpt  # noqa: E402
from nn_adapter.data import load_digits  # noqa: E402


def make_mlp(width: int = 32, depth: int = 5) -> nn.Sequential:
    """``depth`` Linear layers with Tanh between them: 64 -> width ... -> 10."""
    layers, n_in = [], 64
    for _ in range(depth - 1):
        layers += [nn.Linear(n_in, width), nn.Tanh()]
        n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, 10))


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def train_digits(epochs: int = 8, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                 optimizers=("ddpnopt", "adam")) -> dict:
    """Train the same MLP with each optimizer; return ``{name: {"test_accuracy", "seconds",
    "train_loss"}}`` (``train_loss``: mean loss of the last epoch)."""
    data = load_digits(seed=seed)
    torch.manual_seed(seed)
    init = make_mlp().state_dict()
    n = len(data.x_train)
    results = {}
    for name in optimizers:
        net = make_mlp()
        net.load_state_dict(init)
        if name == "ddpnopt":
            opt = DDPNOpt(net, lr=lr, curvature="adam")
        elif name == "adam":
            opt = torch.optim.Adam(net.parameters(), lr=lr)
        else:
            raise ValueError(f"invalid optimizer: {name!r} (expected 'ddpnopt' or 'adam')")
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            losses = []
            for i in range(0, n - batch_size + 1, batch_size):
                idx = order[i:i + batch_size]
                xb, yb = data.x_train[idx], data.y_train[idx]

                def closure():
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(net(xb), yb)
                    loss.backward()
                    return loss
                losses.append(float(opt.step(closure).detach()))
        seconds = time.perf_counter() - start
        results[name] = {"test_accuracy": _accuracy(net, data.x_test, data.y_test),
                         "seconds": seconds, "train_loss": sum(losses) / len(losses)}
    return results


def main() -> dict:
    torch.set_num_threads(1)
    results = train_digits()
    print("DIGITS, MLP 64-32-32-32-32-10 (Tanh), batch 32, 8 epochs, same initial weights")
    print(f"{'optimizer':10s} {'test accuracy':>14s} {'train loss':>11s} {'time (s)':>9s}")
    for name, r in results.items():
        print(f"{name:10s} {100 * r['test_accuracy']:13.2f}% {r['train_loss']:11.4f} "
              f"{r['seconds']:9.2f}")
    return results


if __name__ == "__main__":
    main()
