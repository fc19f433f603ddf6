"""Progressive neural networks: a frozen column per task, lateral adapters into the new column.

Name: ``pnn``. Scenarios: task-IL only (the task label picks the column). Task labels: needed.

Paper: A. A. Rusu, N. C. Rabinowitz, G. Desjardins, H. Soyer, J. Kirkpatrick, K. Kavukcuoglu,
R. Pascanu, R. Hadsell, "Progressive Neural Networks", arXiv 1606.04671, 2016. No official code;
facts, anchors and measurements: docs/methods/pnn.md.

Each task k gets a column, a copy of the user's ``ClassifierNet`` trained from a fresh
initialisation; the columns of earlier tasks are frozen; layer i of column k reads the layer
inputs h_{i-1}^(j) of every earlier column j < k through an adapter (``core.progressive``):

    h_i^(k) = s(W_i^(k) h_{i-1}^(k) + U_i^(k) s(V_i^(k) [alpha_{i,j} h_{i-1}^(j)]_{j<k}))  # Eq. 2

(``adapter="linear"``: Eq. 1, U_i^(k) [h_{i-1}^(j)]_{j<k}). Works for MLP and conv backbones
(the adapters follow each Linear / Conv layer's geometry; V is a 1x1 convolution on feature
maps) and any head; the head is the output layer and gets its own adapter.

Where the columns live (design): the user's model object is the *newest* column and is trained by
the strategy's optimizer as usual; the frozen columns of earlier tasks and every column's
adapters are the plugin's (the adapters of the newest column trained by the plugin's own
optimizer, ``optimizer_like`` the strategy's). The model keeps its modules and ``state_dict``
keys, so the runner's checkpoint (model + optimizer + this plugin's state) resumes exactly; no
``strategy.model`` replacement. The adapters' optimizer lives for one task and is not saved
(the runner checkpoints between experiences, and a new task starts a new one). Old outputs never
change: a frozen column and its adapters only read columns older than itself, and none of them
is trained again.

Hooks: ``before_train_dataset_adaptation`` (task labels required, none repeated);
``before_training_exp`` (a new task: the model, the previous task's column, is copied and frozen,
then re-initialised in place from the plugin's generator, its optimizer state dropped; the new
column's adapters are built); ``before_forward`` / ``after_forward`` (the frozen columns run
without gradient on the minibatch, then the lateral terms are hooked onto the model's layers for
the strategy's own forward); ``after_update`` (the adapters' step); ``before_eval_forward`` /
``after_eval_forward`` (the newest task: the model with its laterals; an older task: the model's
output is replaced by that frozen column's; a task never trained: the model as it is).

Hyper-parameters: ``adapter`` ("mlp": Eq. 2, default; "linear": Eq. 1), ``seed`` (>= 0,
default 0: the generator of the columns' re-initialisation and of the adapters' initialisation).
Growth (``cost_per_task``): each task's column (its parameters and buffers; frozen copies keep
their own task's head only) plus its adapters, float32 at 4 bytes per element.

Deviations: the first layer has no lateral connection (its input x is the same in every column);
s is ReLU in the adapters whatever the backbone's activation; alpha is one scalar per earlier
column and layer; each minibatch must hold one task label (``core.weight_override``); backbones
whose forward needs the task label (FEL) are not supported; a layer called twice in one forward
would get its lateral term twice (the supported backbones call each layer once).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier

from cl_plugins.core.checks import check_choice, check_int
from cl_plugins.core.lateral import reinit_
from cl_plugins.core.progressive import (ADAPTERS, ColumnAdapters, arm, column_inputs, disarm,
                                         lateral_layers)
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.snapshot import frozen_copy
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.core.weight_override import minibatch_task, optimizer_like, tensor_cost

SETTINGS = ("adapter", "seed")


def _cpu(module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _own_head_only(column, task: int):
    """Drop the other tasks' heads from a frozen column (a multi-head head), in place."""
    if isinstance(column.head, MultiHeadClassifier):
        for key in [k for k in column.head.classifiers if k != str(task)]:
            del column.head.classifiers[key]
            if hasattr(column.head, f"active_units_T{key}"):
                delattr(column.head, f"active_units_T{key}")  # its per-task buffer
    return column


class PNNPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "pnn"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    SWEEP: dict = {}
    PAPER = "Progressive Neural Networks (Rusu et al., arXiv 2016)"
    SUMMARY = ("a column per task, earlier columns frozen; each layer of the new column reads "
               "the earlier columns' activations through lateral adapters")

    def __init__(self, adapter: str = "mlp", seed: int = 0):
        super().__init__()
        self.adapter = check_choice("adapter", adapter, ADAPTERS)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(seed)
        self.tasks: List[int] = []  # column order; the last one is the model itself
        self.frozen: list = []  # frozen columns of tasks[:-1]
        self.adapters: List[Optional[ColumnAdapters]] = []  # per column (None for the first)
        self.own_optimizer = None
        self._model = None
        self._pending: Optional[dict] = None  # a loaded state, applied to the next model seen
        self._handles: list = []
        self._cache: Optional[dict] = None

    # ------------------------------------------------------------------------ columns
    def _bind(self, model) -> None:
        if model is self._model:
            return
        lateral_layers(model)  # the check: a ClassifierNet with Linear / Conv layers
        self._model = model
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._materialise(model, state)

    def _materialise(self, model, state: dict) -> None:
        """Frozen columns and adapters rebuilt on ``model``'s architecture from a state."""
        self.frozen, self.adapters = [], []
        for task, saved in zip(self.tasks[:-1], state["frozen"]):
            column = _own_head_only(frozen_copy(model), task)
            missing, unexpected = column.load_state_dict(saved, strict=False)
            if unexpected or any(not k.startswith("head.") for k in missing):
                raise ValueError(f"{type(self).__name__}: the model does not match the saved "
                                 f"column of task {task} (missing {missing}, unexpected "
                                 f"{unexpected}); adapt it to the experiences trained first")
            self.frozen.append(column)
        for k, saved in enumerate(state["adapters"]):
            ad = None if saved is None else self._new_adapters(model, k, self.tasks[k])
            if ad is not None:
                ad.load_state_dict(saved)
            self.adapters.append(ad)

    def _new_adapters(self, model, n_prev: int, task: int) -> ColumnAdapters:
        with torch.random.fork_rng(devices=[]):  # placeholders: reinit_ or a state follows
            ad = ColumnAdapters(model, n_prev, task, self.adapter)
        return ad.to(next(model.parameters()).device)

    # ------------------------------------------------------------------------ hooks
    def before_train_dataset_adaptation(self, strategy, **kwargs):
        require_task_labels(type(self).__name__, strategy.experience, self.tasks)

    def before_training_exp(self, strategy, **kwargs):
        model = strategy.model
        self._bind(model)
        task = sorted({int(t) for t in strategy.experience.task_labels})[0]
        self._cache = None
        if self.tasks and task != self.tasks[-1]:  # a new column: freeze the model's copy
            self.frozen.append(_own_head_only(frozen_copy(model), self.tasks[-1]))
            reinit_(model, self.generator)
            for p in model.parameters():
                strategy.optimizer.state.pop(p, None)  # a fresh column starts without momentum
        if not self.tasks or task != self.tasks[-1]:
            self.tasks.append(task)
            ad = None
            if self.frozen:
                ad = self._new_adapters(model, len(self.frozen), task)
                reinit_(ad, self.generator)
            self.adapters.append(ad)
        ad = self.adapters[-1]
        self.own_optimizer = None if ad is None else \
            optimizer_like(strategy.optimizer, ad.parameters())

    def _arm_live(self, strategy) -> None:
        disarm(self._handles)
        prev = column_inputs(self.frozen, self.adapters, strategy.mb_x)
        self._handles = arm(strategy.model, self.adapters[-1], prev)

    def before_forward(self, strategy, **kwargs):
        minibatch_task(strategy, type(self).__name__)
        self._arm_live(strategy)

    def after_forward(self, strategy, **kwargs):
        disarm(self._handles)

    def after_update(self, strategy, **kwargs):
        self._cache = None
        if self.own_optimizer is not None:
            self.own_optimizer.step()
            self.own_optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def before_eval_forward(self, strategy, **kwargs):
        self._bind(strategy.model)
        task = minibatch_task(strategy, type(self).__name__)
        if not self.tasks or task not in self.tasks:
            return  # never trained: the model as it is
        if task == self.tasks[-1]:
            self._arm_live(strategy)
            return
        out = self.column_output(strategy.mb_x, task)
        self._handles = [strategy.model.register_forward_hook(lambda m, a, o: out)]

    def after_eval_forward(self, strategy, **kwargs):
        disarm(self._handles)

    @torch.no_grad()
    def column_output(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """The logits of a frozen column (task ``task``, not the newest) on ``x``."""
        k = self.tasks.index(task)
        prev = column_inputs(self.frozen[:k], self.adapters[:k], x)
        column = self.frozen[k]
        handles = arm(column, self.adapters[k], prev)
        try:
            return column(x, torch.full((x.shape[0],), task, dtype=torch.long, device=x.device))
        finally:
            disarm(handles)

    # ------------------------------------------------------------------------ growth, state
    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        """Each task's column (parameters and buffers) and its adapters (module docstring)."""
        out = {}
        for k, task in enumerate(self.tasks):
            if k < len(self.frozen):
                column = self.frozen[k]
            elif self._model is not None:  # the model, counted as its frozen copy will be
                column = _own_head_only(frozen_copy(self._model), task)
            else:  # a loaded state not yet rebuilt on a model
                continue
            ad = [] if self.adapters[k] is None else list(self.adapters[k].state_dict().values())
            out[task] = tensor_cost(list(column.state_dict().values()) + ad)
        return out

    def state_dict(self) -> dict:
        """Plain data; unchanged objects between updates (a cached copy)."""
        if self._pending is not None:
            return {**settings_of(self, SETTINGS), "tasks": list(self.tasks), **self._pending}
        if self._cache is None:
            self._cache = {
                **settings_of(self, SETTINGS), "tasks": list(self.tasks),
                "generator": self.generator.get_state(),
                "frozen": [_cpu(c) for c in self.frozen],
                "adapters": [None if a is None else _cpu(a) for a in self.adapters]}
        return dict(self._cache)

    def load_state_dict(self, state: dict) -> None:
        """The frozen columns and adapters are rebuilt on the next model the plugin sees, which
        must have the heads of the tasks trained (the runner's restore adapts it)."""
        check_settings(self, state, SETTINGS)
        self.tasks = [int(t) for t in state["tasks"]]
        self.generator.set_state(state["generator"])
        self.frozen, self.adapters, self._model, self.own_optimizer = [], [], None, None
        self._cache = None
        self._pending = {k: state[k] for k in ("generator", "frozen", "adapters")}
