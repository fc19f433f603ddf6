"""Riemannian Walk (RWalk): Chaudhry, Dokania, Ajanthan & Torr, "Riemannian Walk for Incremental
Learning: Understanding Forgetting and Intransigence", ECCV 2018.

Name ``rwalk``. Scenarios: task-, domain- and class-IL (no task label is needed).

Equations (paper Sections 4.1-4.3), for every shared parameter i:

- EWC++ Fisher (Eq. 6): every ``delta_t`` optimizer steps,
  ``F <- alpha * F_batch + (1 - alpha) * F``, where F_batch is the squared mini-batch gradient of
  the task loss, averaged over the steps of the interval (the official code's
  ``fisher_update_after`` accumulation). F starts at 0 and runs on across tasks (it is never
  reset: that is what makes it "online");
- path score (Eq. 7): over each interval [t, t + delta_t],
  ``s += relu( DeltaL / (0.5 * F * (theta(t + delta_t) - theta(t))^2 + eps) )``, with
  ``DeltaL = sum_{steps in the interval} -g * delta_theta`` the first-order loss decrease along the
  real trajectory (g the task-loss gradient, delta_theta the displacement of each optimizer step,
  measured around the step as for SI) and F the Fisher just updated with the interval's gradients;
- at the end of task k (Eq. 8 and Section 4.3): the scores are averaged with the previous task's,
  ``s <- (s_old + s_new) / 2`` (``s <- s_new`` after the first task), then both F and s are
  normalised to [0, 1] over all shared parameters, and the importance is ``F_n + s_n``;
- penalty while training later tasks:
  ``L~ = L + lambda * sum_i (F_n,i + s_n,i) (theta_i - theta*_i)^2``, theta* the parameters at
  the end of the previous task. The importance *replaces* the previous one (it already carries
  the past through the running Fisher and the averaged scores): a
  :class:`~cl_plugins.core.quadratic.QuadraticPenalty` in ``online`` mode with ``gamma=0``.

The task-loss gradient is recovered from ``param.grad`` without a second backward pass by
subtracting the closed-form gradients of every quadratic penalty in the strategy (as SI does; loss
terms that are not quadratic penalties count as task loss).

Hooks: ``before_training_exp``, ``before_backward`` (penalty), ``after_backward`` (gradient),
``before_update`` / ``after_update`` (displacement, Fisher and score updates every ``delta_t``
steps), ``after_training_exp`` (averaging, normalisation, anchor). The per-step hooks are
:class:`~cl_plugins.core.path_integral.PathIntegralPlugin`'s (shared with SI); RWalk's own part
is ``integrate``.

Hyper-parameters (defaults = Avalanche's continual-learning-baselines RWalk run on Split MNIST
task-IL, protocol B1, which reaches 0.99):

- ``ewc_lambda`` (the paper's lambda): 0.1;
- ``alpha`` (EWC++ weight of the new batch Fisher): 0.9 (official code: ``fisher_ema_decay``);
- ``delta_t`` (steps between Fisher and score updates): 10 (official ``fisher_update_after``);
- ``eps`` (the denominator's damping): 1e-3 (official ``PARAM_XI_STEP``);
- ``normalize``: ``"max"`` (divide by the largest value) or ``"minmax"`` (the official code:
  ``(v - min) / (max - min)``). Both F and s are non-negative and their minima are ~0 in
  practice, so the two rarely differ; ``"max"`` keeps a zero importance at zero.

Deviations and choices:

- Order within an interval: the official code computes the score with the running Fisher *before*
  it absorbs the interval's gradients, so the very first interval divides by eps alone (F = 0) and
  dominates the max-normalised scores; here F is updated first.
- The official code never resets its Fisher accumulator within a task (its RWALK branch), so its
  "batch" Fisher grows with the step count; here it is the mean over the interval's steps.
- The official code's score update (``s += (s + s_new) / 2``, with the first task's scores
  doubled) differs from the paper's average after the second task; the paper's average is used.
- A last partial interval (fewer than ``delta_t`` steps before the task ends) is still scored.
- The paper's factor 1/2 in the denominator is kept (the official code drops it).
- Only shared parameters are protected. The Fisher and the scores are kept in float64; the
  per-step sums over one interval (at most ``delta_t`` terms) in the parameters' dtype (at least
  float32), which keeps the per-step cost to a few in-place float32 operations.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from cl_plugins.core.checks import (check_choice, check_int, check_non_negative, check_positive,
                                    check_range)
from cl_plugins.core.params import check_same_keys, shared_parameters, snapshot
from cl_plugins.core.path_integral import PathIntegralPlugin, accumulator_dtype
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.state import check_owner, owned_by

Tensors = Dict[str, torch.Tensor]
NORMALIZE = ("max", "minmax")
_ACCUMULATED = ("fisher", "scores", "task_scores", "interval_loss", "interval_sq_grad",
                "checkpoint")  # per-parameter tensors carried across steps and experiences


def normalized(values: Tensors, how: str) -> Tensors:
    """``values`` scaled to [0, 1] over all parameters together (Section 4.3): divided by the
    largest value (``"max"``) or ``(v - min) / (max - min)`` (``"minmax"``)."""
    hi = max(float(t.max()) for t in values.values())
    if how == "max":
        return {n: t / hi if hi > 0 else t.clone() for n, t in values.items()}
    lo = min(float(t.min()) for t in values.values())
    return {n: (t - lo) / (hi - lo + 1e-32) for n, t in values.items()}


class RWalkPlugin(PathIntegralPlugin, supports_distributed=True):
    METHOD_NAME = "rwalk"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"ewc_lambda": {"distribution": "log_uniform_values", "min": 0.01, "max": 1e4},
                   "alpha": {"values": [0.5, 0.9]}}
    PAPER = "Riemannian Walk (Chaudhry, Dokania, Ajanthan & Torr, ECCV 2018)"
    SUMMARY = ("quadratic penalty weighted by an online (EWC++) Fisher plus a KL-normalised "
               "path-integral score")

    def __init__(self, ewc_lambda: float = 0.1, alpha: float = 0.9, delta_t: int = 10,
                 eps: float = 1e-3, normalize: str = "max"):
        super().__init__()
        self.ewc_lambda = check_non_negative("ewc_lambda", ewc_lambda)
        self.alpha = check_range("alpha", alpha, 0.0, 1.0, low_inclusive=False)
        self.delta_t = check_int("delta_t", delta_t, 1)
        self.eps = check_positive("eps", eps)
        self.normalize = check_choice("normalize", normalize, NORMALIZE)
        self.quadratic_penalty = QuadraticPenalty(coef=ewc_lambda, mode="online", gamma=0.0)
        self.fisher: Optional[Tensors] = None  # running EWC++ Fisher, float64
        self.scores: Optional[Tensors] = None  # averaged scores of the finished tasks, float64
        self.n_experiences = 0
        # Within a task: the scores so far (float64); over the current interval, the loss decrease
        # and the sum of squared gradients (parameters' dtype, at least float32: they sum at most
        # delta_t terms), the parameters at its start, and its number of steps.
        self.task_scores: Optional[Tensors] = None
        self.interval_loss: Optional[Tensors] = None
        self.interval_sq_grad: Optional[Tensors] = None
        self.checkpoint: Optional[Tensors] = None
        self.interval_steps = 0

    # ------------------------------------------------------------------------------- hooks

    def before_training_exp(self, strategy, **kwargs):
        params = self.track(strategy)
        dev = strategy.device
        if self.fisher is None:
            self.fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        if self.task_scores is None:  # a fresh task (not a resumed, half-trained one)
            self.task_scores = {n: torch.zeros_like(p, dtype=torch.float64)
                                for n, p in params.items()}
            self.interval_loss = {n: torch.zeros_like(p, dtype=accumulator_dtype(p))
                                  for n, p in params.items()}
            self.interval_sq_grad = {n: torch.zeros_like(p, dtype=accumulator_dtype(p))
                                     for n, p in params.items()}
            self.checkpoint, self.interval_steps = snapshot(params), 0
        for name in _ACCUMULATED:
            state = getattr(self, name)
            if state is not None:
                check_same_keys(state, params, f"RWalk's {name}")
                setattr(self, name, {n: t.to(dev) for n, t in state.items()})

    def integrate(self, steps):
        for n, g, minus_step in steps:  # minus_step = theta(t) - theta(t+1)
            self.interval_loss[n].addcmul_(g, minus_step)  # += -g * delta
            self.interval_sq_grad[n].addcmul_(g, g)
        self.interval_steps += 1
        if self.interval_steps == self.delta_t:
            self._close_interval(self._params)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        params = shared_parameters(strategy.model)
        check_same_keys(params, self.task_scores, "RWalk's scores")
        if self.interval_steps:
            self._close_interval(params)
        if self.scores is None:
            self.scores = self.task_scores
        else:
            self.scores = {n: 0.5 * (self.scores[n] + self.task_scores[n])  # Eq. 8
                           for n in self.scores}
        fisher_n = normalized(self.fisher, self.normalize)
        scores_n = normalized(self.scores, self.normalize)
        importance = {n: (fisher_n[n] + scores_n[n]).to(p.dtype) for n, p in params.items()}
        self.quadratic_penalty.add(importance, snapshot(params))
        self.n_experiences += 1
        self.task_scores = self.interval_loss = self.interval_sq_grad = self.checkpoint = None
        self.interval_steps = 0
        self.untrack()

    # ------------------------------------------------------------------------------- helpers

    def _close_interval(self, params) -> None:
        """EWC++ Fisher update, then the interval's score (Eqs. 6-7), in float64."""
        a, k = self.alpha, self.interval_steps
        for n, p in params.items():
            f = self.fisher[n]
            f.mul_(1.0 - a).add_(self.interval_sq_grad[n].to(torch.float64), alpha=a / k)
            moved = (p.detach() - self.checkpoint[n]).to(torch.float64)
            score = self.interval_loss[n].to(torch.float64) / (0.5 * f * moved.pow(2) + self.eps)
            self.task_scores[n].add_(score.clamp_(min=0.0))
            self.interval_loss[n].zero_()
            self.interval_sq_grad[n].zero_()
            self.checkpoint[n].copy_(p.detach())
        self.interval_steps = 0

    def state_dict(self) -> dict:
        cpu = (lambda d: None if d is None else {n: t.detach().cpu() for n, t in d.items()})
        return {**owned_by(self), "penalty": self.quadratic_penalty.state_dict(),
                "tasks_done": self.n_experiences, "interval_steps": self.interval_steps,
                **{name: cpu(getattr(self, name)) for name in _ACCUMULATED}}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        self.quadratic_penalty.load_state_dict(state["penalty"])
        copy = (lambda d: None if d is None else {n: t.clone() for n, t in d.items()})
        for name in _ACCUMULATED:
            setattr(self, name, copy(state[name]))
        self.n_experiences = int(state["tasks_done"])
        self.interval_steps = int(state["interval_steps"])
        self.untrack()
