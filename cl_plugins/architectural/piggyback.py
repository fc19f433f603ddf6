"""Piggyback: one learned binary mask per task over the weights of a fixed backbone.

Name: ``piggyback``. Scenarios: task-IL only (the task label picks the mask; refused without).

Paper: A. Mallya, D. Davis and S. Lazebnik, "Piggyback: Adapting a Single Network to Multiple
Tasks by Learning to Mask Weights", ECCV 2018 (arXiv:1801.06519). Code read: arunmallya/piggyback
``src/`` (``modnets/layers.py``, ``main.py``, ``scripts/run_piggyback_training.sh``). Notes and
measurements: docs/methods/piggyback.md.

For every Linear / Conv layer outside ``model.head`` with fixed weights W0, task t has a
real-valued mask m_t (the plugin's own parameters, not the model's):

    (P1) b_t = 1[m_t > tau]                                          binary mask (threshold tau)
    (P2) W_t = W0 * b_t                                              the task's effective weights
    (P3) dL/dm_t := dL/db_t = dL/dW_t * W0                           straight-through estimator
    m_t starts at ``mask_init`` everywhere (> tau: the task starts from the backbone itself)

Mechanics: ``core.weight_override.WeightOverridePlugin`` writes W_t into the user's unchanged
model before each forward, sends dL/dW_t through (P2, P3) to m_t after the backward, drops the
layers' own gradients and restores W0 after each step; m_t trains with the plugin's own Adam
(``mask_lr``), as the code's ``--mask_adam``. Heads (the model's ``MultiHeadClassifier``) train
with the strategy's optimizer. After its experience a task keeps only b_t (bool).

The backbone: with ``pretrained=False`` (default) the first experience trains the whole model
with the strategy as usual and its task uses the backbone itself (no mask), as ImageNet in the
paper; the backbone is fixed from the second experience on. With ``pretrained=True`` the given
model is the fixed backbone from the start and every task, the first included, learns a mask.
Fixed means: masked weights restored each step, every other parameter outside the head (biases,
normalisation layers) gets gradient None and running statistics are held (``core.fixed_parts``),
as the code (biases are not parameters; BN frozen unless ``--train_bn``).

Hooks: ``before_train_dataset_adaptation`` (labels), ``before_training_exp`` (a new m_t, its
optimizer: ``WeightOverridePlugin``'s), ``before_forward`` (P1, P2),
``after_backward`` (P3), ``after_update`` (mask step, W0 back), ``after_training_exp`` (b_t
kept), ``before_eval_forward`` / ``after_eval_forward`` (W0 * b_t for the minibatch's task).

Hyper-parameters (defaults: the code's ``layers.py`` and ``run_piggyback_training.sh``):

- ``threshold`` (tau, > 0): 5e-3 (``DEFAULT_THRESHOLD``).
- ``mask_init`` (> threshold): 1e-2 (``mask_init='1s'``, ``mask_scale=1e-2``).
- ``mask_lr`` (> 0): 1e-4, Adam (``LR_MASK``).
- ``pretrained`` (bool): False, see above.

Deviations and choices:

- The mask learning rate is constant: the code decays it by 10 after 15 of its 30 epochs (the
  plugin's optimizer has no schedule). The heads use the strategy's optimizer, not the code's
  own Adam at 1e-4.
- Without a pretrained network, the backbone is the model after the first experience.
- A task label not trained yet (and the backbone's own task) is evaluated with W0.
- ``cost_per_task``: b_t as bool, 1 byte per element (the paper counts 1 bit); the backbone's
  task stores nothing; the task in training, its float32 m_t.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from cl_plugins.core.checks import check_bool, check_positive
from cl_plugins.core.fixed_parts import FixedParts
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.core.weight_override import WeightOverridePlugin, tensor_cost

SETTINGS = ("threshold", "mask_init", "mask_lr", "pretrained")


class _Binarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, real, threshold):
        return (real > threshold).to(real.dtype)  # (P1)

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # (P3) straight through


def binary_mask(real: Tensor, threshold: float) -> Tensor:
    """(P1) 1[real > threshold] as ``real``'s dtype, with the straight-through gradient (P3)."""
    return _Binarize.apply(real, threshold)


class PiggybackPlugin(WeightOverridePlugin, supports_distributed=True):
    METHOD_NAME = "piggyback"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    SWEEP: dict = {"mask_lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2}}
    PAPER = ("Piggyback: Adapting a Single Network to Multiple Tasks by Learning to Mask Weights "
             "(Mallya, Davis & Lazebnik, ECCV 2018)")
    SUMMARY = ("a real-valued mask per task and layer, thresholded to binary (straight-through "
               "gradient), over a backbone fixed after the first experience (or pretrained)")

    def __init__(self, threshold: float = 5e-3, mask_init: float = 1e-2, mask_lr: float = 1e-4,
                 pretrained: bool = False):
        super().__init__()
        check_positive("threshold", threshold)
        check_positive("mask_init", mask_init)
        if mask_init <= threshold:
            raise ValueError(f"mask_init must be above threshold (every task starts from the "
                             f"backbone's weights, mask all ones); got mask_init={mask_init!r}, "
                             f"threshold={threshold!r}")
        check_positive("mask_lr", mask_lr)
        self.threshold, self.mask_init = float(threshold), float(mask_init)
        self.mask_lr, self.pretrained = float(mask_lr), check_bool("pretrained", pretrained)
        self.trained_tasks: List[int] = []
        self.backbone_task: Optional[int] = None  # the task that trained the backbone
        self.masks: Dict[int, Dict[str, Tensor]] = {}  # b_t (bool) of the finished tasks
        self.real: Dict[int, Dict[str, Tensor]] = {}   # m_t of the task in training
        self._parts: Optional[FixedParts] = None
        self._parts_of: Optional[nn.Module] = None

    @property
    def backbone_fixed(self) -> bool:
        return self.pretrained or bool(self.trained_tasks)

    def fixed_parts(self, model: nn.Module) -> FixedParts:
        layers = self.bind(model)
        if self._parts is None or self._parts_of is not model:
            self._parts, self._parts_of = FixedParts(model, layers.layers), model
        return self._parts

    # ---------------------------------------------------------------- WeightOverridePlugin
    def begin_task(self, strategy, task: int) -> None:
        if not self.backbone_fixed:
            self.backbone_task = task
        else:  # a new m_t, or the one of a state saved inside this experience
            old = self.real.get(task, {})
            self.real[task] = {n: (old[n].detach().to(w.device) if n in old else
                                   torch.full_like(w, self.mask_init)).requires_grad_(True)
                               for n, w in self.layers.base().items()}

    def own_parameters(self, task: int) -> List[Tensor]:
        return list(self.real[task].values()) if task in self.real else []

    def make_optimizer(self, strategy, params: List[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.mask_lr)

    def effective_weights(self, task: int, train: bool) -> Dict[str, Tensor]:
        base = self.layers.base()
        if task in self.real:
            masks = {n: binary_mask(m, self.threshold) if train else m.detach() > self.threshold
                     for n, m in self.real[task].items()}
        elif task in self.masks:
            masks = self.masks[task]
        else:  # the backbone's own task, or one not trained yet
            return {}
        return {n: base[n] * masks[n].to(base[n].device) for n in masks}  # (P2)

    # ---------------------------------------------------------------- hooks
    def before_train_dataset_adaptation(self, strategy, **kwargs):  # before the model adapts
        labels = require_task_labels(type(self).__name__, strategy.experience, self.trained_tasks)
        if len(labels) != 1:
            raise ValueError(f"PiggybackPlugin trains one task per experience; experience "
                             f"{strategy.experience.current_experience} has task labels {labels}")

    def before_forward(self, strategy, **kwargs):
        if self.backbone_fixed:  # else the first experience trains the backbone itself
            self.fixed_parts(strategy.model).freeze_statistics()
            super().before_forward(strategy, **kwargs)

    def after_backward(self, strategy, **kwargs):
        if self.backbone_fixed:
            super().after_backward(strategy, **kwargs)  # (P3), the layers' gradients dropped
            self.fixed_parts(strategy.model).drop_grads()

    def after_training_exp(self, strategy, **kwargs):
        task = self._task
        if task in self.real:
            self.masks[task] = {n: m.detach() > self.threshold  # (P1), kept as bool
                                for n, m in self.real.pop(task).items()}
        self.own_optimizer = None
        self.trained_tasks.append(task)

    # ---------------------------------------------------------------- report, state
    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        out = {t: tensor_cost(m.values()) for t, m in {**self.masks, **self.real}.items()}
        if self.backbone_task is not None:
            out[self.backbone_task] = {"params": 0, "bytes": 0}
        return dict(sorted(out.items()))

    def state_dict(self):  # the b_t themselves: they are never changed in place
        return {**settings_of(self, SETTINGS), "trained_tasks": list(self.trained_tasks),
                "backbone_task": self.backbone_task,
                "masks": {t: {n: b.cpu() for n, b in m.items()} for t, m in self.masks.items()},
                "real": {t: {n: r.detach().cpu().clone() for n, r in m.items()}
                         for t, m in self.real.items()},
                **self.override_state()}

    def load_state_dict(self, state):
        check_settings(self, state, SETTINGS)
        self.trained_tasks = [int(t) for t in state["trained_tasks"]]
        self.backbone_task = state["backbone_task"]
        self.masks = {int(t): dict(m) for t, m in state["masks"].items()}
        self.real = {int(t): {n: r.clone().requires_grad_(True) for n, r in m.items()}
                     for t, m in state["real"].items()}
        self._parts = self._parts_of = None
        self.load_override_state(state)
