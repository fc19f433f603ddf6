"""The rest of a shared backbone, held fixed exactly: biases, normalisation layers (masking methods).

PackNet and Piggyback give each task its own view of the Linear / Conv weights of a shared
backbone (``core.weight_override.weight_layers``). The backbone's other parameters (the layers'
biases, normalisation layers' affine parameters, anything else outside ``model.head``) and the
normalisation layers' running statistics are shared by every task: both papers' codes train
them with the first task and keep them fixed afterwards (arunmallya/packnet ``src/prune.py``
``make_grads_zero`` with ``train_biases`` / ``train_bn`` off, arunmallya/piggyback
``src/main.py`` ``train_nobn``). ``FixedParts`` does that without touching the model:

- ``drop_grads()`` after the backward: the parameters' gradients become ``None``, which every
  PyTorch optimizer skips, so neither weight decay nor momentum nor Adam's moments move them
  (zeroing the gradient would not be enough);
- ``freeze_statistics()`` before each training forward: the normalisation layers that keep
  running statistics go to eval mode (they normalise with the stored statistics and leave them
  alone), whatever ``model.train()`` the strategy called.
"""

from __future__ import annotations

from typing import Dict, List

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase


def _head_modules(model: nn.Module) -> set:
    head = getattr(model, "head", None)
    return set() if not isinstance(head, nn.Module) else {id(m) for m in head.modules()}


class FixedParts:
    """The parameters of ``model`` outside ``model.head`` other than the weights of ``layers``,
    and its normalisation layers with running statistics outside ``model.head``."""

    def __init__(self, model: nn.Module, layers: Dict[str, nn.Module]):
        in_head = _head_modules(model)
        weights = {id(m.weight) for m in layers.values()}
        head_params = {id(p) for m in model.modules() if id(m) in in_head
                       for p in m.parameters(recurse=False)}
        self.params: List[Tensor] = [p for p in model.parameters()
                                     if id(p) not in weights and id(p) not in head_params]
        self.norms: List[nn.Module] = [m for m in model.modules() if id(m) not in in_head
                                       and isinstance(m, _NormBase) and m.track_running_stats]

    def drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def freeze_statistics(self) -> None:
        for m in self.norms:
            m.eval()
