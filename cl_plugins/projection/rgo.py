"""Recursive Gradient Optimization (RGO).

Name: ``rgo``. Scenarios: task-, domain- and class-IL. Task labels: not needed by the plugin (the
reference networks' Feature Encoding Layer, part of the model, :mod:`cl_plugins.models.fel`, does).

Paper: H. Liu, H. Liu, "Continual Learning with Recursive Gradient Optimization", ICLR 2022
(arXiv 2201.12522). "The release": commit b5b1123 of github.com/mushfiqur11/OnlineContiualLearning,
TensorFlow code that looks like the authors' (unverified). More: ``docs/methods/rgo.md``.

Idea: precondition each step by P = dim(H) / trace(H^-1) H^-1 (H: the old tasks' Hessians), per
protected tensor, updated by recursive least squares (RLS). Equations (float64 P of size d; a
weight is ``[out, d]``, Conv2d ``weight.view(out, -1)``, a bias one row ``[1, out]``, d = out):

- Eq. step (``before_update``; P = I at first: task 1 is exactly the base optimizer):
  g <- (d / trace P) g.view(rows, d) P  (``core.step_operators.preconditioner_step``);
- Eq. RLS (``after_training_exp``, ``rls_batches`` random mini-batches of ``rls_batch_size``
  training samples, eval transforms and mode, the task's label): each vector g does
  k = P g, P <- P - k k^T / (alpha + g^T k), hence P = alpha (alpha I + G G^T)^-1
  (``core.step_operators.rls_update``; a block of vectors: the identical Woodbury form);
- ``vector="code"`` (the release's): with p = softmax of the logits z over ``rls_softmax``'s
  support and w_i = sqrt(p_iy (1 - p_iy)) (a constant), the gradient of sum_i w_i z_{i, y_i}
  over the mini-batch, a weight's averaged over its output rows (-> R^d): one vector per batch;
- ``vector="paper"``: the paper's g = sqrt(l'') dh_L/dh_l per sample (l'' = p_y (1 - p_y),
  h_L = z_y), reduced the same way: the code's vector of one-sample batches.

Hooks: ``before_training_exp`` finds the protected tensors (weights and biases of the shared
``nn.Linear``/``nn.Conv2d``, a shared head included, task heads not; other trainable modules
raise ``UnsupportedLayerError``, a ``ValueError``, and so do normalisation layers with trainable
parameters or running statistics unless ``norms="sgd"``), checks them against the stored P, warns
unless the optimizer is plain SGD and builds the step operators (records cleared each iteration).

Hyper-parameters: ``alpha`` (> 0, default 0.01, the release's; the paper: 1; smaller is closer to
a hard projection; split_digits needs ~1e-4); ``vector`` (``"code"`` | ``"paper"``);
``rls_softmax`` (``"output"``, default: the whole output or task head; ``"batch"``, the
release's: the classes in the mini-batch); ``rls_batches`` (int >= 1 or None = one whole pass;
default 1000, the release's on MNIST; 50 on CIFAR-100); ``rls_batch_size`` (default 10, the
release's); ``norms`` (``"error"`` | ``"sgd"``); ``seed`` (the RLS batches' generator).

Deviations from the paper / release (why: ``docs/methods/rgo.md``): any base optimizer runs, all
but plain SGD warn; RLS mini-batches are drawn at random with the plugin's generator (the release
reads on in its shuffled training iterator); ``rls_softmax="output"`` by default (the release's:
``"batch"``); biases get their own out x out P (as the release; the paper only discusses
weights); the RLS pass is not gathered across distributed ranks.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_plugins.core.checks import check_choice, check_int, check_positive
from cl_plugins.core.layer_inputs import (NORM_TYPES, UnsupportedLayerError, call_model,
                                          iterate_batches, protected_layers)
from cl_plugins.core.params import task_specific_prefixes
from cl_plugins.core.per_sample import per_sample_gradients
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.step_operators import (FactoredStep, preconditioner_step, rls_update,
                                            warn_unless_plain_sgd)

VECTOR_RULES, SOFTMAX_SUPPORTS = ("code", "paper"), ("output", "batch")
NORM_MODES = ("error", "sgd")
SETTINGS = ("alpha", "vector", "rls_batches", "rls_batch_size", "rls_softmax", "norms", "seed")
SGD_WARNING = ("rgo: RGO's guarantee (and every RGO protocol) assumes plain SGD with a constant "
               "learning rate; the preconditioned gradient goes through {problems}, which "
               "changes the step that old tasks see.")


def protected_tensors(model: nn.Module, norms: str = "error") -> Dict[str, tuple]:
    """``{name: (tensor, its layer)}``: the trainable weights and biases of protected layers."""
    layers, norm_layers = protected_layers(model, "rgo")
    if norms == "error":
        for name, mod in norm_layers.items():  # the first one
            raise UnsupportedLayerError(
                f"rgo: normalisation layer {name!r} ({type(mod).__name__}) has trainable "
                "parameters; RGO preconditions Linear/Conv2d tensors only (the reference networks "
                "have no normalisation: use e.g. model.name=resnet18_nobn), or pass norms='sgd' "
                "to train them unpreconditioned")
        for name, mod in model.named_modules():
            if (isinstance(mod, NORM_TYPES) and getattr(mod, "track_running_stats", False)
                    and not name.startswith(tuple(task_specific_prefixes(model)))):
                raise UnsupportedLayerError(
                    f"rgo: normalisation layer {name!r} ({type(mod).__name__}) tracks running "
                    "statistics: later tasks' training forwards update them, which changes old "
                    "tasks' outputs (RGO only protects Linear/Conv2d tensors); use "
                    "track_running_stats=False or no normalisation, or pass norms='sgd' to "
                    "accept the drift")
    return {f"{path}.{pname}" if path else pname: (getattr(mod, pname), mod)
            for path, mod in layers.items() for pname in ("weight", "bias")
            if getattr(mod, pname, None) is not None and getattr(mod, pname).requires_grad}


def curvature_vectors(model: nn.Module, tensors: dict, x: torch.Tensor, y: torch.Tensor, task,
                      vector: str = "code", softmax: str = "output") -> Dict[str, torch.Tensor]:
    """``{name: [m, d]}`` float64 RLS vectors of one mini-batch (m = 1 for ``"code"``, the batch
    size for ``"paper"``); the model must be in eval mode."""
    y = y.long()

    def weight(logits, target):  # sqrt(p_y (1 - p_y)), p = softmax over its support
        z = logits.detach()
        if softmax == "batch":  # only the classes with a sample in the mini-batch
            z = z.masked_fill(torch.bincount(y, minlength=z.shape[1]) == 0, float("-inf"))
        p_y = F.softmax(z, dim=1).gather(1, target[:, None]).squeeze(1)
        return (p_y * (1.0 - p_y)).sqrt()

    params = {n: p for n, (p, _) in tensors.items()}
    with torch.enable_grad():
        if vector == "code":
            logits = call_model(model, x, task)
            z_y = logits.gather(1, y[:, None]).squeeze(1)
            w = weight(logits.double(), y).to(logits.dtype)
            grads = torch.autograd.grad((w * z_y).sum(), list(params.values()), allow_unused=True)
            # weight [out, d] -> mean over output units (R^d); bias -> R^out as is
            return {n: (g.double().reshape(p.shape[0], -1).mean(0) if p.dim() > 1
                        else g.double().reshape(-1))[None]
                    for (n, p), g in zip(params.items(), grads) if g is not None}

        def sample_objective(logits, target):
            return (weight(logits, target) * logits.gather(1, target[:, None]).squeeze(1)).sum()

        grads = per_sample_gradients(model, params, x, y, sample_objective, task_label=task)
    return {n: g.double().reshape(len(x), params[n].shape[0], -1).mean(1)
            if params[n].dim() > 1 else g.double().reshape(len(x), -1) for n, g in grads.items()}


class RGOPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "rgo"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP = {"alpha": {"distribution": "log_uniform_values", "min": 1e-4, "max": 10.0},
             "rls_batches": {"values": [50, 200, 1000]}}
    PAPER = "Liu & Liu, Continual Learning with Recursive Gradient Optimization, ICLR 2022"
    SUMMARY = ("per-tensor fan-in preconditioner P = alpha (alpha I + G G^T)^-1 of old tasks' "
               "curvature vectors, updated by recursive least squares; step g P d/tr(P)")

    def __init__(self, alpha: float = 0.01, vector: str = "code",
                 rls_batches: Optional[int] = 1000, rls_batch_size: int = 10,
                 rls_softmax: str = "output", norms: str = "error", seed: int = 0):
        super().__init__()
        self.alpha = float(check_positive("alpha", alpha))
        self.vector = check_choice("vector", vector, VECTOR_RULES)
        self.rls_batches = rls_batches if rls_batches is None else \
            check_int("rls_batches", rls_batches, 1)
        self.rls_batch_size = check_int("rls_batch_size", rls_batch_size, 1)
        self.rls_softmax = check_choice("rls_softmax", rls_softmax, SOFTMAX_SUPPORTS)
        self.norms = check_choice("norms", norms, NORM_MODES)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(seed)
        self.P: Dict[str, Optional[torch.Tensor]] = {}  # tensor name -> d x d float64 (None = I)
        self.n_vectors: Dict[str, int] = {}  # RLS vectors absorbed per tensor
        self.n_experiences = 0
        self._tensors: dict = {}  # protected_tensors(model)
        self._ops: list = []  # (tensor, step operator) of each tensor with P != I
        self._model = None  # the model the step operators were built for
        self._warned = False

    def _attach(self, model: nn.Module) -> None:
        self._detach()
        tensors = protected_tensors(model, self.norms)
        if not self.P:
            self.P, self.n_vectors = {n: None for n in tensors}, {n: 0 for n in tensors}
        elif set(tensors) != set(self.P):
            missing, extra = sorted(set(self.P) - set(tensors)), sorted(set(tensors) - set(self.P))
            raise ValueError(f"rgo: the model's protected tensors changed since the stored "
                             f"matrices were built: missing {missing[:5]}, new {extra[:5]}")
        for n, (p, _) in tensors.items():  # d: [out, d] for a weight, [1, out] for a bias
            d = p[0].numel() if p.dim() > 1 else p.numel()
            if self.P[n] is not None and self.P[n].shape[0] != d:
                raise ValueError(f"rgo: tensor {n!r} has fan-in {d} but its stored P is "
                                 f"{tuple(self.P[n].shape)}")
        self._tensors, self._model = tensors, model
        for n, (p, mod) in tensors.items():
            if self.P[n] is None:  # identity: the step is exactly the base optimizer's
                continue
            self.P[n] = self.P[n].to(p.device)
            op = preconditioner_step(self.P[n], self.n_vectors[n], p.dtype)
            if (p.dim() > 1 and isinstance(mod, nn.Linear) and p.device.type == "cpu"
                    and p.shape[0] > 16):  # the factored step pays for wide layers
                op = FactoredStep(op, mod)
            self._ops.append((p, op))

    def _detach(self) -> None:
        for _, op in self._ops:
            op.detach()
        self._ops = []

    def before_training_exp(self, strategy, **kwargs):
        self._warned = self._warned or warn_unless_plain_sgd(strategy.optimizer, SGD_WARNING)
        self._attach(strategy.model)

    def before_training_iteration(self, strategy, **kwargs):
        for _, op in self._ops:
            op.clear()

    @torch.no_grad()
    def before_update(self, strategy, **kwargs):
        if strategy.model is not self._model:
            self._attach(strategy.model)
        for p, op in self._ops:  # Eq. step
            op.step_(p.grad)

    def after_training_exp(self, strategy, **kwargs):
        if strategy.model is not self._model:
            self._attach(strategy.model)
        self._detach()  # no input recording during the RLS pass
        task = int(strategy.experience.task_labels[0])
        self.update_matrices(strategy.model, strategy.experience.dataset, task, strategy.device)
        self.n_experiences += 1
        self._model = None  # step operators rebuilt from the new P at the next experience

    def update_matrices(self, model: nn.Module, dataset, task: int, device) -> None:
        """The RLS pass of one task: ``rls_batches`` random mini-batches of ``dataset``."""
        if not self._tensors:
            self._attach(model)
        was_training = model.training
        model.eval()
        try:
            for x, y, _ in iterate_batches(dataset, self.rls_batch_size, device,
                                           generator=self.generator,
                                           max_batches=self.rls_batches, shuffle=True):
                for n, V in curvature_vectors(model, self._tensors, x, y, task, self.vector,
                                              self.rls_softmax).items():
                    if self.P[n] is None:
                        self.P[n] = torch.eye(V.shape[1], dtype=torch.float64, device=V.device)
                    rls_update(self.P[n], V, self.alpha)  # Eq. RLS
                    self.n_vectors[n] += V.shape[0]
        finally:
            model.train(was_training)

    def state_dict(self) -> dict:
        return {**settings_of(self, SETTINGS), "method": self.METHOD_NAME,
                "generator": self.generator.get_state(), "tasks_done": self.n_experiences,
                "n_vectors": dict(self.n_vectors), "P": {
                    n: None if P is None else P.detach().cpu().clone() for n, P in self.P.items()}}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict):  # states saved before rls_softmax existed used "output"
            state = {"rls_softmax": "output", **state}
        check_settings(self, state, SETTINGS)
        self.generator.set_state(state["generator"])
        self.n_experiences = int(state["tasks_done"])
        self.n_vectors = dict(state["n_vectors"])
        self.P = {n: None if P is None else P.clone().to(torch.float64)
                  for n, P in state["P"].items()}
        self._detach()
        self._tensors, self._model = {}, None  # rebuilt at the next experience
