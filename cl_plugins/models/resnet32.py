"""The 32-layer CIFAR ResNet of iCaRL, UCIR and PODNet (He et al. 2016, Sec. 4.2, n = 5).

Papers: K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR
2016 (the CIFAR networks, 6n + 2 layers); used with n = 5 by iCaRL (Rebuffi et al. 2017) and by
PODNet (Douillard et al. 2020), whose code ports it as ``inclearn/convnet/my_resnet.py``
(``resnet_rebuffi``).

Architecture (base width ``nf``, default 16; convolutions without bias, each followed by BN):

* ``conv1``: 3x3, ``in_channels -> nf``, then ``bn1`` + ReLU;
* ``stage1``, ``stage2``, ``stage3`` (``nn.Sequential`` of ``n`` basic blocks each, widths
  ``nf, 2nf, 4nf``; the first block of stages 2 and 3 has stride 2). A block computes
  ``conv_b(ReLU(conv_a(x))) + shortcut(x)`` (with BN after each conv), then a ReLU when
  ``block_relu``; the shortcut of a strided block subsamples x (every other pixel) and pads the
  new channels with zeros (He et al.'s option A, as the PODNet code's ``DownsampleStride``);
* global average pooling, flatten: ``[N, 4 * nf]`` features (64 by default).

463,504 parameters for ``in_channels=3``, ``n=5``, ``nf=16``. Initialisation as the PODNet code:
Kaiming-normal convolutions (fan out), BN weight 1 and bias 0, except the second BN of each block,
whose weight starts at 0 (``zero_residual``). ``block_relu=False`` is the PODNet code's network
(``last_relu=False``): no ReLU after the residual sums, so the features (and the maps PODNet
taps) are pre-activation; its ``stage_3`` / ``stage_4`` split of the last stage is our
``stage3.0..3`` / ``stage3.4``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_plugins.core.checks import check_bool, check_image_batch, check_int


class ResNetBlock(nn.Module):
    """Basic block with an option-A shortcut; ``relu_out``: a ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int, relu_out: bool):
        super().__init__()
        self.conv_a = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(planes)
        self.conv_b = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(planes)
        self.stride, self.extra, self.relu_out = stride, planes - in_planes, relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        if self.stride != 1:
            x = x[..., ::self.stride, ::self.stride]
        if self.extra:
            x = torch.cat([x, x.new_zeros(x.shape[0], self.extra, *x.shape[2:])], dim=1)
        y = y + x
        return F.relu(y) if self.relu_out else y


class ResNet32(nn.Module):
    """CIFAR ResNet (6n + 2 layers with the classifier) feature extractor; ``[N, 4 * nf]``."""

    def __init__(self, in_channels: int = 3, n: int = 5, nf: int = 16, block_relu: bool = True,
                 zero_residual: bool = True):
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, low=1)
        check_int("n", n, low=1)
        check_int("nf", nf, low=1)
        check_bool("block_relu", block_relu)
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        planes = nf
        for i, width in enumerate((nf, 2 * nf, 4 * nf), start=1):
            blocks = [ResNetBlock(planes if b == 0 else width, width,
                                  2 if (b == 0 and i > 1) else 1, block_relu) for b in range(n)]
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
            planes = width
        self.out_features = planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if check_bool("zero_residual", zero_residual):
            for m in self.modules():
                if isinstance(m, ResNetBlock):
                    nn.init.zeros_(m.bn_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(type(self).__name__, x, self.in_channels)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stage3(self.stage2(self.stage1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
