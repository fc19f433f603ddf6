"""Training the layers above a split layer on stored rows alone: one pass over a buffer in
minibatches, each an optimizer step (ExStream's consolidation epoch; tyler-hayes/ExStream
``ExStream._consolidate_one_epoch``).

- ``pass_batches(n, batch_size, gen)``: the row indices of one pass over ``n`` stored rows,
  shuffled by ``gen``: b = min(batch_size, n) rows a minibatch, ceil(n / b) minibatches; the last
  one is the *last b rows* of the permutation, so it overlaps the one before when b does not
  divide n and every step sees b rows (the authors' loop: ``start = min(i, n - b)``).
- ``OutputSwap(module)``: a forward hook on ``module`` (the split layer) that, while ``rows`` is
  set, replaces the module's output by ``rows``: the layers above run on the stored rows only,
  whatever the batch that went in. Registered after ``core.latent.LatentSplit``'s hook on the same
  module, it sees (and discards) that hook's result. A copied or pickled hook is inert.
- ``upper_step(strategy, swap, x, z, y, t)``: one step of the strategy's optimizer on the
  strategy's criterion of the model's output for the stored rows (z, y, t); the forward runs on
  ``x`` (one input row: the lower part's output is discarded) with task labels ``t``, as the
  template's ``forward`` does. Returns the detached loss. Other plugins' hooks do not run.

Under torch.distributed every rank holds the same buffer and draws the same permutation, and
runs each whole minibatch itself: the ranks' parameters stay identical without an all-reduce.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn


def pass_batches(n: int, batch_size: int, gen: torch.Generator) -> List[Tensor]:
    """Row indices of one shuffled pass over ``n`` rows in minibatches of min(batch_size, n)."""
    if n <= 0:
        return []
    perm = torch.randperm(n, generator=gen)
    b = min(batch_size, n)
    return [perm[min(i, n - b):min(i, n - b) + b] for i in range(0, n, b)]


def steps_per_pass(n: int, batch_size: int) -> int:
    """Optimizer steps of ``pass_batches(n, batch_size, ...)``: ceil(n / min(batch_size, n))."""
    return 0 if n <= 0 else math.ceil(n / min(batch_size, n))


class _SwapHook:
    def __init__(self, swap: Optional["OutputSwap"]):
        self.swap = swap

    def __call__(self, module, inputs, output):
        s = self.swap
        if s is None or s.rows is None:
            return None
        return s.rows.to(output.device, output.dtype)

    def __reduce__(self):
        return (_SwapHook, (None,))

    def __deepcopy__(self, memo):
        return _SwapHook(None)


class OutputSwap:
    """While ``rows`` is not None, ``module``'s output is replaced by ``rows``."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.rows: Optional[Tensor] = None
        self.handle = module.register_forward_hook(_SwapHook(self))

    def remove(self) -> None:
        self.handle.remove()
        self.rows = None


def upper_step(strategy, swap: OutputSwap, x: Tensor, z: Tensor, y: Tensor,
               t: Tensor) -> Tensor:
    """One optimizer step on the criterion of the layers above ``swap.module`` for rows ``z``."""
    model, opt = strategy.model, strategy.optimizer
    opt.zero_grad()
    swap.rows = z
    try:
        if hasattr(strategy.experience, "task_labels"):  # the template's task-aware forward
            out = avalanche_forward(model, x, t)
        else:
            out = model(x)
    finally:
        swap.rows = None
    loss = strategy._criterion(out, y)
    loss.backward()
    opt.step()
    return loss.detach()
