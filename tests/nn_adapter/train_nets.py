"""Networks for the `occore train` scale-out tests, given as ``--net PATH:function`` (built again in
every spawned process): ``double_fcn`` computes in float64 (the CLI has no dtype option), so two
ranks can be compared with one process to 1e-10; ``dropout_fcn`` draws from the global torch RNG,
so an exact resume needs the RNG states of the checkpoint."""
import math

import torch
from torch import nn


class ToDouble(nn.Module):
    """Casts the (float32) samples of the data sets to float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def double_fcn(input_shape, num_classes):
    n = math.prod(input_shape)
    return nn.Sequential(ToDouble(), nn.Linear(n, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, num_classes)).double()


def dropout_fcn(input_shape, num_classes):
    n = math.prod(input_shape)
    return nn.Sequential(nn.Linear(n, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, num_classes))
