"""ResNet-18 without BatchNorm, with RGO's Feature Encoding Layers: RGO's CIFAR-100 network.

Paper: H. Liu, H. Liu, "Continual Learning with Recursive Gradient Optimization", ICLR 2022
(20-split CIFAR-100 and 20-split miniImageNet, ANCHORS "GPU protocols"). Follows the TensorFlow
release attributed to the authors (github.com/mushfiqur11/OnlineContiualLearning, first commit
b5b1123, ``Model_RGO.py``; provenance unverified, facts only, nothing copied), whose ``_bn`` is a
no-op: the network has no normalisation at all.

Architecture (``nf`` = base width, default 64; no conv has a bias):

* stem ``conv1``: 7x7 conv, stride 1, padding 3, ``in_channels -> nf``, ReLU, FEL; no max-pool;
* ``layer1..layer4``: two basic blocks each, widths ``nf, 2nf, 4nf, 8nf``, the first block of
  ``layer2..4`` with stride 2 and a 1x1 strided conv shortcut (identity shortcut otherwise).
  A block computes ``ReLU(FEL(conv2(FEL(ReLU(conv1(x))))) + shortcut(x))``: an FEL after each
  conv, before the residual add; the shortcut is never permuted;
* ``stage_fel=True`` (the code's placement): one more FEL on each stage's output (after the
  block's final ReLU) and one after global average pooling (which commutes with a channel
  permutation); ``stage_fel=False`` keeps only the stem and in-block FELs;
* global average pooling, flatten: features ``[N, 8nf]`` (512). The 100-way output of the code is
  the head ``build_model`` adds.

Every FEL is a :class:`~cl_plugins.models.fel.FeatureEncodingLayer` (same permutation for every
layer of a given width within a task, identity for task 0). ``forward(x, task_labels)``; inside a
``ClassifierNet`` built by ``build_model`` the labels are routed to it (see ``fel.py``).

Options: ``fel`` (False = identity encodings with the same parameters and initialisation: "RGO
without FEL"), ``fel_seed`` (None = drawn from torch's global RNG after the weights are
initialised, i.e. from the run seed), ``init`` (``"code"``: every conv weight U(-b, b) with
b = 1/sqrt(k * in_channels), k the kernel side -- the reference code's ``stdv`` uses k, not
k * k; ``"torch"``: PyTorch's default, b = 1/sqrt(k * k * in_channels)). Without BatchNorm the
initial scale matters, hence the code's by default.

Deviations: TensorFlow's ``padding="SAME"`` pads a stride-2 3x3 conv on an even input by 0 before
and 1 after; PyTorch's ``padding=1`` pads 1 on both sides (same output size, the sampling grid is
shifted by one pixel). Pooling is adaptive (global), as the code's ``reduce_mean`` over H and W.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from cl_plugins.core.checks import check_bool, check_choice, check_image_batch, check_int

from .fel import FeatureEncodingLayer

INITS = ("code", "torch")


class _Block(nn.Module):
    """Basic block without BN: ``ReLU(FEL(conv2(FEL(ReLU(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int, seed: int, fel: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.fel1 = FeatureEncodingLayer(planes, seed, fel)
        self.fel2 = FeatureEncodingLayer(planes, seed, fel)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor, labels) -> torch.Tensor:
        out = self.fel1(torch.relu(self.conv1(x)), labels)
        out = self.fel2(self.conv2(out), labels)
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18NoBN(nn.Module):
    def __init__(self, in_channels: int = 3, nf: int = 64, fel: bool = True,
                 fel_seed: Optional[int] = None, stage_fel: bool = True, init: str = "code"):
        super().__init__()
        self.in_channels = check_int("model.in_channels", in_channels, 1)
        self.nf = check_int("model.nf", nf, 1)
        self.fel = check_bool("model.fel", fel)
        self.stage_fel = check_bool("model.stage_fel", stage_fel)
        check_choice("model.init", init, INITS)
        if fel_seed is not None:
            check_int("model.fel_seed", fel_seed, 0)
        # The blocks' FELs get their seed below, once the weights are initialised: drawing it
        # last gives fel=True/False (and fel_seed given or not) the same weights.
        self.conv1 = nn.Conv2d(in_channels, nf, 7, stride=1, padding=3, bias=False)
        in_planes, stages = nf, []
        for mult, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
            planes = mult * nf
            stages.append(nn.ModuleList([_Block(in_planes, planes, stride, 0, fel),
                                         _Block(planes, planes, 1, 0, fel)]))
            in_planes = planes
        self.layers = nn.ModuleList(stages)
        if init == "code":
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Conv2d):
                        bound = 1.0 / math.sqrt(m.kernel_size[0] * m.in_channels)
                        m.weight.uniform_(-bound, bound)
        if fel_seed is None:
            fel_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
        self.fel_seed = fel_seed
        for m in self.modules():
            if isinstance(m, FeatureEncodingLayer):
                m.seed = fel_seed
        self.stem_fel = FeatureEncodingLayer(nf, fel_seed, fel)
        widths = [mult * nf for mult in (1, 2, 4, 8)]
        self.stage_fels = nn.ModuleList(FeatureEncodingLayer(w, fel_seed, fel and stage_fel)
                                        for w in widths)
        self.pool_fel = FeatureEncodingLayer(8 * nf, fel_seed, fel and stage_fel)
        self.out_features = 8 * nf
        self._task_labels = None

    def set_task_labels(self, task_labels) -> None:
        """Labels for the next forward calls that get none (set by the ClassifierNet hook)."""
        self._task_labels = task_labels

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        check_image_batch(type(self).__name__, x, self.in_channels)
        labels = None
        if self.fel:
            labels = FeatureEncodingLayer.resolve(
                self._task_labels if task_labels is None else task_labels)
        out = self.stem_fel(torch.relu(self.conv1(x)), labels)
        for blocks, stage_fel in zip(self.layers, self.stage_fels):
            for block in blocks:
                out = block(out, labels)
            out = stage_fel(out, labels)
        return self.pool_fel(out.mean(dim=(2, 3)), labels)
