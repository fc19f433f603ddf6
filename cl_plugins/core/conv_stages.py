"""The convolutional stages of a backbone, by module name: default taps for spatial distillation.

Distillation losses on spatial maps (NST's neuron vectors, attention maps) tap the outputs of a
network's convolutional stages. ``conv_stages(model)`` names them without a forward pass: the
direct children of ``model.backbone`` (of ``model`` when it has no ``backbone``) that contain a
convolution, in registration order; a ``ModuleList``/``ModuleDict`` child, never called itself,
is replaced by its elements (recursively). On this package's backbones:

- ``LeNet``: ``backbone.conv1``, ``backbone.conv2`` (conv outputs, before ReLU and pooling);
- ``ReducedResNet18``: ``backbone.conv1``, ``backbone.layer1`` .. ``backbone.layer4``;
- ``PreActResNet18``: ``backbone.conv1``, ``backbone.stage1`` .. ``backbone.stage4``;
- ``AlexNet5``: ``backbone.conv1`` .. ``backbone.conv3``;
- ``ResNet18NoBN``: ``backbone.conv1``, then each block ``backbone.layers.<stage>.<block>``;
- ``MLP``: none.

Registration order is taken as the order of computation, true of every backbone here; for a
model where it is not, name the layers explicitly.
"""

from __future__ import annotations

from typing import List

from torch import nn
from torch.nn.modules.conv import _ConvNd


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, _ConvNd) for m in module.modules())


def _stages(module: nn.Module, prefix: str) -> List[str]:
    out = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out += _stages(child, full)
        elif _has_conv(child):
            out.append(full)
    return out


def conv_stages(model: nn.Module) -> List[str]:
    """Names (as in ``model.named_modules()``) of the convolutional stages of ``model``'s
    backbone, first to last; empty when it has no convolution (see the module docstring)."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return _stages(backbone, "backbone")
    return _stages(model, "")
