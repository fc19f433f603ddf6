"""Putting a model back to the weights it started with (retraining "from scratch").

``restore_initial_weights(model, saved)`` resets every parameter and the running statistics of
normalisation layers (BatchNorm / InstanceNorm: ``running_mean``, ``running_var``,
``num_batches_tracked``) to the CPU copies in ``saved``, a ``{name: tensor}`` dict that the first
call fills. Other buffers are structural state kept by model adaptation (e.g.
``MaskedHead.class_task``, which classes were seen) and are left alone. A model that grew since
the copies were taken is handled the way Avalanche's dynamic modules grow:

- a tensor new since then (a new task's head in task-IL) keeps its fresh initialisation, which
  is stored the first time it is met;
- a tensor larger along its existing dimensions (``IncrementalClassifier``) gets its old block
  back from the copy and keeps the fresh initialisation of its new rows, and the copy is
  replaced by the whole tensor;
- any other change of shape raises a ValueError.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


def reset_targets(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter, and the running statistics of normalisation layers, by name."""
    out = dict(model.named_parameters())
    for mname, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for bname, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{mname}.{bname}" if mname else bname] = buf
    return out


@torch.no_grad()
def restore_initial_weights(model: nn.Module, saved: Dict[str, torch.Tensor],
                            owner: str = "restore_initial_weights") -> None:
    """Reset ``model`` in place to ``saved`` (see the module docstring), storing in ``saved``
    the tensors it does not hold yet; ``owner`` names the caller in the error message."""
    for name, tensor in reset_targets(model).items():
        old = saved.get(name)
        if old is None:  # new since the copy (e.g. a new task's head): fresh init
            saved[name] = tensor.detach().cpu().clone()
        elif tuple(old.shape) == tuple(tensor.shape):
            tensor.copy_(old.to(tensor.device, tensor.dtype))
        elif old.dim() == tensor.dim() and all(a <= b for a, b in zip(old.shape, tensor.shape)):
            # grown (IncrementalClassifier): old block from the copy, new rows fresh
            tensor[tuple(slice(0, s) for s in old.shape)].copy_(old.to(tensor.device,
                                                                       tensor.dtype))
            saved[name] = tensor.detach().cpu().clone()
        else:
            raise ValueError(f"{owner} cannot reset {name!r} to its initial value: it had shape "
                             f"{tuple(old.shape)}, now {tuple(tensor.shape)} (only growth along "
                             "existing dimensions is supported)")
