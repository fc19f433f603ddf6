"""LeNet-5 style convolutional backbone for small (MNIST / CIFAR sized) images.

Paper: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 1998. This is the modern "LeNet-5 style" network used as a small
backbone throughout the continual-learning literature, written from the paper, not from any
particular repository.

Architecture (defaults ``channels=(6, 16)``, ``hidden=(120, 84)``; all layers with bias):

* ``conv1``: 5x5 conv, ``in_channels -> channels[0]``, no padding; ReLU; MaxPool(2)
* ``conv2``: 5x5 conv, ``channels[0] -> channels[1]``, no padding; ReLU; MaxPool(2)
* flatten: ``channels[1] * s * s`` with ``s = ((input_size - 4) // 2 - 4) // 2``, i.e.
  16 * 4 * 4 = 256 for 28x28 (MNIST) and 16 * 5 * 5 = 400 for 32x32 (the paper's input)
* ``fc1``: ``-> hidden[0]``; ReLU
* ``fc2``: ``hidden[0] -> hidden[1]``; ReLU

``forward`` returns features ``[N, hidden[1]]``; the paper's output layer (``84 -> 10``) is the
classification head and is not part of the backbone.

Deviations from the 1998 paper (all usual in modern re-implementations): ReLU instead of scaled
tanh, max-pooling instead of trainable sub-sampling, a fully connected ``conv2`` instead of the
paper's sparse connection table, and no RBF output layer. 28x28 inputs are not padded to 32x32;
the first fully connected layer is sized from ``input_size`` instead (any side >= 16 works).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_plugins.core.checks import check_image_batch, check_int

# Smallest square input that still leaves a 1x1 map after both conv/pool stages (16->12->6->2->1).
_MIN_INPUT_SIZE = 16


def _check_int_pair(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a sequence of 2 positive integers; got {value!r}.")
    return tuple(check_int(f"{name}[{i}]", v, low=1) for i, v in enumerate(value))


class LeNet(nn.Module):
    """LeNet-5 style feature extractor; output ``[N, hidden[1]]``."""

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int = 28,
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
    ):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.input_size = check_int("input_size", input_size, low=_MIN_INPUT_SIZE)
        c1, c2 = self.channels = _check_int_pair("channels", channels)
        h1, h2 = self.hidden = _check_int_pair("hidden", hidden)
        s = ((input_size - 4) // 2 - 4) // 2

        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * s * s, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.out_features = h2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(type(self).__name__, x, self.in_channels, self.input_size)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.relu(self.fc2(x))
