"""Avalanche 0.6's ``PackNetPlugin``, runnable on the runner's models (reference).

Name: ``avalanche_packnet`` (a reference method: run only when named). Scenarios: task-IL.
Avalanche's plugin needs a ``PackNetModel`` (``avalanche/models/packnet.py``): it wraps every
Linear / Conv of a model, keeps the per-weight task index in the wrappers' buffers, and its
``forward(x, task_id)`` calls the wrapped model *without* the task label. Wrapping our whole
``ClassifierNet`` fails twice: the ``MultiHeadClassifier`` then returns a dict of every head's
logits instead of the task's, and its first head's Linear becomes a wrapper that
``IncrementalClassifier.adaptation`` cannot read (``out_features``). So this class changes nothing
in Avalanche's pruning, masks or state machine; before training it only

- replaces ``model.backbone`` by a ``PackNetModel`` of it (the heads stay as they are: per-task
  heads of the model, as in the paper), whose ``forward(x)`` takes the minibatch's task label
  from a forward pre-hook on the model;
- points Avalanche's ``_get_model`` (private: Avalanche 0.6 has no public way to name the packed
  module) at that backbone;
- reads ``strategy.train_epochs`` at the first epoch of each experience instead of in
  ``before_training``, so that the runner's iteration budget (``train_iterations``, which sets
  the epochs in ``before_training_exp``) is seen; the prune comes at the start of epoch
  ``train_epochs - post_prune_epochs``, as in Avalanche.

What Avalanche does, kept as is (docs/methods/packnet.md compares it with ``packnet``): every
experience starts a fresh optimizer of the strategy's class (``optimizer.defaults``: a learning
rate scheduler of the runner no longer acts on it); frozen weights get a zero gradient (with SGD
weight decay they still decay: use no weight decay); pruned weights are hidden, not zeroed, and
the next task starts from their old values; biases are frozen after the first task; norm layers
are refused (``PackNetModel.wrap``); ``prune_proportion`` may also be a list, one per experience.
The task label is mapped by count (``min(task, tasks trained)``): labels must be 0, 1, 2, ... in
training order. Runs with this reference are not checkpointed (no plain-data state).

One correction, to a bug: Avalanche's ``WeightAndBiasPackNetModule`` decides ``has_bias`` by
testing the *weight* (``isinstance(wrappee.weight, nn.Parameter)``), so a layer built with
``bias=False`` (whose ``bias`` is None) counts as biased and ``freeze_pruned`` fails after the
first experience (``'NoneType' object has no attribute 'requires_grad'``). The wrapper sets
``has_bias`` from the bias itself; nothing changes for layers that have one. P1's MLP has none.
"""

from __future__ import annotations

import torch
from avalanche.models.packnet import PackNetModel, PackNetPlugin, WeightAndBiasPackNetModule

from cl_plugins.core.checks import check_int, check_range


class _TaskBackbone(PackNetModel):
    """A PackNetModel of a backbone, called as ``backbone(x)``: the task label is the one the
    enclosing model's forward was given (set by ``_remember_task``)."""

    def __init__(self, backbone):
        super().__init__(backbone)
        for module in self.modules():  # Avalanche tests the weight for has_bias (docstring)
            if isinstance(module, WeightAndBiasPackNetModule):
                module.has_bias = getattr(module.wrappee, "bias", None) is not None
        self.out_features = backbone.out_features
        self.task = torch.zeros(1, dtype=torch.long)

    def forward(self, x):
        return super().forward(x, self.task)


def _remember_task(model, args, kwargs):
    labels = args[1] if len(args) > 1 else kwargs.get("task_labels")
    if labels is not None:
        model.backbone.task = torch.as_tensor(labels).reshape(-1)


class AvalanchePackNet(PackNetPlugin):
    METHOD_NAME = "avalanche_packnet"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    PAPER = "Avalanche 0.6's PackNetPlugin"
    SUMMARY = ("reference: Avalanche's PackNet (pruning by magnitude, post-prune epochs, frozen "
               "task subsets) on the runner's backbone, per-task heads kept")

    def __init__(self, post_prune_epochs: int = 10, prune_proportion: float = 0.75):
        check_int("post_prune_epochs", post_prune_epochs, 0)
        ratios = prune_proportion if isinstance(prune_proportion, list) else [prune_proportion]
        for r in ratios:
            check_range("prune_proportion", r, 0.0, 1.0)
        super().__init__(post_prune_epochs=post_prune_epochs,
                         prune_proportion=[float(r) for r in ratios]
                         if isinstance(prune_proportion, list) else float(prune_proportion))

    def check_strategy(self, strategy: dict) -> None:
        """Validation, before any run: the prune must fall inside the experience's epochs. Under
        an iteration budget (``train_iterations``) the epochs follow from the experience's size,
        known when the run starts; ``before_training_epoch`` checks them then."""
        if strategy.get("train_iterations") is None and \
                self.post_prune_epochs >= strategy["epochs"]:
            raise ValueError(f"avalanche_packnet: post_prune_epochs={self.post_prune_epochs} "
                             f"must be below strategy.epochs={strategy['epochs']}")

    def before_training(self, strategy, *args, **kwargs):
        model = strategy.model
        if not isinstance(model.backbone, _TaskBackbone):
            model.backbone = _TaskBackbone(model.backbone).to(strategy.device)
            model.register_forward_pre_hook(_remember_task, with_kwargs=True)

    def before_training_epoch(self, strategy, *args, **kwargs):
        if strategy.clock.train_exp_epochs == 0:
            self.total_epochs = strategy.train_epochs
            if self.post_prune_epochs >= self.total_epochs:
                raise ValueError(f"avalanche_packnet: post_prune_epochs={self.post_prune_epochs} "
                                 f"must be below the experience's {self.total_epochs} epochs")
        super().before_training_epoch(strategy, *args, **kwargs)

    def _get_model(self, strategy):  # Avalanche's private hook: the packed module
        return strategy.model.backbone
