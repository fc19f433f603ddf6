"""iCaRL: herding exemplars, sigmoid/BCE training with distillation, nearest-mean-of-exemplars.

Name: ``icarl``. Scenarios: class-IL only. Task labels: not needed.
Paper: S.-A. Rebuffi, A. Kolesnikov, G. Sperl, C. H. Lampert, "iCaRL: Incremental Classifier and
Representation Learning", CVPR 2017; code github.com/srebuffi/iCaRL. Notes: docs/methods/icarl.md.

phi(x) = L2-normalised ``model.backbone(x)``; K = ``mem_size``; t classes seen (core.exemplars).

- Algorithm 4 (herding), per class y new in the experience, mu = mean_{X_y} phi(x):
      p_k = argmin_{x in X_y \\ {p_1..p_{k-1}}} || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||
- Algorithm 5: keep each class's first m exemplars: m = floor(K / t) (``fixed_memory=True``),
  or K (the memory grows: van de Ven et al. 2022's budget per class).
- Algorithm 3: train on the experience's data U all exemplars with                      # Eq. B
      l = mean over the N x C outputs of BCE(sigmoid(z), target), target = one-hot(y) but
      sigmoid(z_old) in the old classes' columns (z_old: the previous model, frozen, eval mode)
  ``loss="bce"``: Eq. B *replaces* the strategy's criterion while training (evaluation keeps
  it; other plugins' terms still add to it; one plugin at most). ``"ce"``: no distillation.
- Algorithm 1 (NME): y* = argmin_y ||phi(x) - mu_y||, mu_y = normalise(mean_{P_y} phi(p)) after
  each experience; evaluation's ``mb_output`` = -||phi(x) - mu_y|| (-1e4 without exemplars).

Hooks: ``before_train_dataset_adaptation`` (rebuild a restored previous model),
``after_train_dataset_adaptation`` (data + exemplars), ``before_training_exp`` /
``after_training_exp`` (criterion; memory, class means, previous model), ``before_eval`` /
``after_eval`` (a hook on the backbone: NME reuses the eval forward), ``after_eval_forward``.

Hyper-parameters (defaults: the paper's CIFAR-100 protocol): ``mem_size`` = 2000 (K);
``fixed_memory`` = True; ``classifier`` = "nme" | "head" (the paper's "hybrid1"); ``loss`` =
"bce" | "ce"; ``flip_means`` = False (means also over each exemplar's mirror image, as the
official CIFAR code); ``x_dtype``, ``x_range`` = None (exemplar storage: core.buffer).

Deviations and choices:
- herding excludes chosen samples (official: may pick one again); m = floor(K / t) (rounded up
  there: up to t - 1 more than K);
- the BCE spans every output: unseen classes add exactly 0 under the class-IL ``MaskedHead``, and
  are pushed to 0 by an unmasked head (as the official code; CIFAR-100 config);
- z_old per minibatch (after any augmentation), as the official code; NME scores only classes
  with exemplars (official: unseen ones with a zero mean) on unflipped test features; before the
  first class means the head's outputs are reported;
- exemplars are stored as the dataset yields them in eval mode, replayed without its training
  transforms; our backbones replace ResNet-32; a class seen again (not class-IL) is re-herded
  on the new samples and trained with its one-hot target, not distilled, in that experience.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn

from cl_plugins.core.buffer import ReplayBuffer
from cl_plugins.core.checks import check_bool, check_choice, check_int
from cl_plugins.core.distill import (replace_criterion, restore_criterion, restore_teacher,
                                     teacher_state)
from cl_plugins.core.exemplars import (backbone_features, class_means, dataset_features,
                                       herded_memory, memory_dataset, nme_scores)
from cl_plugins.core.heads_layout import require_backbone_single_head
from cl_plugins.core.replay_loader import claim_dataloader
from cl_plugins.core.snapshot import FeatureTap, frozen_copy
from cl_plugins.core.state import check_owner, check_settings, owned_by

CLASSIFIERS = ("nme", "head")
LOSSES = ("bce", "ce")
SETTINGS = ("mem_size", "fixed_memory", "classifier", "loss", "flip_means")


def icarl_bce(logits: Tensor, y: Tensor, old_logits: Optional[Tensor] = None,
              old_classes: Sequence[int] = ()) -> Tensor:
    """Eq. B: BCE of sigmoid(logits) against one-hot(y), the columns ``old_classes`` replaced by
    sigmoid(old_logits); mean over the N x C entries."""
    target = F.one_hot(y.long(), logits.shape[1]).to(logits.dtype)
    if old_logits is not None and len(old_classes):
        cols = torch.as_tensor(list(old_classes), dtype=torch.long, device=logits.device)
        target[:, cols] = torch.sigmoid(old_logits.detach()[:, cols].to(logits.dtype))
    return F.binary_cross_entropy_with_logits(logits, target)


class ICaRLPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "icarl"
    SCENARIOS = ("class",)
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"mem_size": {"values": [200, 500, 1000, 2000]}}
    PAPER = "iCaRL (Rebuffi, Kolesnikov, Sperl & Lampert, CVPR 2017)"
    SUMMARY = ("herding-selected exemplars (K in total) replayed with the current data; sigmoid "
               "BCE with the previous model's outputs as targets for old classes; "
               "nearest-mean-of-exemplars classification")
    SETS_DATALOADER = True  # the training set is the experience's data + the exemplars

    def __init__(self, mem_size: int = 2000, fixed_memory: bool = True, classifier: str = "nme",
                 loss: str = "bce", flip_means: bool = False, x_dtype: Optional[str] = None,
                 x_range=None):
        super().__init__()
        self.mem_size = check_int("mem_size", mem_size, 1)
        self.fixed_memory = check_bool("fixed_memory", fixed_memory)
        self.classifier = check_choice("classifier", classifier, CLASSIFIERS)
        self.loss = check_choice("loss", loss, LOSSES)
        self.flip_means = check_bool("flip_means", flip_means)
        self.x_dtype, self.x_range = x_dtype, x_range
        self.buffer = self._new_buffer(mem_size)  # validates x_dtype and x_range
        self.x_range = self.buffer.x_range  # normalised
        self.seen_classes: List[int] = []  # in the order first seen
        self.class_means: Optional[Tensor] = None  # [len(mean_classes), d], normalised
        self.mean_classes: List[int] = []  # the classes of the rows of class_means
        self.old_model: Optional[nn.Module] = None  # frozen copy of the previous model
        self.n_experiences = 0
        self._pending_old: Optional[Dict[str, Tensor]] = None  # loaded, not rebuilt yet
        self._distill_classes: List[int] = []  # old classes of the experience being trained
        self._tap, self._tap_handle = None, None  # FeatureTap on the backbone, its hook

    def _new_buffer(self, capacity: int) -> ReplayBuffer:
        return ReplayBuffer(capacity, policy="reservoir", seed=0,  # herding draws no randomness
                            x_dtype=self.x_dtype, x_range=self.x_range)

    def _ensure_old_model(self, model: nn.Module) -> None:
        if self._pending_old is not None:  # the model still fits the saved one exactly
            self.old_model = restore_teacher(model, self._pending_old, "iCaRL")
            self._pending_old = None

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        require_backbone_single_head(strategy.model, "iCaRL")
        self._ensure_old_model(strategy.model)

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        claim_dataloader(strategy, self)
        if not self.buffer.is_empty:  # Algorithm 3's training set: the data U the exemplars
            strategy.adapted_dataset = concat_datasets((strategy.adapted_dataset,
                                                        memory_dataset(self.buffer)))

    def before_training_exp(self, strategy, **kwargs):
        require_backbone_single_head(strategy.model, "iCaRL")
        current = {int(c) for c in strategy.experience.classes_in_this_experience}
        self._distill_classes = [c for c in self.seen_classes if c not in current]
        if self.loss == "bce":
            self._ensure_old_model(strategy.model)
            if self.old_model is not None:
                self.old_model.to(strategy.device)
            replace_criterion(strategy, self, functools.partial(self.training_loss, strategy))

    def training_loss(self, strategy, output: Tensor, y: Tensor) -> Tensor:
        """Eq. B on the current minibatch (the strategy's criterion while training)."""
        old_logits = None
        if self.old_model is not None and self._distill_classes:
            with torch.no_grad():
                old_logits = avalanche_forward(self.old_model, strategy.mb_x, strategy.mb_task_id)
        return icarl_bce(output, y, old_logits, self._distill_classes)

    def after_training_exp(self, strategy, **kwargs):
        restore_criterion(strategy, self)
        model, batch_size = strategy.model, strategy.eval_mb_size or strategy.train_mb_size
        was_training = model.training
        model.eval()
        try:
            self.update_memory(model, strategy.experience, strategy.device, batch_size)
            self.compute_class_means(model, strategy.device, batch_size)
        finally:
            model.train(was_training)
        if self.loss == "bce":
            self.old_model, self._pending_old = frozen_copy(model), None
        self.n_experiences, self._distill_classes = self.n_experiences + 1, []

    def per_class(self, n_classes: int) -> int:
        """m: exemplars per class when ``n_classes`` classes have been seen."""
        if self.fixed_memory and self.mem_size < n_classes:
            raise ValueError(f"iCaRL: mem_size={self.mem_size} is smaller than the "
                             f"{n_classes} classes seen; it needs at least one exemplar per "
                             "class (raise mem_size or use fixed_memory=False)")
        return self.mem_size // n_classes if self.fixed_memory else self.mem_size

    def update_memory(self, model: nn.Module, experience, device, batch_size: int) -> None:
        """Algorithms 4 and 5 after training on ``experience`` (model in eval mode)."""
        x, y, t, f = dataset_features(model, experience.dataset.eval(), device, batch_size)
        new = sorted(int(c) for c in torch.unique(y).tolist())
        seen = self.seen_classes + [c for c in new if c not in self.seen_classes]
        mem = herded_memory(self.buffer, x, y, t, f, seen, self.per_class(len(seen)))
        if mem[0].shape[0] > self.buffer.capacity:  # fixed_memory=False: the memory grows
            self.buffer = self._new_buffer(mem[0].shape[0])
        self.buffer.set_contents(*mem)
        self.seen_classes = seen

    def compute_class_means(self, model: nn.Module, device, batch_size: int) -> None:
        """mu_y of Algorithm 1 for every class in memory, with the current network."""
        if self.buffer.is_empty:
            return
        mem = self.buffer.get(torch.arange(len(self.buffer)), "cpu")
        if self.flip_means and mem.x.dim() != 4:
            raise ValueError(f"iCaRL flip_means=True needs image inputs [N, C, H, W]; "
                             f"got exemplars of shape {tuple(mem.x.shape)}")
        f = backbone_features(model, mem.x, device, batch_size)
        f2 = backbone_features(model, mem.x, device, batch_size, True) if self.flip_means else None
        classes = [c for c in self.seen_classes if bool((mem.y == c).any())]
        self.class_means, self.mean_classes = class_means(f, mem.y, classes, f2), classes

    def before_eval(self, strategy, **kwargs):
        self.after_eval(strategy)  # a hook left by an interrupted evaluation goes first
        if self.classifier == "nme" and self.class_means is not None:
            require_backbone_single_head(strategy.model, "iCaRL")
            self._tap = FeatureTap("eval")
            self._tap_handle = strategy.model.backbone.register_forward_hook(self._tap)

    def after_eval_forward(self, strategy, **kwargs):
        if self.classifier != "nme" or self.class_means is None:
            return
        feats = self._tap.take(strategy.mb_x) if self._tap is not None else None
        if feats is None:  # no hook, or another input than that of the eval forward
            with torch.no_grad():
                feats = strategy.model.backbone(strategy.mb_x)
        out, means = strategy.mb_output, self.class_means.to(strategy.device)
        strategy.mb_output = nme_scores(feats.detach(), means, self.mean_classes,
                                        out.shape[1]).to(out.dtype)

    def after_eval(self, strategy, **kwargs):
        if self._tap_handle is not None:
            self._tap_handle.remove()
        self._tap_handle, self._tap = None, None

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        """NME class predictions for inputs ``x`` (model in eval mode, after an experience)."""
        if self.class_means is None:
            raise ValueError("iCaRL.predict: no class means yet (train on an experience first)")
        with torch.no_grad():
            f = model.backbone(x)
        return nme_scores(f, self.class_means.to(f.device), self.mean_classes,
                          max(self.mean_classes) + 1).argmax(1)

    def state_dict(self) -> dict:
        return {**owned_by(self), "config": {k: getattr(self, k) for k in SETTINGS},
                "n_experiences": self.n_experiences, "seen_classes": list(self.seen_classes),
                "buffer": self.buffer.state_dict(),
                "class_means": None if self.class_means is None else self.class_means.clone(),
                "mean_classes": list(self.mean_classes),
                "old_model": teacher_state(self.old_model, self._pending_old)}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        check_settings(self, {**state, **state["config"]}, state["config"])
        if state["buffer"]["capacity"] != self.buffer.capacity:  # a grown memory
            self.buffer = self._new_buffer(state["buffer"]["capacity"])
        self.buffer.load_state_dict(state["buffer"])
        self.n_experiences = int(state["n_experiences"])
        self.seen_classes = [int(c) for c in state["seen_classes"]]
        cm = state["class_means"]  # float32 on the CPU
        self.class_means = None if cm is None else cm.clone().float()
        self.mean_classes = [int(c) for c in state["mean_classes"]]
        self.old_model = None  # rebuilt from the model at the next training hook
        self._pending_old = teacher_state(None, state["old_model"])  # a copy, or None
