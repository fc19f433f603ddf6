"""Per-step bookkeeping for path-integral importances (SI, RWalk).

Both methods need, at every optimizer step, the gradient of the *task* loss ``g`` and the actual
parameter displacement ``delta = theta(t+1) - theta(t)`` (measured around the optimizer step, so
momentum and Adam are accounted for). ``StepTracker`` provides both with preallocated buffers:

- ``record_gradients`` (``after_backward``): ``param.grad`` minus the closed-form gradient of every
  quadratic penalty in the strategy (``task``), or ``param.grad`` itself (``full``). Loss terms
  that are not quadratic penalties (e.g. distillation) count as task loss;
- ``before_step`` (``before_update``) and ``displacements`` (``after_update``): yields
  ``(name, g, theta(t) - theta(t+1))`` for each tracked parameter.

``PathIntegralPlugin`` is the base of both plugins: it holds their ``quadratic_penalty``, adds it
to the loss and drives a ``StepTracker`` from the hooks; a subclass starts the tracking in
``before_training_exp`` (``track``) and accumulates each step's ``(g, -delta)`` in ``integrate``.

Per-step buffers use the parameters' dtype, at least float32: float64 updates at every step are
several times slower on CPU, and the rounding error stays around 1e-5 after 10,000 steps.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.params import shared_parameters
from cl_plugins.core.quadratic import QuadraticPenalty, penalties_of

Tensors = Dict[str, torch.Tensor]
GRADIENTS = ("task", "full")


def accumulator_dtype(p: torch.Tensor) -> torch.dtype:
    """Per-step accumulators: the parameters' dtype, at least float32."""
    return torch.promote_types(p.dtype, torch.float32)


@torch.no_grad()
def loss_gradients(strategy, params: Dict[str, torch.nn.Parameter], which: str,
                   out: Tensors) -> Tensors:
    """Write ``param.grad`` (``full``) minus every quadratic penalty's closed-form gradient
    (``task``) into the buffers ``out`` (zeros where a parameter has no gradient).

    Each penalty subtracts its gradient ``2 coef sum_k omega_k (theta - anchor_k)`` itself
    (``QuadraticPenalty.subtract_gradient``: one pass per tensor when it reuses the values of
    this step's ``loss``)."""
    for n, p in params.items():
        if p.grad is None:
            out[n].zero_()
        else:
            out[n].copy_(p.grad)
    if which == "task":
        for pen in penalties_of(strategy):
            pen.subtract_gradient(params, out)
    return out


class StepTracker:
    """Gradient and displacement of every optimizer step, for the parameters in ``params``."""

    def __init__(self, params: Dict[str, torch.nn.Parameter]):
        self.params = params
        self.grads = {n: torch.zeros_like(p, dtype=accumulator_dtype(p)) for n, p in params.items()}
        self._before = {n: torch.zeros_like(p) for n, p in params.items()}

    def record_gradients(self, strategy, which: str) -> None:
        loss_gradients(strategy, self.params, which, self.grads)

    @torch.no_grad()
    def before_step(self) -> None:
        for n, p in self.params.items():
            self._before[n].copy_(p)

    @torch.no_grad()
    def displacements(self) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, g, theta(t) - theta(t+1))``; the last tensor is a reused buffer."""
        for n, p in self.params.items():
            yield n, self.grads[n], self._before[n].sub_(p)


class PathIntegralPlugin(SupervisedPlugin):
    """Hooks shared by SI and RWalk: the penalty in ``before_backward``, the task-loss gradient
    in ``after_backward`` and the step's displacement around the optimizer step, handed to
    ``integrate(steps)`` with ``steps`` yielding ``(name, g, theta(t) - theta(t+1))``."""

    gradient = "task"  # which gradient is integrated (GRADIENTS); SI makes it a setting

    def __init__(self):
        super().__init__()
        self.quadratic_penalty: Optional[QuadraticPenalty] = None  # set by the subclass
        self._params: Optional[Dict[str, torch.nn.Parameter]] = None
        self._steps: Optional[StepTracker] = None  # gradient and displacement of each step

    def track(self, strategy) -> Dict[str, torch.nn.Parameter]:
        """Start of an experience: the shared parameters, tracked from now on; the penalty moves
        to ``strategy.device``."""
        params = self._params = shared_parameters(strategy.model)
        self.quadratic_penalty.to(strategy.device)
        self._steps = StepTracker(params)
        return params

    def untrack(self) -> None:
        self._params, self._steps = None, None

    def integrate(self, steps: Iterator[Tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Accumulate one optimizer step (each subclass's own path integral)."""
        raise NotImplementedError

    def before_backward(self, strategy, **kwargs):
        if len(self.quadratic_penalty):
            params = self._params or shared_parameters(strategy.model)
            strategy.loss += self.quadratic_penalty.loss(params)

    def after_backward(self, strategy, **kwargs):
        self._steps.record_gradients(strategy, self.gradient)

    @torch.no_grad()
    def before_update(self, strategy, **kwargs):
        self._steps.before_step()

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        self.integrate(self._steps.displacements())
