"""Seeded random generators owned by a plugin.

A plugin that draws random numbers (which samples a buffer keeps, which samples estimate a
Fisher, random projections) owns a CPU ``torch.Generator`` seeded from its ``seed`` argument, so
its draws do not depend on, or disturb, the global RNG that the model's initialisation and the
dataloaders use. The generator's state is part of the plugin's state dict, so a resumed run draws
the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import torch

from cl_plugins.core.checks import check_int


def seeded_generator(seed: int, name: str = "seed") -> torch.Generator:
    """A CPU generator seeded with ``seed`` (checked: an integer >= 0, reported as ``name``)."""
    return torch.Generator().manual_seed(check_int(name, seed, 0))
