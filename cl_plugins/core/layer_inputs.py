"""Layer inputs seen as matrices: which layers a projection method protects, and their input rows.

The projection family (Adam-NSCL, RGO, GPM, OGD's neighbours) treats every protected layer as a
matrix acting on a *fan-in* vector:

- ``nn.Linear``: weight ``[out, in]``, one input row per sample (per position for inputs with
  extra leading dimensions), ``d = in``;
- ``nn.Conv2d``: weight viewed as ``[out, in*kh*kw]`` (``weight.view(out, -1)``); the matching
  input rows are the unfolded patches (``F.unfold`` with the layer's kernel size, dilation,
  padding and stride), one row per sample and output position, ordered ``(in, kh, kw)`` exactly
  like ``weight.view(out, -1)``; ``d = in * kh * kw``.

With a bias, a constant 1 can be appended to every row (``with_bias=True``): the bias is then one
more fan-in column, ``[W | b]`` of shape ``[out, d + 1]``.

Everything else that owns weights (grouped/depthwise convolutions, ConvTranspose, Conv1d/3d,
Embedding, RNNs, attention, ...) is *unsupported*: :func:`protected_layers` raises with the
module path instead of silently leaving it unprotected. Normalisation layers (BatchNorm,
LayerNorm, GroupNorm) are returned separately: the methods say what they do with them.
:func:`accumulate_covariances` is the statistics pass ``C += X^T X`` over a dataset (Adam-NSCL).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cl_plugins.core.params import task_specific_prefixes

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
              nn.modules.instancenorm._InstanceNorm)


class UnsupportedLayerError(ValueError):
    """A layer with trainable weights that a fan-in projection cannot handle."""


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def protected_layers(model: nn.Module, method: str = "projection"
                     ) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Module]]:
    """``(layers, norms)``: the shared Linear/Conv2d layers with trainable weights, and the
    shared normalisation layers with trainable affine parameters, by module path.

    Task-specific heads (see :func:`cl_plugins.core.params.task_specific_prefixes`) are
    excluded. Any other module owning trainable parameters raises
    :class:`UnsupportedLayerError` naming its path and type.
    """
    skip = tuple(p[:-1] for p in task_specific_prefixes(model))  # "head.classifiers"
    layers, norms = {}, {}
    for name, module in model.named_modules():
        if skip and any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if not _owns_trainable(module):
            continue
        if isinstance(module, nn.Linear):
            layers[name] = module
        elif isinstance(module, nn.Conv2d) and not isinstance(module, nn.ConvTranspose2d):
            check_conv(module, name, method)
            layers[name] = module
        elif isinstance(module, NORM_TYPES):
            norms[name] = module
        else:
            raise UnsupportedLayerError(
                f"{method}: layer {name!r} ({type(module).__name__}) has trainable parameters "
                "but is not supported; supported: nn.Linear, nn.Conv2d (groups=1, zero "
                "padding), and normalisation layers (handled separately). Freeze it or replace it.")
    if not layers:
        raise UnsupportedLayerError(f"{method}: the model has no shared trainable Linear or "
                                    "Conv2d layer to protect")
    return layers, norms


def check_conv(conv: nn.Conv2d, name: str, method: str = "projection") -> None:
    if conv.groups != 1:
        raise UnsupportedLayerError(
            f"{method}: conv layer {name!r} has groups={conv.groups} (grouped/depthwise); only "
            "groups=1 convolutions map to one fan-in matrix")
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"{method}: conv layer {name!r} has padding_mode={conv.padding_mode!r}; only 'zeros' "
            "matches F.unfold's patches")
    if isinstance(conv.padding, str) and conv.padding != "valid":
        if any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
            raise UnsupportedLayerError(
                f"{method}: conv layer {name!r} uses padding='same' with an even receptive "
                "field (asymmetric padding); use explicit integer padding")


def _conv_padding(conv: nn.Conv2d):
    if conv.padding == "valid":
        return 0
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return conv.padding


def fan_in(module: nn.Module, with_bias: bool = False) -> int:
    """d: the number of columns of the layer's weight matrix (plus one for the bias column)."""
    if isinstance(module, nn.Linear):
        d = module.in_features
    elif isinstance(module, nn.Conv2d):
        d = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    else:
        raise UnsupportedLayerError(f"fan_in: unsupported layer {type(module).__name__}")
    return d + int(with_bias and module.bias is not None)


def input_rows(module: nn.Module, x: torch.Tensor, with_bias: bool = False) -> torch.Tensor:
    """The layer's input as rows ``[n, d]`` matching ``weight.view(out, -1)``: output = rows @ W^T.

    Linear: every leading index is a row. Conv2d: one row per (sample, output position), the
    unfolded patch. ``with_bias`` appends a column of ones when the layer has a bias.
    """
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, module.in_features)
    elif isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation,
                           padding=_conv_padding(module), stride=module.stride)  # [B, d, L]
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        raise UnsupportedLayerError(f"input_rows: unsupported layer {type(module).__name__}")
    if with_bias and module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def weight_matrix(module: nn.Module, with_bias: bool = False,
                  tensors: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
                  ) -> torch.Tensor:
    """``[out, d]`` view of (weight | bias) -- of the module's own tensors, or of ``tensors``
    given as ``(weight_like, bias_like)`` (e.g. gradients or updates)."""
    w, b = tensors if tensors is not None else (module.weight, module.bias)
    mat = w.reshape(w.shape[0], -1)
    if with_bias and module.bias is not None:
        mat = torch.cat([mat, b.reshape(-1, 1)], dim=1)
    return mat


def split_weight_matrix(module: nn.Module, mat: torch.Tensor, with_bias: bool = False
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inverse of :func:`weight_matrix`: ``(weight-shaped, bias-shaped or None)``."""
    if with_bias and module.bias is not None:
        return mat[:, :-1].reshape(module.weight.shape), mat[:, -1].reshape(module.bias.shape)
    return mat.reshape(module.weight.shape), None


@contextmanager
def record_inputs(layers: Dict[str, nn.Module],
                  callback: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Forward hooks calling ``callback(name, module, input)`` for every layer, removed on exit.

    Used inside a statistics pass (no grad, eval mode) rather than during training, so a
    method's per-step cost stays untouched.
    """
    handles = []
    for name, module in layers.items():
        def hook(mod, inputs, _out, _name=name):
            callback(_name, mod, inputs[0].detach())
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def iterate_batches(dataset, batch_size: int, device, generator: Optional[torch.Generator] = None,
                    max_batches: Optional[int] = None, shuffle: bool = False):
    """``(x, y, task)`` batches of an Avalanche dataset (eval transforms), on ``device``.

    ``shuffle`` draws the order from ``generator`` (part of the calling plugin's state), so a
    statistics pass over a subset is reproducible.
    """
    from torch.utils.data import DataLoader

    if hasattr(dataset, "eval"):
        dataset = dataset.eval()
    order = None
    if shuffle:
        order = torch.randperm(len(dataset), generator=generator).tolist()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        sampler=order, collate_fn=getattr(dataset, "collate_fn", None))
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        t = batch[-1] if len(batch) > 2 else torch.zeros(len(x), dtype=torch.long)
        yield x, y, torch.as_tensor(t).to(device)


def call_model(model: nn.Module, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """Forward with task labels for Avalanche multi-task models, plain otherwise."""
    from avalanche.models import MultiTaskModule

    if isinstance(model, MultiTaskModule):
        return model(x, task)
    return model(x)


def accumulate_covariances(covariances: Dict[str, torch.Tensor], model: nn.Module,
                           layers: Dict[str, nn.Module], dataset, device, batch_size: int, *,
                           with_bias: bool, batch_mean: bool,
                           generator: Optional[torch.Generator] = None,
                           shuffle: bool = False) -> None:
    """``C_l += rows^T rows`` (float64, uncentred) over one pass of ``dataset``, in place, for
    every layer (missing ``C_l`` start at zero, on the layer's device). The caller sets eval
    mode. ``batch_mean``: the rows of each mini-batch's *mean* input (Linear: one row; Conv2d:
    the patches of the mean input map); else every sample's rows."""
    for name, module in layers.items():
        if name not in covariances:
            d = fan_in(module, with_bias)
            covariances[name] = torch.zeros(d, d, dtype=torch.float64,
                                            device=module.weight.device)

    def accumulate(name, module, x):
        x = x.to(torch.float64)
        if batch_mean:
            x = x.mean(0, keepdim=True)
        rows = input_rows(module, x, with_bias)
        cov = covariances[name]
        cov.addmm_(rows.T.to(cov.device), rows.to(cov.device))

    with torch.no_grad(), record_inputs(layers, accumulate):
        for x, _y, t in iterate_batches(dataset, batch_size, device, generator=generator,
                                        shuffle=shuffle):
            # one task in the batch (the usual case): an int label takes Avalanche's
            # single-task path (cheaper, and dtype-safe for float64 models)
            call_model(model, x, int(t[0]) if bool((t == t[0]).all()) else t)


def check_fan_ins(owner, layers: Dict[str, nn.Module], stored: Dict[str, torch.Tensor],
                  with_bias: bool) -> None:
    """Raise ``ValueError`` unless ``stored`` (per-layer statistics whose first dimension is the
    fan-in, e.g. covariances ``[d, d]``) is empty or covers exactly ``layers`` with their fan-ins.
    ``owner``: the plugin, named in the message."""
    if not stored:
        return
    who = type(owner).__name__
    if set(layers) != set(stored):
        raise ValueError(f"{who}: the protected layers changed; stored statistics cover "
                         f"{sorted(stored)}, the model has {sorted(layers)}")
    for name, module in layers.items():
        d, saved = fan_in(module, with_bias), stored[name].shape[0]
        if saved != d:
            raise ValueError(f"{who}: layer {name!r} has fan-in {d}, the stored statistics {saved}")
