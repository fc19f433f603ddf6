"""PackNet: iterative pruning packs one task after another into the free weights of one network.

Name: ``packnet``. Scenarios: task-IL only (the task label picks the weights; refused without).

Paper: A. Mallya and S. Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative
Pruning", CVPR 2018 (arXiv:1711.05769). Code read: arunmallya/packnet ``src/`` (``prune.py``,
``main.py``, ``scripts/run_*sequence.sh``, ``run_imagenet_pruning.sh``). docs/methods/packnet.md.

Each Linear / Conv weight outside ``model.head`` (``core.weight_override.weight_layers``) has an
owner code o: 0 (free) or k (the k-th task trained). The k-th experience, of N steps:

    (K1) o[o == 0] <- k   the free weights join the task (at 0, where the last prune left them)
    train N - R steps, then (K2) per layer: of the n weights with o == k, the round(p n) of
    smallest |w| get o <- 0 and w <- 0; retrain the kept ones for the last R steps
    (K3) each step: g <- g * 1[o == k] after the backward, w <- where(o == k, w, w_fixed) after
         the optimizer step (w_fixed: the weights at the experience's start, pruned ones 0)
    (K4) evaluating task t, the k_t-th trained: W_t = W * 1[0 < o <= k_t], written in place for
         the forward (``core.weight_override.LayerWeights``) and restored after it

(K3) keeps old weights bit for bit under any optimizer (weight decay, momentum and Adam move a
weight with a zero gradient; the restore puts it back). Biases and normalisation layers (all but
the masked weights outside the head) train in the first experience and are fixed from the second
on (``core.fixed_parts``), the code's default (ImageNet pruned with ``--train_biases --train_bn``,
later tasks ``nobias-nobn``).

Schedule: N = batches x ``train_epochs`` (or the runner's ``train_iterations``, if smaller);
R = max(1, round(f N)), or 0 if f = 0 (prune at the end). N - R < 1: error naming the cause.

Hooks: ``before_train_dataset_adaptation`` (labels), ``before_training_exp`` (K1),
``before_training_iteration`` (K2), ``before_forward``, ``after_backward``, ``after_update`` (K3),
``after_training_exp``, ``*_eval_forward`` (K4).

Hyper-parameters (defaults: the official code's sequence of added tasks):

- ``prune_ratio`` (p, in [0, 1)): 0.75 (``run_all_sequence.sh``: each added task, the last not
  pruned; ImageNet: 0.5). A list: one value per experience (a last 0.0 keeps all for the last).
- ``retrain_fraction`` (f, in [0, 1)): 1/3, the share of the experience's steps retrained after
  the prune (``run_sequence.sh``: 20 training epochs, then 10 post-prune epochs).

Deviations and choices:

- Steps, not epochs, so any protocol fits (1 epoch or an iteration budget). The code retrains at
  a tenth of its learning rate with a fresh SGD (momentum 0.9); here the strategy's optimizer and
  learning rate carry on (a drop is the runner's scheduler's job). The code prunes the weights
  ``<=`` a cutoff magnitude (ties may prune more); here exactly round(p n), ties by position.
- The code zeroes gradients only: exact with its weight decay of 0. A task label not trained yet
  sees every trained task's weights. Per-task heads are the model's (``MultiHeadClassifier``): an
  old head gets no gradient. At most 254 tasks (uint8). A state saved inside an experience keeps
  the masks, not the schedule position (runner checkpoints come between experiences).
- ``cost_per_task``: params = the weights the task owns; bytes = its binary mask over the masked
  layers, 1 byte per element (the plugin stores one uint8 code map shared by all tasks).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Union

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_plugins.core.checks import check_range
from cl_plugins.core.fixed_parts import FixedParts
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.core.weight_override import LayerWeights, minibatch_task, tensor_cost, \
    weight_layers

SETTINGS = ("prune_ratio", "retrain_fraction")
MAX_TASKS = 254


def prune_by_magnitude(weight: Tensor, owner: Tensor, code: int, ratio: float) -> Tensor:
    """(K2) A bool mask of the round(ratio * n) weights of smallest magnitude among the n with
    ``owner == code`` (equal magnitudes: the lower flat index first)."""
    mine = owner == code
    k = round(ratio * int(mine.sum()))
    cut = torch.zeros_like(mine)
    if k > 0:
        score = torch.where(mine, weight.detach().abs(), torch.full_like(weight, math.inf))
        cut.view(-1)[torch.argsort(score.flatten(), stable=True)[:k]] = True
    return cut


def visible(owner: Tensor, code: int) -> Tensor:
    """(K4) The weights task code ``code`` uses: owned by it or by a task trained before it."""
    return (owner > 0) & (owner <= code)


def steps_in_experience(strategy) -> int:
    """Steps in this experience: batches x epochs, or the runner's budget when smaller."""
    return min([len(strategy.dataloader) * strategy.train_epochs] + [
        p.n_iterations for p in strategy.plugins if isinstance(p, IterationBudgetPlugin)])


class PackNetPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "packnet"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    SWEEP: dict = {"prune_ratio": {"values": [0.5, 0.75, 0.9]},
                   "retrain_fraction": {"values": [0.0, 0.2, 1 / 3, 0.5]}}
    PAPER = ("PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning (Mallya & "
             "Lazebnik, CVPR 2018)")
    SUMMARY = ("each task trains the free weights, prunes a share per layer by magnitude, "
               "retrains the rest; a task sees the weights of the tasks up to it")

    def __init__(self, prune_ratio: Union[float, Sequence[float]] = 0.75,
                 retrain_fraction: float = 1 / 3):
        super().__init__()
        listed = isinstance(prune_ratio, (list, tuple))
        ratios = list(prune_ratio) if listed else [prune_ratio]
        if not ratios:
            raise ValueError("prune_ratio must be a number in [0, 1) or a non-empty list of them "
                             "(one per experience); got []")
        for i, r in enumerate(ratios):
            check_range(f"prune_ratio[{i}]" if listed else "prune_ratio", r, 0.0, 1.0,
                        high_inclusive=False)
        check_range("retrain_fraction", retrain_fraction, 0.0, 1.0, high_inclusive=False)
        self.prune_ratio = [float(r) for r in ratios] if listed else float(prune_ratio)
        self.retrain_fraction = float(retrain_fraction)
        self.tasks: List[int] = []          # task labels in training order: code k = position + 1
        self.owner: Dict[str, Tensor] = {}  # (K1) per layer, uint8
        self._reset()

    # ---------------------------------------------------------------- helpers
    def _reset(self) -> None:  # forget the model binding and the experience in progress
        self._model = self._layers = self._parts = None  # nn.Module, LayerWeights, FixedParts
        self._mine, self._fixed = {}, {}  # (K3) this experience's trainable masks, fixed values
        self._step, self._prune_at, self._pruned = 0, None, True

    def _bind(self, model: nn.Module) -> LayerWeights:
        if model is not self._model:
            layers = weight_layers(model)
            if self.owner and {n: tuple(o.shape) for n, o in self.owner.items()} != \
                    {n: tuple(m.weight.shape) for n, m in layers.items()}:
                raise ValueError(f"PackNetPlugin's masks are for the layers {sorted(self.owner)}; "
                                 f"this model's are {sorted(layers)} (another architecture?)")
            self.owner = {n: o.to(layers[n].weight.device) for n, o in self.owner.items()}
            self._model, self._layers = model, LayerWeights(layers)
            self._parts = FixedParts(model, layers)
        return self._layers

    def _ratio(self, index: int) -> float:
        if not isinstance(self.prune_ratio, list):
            return self.prune_ratio
        if index >= len(self.prune_ratio):  # checked before the experience trains
            raise ValueError(f"prune_ratio lists {len(self.prune_ratio)} values (one per "
                             f"experience), but experience number {index + 1} is to be trained")
        return self.prune_ratio[index]

    @torch.no_grad()
    def _prune(self) -> None:
        code, ratio = len(self.tasks), self._ratio(len(self.tasks) - 1)
        for n, m in self._layers.layers.items():
            cut = prune_by_magnitude(m.weight, self.owner[n], code, ratio)  # (K2)
            self.owner[n] = self.owner[n].masked_fill(cut, 0)
            m.weight[cut] = 0.0
            self._fixed[n][cut] = 0.0
            self._mine[n] &= ~cut
        self._pruned = True

    # ---------------------------------------------------------------- training hooks
    def before_train_dataset_adaptation(self, strategy, **kwargs):  # before the model adapts
        labels = require_task_labels(type(self).__name__, strategy.experience, self.tasks)
        if len(labels) != 1 or len(self.tasks) >= MAX_TASKS:
            raise ValueError(f"PackNetPlugin trains one task per experience, {MAX_TASKS} at most; "
                             f"got task labels {labels} after {len(self.tasks)} tasks")
        self._ratio(len(self.tasks))

    def before_training_exp(self, strategy, **kwargs):
        layers = self._bind(strategy.model)
        self.tasks.append(int(strategy.experience.task_labels[0]))
        code = len(self.tasks)
        for n, m in layers.layers.items():  # stored tensors are replaced, never changed in place
            o = self.owner.get(n, torch.zeros_like(m.weight, dtype=torch.uint8))
            self.owner[n] = o.masked_fill(o == 0, code)  # (K1)
        self._mine = {n: o == code for n, o in self.owner.items()}
        self._fixed = {n: m.weight.detach().clone() for n, m in layers.layers.items()}
        self._step, self._prune_at, self._pruned = 0, None, False

    def before_training_iteration(self, strategy, **kwargs):
        if self._prune_at is None:
            total = steps_in_experience(strategy)
            retrain = max(1, round(self.retrain_fraction * total)) \
                if self.retrain_fraction > 0 else 0
            if total - retrain < 1:
                raise ValueError(
                    f"packnet: retrain_fraction={self.retrain_fraction:g} needs 2 or more steps "
                    f"per experience (train, prune, retrain); this one has {total}: raise "
                    "strategy.epochs, lower train_mb_size, or set retrain_fraction=0")
            self._prune_at = total - retrain
        if not self._pruned and self._step >= self._prune_at:
            self._prune()

    def before_forward(self, strategy, **kwargs):
        if len(self.tasks) > 1:
            self._parts.freeze_statistics()

    def after_backward(self, strategy, **kwargs):
        for n, m in self._layers.layers.items():
            if m.weight.grad is not None:
                m.weight.grad.mul_(self._mine[n])  # (K3)
        if len(self.tasks) > 1:
            self._parts.drop_grads()

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        for n, m in self._layers.layers.items():
            m.weight.copy_(torch.where(self._mine[n], m.weight, self._fixed[n]))  # (K3)

    def after_training_iteration(self, strategy, **kwargs):
        self._step += 1

    def after_training_exp(self, strategy, **kwargs):
        if not self._pruned:  # retrain_fraction 0, or the strategy stopped early
            self._prune()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def before_eval_forward(self, strategy, **kwargs):
        if not self.tasks:
            return
        layers = self._bind(strategy.model)
        task = minibatch_task(strategy, type(self).__name__)
        code = self.tasks.index(task) + 1 if task in self.tasks else len(self.tasks)
        layers.write({n: m.weight * visible(self.owner[n], code)  # (K4)
                      for n, m in layers.layers.items()})

    def after_eval_forward(self, strategy, **kwargs):
        if self._layers is not None:
            self._layers.restore()

    # ---------------------------------------------------------------- report, state
    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        masks = {t: [o == k for o in self.owner.values()] for k, t in enumerate(self.tasks, 1)}
        return {t: {"params": int(sum(int(x.sum()) for x in m)), "bytes": tensor_cost(m)["bytes"]}
                for t, m in masks.items()}

    def state_dict(self):  # the code maps themselves: they are never changed in place
        return {**settings_of(self, SETTINGS), "tasks": list(self.tasks),
                "owner": {n: o.cpu() for n, o in self.owner.items()}}

    def load_state_dict(self, state):
        check_settings(self, state, SETTINGS)
        self.tasks = [int(t) for t in state["tasks"]]
        self.owner = dict(state["owner"])
        self._reset()
