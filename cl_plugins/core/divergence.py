"""Stop a run the moment its training diverges (a non-finite loss, logits or parameter).

A diverged run otherwise trains on to the end and evaluates at chance level, and its numbers
look like a result. :class:`DivergenceGuard` is an Avalanche plugin that raises
:class:`DivergenceError` instead, naming the method, seed, experience, epoch and step, with the
usual causes. The experiment runner adds it to every run (``cl-run`` writes such a run as
``diverged``); in your own script add ``DivergenceGuard()`` to the plugin list.

Cost: one check per step, of the loss alone (``math.isfinite(loss.item())``, about 10 us on
the CPU, one read on a GPU). The logits are checked through it: a NaN or +inf logit makes the
cross-entropy, and every loss over all logits (BCE, KD, MSE), non-finite, while a -inf logit is
a legitimate mask and is not reported. A fused test of the loss and the sum of the logits cost 2.5-5x
as much per step (measured inside the training loop on the P1 MLP at batch 10), with no case it
would catch that the loss misses but a -inf mask it would wrongly report. Parameters are checked
at the end of each experience (one that turns non-finite mid-experience makes the next step's
loss non-finite, so it is caught one step later).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from avalanche.core import SupervisedPlugin


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, logits or parameter."""


class DivergenceGuard(SupervisedPlugin, supports_distributed=True):
    """Raise :class:`DivergenceError` on the first non-finite loss, logits or parameter.

    ``label`` / ``seed`` only make the message say which run diverged; ``hint`` names the
    settings a user would change first (the runner passes the learning rate and the method's
    coefficients).
    """

    def __init__(self, label: str = "", seed: Optional[int] = None, hint: str = ""):
        super().__init__()
        self.label, self.seed, self.hint = label, seed, hint
        self.step = 0  # training steps in the current experience

    def before_training_exp(self, strategy, **kwargs):
        self.step = 0

    def after_update(self, strategy, **kwargs):
        self.step += 1
        loss = strategy.loss
        value = loss.item() if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):  # the step's only read (one sync on a GPU)
            logits = strategy.mb_output
            bad = torch.is_tensor(logits) and bool(torch.isnan(logits).any() |
                                                  torch.isposinf(logits).any())
            self._fail(strategy, f"non-finite loss ({value})" +
                       (" from non-finite logits" if bad else ""))

    def after_training_exp(self, strategy, **kwargs):
        bad = [n for n, p in strategy.model.named_parameters()
               if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            self._fail(strategy, f"non-finite parameters ({shown}) at the end of the experience")

    def _fail(self, strategy, what: str) -> None:
        exp = strategy.experience.current_experience if strategy.experience is not None else "?"
        epoch = getattr(strategy.clock, "train_exp_epochs", "?")
        who = " ".join(x for x in (self.label, f"seed {self.seed}" if self.seed is not None
                                   else "") if x)
        msg = (f"{who + ': ' if who else ''}training diverged at experience {exp}, epoch {epoch}, "
               f"step {self.step}: {what}. Usual causes: a learning rate too high, or a penalty "
               f"or distillation coefficient too large")
        raise DivergenceError(msg + (f" ({self.hint})." if self.hint else "."))

    def state_dict(self) -> dict:
        return {}  # nothing accumulates across experiences

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"DivergenceGuard has no state; got keys {sorted(state)}")
