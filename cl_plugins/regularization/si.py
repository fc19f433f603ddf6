"""Synaptic Intelligence (SI): Zenke, Poole & Ganguli, "Continual Learning Through Synaptic
Intelligence", ICML 2017.

Name ``si``. Scenarios: task-, domain- and class-IL (no task label is needed).

Equations (the paper's Eqs. 3-5, discrete time), for every shared parameter i:

- path integral accumulated while training on task mu (Eq. 3),
  ``omega_i^mu = sum_t -g_i(t) * delta_i(t)``,
  with g(t) the gradient of the *task* loss at step t and
  ``delta_i(t) = theta_i(t+1) - theta_i(t)`` the change the optimizer step really made. The
  displacement is measured around the step (snapshot in ``before_update``, difference in
  ``after_update``), so momentum, Adam, weight decay and gradient projections by other plugins are
  all accounted for: the path integral follows the true trajectory, not ``-lr * g``;
- importance after task mu (Eq. 5):
  ``Omega_i <- Omega_i + omega_i^mu / ((Delta_i^mu)^2 + xi)``, with
  ``Delta_i^mu = theta_i(end of task mu) - theta_i(start of task mu)`` and xi the damping term
  (the paper's xi; van de Ven et al. call it epsilon); omega is then reset;
- surrogate loss on the next task (Eq. 4): ``L~ = L + c * sum_i Omega_i (theta_i - theta~_i)^2`` with
  theta~ the parameters at the end of the previous task (no factor 1/2, as in the paper). This is
  a :class:`~cl_plugins.core.quadratic.QuadraticPenalty` in ``accumulate`` mode.

Which gradient (``gradient``):

- ``"task"`` (default, the paper and its official code): the gradient of the task loss alone. It is
  recovered from ``param.grad`` *without a second backward pass*: in ``after_backward``
  (``param.grad`` is final, the optimizer has not stepped yet) the closed-form gradient of every
  quadratic penalty in the strategy (``penalties_of(strategy)``: SI's own, EWC's, MAS's, RWalk's)
  is subtracted. Loss terms that are not quadratic penalties (a distillation term of LwF, a replay
  loss, ...) are counted as part of the task loss.
- ``"full"``: the gradient of the whole loss, penalties included; this is what van de Ven et al.'s
  code and Avalanche's ``SynapticIntelligencePlugin`` integrate (protocols S2, B1).

Hooks: ``before_training_exp`` (start snapshot), ``before_backward`` (adds the penalty),
``after_backward`` (gradient), ``before_update`` / ``after_update`` (displacement, path integral),
``after_training_exp`` (importance, anchor). The per-step hooks are
:class:`~cl_plugins.core.path_integral.PathIntegralPlugin`'s (shared with RWalk); SI's own part
is ``integrate`` (Eq. 3).

Hyper-parameters (defaults = protocol S1 task-IL, Hsu et al. 2018):

- ``si_lambda`` (the paper's c): 300. S1 uses 300 / 3000 / 600 (task / domain / class-IL); S2
  (van de Ven et al. 2022) 10 / 5e4 / 5e3; R1 (DER, Mammoth) 1.0.
- ``xi``: 0.1 (S2's epsilon 0.1; R1 uses xi 1.0).
- ``gradient``: ``"task"``.

Deviations and choices:

- Only shared parameters are protected (``shared_parameters``): a task-specific head is trained on
  its own task only and gets no gradient later, so it needs no consolidation.
- omega is accumulated per step in the parameters' dtype (at least float32), in preallocated
  buffers: a float32 sum over n steps has a relative rounding error of about sqrt(n) * 6e-8
  (1e-5 at 10^4 steps), far below the estimate's own noise, while per-step float64 updates cost
  several times more on CPU. The importance itself is computed in float64 and stored in the
  parameters' dtype.
- Negative path-integral contributions are kept, as in the paper (no clipping at 0).
- Optimizer weight decay moves the parameters but is not part of ``param.grad``: its displacement
  enters ``delta``, not ``g``, as with any gradient that is computed outside the loss.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from cl_plugins.core.checks import check_choice, check_non_negative, check_positive
from cl_plugins.core.params import check_same_keys, shared_parameters, snapshot
from cl_plugins.core.path_integral import GRADIENTS, PathIntegralPlugin, accumulator_dtype
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.state import check_owner, owned_by

Tensors = Dict[str, torch.Tensor]


class SIPlugin(PathIntegralPlugin, supports_distributed=True):
    METHOD_NAME = "si"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"si_lambda": {"distribution": "log_uniform_values", "min": 0.1, "max": 1e5},
                   "xi": {"values": [0.001, 0.1, 1.0]}}
    PAPER = "Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017)"
    SUMMARY = ("quadratic penalty weighted by each parameter's path-integral contribution to the "
               "loss decrease, normalised by its squared total change")

    def __init__(self, si_lambda: float = 300.0, xi: float = 0.1, gradient: str = "task"):
        super().__init__()
        self.si_lambda = check_non_negative("si_lambda", si_lambda)
        self.xi = check_positive("xi", xi)
        self.gradient = check_choice("gradient", gradient, GRADIENTS)
        self.quadratic_penalty = QuadraticPenalty(coef=si_lambda, mode="accumulate")
        self.omega: Optional[Tensors] = None  # path integral of the current task
        self.start: Optional[Tensors] = None  # parameters at the start of the current task

    def before_training_exp(self, strategy, **kwargs):
        params = self.track(strategy)
        if self.omega is None:  # a fresh task (not a resumed, half-trained one)
            self.omega = {n: torch.zeros_like(p, dtype=accumulator_dtype(p))
                          for n, p in params.items()}
            self.start = snapshot(params)
        else:
            check_same_keys(self.omega, params, "SI's path integral")
            self.omega = {n: t.to(strategy.device) for n, t in self.omega.items()}
            self.start = {n: t.to(strategy.device) for n, t in self.start.items()}

    def integrate(self, steps):
        for n, g, minus_step in steps:  # minus_step = theta(t) - theta(t+1)
            self.omega[n].addcmul_(g, minus_step)  # Eq. 3: += -g * delta

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        params = shared_parameters(strategy.model)
        check_same_keys(params, self.omega, "SI's path integral")
        importance = {}
        for n, p in params.items():  # Eq. 5
            total = (p.detach() - self.start[n]).to(torch.float64)
            omega = self.omega[n].to(torch.float64)
            importance[n] = (omega / (total.pow(2) + self.xi)).to(p.dtype)
        self.quadratic_penalty.add(importance, snapshot(params))  # Eq. 4's anchor theta~
        self.omega, self.start = None, None
        self.untrack()

    def state_dict(self) -> dict:
        cpu = (lambda d: None if d is None else {n: t.detach().cpu() for n, t in d.items()})
        return {**owned_by(self), "penalty": self.quadratic_penalty.state_dict(),
                "omega": cpu(self.omega), "start": cpu(self.start)}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        self.quadratic_penalty.load_state_dict(state["penalty"])
        copy = (lambda d: None if d is None else {n: t.clone() for n, t in d.items()})
        self.omega, self.start = copy(state["omega"]), copy(state["start"])
        self.untrack()
