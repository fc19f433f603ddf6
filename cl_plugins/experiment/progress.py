"""Progress bars (tqdm) for training iterations and evaluation experiences."""

from __future__ import annotations

import sys

from avalanche.core import SupervisedPlugin


class ProgressBarPlugin(SupervisedPlugin, supports_distributed=True):
    def __init__(self, label: str):
        super().__init__()
        self.label = label
        self._bar = None

    def _open(self, total, desc):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr,
                         dynamic_ncols=True, mininterval=0.5)

    def _close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def before_training_exp(self, strategy, **kwargs):
        # One bar per experience; registered last, so an iteration budget has set the epochs.
        total = strategy.train_epochs * len(strategy.dataloader)
        self._open(total, f"{self.label} train exp {strategy.experience.current_experience}")

    def after_training_iteration(self, strategy, **kwargs):
        if self._bar is not None:
            self._bar.update(1)

    def after_training_exp(self, strategy, **kwargs):
        self._close()

    def before_eval(self, strategy, **kwargs):
        self._open(None, f"{self.label} eval")

    def after_eval_exp(self, strategy, **kwargs):
        if self._bar is not None:
            self._bar.update(1)

    def after_eval(self, strategy, **kwargs):
        self._close()
