"""Avalanche's progressive neural network (``PNN`` model + ``PNNStrategy``), as the reference
template ``avalanche_pnn`` (registered in avalanche_refs.py), side by side with our ``pnn``.

The factory builds Avalanche's ``PNN`` from the runner's model: an ``mlp`` backbone with equal
hidden widths (``num_layers`` = the number of hidden layers, ``hidden_features_per_column`` their
width, ``in_features`` the flattened input); Avalanche's own multi-head classifier replaces the
runner's head. The optimizer is the runner's, of the same class and settings, over the PNN's
parameters. ``adapter``: Avalanche's "mlp" (alpha per earlier column, V, ReLU, U) or "linear".

Two workarounds, each measured on split_digits task-IL (docs/methods/pnn.md):

- Avalanche 0.6's ``PNNLayer.adaptation`` adds a column for every new task label it is adapted
  to, evaluation included, and freezes every other column when it does. The runner evaluates the
  whole test stream after each experience, so the first evaluation would create (and then
  freeze) the columns of all later tasks before they train: tasks 1 and 3 stayed at chance. Here
  evaluation adapts only the classifier's heads; columns grow when a task trains.
- ``PNN.forward_single_task`` raises ``KeyError`` for a task label it has no column for (the
  runner evaluates future tasks too): such a task gets the newest column's features and its own
  (untrained) head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.models import PNN
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import PNNStrategy

from cl_plugins.core.weight_override import optimizer_like


class _PNN(PNN):
    def forward_single_task(self, x, task_label):
        known = self.layers[-1].task_to_module_idx
        if task_label in known:
            return super().forward_single_task(x, task_label)
        newest = max(known, key=known.get)  # a task never trained: the newest column
        x = x.contiguous().view(x.size(0), self.in_features)
        xs = [x for _ in range(self.layers[0].num_columns)]
        for layer in self.layers:
            xs = [F.relu(h) for h in layer(xs, newest)]
        return self.classifier(xs[known[newest]], task_label)


class _PNNStrategy(PNNStrategy):
    def model_adaptation(self, model=None):
        if self.is_training:
            return super().model_adaptation(model)
        avalanche_model_adaptation(self.model.classifier, self.experience)  # heads only
        return self.model.to(self.device)


def avalanche_pnn(*, model, optimizer, criterion=None, adapter: str = "mlp", **kwargs):
    """Avalanche's PNN strategy on columns sized from the runner's MLP (module docstring)."""
    from cl_plugins.models.mlp import MLP

    backbone = getattr(model, "backbone", None)
    if type(backbone) is not MLP:
        raise ValueError(f"avalanche_pnn builds Avalanche's MLP columns from an 'mlp' backbone; "
                         f"got {type(backbone).__name__}")
    widths = [m.out_features for m in backbone.layers if isinstance(m, torch.nn.Linear)]
    if len(set(widths)) != 1:
        raise ValueError(f"avalanche_pnn needs equal hidden widths (Avalanche's PNN has one "
                         f"width per column); got model.hidden={widths}")
    pnn = _PNN(num_layers=len(widths), in_features=backbone.input_size,
               hidden_features_per_column=widths[0], adapter=adapter)
    extra = {} if criterion is None else {"criterion": criterion}
    return _PNNStrategy(model=pnn, optimizer=optimizer_like(optimizer, pnn.parameters()),
                        **extra, **kwargs)
