"""Per-batch random augmentation on tensors (random crop with zero padding, horizontal flip).

Benchmarks hold preprocessed tensors, so augmentation that must differ at every step happens on
the mini-batch, vectorised over the batch (no per-sample Python), on the strategy's device.
:func:`crop_on_background` pads with each image's own per-channel minimum instead of zeros: the
black of a normalised image, as torchvision's ``RandomCrop(padding=...)`` on the raw image gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import check_int, check_range


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip_p: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad [N, C, H, W] by ``padding``, take a random HxW crop per sample, flip each with
    probability ``flip_p``."""
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


def crop_on_background(x: torch.Tensor, padding: int, hflip: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of [N, C, H, W] images after padding each one by ``padding`` pixels of its
    own per-channel minimum (optionally flipped with probability 0.5). After normalisation
    black is the per-channel minimum of an MNIST image, not 0: zero padding would frame every
    training image in mid-grey, which test images never have."""
    low = x.amin(dim=(2, 3), keepdim=True)
    return random_crop_flip(x - low, padding, 0.5 if hflip else 0.0, generator) + low


class BatchAugmentPlugin(SupervisedPlugin, supports_distributed=True):
    """Applies :func:`random_crop_flip` to every training mini-batch (``before_forward``)."""

    def __init__(self, padding: int = 4, flip_p: float = 0.5):
        super().__init__()
        self.padding = check_int("padding", padding, 0)
        self.flip_p = check_range("flip_p", flip_p, 0.0, 1.0)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` cropped and flipped with this plugin's settings (global RNG), e.g. the rows a
        replay plugin appends after this plugin's ``before_forward`` has run."""
        return random_crop_flip(x, self.padding, self.flip_p)

    def before_forward(self, strategy, **kwargs):
        strategy.mbatch[0] = self.augment(strategy.mbatch[0])
