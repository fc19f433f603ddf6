"""Sliced Cramér Preservation (SCP): a quadratic penalty whose importances preserve the
distribution of the network's outputs, measured along random one-dimensional slices.

Name: ``scp``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.

Paper: S. Kolouri, N. A. Ketz, A. Soltoggio and P. K. Pilly, "Sliced Cramér Synaptic
Consolidation for Preserving Deeply Learned Representations", ICLR 2020 (Algorithm 1);
the authors' PyTorch code (``scp.py``, S. Kolouri 2019) was read for the details below.
Longer notes (how Gamma is computed, the authors' code): docs/methods/scp.md.

SCP keeps the distribution of the outputs phi(x; theta) in R^d over a task's data close to the one
at the end of that task, theta*. The sliced Cramér distance compares the one-dimensional
distributions of the projections <xi, phi(x)> for directions xi uniform on the unit sphere
S^{d-1}; its second-order approximation around theta* gives the diagonal importance

    Gamma_i = 1/L * sum_{l=1..L} ( d/d theta_i  <xi_l, (1/N) sum_n phi(x_n; theta*)> )^2,  (Alg. 1)

i.e. for each slice, the squared gradient of the projected *mean* output over the task's N
training samples (not, as in MAS or EWC, a mean of per-sample gradients). Later tasks' loss:

    L(theta) = L_task(theta) + lambda * sum_i Gamma_i (theta_i - theta*_i)^2,

with Gamma accumulated over tasks in one term anchored at the latest parameters
(``QuadraticPenalty`` mode "accumulate"; mode "online" decays the old importance by ``gamma``).
Gamma is exact (``importance``), with no loop over samples, in float64 and in eval mode.

phi is the model's output (logits), as in the authors' code, without masked logits (no
gradient): a ``MaskedHead``'s open columns for the task (seen classes, or the task's with
``mask="task"``), a masking ``MultiHeadClassifier``'s active units; on multi-head models the
current task's head. Only shared parameters are penalised (task heads never train again).

Slices xi_l are drawn from the plugin's own ``torch.Generator`` (Gaussian vectors normalised to
unit length); its state is part of ``state_dict`` so a resumed run draws the same slices.

Hooks: ``before_training_exp`` (checks the penalised parameters, moves the penalty to the
device), ``before_backward`` (adds it), ``after_training_exp`` (Gamma on the experience's data).

Hyper-parameters (defaults):
- ``scp_lambda`` = 100: lambda. No Split MNIST value in the paper; 100 is protocol S1's (Hsu et
  al. 2018) EWC coefficient for task/domain-IL. Sweep it; the authors' values: see 1/N below.
- ``n_slices`` = 100: L, as in the authors' permuted-MNIST script (their class default is 50).
- ``mode`` = "accumulate" (sum of the tasks' importances); "online" with ``gamma`` in [0, 1].
- ``gamma`` = 1.0: decay of the old importance in "online" mode (must stay 1.0 otherwise).
- ``seed`` = None: seed of the slice generator; None draws one from torch's global RNG when the
  plugin is built (the runner seeds it), an integer fixes the slices independently of the run.

Deviations and uncertainty:
- No 1/N: the authors' code also divides Gamma by the dataset size N (not in the paper; it ties
  lambda to N): their permuted-MNIST lambda = 1e6 (N = 60,000) is lambda ~= 16.7 here.
- Their online update Gamma <- alpha Gamma + (1 - alpha) Gamma_new (alpha = 0.25, permuted MNIST)
  is ``mode="online", gamma=alpha, scp_lambda=lambda_theirs * (1 - alpha)``; default: accumulate.
- One version of their code normalises the slices along the wrong axis (not unit vectors); the
  paper's xi_l uniform on S^{d-1} is used here.
- Uncertainty: the approximation's constant (e.g. 1/2, in some versions of their code) is in lambda.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.models.utils import avalanche_forward
from torch import nn
from torch.utils.data import DataLoader

from cl_plugins.core.checks import check_choice, check_int, check_non_negative, check_range
from cl_plugins.core.params import shared_parameters, snapshot
from cl_plugins.core.per_sample import eval_view
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_owner, check_settings, owned_by

MODES = ("accumulate", "online")
CONFIG = ("scp_lambda", "n_slices", "mode", "gamma", "seed")  # the state's "config"


def task_columns(model: nn.Module, task_label) -> Optional[torch.Tensor]:
    """Indices of the output columns that are not masked for ``task_label`` (None = all)."""
    from cl_plugins.models.heads import MaskedHead

    head = getattr(model, "head", None)
    if isinstance(head, MaskedHead) and head.mask != "none":
        allowed = head.class_task >= 0 if head.mask == "seen" else \
            head.class_task == int(task_label)
        return torch.nonzero(allowed).flatten()
    if isinstance(head, MultiHeadClassifier) and head.masking and task_label is not None:
        mask = getattr(head, f"active_units_T{int(task_label)}", None)
        if mask is not None:
            return torch.nonzero(mask.to(torch.bool)).flatten()
    return None


class SCPPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "scp"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"scp_lambda": {"distribution": "log_uniform_values", "min": 1.0, "max": 1e6}}
    PAPER = "Sliced Cramer Preservation (Kolouri, Ketz, Soltoggio & Pilly, ICLR 2020)"
    SUMMARY = ("quadratic penalty; importance = squared gradients of randomly sliced mean "
               "outputs (sliced Cramér distance, second order)")

    def __init__(self, scp_lambda: float = 100.0, n_slices: int = 100, mode: str = "accumulate",
                 gamma: float = 1.0, seed: Optional[int] = None):
        super().__init__()
        self.scp_lambda = float(check_non_negative("scp_lambda", scp_lambda))
        self.n_slices = check_int("n_slices", n_slices, 1)
        self.mode = check_choice("mode", mode, MODES)
        self.gamma = float(check_range("gamma", gamma, 0.0, 1.0))
        if self.mode != "online" and self.gamma != 1.0:
            raise ValueError(f"gamma only applies to mode='online' and must stay 1.0 with "
                             f"mode={self.mode!r}; got {gamma!r}.")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(self.seed)
        self.quadratic_penalty = QuadraticPenalty(self.scp_lambda, mode=self.mode,
                                                  gamma=self.gamma)
        self.n_experiences = 0
        self._shapes: Dict[str, torch.Size] = {}
        self._cache = None  # (model, its penalised parameters): the same all experience long

    def draw_slices(self, d: int) -> torch.Tensor:
        """L directions uniform on the unit sphere S^{d-1}, as rows of an [L, d] float64 tensor."""
        g = torch.randn(self.n_slices, d, generator=self.generator, dtype=torch.float64)
        return g / g.norm(dim=1, keepdim=True)

    def importance(self, model: nn.Module, batches: Iterable, task_label=None,
                   slices: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Gamma (float64) for ``model``'s shared parameters over ``batches`` (``(x, y[, t])``),
        ``task_label`` (int) passed to a multi-task model, ``slices`` ([L, d], for tests) instead
        of drawn ones. J = d mean_phi / d theta (d x P): Gamma = 1/L sum_l (xi_l^T J)^2
        = sum_{c,c'} M_cc' J_c J_c', M = xi^T xi / L (J's rows accumulated when d <= L)."""
        params = shared_parameters(model)
        names, tensors = list(params), list(params.values())
        device = tensors[0].device
        cols = task_columns(model, task_label)
        was_training = model.training
        model.eval()
        acc: Optional[List[torch.Tensor]] = None
        basis = weights = None
        n = 0  # samples seen
        try:
            for batch in batches:
                x = batch[0].to(device)
                x = x.to(tensors[0].dtype) if x.is_floating_point() else x  # float64 models
                out = avalanche_forward(model, x, task_label) if task_label is not None \
                    else model(x)
                if cols is not None:
                    out = out[:, cols.to(out.device)]
                if basis is None:
                    basis, weights = self._basis(out.shape[1], slices, device)
                s = out.sum(0)  # one batched backward pass per minibatch, over basis's rows
                grads = torch.autograd.grad(s, tensors, grad_outputs=basis.to(s.dtype),
                                            is_grads_batched=True, allow_unused=True)
                grads = [torch.zeros((basis.shape[0], *p.shape), dtype=torch.float64,
                                     device=device) if g is None else g.double()
                         for g, p in zip(grads, tensors)]
                acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
                n += x.shape[0]
        finally:
            model.train(was_training)
        if acc is None:
            raise ValueError("SCP needs at least one sample to compute the importance; the "
                             "experience's dataset is empty")
        gamma = {}
        for name, a in zip(names, acc):
            j = (a / n).reshape(a.shape[0], -1)  # [K, P]: rows of d mean_phi / d theta
            gamma[name] = ((weights @ j) * j).sum(0).reshape(a.shape[1:])  # Alg. 1's Gamma
        return gamma

    def _basis(self, d: int, slices, device):
        """(directions to differentiate the summed output along, weights) for output width d"""
        xi = self.draw_slices(d) if slices is None else \
            torch.as_tensor(slices, dtype=torch.float64).cpu()
        if xi.dim() != 2 or xi.shape[1] != d:
            raise ValueError(f"slices must have shape [L, {d}] (the output width); "
                             f"got {tuple(xi.shape)}")
        L = xi.shape[0]
        if d <= L:  # accumulate J (d rows); weights M = xi^T xi / L
            basis, weights = torch.eye(d, dtype=torch.float64), xi.T @ xi / L
        else:  # accumulate the L projections xi_l^T J; weights I / L
            basis, weights = xi, torch.eye(L, dtype=torch.float64) / L
        return basis.to(device), weights.to(device)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """lambda * sum_i Gamma_i (theta_i - theta*_i)^2 for ``model``'s shared parameters."""
        return self.quadratic_penalty.loss(self._penalised(model))

    def _penalised(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The parameters the importances were computed for, checked against their shapes."""
        params = shared_parameters(model)
        missing = [n for n in self._shapes if n not in params]
        changed = [n for n in self._shapes if n in params and params[n].shape != self._shapes[n]]
        if missing or changed:
            raise ValueError(f"SCP: the model's shared parameters changed since the importances "
                             f"were computed: missing {missing[:5]}, reshaped {changed[:5]}. "
                             "SCP needs a fixed set of shared parameters (grow only task heads).")
        return {n: params[n] for n in self._shapes}

    def before_training_exp(self, strategy, **kwargs):
        self._cache = None
        if len(self.quadratic_penalty):
            self._penalised(strategy.model)
            self.quadratic_penalty.to(strategy.device)

    def before_backward(self, strategy, **kwargs):
        if not len(self.quadratic_penalty) or self.scp_lambda == 0:
            return
        model = strategy.model
        if self._cache is None or self._cache[0] is not model:
            self._cache = (model, self._penalised(model))
        strategy.loss += self.quadratic_penalty.loss(self._cache[1])

    def after_training_exp(self, strategy, **kwargs):
        exp, model = strategy.experience, strategy.model
        labels = list(exp.task_labels)
        task_label = int(labels[0]) if len(labels) == 1 else None
        if task_label is None and any(isinstance(m, MultiHeadClassifier)
                                      for m in model.modules()):
            raise ValueError(f"SCP on a multi-head model needs one task label per experience; "
                             f"experience {exp.current_experience} has {labels}")
        loader = DataLoader(eval_view(exp.dataset), shuffle=False,
                            batch_size=getattr(strategy, "eval_mb_size", 256) or 256)
        label = task_label if isinstance(model, MultiTaskModule) else None
        gamma = self.importance(model, loader, task_label=label)
        params = shared_parameters(model)
        imp = {n: g.to(params[n].dtype) for n, g in gamma.items()}
        self.quadratic_penalty.add(imp, snapshot(params))
        self._shapes = {n: p.shape for n, p in params.items()}
        self.n_experiences += 1
        self._cache = None

    def state_dict(self) -> Dict:
        return {**owned_by(self), "config": {k: getattr(self, k) for k in CONFIG},
                "n_experiences": self.n_experiences, "penalty": self.quadratic_penalty.state_dict(),
                "shapes": {n: list(s) for n, s in self._shapes.items()},
                "generator": self.generator.get_state().clone()}

    def load_state_dict(self, state: Dict) -> None:
        check_owner(self, state)
        # the seed is not checked: the generator state below supersedes it
        check_settings(self, {**state, **state["config"]}, CONFIG[:-1])
        self.seed = state["config"]["seed"]
        self.quadratic_penalty.load_state_dict(state["penalty"])
        self.n_experiences = int(state["n_experiences"])
        self._shapes = {n: torch.Size(s) for n, s in state["shapes"].items()}
        self.generator.set_state(state["generator"].clone())
        self._cache = None
