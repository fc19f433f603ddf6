"""cl_plugins.core.augment: random crops padded with each image's own background."""

from __future__ import annotations

import torch

from cl_plugins.core.augment import crop_on_background


def test_crop_pads_with_each_images_background():
    x = torch.full((6, 1, 10, 10), -0.5)
    x[:, :, 3:7, 3:7] = 1.0
    x[3:] -= 0.25  # another background for half of the batch
    out = crop_on_background(x, 3, False, torch.Generator().manual_seed(0))
    for i in range(6):
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist())
        assert int((out[i] == 1.0 - 0.25 * (i >= 3)).sum()) == 16  # the square stays whole
    assert not torch.equal(out, x)  # something moved


def test_gdumb_crop_is_random_crop_28_padding_4_without_flips():
    """torchvision's RandomCrop(28, padding=4) on a black-padded image: each of the 81 shifts
    in [-4, 4]^2, nothing else (no flip: a flip would move column 20 to 7)."""
    black, white = -0.1307 / 0.3081, (1.0 - 0.1307) / 0.3081  # normalised MNIST levels
    x = torch.full((3000, 1, 28, 28), black)
    x[:, :, 14, 20] = white
    out = crop_on_background(x, 4, False, torch.Generator().manual_seed(0))
    is_white = (out - white).abs() < 1e-5
    assert bool(((out - black).abs() < 1e-5).logical_or(is_white).all())  # black padding
    assert bool((is_white.flatten(1).sum(1) == 1).all())  # the dot is never cut off
    flat = is_white.flatten(1).float().argmax(1)
    shifts = set(zip((flat // 28 - 14).tolist(), (flat % 28 - 20).tolist()))
    assert shifts == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}
