"""Elastic Weight Consolidation, one quadratic penalty per task.

Name: ``ewc``. Scenarios: task-, domain- and class-IL. Task labels: not needed.

Paper: J. Kirkpatrick, R. Pascanu, N. Rabinowitz et al., "Overcoming catastrophic forgetting in
neural networks", PNAS 114(13), 2017. Protocols followed
(labels as in experiments/reproduce.py): van de Ven, Tuytelaars & Tolias, "Three types of
incremental learning", Nat. Mach. Intell. 2022 (S2, code GMvandeVen/continual-learning) and Hsu
et al. 2018 (S1). Measurements, investigations and other libraries' lambdas: docs/methods/ewc.md.

Equations (theta = the shared parameters, see "Parameters" below; T tasks finished so far):

    loss = L_task(theta) + (lambda / 2) sum_{k<=T} sum_i F_k,i (theta_i - theta*_k,i)^2  (Eq. 3)
    F_k,i = 1/N sum_{n=1..N} E_{y ~ q_n} [ (d log p(y | x_n, theta*_k) / d theta_i)^2 ]

i.e. the diagonal Fisher is the MEAN over N training samples of the squared *per-sample*
gradient of the log-likelihood at theta*_k (the parameters at the end of task k). The label
distribution q_n is the ``fisher`` option:

- ``"exact"``: q_n = p(. | x_n, theta), summed over all labels, ``sum_c p_c(x_n) g_{n,c}^2``
  (van de Ven et al. 2022's 'exact Fisher', ``fisher_labels='all'``);
- ``"true"``: one label per input drawn from p(. | x_n, theta) (one-sample Monte-Carlo estimate
  of the true Fisher; van de Ven's ``fisher_labels='sample'``);
- ``"empirical"``: the training label y_n (van de Ven's ``fisher_labels='true'`` -- the same
  word means the opposite there; Hsu's ``empFI=True``);
- ``"predicted"``: the arg-max label (van de Ven & Tolias 2018/2019 code, protocol P2; Hsu et
  al. 2018, S1; van de Ven's ``fisher_labels='pred'``).

Modes: ``"separate"`` keeps one (F_k, theta*_k) term per task, as above (Kirkpatrick et al.; van
de Ven's EWC); ``"accumulate"`` keeps one term, F = sum_k F_k anchored at the latest theta*_T
(Hsu et al.'s ``online_reg``, i.e. online EWC with gamma = 1; online_ewc.py decays it).

Hooks: ``before_training_exp`` (checks the shared parameters against the stored terms, moves
these to the model's device), ``before_backward`` (adds the penalty), ``after_training_exp``
(Fisher on the experience's data, anchor); terms in ``quadratic_penalty`` (coef = lambda / 2).

Hyper-parameters (defaults = protocol S2, Split MNIST task-IL, van de Ven et al. 2022):

- ``ewc_lambda`` (>= 0, default 1e5): lambda. S2 uses 1e5 / 1e10 / 1e9 (task / domain / class).
- ``mode`` (default ``"separate"``): ``"separate"`` or ``"accumulate"``.
- ``fisher`` (default ``"exact"``, S2); use ``"predicted"`` for S1 and P2.
- ``fisher_samples`` (default None: all training samples, as S2 and S1; an int: a random subset).
- ``fisher_batch_size`` (int >= 1, default 128): memory and speed only, F does not depend on it.
- ``seed`` (int >= 0, default 0): seeds the ``torch.Generator`` that draws the subset and the
  labels of ``fisher="true"``; its state is part of ``state_dict()``.

S1's coefficient (reg_coef 100, no 1/2) was tuned for the arg-max Fisher, ~100x smaller than the
exact one on a confident model: use it with S1's Fisher (``fisher="predicted", ewc_lambda=200``).

Parameters: penalty and Fisher cover ``shared_parameters(strategy.model)`` (all trainable
parameters but task-specific ``MultiHeadClassifier`` heads). The papers' code penalises all; on
a multi-head model that is equivalent (head k gets no gradient after task k, keeps its anchor
value and has zero Fisher on later tasks), except that heads moved without a gradient (Adam
with gradients zeroed in place, weight decay) are not pulled back here.

Deviations from the paper / official code, and why:

- Per-sample gradients in batches of ``fisher_batch_size``: the official batch-size-1 loops'
  value, faster (Linear layers: one exact matmul ``(delta^2)^T (a^2)``, other layers
  ``torch.func`` vmap; ``core.per_sample.per_sample_gradient_sums``).
- Importances are summed over batches in float64 and stored in the parameters' dtype, so the
  penalty does not change the loss's dtype.
- ``fisher="true"``: inverse-CDF sampling from one uniform per sample, all drawn before the first
  batch (the distribution of per-batch sampling; labels independent of ``fisher_batch_size``).
- The Fisher uses the dataset's eval transforms (deterministic; the MNIST protocols have no
  augmentation anyway), the model in eval mode, and each sample's own task head.
- Per step the separate terms are evaluated as one, sum_k F_k (theta - a_k)^2 = W (theta - c)^2
  + r (exact up to rounding; ``core.quadratic``): the step cost does not grow with T. No double
  backward through the penalty.
- Not distributed: the Fisher is not all-reduced across ranks yet.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from torch.utils.data import Subset

from cl_plugins.core.checks import check_choice, check_int, check_non_negative
from cl_plugins.core.params import check_same_keys, shared_parameters, snapshot
from cl_plugins.core.per_sample import (cross_entropy_sample, dataset_mean, eval_view, forward,
                                        per_sample_gradient_sums)
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_settings, owned_by

FISHER_TYPES = ("exact", "true", "empirical", "predicted")
EWC_MODES = ("separate", "accumulate")
SETTINGS = ("ewc_lambda", "mode", "fisher", "fisher_samples", "seed")  # checked when loading
Tensors = Dict[str, torch.Tensor]


def fisher_batch_sums(model, params: Tensors, x, y, u, task: int, fisher: str) -> Iterator[Tensors]:
    """Sums over one batch of E_{y ~ q_n}[g_n(y)^2] (parameters' dtype): one dict, or one per
    class for ``fisher="exact"`` (weights p_c). ``u``: the samples' uniforms for ``"true"``."""
    def sums(target, weights=None):
        return per_sample_gradient_sums(model, params, x, target, cross_entropy_sample,
                                        task_label=task, weights=weights)

    if fisher == "empirical":
        yield sums(y.long())
        return
    with torch.no_grad():
        logits = forward(model, x, task)
    if logits.dim() != 2:
        raise ValueError(f"EWC needs [batch, classes] logits; the model returned shape "
                         f"{tuple(logits.shape)}")
    if fisher == "exact":
        probs = F.softmax(logits.double(), dim=1)
        for c in range(probs.shape[1]):  # a loop over classes, not samples
            weight = probs[:, c]
            if bool((weight > 0).any()):  # masked (never seen) classes have p = 0: nothing to add
                yield sums(torch.full((len(x),), c, dtype=torch.long, device=x.device), weight)
        return
    if fisher == "predicted":
        target = logits.argmax(dim=1)
    else:  # "true": inverse CDF, label = #classes whose cumulative probability is below u * total
        cdf = F.softmax(logits.double(), dim=1).cumsum(dim=1)  # u in (0, 1]: p = 0 never drawn
        target = (cdf < u.unsqueeze(1) * cdf[:, -1:]).sum(dim=1).clamp(max=logits.shape[1] - 1)
    yield sums(target)


class EWCPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "ewc"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"ewc_lambda": {"distribution": "log_uniform_values", "min": 1.0, "max": 1e10}}
    PAPER = "EWC (Kirkpatrick et al., PNAS 2017)"
    SUMMARY = ("quadratic penalty (lambda/2) sum_k F_k (theta - theta*_k)^2, diagonal Fisher "
               "from per-sample gradients, one term per task")

    def __init__(self, ewc_lambda: float = 1e5, mode: str = "separate", fisher: str = "exact",
                 fisher_samples: Optional[int] = None, fisher_batch_size: int = 128,
                 seed: int = 0):
        super().__init__()
        if mode not in EWC_MODES:
            raise ValueError(f"mode must be one of 'separate', 'accumulate'; got {mode!r}"
                             + (" (online EWC is OnlineEWCPlugin, method 'online_ewc')"
                                if mode == "online" else "") + ".")
        self.configure(ewc_lambda, mode, 1.0, fisher, fisher_samples, fisher_batch_size, seed)

    def configure(self, ewc_lambda, mode, gamma, fisher, fisher_samples, fisher_batch_size,
                  seed) -> None:
        """Checks and sets the settings (``mode`` "online" with ``gamma``: OnlineEWCPlugin)."""
        self.ewc_lambda = float(check_non_negative("ewc_lambda", ewc_lambda))
        self.fisher = check_choice("fisher", fisher, FISHER_TYPES)
        self.fisher_samples = None if fisher_samples is None else \
            check_int("fisher_samples", fisher_samples, 1)
        self.fisher_batch_size = check_int("fisher_batch_size", fisher_batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.mode = mode
        self.generator = seeded_generator(seed)
        # Eq. 3: (lambda / 2) * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2
        self.quadratic_penalty = QuadraticPenalty(self.ewc_lambda / 2, mode, gamma)
        self._params_cache = None  # (model, its shared parameters) for the current experience

    def before_training_exp(self, strategy, **kwargs):
        params = shared_parameters(strategy.model)
        name = type(self).__name__
        if not params:
            raise ValueError(f"{name}: {type(strategy.model).__name__} has no shared trainable "
                             "parameters (all are frozen or task-specific heads); EWC has "
                             "nothing to protect")
        # for before_backward: the parameter set does not change inside an experience
        self._params_cache = (strategy.model, params)
        if not len(self.quadratic_penalty):
            return
        stored = self.quadratic_penalty.terms[0][0]
        check_same_keys(params, stored, f"{name}'s stored Fisher")
        for n, p in params.items():
            if p.shape != stored[n].shape:
                raise ValueError(f"{name}: shared parameter {n!r} changed shape from "
                                 f"{tuple(stored[n].shape)} to {tuple(p.shape)}; EWC needs the "
                                 "shared parameters to keep their shape (use a fixed-size head "
                                 "such as MaskedHead or a MultiHeadClassifier, not a growing "
                                 "IncrementalClassifier)")
        # restored terms live on the CPU; other plugins may read them (penalties_of)
        self.quadratic_penalty.to(next(iter(params.values())).device)

    def before_backward(self, strategy, **kwargs):
        if not len(self.quadratic_penalty):
            return
        cache = self._params_cache
        params = cache[1] if cache is not None and cache[0] is strategy.model else \
            shared_parameters(strategy.model)
        strategy.loss += self.penalty(params)

    def after_training_exp(self, strategy, **kwargs):
        fisher = self.estimate_fisher(strategy.model, strategy.experience.dataset)
        params = shared_parameters(strategy.model)
        self.quadratic_penalty.add({n: f.to(params[n].dtype) for n, f in fisher.items()},
                                   snapshot(params))
        self._params_cache = None

    def penalty(self, params: Tensors) -> torch.Tensor:
        """Eq. 3's penalty for ``params`` (by name), as one collapsed term whatever T."""
        return self.quadratic_penalty.loss(params)

    def estimate_fisher(self, model: torch.nn.Module, dataset) -> Tensors:
        """Diagonal Fisher (float64) of ``shared_parameters(model)`` on ``dataset`` (yielding
        ``(x, y, task_label, ...)``), over ``fisher_samples`` samples drawn with this plugin's
        generator (all when None), with ``self.fisher``'s labels."""
        dataset = eval_view(dataset)  # eval transforms: no random augmentation in the Fisher
        n_total = len(dataset)
        if n_total == 0:
            raise ValueError(f"{type(self).__name__}: the experience's dataset is empty; no "
                             "Fisher can be estimated")
        if self.fisher_samples is not None and self.fisher_samples < n_total:
            idx = torch.randperm(n_total, generator=self.generator)[:self.fisher_samples]
            dataset = Subset(dataset, sorted(idx.tolist()))
        params = shared_parameters(model)
        if not params:
            raise ValueError(f"{type(self).__name__}: the model has no shared trainable "
                             "parameters to protect")
        device = next(iter(params.values())).device
        multitask = isinstance(model, MultiTaskModule)
        # fisher="true": one uniform per sample, all drawn at once (whatever the batch size)
        uniforms = (1.0 - torch.rand(len(dataset), generator=self.generator,
                                     dtype=torch.float64)) if self.fisher == "true" else None

        def batch_sums(batch, start):
            x, y = batch[0].to(device), batch[1].to(device)
            u = None if uniforms is None else uniforms[start:start + len(x)].to(device)
            if not multitask:
                yield from fisher_batch_sums(model, params, x, y, u, 0, self.fisher)
                return
            # Avalanche batches are (x, y, ..., task label); a plain (x, y) has task 0
            t = torch.as_tensor(batch[-1]) if len(batch) > 2 else \
                torch.zeros(len(x), dtype=torch.long)
            for task in torch.unique(t).tolist():
                sel = (t == task).to(device)
                yield from fisher_batch_sums(model, params, x[sel], y[sel],
                                             None if u is None else u[sel], int(task), self.fisher)

        return dataset_mean(model, params, dataset, self.fisher_batch_size, batch_sums)

    def state_dict(self) -> dict:
        return {**owned_by(self), "method": self.METHOD_NAME,
                **{key: getattr(self, key) for key in SETTINGS},
                "generator": self.generator.get_state(),
                "penalty": self.quadratic_penalty.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, SETTINGS)  # the owner check also covers "method"
        self.quadratic_penalty.load_state_dict(state["penalty"])
        self.generator.set_state(state["generator"])
