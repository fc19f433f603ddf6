"""Reader for CIFAR-10 and CIFAR-100 in the "python version" layout that torchvision extracts.

Source: https://www.cs.toronto.edu/~kriz/cifar.html (``cifar-10-python.tar.gz`` and
``cifar-100-python.tar.gz``). Layout under the data root::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

Each batch is a pickle (written by Python 2, so it is loaded with ``encoding='latin1'``) of a dict
with ``'data'``: uint8 [N, 3072], one row per image, channel-major (1024 red, then 1024 green, then
1024 blue values, each a row-major 32x32 plane), and the labels under ``'labels'`` (CIFAR-10) or
``'fine_labels'`` (CIFAR-100; the 20 ``'coarse_labels'`` are not used). The meta file holds the class
names (``'label_names'`` / ``'fine_label_names'``).

The files are read directly with pickle and numpy (torchvision's classes would also verify md5
sums), nothing is downloaded and nothing is written under the data root. Only open data roots you
trust: unpickling a file can run arbitrary code. A truncated, corrupt or inconsistent file raises a
DataFileError naming it and what was expected.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from cl_plugins.core.checks import DataFileError, DatasetNotFoundError, check_choice

from .arrays import ImageArrays

_SIDE = 32
_ROW_LEN = 3 * _SIDE * _SIDE  # 3072

# name -> (folder, {split: batch files}, meta file, labels key, class-names key, number of classes)
_LAYOUT = {
    "cifar10": ("cifar-10-batches-py",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", "labels", "label_names", 10),
    "cifar100": ("cifar-100-python",
                 {"train": ["train"], "test": ["test"]},
                 "meta", "fine_labels", "fine_label_names", 100),
}
_DISPLAY_NAME = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _as_str(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _load_pickle(path: Path) -> Dict[str, object]:
    """Unpickle one CIFAR file into a dict with str keys; DataFileError naming the file if malformed."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as exc:  # truncated file, not a pickle, missing module, no permission...
        state = ("truncated" if isinstance(exc, EOFError) or "truncated" in str(exc)
                 else "unreadable" if isinstance(exc, OSError) else "corrupt")
        raise DataFileError(f"{path}: expected a pickled dict (CIFAR python version); got a {state} "
                            f"file of {path.stat().st_size} bytes ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataFileError(f"{path} should hold a dict; got {type(obj).__name__}")
    return {_as_str(k): v for k, v in obj.items()}  # keys may be bytes if pickled by Python 3


def _get(entry: Dict[str, object], key: str, path: Path):
    if key not in entry:
        raise DataFileError(f"{path} has no {key!r} entry (keys: {sorted(entry)})")
    return entry[key]


def _read_classes(path: Path, key: str, n_classes: int) -> List[str]:
    names = _get(_load_pickle(path), key, path)
    if not isinstance(names, (list, tuple)) or len(names) != n_classes:
        count = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataFileError(f"{path}: {key!r} should list {n_classes} class names; got {count}")
    return [_as_str(n) for n in names]


def _read_batch(path: Path, labels_key: str, n_classes: int):
    """Return (images uint8 [N, 3, 32, 32], labels int64 [N]) from one batch file."""
    entry = _load_pickle(path)
    data = np.asarray(_get(entry, "data", path))
    if data.ndim != 2 or data.shape[1] != _ROW_LEN:
        raise DataFileError(f"{path}: 'data' should have shape [N, {_ROW_LEN}]; got {data.shape}")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataFileError(f"{path}: 'data' should hold uint8 pixel values; got dtype {data.dtype}")
        data = data.astype(np.uint8)
    labels = np.asarray(_get(entry, labels_key, path))
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError(f"{path}: {labels_key!r} should be {data.shape[0]} integer labels; "
                         f"got dtype {labels.dtype}, shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataFileError(f"{path}: labels should be in [0, {n_classes}); "
                         f"got range [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, _SIDE, _SIDE), labels.astype(np.int64)


def find_cifar_files(root: str | Path, name: str, splits: Sequence[str] = ("train", "test")
                     ) -> Tuple[Dict[str, List[Path]], Path]:
    """The batch files of each split in ``splits`` and the meta file, checked before any is read.

    Raises DatasetNotFoundError listing every file of ``splits`` (the builder passes train and
    test) and which of them are missing if any is.
    """
    check_choice("name", name, sorted(_LAYOUT))
    for split in splits:
        check_choice("split", split, ["train", "test"])
    folder, batches, meta, *_ = _LAYOUT[name]
    base = Path(root).absolute() / folder  # absolute: messages name the full path
    batch_paths = {split: [base / b for b in batches[split]] for split in splits}
    needed = [p for split in splits for p in batch_paths[split]] + [base / meta]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(_DISPLAY_NAME[name], str(root), [str(p) for p in needed],
                                   hint="(the extracted python version of the archive; it is never "
                                        f"downloaded)\nMissing from {base}: {', '.join(missing)}")
    return batch_paths, base / meta


def load_cifar(root: str | Path, name: str, split: str) -> ImageArrays:
    """Load ``name`` ('cifar10' or 'cifar100'), ``split`` ('train' or 'test') from ``root``.

    Returns x uint8 [N, 3, 32, 32] (RGB), y int64 [N] (fine labels for CIFAR-100) and the class
    names from the meta file. Raises DatasetNotFoundError if any needed file is missing.
    """
    check_choice("name", name, sorted(_LAYOUT))
    check_choice("split", split, ["train", "test"])
    _, _, _, labels_key, names_key, n_classes = _LAYOUT[name]
    batch_paths, meta_path = find_cifar_files(root, name, (split,))
    classes = _read_classes(meta_path, names_key, n_classes)
    parts = [_read_batch(p, labels_key, n_classes) for p in batch_paths[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else np.array(parts[0][0])
    labels = np.concatenate([p[1] for p in parts])
    return ImageArrays(x=torch.from_numpy(images), y=torch.from_numpy(labels), classes=classes)
