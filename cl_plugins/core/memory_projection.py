"""The plugin skeleton GEM and A-GEM share: an episodic memory and a projected step.

Both keep an ``EpisodicMemory`` filled at the end of every experience and, before each optimizer
step once the memory holds something, compute the gradients of some memory batches, flatten them
with the current gradient over the parameters any of them touches, and write back a projected
gradient when the method's constraint is violated. A subclass says which memory batches
(``reference_batches``) and how to project (``project``); the counters and the state live here.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.episodic import (EpisodicMemory, flat_gradients, memory_gradients,
                                      trainable_params, write_grads)
from cl_plugins.core.state import check_owner, owned_by


class MemoryProjectionPlugin(SupervisedPlugin):
    """Base class: ``self.memory``, ``n_steps`` (steps taken with a non-empty memory) and
    ``n_projected`` (of which the constraint was violated and the gradient rewritten)."""

    def __init__(self, memory: EpisodicMemory):
        super().__init__()
        self.memory = memory
        self.n_steps = 0
        self.n_projected = 0

    def reference_batches(self, strategy) -> List[Tuple[torch.Tensor, torch.Tensor, object]]:
        """The (x, y, task label) memory batches whose gradients constrain this step."""
        raise NotImplementedError

    def project(self, g: torch.Tensor, G: torch.Tensor) -> Optional[torch.Tensor]:
        """The projected flat gradient, or None when ``g`` already satisfies the constraints
        (``G``: one row per reference batch's flat gradient)."""
        raise NotImplementedError

    def before_update(self, strategy, **kwargs):
        if self.memory.n_experiences == 0:
            return
        batches = self.reference_batches(strategy)
        params = trainable_params(strategy.model)
        ps, g, G = flat_gradients(params, memory_gradients(strategy, params, batches))
        new = self.project(g, G)
        self.n_steps += 1
        if new is not None:
            self.n_projected += 1
            write_grads(ps, new)

    def after_training_exp(self, strategy, **kwargs):
        self.memory.add_experience(strategy.experience.dataset)

    def state_dict(self) -> dict:
        return {**owned_by(self), "memory": self.memory.state_dict(), "n_steps": self.n_steps,
                "n_projected": self.n_projected}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        self.memory.load_state_dict(state["memory"])
        self.n_steps, self.n_projected = int(state["n_steps"]), int(state["n_projected"])
