"""Classification data sets from local files; nothing is ever downloaded.

=================  ==================================================  ===========================
name               where it comes from                                 samples (train / test)
=================  ==================================================  ===========================
``wine``           scikit-learn (bundled)                              178 x 13, 3 classes
``digits``         scikit-learn (bundled)                              1797 x 64 (8x8), 10 classes
``iris``           scikit-learn (bundled)                              150 x 4, 3 classes
``breast_cancer``  scikit-learn (bundled)                              569 x 30, 2 classes
``fashion-mnist``  IDX files, default ``/usr/share/datasets/fashion-   60000 / 10000 x 1x28x28
                   mnist`` (Debian package ``dataset-fashion-mnist``)
``mnist``          IDX files a user supplies (default                  60000 / 10000 x 1x28x28
                   ``/usr/share/datasets/mnist``)
``cifar10``        the "python version" batches (``data_batch_1..5``,  50000 / 10000 x 3x32x32
                   ``test_batch``, or ``cifar-10-python.tar.gz``),
                   read with a restricted unpickler
``svhn``           ``train_32x32.mat`` / ``test_32x32.mat`` (scipy)    73257 / 26032 x 3x32x32
=================  ==================================================  ===========================

:func:`load` is the one entry point: ``load("wine")`` gives a :class:`Split` of float features
(N, ...) and int64 labels (N,). The scikit-learn sets have no official split: a seeded shuffle
(``split_seed``, independent of any training seed) holds out ``test_fraction``. Features are
standardised with the statistics of the training split only (per feature for the vector sets,
per channel for the image sets; constant features are centred, not scaled). Subsampling
(``n_train``/``n_test``) is seeded and deterministic too. :func:`batch_indices` cuts an epoch
into minibatches; its last partial batch is kept unless ``drop_last=True``.

A missing data set raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) saying where it
looked and how to get the files; a file that is not what its name says (truncated, wrong magic
number, not gzip despite its ``.gz``, label count mismatch, empty, a pickle that asks for anything
but numpy arrays) raises :class:`DataFormatError` (an ``occore.InputError``) naming the file.
"""
from __future__ import annotations

import gzip
import io
import logging
import math
import os
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from occore.errors import InputError, OccoreError
from occore.validation import is_integer, is_real

__all__ = ["Split", "DatasetInfo", "DATASETS", "DataFormatError", "DatasetNotFoundError", "load",
           "load_digits", "load_wine", "load_fashion_mnist", "read_idx", "read_cifar_batch",
           "read_svhn_mat", "standardize", "subsample", "validation_split", "batch_indices",
           "DATA_ROOT", "FASHION_MNIST_DIR", "MNIST_DIR", "CIFAR10_DIR", "SVHN_DIR"]

logger = logging.getLogger("nn_adapter")

PathLike = Union[str, os.PathLike]

#: Where Debian's ``dataset-*`` packages put data sets; the default folders below live under it.
DATA_ROOT = Path("/usr/share/datasets")
FASHION_MNIST_DIR = DATA_ROOT / "fashion-mnist"
MNIST_DIR = DATA_ROOT / "mnist"
CIFAR10_DIR = DATA_ROOT / "cifar-10"
SVHN_DIR = DATA_ROOT / "svhn"

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


# -- errors ----------------------------------------------------------------------------------------
class DataFormatError(InputError):
    """A data file is malformed; the message starts with the file's path.

    Attributes:
        path: the file (a :class:`pathlib.Path`; for a member of an archive, ``archive/member``).

    Example:
        >>> str(DataFormatError("/tmp/x.idx", "is empty"))
        '/tmp/x.idx: is empty'
    """

    def __init__(self, path: PathLike, problem: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")


class DatasetNotFoundError(OccoreError, FileNotFoundError):
    """A data set's files are not where the loader looked; the message says where and how to get them.

    Attributes:
        dataset: the data set's name.
        searched: the folder that was searched.
        missing: the file names (or patterns) not found there.

    Example:
        >>> err = DatasetNotFoundError("mnist", "/nowhere", ["train-images-idx3-ubyte[.gz]"], "supply them")
        >>> isinstance(err, FileNotFoundError), err.dataset
        (True, 'mnist')
    """

    def __init__(self, dataset: str, searched: PathLike, missing, how: str):
        self.dataset, self.searched, self.missing = dataset, Path(searched), list(missing)
        super().__init__(f"{dataset}: {', '.join(self.missing)} not found in {searched}; {how} "
                         "(data sets are never downloaded)")


# -- the split -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """A train/test split: ``x_train`` (N, ...), ``y_train`` (N,) int64, ``x_test`` (M, ...), ``y_test`` (M,).

    Attributes:
        classes: the number of classes (None: one more than the largest label seen).
        name: what was loaded, for messages and reports.

    Example:
        >>> s = load("wine")
        >>> s.x_train.shape[1], s.num_classes, s.input_shape
        (13, 3, (13,))
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: Optional[int] = None
    name: str = ""

    def __repr__(self) -> str:
        return (f"Split({self.name or 'unnamed'}: train {tuple(self.x_train.shape)}, test "
                f"{tuple(self.x_test.shape)}, {self.num_classes} classes, {self.x_train.dtype})")

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return self.classes
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple:
        """The shape of one sample, e.g. (13,) or (1, 28, 28)."""
        return tuple(self.x_train.shape[1:])


def _tensors(x: np.ndarray, y: np.ndarray, dtype) -> tuple:
    return (torch.as_tensor(np.ascontiguousarray(x)).to(dtype),
            torch.as_tensor(np.ascontiguousarray(y).astype(np.int64)))


def _check_fraction(name: str, value) -> None:
    if not (is_real(value) and not is_integer(value) and 0.0 < value < 1.0):
        raise InputError(f"{name}={value!r}: expected a float with 0 < {name} < 1")


def _check_seed(name: str, value) -> None:
    if not (is_integer(value) and value >= 0):
        raise InputError(f"{name}={value!r}: expected an integer >= 0")


def _check_count(name: str, value) -> None:
    """``value`` is None or an integer >= 1 (a sample count)."""
    if value is not None and not (is_integer(value) and value >= 1):
        raise InputError(f"{name}={value!r}: expected an integer >= 1 or None")


def _check_dtype(dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype={dtype!r}: expected a floating torch.dtype")


def _seeded_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, dtype, classes: int,
                  name: str) -> Split:
    _check_fraction("test_fraction", test_fraction)
    _check_seed("seed", seed)
    _check_dtype(dtype)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(test_fraction * len(x))))
    test, train = order[:n_test], order[n_test:]
    return Split(*_tensors(x[train], y[train], dtype), *_tensors(x[test], y[test], dtype),
                 classes=classes, name=name)


# -- preprocessing ---------------------------------------------------------------------------------
def standardize(split: Split, per: str = "feature") -> Split:
    """The split with features standardised by the training split's mean and std (a new Split).

    Args:
        split: features (N, D) or images (N, C, H, W).
        per: ``"feature"`` (every coordinate, D statistics) or ``"channel"`` (images: one mean and
            std per channel, over all pixels of the training images).

    Constant features (std below 1e-8) are centred and left unscaled. The statistics are computed
    in float64; the result keeps the split's dtype. The tensors of ``split`` are not modified.

    Example:
        >>> s = standardize(Split(torch.tensor([[0.0], [2.0]]), torch.tensor([0, 1]),
        ...                       torch.tensor([[4.0]]), torch.tensor([1])))
        >>> s.x_train.flatten().tolist(), s.x_test.flatten().tolist()
        ([-0.7071067690849304, 0.7071067690849304], [2.1213202476501465])
    """
    if per not in ("feature", "channel"):
        raise InputError(f"per={per!r}: expected 'feature' or 'channel'")
    x_tr, x_te = split.x_train.double(), split.x_test.double()
    if per == "channel":
        if x_tr.dim() != 4:
            raise InputError(f"per='channel' needs images (N, C, H, W), got features {tuple(x_tr.shape)}")
        dims, keep = (0, 2, 3), (1, -1, 1, 1)
        mean, std = x_tr.mean(dims).view(keep), x_tr.std(dims).view(keep)
    else:
        mean, std = x_tr.mean(0), x_tr.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    dt = split.x_train.dtype
    return replace(split, x_train=((x_tr - mean) / std).to(dt), x_test=((x_te - mean) / std).to(dt))


def _take(n: Optional[int], total: int, what: str, rng) -> Optional[np.ndarray]:
    _check_count(what, n)
    if n is None:
        return None
    n = min(n, total)
    return np.arange(n) if rng is None else np.sort(rng.permutation(total)[:n])


def subsample(split: Split, n_train: Optional[int] = None, n_test: Optional[int] = None,
              seed: Optional[int] = 0) -> Split:
    """At most ``n_train`` training and ``n_test`` test samples (None: all of them).

    ``seed``: a seeded random choice of samples (kept in their original order); None: the first
    ones. The tensors of ``split`` are not modified.

    Example:
        >>> s = subsample(load("wine"), n_train=10, n_test=5)
        >>> len(s.x_train), len(s.x_test)
        (10, 5)
    """
    if seed is not None:
        _check_seed("seed", seed)
    rng = None if seed is None else np.random.default_rng(seed)
    tr = _take(n_train, len(split.x_train), "n_train", rng)
    te = _take(n_test, len(split.x_test), "n_test", rng)
    out = split
    if tr is not None:
        idx = torch.as_tensor(tr)
        out = replace(out, x_train=split.x_train[idx], y_train=split.y_train[idx])
    if te is not None:
        idx = torch.as_tensor(te)
        out = replace(out, x_test=split.x_test[idx], y_test=split.y_test[idx])
    return out


def validation_split(split: Split, fraction: float = 0.2, seed: int = 0) -> Split:
    """A seeded share ``fraction`` of the *training* split held out: a Split whose test part is the
    validation set (for choosing hyperparameters without looking at the test set).

    Example:
        >>> v = validation_split(load("wine"), 0.25)
        >>> len(v.x_train) + len(v.x_test) == len(load("wine").x_train)
        True
    """
    _check_fraction("fraction", fraction)
    _check_seed("seed", seed)
    n = len(split.x_train)
    order = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    n_val = max(1, int(round(fraction * n)))
    val, train = order[:n_val], order[n_val:]
    return Split(split.x_train[train], split.y_train[train], split.x_train[val], split.y_train[val],
                 classes=split.num_classes, name=f"{split.name} (validation)")


def batch_indices(n: int, batch_size: int, generator: Optional[torch.Generator] = None,
                  drop_last: bool = False) -> list:
    """One epoch of minibatch indices: a permutation of range(n) (drawn from ``generator``; None:
    in order) cut into batches of ``batch_size``. The last partial batch is kept unless
    ``drop_last`` (an epoch with no full batch is then empty).

    Example:
        >>> [b.tolist() for b in batch_indices(5, 2)]
        [[0, 1], [2, 3], [4]]
        >>> [b.tolist() for b in batch_indices(5, 2, drop_last=True)]
        [[0, 1], [2, 3]]
    """
    if not (is_integer(batch_size) and batch_size >= 1):
        raise InputError(f"batch_size={batch_size!r}: expected an integer >= 1")
    order = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


# -- scikit-learn ------------------------------------------------------------------------------------
def _sklearn(name: str):
    import sklearn.datasets as skd

    d = getattr(skd, f"load_{name}")()
    x = d.data.astype(np.float64)
    if name == "digits":
        x = x / 16.0
    return x, d.target, len(d.target_names)


def load_digits(test_fraction: float = 0.2, seed: int = 0, images: bool = False,
                dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's DIGITS, pixel values scaled to [0, 1] (not standardised).

    Args:
        test_fraction: share of the samples held out for testing.
        seed: seed of the shuffle.
        images: (N, 1, 8, 8) images instead of (N, 64) vectors.
        dtype: floating dtype of the features.

    Example:
        >>> load_digits(images=True).x_train.shape[1:]
        torch.Size([1, 8, 8])
    """
    x, y, c = _sklearn("digits")
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return _seeded_split(x, y, test_fraction, seed, dtype, c, "digits")


def load_wine(test_fraction: float = 0.2, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's WINE, features standardised with the training split's mean and std.

    Example:
        >>> float(load_wine(dtype=torch.float64).x_train.mean()) < 1e-12
        True
    """
    x, y, c = _sklearn("wine")
    return _cast(standardize(_seeded_split(x, y, test_fraction, seed, torch.float64, c, "wine")), dtype)


def _cast(split: Split, dtype) -> Split:
    return replace(split, x_train=split.x_train.to(dtype), x_test=split.x_test.to(dtype))


# -- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they are gzip data; typed errors name the file."""
    raw = path.read_bytes()
    if not raw:
        raise DataFormatError(path, "is empty")
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise DataFormatError(path, f"is a truncated or corrupt gzip stream ({err})") from err
        if not raw:
            raise DataFormatError(path, "is empty once gunzipped")
    elif path.suffix == ".gz":
        raise DataFormatError(path, "is named .gz but is not gzip-compressed (no gzip magic number)")
    return raw


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not, into a numpy array.

    Returns:
        The array with the shape its header announces, in native byte order.

    Raises:
        FileNotFoundError: the file does not exist.
        DataFormatError: empty, not gzip despite ``.gz``, truncated gzip, bad magic number,
            truncated header, or a data size the header does not announce.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.idx"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]))
        >>> read_idx(p).tolist()
        [7, 9]
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataFormatError(path, f"is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(path, f"has a truncated IDX header ({len(raw)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        what = "is truncated" if len(raw) - header < expected else "has trailing bytes"
        raise DataFormatError(path, f"{what}: it holds {len(raw) - header} data bytes, the header "
                              f"announces {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, names, dataset: str, how: str) -> Path:
    for name in names:
        for candidate in (name, name + ".gz"):
            if (root / candidate).is_file():
                return root / candidate
    raise DatasetNotFoundError(dataset, root, [f"{names[0]}[.gz]"], how)


_IDX_HOW = {
    "fashion-mnist": "install the Debian package dataset-fashion-mnist (apt-get install "
                     "dataset-fashion-mnist) or pass --data-dir / data_dir= a folder with the four IDX files",
    "mnist": "MNIST is never bundled here: pass --data-dir / data_dir= a folder with "
             "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
             "t10k-labels-idx1-ubyte (optionally .gz)",
}


def _load_idx_set(root: Path, dataset: str, dtype) -> Split:
    how = _IDX_HOW[dataset]
    if not root.is_dir():
        raise DatasetNotFoundError(dataset, root, ["the folder"], how)
    parts = []
    for prefix in ("train", "t10k"):
        images_path = _find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"], dataset, how)
        labels_path = _find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"], dataset, how)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataFormatError(images_path, f"expected uint8 images (N, H, W), got {images.dtype} "
                                  f"{images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataFormatError(labels_path, f"expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
        if len(labels) != len(images):
            raise DataFormatError(labels_path, f"holds {len(labels)} labels for the {len(images)} images "
                                  f"of {images_path.name}")
        if len(labels) == 0:
            raise DataFormatError(labels_path, "holds no samples")
        if int(labels.max()) >= 10:
            raise DataFormatError(labels_path, f"label {int(labels.max())} outside 0..9")
        x = images[:, None, :, :].astype(np.float32) / 255.0
        parts += _tensors(x, labels, dtype)
    return Split(*parts, classes=10, name=dataset)


def load_fashion_mnist(root: Optional[PathLike] = None, dtype: torch.dtype = torch.float32,
                       limit: Optional[int] = None) -> Split:
    """Fashion-MNIST (or MNIST) from IDX files: images (N, 1, 28, 28) scaled to [0, 1].

    Args:
        root: folder with ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``; default
            :data:`FASHION_MNIST_DIR`.
        limit: keep only the first ``limit`` samples of each split.

    Raises:
        InputError: ``limit`` not None or an integer >= 1, ``dtype`` not floating (before any
            file is looked for).
        DatasetNotFoundError: a file is missing (the message says how to get them).
        DataFormatError: a file is malformed or images and labels disagree in number.

    Example:
        >>> try:
        ...     load_fashion_mnist("/nonexistent")
        ... except DatasetNotFoundError as err:
        ...     print(err.dataset, err.searched)
        fashion-mnist /nonexistent
    """
    _check_count("limit", limit)          # the options before any file is looked for
    _check_dtype(dtype)
    split = _load_idx_set(Path(root) if root is not None else FASHION_MNIST_DIR, "fashion-mnist", dtype)
    return subsample(split, limit, limit, seed=None) if limit is not None else split


# -- CIFAR-10 (python batches) ----------------------------------------------------------------------
def _numpy_reconstruct():
    """numpy's array-unpickling helper (``numpy._core`` since numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:   # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 pickles (protocol 2) of ``bytes`` use it, latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays of plain dtypes, nothing else:
    any other global (the way a pickle runs code) is refused with a DataFormatError. The official
    batches (Python 2 pickles) need numpy's ``_reconstruct``, ``ndarray`` and ``dtype``; a batch
    re-pickled by Python 3 with protocol 2 also needs ``_codecs.encode`` (allowed for latin-1)."""

    def __init__(self, data: bytes, where: PathLike):
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.where = where

    def find_class(self, module, name):
        allowed = {("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
                   ("numpy", "ndarray"): lambda: np.ndarray, ("numpy", "dtype"): lambda: np.dtype,
                   ("_codecs", "encode"): lambda: _latin1_encode}
        if (module, name) not in allowed:
            raise DataFormatError(self.where, f"refused to unpickle {module}.{name}: a CIFAR batch "
                                  "holds only numpy arrays, lists and strings")
        return allowed[(module, name)]()

    def persistent_load(self, pid):
        raise DataFormatError(self.where, "refused a persistent id in the pickle")


def read_cifar_batch(data: bytes, where: PathLike) -> tuple:
    """One CIFAR-10 python batch (the pickled dict of the official archive) from its bytes.

    Args:
        data: the file's bytes.
        where: the file (named in errors).

    Returns:
        ``(images, labels)``: uint8 (N, 3, 32, 32) and int64 (N,).

    Raises:
        DataFormatError: empty, truncated, not a pickle, a pickle asking for anything but numpy
            arrays, no ``data``/``labels`` entries, or sizes that disagree.

    Example:
        >>> import pickle, numpy as np
        >>> blob = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 4]}, protocol=2)
        >>> x, y = read_cifar_batch(blob, "batch")
        >>> x.shape, y.tolist()
        ((2, 3, 32, 32), [3, 4])
    """
    if not data:
        raise DataFormatError(where, "is empty")
    try:
        obj = _ArrayUnpickler(data, where).load()
    except DataFormatError:
        raise
    except Exception as err:   # any failure of the pickle parser: truncated, not a pickle, ...
        raise DataFormatError(where, f"is not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DataFormatError(where, f"holds a {type(obj).__name__}, expected the dict of a CIFAR-10 batch")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in entries or "labels" not in entries:
        raise DataFormatError(where, f"has no 'data' and 'labels' entries (keys: {sorted(map(str, entries))})")
    x, labels = entries["data"], entries["labels"]
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        raise DataFormatError(where, f"'data' must be uint8 (N, 3072), got "
                              f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataFormatError(where, f"'labels' are not integers ({err})") from err
    if y.ndim != 1 or len(y) != len(x):
        raise DataFormatError(where, f"holds {y.size} labels for {len(x)} images")
    if len(y) == 0:
        raise DataFormatError(where, "holds no samples")
    if y.min() < 0 or y.max() > 9:
        raise DataFormatError(where, f"labels outside 0..9 (min {y.min()}, max {y.max()})")
    return x.reshape(-1, 3, 32, 32), y


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_CIFAR_HOW = ("pass --data-dir / data_dir= the folder holding cifar-10-batches-py/ (data_batch_1..5 and "
              "test_batch) or cifar-10-python.tar.gz, the official 'CIFAR-10 python version'")


def _cifar_blobs(root: Path) -> list:
    """``[(where, bytes)]`` of the six batches: a folder of batches or the official archive."""
    for folder in (root, root / "cifar-10-batches-py"):
        if all((folder / f).is_file() for f in _CIFAR_FILES):
            return [(folder / f, (folder / f).read_bytes()) for f in _CIFAR_FILES]
    archive = root / "cifar-10-python.tar.gz"
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [f for f in _CIFAR_FILES if f not in members]
                if missing:
                    raise DataFormatError(archive, f"has no member(s) {', '.join(missing)}")
                return [(f"{archive}/{members[f].name}", tar.extractfile(members[f]).read())
                        for f in _CIFAR_FILES]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DataFormatError(archive, f"is not a readable tar archive ({err})") from err
    raise DatasetNotFoundError("cifar10", root, ["cifar-10-batches-py/{data_batch_1..5,test_batch}",
                                                 "cifar-10-python.tar.gz"], _CIFAR_HOW)


def _load_cifar10(root: Path, dtype) -> Split:
    blobs = _cifar_blobs(root)
    batches = [read_cifar_batch(data, where) for where, data in blobs]
    x_tr = np.concatenate([b[0] for b in batches[:5]])
    y_tr = np.concatenate([b[1] for b in batches[:5]])
    x_te, y_te = batches[5]
    scale = lambda a: a.astype(np.float32) / 255.0  # noqa: E731
    return Split(*_tensors(scale(x_tr), y_tr, dtype), *_tensors(scale(x_te), y_te, dtype),
                 classes=10, name="cifar10")


# -- SVHN (.mat, format 2) ----------------------------------------------------------------------------
def read_svhn_mat(path: PathLike) -> tuple:
    """One SVHN "format 2" file (``train_32x32.mat`` / ``test_32x32.mat``): ``X`` (32, 32, 3, N)
    uint8 and ``y`` (N, 1) with labels 1..10 (10 is the digit 0).

    Returns:
        ``(images, labels)``: uint8 (N, 3, 32, 32) and int64 (N,) in 0..9.

    Raises:
        DataFormatError: empty, truncated or not a MATLAB file, no ``X``/``y``, wrong shapes, or a
            label count that disagrees with the images.

    Example:
        >>> import tempfile, pathlib, numpy as np, scipy.io
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.mat"
        >>> scipy.io.savemat(p, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[10], [3]])})
        >>> x, y = read_svhn_mat(p)
        >>> x.shape, y.tolist()
        ((2, 3, 32, 32), [0, 3])
    """
    import scipy.io

    path = Path(path)
    if path.stat().st_size == 0:
        raise DataFormatError(path, "is empty")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:   # scipy's parser raises many types (ValueError, MatReadError, ...)
        raise DataFormatError(path, f"is not a readable MATLAB (v5) file ({type(err).__name__}: {err})") from err
    if "X" not in mat or "y" not in mat:
        raise DataFormatError(path, f"has no 'X' and 'y' variables (found: "
                              f"{sorted(k for k in mat if not k.startswith('__'))})")
    x, y = mat["X"], np.asarray(mat["y"])
    if not (x.ndim == 4 and x.shape[:3] == (32, 32, 3) and x.dtype == np.uint8):
        raise DataFormatError(path, f"'X' must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1).astype(np.int64)
    if len(y) != x.shape[3]:
        raise DataFormatError(path, f"holds {len(y)} labels for {x.shape[3]} images")
    if len(y) == 0:
        raise DataFormatError(path, "holds no samples")
    if y.min() < 1 or y.max() > 10:
        raise DataFormatError(path, f"labels outside 1..10 (min {y.min()}, max {y.max()})")
    return np.transpose(x, (3, 2, 0, 1)), y % 10


_SVHN_HOW = ("pass --data-dir / data_dir= the folder holding train_32x32.mat and test_32x32.mat "
             "(SVHN 'format 2', cropped digits)")


def _load_svhn(root: Path, dtype) -> Split:
    files = [root / "train_32x32.mat", root / "test_32x32.mat"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DatasetNotFoundError("svhn", root, missing, _SVHN_HOW)
    (x_tr, y_tr), (x_te, y_te) = (read_svhn_mat(f) for f in files)
    scale = lambda a: a.astype(np.float32) / 255.0  # noqa: E731
    return Split(*_tensors(scale(x_tr), y_tr, dtype), *_tensors(scale(x_te), y_te, dtype),
                 classes=10, name="svhn")


# -- the registry --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`load` knows about a data set.

    Attributes:
        name: the name :func:`load` takes.
        kind: ``"vectors"`` (features (N, D), standardised per feature) or ``"images"``
            ((N, C, H, W), standardised per channel).
        default_dir: the folder searched when no ``data_dir`` is given (None: bundled).
        source: where it comes from, in words.

    Example:
        >>> DATASETS["fashion-mnist"].default_dir
        PosixPath('/usr/share/datasets/fashion-mnist')
    """

    name: str
    kind: str
    default_dir: Optional[Path]
    source: str


DATASETS = {
    "wine": DatasetInfo("wine", "vectors", None, "scikit-learn (bundled)"),
    "digits": DatasetInfo("digits", "vectors", None, "scikit-learn (bundled)"),
    "iris": DatasetInfo("iris", "vectors", None, "scikit-learn (bundled)"),
    "breast_cancer": DatasetInfo("breast_cancer", "vectors", None, "scikit-learn (bundled)"),
    "fashion-mnist": DatasetInfo("fashion-mnist", "images", FASHION_MNIST_DIR,
                                 "IDX files (Debian package dataset-fashion-mnist)"),
    "mnist": DatasetInfo("mnist", "images", MNIST_DIR, "IDX files a user supplies"),
    "cifar10": DatasetInfo("cifar10", "images", CIFAR10_DIR, "CIFAR-10 python batches a user supplies"),
    "svhn": DatasetInfo("svhn", "images", SVHN_DIR, "SVHN .mat files (format 2) a user supplies"),
}

_FILE_LOADERS: dict = {
    "fashion-mnist": lambda root, dtype: _load_idx_set(root, "fashion-mnist", dtype),
    "mnist": lambda root, dtype: _load_idx_set(root, "mnist", dtype),
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
}


def load(name: str, data_dir: Optional[PathLike] = None, *, standardize_features: Union[bool, str] = True,
         test_fraction: float = 0.2, split_seed: int = 0, n_train: Optional[int] = None,
         n_test: Optional[int] = None, subsample_seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """Load a data set of :data:`DATASETS` by name.

    Args:
        name: ``wine``, ``digits``, ``iris``, ``breast_cancer``, ``fashion-mnist``, ``mnist``,
            ``cifar10`` or ``svhn``.
        data_dir: the folder of a file-based set (default: its ``DatasetInfo.default_dir``).
        standardize_features: True: per feature (vector sets) or per channel (image sets) with the
            training split's statistics; ``"feature"`` / ``"channel"`` to choose; False: raw
            (pixels in [0, 1]).
        test_fraction: held-out share of the scikit-learn sets (the others have official splits).
        split_seed: seed of that held-out share.
        n_train, n_test: subsample to at most this many samples (seeded by ``subsample_seed``),
            before standardising.
        dtype: floating dtype of the features.

    Raises:
        InputError: an unknown name or a bad option (raised before any file is read).
        DatasetNotFoundError: the files are not there (the message says where it looked).
        DataFormatError: a file is malformed (the message names it).

    Example:
        >>> s = load("digits")
        >>> s.input_shape, s.num_classes, len(s.x_train), len(s.x_test)
        ((64,), 10, 1438, 359)
    """
    if name not in DATASETS:
        raise InputError(f"dataset {name!r} is unknown; known data sets: {', '.join(DATASETS)}")
    info = DATASETS[name]
    per = {"vectors": "feature", "images": "channel"}[info.kind]
    if standardize_features not in (True, False, "feature", "channel"):
        raise InputError(f"standardize_features={standardize_features!r}: expected True, False, "
                         "'feature' or 'channel'")
    if isinstance(standardize_features, str):
        per = standardize_features
    if info.kind == "vectors" and per == "channel" and standardize_features:
        raise InputError(f"standardize_features='channel' needs images; {name} holds feature vectors")
    _check_dtype(dtype)
    _check_fraction("test_fraction", test_fraction)
    for what, v in (("split_seed", split_seed), ("subsample_seed", subsample_seed)):
        _check_seed(what, v)
    for what, v in (("n_train", n_train), ("n_test", n_test)):
        _check_count(what, v)
    if info.default_dir is None:
        x, y, classes = _sklearn(name)
        split = _seeded_split(x, y, test_fraction, split_seed, torch.float64, classes, name)
    else:
        root = Path(data_dir) if data_dir is not None else info.default_dir
        split = _FILE_LOADERS[name](root, torch.float64 if standardize_features else dtype)
    if n_train is not None or n_test is not None:
        split = subsample(split, n_train, n_test, seed=subsample_seed)
    if standardize_features:
        split = standardize(split, per)
    logger.info("loaded %s: %d train / %d test samples of shape %s", name, len(split.x_train),
                len(split.x_test), split.input_shape)
    return _cast(split, dtype)
