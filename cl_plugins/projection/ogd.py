"""Orthogonal Gradient Descent (OGD): steps orthogonal to old tasks' output gradients.

Name: ``ogd``. Scenarios: task-, domain- and class-IL. Task labels: not needed (used, when the
model is multi-head, to pick each stored sample's own head).

Paper: M. Farajtabar, N. Azizan, A. Mott, A. Li, "Orthogonal Gradient Descent for Continual
Learning", AISTATS 2020 (arXiv 1910.07104). No official code that we know of. "As we recall":
our reading of the paper, not re-checked against the PDF. More: ``docs/methods/ogd.md``.

Idea: a step dw moves an old output f_j(x; w) by <grad_w f_j(x; w), dw> to first order; OGD keeps
the output gradients of a sample of each task's data and projects later gradients off their
span. Algorithm 1, S = ``basis`` ([n_params, m], orthonormal; stored as ``directions`` = S^T):

    Eq. step (``before_update``):  g <- g - S (S^T g);  w <- w - eta g
    Eq. memory (``after_training_exp``), per stored sample (x, y) and output j of the variant:
        u <- grad_w f_j - S (S^T grad_w f_j);  if ||u|| > drop_tol ||grad_w f_j||: S <- [S, u/|u|]

Variants, f = the logits: ``"gtl"`` (default; the true-class logit f_y, one vector per sample;
the paper's main choice as we recall), ``"ave"`` (the mean logit), ``"all"`` (every logit).
Hooks: ``before_training_exp`` checks the shared parameters' layout (names, shapes, one dtype),
moves S to them, warns once unless the optimizer is plain SGD; ``before_update``: Eq. step on the
shared ``.grad`` (None = 0); ``after_training_exp``: Eq. memory on ``memory_per_task`` samples
(eval transforms, seeded). S is kept by ``core.direction_store.DirectionStore``, the same
projection in two storages: ``"dense"``, S^T itself (float64 Gram-Schmidt, twice is enough;
blocked step), or ``"factored"``, when every shared parameter is an ``nn.Linear`` weight or bias:
each raw direction as one (input, output-gradient) pair per layer plus the Cholesky factor of
their Gram matrix, in + out numbers per layer instead of in x out, a step of matrix-matrix
products whose V^T g comes from the step's layer inputs (``before_training_iteration`` /
``after_training_iteration`` open and close the capture; ``results/speed/1_projection.md``).

Hyper-parameters: ``variant`` (default ``"gtl"``); ``memory_per_task`` (default 200, as we recall
the paper's); ``max_directions`` (None = unbounded; exceeding it raises a ``ValueError``, state
kept: the paper has no rule to drop directions); ``drop_tol`` (in [0, 1), default 1e-5, ~100
float32 epsilons); ``grad_batch_size`` (default 64, output gradients per vmap call); ``seed``; ``storage``
(``"auto"``, default: factored where the model allows it and ``drop_tol >= 1e-6`` | ``"dense"`` |
``"factored"``, an error where they do not).

Deviations from the paper, and why: ``drop_tol`` drops near-dependent vectors instead of
normalising rounding noise; S is normalised and kept in the parameters' dtype (float32: a float64
copy would triple the method's dominant memory); S holds the shared parameters only
(``core.params.shared_parameters``): with a ``MultiHeadClassifier`` each sample uses its task's
head and old heads never move (Algorithm 1 would move them to compensate the shared step; here
the shared step alone protects each stored output, the stricter constraint), the current head's
gradient is not projected; the stored samples are a seeded uniform random subset (the paper does
not say how); S is not all-reduced across distributed ranks; any optimizer runs, all but plain
SGD warn (the step is no longer the projected gradient).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule

from cl_plugins.core.checks import check_choice, check_int, check_range
from cl_plugins.core.direction_store import DirectionStore, check_storage
from cl_plugins.core.layer_inputs import call_model, iterate_batches
from cl_plugins.core.params import shared_parameters
from cl_plugins.core.per_sample import per_sample_gradients
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.step_operators import warn_unless_plain_sgd

VARIANTS = ("gtl", "ave", "all")
SETTINGS = ("variant", "memory_per_task", "max_directions", "drop_tol", "seed", "storage")
SGD_WARNING = ("OGD projects the gradient; the paper steps with plain SGD (no momentum, no weight "
               "decay). With {problems} the optimizer's update is not the projected gradient, so "
               "old tasks' outputs are no longer protected to first order.")


def output_gradients(model: torch.nn.Module, params: Dict[str, torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor, variant: str = "gtl", task: int = 0) -> torch.Tensor:
    """The variant's output gradients of a batch, [k, n_params] float64 (``torch.func``, model in
    eval mode): ``"gtl"``: row i = d f_{y_i}(x_i) / d w; ``"ave"``: d mean_j f_j(x_i) / d w;
    ``"all"``: rows i*c + j = d f_j(x_i) / d w, j < c (sample-major, as the paper's loops)."""
    def flat(output):
        grads = per_sample_gradients(model, params, x, y.long(), output, task_label=task)
        return torch.cat([grads[n].reshape(len(x), -1) for n in params], dim=1).double()

    if variant == "gtl":
        return flat(lambda logits, target: logits.gather(1, target.view(1, 1)).sum())
    if variant == "ave":
        return flat(lambda logits, target: logits.mean())
    with torch.no_grad():
        n_out = call_model(model, x[:1], task).shape[1]
    per_class = [flat(lambda logits, target, c=c: logits[0, c]) for c in range(n_out)]
    return torch.stack(per_class, dim=1).reshape(len(x) * n_out, -1)


class OGDPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "ogd"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"memory_per_task": {"values": [50, 100, 200, 400]},
                   "variant": {"values": list(VARIANTS)}}
    PAPER = "OGD (Farajtabar, Azizan, Mott & Li, AISTATS 2020)"
    SUMMARY = ("project each gradient onto the orthogonal complement of stored output gradients "
               "(ground-truth logit) of old tasks' samples")

    def __init__(self, variant: str = "gtl", memory_per_task: int = 200,
                 max_directions: Optional[int] = None, drop_tol: float = 1e-5,
                 grad_batch_size: int = 64, seed: int = 0, storage: str = "auto"):
        super().__init__()
        self.variant = check_choice("variant", variant, VARIANTS)
        self.memory_per_task = check_int("memory_per_task", memory_per_task, 1)
        self.max_directions = max_directions if max_directions is None else \
            check_int("max_directions", max_directions, 1)
        self.drop_tol = float(check_range("drop_tol", drop_tol, 0.0, 1.0, high_inclusive=False))
        self.grad_batch_size = check_int("grad_batch_size", grad_batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.storage = check_storage(storage, self.drop_tol)
        self.generator = seeded_generator(seed)
        self.store = DirectionStore(self.storage, self.drop_tol)  # S
        self.layout: List[Tuple[str, Tuple[int, ...]]] = []  # (name, shape) per row block of S
        self.directions_per_exp: List[int] = []
        self.memory_indices: List[List[int]] = []  # stored samples (dataset indices) per exp
        self._warned = False

    @property
    def basis(self) -> Optional[torch.Tensor]:
        """S, [n_params, m] (dense storage: a view; factored: computed, float64); None before
        the first task ends."""
        return self.store.basis()

    @property
    def directions(self) -> Optional[torch.Tensor]:
        """S^T, [m, n_params] (a view of the dense storage; computed from the factored one)."""
        s = self.basis
        return None if s is None else s.T

    @property
    def n_directions(self) -> int:
        return self.store.m

    @property
    def memory_bytes(self) -> int:
        """Bytes held by S (dense: n_params * m * element size; factored: factors and R)."""
        return self.store.memory_bytes

    def _to_params(self, params: Dict[str, torch.nn.Parameter]) -> torch.nn.Parameter:
        """Moves S to the parameters' device and dtype (restored states live on the CPU)."""
        first = next(iter(params.values()))
        self.store.to(first.device, first.dtype)
        return first

    def before_training_exp(self, strategy, **kwargs):
        self._to_params(self._check_layout(strategy.model))
        self._warned = self._warned or warn_unless_plain_sgd(
            getattr(strategy, "optimizer", None), SGD_WARNING)

    def before_training_iteration(self, strategy, **kwargs):
        self.store.begin_step(strategy.model, shared_parameters)  # factored: V^T g from inputs

    def after_training_iteration(self, strategy, **kwargs):
        self.store.end_step()

    def before_update(self, strategy, **kwargs):
        if self.n_directions:  # none on the first task: plain SGD
            self.store.step_(strategy.model, shared_parameters)  # Eq. step

    def after_training_exp(self, strategy, **kwargs):
        params = self._check_layout(strategy.model)
        task = int(getattr(strategy.experience, "task_labels", [0])[0])
        self._to_params(params)  # Eq. memory:
        k = self.add_directions(strategy.model, strategy.experience.dataset, params, task)
        self.layout = self.layout or [(name, tuple(p.shape)) for name, p in params.items()]
        self.directions_per_exp.append(k)

    def _check_max(self, m_new: int, k: int) -> None:
        if self.max_directions is not None and m_new > self.max_directions:
            raise ValueError(
                f"OGD would hold {m_new} directions after this experience ({k} new), more than "
                f"max_directions={self.max_directions} (dense storage: n_params * m * 4 bytes in "
                "float32). Raise max_directions (None = unbounded) or lower memory_per_task; OGD "
                "has no rule for dropping stored directions, so none is dropped silently.")

    @torch.no_grad()
    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g - S (S^T g) for a flat g [n_params] (``layout`` order); a copy of g if S is empty."""
        return self.store.project(g)

    def add_directions(self, model: torch.nn.Module, dataset, params: Dict[str, torch.Tensor],
                       task: int = 0) -> int:
        """Adds to S the new directions (orthonormalised against it) of a seeded sample of
        ``memory_per_task`` items of ``dataset`` (yielding (x, y[, ..., task])); returns how
        many were kept."""
        if hasattr(dataset, "eval"):
            dataset = dataset.eval()  # no random augmentation in the stored gradients
        if len(dataset) == 0:
            raise ValueError("OGDPlugin: the experience's dataset is empty; no gradient can be "
                             "stored")
        k = min(self.memory_per_task, len(dataset))
        idx = sorted(torch.randperm(len(dataset), generator=self.generator)[:k].tolist())
        subset = dataset.subset(idx) if hasattr(dataset, "subset") else \
            torch.utils.data.Subset(dataset, idx)
        device = next(iter(params.values())).device
        multitask = isinstance(model, MultiTaskModule)
        was_training = model.training
        model.eval()  # per-sample gradients need running statistics, and no dropout
        try:
            batch = self.grad_batch_size
            if self.variant == "all":
                with torch.no_grad():
                    batch = max(1, batch // call_model(
                        model, subset[0][0].unsqueeze(0).to(device), task).shape[1])
            batches = [(x[t == tk], y[t == tk], int(tk)) if multitask else (x, y, 0)
                       for x, y, t in iterate_batches(subset, batch, device)
                       for tk in (torch.unique(t).tolist() if multitask else [0])]
            kept = self.store.add(model, params, batches, self.variant, output_gradients,
                                  self._check_max)
        finally:
            model.train(was_training)
        self.memory_indices.append(idx)
        return kept
    def _check_layout(self, model) -> Dict[str, torch.nn.Parameter]:
        params = shared_parameters(model)
        if not params:
            raise ValueError(f"OGDPlugin: {type(model).__name__} has no shared trainable "
                             "parameters (all are frozen or task-specific heads); OGD has "
                             "nothing to project")
        if len({p.dtype for p in params.values()}) > 1:
            raise ValueError(f"OGDPlugin needs the shared parameters in one dtype; found "
                             f"{sorted({str(p.dtype) for p in params.values()})}")
        found = [(n, tuple(p.shape)) for n, p in params.items()]
        if self.layout and found != self.layout:
            diff = [f"{a} vs stored {b}" for a, b in zip(found, self.layout) if a != b]
            raise ValueError(
                "OGDPlugin: the shared parameters changed since the stored directions were "
                f"computed ({len(found)} tensors now, {len(self.layout)} stored; first "
                f"differences: {diff[:3]}). OGD needs a fixed parameter layout: use a "
                "fixed-size head (MaskedHead, MultiHeadClassifier), not a growing one.")
        return params

    def state_dict(self) -> dict:
        return {**settings_of(self, SETTINGS), "method": self.METHOD_NAME,
                "generator": self.generator.get_state(),
                **self.store.state_dict(),
                "layout": [(n, list(s)) for n, s in self.layout],
                "directions_per_exp": list(self.directions_per_exp),
                "memory_indices": [list(i) for i in self.memory_indices]}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, SETTINGS)
        self.generator.set_state(state["generator"])
        self.store.load_state_dict(state)
        self.layout = [(n, tuple(s)) for n, s in state["layout"]]
        self.directions_per_exp = list(state["directions_per_exp"])
        self.memory_indices = [list(i) for i in state["memory_indices"]]
