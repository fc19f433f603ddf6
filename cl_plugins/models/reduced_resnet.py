"""Reduced ResNet-18 backbone of GEM and A-GEM.

Papers: D. Lopez-Paz, M. Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS
2017 (CIFAR-100 experiments), reused by A. Chaudhry et al., "Efficient Lifelong Learning with
A-GEM", ICLR 2019. Follows the official GEM code (github.com/facebookresearch/
GradientEpisodicMemory, ``model/common.py``: ``ResNet18(nclasses, nf=20)``).

Architecture (post-activation ResNet-18, base width ``nf``, default 20; all convs without bias):

* stem ``conv1``: 3x3 conv, stride 1, padding 1, ``in_channels -> nf``, then ``bn1`` + ReLU;
  no max-pool;
* ``layer1..layer4``: two basic blocks each, widths ``nf, 2nf, 4nf, 8nf``, the first block of a
  stage with stride ``1, 2, 2, 2``. A block computes
  ``ReLU(BN2(conv2(ReLU(BN1(conv1(x))))) + shortcut(x))``, where ``shortcut`` is a 1x1 strided
  conv + BatchNorm2d when the shape changes and the identity otherwise;
* average pooling of the final map, flatten.

``forward`` returns features of shape ``[N, 8 * nf]`` (160 by default); the linear classifier of
the official code is not part of the backbone. The backbone has 1,093,140 parameters for
``in_channels=3, nf=20`` (the "about 1.1M" of the papers includes the classifier). BatchNorm layers
are standard (affine, running statistics), as in the official code.

Deviations:

* Pooling: the official code applies ``avg_pool2d(out, 4)``, which is a global average over the
  4x4 final map of a 32x32 input. We use adaptive average pooling to 1x1: identical for 32x32
  (and 28x28, whose final map is also 4x4), and it keeps the feature size at ``8 * nf`` for other
  input sizes, where the official code would give a larger, size-dependent vector.
* Input: the official code reshapes flat vectors with ``x.view(bsz, 3, 32, 32)``; this backbone
  takes image tensors ``[N, in_channels, H, W]`` and rejects anything else.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_plugins.core.checks import check_image_batch, check_int




class _BasicBlock(nn.Module):
    """Post-activation basic block of the original ResNet."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """Reduced (width ``nf``) ResNet-18 feature extractor of GEM / A-GEM; output ``[N, 8 * nf]``."""

    def __init__(self, in_channels: int = 3, nf: int = 20):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.nf = check_int("nf", nf, low=1)

        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        in_planes = nf
        for i, (mult, stride) in enumerate(zip([1, 2, 4, 8], [1, 2, 2, 2]), start=1):
            planes = mult * nf
            layer = nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1))
            self.add_module(f"layer{i}", layer)
            in_planes = planes
        self.out_features = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(type(self).__name__, x, self.in_channels)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
