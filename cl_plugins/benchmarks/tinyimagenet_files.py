"""Reader for TinyImageNet (200 classes, 64x64 RGB) in the layout of the official zip, extracted.

Source: http://cs231n.stanford.edu/tiny-imagenet-200.zip. Layout under the data root::

    tiny-imagenet-200/wnids.txt                       200 WordNet ids; class id = line order
    tiny-imagenet-200/words.txt                       optional: "<wnid>\\t<name>, <synonym>, ..."
    tiny-imagenet-200/train/<wnid>/images/<wnid>_<k>.JPEG   500 per class
    tiny-imagenet-200/val/images/val_<k>.JPEG                10,000 in all
    tiny-imagenet-200/val/val_annotations.txt         "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>"

The official test split has no labels, so split ``'test'`` here is the official *val* split.

Images are decoded with PIL and converted to RGB (a few are grayscale). Files are read in natural
order (``_2`` before ``_10``) so the sample order is deterministic. Decoding the 100,000 training
JPEGs takes a while; it is a one-time load. Nothing is downloaded or written under the data root.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from cl_plugins.core.checks import DatasetNotFoundError, check_choice

from .arrays import ImageArrays

_FOLDER = "tiny-imagenet-200"
_SIDE = 64
_MAX_LISTED = 10  # missing files listed in an error message


def _natural_key(name: str):
    """Sort key that orders embedded numbers numerically: val_2 < val_10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


def _read_wnids(path: Path) -> List[str]:
    wnids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{path} lists no wnids")
    dupes = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if dupes:
        raise ValueError(f"{path} lists these wnids more than once: {dupes}")
    return wnids


def _class_names(words_path: Path, wnids: Sequence[str]) -> List[str]:
    """First name in words.txt for each wnid (e.g. 'goldfish'); the wnid itself when absent."""
    wanted = set(wnids)
    names: Dict[str, str] = {}
    if words_path.is_file():
        for line in words_path.read_text(encoding="utf-8").splitlines():
            wnid, _, words = line.partition("\t")
            wnid = wnid.strip()
            if wnid in wanted and words.strip():
                names[wnid] = words.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


def _train_files(train_dir: Path, wnids: Sequence[str]) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(path, label) of every training JPEG, and the class image folders that are missing or empty."""
    files: List[Tuple[Path, int]] = []
    missing: List[str] = []
    for label, wnid in enumerate(wnids):
        image_dir = train_dir / wnid / "images"
        jpegs = [p for p in image_dir.iterdir() if p.suffix.lower() == ".jpeg"] if image_dir.is_dir() else []
        if not jpegs:
            missing.append(str(image_dir / f"{wnid}_<k>.JPEG"))
        files.extend((p, label) for p in sorted(jpegs, key=lambda p: _natural_key(p.name)))
    return files, missing


def _val_files(val_dir: Path, wnids: Sequence[str]) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(path, label) of every image in val_annotations.txt, and those of its images that are missing."""
    annotations = val_dir / "val_annotations.txt"
    label_of = {w: i for i, w in enumerate(wnids)}
    labelled: Dict[str, int] = {}
    for lineno, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in label_of:
            raise ValueError(f"{annotations}, line {lineno}: expected '<file>\\t<wnid>\\t...' "
                             f"with a wnid from wnids.txt; got {line!r}")
        filename, label = fields[0].strip(), label_of[fields[1].strip()]
        if labelled.setdefault(filename, label) != label:
            raise ValueError(f"{annotations}, line {lineno}: {filename} is annotated with two classes")
    if not labelled:
        raise ValueError(f"{annotations} has no annotations")
    image_dir = val_dir / "images"
    files = [(image_dir / name, labelled[name]) for name in sorted(labelled, key=_natural_key)]
    missing = [str(p) for p, _ in files if not p.is_file()]
    return files, missing


def _decode(files: Sequence[Tuple[Path, int]]) -> Tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(files), 3, _SIDE, _SIDE), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(files):
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))  # [H, W, 3]; grayscale gets 3 equal channels
        except Exception as exc:
            raise ValueError(f"{path} could not be decoded as an image: {exc}") from exc
        if rgb.shape != (_SIDE, _SIDE, 3):
            raise ValueError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}; expected {_SIDE}x{_SIDE}")
        images[i] = rgb.transpose(2, 0, 1)
        labels[i] = label
    return images, labels


def load_tinyimagenet(root: str | Path, split: str) -> ImageArrays:
    """Load TinyImageNet ``split`` ('train', or 'test' = the official val split) from ``root``.

    Returns x uint8 [N, 3, 64, 64] (RGB), y int64 [N] (class id = line in wnids.txt) and the class
    names from words.txt (the wnid when words.txt or its entry is absent).
    """
    check_choice("split", split, ["train", "test"])
    base = Path(root) / _FOLDER
    wnids_path = base / "wnids.txt"
    if split == "train":
        needed = {wnids_path: Path.is_file, base / "train": Path.is_dir}
    else:
        needed = {wnids_path: Path.is_file, base / "val" / "images": Path.is_dir,
                  base / "val" / "val_annotations.txt": Path.is_file}
    if not all(exists(p) for p, exists in needed.items()):
        raise DatasetNotFoundError("TinyImageNet", str(root), [str(p) for p in needed],
                                   hint="(extract tiny-imagenet-200.zip there; it is never downloaded)")

    wnids = _read_wnids(wnids_path)
    if split == "train":
        files, missing = _train_files(base / "train", wnids)
    else:
        files, missing = _val_files(base / "val", wnids)
    if missing:  # an incomplete extraction: list the first few missing files
        more = len(missing) - _MAX_LISTED
        hint = "(the data set is incomplete" + (f"; {more} more files are missing)" if more > 0 else ")")
        raise DatasetNotFoundError("TinyImageNet", str(root), missing[:_MAX_LISTED], hint=hint)
    images, labels = _decode(files)
    classes = _class_names(base / "words.txt", wnids)
    return ImageArrays(x=torch.from_numpy(images), y=torch.from_numpy(labels), classes=classes)
