"""Relational knowledge distillation (RKD): keep the old model's distances and angles of samples.

Name: ``relational_kd``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.
Paper: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019.
Official code: lenscloth/RKD (``metric/loss.py`` ``RkdDistance``, ``RKdAngle``;
``metric/utils.py`` ``pdist``; ``run_distill.py``, ``examples/*.sh``; read at 0a6c3c0).
Longer notes and measurements: docs/methods/relational_kd.md.

The teacher is a frozen copy of the model that ended the previous experience
(``core.feature_distill``). On the embeddings t_i (teacher) and s_i (student) of the N selected
rows of a minibatch (features of ``layers``, flattened per sample; by default the backbone's
output, the input of the classifier):

    psi_D(t_i, t_j) = ||t_i - t_j|| / mu,  mu = mean_{i != j} ||t_i - t_j||      # distance
    psi_A(t_i, t_j, t_k) = <e_ij, e_kj>,  e_ij = (t_i - t_j) / ||t_i - t_j||     # angle at j
    L_D = mean over the N^2 pairs of l_1(psi_D(t), psi_D(s))                     # RKD-D
    L_A = mean over the N^3 triplets of l_1(psi_A(t), psi_A(s))                  # RKD-A
    loss = CE + weight * sum_layers (distance_weight L_D + angle_weight L_A)

l_1 is the Huber loss with delta 1 (``smooth_l1``): 1/2 x^2 for |x| <= 1, |x| - 1/2 beyond. As the
official code, mu is the mean over ordered pairs i != j, the means run over the whole N x N and
N x N x N tables (entries with i = j, or i = j or k = j, are 0 for both models and count), and
distances and angles are taken on the embeddings as they are (no l2 normalisation here: the
CL teacher is the student's own earlier self, with the same un-normalised features).

Cost: L_A (``core.rkd_angle``) takes the cosines from the Gram matrix of the centred
embeddings, O(N^2 D + N^3) work instead of the official N^3 D, and keeps four N^3 tables at most
(both models' cosines, the clamped difference, one product in the backward pass); above
``max_angle_rows`` rows (default 256: 16.8M cosines per table) the step raises a ``ValueError``
saying so instead of running out of memory (lower the minibatch or raise the limit;
``angle_weight=0`` skips L_A). On S2's MLP (N = 128, D = 400) L_A's forward and backward take
about 13 ms against 160 ms for the autograd formula it replaced (docs/methods/relational_kd.md).

Hooks: ``before_training_exp`` (teacher, taps), ``after_forward``, ``before_backward`` (adds the
term from the second experience on), ``after_training_exp`` (teacher), ``after_training``.

Hyper-parameters (defaults): ``distance_weight`` = 25.0 and ``angle_weight`` = 50.0 (the
image-classification values, as RepDistiller's ``RKDLoss(w_d=25, w_a=50)``; the official
metric-learning scripts use 1 and 2), ``weight`` = 1.0 (scales both), ``layers`` =
"backbone", ``inputs`` = "current" (RKD distils the training inputs; "replay"/"both" with ER),
``max_angle_rows`` = 256.

Deviations:
- the teacher is the model of the previous experience, not a separately trained network;
- the official metric-learning student has no CE term (only RKD); here RKD is added to CE, as in
  the paper's classification experiments.
"""

from __future__ import annotations

from typing import Dict, Sequence, Union

from torch import Tensor

from cl_plugins.core.checks import check_int, check_non_negative
from cl_plugins.core.distill_losses import rkd_distance
from cl_plugins.core.rkd_angle import rkd_angle_loss
from cl_plugins.core.feature_distill import FeatureDistillPlugin


class RelationalKDPlugin(FeatureDistillPlugin):
    METHOD_NAME = "relational_kd"
    # why torch.distributed runs refuse it (docs/distributed.md)
    distributed_note = ("its distance and angle terms relate pairs and triplets of the whole "
                        "minibatch, which no rank holds")
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"weight": {"distribution": "log_uniform_values", "min": 0.01, "max": 10.0},
                   "angle_weight": {"values": [0.0, 50.0]}}
    PAPER = "Relational Knowledge Distillation (Park, Kim, Lu & Cho, CVPR 2019)"
    SUMMARY = ("keeps the old model's pairwise distances (normalised by their mean) and triplet "
               "angles between the embeddings of a minibatch; Huber losses")
    SETTINGS = ("weight", "layers", "inputs", "distance_weight", "angle_weight", "max_angle_rows")

    def __init__(self, weight: float = 1.0, layers: Union[str, Sequence[str]] = "backbone",
                 inputs: str = "current", distance_weight: float = 25.0,
                 angle_weight: float = 50.0, max_angle_rows: int = 256):
        super().__init__(weight, layers, inputs)
        self.distance_weight = float(check_non_negative("distance_weight", distance_weight))
        self.angle_weight = float(check_non_negative("angle_weight", angle_weight))
        self.max_angle_rows = check_int("max_angle_rows", max_angle_rows, low=3)

    def distill_loss(self, student: Dict[str, Tensor], teacher: Dict[str, Tensor], y: Tensor,
                     t: Tensor) -> Tensor:
        n = y.shape[0]
        if self.angle_weight and n > self.max_angle_rows:
            raise ValueError(
                f"{self.who}: the angle loss on {n} rows needs O(N^3) memory ({n ** 3:,} cosines "
                f"per model, with gradients), more than max_angle_rows={self.max_angle_rows} "
                "allows; lower the minibatch (or the replayed rows), raise max_angle_rows, or "
                "set angle_weight=0")
        total = 0.0
        for name in self.layers:
            s, q = student[name], teacher[name]
            if self.distance_weight:
                total = total + self.distance_weight * rkd_distance(s, q)  # RKD-D
            if self.angle_weight:
                total = total + self.angle_weight * rkd_angle_loss(s, q)  # RKD-A
        return total if isinstance(total, Tensor) else student[self.layers[0]].sum() * 0
