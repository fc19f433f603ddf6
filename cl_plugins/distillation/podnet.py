"""PODNet: pooled outputs distillation, a multi-proxy cosine classifier, herded exemplars.

Name: ``podnet``. Scenarios: class-IL only. Task labels: not needed.
Paper: A. Douillard, M. Cord, C. Ollion, T. Robert, E. Valle, "PODNet: Pooled Outputs
Distillation for Small-Tasks Incremental Learning", ECCV 2020. Official code:
arthurdouillard/incremental_learning.pytorch (``inclearn/models/podnet.py``,
``options/podnet/podnet_cnn_cifar100.yaml``, read at c09fc54); second reference PyCIL
(G-U-N/PyCIL ``models/podnet.py``, 87cc411). Notes and measurements: docs/methods/podnet.md.

Model: a ClassifierNet whose head is the local-similarity classifier (``model.head: lsc``,
``models/lsc_head.LSCHead``: K proxies per class, logits z = eta * y_c). Training experience t on
its data and the exemplars of the classes seen before, with the frozen previous model as teacher
(``core.feature_distill``; POD from t = 1):

    loss = NCA(z, y)                                                # replaces CE (lsc_head)
         + lambda_c sqrt(N / T) POD-spatial(stage maps h_1..h_L)    # core.pod
         + lambda_f sqrt(N / T) POD-flat(backbone embedding)

N: the classes seen, the new ones included; T: the new classes (``core.pod.adaptive_factor``).
From t = 1, before training, each new class's proxies are imprinted from its samples' features
(k-means centres) and the old classes' proxies are frozen (the code's ``old_weights`` lr 0).
After training: the memory (herding, ``mem_per_class`` per class, as iCaRL: an ``ICaRLPlugin``
with ``loss="ce"`` is this plugin's memory and NME, ``replay/icarl.py``), then from t = 1
class-balanced finetuning (CBF) of all proxies on the memory (``cbf_epochs`` of SGD, lr
``cbf_lr``, momentum 0.9, the strategy's weight decay, NCA), then the new teacher. Evaluation:
the LSC's logits (``classifier="cnn"``, the paper's CNN rows) or NME on the exemplar means.

Hooks: ``before_train_dataset_adaptation`` (model check), ``after_train_dataset_adaptation``
(data + exemplars; claims the dataloader), ``before_training_exp`` (stage taps, criterion,
imprinting, freezing), ``before_forward`` / ``after_forward`` / ``before_backward`` (POD terms,
``FeatureDistillPlugin``), ``after_training_exp`` (memory, CBF, teacher), ``before_eval`` /
``after_eval_forward`` / ``after_eval`` (NME).

Hyper-parameters (defaults: podnet_cnn_cifar100.yaml + the README's --fixed-memory command):
``lambda_spatial`` = 3.0 (``pod_spatial.scheduled_factor``; the NME config and PyCIL: 5.0);
``lambda_flat`` = 1.0; ``stages`` = None: the backbone's conv stages (``core.conv_stages``; the
code taps the ends of its 4 ResNet stages, see the CIFAR-100 config); ``mem_per_class`` = 20
(2000 / 100 classes, fixed); ``nca_margin`` = 0.0 (delta, see below); ``classifier`` = "cnn" |
"nme"; ``cbf_epochs`` = 20, ``cbf_lr`` = 0.05 (``finetuning_config``; PyCIL: 0.005);
``imprint`` = True (``weight_generation: imprinted``); ``freeze_old`` = True; ``flip_means`` =
False (NME class means over flipped exemplars too: the code's, for image inputs only).

Deviations:
- NCA as the code computes it (``nca``: no hinge, exp(max) in the denominator); the config's
  ``margin: 0.6`` is subtracted from every column there and cancels, hence ``nca_margin`` = 0
  (a positive value lowers the positive's logit by eta * delta only). A hinge with a margin
  and a learned eta has a trivial minimum, eta <= 0 (docs/methods/podnet.md). The LSC's
  similarity is the cosine (code: 2 cos - 2, see lsc_head);
- CBF trains the proxies on features of the backbone in eval mode, computed once (the code: train
  mode, its BN statistics move, augmented memory); eta is not finetuned (as the code);
- the code clamps every gradient to [-5, 5] and colour-jitters CIFAR: neither here.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence

import torch
from avalanche.benchmarks.utils.utils import concat_datasets
from torch import Tensor

from cl_plugins.core.checks import check_bool, check_choice, check_int, check_non_negative
from cl_plugins.core.conv_stages import conv_stages
from cl_plugins.core.distill import replace_criterion, restore_criterion
from cl_plugins.core.exemplars import backbone_features, dataset_features, memory_dataset
from cl_plugins.core.feature_distill import FeatureDistillPlugin, check_layers, named_modules
from cl_plugins.core.pod import adaptive_factor, pod_flat, pod_spatial
from cl_plugins.core.replay_loader import claim_dataloader
from cl_plugins.models.lsc_head import LSCHead, nca_loss
from cl_plugins.replay.icarl import ICaRLPlugin

CLASSIFIERS = ("cnn", "nme")
FLAT = "backbone"  # POD-flat's tap: the embedding the LSC classifies


class PODNetPlugin(FeatureDistillPlugin, supports_distributed=True):
    METHOD_NAME = "podnet"
    SCENARIOS = ("class",)
    NEEDS_TASK_LABELS = False
    NEEDS_SPATIAL = True  # needs a convolutional model (the generic tests build one)
    NEEDS_HEAD = "lsc"  # and the local-similarity classifier (model.head: lsc)
    SETS_DATALOADER = True  # the training set is the experience's data + the exemplars
    SWEEP: dict = {"lambda_spatial": {"values": [1.0, 3.0, 5.0, 10.0]},
                   "lambda_flat": {"values": [0.5, 1.0, 2.0]}}
    PAPER = "PODNet (Douillard, Cord, Ollion, Robert & Valle, ECCV 2020)"
    SUMMARY = ("pooled-output distillation of conv stage maps (width/height sums) and of the "
               "embedding, multi-proxy cosine classifier with NCA loss, herded exemplars, "
               "class-balanced finetuning, CNN or NME inference")
    SETTINGS = ("lambda_spatial", "lambda_flat", "stages", "mem_per_class", "nca_margin",
                "classifier", "cbf_epochs", "cbf_lr", "imprint", "freeze_old", "flip_means")

    def __init__(self, lambda_spatial: float = 3.0, lambda_flat: float = 1.0,
                 stages: Optional[Sequence[str]] = None, mem_per_class: int = 20,
                 nca_margin: float = 0.0, classifier: str = "cnn", cbf_epochs: int = 20,
                 cbf_lr: float = 0.05, imprint: bool = True, freeze_old: bool = True,
                 flip_means: bool = False):
        super().__init__(1.0, FLAT, "current")
        self.lambda_spatial = float(check_non_negative("lambda_spatial", lambda_spatial))
        self.lambda_flat = float(check_non_negative("lambda_flat", lambda_flat))
        self.stages = None if stages is None else check_layers(stages, "stages")
        self.mem_per_class = check_int("mem_per_class", mem_per_class, 1)
        self.nca_margin = float(check_non_negative("nca_margin", nca_margin))
        self.classifier = check_choice("classifier", classifier, CLASSIFIERS)
        self.cbf_epochs = check_int("cbf_epochs", cbf_epochs, 0)
        self.cbf_lr = float(check_non_negative("cbf_lr", cbf_lr))
        self.imprint, self.freeze_old, self.flip_means = (
            check_bool("imprint", imprint), check_bool("freeze_old", freeze_old),
            check_bool("flip_means", flip_means))
        self.memory = ICaRLPlugin(mem_size=mem_per_class, fixed_memory=False, loss="ce",
                                  classifier="nme" if classifier == "nme" else "head",
                                  flip_means=flip_means)
        self._stage_names: Sequence[str] = ()
        self._conv: Sequence[str] = ()  # the model's conv stages, for the error messages
        self._factor = 1.0  # sqrt(N / T) of the experience being trained

    # ------------------------------------------------------------------ the method
    def head(self, model) -> LSCHead:
        head = getattr(model, "head", None)
        if not isinstance(head, LSCHead):
            raise ValueError(f"PODNet needs the local-similarity classifier at model.head "
                             f"(model.head: lsc, cl_plugins.models.LSCHead); found "
                             f"{type(head).__name__}")
        return head

    def check_features(self, student: Dict[str, Tensor]) -> None:
        for name in self._stage_names:
            if student[name].dim() != 4:
                raise ValueError(f"PODNet: stage {name!r} gives features of shape "
                                 f"{tuple(student[name].shape)}; POD-spatial needs maps "
                                 "[N, C, H, W]: name conv stages in `stages` (this model's: "
                                 f"{self._conv}) or use a conv backbone (e.g. model.name=lenet "
                                 "with benchmark.pad_to_32=true for 8x8 images)")

    def distill_loss(self, student: Dict[str, Tensor], teacher: Dict[str, Tensor], y: Tensor,
                     t: Tensor) -> Tensor:
        spatial = pod_spatial([student[n] for n in self._stage_names],
                              [teacher[n] for n in self._stage_names])
        flat = pod_flat(student[FLAT], teacher[FLAT])
        return self._factor * (self.lambda_spatial * spatial + self.lambda_flat * flat)

    def training_loss(self, model, output: Tensor, y: Tensor) -> Tensor:
        """The NCA loss of the LSC's logits (the strategy's criterion while training)."""
        return nca_loss(output, y, self.nca_margin * self.head(model).scale)

    def finetune(self, strategy) -> None:
        """CBF: the proxies trained on the memory's features (backbone frozen, in eval mode)."""
        model, head, buf = strategy.model, self.head(strategy.model), self.memory.buffer
        mem = buf.get(torch.arange(len(buf)), "cpu")
        bs, device = strategy.train_mb_size, strategy.device
        f = backbone_features(model, mem.x, device, strategy.eval_mb_size or bs)
        y = mem.y.to(f.device)
        wd = strategy.optimizer.param_groups[0].get("weight_decay", 0.0)
        opt = torch.optim.SGD([head.proxies], lr=self.cbf_lr, momentum=0.9, weight_decay=wd)
        for _ in range(self.cbf_epochs):
            for idx in torch.randperm(len(y)).split(bs):
                idx = idx.to(f.device)
                loss = nca_loss(head(f[idx]), y[idx], self.nca_margin * head.scale.detach())
                opt.zero_grad()
                loss.backward()
                opt.step()
        head.proxies.grad, head.scale.grad = None, None

    # ------------------------------------------------------------------ hooks
    def before_train_dataset_adaptation(self, strategy, **kwargs):
        self.head(strategy.model)
        self.memory.before_train_dataset_adaptation(strategy, **kwargs)

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        claim_dataloader(strategy, self)
        if not self.memory.buffer.is_empty:
            strategy.adapted_dataset = concat_datasets((strategy.adapted_dataset,
                                                        memory_dataset(self.memory.buffer)))

    def before_training_exp(self, strategy, **kwargs):
        model, head = strategy.model, self.head(strategy.model)
        self._conv = conv_stages(model)
        self._stage_names = self.stages if self.stages is not None else tuple(self._conv)
        if not self._stage_names:
            raise ValueError(f"PODNet: {type(getattr(model, 'backbone', model)).__name__} has no "
                             "convolutional stage for POD-spatial; use a conv backbone (e.g. "
                             "model.name=lenet with benchmark.pad_to_32=true) or name `stages`")
        named_modules(model, self._stage_names, "PODNet (stages)")
        self.layers = self.teacher_layers = tuple(self._stage_names) + (FLAT,)
        super().before_training_exp(strategy, **kwargs)
        replace_criterion(strategy, self, functools.partial(self.training_loss, model))
        old = set(self.memory.seen_classes)
        current = {int(c) for c in strategy.experience.classes_in_this_experience}
        new = sorted(current - old)
        self._factor = adaptive_factor(len(old | current), max(1, len(new)))
        head.freeze([])
        if self.teacher is None:
            return
        if self.imprint and new:
            was_training = model.training
            model.eval()
            try:
                _, y, _, f = dataset_features(model, strategy.experience.dataset.eval(),
                                              strategy.device, strategy.eval_mb_size or 256)
            finally:
                model.train(was_training)
            head.imprint(new, f, y)
        if self.freeze_old:
            head.freeze(sorted(old))

    def after_training_exp(self, strategy, **kwargs):
        restore_criterion(strategy, self)
        self.memory.after_training_exp(strategy, **kwargs)  # herding, class means
        head, model = self.head(strategy.model), strategy.model
        head.freeze([])
        if self.teacher is not None and self.cbf_epochs:
            was_training = model.training
            model.eval()
            try:
                self.finetune(strategy)
            finally:
                model.train(was_training)
        super().after_training_exp(strategy, **kwargs)  # the new teacher

    def before_eval(self, strategy, **kwargs):
        self.memory.before_eval(strategy, **kwargs)

    def after_eval_forward(self, strategy, **kwargs):
        self.memory.after_eval_forward(strategy, **kwargs)

    def after_eval(self, strategy, **kwargs):
        self.memory.after_eval(strategy, **kwargs)

    def extra_state(self) -> Dict:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: Dict) -> None:
        self.memory.load_state_dict(state["memory"])
