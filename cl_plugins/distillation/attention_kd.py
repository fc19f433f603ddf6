"""Attention transfer: keep the spatial attention maps of conv layers close to the previous model's.

Name: ``attention_kd``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.
Paper: S. Zagoruyko and N. Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017. Official code:
szagoruyko/attention-transfer (``utils.py`` ``at``/``at_loss``, ``cifar.py``, README; read at
893df54). Notes and measurements: docs/methods/attention_kd.md.

The teacher is the frozen model that ended the previous experience (``core.feature_distill``).
For a conv layer's output A in R^{C x H x W} on input x, the activation-based attention map and
the term, over the selected rows (``inputs``) and the tapped layers j:

    Q(A)   = vec( sum_c |A_c|^p ) / || vec( sum_c |A_c|^p ) ||_2     # Eq. 2's Q / ||Q||, F^p_sum
    L_AT,j = mean_{x, positions} ( Q(A_S,j) - Q(A_T,j) )^2            # official at_loss
    loss   = CE + weight * sum_j L_AT,j                               # official: beta * sum

(``core.distill_losses.attention_loss``; the code's mean over channels of A^2 gives the same map
after the normalisation). ``distance="norm"`` uses the paper's written distance, the mean over
rows of ||Q_S - Q_T||_2 (Eq. 2 without beta / 2), instead of the code's squared mean.

Layers: the maps must be spatial, ``[N, C, H, W]``, with equal spatial sizes for the student's
and the teacher's layer of a pair (``teacher_layers``, default: the same names). A layer with
other features (an MLP's ``[N, D]``) raises ``ValueError`` naming the layer and its shape at the
first training step of the first experience, before any update; a model without the default
layers raises at ``before_training_exp`` and lists its convolutional stages. The default taps
LeNet's two conv stages (``backbone.conv1``, ``backbone.conv2``: conv outputs before ReLU and
pooling; attention squares them, as the paper's maps of the pre-activation ResNets' group
outputs); for the ResNets name their stages (``backbone.layer1`` .. ``backbone.layer4``,
``backbone.stage1`` .. ``stage4``), the paper's choice of one map per group of residual blocks.

Hooks (``FeatureDistillPlugin``): ``before_training_exp`` (checks the layers, taps),
``before_forward``/``after_forward`` (the student's taps), ``before_backward`` (shape check;
the term from the second experience on), ``after_training_exp`` (new teacher).

Hyper-parameters (defaults from the official code): ``weight`` = 1000.0 (beta = 1e+3 in the
README's CIFAR and ImageNet commands; the paper: 10^3 divided by the batch size and the map size,
which the code's mean performs); ``p`` = 2.0 (the code's pow(2)); ``distance`` = "mean_sq";
``layers`` = LeNet's conv stages; ``inputs`` = "current" | "replay" | "both".

Deviations:
- the teacher is the previous model (same architecture), not a larger pretrained network;
- the official code adds AT to KD or CE for a fixed teacher; here it is added to CE from the
  second experience on, on the rows ``inputs`` selects;
- the map is the sum of |A_c|^p, not the code's mean of A^2: identical after normalisation for
  p = 2 (up to F.normalize's epsilon on all-zero maps).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from cl_plugins.core.checks import check_choice, check_positive
from cl_plugins.core.conv_stages import conv_stages
from cl_plugins.core.distill_losses import AT_DISTANCES, attention_loss
from cl_plugins.core.feature_distill import FeatureDistillPlugin

Layers = Union[str, Sequence[str]]
LENET_STAGES = ("backbone.conv1", "backbone.conv2")


class AttentionKDPlugin(FeatureDistillPlugin, supports_distributed=True):
    METHOD_NAME = "attention_kd"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    NEEDS_SPATIAL = True  # needs a convolutional model (the generic tests build one)
    SWEEP: dict = {"weight": {"distribution": "log_uniform_values", "min": 10.0, "max": 1e4}}
    PAPER = "Paying More Attention to Attention (Zagoruyko & Komodakis, ICLR 2017)"
    SUMMARY = ("keeps conv layers' spatial attention maps (channel sum of |A|^p, l2-normalised) "
               "close to the previous model's")
    SETTINGS = FeatureDistillPlugin.SETTINGS + ("teacher_layers", "p", "distance")

    def __init__(self, weight: float = 1000.0, layers: Layers = LENET_STAGES,
                 teacher_layers: Optional[Layers] = None, inputs: str = "current",
                 p: float = 2.0, distance: str = "mean_sq"):
        super().__init__(weight, layers, inputs, teacher_layers)
        self.p = float(check_positive("p", p))
        self.distance = check_choice("distance", distance, AT_DISTANCES)
        self._stages: Sequence[str] = ()  # the model's conv stages, for the error messages

    def _needs_maps(self, found: str) -> ValueError:
        return ValueError(f"{self.who}: {found}; attention transfer taps spatial feature maps "
                          f"[N, C, H, W]: this model's convolutional stages are "
                          f"{list(self._stages)} (an MLP has none: use a conv backbone, e.g. "
                          "model.name=lenet with benchmark.pad_to_32=true for 8x8 images)")

    def check_features(self, student: Dict[str, Tensor]) -> None:
        for name, f in student.items():
            if f.dim() != 4:
                raise self._needs_maps(f"layer {name!r} gives features of shape "
                                       f"{tuple(f.shape)}")

    def distill_loss(self, student: Dict[str, Tensor], teacher: Dict[str, Tensor], y: Tensor,
                     t: Tensor) -> Tensor:
        terms = []
        for g, h in zip(self.layers, self.teacher_layers):
            s, q = student[g], teacher[h]
            if s.shape[2:] != q.shape[2:]:
                raise ValueError(f"{self.who}: the student's layer {g!r} gives maps of spatial "
                                 f"size {tuple(s.shape[2:])}, the teacher's {h!r} "
                                 f"{tuple(q.shape[2:])}; pair layers of equal spatial size")
            terms.append(attention_loss(s, q, self.p, self.distance))
        return torch.stack(terms).sum()

    def before_training_exp(self, strategy, **kwargs):
        self._stages = conv_stages(strategy.model)
        names = dict(strategy.model.named_modules())
        missing = [n for n in dict.fromkeys(self.layers + self.teacher_layers) if n not in names]
        if missing:
            raise self._needs_maps(f"the model has no module named {missing}")
        super().before_training_exp(strategy, **kwargs)
