"""The embedded benchmark data: scikit-learn's bundled 8x8 handwritten digits (1,797 images).

Needs no file and no network, so it backs the quick start and the fast tests. The fixed
train/test split is stratified by class with a constant seed, so every run sees the same split.
"""

from __future__ import annotations

import numpy as np
import torch

from .arrays import ImageArrays

TEST_FRACTION = 0.3
_SPLIT_SEED = 0


def load_digits_arrays(split: str) -> ImageArrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    digits = load_digits()
    # Pixel values are 0..16; rescale to the 0..255 uint8 range every reader returns.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=TEST_FRACTION,
        random_state=_SPLIT_SEED, stratify=digits.target)
    idx = idx_train if split == "train" else idx_test
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    y = torch.from_numpy(digits.target[idx].astype(np.int64))
    return ImageArrays(x=x, y=y, classes=[str(i) for i in range(10)])
