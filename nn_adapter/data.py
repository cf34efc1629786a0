"""Small data sets for examples and benchmarks; nothing is ever downloaded.

* DIGITS (1797 8x8 images, 10 classes) and WINE (178 x 13, 3 classes) come bundled with
  scikit-learn.
* Fashion-MNIST / MNIST are read from IDX files a user supplies (the Debian package
  ``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist/``).

Every loader returns a :class:`Split` of float tensors (features) and int64 tensors (labels).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from occore.errors import InputError

__all__ = ["Split", "load_digits", "load_wine", "read_idx", "load_fashion_mnist",
           "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class Split:
    """A train/test split: ``x_train`` (N, ...), ``y_train`` (N,), ``x_test``, ``y_test``.

    Example:
        >>> s = load_wine()
        >>> s.x_train.shape[1], s.num_classes
        (13, 3)
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, dtype) -> Split:
    if not (isinstance(test_fraction, float) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"invalid test_fraction: {test_fraction!r} (expected 0 < f < 1)")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(test_fraction * len(x))))
    test, train = order[:n_test], order[n_test:]
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a))  # noqa: E731
    return Split(t(x[train]).to(dtype), t(y[train]).long(), t(x[test]).to(dtype),
                 t(y[test]).long())


def load_digits(test_fraction: float = 0.2, seed: int = 0, images: bool = False,
                dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's DIGITS, pixel values scaled to [0, 1].

    Args:
        test_fraction: share of the samples held out for testing.
        seed: seed of the shuffle.
        images: (N, 1, 8, 8) images instead of (N, 64) vectors.
        dtype: floating dtype of the features.
    """
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = d.data.astype(np.float64) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return _split(x, d.target, test_fraction, seed, dtype)


def load_wine(test_fraction: float = 0.2, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's WINE, features standardised with the training split's mean and std."""
    from sklearn.datasets import load_wine as sk_load

    d = sk_load()
    s = _split(d.data.astype(np.float64), d.target, test_fraction, seed, torch.float64)
    mean, std = s.x_train.mean(0), s.x_train.std(0).clamp_min(1e-12)
    return Split(((s.x_train - mean) / std).to(dtype), s.y_train,
                 ((s.x_test - mean) / std).to(dtype), s.y_test)


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not, into a numpy array.

    Raises:
        FileNotFoundError: the file does not exist.
        occore.InputError: the content is not a valid IDX file (bad magic, type or size).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise InputError(f"path: {path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise InputError(f"path: {path} has a truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise InputError(f"path: {path} holds {len(raw) - header} data bytes, the header "
                         f"announces {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {root}; Fashion-MNIST is never downloaded: install the "
        "Debian package dataset-fashion-mnist or pass root= a folder with the IDX files")


def load_fashion_mnist(root: Optional[Union[str, os.PathLike]] = None,
                       dtype: torch.dtype = torch.float32, limit: Optional[int] = None) -> Split:
    """Fashion-MNIST (or MNIST) from IDX files: images (N, 1, 28, 28) scaled to [0, 1].

    Args:
        root: folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``; default
            :data:`FASHION_MNIST_DIR`.
        limit: keep only the first ``limit`` samples of each split.

    Raises:
        FileNotFoundError: a file is missing (the message says how to get them).
        occore.InputError: a file is malformed or images and labels disagree in number.
    """
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise InputError(f"root: {prefix} images {images.shape} and labels {labels.shape} "
                             "do not match")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        x = torch.as_tensor(images.astype(np.float32) / 255.0).unsqueeze(1).to(dtype)
        parts += [x, torch.as_tensor(labels.astype(np.int64))]
    return Split(*parts)
