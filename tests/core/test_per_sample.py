"""Per-sample gradients equal a Python loop of ordinary backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


class _TwiceNet(nn.Module):
    """A Linear used twice (weight sharing): its per-sample gradient is not one outer product."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.conv = nn.Conv2d(1, 2, 2)
        self.out = nn.Linear(4 + 2 * 9, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(x.flatten(1)[:, :4]))))
        c = torch.relu(self.conv(x[:, :, :4, :4])).flatten(1)
        return self.out(torch.cat([h, c], 1))


@pytest.mark.parametrize("transform", ["square", "abs"])
@pytest.mark.parametrize("weighted", [False, True])
def test_per_sample_gradient_sums_match_the_per_sample_gradients(transform, weighted):
    from cl_plugins.core.per_sample import per_sample_gradient_sums

    torch.manual_seed(0)
    f = (lambda g: g.pow(2)) if transform == "square" else torch.abs
    x = torch.randn(7, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    w = torch.rand(7, dtype=torch.float64) if weighted else None
    for model in (nn.Sequential(nn.Flatten(), nn.Linear(25, 6), nn.ReLU(), nn.Linear(6, 3)),
                  _TwiceNet()):
        model = model.double().eval()
        params = dict(model.named_parameters())
        want = per_sample_gradients(model, params, x, y, cross_entropy_sample)
        got = per_sample_gradient_sums(model, params, x, y, cross_entropy_sample,
                                       transform=transform, weights=w)
        assert list(got) == list(params)
        for n, g in want.items():
            ref = (torch.tensordot(w, f(g), dims=1) if weighted else f(g).sum(0))
            assert torch.allclose(got[n], ref, rtol=1e-10, atol=1e-12), n
    with pytest.raises(ValueError, match="transform"):
        per_sample_gradient_sums(model, params, x, y, cross_entropy_sample, transform="cube")
