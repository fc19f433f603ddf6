"""Task-conditioned hypernetwork: each task's weights generated from a learned task embedding.

Name: ``hypernet``. Scenarios: task-IL only (CL1: the task label picks the embedding). Task
labels: needed.

Paper: J. von Oswald, C. Henning, B. F. Grewe, J. Sacramento, "Continual learning with
hypernetworks", ICLR 2020 (arXiv 1906.00695). Official code chrhenning/hypercl (read: the
classifier hypernetwork of mnist/train_splitMNIST.py, the defaults of mnist/train_args_default.py,
mnist/chunked_hyper_model.py, utils/hnet_regularizer.py, utils/optim_step.py). Facts, anchors and
measurements: docs/methods/hypernet.md.

A chunked hypernetwork f_h (``core.hypernetwork.ChunkedHypernet``) maps the embedding e_t of task
t to *all* the target network's parameters, as in the paper: every parameter of
``model.backbone`` (weights and biases) and the parameters of task t's head (its own head of a
multi-head head; the whole head otherwise): Theta^(t) = f_h(e_t, Theta_h). The user's model is
not changed: ``core.weight_override`` writes Theta^(t) into it (``ParamWeights``, by parameter
name) before each forward and sends dL/dTheta^(t) into f_h and e_t after the backward; the
model's own parameters are never trained. The loss of a step of task T (Eq. 2):

    L = L_task(Theta^(T))
        + beta / (T-1) sum_{t<T} ||f_h(e_t, Theta_h*) - f_h(e_t, Theta_h + dTheta_h)||^2

f_h(e_t, Theta_h*): the targets, the earlier tasks' weights generated when task T starts (the
hypernetwork before task T), stored; dTheta_h: the lookahead, the step Adam would take on L_task
alone, a constant (the code's default: no_lookahead, use_sgd_change and backprop_dt all off); the
embeddings of earlier tasks are fixed.

Hooks: ``before_train_dataset_adaptation`` (task labels, none repeated); ``before_training_exp``
(f_h built on the first task and initialised from the plugin's generator, a new embedding
N(0, 1), the targets, a new optimizer); ``after_backward`` (the regulariser, Eq. 2, added to the
gradients after L_task's); the rest is ``WeightOverridePlugin``'s. A task never trained is
evaluated with the model's own (untrained) parameters.

Optimizer: the plugin's own Adam, betas (0.9, 0.999), over Theta_h (chunk embeddings included)
and e_T at ``lr``, a new one per task, as the code; the strategy's optimizer is not used.

Hyper-parameters (defaults: the paper's SplitMNIST CL1 classifier hypernetwork, from the code's
defaults): ``beta`` 0.01, ``task_emb_dim`` 96, ``chunk_emb_dim`` 96, ``chunk_size`` 42000,
``hnet_hidden`` [10, 10], ``activation`` "relu", ``lr`` 0.001, ``lookahead`` True, ``seed`` 0.
PermutedMNIST-10: 0.1, 24, 8, 78000, [25, 25], "elu", 1e-4 (the protocol config).

Growth (``cost_per_task``): a task's embedding, and its stored target (every generated weight)
while a later task trains; f_h itself is shared, of fixed size; float32, 4 bytes per element.

Deviations: task t generates only its own head (the code generates one output layer for all
tasks and reads the task's slice; the other slices are never used for t), so every task's head
must have one shape; buffers (batch-norm statistics) are not generated; the regulariser covers
every earlier task (the code's default); task inference (CL2/CL3: HNET+ENT, +TIR, +R) is not
implemented; the training length is the runner's (the code: 2000 / 5000 iterations).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from avalanche.models import MultiHeadClassifier

from cl_plugins.core.checks import check_bool, check_choice, check_int, check_non_negative, \
    check_positive
from cl_plugins.core.hypernetwork import (ACTIVATIONS, ChunkedHypernet, adam_lookahead,
                                          output_regulariser)
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.core.weight_override import ParamWeights, WeightOverridePlugin, tensor_cost

SETTINGS = ("beta", "task_emb_dim", "chunk_emb_dim", "chunk_size", "hnet_hidden", "activation",
            "lr", "lookahead", "seed")
TASK = "{t}"  # a slot name's place for the task label (per-task head parameters)


def target_slots(model, task: int) -> List[tuple]:
    """[(name, shape)] of what f_h generates: the backbone's parameters, then task ``task``'s
    head (a multi-head head's classifier for the task, written with ``TASK`` for its label)."""
    if not hasattr(model, "backbone") or not hasattr(model, "head"):
        raise ValueError(f"hypernet needs a ClassifierNet (backbone + head); got "
                         f"{type(model).__name__}")
    slots = [(n, tuple(p.shape)) for n, p in model.backbone.named_parameters(prefix="backbone")]
    own = f"head.classifiers.{task}." if isinstance(model.head, MultiHeadClassifier) else "head."
    return slots + [(own.replace(f".{task}.", f".{TASK}.") + n[len(own):], tuple(p.shape))
                    for n, p in model.named_parameters() if n.startswith(own)]


class HypernetPlugin(WeightOverridePlugin, supports_distributed=True):
    METHOD_NAME = "hypernet"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    SWEEP: dict = {"beta": {"distribution": "log_uniform_values", "min": 1e-3, "max": 10.0}}
    PAPER = "Continual learning with hypernetworks (von Oswald et al., ICLR 2020)"
    SUMMARY = ("a chunked hypernetwork generates each task's weights from a task embedding; an "
               "output regulariser keeps the earlier embeddings' generated weights")

    def __init__(self, beta: float = 0.01, task_emb_dim: int = 96, chunk_emb_dim: int = 96,
                 chunk_size: int = 42000, hnet_hidden: Sequence[int] = (10, 10),
                 activation: str = "relu", lr: float = 0.001, lookahead: bool = True,
                 seed: int = 0):
        super().__init__()
        self.beta = float(check_non_negative("beta", beta))
        self.task_emb_dim = check_int("task_emb_dim", task_emb_dim, 1)
        self.chunk_emb_dim = check_int("chunk_emb_dim", chunk_emb_dim, 1)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)
        if isinstance(hnet_hidden, (str, bytes)) or not isinstance(hnet_hidden, Sequence):
            raise ValueError(f"hnet_hidden must be a list of layer widths; got {hnet_hidden!r}")
        self.hnet_hidden = [check_int(f"hnet_hidden[{i}]", h, 1)
                            for i, h in enumerate(hnet_hidden)]
        self.activation = check_choice("activation", activation, sorted(ACTIVATIONS))
        self.lr = float(check_positive("lr", lr))
        self.lookahead = check_bool("lookahead", lookahead)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(seed)
        self.hnet: Optional[ChunkedHypernet] = None
        self.slots: Optional[List[tuple]] = None
        self.tasks: List[int] = []
        self.embeddings: Dict[int, torch.nn.Parameter] = {}
        self.stored: Dict[int, torch.Tensor] = {}  # targets f_h(e_t, Theta_h*), t < current
        self._cache: Optional[dict] = None

    # ------------------------------------------------------------------------ the weights
    def _build(self, slots) -> None:
        self.slots = [(n, tuple(s)) for n, s in slots]
        n_out = sum(math.prod(s) for _, s in self.slots)
        self.hnet = ChunkedHypernet(n_out, self.chunk_size, self.task_emb_dim, self.chunk_emb_dim,
                                    self.hnet_hidden, self.activation)

    def _to(self, device) -> None:
        if self.hnet is not None and self.hnet.chunk_emb.device != device:
            self.hnet.to(device)
            for e in self.embeddings.values():
                e.data = e.data.to(device)
            self.stored = {t: v.to(device) for t, v in self.stored.items()}

    def targets(self, model):
        return ParamWeights(model)  # every generated parameter is saved when first written

    def generate(self, task: int) -> Dict[str, torch.Tensor]:
        """{parameter name: Theta^(task)} (autograd through f_h and e_task when enabled)."""
        flat, out, i = self.hnet(self.embeddings[task]), {}, 0
        for name, shape in self.slots:
            n = math.prod(shape)
            out[name.replace(TASK, str(task))] = flat[i:i + n].view(shape)
            i += n
        return out

    def effective_weights(self, task: int, train: bool) -> Dict[str, torch.Tensor]:
        if task not in self.embeddings:
            return {}  # never trained: the model's own parameters
        self._to(next(self._model.parameters()).device)
        return self.generate(task)

    def own_parameters(self, task: int) -> list:
        return self.hnet.theta() + [self.embeddings[task]]

    def make_optimizer(self, strategy, params):
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999))

    # ------------------------------------------------------------------------ hooks
    def before_train_dataset_adaptation(self, strategy, **kwargs):
        require_task_labels(type(self).__name__, strategy.experience, self.tasks)

    def begin_task(self, strategy, task: int) -> None:
        self._cache = None
        slots = target_slots(strategy.model, task)
        if self.hnet is None:
            self._build(slots)
            self.hnet.init_(self.generator)
        elif [(n, tuple(s)) for n, s in slots] != self.slots:
            raise ValueError(f"{type(self).__name__}: task {task}'s parameters {slots} differ "
                             f"from the generated ones {self.slots} (every task's head must "
                             "have one shape)")
        if task not in self.embeddings:
            with torch.no_grad():  # the targets: Theta_h* = f_h before this task trains
                self.stored = {t: self.hnet(self.embeddings[t]).detach() for t in self.tasks}
            self.embeddings[task] = torch.nn.Parameter(
                torch.randn(self.task_emb_dim, generator=self.generator))
            self.tasks.append(task)
        self._to(next(strategy.model.parameters()).device)

    def after_backward(self, strategy, **kwargs):
        super().after_backward(strategy, **kwargs)  # L_task's gradients into Theta_h and e_T
        if self.beta > 0 and self.stored:
            params = dict(self.hnet.named_parameters())
            delta = adam_lookahead(self.own_optimizer, params) if self.lookahead else None
            embs = torch.stack([self.embeddings[t].detach() for t in self.stored])
            targets = torch.stack(list(self.stored.values()))
            (self.beta * output_regulariser(self.hnet, embs, targets, delta)).backward()  # Eq. 2

    def after_update(self, strategy, **kwargs):
        self._cache = None
        super().after_update(strategy, **kwargs)

    # ------------------------------------------------------------------------ growth, state
    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        """Each task's embedding and, while a later task trains, its stored target."""
        return {t: tensor_cost([self.embeddings[t]] + ([self.stored[t]] if t in self.stored
                                                         else [])) for t in self.tasks}

    def state_dict(self) -> dict:
        """Plain data; the same objects until the plugin changes (a cached copy)."""
        if self._cache is None:
            cpu = lambda v: v.detach().cpu().clone()  # noqa: E731
            self._cache = {
                **settings_of(self, SETTINGS), "tasks": list(self.tasks),
                "generator": self.generator.get_state(),
                "slots": None if self.slots is None else [[n, list(s)] for n, s in self.slots],
                "hnet": None if self.hnet is None else
                {k: cpu(v) for k, v in self.hnet.state_dict().items()},
                "embeddings": [cpu(self.embeddings[t]) for t in self.tasks],
                "stored_tasks": list(self.stored),
                "stored": [cpu(v) for v in self.stored.values()],
                **self.override_state()}
        return dict(self._cache)

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, SETTINGS)
        self.load_override_state(state)
        self.generator.set_state(state["generator"])
        self.tasks = [int(t) for t in state["tasks"]]
        self.hnet, self.slots = None, None
        if state["slots"] is not None:
            self._build(state["slots"])
            self.hnet.load_state_dict(state["hnet"])
        self.embeddings = {t: torch.nn.Parameter(e.clone())
                           for t, e in zip(self.tasks, state["embeddings"])}
        self.stored = {int(t): v.clone() for t, v in zip(state["stored_tasks"], state["stored"])}
        self._cache = dict(state)  # unchanged until the plugin trains
