"""cl_plugins.core.reinit: back to the initial weights, tensors grown, new or reshaped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_plugins.core.reinit import restore_initial_weights


def test_restore_initial_weights_grown_new_and_reshaped_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    saved = {}
    restore_initial_weights(model, saved)  # first call: stores, changes nothing
    assert set(saved) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                          "1.running_var", "1.num_batches_tracked"}
    init_w = saved["0.weight"].clone()
    model(torch.randn(8, 3))  # running statistics move
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[0].weight.data = torch.cat([model[0].weight, torch.full((1, 3), 7.0)])  # grown
    model.add_module("2", nn.Linear(2, 2))  # new since the copy
    fresh = model[2].weight.detach().clone()
    restore_initial_weights(model, saved)
    assert torch.equal(model[0].weight[:2], init_w) and bool((model[0].weight[2] == 7.0).all())
    assert torch.equal(saved["0.weight"], model[0].weight.detach())  # the copy grew with it
    assert torch.equal(model[1].running_mean, torch.zeros(2)) and "2.weight" in saved
    assert torch.equal(model[2].weight, fresh)
    model[0].weight.data = torch.zeros(2, 3)  # shrunk: refused, naming the owner
    with pytest.raises(ValueError, match="Owner cannot reset '0.weight'"):
        restore_initial_weights(model, saved, "Owner")
