"""Five-layer AlexNet backbone of GPM for CIFAR-100.

Paper: G. Saha, I. Garg, K. Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021
(10-split CIFAR-100, 5-layer AlexNet adapted from Serra et al., HAT, ICML 2018). Follows the
official GPM code (github.com/sahagobinda/GPM, ``main_cifar100.py``, class ``AlexNet``).

Architecture (no layer has a bias; every BatchNorm has ``track_running_stats=False``, so it
normalises with the statistics of the current batch in both train and eval mode, as in GPM):

* ``conv1``: 4x4 conv, ``in_channels -> 64``, no padding; ``bn1``, ReLU, Dropout(0.2), MaxPool(2)
* ``conv2``: 3x3 conv, ``64 -> 128``;               ``bn2``, ReLU, Dropout(0.2), MaxPool(2)
* ``conv3``: 2x2 conv, ``128 -> 256``;              ``bn3``, ReLU, Dropout(0.5), MaxPool(2)
* flatten (``256 * 2 * 2 = 1024`` for a 32x32 input: 32 -conv-> 29 -pool-> 14 -conv-> 12
  -pool-> 6 -conv-> 5 -pool-> 2)
* ``fc1``: ``1024 -> 2048``; ``bn4`` (BatchNorm1d), ReLU, Dropout(0.5)
* ``fc2``: ``2048 -> 2048``; ``bn5`` (BatchNorm1d), ReLU, Dropout(0.5)

The order inside each block is conv/fc -> BN -> ReLU -> dropout -> max-pool, as in the official
``forward``. Dropout rates are those of the official code (``drop1 = 0.2`` after conv1 and conv2,
``drop2 = 0.5`` after conv3, fc1 and fc2). ``forward`` returns features ``[N, 2048]``; the
per-task bias-free linear heads (``fc3``) of the official code are not part of the backbone. With
``in_channels=3, input_size=32`` the backbone has 6,508,416 parameters.

Layer names and their registration order (conv1, bn1, conv2, bn2, conv3, bn3, fc1, bn4, fc2, bn5)
match the official model, so ``named_parameters()`` lists the same 15 tensors in the same order.
Note that GPM freezes the BatchNorm parameters after the first task; that is the plugin's job,
not the backbone's.

Generalisations (defaults reproduce the official network): ``in_channels``; ``input_size`` (the
flattened size is derived from it, any square input of side >= 19 works; the official code is
fixed to 32); ``dropout=False`` replaces every dropout by the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cl_plugins.core.checks import check_bool, check_image_batch, check_int

# Smallest square input whose three conv/pool stages still leave a 1x1 map (19->16->8->6->3->2->1).
_MIN_INPUT_SIZE = 19




def _final_map_size(input_size: int) -> int:
    s = input_size
    for k in (4, 3, 2):  # valid conv (stride 1, no padding) then max-pool 2
        s = (s - k + 1) // 2
    return s


class AlexNet5(nn.Module):
    """GPM's 5-layer AlexNet feature extractor; output ``[N, 2048]``."""

    def __init__(self, in_channels: int = 3, input_size: int = 32, dropout: bool = True):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.input_size = check_int("input_size", input_size, low=_MIN_INPUT_SIZE)
        self.dropout = check_bool("dropout", dropout)
        s = _final_map_size(input_size)

        self.conv1 = nn.Conv2d(in_channels, 64, 4, bias=False)
        self.bn1 = nn.BatchNorm2d(64, track_running_stats=False)
        self.conv2 = nn.Conv2d(64, 128, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(128, track_running_stats=False)
        self.conv3 = nn.Conv2d(128, 256, 2, bias=False)
        self.bn3 = nn.BatchNorm2d(256, track_running_stats=False)
        self.fc1 = nn.Linear(256 * s * s, 2048, bias=False)
        self.bn4 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.fc2 = nn.Linear(2048, 2048, bias=False)
        self.bn5 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout(0.2) if dropout else nn.Identity()
        self.drop2 = nn.Dropout(0.5) if dropout else nn.Identity()
        self.out_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(type(self).__name__, x, self.in_channels, self.input_size)
        x = self.maxpool(self.drop1(self.relu(self.bn1(self.conv1(x)))))
        x = self.maxpool(self.drop1(self.relu(self.bn2(self.conv2(x)))))
        x = self.maxpool(self.drop2(self.relu(self.bn3(self.conv3(x)))))
        x = torch.flatten(x, 1)
        x = self.drop2(self.relu(self.bn4(self.fc1(x))))
        return self.drop2(self.relu(self.bn5(self.fc2(x))))
