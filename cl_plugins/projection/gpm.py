"""Gradient Projection Memory (GPM).

Name ``gpm``; task-, domain- and class-IL; task labels not needed (a multi-head model uses them
to pick its head). Paper: G. Saha, I. Garg, K. Roy, "Gradient Projection Memory for Continual
Learning", ICLR 2021; official code github.com/sahagobinda/GPM (read for facts, nothing copied).
Protocols, numerics and cost: ``docs/methods/gpm.md``.

A protected layer l is a shared Linear/Conv2d with trainable weights (not a task head; a shared
head is protected, as in GPM's Permuted MNIST code), a matrix ``[out, d]`` acting on fan-in
inputs (conv: unfolded patches; :mod:`cl_plugins.core.layer_inputs`). Other modules with
trainable parameters raise ``UnsupportedLayerError`` at the first experience.

Memory update after task t (``after_training_exp``; :func:`~cl_plugins.core.subspace.
extend_basis`), eps_l = ``min(1, threshold_l + t * threshold_increment)``:
1. ``R = [x_1 .. x_n]`` ``[d, n]``: the layer's inputs for ``n_samples`` random examples of the
   task, one batch, eval mode, no grad (conv: all patches of the first ``layer_samples[l]``).
2. First task (eq. 4-5): ``R = U S V^T``, ``M_l = U[:, :k]``, k the smallest with
   ``sum_{i<=k} s_i^2 >= eps_l ||R||_F^2``.
3. Later tasks (eq. 6-9): ``R_hat = R - M M^T R = U_hat S_hat V_hat^T``; append the smallest
   r >= 0 columns of ``U_hat`` with ``||M^T R||_F^2 + sum_{i<=r} s_hat_i^2 >= eps_l ||R||_F^2``.

Training task t >= 2 (``before_update``): ``G_l <- G_l - G_l M_l M_l^T`` (eq. 10) for every
protected weight, then the base optimizer (plain SGD in every GPM protocol) steps.

Hooks: ``before_training_exp`` (layers, projectors, tensors to freeze, capture hooks),
``before/after_training_iteration`` (capture window), ``before_update`` (projection, zeroed
gradients of frozen tensors), ``after_update`` (frozen tensors restored), ``after_training_exp``
(memory update).

Hyper-parameters (defaults: the 10-split CIFAR-100 protocol):
- ``threshold`` (0.97): eps_l in (0, 1], or one per protected layer in module order;
- ``threshold_increment`` (>= 0, 0.003; Permuted MNIST 0);
- ``n_samples`` (125): examples for R, drawn without replacement by this plugin's generator;
- ``layer_samples`` (None = all): per layer, how many of them enter R (AlexNet: conv1 24);
- ``bias`` (``"freeze"``: trained on task 1 only, like the code's zeroed 1-D gradients;
  ``"append"``: a constant-1 input column, projected with the weight; ``"free"``: untouched);
- ``freeze_norms_after_first`` (True): normalisation layers' affine parameters train on task 1
  only (never projected); running statistics are not touched;
- ``task1_rank`` (``"paper"``: eq. 5's k; ``"code"``: one fewer, the code's count of the k whose
  cumulative energy ratio is < eps);
- ``input_side`` (True): a Linear gradient's projection from the step's inputs,
  :mod:`cl_plugins.core.input_side`, when cheaper (same matrix up to rounding);
- ``seed`` (0): the generator of R's samples, saved in ``state_dict()``.

Deviations: the task-1 rank rule defaults to the paper's; biases and normalisation parameters
are frozen exactly (zeroed gradient and restored value, so momentum or weight decay cannot move
them); with momentum, weight decay or Adam the weights' step leaves span(M)'s complement (warned
once); R uses eval transforms (no augmentation); float64 memory with a rank tolerance and
re-orthogonalisation; ResNet patches from the generic unfold; no scaled variants; the sample
for R is not gathered across ranks.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_plugins.core.checks import check_bool, check_choice, check_int, check_range
from cl_plugins.core.input_side import InputSideGradientProjector, StepCaptureHooks, plain_sgd
from cl_plugins.core.layer_inputs import (call_model, input_rows, iterate_batches,
                                          protected_layers, record_inputs)
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_settings, owned_by, settings_of
from cl_plugins.core.subspace import FanInProjector, extend_basis

BIAS_MODES = ("freeze", "append", "free")
RANK_RULES = ("paper", "code")
SETTINGS = ("threshold", "threshold_increment", "n_samples", "layer_samples", "bias",
            "freeze_norms_after_first", "task1_rank", "seed")


class GPMPlugin(StepCaptureHooks, SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "gpm"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP = {"threshold": {"distribution": "uniform", "min": 0.9, "max": 0.999},
             "threshold_increment": {"values": [0.0, 0.001, 0.003]},
             "n_samples": {"values": [64, 125, 300]}}
    PAPER = "Saha, Garg & Roy, Gradient Projection Memory for Continual Learning, ICLR 2021"
    SUMMARY = ("SVD bases of old tasks' layer inputs; gradients projected out of their span "
               "(then plain SGD)")

    def __init__(self, threshold: Union[float, Sequence[float]] = 0.97,
                 threshold_increment: float = 0.003, n_samples: int = 125,
                 layer_samples: Optional[Sequence[int]] = None, bias: str = "freeze",
                 freeze_norms_after_first: bool = True, task1_rank: str = "paper",
                 input_side: bool = True, seed: int = 0):
        super().__init__()
        if isinstance(threshold, (list, tuple)):
            if not threshold:
                raise ValueError("threshold must be a number in (0, 1] or a non-empty list of "
                                 "them (one per protected layer); got []")
            for i, th in enumerate(threshold):
                check_range(f"threshold[{i}]", th, 0.0, 1.0, low_inclusive=False)
            self.threshold = [float(th) for th in threshold]
        else:
            check_range("threshold", threshold, 0.0, 1.0, low_inclusive=False)
            self.threshold = float(threshold)
        self.threshold_increment = float(check_range("threshold_increment", threshold_increment,
                                                     0.0))
        self.n_samples = check_int("n_samples", n_samples, 1)
        if layer_samples is not None:
            if not isinstance(layer_samples, (list, tuple)) or not layer_samples:
                raise ValueError("layer_samples must be None or a non-empty list of integers "
                                 f">= 1 (one per protected layer); got {layer_samples!r}")
            for i, n in enumerate(layer_samples):
                check_int(f"layer_samples[{i}]", n, 1, n_samples)
            layer_samples = [int(n) for n in layer_samples]
        self.layer_samples = layer_samples
        self.bias = check_choice("bias", bias, BIAS_MODES)
        self.freeze_norms_after_first = check_bool("freeze_norms_after_first",
                                                   freeze_norms_after_first)
        self.task1_rank = check_choice("task1_rank", task1_rank, RANK_RULES)
        self.input_side = check_bool("input_side", input_side)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(self.seed)

        self.bases: Dict[str, torch.Tensor] = {}  # layer path -> M [d, k], float64, CPU
        self.n_experiences = 0  # experiences finished (memory updates done)
        self.history: List[Dict[str, int]] = []  # ranks after each update (inspection)
        self._projectors: Dict[str, FanInProjector] = {}
        self._layers: Dict[str, nn.Module] = {}
        self._frozen: List[torch.Tensor] = []
        self._frozen_values: List[torch.Tensor] = []
        self._warned = False
        # input-side path (Linear layers): see cl_plugins.core.input_side
        self._grad_projector = InputSideGradientProjector()

    def find_layers(self, model: nn.Module):
        """``(layers, norms)`` of ``model`` by path; raises on unsupported layers and on a
        ``threshold``/``layer_samples`` list whose length is not the number of layers."""
        layers, norms = protected_layers(model, "gpm")
        names = list(layers)
        for arg in ("threshold", "layer_samples"):
            value = getattr(self, arg)
            if isinstance(value, list) and len(value) != len(names):
                raise ValueError(f"gpm: {arg} has {len(value)} values but the model has "
                                 f"{len(names)} protected layers {names}; give one per layer "
                                 "(in this order) or a single value")
        if self.bases and set(self.bases) != set(names):
            raise ValueError(f"gpm: the model's protected layers {names} do not match the "
                             f"memory's {sorted(self.bases)}")
        return layers, norms

    def thresholds(self, names: Sequence[str], task: int) -> Dict[str, float]:
        """eps_l for the memory update after task ``task`` (0-based), clipped at 1."""
        base = self.threshold if isinstance(self.threshold, list) else \
            [self.threshold] * len(names)
        return {n: min(1.0, b + task * self.threshold_increment) for n, b in zip(names, base)}

    def representation(self, model: nn.Module, dataset, device) -> Dict[str, torch.Tensor]:
        """R ``[d, n]`` (float64) of every protected layer, from ``n_samples`` random examples
        of ``dataset`` forwarded as one batch (eval mode, no grad)."""
        layers, _ = self.find_layers(model)
        caps = dict(zip(layers, self.layer_samples or [None] * len(layers)))
        x, _, t = next(iterate_batches(dataset, self.n_samples, device, self.generator,
                                       max_batches=1, shuffle=True))
        reps: Dict[str, torch.Tensor] = {}

        def keep(name, module, inp):
            if caps[name] is not None:
                inp = inp[:caps[name]]
            reps[name] = input_rows(module, inp, self.bias == "append").to(torch.float64).T

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), record_inputs(layers, keep):
                call_model(model, x, t)
        finally:
            model.train(was_training)
        return reps

    def update_memory(self, model: nn.Module, dataset, device) -> Dict[str, int]:
        """The memory update after one task; returns the rank of each layer's basis."""
        reps = self.representation(model, dataset, device)
        eps = self.thresholds(list(reps), self.n_experiences)
        for name, rep in reps.items():
            basis = self.bases.get(name)
            first = self.n_experiences == 0 and (basis is None or basis.shape[1] == 0)
            self.bases[name] = extend_basis(basis, rep, eps[name],  # eq. 4-9
                                            drop_one=first and self.task1_rank == "code")
        self.n_experiences += 1
        ranks = {n: int(b.shape[1]) for n, b in self.bases.items()}
        self.history.append(ranks)
        return ranks

    def before_training_exp(self, strategy, **kwargs):
        layers, norms = self.find_layers(strategy.model)
        self._grad_projector.detach()
        self._layers = layers
        self._projectors = {n: FanInProjector(b, mode="out_of", dtype=layers[n].weight.dtype)
                            .to(strategy.device) for n, b in self.bases.items() if b.shape[1]}
        self._grad_projector.attach(layers, self._projectors, self.input_side)
        frozen: List[torch.Tensor] = []
        if self.n_experiences > 0:
            if self.bias == "freeze":
                frozen += [m.bias for m in layers.values()
                           if m.bias is not None and m.bias.requires_grad]
            if self.freeze_norms_after_first:
                frozen += [p for m in norms.values() for p in m.parameters(recurse=False)
                           if p.requires_grad]
            optimizer = getattr(strategy, "optimizer", None)
            if not self._warned and self._projectors and optimizer is not None \
                    and not plain_sgd(optimizer):
                self._warned = True
                warnings.warn("gpm: the gradient is projected before the optimizer step; with "
                              f"{type(optimizer).__name__} (momentum/weight decay/adaptive "
                              "scaling) the step is no longer orthogonal to the old tasks' "
                              "inputs. GPM's protocols use plain SGD.", stacklevel=2)
        self._frozen = frozen
        self._frozen_values = [p.detach().clone() for p in frozen]

    @torch.no_grad()
    def before_update(self, strategy, **kwargs):
        self._grad_projector.project(self._layers, self._projectors, self.bias == "append")
        for p in self._frozen:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        for p, value in zip(self._frozen, self._frozen_values):
            p.copy_(value)

    def after_training_exp(self, strategy, **kwargs):
        self._grad_projector.detach()
        self.update_memory(strategy.model, strategy.experience.dataset, strategy.device)
        self._projectors, self._frozen, self._frozen_values = {}, [], []

    def state_dict(self) -> dict:
        return {**owned_by(self), "method": self.METHOD_NAME, **settings_of(self, SETTINGS),
                "bases": {n: b.cpu().clone() for n, b in self.bases.items()},
                "tasks_seen": self.n_experiences, "history": [dict(h) for h in self.history],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, SETTINGS)
        self.bases = {n: b.to(torch.float64).cpu().clone() for n, b in state["bases"].items()}
        self.n_experiences = int(state["tasks_seen"])
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["generator"])
        self._grad_projector.detach()
        self._projectors, self._frozen, self._frozen_values = {}, [], []
