"""Train a small MLP on DIGITS with DDPNOpt and with Adam; print test accuracy and wall time.

Run: .venv/bin/python examples/train_digits.py     (a few seconds on 2 CPU cores)

DDPNOpt here uses Adam's curvature with the layer-wise feedback of Liu, Chen & Theodorou (ICLR
2021); with ``feedback=False`` it would be Adam update for update. Both runs start from the same
weights and see the same minibatches (``nn_adapter.training``).
"""
from __future__ import annotations

import torch

from nn_adapter.data import load_digits
from nn_adapter.networks import mlp
from nn_adapter.training import compare_optimizers


def train_digits(epochs: int = 8, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                 optimizers=("ddpnopt", "adam")) -> dict:
    """Train the same MLP (64-32-32-32-32-10, tanh) with each optimizer; return ``{name:
    {"test_accuracy", "seconds", "train_loss"}}`` (``train_loss``: mean loss of the last epoch)."""
    records = compare_optimizers(lambda: mlp(64, 10, width=32, depth=5), load_digits(seed=seed), optimizers,
                                 epochs, batch_size, lr, seed)
    return {name: {"test_accuracy": r.test_accuracy[-1], "seconds": r.seconds, "train_loss": r.train_loss[-1]}
            for name, r in records.items()}


def main() -> dict:
    torch.set_num_threads(1)
    results = train_digits()
    print("DIGITS, MLP 64-32-32-32-32-10 (Tanh), batch 32, 8 epochs, same initial weights")
    print(f"{'optimizer':10s} {'test accuracy':>14s} {'train loss':>11s} {'time (s)':>9s}")
    for name, r in results.items():
        print(f"{name:10s} {100 * r['test_accuracy']:13.2f}% {r['train_loss']:11.4f} {r['seconds']:9.2f}")
    return results


if __name__ == "__main__":
    main()
