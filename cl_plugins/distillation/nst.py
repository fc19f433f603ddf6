"""Neuron selectivity transfer (NST): match the distribution of the old model's neuron activations.

Name: ``nst``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.
Paper: Z. Huang and N. Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", arXiv:1707.01219, 2017. Official code: TuSimple/neuron-selectivity-transfer (MXNet;
``symbol/transfer.py`` ``mmd_poly``, ``config/cfgs.py``; read at 50dee40). Longer notes and
measurements: docs/methods/nst.md.

The teacher is a frozen copy of the model that ended the previous experience
(``core.feature_distill``). A tapped layer gives, per input, a map F in R^{C x HW}; each channel's
activations over space, l2-normalised, is a *neuron vector* (the official code: f / sqrt(||f||^2
+ 1e-10), ``core.distill_losses.neuron_vectors``). The student's C_S vectors {s_i} and the
teacher's C_T vectors {t_j} are two samples whose distributions NST matches with the squared
maximum mean discrepancy:

    MMD^2 = mean_{i,i'} k(s_i, s_i') + mean_{j,j'} k(t_j, t_j') - 2 mean_{i,j} k(s_i, t_j)
    loss  = CE + weight * sum_layers mean_rows MMD^2

``kernel``: ``"linear"`` k = x.y (MMD^2 = ||mean_i s_i - mean_j t_j||^2, the mean neuron
vectors); ``"poly"`` k = (x.y + c)^degree, the paper's d = 2, c = 0 (then MMD^2 = ||S^T S / C_S
- T^T T / C_T||_F^2 for the [C, HW] normalised maps S, T: their HW x HW Gram matrices);
``"gaussian"`` k = exp(-||x - y||^2 / (2 sigma^2)).

Layers: ``layers="auto"`` taps the last convolutional stage of ``model.backbone``
(``core.conv_stages``: ``backbone.conv2`` of LeNet, ``backbone.layer4`` of the reduced
ResNet-18, ``backbone.stage4`` of the PreAct ResNet-18), as the paper taps the last feature maps
before global pooling (the official code: Inception-BN's ``in5b`` batch norm). NST needs
spatial maps ``[N, C, H, W]`` (or ``[N, C, L]``): a layer with vector features ``[N, D]`` (an
MLP) raises ``ValueError`` naming the layer and the shape at the first step of the first
experience, before any update; ``"auto"`` on a backbone without convolution raises at
``before_training_exp``. (A vector has no neuron vectors to compare: read as D channels of one
position, each normalises to +-1; as one channel, the loss is a plain normalised-feature l2.)

Hooks (``FeatureDistillPlugin``): ``before_training_exp`` (resolves ``layers``, teacher,
taps), ``before_forward``/``after_forward`` (taps), ``before_backward`` (checks the maps at
every step, adds the term from the second experience on), ``after_training_exp`` (teacher).

Hyper-parameters (defaults): ``weight`` = 50.0 (the official code's ``kt_weight`` for NST, poly
kernel, ImageNet), ``layers`` = "auto", ``inputs`` = "current" (the paper distils the training
inputs; "replay"/"both" need ER), ``kernel`` = "poly", ``degree`` = 2 and ``c`` = 0.0 (paper,
official code), ``sigma`` = 1.0 (Gaussian kernel only).

Deviations:
- ``weight`` multiplies MMD^2 itself, as the official code (``MakeLoss(grad_scale=50)``); the
  paper writes lambda / 2 MMD^2, so weight = lambda / 2;
- the official code drops the teacher-only term of MMD^2 (a constant: same gradient) and sums
  CE and MMD^2 over the batch; here both are batch means: the same ratio;
- the official code implements only the poly kernel; the Gaussian kernel's bandwidth is a fixed
  ``sigma`` here (neuron vectors have unit norm: squared distances lie in [0, 4]);
- the teacher is the previous model (same architecture), not a larger pretrained network, so
  channel counts and spatial sizes agree; mmd2 refuses maps of different spatial sizes.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

from torch import Tensor

from cl_plugins.core.checks import check_choice, check_int, check_positive, check_range
from cl_plugins.core.conv_stages import conv_stages
from cl_plugins.core.distill_losses import KERNELS, mmd2
from cl_plugins.core.feature_distill import FeatureDistillPlugin, check_layers

AUTO = "auto"


class NSTPlugin(FeatureDistillPlugin, supports_distributed=True):
    METHOD_NAME = "nst"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    NEEDS_SPATIAL = True  # needs a convolutional model (the generic tests build one)
    SWEEP: dict = {"weight": {"distribution": "log_uniform_values", "min": 1.0, "max": 200.0},
                   "kernel": {"values": list(KERNELS)}}
    PAPER = "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer (Huang & " \
            "Wang, arXiv 2017)"
    SUMMARY = ("squared MMD between the old and the new model's l2-normalised channel "
               "activation maps (neuron vectors) at conv layers; poly / linear / Gaussian kernel")
    SETTINGS = ("weight", "requested_layers", "inputs", "kernel", "degree", "c", "sigma")

    def __init__(self, weight: float = 50.0, layers: Union[str, Sequence[str]] = AUTO,
                 inputs: str = "current", kernel: str = "poly", degree: int = 2, c: float = 0.0,
                 sigma: float = 1.0):
        super().__init__(weight, layers, inputs)
        self.requested_layers: Tuple[str, ...] = check_layers(layers)
        if AUTO in self.requested_layers and len(self.requested_layers) > 1:
            raise ValueError(f"layers: 'auto' stands alone (the last conv stage); got {layers!r}")
        self.kernel = check_choice("kernel", kernel, KERNELS)
        self.degree = check_int("degree", degree, low=1)
        self.c = float(check_range("c", c))
        self.sigma = float(check_positive("sigma", sigma))

    # ------------------------------------------------------------------ the method
    def check_spatial(self, name: str, f: Tensor) -> None:
        """``ValueError`` naming the layer and its shape unless ``f`` is a spatial map."""
        if f.dim() < 3:
            raise ValueError(
                f"{self.who}: layer {name!r} gives features of shape {tuple(f.shape)}; NST needs "
                "spatial feature maps [N, C, H, W] or [N, C, L] (a convolutional layer): tap a "
                "conv stage (layers='auto' picks the last one) or use a conv backbone (e.g. "
                "model.name=lenet with benchmark.pad_to_32=true for 8x8 images, or "
                "reduced_resnet18)")

    def distill_loss(self, student: Dict[str, Tensor], teacher: Dict[str, Tensor], y: Tensor,
                     t: Tensor) -> Tensor:
        total = 0.0
        for name in self.layers:
            total = total + mmd2(student[name], teacher[name], self.kernel, self.degree, self.c,
                                 self.sigma)
        return total

    def resolve_layers(self, model) -> Tuple[str, ...]:
        """The layers tapped on ``model``: ``requested_layers``, or its last conv stage."""
        if self.requested_layers != (AUTO,):
            return self.requested_layers
        stages = conv_stages(model)
        if not stages:
            backbone = getattr(model, "backbone", model)
            raise ValueError(
                f"{self.who}: layers='auto' taps the last convolutional stage of the backbone, "
                f"but {type(backbone).__name__} has no convolution; NST needs spatial feature "
                "maps: use a conv backbone (e.g. model.name=lenet with benchmark.pad_to_32=true "
                "for 8x8 images, or reduced_resnet18) or name conv layers in `layers`")
        return (stages[-1],)

    # ------------------------------------------------------------------ hooks
    def check_features(self, student: Dict[str, Tensor]) -> None:
        for name in self.layers:  # every step, the first experience's too, before any update
            self.check_spatial(name, student[name])

    def before_training_exp(self, strategy, **kwargs):
        # the teacher is tapped at the same modules (the base's teacher_layers follows layers)
        self.layers = self.teacher_layers = self.resolve_layers(strategy.model)
        super().before_training_exp(strategy, **kwargs)
