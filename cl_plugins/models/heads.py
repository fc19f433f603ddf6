"""A single output layer whose logits can be masked by class: the class-IL head.

``MaskedHead`` keeps one fixed Linear layer over all classes and, for each class, the task in
which it was first trained (``class_task``, -1 = never seen). Two masks follow from it:

- ``mask="seen"``: logits of classes not yet trained on are masked, in training and in evaluation
  (Hsu et al. 2018's class-IL head: the softmax only spans the classes seen so far);
- ``mask="task"``: only the classes of the sample's own task stay (task-IL with one shared head,
  as RGO's masked 100-way output);
- ``mask="none"``: a plain Linear layer.

Masked logits are set to ``mask_value`` (-1e4): exp(-1e4) underflows to exactly 0 in float32, so
masked classes get zero probability, while staying finite keeps distillation losses free of
0 * inf = nan.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from avalanche.models import MultiTaskModule
from torch import nn

from cl_plugins.core.checks import check_choice, check_int

MASKS = ("seen", "task", "none")


class MaskedHead(MultiTaskModule):
    def __init__(self, in_features: int, n_outputs: int, mask: str = "seen", bias: bool = True,
                 mask_value: float = -1e4):
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("n_outputs", n_outputs, 1)
        self.mask = check_choice("mask", mask, MASKS)
        self.mask_value = mask_value
        self.linear = nn.Linear(in_features, n_outputs, bias=bias)
        self.register_buffer("class_task", torch.full((n_outputs,), -1, dtype=torch.long))

    def adaptation(self, experience):
        super().adaptation(experience)
        if not self.training:
            return  # evaluation never unmasks a class
        classes = torch.as_tensor(list(experience.classes_in_this_experience), dtype=torch.long)
        if int(classes.max()) >= self.class_task.numel():
            raise ValueError(f"MaskedHead has {self.class_task.numel()} outputs but the experience "
                             f"holds class {int(classes.max())}")
        classes = classes.to(self.class_task.device)
        new = self.class_task[classes] < 0
        self.class_task[classes[new]] = int(experience.task_labels[0])

    def forward(self, x: torch.Tensor, task_labels: Optional[Union[int, torch.Tensor]] = None):
        logits = self.linear(x)
        if self.mask == "none":
            return logits
        if self.mask == "seen":
            allowed = (self.class_task >= 0).unsqueeze(0)
        else:
            if task_labels is None:
                raise ValueError("MaskedHead(mask='task') needs the task labels in forward")
            t = torch.as_tensor(task_labels, device=logits.device).reshape(-1, 1)
            allowed = self.class_task.unsqueeze(0) == t
        return logits.masked_fill(~allowed, self.mask_value)

    def forward_single_task(self, x, task_label):
        return self.forward(x, task_label)
