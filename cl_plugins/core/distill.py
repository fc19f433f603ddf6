"""Knowledge-distillation losses shared by LwF, iCaRL, DER and the distillation family."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            scale_t2: bool = True) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), mean over the batch.

    Multiplied by T^2 when ``scale_t2`` (Hinton et al. 2015): the gradient of the softened loss
    scales as 1/T^2, so the factor keeps its weight comparable to the hard-label loss when T
    changes. Teacher logits are treated as constants.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / t, dim=1)
    loss = F.kl_div(log_p_student, p_teacher, reduction="batchmean")
    return loss * (t * t) if scale_t2 else loss
