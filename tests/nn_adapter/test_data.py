"""Data loaders: scikit-learn's DIGITS and WINE, IDX files (no downloads)."""
import gzip
import struct

import numpy as np
import pytest
import torch

from nn_adapter.data import load_digits, load_fashion_mnist, load_wine, read_idx
from occore.errors import InputError


def test_digits_split_shapes_and_range():
    s = load_digits(test_fraction=0.25, seed=1)
    assert s.x_train.shape[1] == 64 and len(s.x_train) + len(s.x_test) == 1797
    assert len(s.x_test) == round(0.25 * 1797)
    assert 0.0 <= float(s.x_train.min()) and float(s.x_train.max()) <= 1.0
    assert s.num_classes == 10 and s.y_train.dtype == torch.int64
    img = load_digits(images=True, dtype=torch.float64)
    assert img.x_train.shape[1:] == (1, 8, 8) and img.x_train.dtype == torch.float64
    again = load_digits(test_fraction=0.25, seed=1)
    assert torch.equal(s.x_train, again.x_train)


def test_wine_is_standardised_on_the_training_split():
    s = load_wine(dtype=torch.float64)
    assert s.x_train.shape[1] == 13 and s.num_classes == 3
    assert torch.allclose(s.x_train.mean(0), torch.zeros(13, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(s.x_train.std(0), torch.ones(13, dtype=torch.float64), atol=1e-10)
    with pytest.raises(ValueError, match="test_fraction"):
        load_wine(test_fraction=1.5)


def _write_idx(path, array, code=0x08, gz=False):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(data)


def test_read_idx_round_trip_and_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", a)
    _write_idx(tmp_path / "a.idx.gz", a, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)
    f = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    _write_idx(tmp_path / "f.idx", f, code=0x0D)
    assert np.allclose(read_idx(tmp_path / "f.idx"), f)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(InputError, match="magic"):
        read_idx(tmp_path / "bad.idx")
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-3])
    with pytest.raises(InputError, match="header announces"):
        read_idx(tmp_path / "short.idx")


def test_fashion_mnist_from_user_supplied_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), gz=True)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte",
                   rng.integers(0, 10, n).astype(np.uint8))
    s = load_fashion_mnist(tmp_path, limit=5)
    assert s.x_train.shape == (5, 1, 28, 28) and s.x_test.shape == (3, 1, 28, 28)
    assert float(s.x_train.max()) <= 1.0 and s.y_test.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_fashion_mnist(tmp_path / "missing")


@pytest.mark.parametrize("call,words", [
    (lambda: load_digits(seed=-1), r"^seed=-1: expected an integer >= 0"),
    (lambda: load_wine(seed="a"), r"^seed='a'"),
    (lambda: load_digits(dtype=torch.int64), r"^dtype=torch\.int64: expected a floating"),
    # the options are refused before any file is looked for (no such folder here)
    (lambda: load_fashion_mnist("/nonexistent", limit=0), r"^limit=0: expected an integer >= 1"),
    (lambda: load_fashion_mnist("/nonexistent", limit=-3), r"^limit=-3"),
    (lambda: load_fashion_mnist("/nonexistent", limit=True), r"^limit=True"),
    (lambda: load_fashion_mnist("/nonexistent", dtype=torch.uint8), r"^dtype=torch\.uint8"),
])
def test_loader_options_are_refused_by_their_own_names_before_any_file(call, words):
    with pytest.raises(InputError, match=words):
        call()


def test_a_split_prints_as_one_line():
    text = repr(load_digits())
    assert text == "Split(digits: train (1438, 64), test (359, 64), 10 classes, torch.float32)"
