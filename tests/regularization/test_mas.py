"""MAS (Aljundi et al. 2018): the importance against closed forms and a per-sample loop, masked
heads, the penalty gradient, state round trip, arguments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.core.params import shared_parameters
from cl_plugins.registry import signature_defaults
from cl_plugins.regularization.mas import MASPlugin

from helpers import (Driver, check_penalty_gradient_matches_finite_differences,
                     check_registry_header, check_state_round_trip_resumes_identically,
                     toy_experience)


# ------------------------------------------------------------------------------------ MAS

def test_mas_importance_linear_model_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).double()
    exp = toy_experience(n=13, d=5, classes=(0, 1, 2))
    mas = MASPlugin(importance_batch_size=4)  # chunking must not change the result
    params = shared_parameters(model)
    x, W = exp.dataset.tensors[0], model.weight.detach()
    # d ||W x||^2 / dW = 2 (W x) x^T, averaged in absolute value over the samples
    want = (2 * (x @ W.T).unsqueeze(2) * x.unsqueeze(1)).abs().mean(0)
    got = mas.importance(model, params, exp.dataset, [0, 1, 2], 0, torch.device("cpu"))
    assert torch.allclose(got["weight"], want, atol=1e-12)
    # only class 1's output: rows of the other outputs get no importance
    got1 = mas.importance(model, params, exp.dataset, [1], 0, torch.device("cpu"))
    assert torch.allclose(got1["weight"][1], want[1], atol=1e-12)
    assert torch.all(got1["weight"][[0, 2]] == 0)
    mean = MASPlugin(output_reduction="mean").importance(model, params, exp.dataset, [0, 1, 2],
                                                         0, torch.device("cpu"))
    assert torch.allclose(mean["weight"], want / 3, atol=1e-12)
    assert model.training  # train mode restored


def test_mas_masked_head_ignores_masked_logits_and_accumulates():
    from cl_plugins.benchmarks import build_benchmark
    from cl_plugins.models import build_model

    torch.manual_seed(0)
    info = build_benchmark("split_digits", "class")
    model = build_model({"name": "mlp", "hidden": [6]}, info).double()
    exp0 = info.benchmark.train_stream[0]
    model.head.adaptation(exp0)  # classes of experience 0 unmasked, the other 8 at -1e4
    classes = sorted(exp0.classes_in_this_experience)
    x = torch.stack([exp0.dataset[i][0] for i in range(6)]).double()
    exp = SimpleNamespace(dataset=TensorDataset(x, torch.zeros(6, dtype=torch.long),
                                                torch.zeros(6, dtype=torch.long)),
                          classes_in_this_experience=classes, task_labels=[0])
    mas = MASPlugin(mas_lambda=2.0)
    drv = Driver(model, [mas], torch.optim.SGD(model.parameters(), lr=0.1), exp)
    drv.call("after_training_exp")
    params = shared_parameters(model)
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for i in range(6):  # a plain loop over samples, using the unmasked logits only
        out = model(x[i:i + 1], 0)
        assert (out == -1e4).sum() == 8
        grads = torch.autograd.grad(out[:, classes].pow(2).sum(), list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            want[n] += g.abs() / 6
    model.train()
    importance = mas.quadratic_penalty.terms[0][0]
    for n in params:
        assert torch.allclose(importance[n], want[n], atol=1e-10), n
    drv.call("after_training_exp")  # a second task: importances add up
    for n in params:
        assert torch.allclose(mas.quadratic_penalty.terms[0][0][n], 2 * want[n], atol=1e-10)
    assert mas.seen_classes == classes


def test_mas_says_when_a_class_has_no_output_unit():
    model = nn.Linear(5, 2, bias=False).double()
    exp = toy_experience(n=4, d=5, classes=(0, 3))
    with pytest.raises(ValueError, match="class 3 of the experience has no output unit; the model "
                                         "gives 2 outputs"):
        MASPlugin().importance(model, shared_parameters(model), exp.dataset, [0, 3], 0,
                               torch.device("cpu"))


# ------------------------------------------------------------------- penalties, state, args

def test_penalty_gradient_matches_finite_differences():
    check_penalty_gradient_matches_finite_differences(MASPlugin)


def test_state_round_trip_resumes_identically():
    check_state_round_trip_resumes_identically(MASPlugin)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"mas_lambda": "big"}, r"mas_lambda must be a number"),
    ({"outputs": "all"}, r"outputs must be one of 'experience', 'seen'"),
    ({"output_reduction": "max"}, r"output_reduction must be one of"),
    ({"importance_batch_size": 0}, r"importance_batch_size must be in \[1, inf\)"),
])
def test_bad_arguments_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MASPlugin(**kwargs)


def test_registry_header():
    check_registry_header(MASPlugin)
    assert signature_defaults(MASPlugin)["mas_lambda"] == 1.0  # the S1 task-IL protocol's
