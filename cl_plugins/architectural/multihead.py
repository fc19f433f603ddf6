"""Multi-head: one output head per task on a shared backbone; the task label picks the head.

Name: ``multihead``. Scenarios: task-IL (a head per task label) and class-IL (a head per
experience: the rows of its classes in the single output layer). Domain-IL is refused: every
experience has the same labels and task label 0, so there would be one head, i.e. ``naive``.

The method is the "multi-head" setting of the continual-learning literature (e.g. the task-IL
baselines of van de Ven, Tuytelaars & Tolias, Nature Machine Intelligence 2022): the backbone is
shared and fine-tuned, each task trains only its own output units, and at test time the task
label selects them. Notes, decisions and measurements: docs/methods/multihead.md.

Where the heads live (``mode``, chosen at the first experience from the model and the stream):

- ``"heads"``: ``model.head`` is Avalanche's ``MultiHeadClassifier`` (the runner's task-IL
  model, ``model.head: auto``). Avalanche's dynamic-module adaptation creates each task's head;
  the plugin only checks and reports. On such a model ``multihead`` trains exactly what
  ``naive`` trains (tested bit for bit): what it adds is the checks (no task labels, a task
  label trained twice), ``cost_per_task`` and ``freeze_backbone``.
- ``"slot"``: ``model.head`` is one ``nn.Linear`` (or a ``MaskedHead``'s) and the stream has
  task labels. The plugin keeps a copy of each task's head (weight, bias) and writes the
  minibatch task's head into that Linear: for training at ``before_training_exp`` (a new task
  starts from ``reset_parameters()``, the layer's own initialisation, with no optimizer state,
  like a new ``MultiHeadClassifier`` head: tested equal), for evaluation at every
  ``before_eval_forward`` (put back after the evaluation). The model object and its state_dict
  keys stay the user's, so the runner's checkpoint resumes exactly (the Linear holds the last
  task's head, the plugin's state the others). Replacing ``model.head`` by a
  ``MultiHeadClassifier`` would change the keys, and the runner, which rebuilds the model from
  the config before loading the state, could not load them.
- ``"rows"``: one Linear head and no task labels (class-IL). Experience k's head is the rows of
  its classes: the training loss sees only those logits (the others set to -1e4 after the
  forward, so other rows get no gradient). The runner's task view (``matrix_task_view``,
  ``experiment/evaluation.py``: logits restricted to the evaluated experience's classes) is then
  the multi-head evaluation with the task given; ``matrix`` is the same heads used without it
  (argmax over all seen classes). Van de Ven et al.'s code builds its multi-headed layer the
  same way (GMvandeVen/continual-learning ``train/train_task_based.py``: one output layer, only
  the current context's units active; class-IL with ``neg_samples="current"`` trains so).

Hooks: ``before_training_exp`` (mode, checks, the task's head, ``freeze_backbone``),
``before_forward`` (slot: one task per minibatch), ``after_forward`` (rows: the mask),
``after_training_exp`` (bookkeeping, costs), ``before_eval`` / ``before_eval_forward`` /
``after_eval`` (slot: the head of the minibatch's task).

Hyper-parameter: ``freeze_backbone`` (False): from the second experience on, only the head
trains; everything else is frozen and in eval mode (``core.freeze``): Li & Hoiem's "feature
extraction" baseline (ECCV 2016), with the first experience as the pre-training.

Choices: in slot mode a task label never trained is evaluated with the head the Linear holds
(the last task's); ``MultiHeadClassifier`` would create a random head for it. A slot-mode
minibatch holds one task label (``core.weight_override.minibatch_task``; a replay plugin mixing
tasks is refused). ``cost_per_task``: the parameters and bytes of each task's head (rows: its
classes' weight rows and biases; key: the experience index, task labels being 0), float32 = 4
bytes, recorded when the task ends.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier
from torch import nn

from cl_plugins.core.checks import check_bool
from cl_plugins.core.freeze import freeze_all_but
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.core.weight_override import minibatch_task, tensor_cost

MASK_VALUE = -1e4  # exp(-1e4) is 0 in float32; finite, so no 0 * inf in other losses


def single_linear(model: nn.Module, who: str) -> nn.Linear:
    """``model.head`` if it is an ``nn.Linear``, or the ``linear`` of a ``MaskedHead``."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    if isinstance(getattr(head, "linear", None), nn.Linear):
        return head.linear
    raise ValueError(f"{who} needs model.head: an avalanche MultiHeadClassifier, an nn.Linear "
                     f"or a MaskedHead (cl_plugins' ClassifierNet); got {type(head).__name__}")


class MultiHeadPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "multihead"
    SCENARIOS = ("task", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"freeze_backbone": {"values": [False, True]}}
    PAPER = "multi-head output layer (task-IL baseline; van de Ven et al., NMI 2022)"
    SUMMARY = ("a head per task (task label) or per experience (its classes' rows); a user's "
               "single Linear gets per-task copies; optional frozen backbone")
    SETTINGS = ("freeze_backbone",)

    def __init__(self, freeze_backbone: bool = False):
        super().__init__()
        self.freeze_backbone = check_bool("freeze_backbone", freeze_backbone)
        self.mode: Optional[str] = None  # "heads" | "slot" | "rows"
        self.trained_tasks: List[int] = []  # task labels trained on (heads, slot)
        self.classes: List[List[int]] = []  # classes of each trained experience
        self.heads: Dict[int, Dict[str, Optional[torch.Tensor]]] = {}  # slot: CPU copies
        self.active: Optional[int] = None  # slot: the task whose head the Linear holds
        self.costs: Dict[int, Dict[str, int]] = {}
        self._allowed: Optional[torch.Tensor] = None  # rows: the experience's classes
        self._held: Optional[Dict[str, Optional[torch.Tensor]]] = None  # slot, evaluation

    @property
    def who(self) -> str:
        return type(self).__name__

    def _choose_mode(self, model, experience) -> str:
        if isinstance(getattr(model, "head", None), MultiHeadClassifier):
            return "heads"
        single_linear(model, self.who)
        try:
            require_task_labels(self.who, experience, [])
            return "slot"
        except ValueError:  # one task label for the whole stream
            return "rows"

    @torch.no_grad()
    def before_training_exp(self, strategy, **kwargs):
        model, exp = strategy.model, strategy.experience
        self.mode = self.mode or self._choose_mode(model, exp)
        if self.freeze_backbone and self.classes:
            freeze_all_but(model, model.head)
        classes = sorted(int(c) for c in exp.classes_in_this_experience)
        if self.mode == "rows":
            return self._begin_rows(model, classes, exp.current_experience)
        labels = require_task_labels(self.who, exp, self.trained_tasks)
        if self.mode == "heads":
            return
        if len(labels) != 1:
            raise ValueError(f"{self.who} with a single Linear head trains one task's head per "
                             f"experience; experience {exp.current_experience} has task "
                             f"labels {labels}")
        linear = single_linear(model, self.who)
        if self.active is not None and labels[0] != self.active:  # a new task: a fresh head
            linear.reset_parameters()
            for p in linear.parameters():
                strategy.optimizer.state.pop(p, None)
        self.active = labels[0]

    def _begin_rows(self, model, classes, index):
        linear = single_linear(model, self.who)
        seen = sorted(set(classes) & {c for cs in self.classes for c in cs})
        if seen:
            raise ValueError(f"{self.who} without task labels gives each experience the rows "
                             f"of its classes; experience {index} holds classes {seen} trained "
                             "before (domain-IL: every experience has the same labels, which "
                             "would be naive fine-tuning). Use task labels or class-IL.")
        if classes[-1] >= linear.out_features:
            raise ValueError(f"{self.who}: the head has {linear.out_features} outputs, the "
                             f"experience holds class {classes[-1]}")
        self._allowed = torch.zeros(linear.out_features, dtype=torch.bool,
                                    device=linear.weight.device)
        self._allowed[classes] = True

    def before_forward(self, strategy, **kwargs):
        if self.mode == "slot" and minibatch_task(strategy, self.who) != self.active:
            raise ValueError(f"{self.who} trains task {self.active}'s head; the minibatch holds "
                             "another task's samples (a replay plugin mixing tasks?)")

    def after_forward(self, strategy, **kwargs):
        if self.mode == "rows" and self._allowed is not None:
            strategy.mb_output = strategy.mb_output.masked_fill(~self._allowed, MASK_VALUE)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        exp, model = strategy.experience, strategy.model
        classes = sorted(int(c) for c in exp.classes_in_this_experience)
        self.classes.append(classes)
        if self.mode == "rows":
            lin = single_linear(model, self.who)
            rows = torch.as_tensor(classes, device=lin.weight.device)
            parts = [lin.weight[rows]] + ([] if lin.bias is None else [lin.bias[rows]])
            self.costs[len(self.classes) - 1] = tensor_cost(parts)
            self._allowed = None
            return
        tasks = sorted({int(t) for t in exp.task_labels})
        self.trained_tasks += tasks
        if self.mode == "heads":
            for t in tasks:
                self.costs[t] = tensor_cost(model.head.classifiers[str(t)].parameters())
            return
        self.heads[self.active] = self._copy(single_linear(model, self.who))
        self.costs[self.active] = tensor_cost(
            [v for v in self.heads[self.active].values() if v is not None])

    @staticmethod
    def _copy(linear: nn.Linear) -> Dict[str, Optional[torch.Tensor]]:
        return {"weight": linear.weight.detach().cpu().clone(),
                "bias": None if linear.bias is None else linear.bias.detach().cpu().clone()}

    @staticmethod
    @torch.no_grad()
    def _write(linear: nn.Linear, head: Dict[str, Optional[torch.Tensor]]) -> None:
        linear.weight.copy_(head["weight"])
        if linear.bias is not None:
            linear.bias.copy_(head["bias"])

    def before_eval(self, strategy, **kwargs):
        if self.mode == "slot" and self._held is None:
            self._held = self._copy(single_linear(strategy.model, self.who))

    def before_eval_forward(self, strategy, **kwargs):
        if self.mode == "slot":
            t = minibatch_task(strategy, self.who)
            head = self.heads[t] if t in self.heads and t != self.active else self._held
            self._write(single_linear(strategy.model, self.who), head)

    def after_eval(self, strategy, **kwargs):
        if self._held is not None:
            self._write(single_linear(strategy.model, self.who), self._held)
            self._held = None

    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        """{task label (rows: experience index): {"params", "bytes"}} of each trained head."""
        return {k: dict(v) for k, v in self.costs.items()}

    def state_dict(self) -> dict:
        tasks = sorted(self.heads)
        return {**settings_of(self, self.SETTINGS), "mode": self.mode, "active": self.active,
                "trained_tasks": list(self.trained_tasks),
                "classes": [list(c) for c in self.classes], "head_tasks": tasks,
                "head_weights": [self.heads[t]["weight"].clone() for t in tasks],
                "head_biases": [None if self.heads[t]["bias"] is None
                                else self.heads[t]["bias"].clone() for t in tasks],
                "costs": {k: dict(v) for k, v in self.costs.items()}}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, self.SETTINGS)
        self.mode, self.active = state["mode"], state["active"]
        self.trained_tasks = [int(t) for t in state["trained_tasks"]]
        self.classes = [[int(c) for c in cs] for cs in state["classes"]]
        self.heads = {int(t): {"weight": w.clone().cpu(),
                               "bias": None if b is None else b.clone().cpu()}
                      for t, w, b in zip(state["head_tasks"], state["head_weights"],
                                         state["head_biases"])}
        self.costs = {int(k): dict(v) for k, v in state["costs"].items()}
        self._allowed, self._held = None, None
