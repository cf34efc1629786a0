"""File-based data sets (MNIST / Fashion-MNIST IDX, CIFAR-10 python batches, SVHN .mat) on small
files the tests write, good and malformed: every bad file is a DataFormatError naming it."""
import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import scipy.io
import torch

from nn_adapter import data
from nn_adapter.data import DataFormatError, DatasetNotFoundError, load, read_cifar_batch, read_idx, read_svhn_mat
from occore.errors import InputError


def _idx_bytes(array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx_set(folder, n_train=6, n_test=4, gz=True, size=8):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = _idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def test_mnist_from_generated_idx_files(tmp_path):
    root = _write_idx_set(tmp_path / "mnist")
    raw = load("mnist", root, standardize_features=False, dtype=torch.float64)
    assert raw.x_train.shape == (6, 1, 8, 8) and raw.x_test.shape == (4, 1, 8, 8)
    assert raw.y_train.tolist() == [0, 1, 2, 3, 4, 5] and raw.num_classes == 10
    assert 0.0 <= float(raw.x_train.min()) and float(raw.x_train.max()) <= 1.0
    std = load("mnist", root, dtype=torch.float64)       # per channel, training statistics
    assert abs(float(std.x_train.mean())) < 1e-12 and abs(float(std.x_train.std()) - 1) < 1e-12
    assert load("fashion-mnist", _write_idx_set(tmp_path / "f", gz=False)).x_train.shape == (6, 1, 8, 8)


@pytest.mark.parametrize("name, content, message", [
    ("empty.idx", b"", "is empty"),
    ("magic.idx", b"\x00\x00\x42\x01" + b"\x00" * 8, "bad magic number"),
    ("plain.idx.gz", _idx_bytes(np.zeros(3, np.uint8)), "not gzip-compressed"),
    ("cut.idx.gz", gzip.compress(_idx_bytes(np.zeros(300, np.uint8)))[:-20], "truncated or corrupt gzip"),
    ("short.idx", _idx_bytes(np.zeros((2, 3), np.uint8))[:-1], "is truncated"),
    ("header.idx", b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    ("long.idx", _idx_bytes(np.zeros(3, np.uint8)) + b"\x00", "trailing bytes"),
])
def test_malformed_idx_files_are_typed_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as err:
        read_idx(path)
    assert err.value.path == path and str(err.value).startswith(str(path))
    assert isinstance(err.value, InputError)


def test_idx_label_count_mismatch_names_the_labels_file(tmp_path):
    root = _write_idx_set(tmp_path)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(DataFormatError, match="3 labels for the 4 images") as err:
        load("mnist", root)
    assert err.value.path.name == "t10k-labels-idx1-ubyte.gz"


def test_missing_sets_say_where_they_looked_and_how_to_get_them(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="never downloaded") as err:
        load("mnist", tmp_path)
    assert err.value.searched == tmp_path and "train-images-idx3-ubyte" in str(err.value)
    for name, hint in (("fashion-mnist", "dataset-fashion-mnist"), ("cifar10", "cifar-10-python.tar.gz"),
                       ("svhn", "train_32x32.mat")):
        with pytest.raises(FileNotFoundError, match=hint):
            load(name, tmp_path / "nowhere")


# -- CIFAR-10 -------------------------------------------------------------------------------------
def _cifar_batch(n, seed, protocol=2):
    rng = np.random.default_rng(seed)
    return pickle.dumps({b"batch_label": b"x", b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, n)]}, protocol=protocol)


def _write_cifar(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(data._CIFAR_FILES):
        (folder / name).write_bytes(_cifar_batch(n, i))
    return folder


def test_cifar10_from_a_folder_of_batches_and_from_the_archive(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    s = load("cifar10", tmp_path, standardize_features=False)
    assert s.x_train.shape == (15, 3, 32, 32) and s.x_test.shape == (3, 3, 32, 32)
    x, y = read_cifar_batch((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(), "b1")
    assert torch.equal(s.x_train[:3], torch.as_tensor(x.astype(np.float32) / 255.0))
    assert s.y_train[:3].tolist() == y.tolist()
    archive = tmp_path / "arch"
    archive.mkdir()
    with tarfile.open(archive / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    t = load("cifar10", archive, standardize_features=False)
    assert torch.equal(t.x_train, s.x_train) and torch.equal(t.y_test, s.y_test)
    per_channel = load("cifar10", archive, dtype=torch.float64).x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel, torch.zeros(3, dtype=torch.float64), atol=1e-12)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("blob, message", [
    (b"", "is empty"),
    (_cifar_batch(4, 0)[:-30], "not a readable CIFAR-10 batch"),
    (b"\x89PNG not a pickle", "not a readable CIFAR-10 batch"),
    (pickle.dumps({"data": _Evil(), "labels": [0]}), "refused to unpickle"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, protocol=2), "1 labels for 2 images"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "no 'data' and 'labels'"),
    (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, protocol=2), r"\(N, 3072\)"),
    (pickle.dumps([1, 2]), "holds a list"),
])
def test_malformed_cifar_batches_are_refused_without_running_anything(tmp_path, monkeypatch, blob, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataFormatError, match=message) as err:
        read_cifar_batch(blob, tmp_path / "data_batch_1")
    assert err.value.path == tmp_path / "data_batch_1"
    assert not (tmp_path / "PWNED").exists()


def test_a_bad_batch_in_a_folder_is_named(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(_cifar_batch(3, 0)[:-10])
    with pytest.raises(DataFormatError, match="data_batch_3"):
        load("cifar10", folder)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(DataFormatError, match="cifar-10-python.tar.gz"):
        load("cifar10", tmp_path / "bad")


# -- SVHN -------------------------------------------------------------------------------------------
def _svhn(path, n, labels=None):
    x = np.random.default_rng(n).integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
    y = (np.arange(n).reshape(-1, 1) + 9) % 10 + 1 if labels is None else labels   # 10, 1, 2, ...
    scipy.io.savemat(path, {"X": x, "y": y})
    return x


def test_svhn_from_generated_mat_files(tmp_path):
    x = _svhn(tmp_path / "train_32x32.mat", 5)
    _svhn(tmp_path / "test_32x32.mat", 2)
    s = load("svhn", tmp_path, standardize_features=False)
    assert s.x_train.shape == (5, 3, 32, 32) and s.x_test.shape == (2, 3, 32, 32)
    # label 10 is the digit 0; X is (H, W, C, N)
    assert s.y_train.tolist() == [0, 1, 2, 3, 4] and s.y_test.tolist() == [0, 1]
    assert torch.equal(s.x_train[1, 2], torch.as_tensor(x[:, :, 2, 1].astype(np.float32) / 255.0))


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty"), ("truncated", "not a readable MATLAB"), ("text", "not a readable MATLAB"),
    ("count", "3 labels for 4 images"), ("novars", "no 'X' and 'y'"), ("range", "labels outside 1..10"),
])
def test_malformed_svhn_files_are_typed_errors_naming_the_file(tmp_path, case, message):
    path = tmp_path / "train_32x32.mat"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_bytes(b"hello, not MATLAB at all" * 10)
    elif case == "count":
        _svhn(path, 4, labels=np.ones((3, 1)))
    elif case == "novars":
        scipy.io.savemat(path, {"images": np.zeros(3)})
    elif case == "range":
        _svhn(path, 2, labels=np.array([[0], [11]]))
    else:
        _svhn(path, 4)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataFormatError, match=message) as err:
        read_svhn_mat(path)
    assert err.value.path == path


# -- splits, batches, options -----------------------------------------------------------------------
def test_batches_keep_or_drop_the_last_partial_one_and_are_seeded():
    kept = data.batch_indices(10, 4, torch.Generator().manual_seed(3))
    assert [len(b) for b in kept] == [4, 4, 2] and sorted(torch.cat(kept).tolist()) == list(range(10))
    again = data.batch_indices(10, 4, torch.Generator().manual_seed(3), drop_last=True)
    assert [b.tolist() for b in again] == [b.tolist() for b in kept[:2]]


def test_splits_are_deterministic_and_the_input_is_not_modified():
    a, b = load("iris", split_seed=3), load("iris", split_seed=3)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, load("iris", split_seed=4).x_train)
    assert load("breast_cancer").num_classes == 2
    before = a.x_train.clone()
    v = data.validation_split(a, 0.25, seed=1)
    sub = data.subsample(a, n_train=10, n_test=3, seed=2)
    assert torch.equal(a.x_train, before) and len(sub.x_train) == 10 and len(sub.x_test) == 3
    assert len(v.x_train) + len(v.x_test) == len(a.x_train)
    assert torch.equal(data.subsample(a, 10, 3, seed=2).x_train, sub.x_train)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="imagenet"), "unknown; known data sets"), (dict(name="wine", test_fraction=0.0), "test_fraction"),
    (dict(name="wine", n_train=0), "n_train"), (dict(name="wine", dtype=torch.int64), "dtype"),
    (dict(name="wine", standardize_features="channel"), "needs images"),
])
def test_bad_options_are_refused_before_any_file_is_read(kwargs, message):
    with pytest.raises(InputError, match=message):
        load(**kwargs)
