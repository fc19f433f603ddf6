"""Avalanche's SI plugin on CPU: its snapshots alias the parameters (importance stays 0);
``avalanche_si`` (AvalancheSIPlugin) copies them and gets a non-zero path integral."""

from __future__ import annotations

import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import SynapticIntelligencePlugin

from cl_plugins.baselines.avalanche_si import AvalancheSIPlugin
from cl_plugins.benchmarks import build_benchmark


def _train_one_experience(plugin):
    torch.manual_seed(0)
    info = build_benchmark("split_digits", "domain")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=32, eval_mb_size=32,
                     train_epochs=1, device="cpu", plugins=[plugin])
    strategy.train(info.benchmark.train_stream[0])
    return model, plugin


def test_stock_plugin_importance_is_zero_on_cpu():
    # Documents why the workaround exists; if Avalanche fixes the aliasing this fails, and the
    # workaround (cl_plugins/baselines/avalanche_si.py) can go.
    _, plugin = _train_one_experience(SynapticIntelligencePlugin(si_lambda=1.0))
    assert all(float(v.data.abs().max()) == 0.0 for v in plugin.ewc_data[1].values())


def test_fixed_plugin_integrates_the_path():
    model, plugin = _train_one_experience(AvalancheSIPlugin(si_lambda=1.0))
    omega = plugin.ewc_data[1]["1.weight"].data
    assert float(omega.max()) > 0.0
    # The anchor after the experience equals the weights and does not share their storage.
    anchor = plugin.ewc_data[0]["1.weight"].data
    assert torch.equal(anchor, model[1].weight.detach().flatten())
    assert anchor.data_ptr() != model[1].weight.data_ptr()


@pytest.mark.parametrize("name", ["avalanche_si"])
def test_registry_uses_the_fixed_plugin(name):
    from cl_plugins.registry import get_method

    assert get_method(name).factory is AvalancheSIPlugin
