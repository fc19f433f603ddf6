"""Distillation mechanics shared by methods that learn from a frozen teacher (LwF, iCaRL).

- ``kd_loss``: the softened KL between a teacher's and a student's logits;
- ``teacher_state`` / ``restore_teacher``: save a frozen teacher (the model that ended the
  previous experience) in a plugin state, and rebuild it from a copy of the model after
  ``load_state_dict`` (the plugin has no model when it loads);
- ``replace_criterion`` / ``restore_criterion``: a plugin whose loss *replaces* the strategy's
  criterion while it trains (iCaRL's BCE with distillation targets) instead of adding a term.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_plugins.core.replay_loader import describe
from cl_plugins.core.snapshot import frozen_copy


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            scale_t2: bool = True, per_column: bool = False) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), mean over the batch.

    Multiplied by T^2 when ``scale_t2`` (Hinton et al. 2015): the gradient of the softened loss
    scales as 1/T^2, so the factor keeps its weight comparable to the hard-label loss when T
    changes. Teacher logits are treated as constants.

    A teacher with fewer columns than the student stands for the student's leading columns: its
    probabilities are padded with zeros for the others, while the student's softmax spans all of
    its columns (so the padded columns' logits are pushed down). Padded entries contribute 0.

    ``per_column``: also divide by the student's number of columns (a mean over the batch and the
    columns, as van de Ven's 2018 ``loss_fn_kd``).
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    pad = student_logits.shape[1] - p_teacher.shape[1]
    if pad > 0:
        p_teacher = torch.cat([p_teacher, p_teacher.new_zeros(p_teacher.shape[0], pad)], dim=1)
    loss = F.kl_div(log_p_student, p_teacher, reduction="batchmean")
    loss = loss * (t * t) if scale_t2 else loss
    return loss / student_logits.shape[1] if per_column else loss


# ------------------------------------------------------------------------------ saved teachers


def teacher_state(teacher: Optional[nn.Module],
                  pending: Optional[Dict[str, torch.Tensor]]) -> Optional[Dict[str, torch.Tensor]]:
    """What a plugin state stores for its teacher: a CPU copy of ``teacher``'s state dict, or of
    ``pending`` (a loaded teacher state not rebuilt yet), or None when there is neither."""
    if teacher is not None:
        return {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
    return None if pending is None else {k: v.clone() for k, v in pending.items()}


def restore_teacher(model: nn.Module, saved: Dict[str, torch.Tensor], who: str,
                    may_lack: Callable[[str], bool] = lambda key: False) -> nn.Module:
    """``frozen_copy(model)`` holding the saved teacher state ``saved``.

    ``may_lack(key)``: keys of ``model`` that ``saved`` may miss (the copy keeps the model's
    values there). Any other difference raises ``ValueError`` naming ``who``."""
    teacher = frozen_copy(model)
    own = teacher.state_dict()
    unexpected = sorted(set(saved) - set(own))
    missing = [k for k in sorted(set(own) - set(saved)) if not may_lack(k)]
    if unexpected or missing:
        raise ValueError(f"{who}: the saved teacher does not fit the model: unexpected keys "
                         f"{unexpected[:5]}, missing keys {missing[:5]}")
    try:
        teacher.load_state_dict(saved, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{who}: the saved teacher does not fit the model: {err}") from err
    return teacher


# ------------------------------------------------------------------------------ criterion swap


class TrainingCriterion:
    """Stands in for a strategy's criterion while ``owner`` trains: ``loss(output, y)`` during
    training, the original criterion ``base`` otherwise (evaluation during training)."""

    def __init__(self, owner, strategy, base, loss: Callable):
        self.owner, self.strategy, self.base, self.loss = owner, strategy, base, loss

    def __call__(self, output, y):
        if not self.strategy.is_training:
            return self.base(output, y)
        return self.loss(output, y)


def replace_criterion(strategy, owner, loss: Callable) -> None:
    """Make ``loss(mb_output, mb_y)`` the strategy's criterion during training; other plugins'
    terms are still added to it in ``before_backward``. Only one plugin may do so: a second
    ``owner`` raises ``ValueError``. Undo with ``restore_criterion``."""
    # Avalanche's criterion() is self._criterion(mb_output, mb_y), with no public setter.
    crit = strategy._criterion
    if isinstance(crit, TrainingCriterion):
        if crit.owner is not owner:
            raise ValueError(f"Two plugins want to replace the strategy's criterion: "
                             f"{describe(owner)} and {describe(crit.owner)}; keep one")
        crit = crit.base  # left installed by an interrupted experience
    strategy._criterion = TrainingCriterion(owner, strategy, crit, loss)


def restore_criterion(strategy, owner) -> None:
    """Put back the criterion that ``replace_criterion(strategy, owner, ...)`` replaced."""
    crit = strategy._criterion  # see replace_criterion: the only handle on Avalanche's criterion
    if isinstance(crit, TrainingCriterion) and crit.owner is owner:
        strategy._criterion = crit.base
