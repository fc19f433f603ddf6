"""AR1: CWR* on the output layer + an SI-style path-integral penalty on the shared layers.

Name: ``ar1``. Scenarios: domain-IL (CORe50's NI: new instances of known classes) and class-IL
(NC, NIC: the single-incremental-task scenarios AR1 is for). Task labels: not needed. Task-IL is
refused: its per-task heads (``MultiHeadClassifier``) have no single row per class to
consolidate, and AR1's premise is one incremental task (``core.cwr.head_linear`` raises).

Paper: D. Maltoni and V. Lomonaco, "Continuous learning in single-incremental-task scenarios",
Neural Networks 116, 2019 (arXiv:1806.08568); CWR*: V. Lomonaco, D. Maltoni and L. Pellegrini,
"Rehearsal-Free Continual Learning over Small Non-I.I.D. Batches", CVPR-W 2020
(arXiv:1907.03799); AR1* with latent replay: L. Pellegrini et al., IROS 2020
(arXiv:1912.01100). Codes read for facts: the authors' vlomonaco/ar1-pytorch
(``ar1star_lat_replay.py``, ``utils.py``, ``params.cfg``), lrzpellegrini/Latent-Replay (Caffe:
``cwr.py``, ``syn.py``, ``inc_training_Core50.py``, ``experiments_configuration.py``) and
Avalanche 0.6 (``training/supervised/ar1.py``, ``training/plugins/cwr_star.py``). Notes, the
facts with their sources and measurements: docs/methods/ar1.md.

Per experience i, with cur_j examples of class j (the experience's classes: cur_j > 0):

    tw <- 0; tw_j <- cw_j for current classes already consolidated        # CWR* reset
    train on  L = CE + (lambda / 2) sum_k F_k (theta_k - theta*_k)^2        # AR1's SI penalty
    tw_j <- tw_j - mean(tw[current]);  wpast_j = sqrt(past_j / cur_j)     # CWR* consolidation
    cw_j <- (cw_j wpast_j + tw_j) / (wpast_j + 1);  past_j += cur_j;  head rows <- cw
    T  <- T + omega_k / ((theta_k(end) - theta_k(start))^2 + xi)          # omega = sum -g delta
    F  <- clip(T, 0, max_f);  theta* <- theta(end)                        # clipped, cumulative

theta: the protected parameters (every trainable parameter outside ``model.head`` and outside
normalisation layers); omega: SI's path integral (Eq. 3 of Zenke et al.), T: its running sum of
normalised contributions, never clipped itself. The CWR* mechanics are ``core.cwr``; the
per-step path integral is ``core.path_integral``'s (SI's and RWalk's), restricted to theta.

Hooks: ``before_training_exp`` (CWR* reset, bias held at 0, path-integral start),
``before_backward`` (penalty), ``after_backward`` / ``before_update`` / ``after_update``
(path integral; from the second experience, the head's step times ``head_lr_scale``),
``after_training_exp`` (consolidation, importance), ``before_eval`` / ``after_eval`` (an
evaluation in the middle of an experience sees the cw the experience would consolidate now; tw
is restored after).

Hyper-parameters (defaults: the authors' AR1 configuration where it is known):

- ``si_lambda`` (lambda, >= 0): 1e4. Not the paper's: the Caffe AR1 applies F through a custom
  solver regulariser (``L2ewcMod``, source not available) and ar1-pytorch's default is 0 (AR1*
  relies on latent replay); 1e4 was picked on split_digits class-IL (docs/methods/ar1.md).
- ``xi`` (> 0): 1e-7 (``eps`` in both codes' ``update_ewc_data``).
- ``max_f`` (> 0): 1e-3 (``ewc_clip_to``, the "maxF" of the Caffe solver files, tuned there
  for the Caffe F, which is scaled differently from ours (below): sweep it with ``si_lambda``).
- ``head_lr_scale`` (>= 0): 10 (Caffe ``cwr_lr_mult`` for AR1; 1 for CWR+), applied from the
  second experience on, as the Caffe code forces it only when the second batch's solver is
  built (``inc_training_Core50.py``; batch 0 keeps the prototxt's ``lr_mult`` 1; ar1-pytorch
  has no multiplier): the head's step, hence its learning rate, times this factor
  (``core.cwr.StepScale``). Whether an experience is the first: ``total`` is None (state).
- ``gradient``: ``"full"`` (ar1-pytorch integrates ``param.grad`` after the backward of CE +
  penalty) or ``"task"`` (the penalties' gradient removed, as SI's default). The Caffe code
  reads ``param.diff`` after ``solver.apply_update()``: in BVLC Caffe that is the applied
  update u (lr-scaled, with momentum), so its F would be sum u^2 / (Delta^2 + xi) >= 0, about
  lr / (1 - momentum) times ours: an inference from BVLC's source, the authors' Caffe fork is
  not available (docs/methods/ar1.md). That variant (integrating the update) is not offered.

Deviations and choices:

- No batch renormalisation: AR1 replaces BN by BRN (and changes its momentum after the first
  batch); PyTorch has no BRN and this plugin does not change the model. BN layers train as
  usual and, as in both codes, their parameters carry no penalty.
- F is clipped at 0 from below too: ar1-pytorch clips only from above (maxF); the Caffe F is
  >= 0 by construction if it integrates updates (above). A negative F makes the penalty
  concave; with xi = 1e-7 some T reach -1.6 after two experiences and every SGD run diverged
  (split_digits, docs/methods/ar1.md).
- The premultiplier ``ewc_w`` of the Caffe code (1 in every AR1 configuration) is fixed at 1.
- Counts cur_j are the experience's labels (``dataset.targets``), not the minibatch labels.

AR1* (latent replay) is ``ar1`` composed with ``latent_replay`` (config ``plus:
[latent_replay]``; both plugins in the strategy): the memory's labels are added to cur_j when it
will be replayed (``replayed_counts``, as ar1-pytorch's ``cur_j`` over the batch and the memory),
so the replayed classes' rows start from cw and are consolidated too; the lower part frozen by
latent replay stays in the penalty's tracked set for that experience with no displacement.
- SIPlugin itself is not used: it protects every shared parameter (the single head included)
  and has no clip; this plugin drives ``PathIntegralPlugin`` on its own parameter subset.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from cl_plugins.core.checks import check_choice, check_non_negative, check_positive
from cl_plugins.core.cwr import ConsolidatedWeights, StepScale, class_counts, head_linear, \
    hold_bias_at_zero
from cl_plugins.core.latent import LatentMemory, LatentReplayBase
from cl_plugins.core.params import check_same_keys, shared_parameters, snapshot
from cl_plugins.core.path_integral import GRADIENTS, PathIntegralPlugin, StepTracker, \
    accumulator_dtype
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.state import check_settings, settings_of

Tensors = Dict[str, torch.Tensor]
_NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def protected_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Shared trainable parameters outside ``model.head`` and outside normalisation layers."""
    norm = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters()}
    return {n: p for n, p in shared_parameters(model).items()
            if not n.startswith("head.") and id(p) not in norm}


def replayed_counts(strategy, n_classes: int) -> torch.Tensor:
    """Labels per class of the latent memories that will be replayed in this experience (a
    composed ``core.latent`` plugin with a ``LatentMemory``, once it protects its lower part)."""
    out = torch.zeros(n_classes, dtype=torch.long)
    for p in getattr(strategy, "plugins", []):
        memory = getattr(p, "memory", None)
        if isinstance(p, LatentReplayBase) and isinstance(memory, LatentMemory) \
                and p.protecting and len(memory):
            out += class_counts(memory.buffer.y.cpu(), n_classes)
    return out


class AR1Plugin(PathIntegralPlugin, supports_distributed=True):
    METHOD_NAME = "ar1"
    SCENARIOS = ("domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"si_lambda": {"distribution": "log_uniform_values", "min": 1.0, "max": 1e7},
                   "max_f": {"values": [1e-4, 1e-3, 1e-2]},
                   "head_lr_scale": {"values": [1.0, 10.0]}}
    PAPER = ("Continuous learning in single-incremental-task scenarios (Maltoni & Lomonaco, "
             "Neural Networks 2019)")
    SUMMARY = ("CWR* (per-class consolidated output weights, reset and mean-shifted each "
               "experience) plus a clipped SI path-integral penalty on the layers below")
    SETTINGS = ("si_lambda", "xi", "max_f", "head_lr_scale", "gradient")

    def __init__(self, si_lambda: float = 1e4, xi: float = 1e-7, max_f: float = 1e-3,
                 head_lr_scale: float = 10.0, gradient: str = "full"):
        super().__init__()
        self.si_lambda = check_non_negative("si_lambda", si_lambda)
        self.xi = check_positive("xi", xi)
        self.max_f = check_positive("max_f", max_f)
        self.head_lr_scale = check_non_negative("head_lr_scale", head_lr_scale)
        self.gradient = check_choice("gradient", gradient, GRADIENTS)
        # a single term (clipped T, anchor), replaced after each experience
        self.quadratic_penalty = QuadraticPenalty(coef=si_lambda / 2, mode="online", gamma=0.0)
        self.cwr = ConsolidatedWeights()
        self.head_step = StepScale(head_lr_scale, "head_lr_scale")
        self.total: Optional[Tensors] = None  # T, the unclipped running sum
        self.omega: Optional[Tensors] = None  # path integral of the current experience
        self.start: Optional[Tensors] = None  # protected parameters at its start

    @property
    def who(self) -> str:
        return type(self).__name__

    def track(self, strategy) -> Dict[str, nn.Parameter]:
        params = self._params = protected_parameters(strategy.model)
        self.quadratic_penalty.to(strategy.device)
        self._steps = StepTracker(params)
        return params

    def before_training_exp(self, strategy, **kwargs):
        linear = head_linear(strategy.model, self.who)
        hold_bias_at_zero(linear)
        params = self.track(strategy)
        if self.omega is None:  # a fresh experience (not a resumed, half-trained one)
            cur = class_counts(strategy.experience.dataset.targets, linear.out_features)
            cur += replayed_counts(strategy, linear.out_features)  # AR1*: the latent memory
            self.cwr.begin(linear, cur)
            self.omega = {n: torch.zeros_like(p, dtype=accumulator_dtype(p))
                          for n, p in params.items()}
            self.start = snapshot(params)
        else:
            check_same_keys(self.omega, params, "AR1's path integral")
            self.omega = {n: t.to(strategy.device) for n, t in self.omega.items()}
            self.start = {n: t.to(strategy.device) for n, t in self.start.items()}

    def before_backward(self, strategy, **kwargs):
        if len(self.quadratic_penalty) and self._params:
            covered = self.quadratic_penalty.terms[0][0]  # parameters protected so far
            params = {n: p for n, p in self._params.items() if n in covered}
            if params:
                strategy.loss += self.quadratic_penalty.loss(params)

    def integrate(self, steps):
        for n, g, minus_step in steps:  # minus_step = theta(t) - theta(t+1)
            self.omega[n].addcmul_(g, minus_step)  # omega += -g * delta

    def before_update(self, strategy, **kwargs):
        super().before_update(strategy, **kwargs)
        if self.total is not None:  # from the second experience (Caffe: cwr_lr_mult at batch 1)
            self.head_step.before_step([head_linear(strategy.model, self.who).weight])

    def after_update(self, strategy, **kwargs):
        super().after_update(strategy, **kwargs)
        self.head_step.after_step()

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        self.cwr.end(head_linear(strategy.model, self.who))  # CWR* consolidation, head <- cw
        params = self._params  # those tracked since the start (a plugin may freeze some later)
        total = {} if self.total is None else {n: t.to(strategy.device)
                                               for n, t in self.total.items()}
        for n, p in params.items():
            moved = (p.detach() - self.start[n]).to(torch.float64)
            step = self.omega[n].to(torch.float64) / (moved.pow(2) + self.xi)
            total[n] = (total[n].to(torch.float64) + step).to(p.dtype) if n in total else \
                step.to(p.dtype)
        self.total = total
        importance = {n: total[n].clamp(0.0, self.max_f) for n in params}  # maxF clip, >= 0
        self.quadratic_penalty.terms.clear()  # one term, replaced (the tracked set may change)
        self.quadratic_penalty.add(importance, snapshot(params))
        self.omega, self.start = None, None
        self.untrack()

    def before_eval(self, strategy, **kwargs):
        self.cwr.show_provisional(head_linear(strategy.model, self.who))

    def after_eval(self, strategy, **kwargs):
        self.cwr.hide_provisional(head_linear(strategy.model, self.who))

    def state_dict(self) -> dict:
        cpu = (lambda d: None if d is None else {n: t.detach().cpu() for n, t in d.items()})
        return {**settings_of(self, self.SETTINGS), "cwr": self.cwr.state_dict(),
                "penalty": self.quadratic_penalty.state_dict(), "total": cpu(self.total),
                "omega": cpu(self.omega), "start": cpu(self.start)}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, self.SETTINGS)
        self.cwr.load_state_dict(state["cwr"])
        self.quadratic_penalty.load_state_dict(state["penalty"])
        copy = (lambda d: None if d is None else {n: t.clone() for n, t in d.items()})
        self.total, self.omega, self.start = (copy(state[k]) for k in ("total", "omega", "start"))
        self.untrack()
