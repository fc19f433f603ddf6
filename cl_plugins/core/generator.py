"""What a generative-replay method needs of its generator: a small protocol, and its check.

A generator is any ``torch.nn.Module`` with

- ``sample(n, rng=None) -> Tensor``: ``n`` inputs shaped like the training inputs, on the
  generator's device, without gradient; ``rng`` (a CPU ``torch.Generator``) draws the noise;
- ``train_step(x, x_replay=None, current_weight=1.0, rng=None) -> float``: one optimisation step
  of the generator on the incoming inputs ``x`` and the replayed inputs ``x_replay``, weighting
  their losses ``current_weight`` and ``1 - current_weight`` (van de Ven's ``rnt``); returns the
  loss;
- ``optimizer``: its own ``torch.optim.Optimizer`` (or None), whose state is saved beside the
  weights so a resumed run continues the same optimisation.

The default is ``cl_plugins.core.vae.VAE``; the plugins that replay generated inputs
(``generative_replay``, ``negative_replay``) take any object that passes ``check_generator``.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ReplayGenerator(Protocol):
    optimizer: Optional[torch.optim.Optimizer]

    def sample(self, n: int, rng: Optional[torch.Generator] = None) -> torch.Tensor: ...

    def train_step(self, x: torch.Tensor, x_replay: Optional[torch.Tensor] = None,
                   current_weight: float = 1.0,
                   rng: Optional[torch.Generator] = None) -> float: ...


def check_generator(name: str, generator) -> nn.Module:
    """``generator`` itself if it is an ``nn.Module`` with ``sample``, ``train_step`` and an
    ``optimizer`` attribute; otherwise a ValueError naming ``name`` and what is missing."""
    missing = [a for a in ("sample", "train_step") if not callable(getattr(generator, a, None))]
    if not hasattr(generator, "optimizer"):
        missing.append("optimizer")
    if not isinstance(generator, nn.Module) or missing:
        what = "not an nn.Module" if not isinstance(generator, nn.Module) else \
            f"it lacks {', '.join(missing)}"
        raise ValueError(f"{name} must be None (the default VAE) or an nn.Module with "
                         f"sample(n, rng), train_step(x, x_replay, current_weight, rng) and an "
                         f"optimizer attribute (cl_plugins.core.generator); got a "
                         f"{type(generator).__name__}: {what}.")
    return generator
