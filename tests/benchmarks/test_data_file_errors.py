"""Truncated, corrupt or missing dataset files: a DataFileError / DatasetNotFoundError that names
every file concerned and what was expected, never a bare traceback from gzip, pickle or PIL."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.benchmarks.cifar_files import load_cifar
from cl_plugins.benchmarks.mnist_files import load_idx_dataset
from cl_plugins.benchmarks.tinyimagenet_files import load_tinyimagenet
from cl_plugins.core.checks import DataFileError, DatasetNotFoundError

from helpers import WNIDS, snapshot

_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_N = {"train": 5, "test": 3}


def _idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000080<ndim>, big-endian sizes, the raw bytes."""
    header = (0x800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_files(tmp_path):
    """A tiny MNIST in torchvision's layout: 5 train and 3 test random 28x28 images, as .gz."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (images, labels) in _IDX.items():
        x = rng.integers(0, 256, size=(_N[split], 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=_N[split], dtype=np.uint8)
        (raw / f"{images}.gz").write_bytes(gzip.compress(_idx_bytes(x)))
        (raw / f"{labels}.gz").write_bytes(gzip.compress(_idx_bytes(y)))
        arrays[split] = (x, y)
    return tmp_path, raw, arrays


def _error(exc_type, load) -> str:
    with pytest.raises(exc_type) as info:
        load()
    assert type(info.value) is exc_type
    if exc_type is DataFileError:
        assert isinstance(info.value, ValueError)  # the CLI catches it as a ValueError
    return str(info.value)


# ------------------------------------------------------------------------------------ MNIST (IDX)

def test_tiny_mnist_still_loads_exactly(mnist_files):
    root, raw, arrays = mnist_files
    gz = raw / "t10k-labels-idx1-ubyte.gz"
    gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))  # an extracted copy...
    gz.unlink()  # ...is read too
    before = snapshot(root)
    for split, (x, y) in arrays.items():
        a = load_idx_dataset(root, "MNIST", split)
        assert a.x.dtype == torch.uint8 and a.x.shape == (_N[split], 1, 28, 28)
        assert np.array_equal(a.x[:, 0].numpy(), x) and a.y.tolist() == y.tolist()
    assert snapshot(root) == before  # nothing written under the data root


@pytest.mark.parametrize("keep", [0.5, 0.995])
def test_truncated_gz_names_file_and_sizes(mnist_files, keep):
    root, raw, _ = mnist_files
    path = raw / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    msg = _error(DataFileError, lambda: load_idx_dataset(root, "MNIST", "train"))
    assert str(path) in msg and "truncated gzip stream" in msg
    assert "expected an IDX image file of 5 x 28 x 28 bytes (3936 bytes with the header)" in msg
    got = int(re.search(r"got (\d+) bytes", msg).group(1))
    assert 0 < got < 3936 if keep < 0.9 else got <= 3936


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("stem, edit, expected", [
    ("t10k-images-idx3-ubyte", lambda b: b[:1000],
     "expected an IDX image file of 3 x 28 x 28 bytes (2368 bytes with the header), got 1000 bytes"),
    ("t10k-images-idx3-ubyte", lambda b: b[:12],  # magic and 2 of the 3 sizes
     "expected an IDX image file with a header of 16 bytes, got 12 bytes"),
    ("t10k-labels-idx1-ubyte", lambda b: b + b"\0\0",
     "expected an IDX label file of 3 bytes (11 bytes with the header), got 13 bytes"),
    ("t10k-labels-idx1-ubyte", lambda b: b"",
     "expected an IDX label file with a header of 8 bytes, got 0 bytes"),
])
def test_idx_length_does_not_match_header(mnist_files, compressed, stem, edit, expected):
    root, raw, _ = mnist_files
    gz = raw / f"{stem}.gz"
    data = edit(gzip.decompress(gz.read_bytes()))
    path = gz if compressed else raw / stem
    gz.unlink()
    path.write_bytes(gzip.compress(data) if compressed else data)
    msg = _error(DataFileError, lambda: load_idx_dataset(root, "MNIST", "test"))
    assert msg == f"{path}: {expected}"


def test_corrupt_gz_and_wrong_magic(mnist_files):
    root, raw, _ = mnist_files
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    msg = _error(DataFileError, lambda: load_idx_dataset(root, "MNIST", "train"))
    assert str(path) in msg and "expected a gzip-compressed IDX file" in msg

    labels = raw / "train-labels-idx1-ubyte.gz"
    shutil.copy(labels, path)  # a label file where the images should be
    msg = _error(DataFileError, lambda: load_idx_dataset(root, "MNIST", "train"))
    assert str(path) in msg and "(magic number 0x00000803: unsigned bytes, 3 dims), " \
                                "got magic number 0x00000801" in msg

    extracted = raw / "train-images-idx3-ubyte"  # still compressed, but named as extracted
    extracted.write_bytes(gzip.compress(_idx_bytes(np.zeros((5, 28, 28)))))
    msg = _error(DataFileError, lambda: load_idx_dataset(root, "MNIST", "train"))
    assert str(extracted) in msg and "gzip-compressed" in msg


def test_label_count_mismatch_names_both_files_and_counts(mnist_files):
    root, raw, arrays = mnist_files
    labels = raw / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(_idx_bytes(arrays["train"][1][:4])))
    msg = _error(DataFileError, lambda: load_idx_dataset(root, "MNIST", "train"))
    assert str(labels) in msg and str(raw / "train-images-idx3-ubyte.gz") in msg
    assert "4 labels" in msg and "5 images" in msg


# ---------------------------------------------------------------------------------------- missing

def _all_idx_files(raw: Path):
    return [str(raw / f"{stem}.gz") for split in ("train", "test") for stem in _IDX[split]]


@pytest.mark.parametrize("name, benchmark", [("MNIST", "split_mnist"),
                                             ("FashionMNIST", "split_fmnist")])
def test_missing_idx_lists_train_and_test_before_reading(mnist_files, name, benchmark):
    root, raw, _ = mnist_files
    if name != "MNIST":
        raw = Path(shutil.move(str(raw.parent), str(root / name))) / "raw"
    for stem in _IDX["test"]:
        (raw / f"{stem}.gz").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b corrupt")  # must not be read
    before = snapshot(root)
    msg = _error(DatasetNotFoundError, lambda: build_benchmark(benchmark, data_root=str(root)))
    for f in _all_idx_files(raw):
        assert f"  - {f}\n" in msg
    assert "Missing from" in msg and "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz" in msg
    assert snapshot(root) == before


def test_missing_idx_nothing_there(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_benchmark("split_mnist", data_root=str(tmp_path))
    assert info.value.expected == _all_idx_files(tmp_path / "MNIST" / "raw")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DatasetNotFoundError) as info:  # one split alone needs its own two files
        load_idx_dataset(tmp_path, "MNIST", "test")
    assert info.value.expected == _all_idx_files(tmp_path / "MNIST" / "raw")[2:]


@pytest.mark.parametrize("fixture, benchmark, folder, files, removed", [
    ("cifar10_root", "split_cifar10", "cifar-10-batches-py",
     [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"], "test_batch"),
    ("cifar100_root", "split_cifar100", "cifar-100-python", ["train", "test", "meta"], "test"),
])
def test_missing_cifar_lists_train_and_test_before_reading(request, fixture, benchmark, folder,
                                                           files, removed):
    root = request.getfixturevalue(fixture)[0]
    base = root / folder
    (base / removed).unlink()
    (base / files[0]).write_bytes(b"corrupt, must not be read")
    with pytest.raises(DatasetNotFoundError) as info:
        build_benchmark(benchmark, data_root=str(root))
    assert info.value.expected == [str(base / f) for f in files]
    assert f"Missing from {base}: {removed}" in str(info.value)


@pytest.mark.parametrize("remove, expected", [
    ("val/val_annotations.txt", ["wnids.txt", "train", "val/images", "val/val_annotations.txt"]),
    ("val/images/val_2.JPEG", ["val/images/val_2.JPEG"]),  # an incomplete extraction
])
def test_missing_tinyimagenet_reported_before_decoding(tiny_root, remove, expected):
    base = tiny_root / "tiny-imagenet-200"
    (base / remove).unlink()
    (base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_2.JPEG").write_bytes(b"corrupt")
    with pytest.raises(DatasetNotFoundError) as info:
        build_benchmark("split_tinyimagenet", n_experiences=3, data_root=str(tiny_root))
    assert info.value.expected == [str(base / f) for f in expected]
    assert len(expected) == 1 or f"Missing from {base}: val/val_annotations.txt" in str(info.value)


# ------------------------------------------------------------------------------- CIFAR / TinyImageNet

@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_cifar_pickle(cifar10_root, keep):
    root = cifar10_root[0]
    path = root / "cifar-10-batches-py" / "data_batch_4"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    msg = _error(DataFileError, lambda: load_cifar(root, "cifar10", "train"))
    assert str(path) in msg and "expected a pickled dict" in msg
    assert f"truncated file of {int(len(data) * keep)} bytes" in msg


def test_corrupt_cifar_pickle_and_meta(cifar100_root):
    root = cifar100_root[0]
    path = root / "cifar-100-python" / "test"
    path.write_bytes(b"not a pickle at all")
    msg = _error(DataFileError, lambda: load_cifar(root, "cifar100", "test"))
    assert str(path) in msg and "corrupt file of 19 bytes" in msg

    meta = root / "cifar-100-python" / "meta"
    meta.write_bytes(meta.read_bytes()[:50])
    msg = _error(DataFileError, lambda: load_cifar(root, "cifar100", "train"))
    assert str(meta) in msg and "truncated" in msg


def test_truncated_jpeg_names_file(tiny_root):
    path = tiny_root / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    msg = _error(DataFileError, lambda: load_tinyimagenet(tiny_root, "test"))
    assert str(path) in msg and "expected a 64x64 JPEG image" in msg
    assert f"{len(data) // 2} bytes" in msg

    wnids = tiny_root / "tiny-imagenet-200" / "wnids.txt"
    wnids.write_bytes(b"\xff\xfe\x00bad")
    msg = _error(DataFileError, lambda: load_tinyimagenet(tiny_root, "test"))
    assert str(wnids) in msg and "UTF-8" in msg


def test_relative_root_is_reported_as_full_path(mnist_files, monkeypatch):
    root, raw, _ = mnist_files
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"")
    monkeypatch.chdir(root)
    msg = _error(DataFileError, lambda: load_idx_dataset(".", "MNIST", "train"))
    full = Path.cwd() / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    assert full.is_absolute() and msg.startswith(f"{full}: ")
