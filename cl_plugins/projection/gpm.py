"""Gradient Projection Memory (GPM).

Name: ``gpm``. Scenarios: task-, domain- and class-IL. Task labels: not needed (a multi-head
model uses them, as always, to pick its head).

Paper: G. Saha, I. Garg, K. Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021
(oral). Official code: github.com/sahagobinda/GPM (``main_pmnist.py``, ``main_cifar100.py``,
``main_five_datasets.py``, ``main_mini_imagenet.py``); facts below are from the paper and our
reading of that code, nothing is copied from it.

Notation. Every protected layer l is a matrix acting on a fan-in vector (see
:mod:`cl_plugins.core.layer_inputs`): a Linear weight ``[out, in]``, a Conv2d weight viewed as
``[out, in*kh*kw]`` whose inputs are the unfolded patches. ``d`` is the fan-in.

Memory update, after training task t (``after_training_exp``), for every protected layer:

1. Representation matrix ``R = [x_1, ..., x_n]`` (``[d, n]``, columns are the layer's inputs)
   from a random sample of ``n_samples`` training examples of the task, one forward pass in eval
   mode without gradient (conv layers: every unfolded patch of the first ``layer_samples[l]``
   examples of the sample, so a conv R has ``layer_samples[l] * H_out * W_out`` columns).
2. First task (paper eq. 4-5): ``R = U S V^T``; keep the smallest k with
   ``sum_{i<=k} s_i^2 >= eps_l ||R||_F^2``; ``M_l = U[:, :k]``.
3. Later tasks (eq. 6-9): ``R_hat = R - M M^T R`` (what the memory does not explain);
   ``R_hat = U_hat S_hat V_hat^T``; add the smallest r >= 0 such that
   ``||M^T R||_F^2 + sum_{i<=r} s_hat_i^2 >= eps_l ||R||_F^2`` (r = 0 when the memory already
   explains enough); ``M_l <- [M_l, U_hat[:, :r]]``, at most d columns.

Training on task t >= 2 (``before_update``, i.e. after backward and before ``optimizer.step``):
the gradient of every protected weight is projected out of the memory (eq. 10),

    G_l <- G_l - G_l M_l M_l^T        (G_l the [out, d] gradient matrix)

and the base optimizer (plain SGD in every GPM protocol) steps. Task 1 is plain SGD.

Hooks: ``before_training_exp`` (finds the protected layers, raises on unsupported ones, checks
that they match the memory, builds the per-layer projectors on ``strategy.device``, snapshots the
parameters to freeze, attaches the input-side capture hooks), ``before_training_iteration`` /
``after_training_iteration`` (open / close the capture window of a step), ``before_update``
(projection, zeroed gradients of frozen tensors), ``after_update`` (frozen tensors restored
exactly), ``after_training_exp`` (capture hooks removed, memory update).

Hyper-parameters (defaults = the 10-split CIFAR-100 AlexNet protocol of the paper; the Permuted
MNIST protocol P1 sets its own values in ``experiments/configs/saha2021_gpm_permuted_mnist.yaml``):

- ``threshold`` (float in (0, 1], or a list with one value per protected layer in the model's
  module order; default 0.97): eps_l. Permuted MNIST: ``[0.95, 0.99, 0.99]``; CIFAR-100 and
  miniImageNet/5-datasets: 0.97.
- ``threshold_increment`` (>= 0, default 0.003): eps_l for the update after task t (t = 0, 1,
  ... counted from 0) is ``min(1, threshold_l + t * threshold_increment)`` -- CIFAR-100 uses
  0.97 + 0.003 t, Permuted MNIST 0 (a constant threshold).
- ``n_samples`` (int >= 1, default 125): examples drawn at random (without replacement) from the
  task's training set for R; Permuted MNIST uses 300, CIFAR-100/miniImageNet/5-datasets 125 (all
  fewer if the task has fewer). They go through the network as one batch, as in the code, which
  matters for BatchNorm with batch statistics (GPM's nets use ``track_running_stats=False``).
- ``layer_samples`` (None or a list of ints >= 1, one per protected layer; default None = all
  ``n_samples``): how many of those examples enter layer l's R. GPM's AlexNet uses
  ``[24, 100, 100, 125, 125]`` (conv1's patch matrix from 24 images only), its MNIST MLP 300 for
  every layer.
- ``bias`` (``"freeze"`` | ``"append"`` | ``"free"``, default ``"freeze"``): what happens to the
  biases of protected layers (GPM's networks have none). ``"freeze"``: biases train on task 1
  and are frozen afterwards -- the official code zeroes the gradient of every 1-D parameter after
  task 1. ``"append"``: a constant 1 is appended to the layer's input, the bias becomes one more
  fan-in column, is part of R and is projected with the weight (old outputs protected, bias still
  trains). ``"free"``: biases are neither projected nor frozen (old outputs drift: for ablations).
- ``freeze_norms_after_first`` (bool, default True): normalisation layers' affine parameters
  (BatchNorm/LayerNorm/GroupNorm) train on task 1 only, as in the official code (zeroed 1-D
  gradients). They are never projected. With False they keep training (old tasks drift).
  Running statistics are not touched by this plugin: GPM's nets normalise with batch statistics
  (``track_running_stats=False``); a BN that tracks running statistics keeps updating them on
  new tasks, which changes old tasks' outputs.
- ``task1_rank`` (``"paper"`` | ``"code"``, default ``"paper"``): the rank rule on the first
  task. ``"paper"``: the smallest k meeting eq. 5 (as above). ``"code"``: the official code's
  ``r = #{k : cumulative energy ratio of the first k < eps}``, one vector fewer than the paper's
  k (it never quite reaches eps). Later tasks use the same rule in both (paper = code there).
- ``input_side`` (bool, default True): how the projection of a Linear layer's gradient is
  computed (the result is the same matrix up to rounding; see "Numerics and cost").
- ``seed`` (int >= 0, default 0): seeds the plugin's ``torch.Generator`` that draws the samples
  of R; its state is part of ``state_dict()``.

Protected layers: every shared ``nn.Linear``/``nn.Conv2d`` with trainable weights
(:func:`~cl_plugins.core.layer_inputs.protected_layers`): task-specific heads (Avalanche
``MultiHeadClassifier``) are excluded -- they only get gradients from their own task --, a shared
head (domain-IL ``nn.Linear``, class-IL ``MaskedHead``) is protected like any layer, as in GPM's
Permuted MNIST code (its shared output layer is projected with threshold 0.99). Any other module
owning trainable parameters (grouped/depthwise conv, ConvTranspose, Embedding, ...) raises
``UnsupportedLayerError`` (a ``ValueError``) with its module path at the first experience.

Numerics and cost: R, the SVDs and M are float64 (M kept on the CPU; SVD where R lives, except
MPS); new vectors are re-orthogonalised against M and QR-orthonormalised in float64 (the code
relies on exact orthogonality of ``U_hat``); singular values below
``max(d, n) * eps_float64 * ||R||_F`` count as zero and are never added (they carry no energy, and
with eps_l = 1 the cumulative energy can otherwise miss 1.0 by rounding). The per-step
projector (:class:`~cl_plugins.core.subspace.FanInProjector`, in the weight's dtype) is built at
the experience boundary and applies ``M`` or its orthonormal complement, whichever has fewer
columns (k' = min(k, d - k)): projecting a gradient costs ``4 out d k'`` multiply-adds per layer.
With small batches that is far more than the step itself (P1: batch 10, ``out = 100``,
``d = 784``). Input-side path (``input_side=True``, Linear layers only): the data part of a
Linear weight's gradient is ``D^T X`` (``X`` the layer's n input rows of this step, ``D`` the
gradients of its outputs), so its projection is ``D^T (X - X M M^T)``, about ``4 n d (out + k')``
multiply-adds. A forward hook keeps a reference to ``X`` (autograd keeps it anyway) and a tensor
hook on the output receives ``D``, only between ``before_training_iteration`` and
``before_update``; the path is taken when ``n (out + k') < out k'``. Anything else in the
gradient (another plugin's penalty gradient, a forward pass outside the step) is
``G - D^T X``; it is projected the usual way unless its norm is within the rounding bound
``n eps ||D||_F ||X||_F``. Conv layers (n = batch x positions, usually > out) always use the
gradient path.

Deviations from the paper / official code, and why:

- The task-1 rank rule defaults to the paper's (eq. 5); the code keeps one vector fewer
  (``task1_rank="code"``). The difference is one direction per layer.
- Biases and normalisation parameters are frozen *exactly* (the gradient is zeroed before the
  step, like the code, and the value is restored after it), so momentum or weight decay cannot
  move them. The weights' projection assumes plain SGD, as every GPM protocol: with momentum,
  weight decay or Adam the step leaves span(M)'s complement (a warning says so at the first
  projected experience).
- Samples for R come from the experience's dataset with its eval transforms (no augmentation);
  the GPM protocols have none on these data, and MNIST's 10% validation hold-out is the
  benchmark's concern (``samples_per_task``), not this plugin's.
- BatchNorm: the code learns BN parameters on task 1 only (1-D gradients zeroed), which is
  ``freeze_norms_after_first=True``; for ResNets (5-datasets, miniImageNet) its representation
  patches come from explicit padding/stride loops, here from the generic unfold of
  :func:`~cl_plugins.core.layer_inputs.input_rows` (the same patches).
- Not offered: per-layer scaling of the bases or of the projection (later variants such as
  Scaled Gradient Projection add importance weights; plain GPM has none). We are not sure of
  every detail of the code's ResNet representation (e.g. which samples feed each block), so only
  the generic rule above is implemented.
- ``supports_distributed = False``: the representation sample is not gathered across ranks.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_plugins.core.checks import check_bool, check_choice, check_int, check_range
from cl_plugins.core.layer_inputs import (call_model, input_rows, iterate_batches,
                                          protected_layers, record_inputs)
from cl_plugins.core.input_side import InputSideGradientProjector
from cl_plugins.core.state import check_owner, owned_by
from cl_plugins.core.subspace import FanInProjector, energy_rank

BIAS_MODES = ("freeze", "append", "free")
RANK_RULES = ("paper", "code")


class GPMPlugin(SupervisedPlugin):
    METHOD_NAME = "gpm"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    DEFAULTS = {"threshold": 0.97, "threshold_increment": 0.003, "n_samples": 125,
                "layer_samples": None, "bias": "freeze", "freeze_norms_after_first": True,
                "task1_rank": "paper", "input_side": True, "seed": 0}
    SWEEP = {"threshold": {"distribution": "uniform", "min": 0.9, "max": 0.999},
             "threshold_increment": {"values": [0.0, 0.001, 0.003]},
             "n_samples": {"values": [64, 125, 300]}}
    PAPER = "Saha, Garg & Roy, Gradient Projection Memory for Continual Learning, ICLR 2021"
    SUMMARY = ("SVD bases of old tasks' layer inputs; gradients projected out of their span "
               "(then plain SGD)")
    supports_distributed = False

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
        self.threshold_increment = float(check_range("threshold_increment",
                                                     threshold_increment, 0.0))
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
        self.generator = torch.Generator().manual_seed(seed)

        self.bases: Dict[str, torch.Tensor] = {}  # layer path -> M [d, k], float64, CPU
        self.tasks_seen = 0  # memory updates done
        self.history: List[Dict[str, int]] = []  # ranks after each update (inspection)
        self._projectors: Dict[str, FanInProjector] = {}
        self._layers: Dict[str, nn.Module] = {}
        self._frozen: List[torch.Tensor] = []
        self._frozen_values: List[torch.Tensor] = []
        self._warned = False
        # input-side path (Linear layers): see cl_plugins.core.input_side
        self._grad_projector = InputSideGradientProjector()

    # ------------------------------------------------------------------ layers and thresholds
    @property
    def with_bias(self) -> bool:
        return self.bias == "append"

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

    # ------------------------------------------------------------------ memory update
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
            reps[name] = input_rows(module, inp, self.with_bias).to(torch.float64).T

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
        eps = self.thresholds(list(reps), self.tasks_seen)
        for name, rep in reps.items():
            self.bases[name] = self.extend_basis(self.bases.get(name), rep, eps[name])
        self.tasks_seen += 1
        ranks = {n: int(b.shape[1]) for n, b in self.bases.items()}
        self.history.append(ranks)
        return ranks

    def extend_basis(self, basis: Optional[torch.Tensor], rep: torch.Tensor,
                     threshold: float) -> torch.Tensor:
        """GPM's update of one layer's basis M ``[d, k]`` with representation R ``[d, n]``
        (paper eq. 5 for the first task, eq. 8-9 afterwards); float64, returned on the CPU."""
        work = rep.device if rep.device.type != "mps" else torch.device("cpu")
        rep = rep.to(work, torch.float64)
        d, n = rep.shape
        total = float(rep.pow(2).sum())
        if basis is None:
            basis = rep.new_zeros(d, 0)
        else:
            basis = basis.to(work, torch.float64)
        if total <= 0.0 or basis.shape[1] >= d:
            return basis.cpu()
        first = basis.shape[1] == 0 and self.tasks_seen == 0
        explained = 0.0
        if basis.shape[1]:
            coeff = basis.T @ rep
            explained = float(coeff.pow(2).sum())  # ||M^T R||_F^2
            rep = rep - basis @ coeff  # R_hat
        u, s, _ = torch.linalg.svd(rep, full_matrices=False)
        tol = max(d, n) * torch.finfo(torch.float64).eps * total ** 0.5
        valid = int((s > tol).sum())
        u, s = u[:, :valid], s[:valid]
        if explained >= threshold * total or valid == 0:
            return basis.cpu()
        r = energy_rank(s, threshold, total, already_explained=explained)
        if first and self.task1_rank == "code":
            r -= 1  # the code counts the k with cumulative ratio < eps: one fewer than eq. 5
        r = min(r, d - basis.shape[1])
        if r <= 0:
            return basis.cpu()
        new = u[:, :r]
        if basis.shape[1]:
            new = new - basis @ (basis.T @ new)  # re-orthogonalise against M (rounding)
        new, _ = torch.linalg.qr(new)
        return torch.cat([basis, new], dim=1).cpu()

    # ------------------------------------------------------------------ hooks
    def before_training_exp(self, strategy, **kwargs):
        layers, norms = self.find_layers(strategy.model)
        self._grad_projector.detach()
        self._layers = layers
        self._projectors = {}
        device = strategy.device
        for name, basis in self.bases.items():
            if basis.shape[1] == 0:
                continue
            dtype = layers[name].weight.dtype
            self._projectors[name] = FanInProjector(basis, mode="out_of", dtype=dtype).to(device)
        self._grad_projector.attach(layers, self._projectors, self.input_side)
        frozen: List[torch.Tensor] = []
        if self.tasks_seen > 0:
            if self.bias == "freeze":
                frozen += [m.bias for m in layers.values()
                           if m.bias is not None and m.bias.requires_grad]
            if self.freeze_norms_after_first:
                frozen += [p for m in norms.values() for p in m.parameters(recurse=False)
                           if p.requires_grad]
            if not self._warned and self._projectors:
                self._warn_optimizer(getattr(strategy, "optimizer", None))
        self._frozen = frozen
        self._frozen_values = [p.detach().clone() for p in frozen]

    def _warn_optimizer(self, optimizer) -> None:
        if optimizer is None:
            return
        plain = isinstance(optimizer, torch.optim.SGD) and all(
            not g.get("momentum", 0) and not g.get("weight_decay", 0)
            for g in optimizer.param_groups)
        if not plain:
            self._warned = True
            warnings.warn("gpm: the gradient is projected before the optimizer step; with "
                          f"{type(optimizer).__name__} (momentum/weight decay/adaptive scaling) "
                          "the step is no longer orthogonal to the old tasks' inputs. GPM's "
                          "protocols use plain SGD.", stacklevel=2)

    def before_training_iteration(self, strategy, **kwargs):
        self._grad_projector.start_step()

    def after_training_iteration(self, strategy, **kwargs):
        self._grad_projector.end_step()

    @torch.no_grad()
    def before_update(self, strategy, **kwargs):
        self._grad_projector.project(self._layers, self._projectors, self.with_bias)
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

    # ------------------------------------------------------------------ state
    def _hyper(self) -> dict:
        return {"method": self.METHOD_NAME, "threshold": self.threshold,
                "threshold_increment": self.threshold_increment, "n_samples": self.n_samples,
                "layer_samples": self.layer_samples, "bias": self.bias,
                "freeze_norms_after_first": self.freeze_norms_after_first,
                "task1_rank": self.task1_rank, "seed": self.seed}

    def state_dict(self) -> dict:
        return {**owned_by(self), **self._hyper(),
                "bases": {n: b.cpu().clone() for n, b in self.bases.items()},
                "tasks_seen": self.tasks_seen, "history": [dict(h) for h in self.history],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        for key, mine in self._hyper().items():
            if state.get(key) != mine:
                raise ValueError(f"saved {type(self).__name__} state has {key}="
                                 f"{state.get(key)!r}, this plugin {mine!r}")
        self.bases = {n: b.to(torch.float64).cpu().clone() for n, b in state["bases"].items()}
        self.tasks_seen = int(state["tasks_seen"])
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["generator"])
        self._grad_projector.detach()
        self._projectors, self._frozen, self._frozen_values = {}, [], []
