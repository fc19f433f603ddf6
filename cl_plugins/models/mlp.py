"""Multi-layer perceptron backbone (no output layer).

Used by every MNIST protocol: Hsu et al. 2018 (1024-400-400), van de Ven et al. (784-400-400,
1024-1000-1000), GPM (784-100-100, no bias), DER (784-100-100), RGO (784-256-256).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cl_plugins.core.checks import check_choice, check_int, check_range

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
               "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}


def check_widths(input_size: int, hidden: Sequence[int]) -> list:
    """``hidden`` as a list, after checking it and ``input_size`` are positive integers."""
    check_int("model.input_size", input_size, 1)
    hidden = list(hidden)
    if not hidden:
        raise ValueError("model.hidden must list at least one hidden-layer width")
    for i, h in enumerate(hidden):
        check_int(f"model.hidden[{i}]", h, 1)
    return hidden


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation [-> dropout]`` for each width in ``hidden``.

    Args:
        input_size: number of input features after flattening (e.g. 784 or 1024 for padded MNIST).
        hidden: hidden-layer widths, at least one.
        bias: whether the Linear layers have a bias (GPM's network has none).
        activation: one of ``ACTIVATIONS``.
        dropout: dropout probability after each activation (0 = none).
        batch_norm: ``Linear -> BatchNorm1d -> activation`` (GDumb's MLP: BN with eps
            ``bn_eps`` = 1e-6 after every hidden Linear, whose bias is then redundant).
        bn_eps: BatchNorm's epsilon.
    """

    def __init__(self, input_size: int, hidden: Sequence[int] = (400, 400), bias: bool = True,
                 activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False,
                 bn_eps: float = 1e-5):
        super().__init__()
        hidden = check_widths(input_size, hidden)
        check_choice("model.activation", activation, sorted(ACTIVATIONS))
        check_range("model.dropout", dropout, 0.0, 1.0, high_inclusive=False)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"model.batch_norm must be true or false; got {batch_norm!r}")
        check_range("model.bn_eps", bn_eps, 0.0, None, low_inclusive=False)
        layers, width = [], input_size
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h, eps=bn_eps))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.input_size = input_size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.input_size:
            raise ValueError(f"MLP expects {self.input_size} input features per sample; "
                             f"got {x.shape[1]} (input shape {tuple(x.shape)})")
        return self.layers(x)
