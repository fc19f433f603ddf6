"""Tensor preprocessing applied once, up front, so that training reads ready float tensors.

Doing it once (instead of a per-sample transform in the dataloader) keeps the data path off the
critical path; random augmentation, which must differ per step, is applied per batch instead
(`cl_plugins.core.augment`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad [N, C, H, W] symmetrically to size x size (MNIST 28 -> 32 as in Hsu et al.)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}: they are larger")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def channel_stats(x: torch.Tensor) -> Tuple[list, list]:
    """Per-channel mean and (population) std of float [N, C, H, W], computed in float64."""
    xd = x.transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
    return xd.mean(1).tolist(), xd.std(1, unbiased=False).tolist()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def permute_pixels(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Apply one fixed permutation to the flattened pixels of every image (same for all channels)."""
    if perm is None:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate every image by ``angle`` degrees (counter-clockwise, nearest neighbour, zero fill)."""
    from torchvision.transforms.functional import rotate as tv_rotate
    from torchvision.transforms import InterpolationMode

    return tv_rotate(x, float(angle), interpolation=InterpolationMode.NEAREST)


def subsample(y: torch.Tensor, k: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of a random, class-balanced subset of size min(len(y), k).

    Classes are visited round-robin (random order inside each class), so every class keeps
    about k / n_classes samples: a small cap never drops a class from an experience, which
    Avalanche's generator requires of the test set. ``k=None`` keeps everything.
    """
    n = len(y)
    if k is None or k >= n:
        return torch.arange(n)
    perm = torch.randperm(n, generator=generator)
    yp = y[perm]
    by_class = torch.argsort(yp, stable=True)
    ys = yp[by_class]
    starts = torch.searchsorted(ys, ys, side="left")  # first position of each sample's class
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - starts  # rank of each sample inside its class
    key = rank * (int(y.max()) + 1) + yp
    return perm[torch.argsort(key)[:k]].sort().values
