"""Offline readers for CIFAR-10/100 and TinyImageNet, on tiny files in the real on-disk layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cl_plugins.benchmarks.cifar_files import load_cifar
from cl_plugins.benchmarks.tinyimagenet_files import load_tinyimagenet
from cl_plugins.core.checks import DatasetNotFoundError

from helpers import COLOURS, VAL, WNIDS, dump_pickle, save_jpeg, snapshot


# ----------------------------------------------------------------------------------------- CIFAR

def test_cifar10_train_shapes_labels_and_pixels(cifar10_root):
    root, batches, names = cifar10_root
    before = snapshot(root)
    arrays = load_cifar(root, "cifar10", "train")
    assert snapshot(root) == before  # nothing written under the data root

    assert arrays.x.shape == (20, 3, 32, 32) and arrays.x.dtype == torch.uint8
    assert arrays.y.shape == (20,) and arrays.y.dtype == torch.int64
    assert arrays.y.tolist() == [k % 10 for k in range(20)]  # batches 1..5 in order
    assert arrays.classes == names

    # channel-major: red, green, blue planes
    assert (arrays.x[0, 0] == 10).all() and (arrays.x[0, 1] == 20).all() and (arrays.x[0, 2] == 30).all()
    # row-major within each plane
    c, h, w = torch.meshgrid(torch.arange(3), torch.arange(32), torch.arange(32), indexing="ij")
    assert torch.equal(arrays.x[1].long(), (c * 1024 + h * 32 + w) % 256)
    # exact round trip of every image
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(arrays.x.numpy().reshape(20, 3072), expected)


def test_cifar10_test_split(cifar10_root):
    root, batches, names = cifar10_root
    arrays = load_cifar(str(root), "cifar10", "test")  # str root works too
    assert arrays.x.shape == (4, 3, 32, 32)
    assert arrays.y.tolist() == [9, 8, 7, 6]
    assert np.array_equal(arrays.x.numpy().reshape(4, 3072), batches["test_batch"][0])
    assert len(arrays) == 4


def test_cifar100_uses_fine_labels(cifar100_root):
    root, splits, fine_names = cifar100_root
    train = load_cifar(root, "cifar100", "train")
    assert train.x.shape == (6, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.y.dtype == torch.int64
    assert train.y.tolist() == [0, 99, 42, 7, 50, 99]
    assert train.classes == fine_names
    assert np.array_equal(train.x.numpy().reshape(6, 3072), splits["train"][0])
    assert [int(train.x[2, ch].unique()) for ch in range(3)] == [10, 20, 30]

    test = load_cifar(root, "cifar100", "test")
    assert test.x.shape == (3, 3, 32, 32)
    assert test.y.tolist() == [5, 98, 0]


def test_cifar_bytes_keys_are_accepted(tmp_path):
    # a pickle written by Python 3 with bytes keys and names (as from encoding='bytes' round trips)
    base = tmp_path / "cifar-100-python"
    data = np.zeros((2, 3072), dtype=np.uint8)
    dump_pickle(base / "test", {b"data": data, b"fine_labels": [3, 4]})
    dump_pickle(base / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    arrays = load_cifar(tmp_path, "cifar100", "test")
    assert arrays.y.tolist() == [3, 4] and arrays.classes[3] == "c3"


@pytest.mark.parametrize("name, split, files", [
    ("cifar10", "train", ["data_batch_1", "data_batch_5", "batches.meta"]),
    ("cifar10", "test", ["test_batch", "batches.meta"]),
    ("cifar100", "train", ["cifar-100-python", "train", "meta"]),
    ("cifar100", "test", ["cifar-100-python", "test", "meta"]),
])
def test_cifar_missing_files(tmp_path, name, split, files):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar(tmp_path, name, split)
    message = str(info.value)
    assert str(tmp_path) in message
    for f in files:
        assert f in message
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_cifar10_one_missing_batch(cifar10_root):
    root = cifar10_root[0]
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as info:
        load_cifar(root, "cifar10", "train")
    assert len(info.value.expected) == 6  # 5 batches + meta


def test_cifar_malformed_files(cifar10_root):
    root = cifar10_root[0]
    base = root / "cifar-10-batches-py"
    (base / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_2"):
        load_cifar(root, "cifar10", "train")

    dump_pickle(base / "test_batch", {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]})
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_cifar(root, "cifar10", "test")

    dump_pickle(base / "test_batch",
                {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0, 10]})
    with pytest.raises(ValueError, match="test_batch.*labels"):
        load_cifar(root, "cifar10", "test")

    dump_pickle(base / "test_batch", {"data": np.zeros((2, 3072), dtype=np.uint8)})
    with pytest.raises(ValueError, match="test_batch.*'labels'"):
        load_cifar(root, "cifar10", "test")

    dump_pickle(base / "test_batch", {"data": np.zeros((1, 3072), dtype=np.uint8), "labels": [0]})
    dump_pickle(base / "batches.meta", {"label_names": ["only", "three", "names"]})
    with pytest.raises(ValueError, match="batches.meta"):
        load_cifar(root, "cifar10", "test")


@pytest.mark.parametrize("name, split, argument", [
    ("cifar", "train", "name"),
    ("CIFAR10", "train", "name"),
    ("cifar10", "val", "split"),
    ("cifar100", "training", "split"),
])
def test_cifar_bad_arguments(tmp_path, name, split, argument):
    with pytest.raises(ValueError, match=argument):
        load_cifar(tmp_path, name, split)


# ---------------------------------------------------------------------------------- TinyImageNet

def _close(pixels: torch.Tensor, colour, tol: int = 4) -> bool:
    """Every pixel of a [3, H, W] image within tol of colour (JPEG is lossy)."""
    target = torch.tensor(colour, dtype=torch.int16).view(3, 1, 1)
    return bool(((pixels.to(torch.int16) - target).abs() <= tol).all())


def test_tinyimagenet_train(tiny_root):
    before = snapshot(tiny_root)
    arrays = load_tinyimagenet(tiny_root, "train")
    assert snapshot(tiny_root) == before  # nothing written under the data root

    assert arrays.x.shape == (6, 3, 64, 64) and arrays.x.dtype == torch.uint8
    assert arrays.y.dtype == torch.int64
    assert arrays.y.tolist() == [0, 0, 1, 1, 2, 2]  # wnids.txt order, not alphabetical
    assert arrays.classes == ["goldfish", "Egyptian cat", WNIDS[2]]  # wnid when words.txt lacks it

    for label in (0, 2):
        r, g, b = COLOURS[label]
        assert _close(arrays.x[2 * label], (r - 20, g - 20, b - 20))  # _2 before _10
        assert _close(arrays.x[2 * label + 1], (r, g, b))

    gray = arrays.x[3]  # class 1, _10: the grayscale image
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert _close(gray, (128, 128, 128))


def test_tinyimagenet_test_is_official_val(tiny_root):
    arrays = load_tinyimagenet(tiny_root, "test")
    assert arrays.x.shape == (3, 3, 64, 64) and arrays.x.dtype == torch.uint8
    assert arrays.y.tolist() == [label for _, label in VAL]  # from val_annotations.txt
    for i, (_, label) in enumerate(VAL):
        assert _close(arrays.x[i], COLOURS[label])
    assert len(arrays.classes) == 3


def test_tinyimagenet_without_words_uses_wnids(tiny_root):
    (tiny_root / "tiny-imagenet-200" / "words.txt").unlink()
    assert load_tinyimagenet(tiny_root, "test").classes == WNIDS


def test_tinyimagenet_val_order_is_natural(tiny_root):
    base = tiny_root / "tiny-imagenet-200" / "val"
    save_jpeg(base / "images" / "val_10.JPEG", (0, 0, 0))
    with open(base / "val_annotations.txt", "a") as f:
        f.write(f"val_10.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
    arrays = load_tinyimagenet(tiny_root, "test")
    assert arrays.y.tolist() == [2, 0, 1, 0]
    assert _close(arrays.x[3], (0, 0, 0))


@pytest.mark.parametrize("split, files", [
    ("train", ["tiny-imagenet-200", "wnids.txt", "train"]),
    ("test", ["tiny-imagenet-200", "wnids.txt", "val_annotations.txt", "images"]),
])
def test_tinyimagenet_missing_root(tmp_path, split, files):
    with pytest.raises(DatasetNotFoundError) as info:
        load_tinyimagenet(tmp_path, split)
    message = str(info.value)
    assert str(tmp_path) in message
    for f in files:
        assert f in message
    assert list(tmp_path.iterdir()) == []


def test_tinyimagenet_missing_train_dir(tiny_root):
    shutil.rmtree(tiny_root / "tiny-imagenet-200" / "train")
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_tinyimagenet(tiny_root, "train")
    load_tinyimagenet(tiny_root, "test")  # the val split is still there


def test_tinyimagenet_incomplete_extraction(tiny_root):
    base = tiny_root / "tiny-imagenet-200"
    (base / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DatasetNotFoundError, match="val_1.JPEG"):
        load_tinyimagenet(tiny_root, "test")
    for p in (base / "train" / WNIDS[2] / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetNotFoundError, match=WNIDS[2]):
        load_tinyimagenet(tiny_root, "train")


def test_tinyimagenet_malformed(tiny_root):
    base = tiny_root / "tiny-imagenet-200"
    with open(base / "val" / "val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn09999999\t0\t0\t1\t1\n")  # a wnid not in wnids.txt
    with pytest.raises(ValueError, match="val_annotations.txt"):
        load_tinyimagenet(tiny_root, "test")

    bad = base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_2.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"{WNIDS[0]}_2.JPEG"):
        load_tinyimagenet(tiny_root, "train")

    save_jpeg(bad, (0, 0, 0), size=(32, 32))
    with pytest.raises(ValueError, match="32x32"):
        load_tinyimagenet(tiny_root, "train")


def test_tinyimagenet_bad_split(tiny_root):
    with pytest.raises(ValueError, match="split"):
        load_tinyimagenet(tiny_root, "val")
