"""Frozen, hook-free copies of a model, and taps that keep one module's last output.

Distillation methods (LwF, iCaRL, and the distillation family) keep a frozen copy of the model
that ended the previous experience: the *teacher*. ``copy.deepcopy`` alone is wrong for that:
the forward/backward hooks other plugins registered (layer-input recorders, feature taps) would be
copied with their owners, and the copies would then record the teacher's activations.
``frozen_copy`` shares those hooks with the original in the deep-copy memo (so they are not
copied), then empties every hook table of the copy and its companion flag tables.

``FeatureTap`` is a forward hook that remembers one module's output together with the input it
came from, so a plugin can reuse the features the strategy's own forward computed instead of
running the backbone a second time. ``take(x)`` returns them only when ``x`` is the very input
they came from (identity, not equality) and clears the tap either way.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from cl_plugins.core.checks import check_choice

# torch.nn.Module's hook tables, and the tables of flags keyed by the same hook ids.
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks_with_kwargs")
TAP_MODES = ("train", "eval")


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with ``requires_grad=False`` on every parameter (in place)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode, without gradients and without any hook."""
    memo = {}
    for m in model.modules():
        for attr in HOOK_DICTS:
            for hook in getattr(m, attr, {}).values():
                memo[id(hook)] = hook  # shared, not copied: dropped below
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        for attr in HOOK_DICTS + HOOK_FLAGS:
            if hasattr(m, attr):
                setattr(m, attr, type(getattr(m, attr))())
    return freeze(clone)


class FeatureTap:
    """Forward hook keeping a module's last output and the input it came from.

    ``mode="train"`` records only training-mode calls with autograd on (the features of the step
    being trained); ``mode="eval"`` records only eval-mode calls (the features of an evaluation
    forward). A copy of the tap (``copy.deepcopy`` of the model, pickling) is a fresh, empty tap:
    the tensors it holds may belong to a live autograd graph and must not be copied.
    """

    def __init__(self, mode: str = "train"):
        self.mode = check_choice("mode", mode, TAP_MODES)
        self.inp: Optional[torch.Tensor] = None
        self.out: Optional[torch.Tensor] = None

    def __call__(self, module, inputs, output):
        if not inputs:
            return
        wanted = (module.training and torch.is_grad_enabled()) if self.mode == "train" \
            else not module.training
        if wanted:
            self.inp, self.out = inputs[0], output

    def take(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The recorded output if it was computed from ``x`` itself, else None; clears the tap."""
        out = self.out if self.inp is x else None
        self.inp = self.out = None
        return out

    def __reduce__(self):
        return (FeatureTap, (self.mode,))
