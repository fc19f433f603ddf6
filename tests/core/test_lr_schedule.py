"""cl_plugins.core.lr_schedule: cosine annealing with warm restarts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_plugins.core.lr_schedule import cosine_warm_restarts


@pytest.mark.parametrize("t_0, t_mult", [(1, 2), (3, 1), (2, 3)])
def test_cosine_warm_restarts_is_torchs_scheduler(t_0, t_mult):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult,
                                                                 eta_min=0.01)
    expected = []
    for _ in range(40):
        expected.append(opt.param_groups[0]["lr"])
        sched.step()
    got = [cosine_warm_restarts(n, 0.3, 0.01, t_0, t_mult) for n in range(40)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    restarts = [n for n in range(1, 40) if got[n] > got[n - 1]]
    assert restarts == [n for n in range(1, 40) if expected[n] > expected[n - 1]] and restarts
