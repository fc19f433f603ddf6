"""Importance of normalisation layers' affine parameters, for an EWC penalty on them (Adam-NSCL
regularises BatchNorm weight and bias this way instead of projecting them).

Both estimates use the model's *predicted* (arg-max) labels, run over a dataset with its eval
transforms in mini-batches, accumulate in float64, and leave the model's mode to the caller:

- :func:`per_sample_fisher`: the mean over samples of the squared per-sample gradient (the
  textbook diagonal Fisher, ``mu^2 + sigma^2`` of the per-sample gradients);
- :func:`batch_importance`: the mean over mini-batches of ``B_b * g_b^2``, ``g_b`` the gradient
  of the batch's mean loss and ``B_b`` its size (Adam-NSCL's code; ``B mu^2 + sigma^2`` in
  expectation);
- :func:`importance`: either, by name.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .layer_inputs import call_model, iterate_batches
from .per_sample import cross_entropy_sample, per_sample_gradients

Tensors = Dict[str, torch.Tensor]


def norm_parameters(model: nn.Module, norms: Dict[str, nn.Module]) -> Tensors:
    """The trainable parameters of the modules ``norms`` (as from
    :func:`~cl_plugins.core.layer_inputs.protected_layers`), by full name, in model order."""
    path_of = {id(m): path for path, m in norms.items()}
    out = {}
    for name, module in model.named_modules():
        if id(module) in path_of:
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    out[f"{name}.{pname}" if name else pname] = p
    return out


def per_sample_fisher(model: nn.Module, params: Tensors, dataset, device,
                      batch_size: int) -> Tensors:
    """Diagonal Fisher (float64) of ``params``: the mean over the dataset's samples of the
    squared per-sample gradient of the cross-entropy at the predicted label."""
    total = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device)
             for n, p in params.items()}
    n_seen = 0
    for x, _y, t in iterate_batches(dataset, batch_size, device):
        for task in torch.unique(t).tolist():
            xs = x[t == task]
            with torch.no_grad():
                logits = call_model(model, xs, int(task))
            target = logits.argmax(dim=1)
            grads = per_sample_gradients(model, params, xs, target, cross_entropy_sample,
                                         task_label=int(task))
            for n, g in grads.items():
                total[n] += g.pow(2).sum(0, dtype=torch.float64)
        n_seen += len(x)
    if n_seen == 0:
        raise ValueError("per_sample_fisher: the dataset is empty")
    return {n: s / n_seen for n, s in total.items()}


def batch_importance(model: nn.Module, params: Tensors, dataset, device, batch_size: int,
                     generator: Optional[torch.Generator] = None,
                     shuffle: bool = False) -> Tensors:
    """The mean over mini-batches (order drawn from ``generator`` when ``shuffle``) of
    ``B_b * g_b^2`` (float64), g_b the gradient of the batch's mean cross-entropy at the
    predicted labels."""
    names, tensors = list(params), list(params.values())
    total = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
    n_batches = 0
    for x, _y, t in iterate_batches(dataset, batch_size, device, generator=generator,
                                    shuffle=shuffle):
        loss = 0.0
        for task in torch.unique(t).tolist():
            logits = call_model(model, x[t == task], int(task))
            target = logits.detach().argmax(dim=1)
            loss = loss + torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        grads = torch.autograd.grad(loss / len(x), tensors, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc.add_(g.to(torch.float64).pow(2), alpha=len(x))
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batch_importance: the dataset is empty")
    return {n: s / n_batches for n, s in zip(names, total)}


def importance(kind: str, model: nn.Module, params: Tensors, dataset, device, batch_size: int,
               generator: Optional[torch.Generator] = None, shuffle: bool = False) -> Tensors:
    """``kind="per_sample"``: :func:`per_sample_fisher` (fixed order: ``generator`` and
    ``shuffle`` unused); ``"batch"``: :func:`batch_importance`."""
    if kind == "per_sample":
        return per_sample_fisher(model, params, dataset, device, batch_size)
    if kind == "batch":
        return batch_importance(model, params, dataset, device, batch_size, generator, shuffle)
    raise ValueError(f"importance: kind must be 'per_sample' or 'batch'; got {kind!r}")
