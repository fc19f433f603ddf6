"""Train for a fixed number of iterations per experience instead of a number of epochs.

Protocols such as van de Ven et al. (2,000 iterations per task) and van de Ven & Tolias 2018
(5,000) count optimizer steps, not epochs. The plugin sets the epoch count high enough and stops
training after exactly ``n_iterations`` steps (``after_training_iteration``).
"""

from __future__ import annotations

import math

from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import check_int


class IterationBudgetPlugin(SupervisedPlugin, supports_distributed=True):
    def __init__(self, n_iterations: int):
        super().__init__()
        self.n_iterations = check_int("n_iterations", n_iterations, 1)
        self.done = 0

    def before_training_exp(self, strategy, **kwargs):
        self.done = 0
        per_epoch = max(1, len(strategy.dataloader))
        strategy.train_epochs = math.ceil(self.n_iterations / per_epoch)

    def after_training_iteration(self, strategy, **kwargs):
        self.done += 1
        if self.done >= self.n_iterations:
            strategy.stop_training()
