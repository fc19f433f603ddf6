"""Compact per-experience datasets for benchmarks that derive many experiences from one source.

Permuted and rotated MNIST used to materialise every experience as its own float32 copy: 20
experiences of 60,000 padded images is ~5 GB per process, enough to OOM parallel runs. Here a
permuted experience shares one normalised float32 source with all others and only keeps its
permutation; a rotated experience keeps its own images as uint8 (1/4 of float32) and maps them
to normalised floats through a 256-entry lookup table, which gives bit-identical values to
normalising the float image. Both cost a few microseconds per sample in the dataloader.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset


class PixelPermutedDataset(Dataset):
    """Samples ``source[index[i]]`` with the flattened pixels reordered by ``perm`` (or not)."""

    def __init__(self, source: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
                 perm: Optional[torch.Tensor]):
        self.source = source  # [N, C, H, W] float, shared between experiences
        self.index = index
        self.targets = targets[index]
        self.perm = perm
        self.sample_shape = tuple(source.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        x = self.source[self.index[i]]
        if self.perm is not None:
            c = x.shape[0]
            x = x.reshape(c, -1)[:, self.perm].reshape(self.sample_shape)
        return x, self.targets[i]

    def rows(self, idx: torch.Tensor):
        """Samples ``idx`` at once (the same values as ``__getitem__``, stacked)."""
        x = self.source[self.index[idx]]
        if self.perm is not None:
            x = x.reshape(len(idx), self.sample_shape[0], -1)[:, :, self.perm]
            x = x.reshape((len(idx),) + self.sample_shape)
        return x, self.targets[idx]


class UInt8ImageDataset(Dataset):
    """uint8 images [N, C, H, W] returned as float32 ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor,
                 mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8; got {images.dtype}")
        c = images.shape[1]
        levels = torch.arange(256, dtype=torch.float32).div_(255.0).expand(c, 256)
        if mean is not None:
            m = torch.tensor(mean, dtype=torch.float32).view(-1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(-1, 1)
            levels = (levels - m) / s  # the same float32 operations as preprocess.normalize
        self.lut = levels.contiguous()
        self.images = images
        self.targets = targets
        self.sample_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i]
        if self.sample_shape[0] == 1:
            x = self.lut[0][x.int()]
        else:
            x = self.lut.gather(1, x.reshape(x.shape[0], -1).long()).reshape(self.sample_shape)
        return x, self.targets[i]

    def rows(self, idx: torch.Tensor):
        """Samples ``idx`` at once (the same values as ``__getitem__``, stacked)."""
        x, b = self.images[idx], len(idx)
        if self.sample_shape[0] == 1:
            x = self.lut[0][x.int()]
        else:
            lut = self.lut.unsqueeze(0).expand(b, -1, -1)
            x = lut.gather(2, x.reshape(b, x.shape[1], -1).long()).reshape(x.shape)
        return x, self.targets[idx]
