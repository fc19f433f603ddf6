"""SupSup: Supermasks in Superposition (one edge-popup supermask per task on a fixed random net).

Name: ``supsup``. Scenarios: task-IL only: the paper's GG scenario (task label at training and
test time). Paper: M. Wortsman, V. Ramanujan, R. Liu, A. Kembhavi, M. Rastegari, J. Yosinski and
A. Farhadi, "Supermasks in Superposition", NeurIPS 2020 (arXiv:2006.14769); code read for facts:
RAIVNLab/supsup (``models/modules.py`` MultitaskMaskConv, ``models/module_util.py``,
``models/init.py``, ``models/builder.py``, ``main.py``, ``mnist.ipynb``). Sources, notes,
measurements: docs/methods/supsup.md.

Masked layers: every Linear / Conv layer of the model, the task's own head included: the paper
masks the whole network, its output layer too. With a ``MultiHeadClassifier`` task t's network
is the backbone plus head t (a fresh random head per task, masked by t's supermask); a single
shared head is masked per task like the paper's shared output layer. W0 never changes:

    W0 = sign(W_init) sqrt(2 / fan_in),  bias = 0              # signed Kaiming constant, once
    M^t_l = top-k(|S^t_l|): 1 on the density share of largest   # edge-popup (GetSubnet)
    y = f(x; W0 * M^t);  dL/dS^t = sign(S^t) * W0 * dL/dW_eff   # straight-through estimator
    S^t ~ kaiming_uniform(a = sqrt(5)) (module_util.mask_init); only S^t is trained

``mask_rule="threshold"``: M = [S >= 0] with dL/dS = W0 * dL/dW_eff (the code's
FastMultitaskMaskConv and ``mnist.ipynb``, used for its GNu / MNIST runs). After task t the
mask is kept (bool) and the scores dropped.

Hooks (``core.weight_override.WeightOverridePlugin``: W0 * M^t written in place before each
forward, dL/dW_eff routed to S^t, the plugin's own optimizer, weights restored after each step):
``before_train_dataset_adaptation`` (task labels); ``before_training_exp`` (layers bound again:
a new head; signed constant written into layers not yet fixed; S^t drawn); ``after_backward``
(also drops every model gradient: biases, heads); ``after_training_exp`` (M^t kept);
``before/after_eval_forward`` (M^t; a task never trained runs on the unmasked network).

Hyper-parameters: ``density`` 0.5 (share of each layer's weights kept: the code's ``--sparsity``
default, also the cap of its per-layer rule), ``mask_rule`` "topk" (GG: MultitaskMaskConv, per
the README) or "threshold"; ``score_optimizer`` "strategy" (``optimizer_like`` the strategy's) or
"rmsprop" (the code's MNIST runs), ``score_lr`` None (the strategy's lr); ``seed`` 0 (S^t from a
generator seeded with (seed, t)).

Deviations: one density for every layer (the GG CIFAR runs used ``--er-sparsity``, main.py);
no per-task BatchNorm (``MultitaskNonAffineBN``): normalisation layers are refused; per-task
heads each have their own random W0 (the paper: one shared output layer); masks stored as bool,
1 byte per weight (a packed bit mask: 1/8). No task inference: the paper's one-shot GNs rule
(superpose all masks with alpha_i = 1/k, one gradient of the output entropy, pick argmax of
-dH/dalpha) is not offered. ``cost_per_task``: the task's masks.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from avalanche.models import MultiHeadClassifier
from torch import Tensor, nn

from cl_plugins.core.checks import check_choice, check_int, check_positive, check_range
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.core.weight_override import WeightOverridePlugin, optimizer_like, tensor_cost, \
    weight_layers

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def supermask(scores: Tensor, density: float, rule: str = "topk") -> Tensor:
    """The bool mask of ``scores``: "topk" keeps the ``density`` share with the largest |score|
    (the code's GetSubnet zeroes the int((1 - density) n) smallest; ``torch.topk``, not a full
    sort: ties at the cut may be broken otherwise), "threshold" keeps S >= 0."""
    if rule == "threshold":
        return scores >= 0
    flat = scores.abs().flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, flat.numel() - int((1 - density) * flat.numel()), sorted=False)[1]] = True
    return keep.view_as(scores)


class _StraightThrough(torch.autograd.Function):
    """Forward: the mask of the scores' values; backward: the gradient passed unchanged."""

    @staticmethod
    def forward(ctx, values, density, rule):
        return supermask(values, density, rule).to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def training_mask(scores: Tensor, density: float, rule: str = "topk") -> Tensor:
    """The float mask with the straight-through gradient: to |S| for "topk" (the code applies
    GetSubnet to ``scores.abs()``), to S for "threshold"."""
    return _StraightThrough.apply(scores.abs() if rule == "topk" else scores, density, rule)


@torch.no_grad()
def signed_constant_(layer: nn.Module) -> None:
    """W <- sign(W) * gain / sqrt(fan_in), gain = sqrt(2) (ReLU); bias <- 0 (models/init.py)."""
    layer.weight.copy_(layer.weight.sign() * math.sqrt(2.0 / layer.weight[0].numel()))
    if isinstance(getattr(layer, "bias", None), Tensor):
        layer.bias.zero_()


def task_layer_names(model: nn.Module, task: int) -> List[str]:
    """The Linear / Conv layers of task ``task``'s network: all, but other tasks' heads."""
    head, others = getattr(model, "head", None), set()
    if isinstance(head, MultiHeadClassifier):
        for key, clf in head.classifiers.items():
            others |= set() if key == str(task) else {id(m) for m in clf.modules()}
    return [n for n, m in weight_layers(model, include_head=True).items() if id(m) not in others]


class SupSupPlugin(WeightOverridePlugin, supports_distributed=True):
    METHOD_NAME = "supsup"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    SWEEP: dict = {"density": {"values": [0.05, 0.1, 0.25, 0.5]}}
    PAPER = "Supermasks in Superposition (Wortsman et al., NeurIPS 2020)"
    SUMMARY = ("a fixed random network (signed constant); each task learns a binary supermask "
               "by edge-popup scores with a straight-through gradient")
    SETTINGS = ("density", "mask_rule", "score_optimizer", "score_lr", "seed")
    INCLUDE_HEAD = True

    def __init__(self, density: float = 0.5, mask_rule: str = "topk",
                 score_optimizer: str = "strategy", score_lr: Optional[float] = None,
                 seed: int = 0):
        super().__init__()
        self.density = check_range("density", density, 0.0, 1.0, low_inclusive=False)
        self.mask_rule = check_choice("mask_rule", mask_rule, ("topk", "threshold"))
        self.score_optimizer = check_choice("score_optimizer", score_optimizer,
                                            ("strategy", "rmsprop"))
        self.score_lr = None if score_lr is None else check_positive("score_lr", score_lr)
        self.seed = check_int("seed", seed, 0)
        self.masks: Dict[int, Dict[str, Tensor]] = {}  # task -> {layer: bool mask}
        self.scores: Dict[int, Dict[str, Tensor]] = {}  # the task in training -> {layer: S}
        self.fixed: List[str] = []  # layers whose weights were set to the signed constant
        self.trained_tasks: List[int] = []
        self._names: Dict[int, List[str]] = {}

    def bind(self, model):
        if self.layers is None or model is not self._model:
            self._names = {}
        return super().bind(model)

    def names(self, task: int) -> List[str]:
        if task not in self._names:
            self._names[task] = task_layer_names(self._model, task)
        return self._names[task]

    # ------------------------------------------------------------- WeightOverridePlugin
    def begin_task(self, strategy, task):
        bad = [n for n, m in strategy.model.named_modules() if isinstance(m, _NORMS)]
        if bad:
            raise ValueError(f"SupSup keeps the whole network fixed and has no per-task "
                             f"normalisation layers; this model has {bad}")
        layers = self.layers.layers
        for n in self.names(task):
            if n not in self.fixed:
                signed_constant_(layers[n])
                self.fixed.append(n)
        if task in self.scores:  # resumed in the middle of this task
            self.scores[task] = {n: s.detach().to(layers[n].weight).clone().requires_grad_(True)
                                 for n, s in self.scores[task].items()}
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + task)
        self.scores[task] = {n: torch.nn.init.kaiming_uniform_(
            torch.empty(layers[n].weight.shape), a=math.sqrt(5), generator=g)
            .to(layers[n].weight).requires_grad_(True) for n in self.names(task)}

    def own_parameters(self, task):
        return list(self.scores[task].values())

    def make_optimizer(self, strategy, params):
        if self.score_optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.score_lr or
                                       strategy.optimizer.param_groups[0]["lr"])
        return optimizer_like(strategy.optimizer, params,
                              **({} if self.score_lr is None else {"lr": self.score_lr}))

    def effective_weights(self, task, train):
        base = self.layers.base()
        if train:
            masks = {n: training_mask(s, self.density, self.mask_rule)
                     for n, s in self.scores[task].items()}
        elif task in self.masks:
            masks = self.masks[task]
        elif task in self.scores:  # evaluated while being trained
            masks = {n: supermask(s.detach(), self.density, self.mask_rule)
                     for n, s in self.scores[task].items()}
        else:
            return {}  # a task never trained: the unmasked network
        return {n: base[n] * m.to(base[n].device) for n, m in masks.items()}

    # ------------------------------------------------------------- hooks
    def before_train_dataset_adaptation(self, strategy, **kwargs):
        require_task_labels(type(self).__name__, strategy.experience, self.trained_tasks)

    def before_training_exp(self, strategy, **kwargs):
        self.layers = None  # the model may have a new head: bind again
        super().before_training_exp(strategy, **kwargs)

    def after_backward(self, strategy, **kwargs):
        super().after_backward(strategy, **kwargs)
        for p in strategy.model.parameters():  # nothing of the network is trained
            p.grad = None

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        t = self._task
        self.masks[t] = {n: supermask(s.detach(), self.density, self.mask_rule)
                         for n, s in self.scores.pop(t).items()}
        self.trained_tasks.append(t)
        self.own_optimizer = None

    def before_eval_exp(self, strategy, **kwargs):
        if self.layers is None or self.layers.saved is None:
            self.layers = None  # evaluation may have added heads: bind again

    # ------------------------------------------------------------- cost and state
    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        """``{task: {"params", "bytes"}}``: the task's masks (bool: 1 byte per weight)."""
        return {t: tensor_cost(self.masks[t].values()) for t in sorted(self.masks)}

    def state_dict(self) -> dict:
        return {**settings_of(self, self.SETTINGS), "trained_tasks": list(self.trained_tasks),
                "masks": {t: {n: m.cpu() for n, m in d.items()} for t, d in self.masks.items()},
                "scores": {t: {n: s.detach().cpu() for n, s in d.items()}
                           for t, d in self.scores.items()},
                "fixed": list(self.fixed), **self.override_state()}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, self.SETTINGS)
        self.masks = {int(t): dict(d) for t, d in state["masks"].items()}
        self.scores = {int(t): dict(d) for t, d in state["scores"].items()}
        self.fixed = list(state["fixed"])
        self.trained_tasks = [int(t) for t in state["trained_tasks"]]
        self.load_override_state(state)
