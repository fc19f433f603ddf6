"""Backbone + head, as one Avalanche ``MultiTaskModule``.

Every model the runner builds is a ``ClassifierNet``: a backbone mapping inputs to features
(``backbone.out_features`` wide) and a head. Plugins rely on the two attributes: projection
methods protect ``model.backbone`` and exclude ``model.head``; distillation methods read the
head's per-task outputs. The net is a ``MultiTaskModule`` so Avalanche always passes the task
labels; they reach the head, which is the only part that uses them.

What ``forward`` returns:

- ``net(x, task_labels)`` (an int or one label per sample): the head's logits, ``[N, C]``.
- ``net(x)`` (no label given): a single-head net (``nn.Linear``, ``MaskedHead``) returns its
  logits ``[N, C]``, like any classifier; a ``MultiHeadClassifier`` head returns its dict
  ``{task: logits}`` over the tasks it has trained.
- ``net(x, None)`` (``None`` passed explicitly): Avalanche's ``MultiTaskModule`` contract, the
  outputs of every task trained so far, ``{task: logits}``. A ``MultiHeadClassifier`` head gives
  its own dict; a single-head net gives ``{t: head(features, t)}`` for each task label it was
  trained under (for a ``MaskedHead(mask="task")`` each task's classes, otherwise the same
  logits under every key; ``{0: logits}`` before any training). This is what Avalanche's own
  ``LearningWithoutForgetting`` (``avalanche_lwf``) calls on a ``MultiTaskModule`` (``y_prev =
  avalanche_forward(prev_model, x, None)``, then ``y_prev.items()``), so it works in domain- and
  class-IL too. The backbone runs once either way.
"""

from __future__ import annotations

from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import nn


class _Omitted:
    """Default of ``task_labels``: tells ``net(x)`` apart from ``net(x, None)``."""

    def __repr__(self):
        return "<task labels not given>"


_OMITTED = _Omitted()


class ClassifierNet(MultiTaskModule):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        if not hasattr(backbone, "out_features"):
            raise ValueError(f"backbone {type(backbone).__name__} must expose out_features")
        self.backbone = backbone
        self.head = head

    def forward(self, x, task_labels=_OMITTED):
        # The backbone runs once on the whole batch; only the head splits by task.
        features = self.backbone(x)
        if task_labels is None and not isinstance(self.head, MultiHeadClassifier):
            return self._all_tasks(features)
        if isinstance(self.head, MultiTaskModule):
            return self.head(features, None if task_labels is _OMITTED else task_labels)
        return self.head(features)

    def _all_tasks(self, features):
        """{task label: logits} for every task trained so far (a single-head net)."""
        tasks = sorted(int(t) for t in self.known_train_tasks_labels) or [0]
        if isinstance(self.head, MultiTaskModule):  # e.g. MaskedHead: masks may depend on t
            return {t: self.head(features, t) for t in tasks}
        out = self.head(features)
        return {t: out for t in tasks}

    def forward_single_task(self, x, task_label):
        return self.forward(x, task_label)
