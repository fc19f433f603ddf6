"""Per-sample gradients through ``torch.func`` (vmap over grad), for importance estimates.

Fisher information and MAS importances are defined per sample; averaging squared (or absolute)
*batch* gradients instead makes them depend on the batch size. ``per_sample_gradients`` returns
one gradient per sample for the requested parameters, computed without a Python loop over samples.
The model runs through ``functional_call`` with an integer task label, so multi-head models take
their single-task path (no data-dependent branching under vmap).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_sample_gradients(
    model: nn.Module,
    params: Dict[str, torch.Tensor],
    x: torch.Tensor,
    targets: torch.Tensor,
    sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    task_label: int = 0,
) -> Dict[str, torch.Tensor]:
    """Gradient of ``sample_loss(logits[1, C], target[1]) -> scalar`` for each sample.

    Returns ``{name: tensor [B, *param.shape]}`` for the parameters in ``params`` (other parameters
    and buffers are held fixed). Run the model in eval mode: under vmap each sample is a batch of
    one, so batch-statistics layers must use running statistics.
    """
    names = list(params)
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())
    from avalanche.models import MultiTaskModule

    multitask = isinstance(model, MultiTaskModule)

    def loss_one(p, xi, ti):
        args = (xi.unsqueeze(0), task_label) if multitask else (xi.unsqueeze(0),)
        out = functional_call(model, ({**p, **fixed}, buffers), args)
        return sample_loss(out, ti.unsqueeze(0))

    detached = {n: params[n].detach() for n in names}
    return vmap(grad(loss_one), in_dims=(None, 0, 0))(detached, x, targets)


def cross_entropy_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, target)
