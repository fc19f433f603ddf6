"""Freeze a model except one part (the head): the layers below it keep their weights and their
normalisation statistics.

CWR / CWR* train only the output layer after the first experience (Avalanche's
``CWRStarPlugin(freeze_remaining_model=True)``: ``freeze_everything(model)`` then
``unfreeze_everything(cwr_layer)``); a multi-head model can train only its new head ("feature
extraction", Li & Hoiem). ``freeze_all_but(model, keep)`` does what Avalanche's pair of calls
does, except that it leaves ``keep``'s own ``requires_grad`` flags alone (a head bias held at 0
stays out of training):

- every parameter outside ``keep`` gets ``requires_grad = False``: no gradient, so every
  PyTorch optimizer skips it (no weight decay, no momentum, no Adam moment moves it);
- every module outside ``keep`` goes to eval mode (batch-norm statistics fixed, dropout off) and
  ``keep`` to train mode. ``strategy.train`` calls ``model.train()`` first, so a plugin calls
  this in ``before_training_exp`` of every experience it freezes.

The flags are not part of a ``state_dict``: a resumed run gets them back because the plugin
calls this again at the next experience (its state says how many experiences were trained).
"""

from __future__ import annotations

from typing import List

from torch import nn


def freeze_all_but(model: nn.Module, keep: nn.Module) -> List[str]:
    """Freeze ``model`` except ``keep`` (a submodule); returns the names of the parameters
    frozen."""
    kept = {id(p) for p in keep.parameters()}
    if not any(m is keep for m in model.modules()):
        raise ValueError(f"freeze_all_but: {type(keep).__name__} is not a submodule of "
                         f"{type(model).__name__}")
    frozen = []
    for name, p in model.named_parameters():
        if id(p) not in kept:
            p.requires_grad_(False)
            frozen.append(name)
    model.eval()
    keep.train()
    return frozen
