"""Per-batch random augmentation on tensors (random crop with zero padding, horizontal flip).

Benchmarks hold preprocessed tensors, so augmentation that must differ at every step happens on
the mini-batch, vectorised over the batch (no per-sample Python), on the strategy's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import check_int, check_range


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip_p: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad [N, C, H, W] by ``padding``, take a random HxW crop per sample, flip with ``flip_p``."""
    n, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # [N, H]
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # [N, W]
        batch = torch.arange(n, device=dev)[:, None, None]
        # xp[b, :, rows[b, i], cols[b, j]] -> [N, H, W, C]
        x = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip_p > 0:
        flip = (torch.rand(n, generator=generator) < flip_p).to(dev).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x.contiguous()


class BatchAugmentPlugin(SupervisedPlugin):
    """Applies :func:`random_crop_flip` to every training mini-batch (``before_forward``)."""

    def __init__(self, padding: int = 4, flip_p: float = 0.5):
        super().__init__()
        self.padding = check_int("padding", padding, 0)
        self.flip_p = check_range("flip_p", flip_p, 0.0, 1.0)

    def before_forward(self, strategy, **kwargs):
        strategy.mbatch[0] = random_crop_flip(strategy.mbatch[0], self.padding, self.flip_p)
