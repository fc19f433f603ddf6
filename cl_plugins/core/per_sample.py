"""Per-sample gradients through ``torch.func`` (vmap over grad), for importance estimates.

Fisher information and MAS importances are defined per sample; averaging squared (or absolute)
*batch* gradients instead makes them depend on the batch size. ``per_sample_gradients`` returns
one gradient per sample for the requested parameters, computed without a Python loop over samples.
The model runs through ``functional_call`` with an integer task label, so multi-head models take
their single-task path (no data-dependent branching under vmap). ``per_sample_gradient_sums``
gives only their sum (one matmul per Linear layer), and ``dataset_mean`` averages such sums over
a dataset (EWC's Fisher, MAS's importance).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from avalanche.models import MultiTaskModule
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Subset

from cl_plugins.core.distributed import all_reduce_sum_, shard_range

Tensors = Dict[str, torch.Tensor]
SampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def forward(model: nn.Module, x: torch.Tensor, task_label: int) -> torch.Tensor:
    """``model(x)``, with the integer ``task_label`` for a multi-task model."""
    return model(x, task_label) if isinstance(model, MultiTaskModule) else model(x)


def per_sample_gradients(model: nn.Module, params: Tensors, x: torch.Tensor,
                         targets: torch.Tensor, sample_loss: SampleLoss,
                         task_label: int = 0) -> Tensors:
    """Gradient of ``sample_loss(logits[1, C], target[1]) -> scalar`` for each sample.

    Returns ``{name: tensor [B, *param.shape]}`` for the parameters in ``params`` (other parameters
    and buffers are held fixed). Run the model in eval mode: under vmap each sample is a batch of
    one, so batch-statistics layers must use running statistics.
    """
    names = list(params)
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())
    multitask = isinstance(model, MultiTaskModule)

    def loss_one(p, xi, ti):
        args = (xi.unsqueeze(0), task_label) if multitask else (xi.unsqueeze(0),)
        out = functional_call(model, ({**p, **fixed}, buffers), args)
        return sample_loss(out, ti.unsqueeze(0))

    detached = {n: params[n].detach() for n in names}
    return vmap(grad(loss_one), in_dims=(None, 0, 0))(detached, x, targets)


def cross_entropy_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, target)


def per_sample_gradient_sums(model: nn.Module, params: Tensors, x: torch.Tensor,
                             targets: torch.Tensor, sample_loss: SampleLoss, task_label: int = 0,
                             transform: str = "square",
                             weights: Optional[torch.Tensor] = None) -> Tensors:
    """``sum_n w_n f(g_n)`` per parameter, with ``g_n`` sample n's gradient (as in
    :func:`per_sample_gradients`), ``f`` = ``transform`` ("square" or "abs", element-wise) and
    ``w_n`` = ``weights`` (all ones when None), in the parameters' dtype.

    Why: importance estimates (Fisher, MAS) only need this sum, and for a ``Linear`` layer the
    per-sample gradient is the outer product ``delta_n a_n^T`` of the gradient at the layer's
    output and the layer's input, so ``sum_n w_n (delta_n a_n^T)^2 = (w * delta^2)^T (a^2)``
    (and the same with ``|.|``): one matmul per layer, exact, with no ``[B, *shape]``
    per-sample tensor. A Linear layer qualifies when it runs once per forward on [B, in]
    inputs; every other parameter (convolutions, normalisation, layers called twice) takes the
    ``torch.func`` path of :func:`per_sample_gradients`. Same eval-mode requirement.
    """
    if transform not in ("square", "abs"):
        raise ValueError(f"transform must be 'square' or 'abs'; got {transform!r}")
    f = (lambda t: t.pow(2)) if transform == "square" else torch.abs
    modules = dict(model.named_modules())
    owners: Dict[str, tuple] = {}  # param name -> (Linear module name, "weight" | "bias")
    for name in params:
        mod_name, _, attr = name.rpartition(".")
        if isinstance(modules.get(mod_name), nn.Linear) and attr in ("weight", "bias"):
            owners[name] = (mod_name, attr)
    seen: Dict[str, list] = {}  # module name -> [(input, output), ...]

    def recorder(mod_name):
        def hook(_module, inputs, output):
            seen.setdefault(mod_name, []).append((inputs[0].detach(), output))
        return hook

    handles = [modules[m].register_forward_hook(recorder(m))
               for m in {o[0] for o in owners.values()}]
    try:
        with torch.enable_grad():
            out = forward(model, x, task_label)
    finally:
        for h in handles:
            h.remove()
    ok = {m for m, calls in seen.items() if len(calls) == 1 and calls[0][0].dim() == 2
          and calls[0][0].shape[0] == len(x) and calls[0][1].requires_grad}
    factorised = [n for n, (m, _) in owners.items() if m in ok]
    result: Dict[str, torch.Tensor] = {}
    if factorised:
        per_sample_loss = vmap(lambda o, t: sample_loss(o.unsqueeze(0), t.unsqueeze(0)))
        total_loss = per_sample_loss(out, targets).sum()
        mods = sorted({owners[n][0] for n in factorised})
        deltas = torch.autograd.grad(total_loss, [seen[m][0][1] for m in mods])
        for m, delta in zip(mods, deltas):
            a = seen[m][0][0]
            d_f = f(delta)
            if weights is not None:
                d_f = d_f * weights.to(d_f.dtype).unsqueeze(1)
            for n in factorised:
                if owners[n][0] != m:
                    continue
                result[n] = (d_f.T @ f(a)) if owners[n][1] == "weight" else d_f.sum(0)
    rest = {n: p for n, p in params.items() if n not in result}
    if rest:
        grads = per_sample_gradients(model, rest, x, targets, sample_loss, task_label)
        for n, g in grads.items():
            g = f(g)
            result[n] = (torch.tensordot(weights.to(g.dtype), g, dims=1) if weights is not None
                         else g.sum(0))
    return {n: result[n] for n in params}


def eval_view(dataset):
    """The dataset with its eval transforms (no random augmentation) when it has them."""
    return dataset.eval() if hasattr(dataset, "eval") else dataset


def dataset_mean(model: nn.Module, params: Tensors, dataset, batch_size: int,
                 batch_sums: Callable[[tuple, int], Iterable[Tensors]]) -> Tensors:
    """Mean over the samples of ``dataset`` (not empty) of a per-sample quantity, in float64.

    ``batch_sums(batch, start)`` (``start``: the index in ``dataset`` of the batch's first
    sample) yields one or more ``{name: sum over the batch}`` dicts (e.g. from
    ``per_sample_gradient_sums``, one per class or task); each is added to a float64 total per
    parameter of ``params``, which is divided by the number of samples at the end. The model
    runs in eval mode (per-sample gradients need running statistics, no dropout) and gets its
    mode back afterwards; the data are read in order, ``batch_size`` samples at a time.
    Under torch.distributed each rank reads its contiguous block of the dataset and the totals
    and counts are summed over the ranks before the division (core.distributed), so every rank
    gets the one-process mean (to float64 summation order)."""
    start, stop = shard_range(len(dataset))
    part = dataset if (start, stop) == (0, len(dataset)) else Subset(dataset, range(start, stop))
    loader = DataLoader(part, batch_size=batch_size, shuffle=False,
                        collate_fn=getattr(dataset, "collate_fn", None))
    device = next(iter(params.values())).device
    total = {n: torch.zeros(p.shape, dtype=torch.float64, device=device)
             for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            for sums in batch_sums(batch, start + count):
                for n, s in sums.items():
                    total[n] += s
            count += len(batch[0])
    finally:
        model.train(was_training)
    counted = torch.tensor([float(count)], dtype=torch.float64, device=device)
    all_reduce_sum_(list(total.values()) + [counted])
    return {n: t / counted.item() for n, t in total.items()}
