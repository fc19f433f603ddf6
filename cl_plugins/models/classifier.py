"""Backbone + head, as one Avalanche ``MultiTaskModule``.

Every model the runner builds is a ``ClassifierNet``: a backbone mapping inputs to features
(``backbone.out_features`` wide) and a head. Plugins rely on the two attributes: projection
methods protect ``model.backbone`` and exclude ``model.head``; distillation methods read the
head's per-task outputs. The net is a ``MultiTaskModule`` so Avalanche always passes the task
labels; they reach the head, which is the only part that uses them.
"""

from __future__ import annotations

from avalanche.models import MultiTaskModule
from torch import nn


class ClassifierNet(MultiTaskModule):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        if not hasattr(backbone, "out_features"):
            raise ValueError(f"backbone {type(backbone).__name__} must expose out_features")
        self.backbone = backbone
        self.head = head

    def forward(self, x, task_labels=None):
        # The backbone runs once on the whole batch; only the head splits by task.
        features = self.backbone(x)
        if isinstance(self.head, MultiTaskModule):
            return self.head(features, task_labels)
        return self.head(features)

    def forward_single_task(self, x, task_label):
        return self.forward(x, task_label)
