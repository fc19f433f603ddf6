"""Reader for MNIST and FashionMNIST in torchvision's on-disk layout (``<root>/<Name>/raw``).

Reads the IDX files directly, from the ``.gz`` or from an already extracted copy, so nothing is
ever written under the data root and nothing is downloaded.

An IDX file is a 4-byte magic number (``0x0000080<d>``: unsigned bytes, ``d`` dimensions), ``d``
big-endian 4-byte sizes, then the bytes of the array, row-major. Images are ``[N, 28, 28]``
(``d = 3``), labels ``[N]`` (``d = 1``). A file whose length does not match its header, a
truncated ``.gz`` or a label file of another length than its image file raises a DataFileError
naming the file(s) and what was expected.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from cl_plugins.core.checks import DataFileError, DatasetNotFoundError, check_choice

from .arrays import ImageArrays

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NDIM = {"image": 3, "label": 1}  # dimensions of each IDX file
_CLASSES = {
    "MNIST": [str(i) for i in range(10)],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


def _gunzip(path: Path) -> Tuple[bytes, str]:
    """The decompressed bytes of ``path``, and '' or why the stream is incomplete."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read(), ""
    except EOFError:  # cut short: decompress what precedes the cut, to report its length
        try:
            partial = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(path.read_bytes())
        except zlib.error:
            partial = b""
        return partial, (f"truncated gzip stream (the {path.stat().st_size}-byte file ends "
                         "before its end-of-stream marker)")
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DataFileError(f"{path}: expected a gzip-compressed IDX file; "
                            f"got a corrupt gzip stream ({exc})") from exc


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """The array in IDX file ``path`` (``kind`` 'image' or 'label'); DataFileError if malformed."""
    raw, problem = _gunzip(path) if path.suffix == ".gz" else (path.read_bytes(), "")
    ndim = _NDIM[kind]
    header = 4 + 4 * ndim
    what = f"an IDX {kind} file"
    prefix = f"{path}: {problem}; " if problem else f"{path}: "
    magic = int.from_bytes(raw[0:4], "big")
    if len(raw) >= 4 and magic != 0x800 + ndim:  # 0x08 = unsigned byte payload
        gz = " (the file looks gzip-compressed: name it .gz)" if raw[:2] == b"\x1f\x8b" else ""
        raise DataFileError(f"{prefix}expected {what} (magic number {0x800 + ndim:#010x}: unsigned "
                            f"bytes, {ndim} dims), got magic number {magic:#010x}{gz}")
    if len(raw) < header:
        raise DataFileError(f"{prefix}expected {what} with a header of {header} bytes, "
                            f"got {len(raw)} bytes")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != size or problem:
        raise DataFileError(f"{prefix}expected {what} of {' x '.join(map(str, dims))} bytes "
                            f"({size} bytes with the header), got {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(raw_dir: Path, stem: str):
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_files(root: str | Path, name: str,
                   splits: Sequence[str] = ("train", "test")) -> Dict[str, Tuple[Path, Path]]:
    """(images, labels) paths of each split in ``splits``, checked before any file is read.

    Raises DatasetNotFoundError listing every file of ``splits`` (the builder passes train and
    test) and which of them are missing if any is.
    """
    check_choice("name", name, sorted(_CLASSES))
    for split in splits:
        check_choice("split", split, sorted(_FILES))
    raw_dir = Path(root).absolute() / name / "raw"  # absolute: messages name the full path
    found = {split: tuple(_find(raw_dir, s) for s in _FILES[split]) for split in splits}
    missing = [f"{s}.gz" for split in splits for s, p in zip(_FILES[split], found[split]) if p is None]
    if missing:
        expected = [str(raw_dir / f"{s}.gz") for split in splits for s in _FILES[split]]
        raise DatasetNotFoundError(name, str(root), expected,
                                   hint="(the uncompressed files without .gz are accepted too)\n"
                                        f"Missing from {raw_dir}: {', '.join(missing)}")
    return found


def load_idx_dataset(root: str | Path, name: str, split: str) -> ImageArrays:
    """Load ``name`` ('MNIST' or 'FashionMNIST'), ``split`` ('train' or 'test') from ``root``."""
    check_choice("name", name, sorted(_CLASSES))
    check_choice("split", split, sorted(_FILES))
    images_path, labels_path = find_idx_files(root, name, (split,))[split]
    images, labels = _read_idx(images_path, "image"), _read_idx(labels_path, "label")
    if len(labels) != len(images):
        raise DataFileError(f"{labels_path} holds {len(labels)} labels but {images_path} holds "
                            f"{len(images)} images; the two files of a split must hold the same count")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # [N, 1, 28, 28]
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageArrays(x=x, y=y, classes=list(_CLASSES[name]))
