"""The networks of the DDPNOpt paper's experiments (Liu, Chen & Theodorou, ICLR 2021, Sec. 5), by name.

=================  =========================================================================
``fcn``            5 Linear layers, hidden width 10-32 by data set (:data:`FCN_WIDTH`), Tanh on
                   WINE and DIGITS, ReLU elsewhere (the paper's FCN); images are flattened first
``cnn``            4 conv 3x3 with 32 channels (ReLU, 2x2 max-pooling after the 2nd and 4th), then
                   Linear(32 (S/4)^2, 128), ReLU, Linear(128, classes) (the paper's CNN)
``sigmoid-mlp``    10 Linear layers of width 32 with Sigmoid between them (the vanishing-gradient
                   study, the paper's Fig. 6)
``residual-cnn``   a small residual CNN (:class:`ResidualCNN`; not an ``nn.Sequential``)
=================  =========================================================================

The paper gives no per-data-set widths; ours grow with the data set's size: WINE 10, DIGITS 16
(which also keeps vanilla DDP's exact Q_uu, 1040 x 1040 at the first layer, tractable on two
cores; every optimiser trains the same network), everything else 32.

:func:`build_network` takes a name above or ``"module:function"``: a user function
``function(input_shape, num_classes) -> nn.Module`` found in an importable module (or a ``.py`` file
given by its path, ``path/to/nets.py:function``).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from occore.errors import InputError
from occore.validation import is_integer

__all__ = ["NETWORKS", "FCN_WIDTH", "FCN_ACTIVATION", "build_network", "resolve_network", "fcn", "mlp",
           "paper_cnn", "sigmoid_mlp", "ResidualBlock", "ResidualCNN", "residual_cnn"]

#: Hidden width of the paper's FCN per data set (the paper: "ranging from 10 to 32").
FCN_WIDTH = {"wine": 10, "iris": 10, "breast_cancer": 10, "digits": 16}
#: Tanh on WINE and DIGITS "to better distinguish the differences between optimizers", ReLU elsewhere.
FCN_ACTIVATION = {"wine": "tanh", "digits": "tanh"}
_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def mlp(n_in: int, n_out: int, width: int = 32, depth: int = 3, activation=nn.Tanh) -> nn.Sequential:
    """``depth`` Linear layers with ``activation`` between them: n_in -> width ... -> n_out.

    Shapes: input (B, n_in), output (B, n_out).

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


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise InputError(f"activation={name!r}: expected one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def fcn(input_shape, num_classes: int, width: int = 32, depth: int = 5, activation: str = "relu") -> nn.Sequential:
    """The paper's FCN: ``depth`` Linear layers of ``width`` with ``activation`` between them; a
    leading ``nn.Flatten`` when the samples are not vectors.

    Shapes: input (B, *input_shape), output (B, num_classes).

    Example:
        >>> fcn((1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    n_in = math.prod(input_shape)
    body = mlp(n_in, num_classes, width, depth, _activation(activation))
    if len(input_shape) == 1:
        return body
    return nn.Sequential(nn.Flatten(), *body)


def sigmoid_mlp(input_shape, num_classes: int, width: int = 32, depth: int = 10) -> nn.Sequential:
    """A deep Sigmoid MLP (the vanishing-gradient study): ``depth`` Linear layers of ``width``.

    Example:
        >>> net = sigmoid_mlp((64,), 10)
        >>> sum(isinstance(m, nn.Linear) for m in net), net(torch.zeros(3, 64)).shape
        (10, torch.Size([3, 10]))
    """
    return fcn(input_shape, num_classes, width, depth, "sigmoid")


def paper_cnn(in_channels: int = 1, size: int = 28, classes: int = 10, channels: int = 32
              ) -> nn.Sequential:
    """The DDPNOpt paper's CNN: 4 conv 3x3 (``channels``, ReLU, 2x2 max-pooling after the 2nd and
    4th), then Linear(channels * (size/4)^2, 128), ReLU, Linear(128, classes).

    Shapes: input (B, in_channels, size, size), output (B, classes).

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

    Shapes: input and output (B, channels, H, W).

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

    Shapes: input (B, in_channels, H, W), output (B, classes).

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


# -- by name ---------------------------------------------------------------------------------------
def _image(input_shape, name: str):
    if len(input_shape) != 3 or input_shape[1] != input_shape[2] or input_shape[1] % 4:
        raise InputError(f"--net {name} needs square images (C, S, S) with S divisible by 4, got samples "
                         f"of shape {tuple(input_shape)}")
    return input_shape[0], input_shape[1]


def _build_fcn(input_shape, num_classes, dataset=None, width=None, depth=None):
    return fcn(input_shape, num_classes, width or FCN_WIDTH.get(dataset, 32), depth or 5,
               FCN_ACTIVATION.get(dataset, "relu"))


def _build_cnn(input_shape, num_classes, dataset=None, width=None, depth=None):
    c, s = _image(input_shape, "cnn")
    return paper_cnn(c, s, num_classes, width or 32)


def _build_sigmoid(input_shape, num_classes, dataset=None, width=None, depth=None):
    return sigmoid_mlp(input_shape, num_classes, width or 32, depth or 10)


def _build_residual(input_shape, num_classes, dataset=None, width=None, depth=None):
    if len(input_shape) != 3:
        raise InputError(f"--net residual-cnn needs images (C, H, W), got samples of shape {tuple(input_shape)}")
    return residual_cnn(input_shape[0], num_classes, width or 32, depth or 3)


#: name -> (builder(input_shape, num_classes, dataset, width, depth), description)
NETWORKS = {
    "fcn": (_build_fcn, "the paper's FCN: 5 Linear layers, width 10-32 by data set, Tanh on WINE/DIGITS, else ReLU"),
    "cnn": (_build_cnn, "the paper's CNN: 4 conv 3x3 (32 channels) + 2 Linear layers"),
    "sigmoid-mlp": (_build_sigmoid, "10 Linear layers of width 32 with Sigmoid (vanishing gradients)"),
    "residual-cnn": (_build_residual, "stem conv + 3 residual blocks + average pooling + Linear"),
}


def resolve_network(spec: str) -> Callable:
    """The builder a ``--net`` value names: ``builder(input_shape, num_classes, dataset=None,
    width=None, depth=None) -> nn.Module``, checked (imported) without building anything.

    Raises:
        InputError: an unknown name, a module that cannot be imported or a function that is not
            there or not callable (the message says which).

    Example:
        >>> resolve_network("nn_adapter.networks:sigmoid_mlp")((64,), 10)(torch.zeros(1, 64)).shape
        torch.Size([1, 10])
    """
    if not isinstance(spec, str) or not spec:
        raise InputError(f"net={spec!r}: expected a name ({', '.join(NETWORKS)}) or 'module:function'")
    if spec in NETWORKS:
        return NETWORKS[spec][0]
    if ":" not in spec:
        raise InputError(f"net {spec!r} is unknown; known networks: {', '.join(NETWORKS)}, or "
                         "'module:function' for your own")
    module_name, _, func_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"net {spec!r}: no file {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except Exception as err:   # a user module failing to import is reported in one line
        raise InputError(f"net {spec!r}: cannot import {module_name} ({type(err).__name__}: {err})") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError(f"net {spec!r}: {module_name} has no callable {func_name!r}")

    def build(input_shape, num_classes, dataset=None, width=None, depth=None):
        return func(tuple(input_shape), int(num_classes))
    return build


def build_network(spec: str, input_shape, num_classes: int, dataset: Optional[str] = None,
                  width: Optional[int] = None, depth: Optional[int] = None) -> nn.Module:
    """The network ``spec`` names (see :func:`resolve_network`) for samples of ``input_shape``.

    Args:
        spec: ``fcn``, ``cnn``, ``sigmoid-mlp``, ``residual-cnn`` or ``module:function``.
        input_shape: shape of one sample, e.g. (13,) or (1, 28, 28).
        num_classes: outputs of the network.
        dataset: the data set's name (picks the FCN's width and activation).
        width, depth: override the named network's hidden width / number of layers.

    Raises:
        InputError: see :func:`resolve_network`; ``width``, ``depth`` or ``num_classes`` not an
            integer >= 1; a network that does not suit the inputs; a user function that does not
            return an ``nn.Module``.

    Example:
        >>> build_network("fcn", (13,), 3, dataset="wine")[0]
        Linear(in_features=13, out_features=10, bias=True)
    """
    for name, value in (("width", width), ("depth", depth), ("num_classes", num_classes)):
        if value is None and name != "num_classes":
            continue
        if not (is_integer(value) and value >= 1):
            raise InputError(f"{name}={value!r}: expected an integer >= 1"
                             + (" or None (the network's default)" if name != "num_classes" else ""))
    net = resolve_network(spec)(tuple(input_shape), num_classes, dataset=dataset, width=width, depth=depth)
    if not isinstance(net, nn.Module):
        raise InputError(f"net {spec!r} returned a {type(net).__name__}, expected an nn.Module")
    return net
