"""One network per task: the 'separate networks' baseline as a dynamic model."""

from __future__ import annotations

import copy

import torch
from avalanche.models import MultiTaskModule, avalanche_forward
from torch import nn


def _reinitialise(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class TaskEnsemble(MultiTaskModule):
    """Holds ``members[str(task)]``, one copy of ``template`` per task label.

    The first task uses ``template`` itself; each later task gets a deep copy whose parameters
    are re-initialised, so networks share nothing but their architecture. Members are created
    in ``adaptation`` (train or eval), before Avalanche refreshes the optimizer.
    """

    def __init__(self, template: nn.Module):
        super().__init__()
        self._pristine = [copy.deepcopy(template)]  # list: keep it out of parameters()
        self.members = nn.ModuleDict({"0": template})

    def adaptation(self, experience):
        super().adaptation(experience)
        for t in sorted(set(int(t) for t in experience.task_labels)):
            if str(t) not in self.members:
                member = copy.deepcopy(self._pristine[0])
                _reinitialise(member)
                self.members[str(t)] = member.to(next(self.parameters()).device)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        key = str(int(task_label))
        if key not in self.members:
            raise ValueError(f"TaskEnsemble has no network for task {key}; known tasks: "
                             f"{sorted(self.members, key=int)}")
        member = self.members[key]
        return avalanche_forward(member, x, torch.full((x.shape[0],), int(task_label),
                                                       dtype=torch.long, device=x.device))
