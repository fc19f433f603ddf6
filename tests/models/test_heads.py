"""Heads and model assembly: masking, multi-head routing, scenario defaults."""

from __future__ import annotations

import types

import pytest
import torch

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.models import ClassifierNet, MaskedHead, build_model
from cl_plugins.models.mlp import MLP


def _exp(classes, task):
    return types.SimpleNamespace(classes_in_this_experience=classes, task_labels=[task])


def test_masked_head_seen_mask():
    head = MaskedHead(4, 6, mask="seen")
    x = torch.randn(3, 4)
    head.train()
    head.adaptation(_exp([0, 1], 0))
    out = head(x)
    assert torch.all(out[:, 2:] == -1e4) and torch.all(out[:, :2] > -1e3)
    head.eval()
    head.adaptation(_exp([2, 3], 1))  # evaluation never unmasks classes
    assert torch.all(head(x)[:, 2:] == -1e4)
    head.train()
    head.adaptation(_exp([2, 3], 1))
    assert torch.all(head(x)[:, 4:] == -1e4) and torch.all(head(x)[:, :4] > -1e3)


def test_masked_head_task_mask_routes_per_sample():
    head = MaskedHead(4, 6, mask="task")
    head.train()
    head.adaptation(_exp([0, 1, 2], 0))
    head.adaptation(_exp([3, 4, 5], 1))
    out = head(torch.randn(2, 4), torch.tensor([0, 1]))
    assert torch.all(out[0, 3:] == -1e4) and torch.all(out[0, :3] > -1e3)
    assert torch.all(out[1, :3] == -1e4) and torch.all(out[1, 3:] > -1e3)
    with pytest.raises(ValueError, match="needs the task labels"):
        head(torch.randn(2, 4))
    with pytest.raises(ValueError, match="mask must be one of"):
        MaskedHead(4, 6, mask="old")


@pytest.mark.parametrize("scenario, head_type, width", [
    ("task", "MultiHeadClassifier", 2), ("domain", "Linear", 2), ("class", "MaskedHead", 10)])
def test_build_model_head_per_scenario(scenario, head_type, width):
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    assert isinstance(model, ClassifierNet) and type(model.head).__name__ == head_type
    assert model(torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)).shape == (5, width)
    assert model.backbone.input_size == 64


def test_multihead_needs_task_labels():
    info = build_benchmark("split_digits", "class")
    with pytest.raises(ValueError, match="multihead.*needs task labels"):
        build_model({"name": "mlp", "head": "multihead"}, info)
    with pytest.raises(ValueError, match="Unknown model 'resnet'"):
        build_model({"name": "resnet"}, info)


def test_mlp_arguments_and_shape_errors():
    m = MLP(12, hidden=[5, 7], bias=False, activation="tanh")
    assert m.out_features == 7 and all(l.bias is None for l in m.layers if hasattr(l, "bias"))
    with pytest.raises(ValueError, match="MLP expects 12 input features"):
        m(torch.randn(2, 13))
    with pytest.raises(ValueError, match="model.activation must be one of"):
        MLP(4, activation="swish")
    with pytest.raises(ValueError, match=r"model.hidden\[1\] must be in \[1, inf\)"):
        MLP(4, hidden=[3, 0])


def test_ensemble_members_are_independent():
    from cl_plugins.models.ensemble import TaskEnsemble

    template = ClassifierNet(MLP(4, [3]), torch.nn.Linear(3, 2))
    ens = TaskEnsemble(template)
    ens.train()
    ens.adaptation(_exp([0, 1], 1))
    a, b = ens.members["0"], ens.members["1"]
    assert a is template and b is not a
    assert not torch.equal(a.backbone.layers[0].weight, b.backbone.layers[0].weight)
    x = torch.randn(4, 4)
    out = ens(x, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(out[:2], a(x[:2], 0)) and torch.allclose(out[2:], b(x[2:], 1))
