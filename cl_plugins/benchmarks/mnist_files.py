"""Reader for MNIST and FashionMNIST in torchvision's on-disk layout (``<root>/<Name>/raw``).

Reads the IDX files directly, from the ``.gz`` or from an already extracted copy, so nothing is
ever written under the data root and nothing is downloaded.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from cl_plugins.core.checks import DatasetNotFoundError, check_choice

from .arrays import ImageArrays

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CLASSES = {
    "MNIST": [str(i) for i in range(10)],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims)


def _find(raw_dir: Path, stem: str):
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(root: str | Path, name: str, split: str) -> ImageArrays:
    """Load ``name`` ('MNIST' or 'FashionMNIST'), ``split`` ('train' or 'test') from ``root``."""
    check_choice("name", name, sorted(_CLASSES))
    check_choice("split", split, sorted(_FILES))
    raw_dir = Path(root) / name / "raw"
    stems = _FILES[split]
    paths = [_find(raw_dir, s) for s in stems]
    if any(p is None for p in paths):
        expected = [str(raw_dir / f"{s}.gz") for s in stems]
        raise DatasetNotFoundError(name, str(root), expected,
                                   hint="(the uncompressed files without .gz are accepted too)")
    images, labels = (_read_idx(p) for p in paths)
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, 28, 28]
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageArrays(x=x, y=y, classes=list(_CLASSES[name]))
