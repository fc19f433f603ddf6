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
Every expected file is checked before any image is decoded; a file that cannot be decoded or read
raises a DataFileError naming it and what was expected.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from cl_plugins.core.checks import DataFileError, DatasetNotFoundError, check_choice

from .arrays import ImageArrays

_FOLDER = "tiny-imagenet-200"
_SIDE = 64
_MAX_LISTED = 10  # missing files listed in an error message


def _natural_key(name: str):
    """Sort key that orders embedded numbers numerically: val_2 < val_10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


def _read_lines(path: Path) -> List[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: expected a UTF-8 text file; got undecodable bytes ({exc})") from exc


def _read_wnids(path: Path) -> List[str]:
    wnids = [line.strip() for line in _read_lines(path) if line.strip()]
    if not wnids:
        raise DataFileError(f"{path} lists no wnids")
    dupes = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if dupes:
        raise DataFileError(f"{path} lists these wnids more than once: {dupes}")
    return wnids


def _class_names(words_path: Path, wnids: Sequence[str]) -> List[str]:
    """First name in words.txt for each wnid (e.g. 'goldfish'); the wnid itself when absent."""
    wanted = set(wnids)
    names: Dict[str, str] = {}
    if words_path.is_file():
        for line in _read_lines(words_path):
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
    for lineno, line in enumerate(_read_lines(annotations), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in label_of:
            raise DataFileError(f"{annotations}, line {lineno}: expected '<file>\\t<wnid>\\t...' "
                             f"with a wnid from wnids.txt; got {line!r}")
        filename, label = fields[0].strip(), label_of[fields[1].strip()]
        if labelled.setdefault(filename, label) != label:
            raise DataFileError(f"{annotations}, line {lineno}: {filename} is annotated with two classes")
    if not labelled:
        raise DataFileError(f"{annotations} has no annotations")
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
        except Exception as exc:  # truncated or corrupt JPEG, not an image, unreadable...
            raise DataFileError(f"{path}: expected a {_SIDE}x{_SIDE} JPEG image; could not decode its "
                                f"{path.stat().st_size} bytes ({type(exc).__name__}: {exc})") from exc
        if rgb.shape != (_SIDE, _SIDE, 3):
            raise DataFileError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}; expected {_SIDE}x{_SIDE}")
        images[i] = rgb.transpose(2, 0, 1)
        labels[i] = label
    return images, labels


def find_tinyimagenet_files(root: str | Path, splits: Sequence[str] = ("train", "test")
                            ) -> Tuple[List[str], Dict[str, List[Tuple[Path, int]]]]:
    """The wnids and the (path, label) of every image of each split in ``splits``.

    Checks every expected file before any image is decoded: raises DatasetNotFoundError listing
    the files of ``splits`` (the builder passes train and test) if any is missing.
    """
    for split in splits:
        check_choice("split", split, ["train", "test"])
    base = Path(root).absolute() / _FOLDER  # absolute: messages name the full path
    needed = {base / "wnids.txt": Path.is_file}
    if "train" in splits:
        needed[base / "train"] = Path.is_dir
    if "test" in splits:
        needed.update({base / "val" / "images": Path.is_dir,
                       base / "val" / "val_annotations.txt": Path.is_file})
    absent = [str(p.relative_to(base)) for p, exists in needed.items() if not exists(p)]
    if absent:
        raise DatasetNotFoundError("TinyImageNet", str(root), [str(p) for p in needed],
                                   hint="(extract tiny-imagenet-200.zip there; it is never downloaded)"
                                        f"\nMissing from {base}: {', '.join(absent)}")

    wnids = _read_wnids(base / "wnids.txt")
    files: Dict[str, List[Tuple[Path, int]]] = {}
    missing: List[str] = []
    for split in splits:
        lister = _train_files if split == "train" else _val_files
        files[split], split_missing = lister(base / ("train" if split == "train" else "val"), wnids)
        missing += split_missing
    if missing:  # an incomplete extraction: list the first few missing files
        more = len(missing) - _MAX_LISTED
        hint = "(the data set is incomplete" + (f"; {more} more files are missing)" if more > 0 else ")")
        raise DatasetNotFoundError("TinyImageNet", str(root), missing[:_MAX_LISTED], hint=hint)
    return wnids, files


def load_tinyimagenet(root: str | Path, split: str) -> ImageArrays:
    """Load TinyImageNet ``split`` ('train', or 'test' = the official val split) from ``root``.

    Returns x uint8 [N, 3, 64, 64] (RGB), y int64 [N] (class id = line in wnids.txt) and the class
    names from words.txt (the wnid when words.txt or its entry is absent).
    """
    check_choice("split", split, ["train", "test"])
    wnids, files = find_tinyimagenet_files(root, (split,))
    images, labels = _decode(files[split])
    classes = _class_names(Path(root) / _FOLDER / "words.txt", wnids)
    return ImageArrays(x=torch.from_numpy(images), y=torch.from_numpy(labels), classes=classes)
