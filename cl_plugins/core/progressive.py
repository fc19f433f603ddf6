"""Progressive columns: each new column reads every earlier column through lateral adapters.

Progressive neural networks (Rusu et al. 2016, arXiv 1606.04671) keep one column (a copy of the
network) per task; the columns of earlier tasks are frozen and the new column's layer i receives
the earlier columns' activations h_{i-1}. This module does it for any ``ClassifierNet`` made of
Linear and Conv layers (the runner's ``mlp``, ``lenet``, ...), with forward hooks, so a column is
always an ordinary copy of the user's model and keeps its modules and ``state_dict`` keys.

**Lateral layers** (``lateral_layers``): the Linear / Conv layers of ``model.backbone`` in module
order (the order an MLP or LeNet calls them), then ``model.head`` as the output layer. The input
of lateral layer i in column j is h_{i-1}^(j) (what a forward pre-hook sees: for LeNet's first
Linear, the flattened pooled feature map). Layer 0 reads the input x, the same in every column,
so it has no lateral connection. For i >= 1, column k (with J = k earlier columns) adds to the
output (pre-activation) of its layer i, Eq. 2 of the paper:

    U_i s( V_i [alpha_{i,1} h_{i-1}^(1), ..., alpha_{i,J} h_{i-1}^(J)] + c_i )      (mlp adapter)
    U_i [h_{i-1}^(1), ..., h_{i-1}^(J)]                                             (Eq. 1: linear)

[...]: concatenation along features (Linear) or channels (Conv); s: ReLU; alpha_{i,j}: one
learned scalar per earlier column and layer, initialised uniform in [0, ``ALPHA_INIT``) (the
paper: "a learned scalar, initialized by a random small value"). V_i projects onto the width of
one column's h_{i-1} (the paper's dimensionality reduction: a Linear, or a 1x1 convolution for
conv layers); U_i has the geometry of layer i itself without bias (Linear: in -> out features;
Conv: the layer's kernel, stride, padding, dilation and groups); for the head, U maps the
features to the task's logits (width read from the head for that task label).

``ColumnAdapters`` holds one column's adapters; ``column_inputs`` runs a frozen column (with its
own adapters) and returns its layer inputs; ``arm`` puts the lateral hooks on a model whose
forward the caller runs (the strategy's own forward of the live column, or a frozen column's).
"""

from __future__ import annotations

from functools import partial
from typing import List, Optional

import torch
from torch import Tensor, nn

from cl_plugins.core.lateral import ALPHA_INIT, call_head

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
ADAPTERS = ("mlp", "linear")


def lateral_layers(model: nn.Module) -> List[nn.Module]:
    """The backbone's Linear / Conv layers in module order, then the head (module docstring)."""
    from cl_plugins.models.classifier import ClassifierNet

    if not isinstance(model, ClassifierNet):
        raise ValueError(f"progressive columns need a ClassifierNet (backbone + head); got "
                         f"{type(model).__name__}")
    layers = [m for m in model.backbone.modules() if isinstance(m, (nn.Linear,) + CONV_LAYERS)]
    if not layers:
        raise ValueError("progressive columns need a backbone with Linear or Conv layers; "
                         f"{type(model.backbone).__name__} has none")
    return layers + [model.head]


class LateralAdapter(nn.Module):
    """One lateral connection into layer i from J earlier columns (Eq. 2, or Eq. 1 if V is None)."""

    def __init__(self, V: Optional[nn.Module], U: nn.Module, n_prev: int, dim: int):
        super().__init__()
        self.V, self.U, self.dim = V, U, dim
        self.alpha = nn.Parameter(torch.empty(n_prev)) if V is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:  # alpha only: V and U reset themselves
        if self.alpha is not None:
            with torch.no_grad():
                self.alpha.uniform_(0.0, ALPHA_INIT)

    def forward(self, inputs: List[Tensor]) -> Tensor:
        if self.V is None:  # Eq. 1: sum_j U^(k:j) h^(j) = U [h^(1), ..., h^(J)]
            return self.U(torch.cat(inputs, self.dim))
        h = torch.cat([a * x for a, x in zip(self.alpha, inputs)], self.dim)  # Eq. 2
        return self.U(torch.relu(self.V(h)))


def _adapter_for(layer: nn.Module, n_prev: int, adapter: str, out: Optional[int],
                 width: Optional[int]) -> LateralAdapter:
    if isinstance(layer, CONV_LAYERS):
        c_in, conv = layer.in_channels, type(layer)
        U = conv(c_in, layer.out_channels, layer.kernel_size, stride=layer.stride,
                 padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=False)
        if adapter == "linear":
            U = conv(c_in * n_prev, layer.out_channels, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, bias=False)
            return LateralAdapter(None, U, n_prev, 1)
        return LateralAdapter(conv(c_in * n_prev, c_in, 1), U, n_prev, 1)
    n_in = layer.in_features if isinstance(layer, nn.Linear) else width
    n_out = layer.out_features if isinstance(layer, nn.Linear) else out
    if adapter == "linear":
        return LateralAdapter(None, nn.Linear(n_in * n_prev, n_out, bias=False), n_prev, -1)
    return LateralAdapter(nn.Linear(n_in * n_prev, n_in), nn.Linear(n_in, n_out, bias=False),
                          n_prev, -1)


class ColumnAdapters(nn.Module):
    """The adapters of one column that has ``n_prev`` earlier columns, for its task ``task``:
    one per lateral layer but the first (``adapters[i - 1]`` feeds layer i)."""

    def __init__(self, model: nn.Module, n_prev: int, task: int, adapter: str = "mlp"):
        super().__init__()
        layers = lateral_layers(model)
        width = model.backbone.out_features
        with torch.no_grad():  # the head's width for this task
            probe = next(model.head.parameters())
            out = call_head(model.head, torch.zeros(1, width, dtype=probe.dtype,
                                                    device=probe.device), task).shape[-1]
        self.adapters = nn.ModuleList(
            [_adapter_for(m, n_prev, adapter, out, width) for m in layers[1:]])

    def forward(self, i: int, inputs: List[Tensor]) -> Tensor:
        return self.adapters[i - 1](inputs)


def _record(store: list, i: int, module, args):
    store[i] = args[0]


def _add(adapters: ColumnAdapters, i: int, inputs: List[Tensor], module, args, output):
    return output + adapters(i, inputs)


def arm(model: nn.Module, adapters: Optional[ColumnAdapters], prev: List[List[Tensor]],
        record: Optional[list] = None) -> list:
    """Hooks on ``model``'s lateral layers: layer i (i >= 1) gets ``adapters``' lateral term
    from ``prev`` (the earlier columns' layer inputs, one list per column); ``record`` (a list
    as long as the lateral layers) receives this column's layer inputs. Returns the handles
    (``disarm`` removes them)."""
    handles = []
    for i, layer in enumerate(lateral_layers(model)):
        if record is not None:
            handles.append(layer.register_forward_pre_hook(partial(_record, record, i)))
        if i > 0 and adapters is not None and prev:
            handles.append(layer.register_forward_hook(
                partial(_add, adapters, i, [p[i] for p in prev])))
    return handles


def disarm(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


@torch.no_grad()
def column_inputs(columns: List[nn.Module], adapters: List[Optional[ColumnAdapters]],
                  x: Tensor) -> List[List[Tensor]]:
    """Each frozen column's lateral-layer inputs on ``x`` (column j with its own laterals from
    columns < j), computed in order; the head's input is the backbone's output (heads of old
    columns are not run)."""
    inputs: List[List[Tensor]] = []
    for column, ad in zip(columns, adapters):
        n = len(lateral_layers(column))
        record: list = [None] * n
        handles = arm(column, ad, inputs, record)
        try:
            record[n - 1] = column.backbone(x)
        finally:
            disarm(handles)
        inputs.append(record)
    return inputs
