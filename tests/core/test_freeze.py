"""core.freeze: everything but the kept part frozen and in eval mode; the kept part's own flags
left alone; a module that is not part of the model is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_plugins.core.freeze import freeze_all_but


def test_everything_but_the_kept_part_is_frozen_and_in_eval_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    head = model[3]
    head.bias.requires_grad_(False)  # e.g. a bias held at 0: must stay out of training
    model.train()
    frozen = freeze_all_but(model, head)
    assert frozen == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert not any(p.requires_grad for p in model[:3].parameters())
    assert head.weight.requires_grad and not head.bias.requires_grad
    assert not model.training and not model[1].training and not model[2].training
    assert head.training
    stats = model[1].running_mean.clone()
    model(torch.randn(8, 3)).sum().backward()  # BN statistics fixed, no gradient below
    assert torch.equal(model[1].running_mean, stats) and model[0].weight.grad is None
    assert head.weight.grad is not None


def test_a_module_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="not a submodule"):
        freeze_all_but(nn.Linear(2, 2), nn.Linear(2, 2))
