"""In-memory image arrays: the common output of every on-disk dataset reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch


@dataclass
class ImageArrays:
    """One split of an image dataset held in memory.

    x: uint8 tensor [N, C, H, W] (raw pixels, no normalisation);
    y: int64 tensor [N] of class ids in [0, n_classes);
    classes: human-readable class names, index = class id.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"x must be a uint8 [N, C, H, W] tensor; got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"y must be an int64 [N] tensor matching x; got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])
