"""Avalanche 0.6's ``FeatureDistillationPlugin``, runnable on the runner's models (reference).

Name: ``avalanche_feature_distillation`` (a reference method: run only when named). Avalanche's
plugin reads ``model.features`` for both the student and its teacher (a deep copy of the model
taken after each experience), so it works only on a model whose ``forward`` stores its features
in that attribute; our ``ClassifierNet`` does not, and the plugin fails at the first step of the
second experience (docs/methods/hints.md). This class changes nothing in Avalanche's loss or its
teacher: it only installs two forward hooks, once, before training, so that every forward of the
model (and of the deep copy Avalanche makes of it, which carries the hooks along) sets
``model.features`` to the output of the module ``layer`` (default: the backbone, i.e. the
penultimate features our ``hints`` plugin distils by default):

    loss = CE + alpha * (1 - mean_rows cos(f_new(x), f_old(x)))        # mode="cosine"

on every row of the minibatch (replayed rows included), with Avalanche's teacher: a plain deep
copy, left in training mode with gradients on. ``mode="mse"`` is offered as Avalanche has it and
crashes as it does (``F.mse_loss`` has no ``dim``); a list ``alpha`` fails inside Avalanche too.
What the comparison with ours shows is in docs/methods/hints.md.

Avalanche keeps its teacher in a form we cannot save as plain data, so runs with this reference
are not checkpointed (the runner says so in the JSON), like every Avalanche reference.

Task-IL with per-task heads: Avalanche forwards its teacher (the copy made at the end of the
previous experience) with the minibatch's task label, and that copy has no head for the new task,
so ``MultiHeadClassifier`` raises ``KeyError`` at the first step of the second experience. Before
each experience this class therefore runs Avalanche's own model adaptation on the teacher
(``avalanche_model_adaptation``): it gains the new task's head, whose output nothing reads (the
loss uses the tapped features only). Found on 2026-12-06 when S2's task-IL entry first ran.
"""

from __future__ import annotations

from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.plugins import FeatureDistillationPlugin

from cl_plugins.core.checks import check_choice, check_non_negative

_STORE = "_avalanche_fd_out"  # where the tapped module leaves its output for the model's hook


def _keep_output(module, inputs, output):
    setattr(module, _STORE, output)


def _set_features(model, inputs, output):
    tapped = getattr(model, "_avalanche_fd_layer")
    module = model.get_submodule(tapped)
    model.features = getattr(module, _STORE, None)
    setattr(module, _STORE, None)  # no graph tensor left behind for Avalanche's deep copy


class AvalancheFeatureDistillation(FeatureDistillationPlugin):
    METHOD_NAME = "avalanche_feature_distillation"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    PAPER = "Avalanche 0.6's FeatureDistillationPlugin"
    SUMMARY = ("reference: Avalanche's feature distillation (1 - cosine of the tapped layer's "
               "features, teacher = deep copy) on the runner's model")

    def __init__(self, alpha: float = 1.0, mode: str = "cosine", layer: str = "backbone"):
        check_non_negative("alpha", alpha)
        super().__init__(alpha=float(alpha), mode=check_choice("mode", mode, ("cosine", "mse")))
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be the name of a module of the model (e.g. "
                             f"'backbone'); got {layer!r}")
        self.layer = layer

    def before_training(self, strategy, **kwargs):
        model = strategy.model
        if getattr(model, "_avalanche_fd_layer", None) is not None:
            return  # hooks already installed (a later training call)
        try:
            module = model.get_submodule(self.layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"avalanche_feature_distillation: layer {self.layer!r} is not a "
                             f"module of {type(model).__name__}; its modules: {names}") from None
        model._avalanche_fd_layer = self.layer
        module.register_forward_hook(_keep_output)
        model.register_forward_hook(_set_features)

    def before_training_exp(self, strategy, **kwargs):
        if self.prev_model is not None:  # a head for the new task, never read (docstring)
            avalanche_model_adaptation(self.prev_model, strategy.experience)

    def after_training_exp(self, strategy, **kwargs):
        # a direct call of the tapped module (LwF and iCaRL call model.backbone) leaves its
        # output there, graph included, which Avalanche's deep copy cannot copy
        setattr(strategy.model.get_submodule(self.layer), _STORE, None)
        super().after_training_exp(strategy, **kwargs)
