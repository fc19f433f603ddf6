"""Per-sample gradients equal a Python loop of ordinary backward passes."""

from __future__ import annotations

import torch

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.params import shared_parameters
from cl_plugins.core.per_sample import cross_entropy_sample, per_sample_gradients
from cl_plugins.models import build_model


def test_matches_loop_on_multihead_model():
    torch.manual_seed(0)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [7]}, info).double().eval()
    params = shared_parameters(model)
    assert set(params) == {"backbone.layers.0.weight", "backbone.layers.0.bias"}
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    got = per_sample_gradients(model, params, x, y, cross_entropy_sample, task_label=0)
    for i in range(5):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[i:i + 1], 0), y[i:i + 1])
        loss.backward()
        for n, p in params.items():
            assert torch.allclose(got[n][i], p.grad, atol=1e-12), n


def test_shared_parameters_keep_single_heads():
    info = build_benchmark("split_digits", "class")
    model = build_model({"name": "mlp", "hidden": [7]}, info)
    assert "head.linear.weight" in shared_parameters(model)
