"""Pre-activation ResNet-18 backbone, as used by Adam-NSCL.

Paper: S. Wang, X. Li, J. Sun, Z. Xu, "Training Networks in Null Space of Feature Covariance
for Continual Learning", CVPR 2021. The network is the pre-activation ResNet of K. He, X. Zhang,
S. Ren, J. Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016, in the CIFAR form
(3x3 stem, no max-pool). Follows the official Adam-NSCL code (github.com/ShipengWang/Adam-NSCL,
``models/resnet.py``: ``PreActResNet(PreActBlock, [2, 2, 2, 2])``, selected by
``--model_type resnet --model_name resnet18`` for CIFAR-100 and TinyImageNet).

Architecture (``w = width``, default 64; every conv has ``bias=bias``, default False):

* stem ``conv1``: 3x3 conv, stride 1, padding 1, ``in_channels -> w``; no BN/ReLU and no
  max-pool after it (the first block starts with BN-ReLU);
* ``stage1..stage4``: two pre-activation basic blocks each, widths ``w, 2w, 4w, 8w``, the first
  block of a stage with stride ``1, 2, 2, 2``. A block computes
  ``h = BN1(x); a = ReLU(h); out = conv2(ReLU(BN2(conv1(a)))) + s`` where ``s`` is
  ``shortcut(a)`` (a 1x1 strided conv, no BN) when the shape changes, else ``h``;
* ``bn_last`` (BatchNorm2d over ``8w``) + ReLU, global average pooling, flatten.

``forward`` returns features of shape ``[N, 8w]`` (512 by default); the classifier (``last`` in
the official code) is not part of the backbone. BatchNorm layers are standard (affine, running
statistics), as in the official ``resnet.py``.

Notes and deviations:

* Identity shortcut: the official block overwrites ``x`` with ``bn1(x)`` before the shortcut, so
  an identity shortcut carries ``BN1(x)`` rather than the raw ``x`` of He et al. We keep the
  official behaviour because it is what the Adam-NSCL results were obtained with.
* Pooling: the official ``PreActResNet`` already uses adaptive average pooling to 1x1, so 32x32
  (CIFAR, final map 4x4) and 64x64 (TinyImageNet, final map 8x8) inputs both give ``8w``
  features. No deviation.
* ``width`` and ``bias`` are generalisations; the defaults (64, False) are the official network.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_plugins.core.checks import check_bool, check_image_batch, check_int






class _PreActBlock(nn.Module):
    """Pre-activation basic block (see the module docstring for the shortcut convention)."""

    def __init__(self, in_planes: int, planes: int, stride: int, bias: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            # Pre-activation design: the projection acts on the already normalised input, no BN.
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(x)
        a = F.relu(h)
        skip = self.shortcut(a) if self.shortcut is not None else h
        out = self.conv1(a)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 feature extractor of Adam-NSCL; output ``[N, 8 * width]``."""

    def __init__(self, in_channels: int = 3, width: int = 64, bias: bool = False):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, low=1)
        self.width = check_int("width", width, low=1)
        self.bias = check_bool("bias", bias)

        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=bias)
        planes = [width, 2 * width, 4 * width, 8 * width]
        strides = [1, 2, 2, 2]
        in_planes = width
        for i, (p, s) in enumerate(zip(planes, strides), start=1):
            stage = nn.Sequential(_PreActBlock(in_planes, p, s, bias), _PreActBlock(p, p, 1, bias))
            self.add_module(f"stage{i}", stage)
            in_planes = p
        self.bn_last = nn.BatchNorm2d(in_planes)
        self.out_features = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(type(self).__name__, x, self.in_channels)
        out = self.conv1(x)
        out = self.stage4(self.stage3(self.stage2(self.stage1(out))))
        out = F.relu(self.bn_last(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
