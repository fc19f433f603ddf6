"""SCP (Kolouri et al. 2020): the sliced importance by hand, the penalty, state, end to end,
arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cl_plugins.core.params import shared_parameters
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.registry import MethodSpec
from cl_plugins.regularization.scp import SCPPlugin

from helpers import (adapt_double, check_state_round_trip_and_identical_continuation, digits_model,
                     finish_experience, first_inputs)


# ------------------------------------------------------------------------------ SCP math

def _loader(x, batch_size):
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)),
                      batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("n_slices", [1, 3])  # L < d and L >= d take different paths
def test_scp_importance_by_hand_on_a_linear_model(n_slices):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    xi = torch.randn(n_slices, 2, dtype=torch.float64)
    xi = xi / xi.norm(dim=1, keepdim=True)
    gamma = SCPPlugin(n_slices=n_slices, seed=0).importance(model, _loader(x, 4), slices=xi)
    # phi(x) = W x + b; d <xi, mean phi> / dW = xi xbar^T, / db = xi
    xbar = x.mean(0)
    want_w = (xi.pow(2).mean(0)[:, None] * xbar.pow(2)[None, :])
    want_b = xi.pow(2).mean(0)
    assert torch.allclose(gamma["weight"], want_w, atol=1e-14)
    assert torch.allclose(gamma["bias"], want_b, atol=1e-14)


def test_scp_importance_is_the_sliced_mean_output_gradient_on_an_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(13, 4, dtype=torch.float64)
    plugin = SCPPlugin(n_slices=7, seed=3)
    xi = SCPPlugin(n_slices=7, seed=3).draw_slices(3)  # the same generator state
    gamma = plugin.importance(model, _loader(x, 5))
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for l in range(7):  # the definition, one slice at a time, on the whole data at once
        model.zero_grad()
        (model(x).mean(0) @ xi[l]).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad.pow(2) / 7
    for n in want:
        assert torch.allclose(gamma[n], want[n], atol=1e-14), n
    # a different number of slices than outputs takes the other path: same definition
    g2 = SCPPlugin(n_slices=2, seed=0).importance(model, _loader(x, 13), slices=xi[:2])
    want2 = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for l in range(2):
        model.zero_grad()
        (model(x).mean(0) @ xi[l]).backward()
        for n, p in model.named_parameters():
            want2[n] += p.grad.pow(2) / 2
    for n in want2:
        assert torch.allclose(g2[n], want2[n], atol=1e-14), n


def test_scp_slices_come_from_the_seeded_generator():
    got = SCPPlugin(n_slices=5, seed=11).draw_slices(4)
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.equal(got, g / g.norm(dim=1, keepdim=True))
    assert torch.allclose(got.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_scp_multihead_uses_the_task_head_and_masked_heads_their_open_columns(digits_benchmarks):
    info = digits_benchmarks["task"]
    model = digits_model(info)
    for e in range(2):
        adapt_double(model, info.benchmark.train_stream[e])
    x = first_inputs(info, 1, n=12)
    xi = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    gamma = SCPPlugin(n_slices=2, seed=0).importance(model, _loader(x, 5), task_label=1,
                                                     slices=xi)
    assert set(gamma) == set(shared_parameters(model))  # heads are not penalised
    want = {n: torch.zeros_like(p) for n, p in shared_parameters(model).items()}
    for l in range(2):
        model.zero_grad()
        (model(x, 1).mean(0) @ xi[l]).backward()
        for n, p in shared_parameters(model).items():
            want[n] += p.grad.pow(2) / 2
    for n in want:
        assert torch.allclose(gamma[n], want[n], atol=1e-14), n

    info = digits_benchmarks["class"]
    model = digits_model(info)
    model.train()
    adapt_double(model, info.benchmark.train_stream[0])  # 2 of 10 classes open
    x = first_inputs(info, 0)
    g = SCPPlugin(n_slices=2, seed=0).importance(model, _loader(x, 8), task_label=0, slices=xi)
    assert g["head.linear.weight"][2:].abs().max() == 0 and g["head.linear.weight"][:2].sum() > 0
    want = {n: torch.zeros_like(p) for n, p in shared_parameters(model).items()}
    for l in range(2):  # the slices live in the space of the two open logits
        model.zero_grad()
        (model(x, 0)[:, :2].mean(0) @ xi[l]).backward()
        for n, p in shared_parameters(model).items():
            want[n] += p.grad.pow(2) / 2
    for n in want:
        assert torch.allclose(g[n], want[n], atol=1e-14), n
    with pytest.raises(ValueError, match=r"slices must have shape \[L, 2\]"):
        SCPPlugin(n_slices=2, seed=0).importance(model, _loader(first_inputs(info, 0), 8),
                                                 task_label=0, slices=torch.ones(2, 10))


def test_scp_penalty_value_and_gradient(digits_benchmarks):
    info = digits_benchmarks["domain"]
    model = digits_model(info)
    plugin = SCPPlugin(scp_lambda=3.0, n_slices=4, seed=0)
    finish_experience(plugin, model, info.benchmark.train_stream[0])
    gamma, anchor = plugin.quadratic_penalty.terms[0]
    assert plugin.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = shared_parameters(model)
    by_hand = 3.0 * sum((gamma[n] * (params[n] - anchor[n]) ** 2).sum() for n in params)
    assert plugin.penalty(model).item() == pytest.approx(by_hand.item(), rel=1e-12)
    model.zero_grad()
    plugin.penalty(model).backward()
    w = model.backbone.layers[0].weight
    eps = 1e-6
    for idx in [(0, 0), (2, 30), (6, 63)]:
        with torch.no_grad():
            w[idx] += eps
            up = plugin.penalty(model).item()
            w[idx] -= 2 * eps
            down = plugin.penalty(model).item()
            w[idx] += eps
        assert w.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-12)
    # accumulate: a second task's importance adds up, the anchor moves to the latest weights
    finish_experience(plugin, model, info.benchmark.train_stream[1])
    g2, a2 = plugin.quadratic_penalty.terms[0]
    assert len(plugin.quadratic_penalty) == 1 and torch.equal(a2["head.weight"], model.head.weight)
    assert torch.all(g2["head.weight"] >= gamma["head.weight"])


# ------------------------------------------------------------------------------ state

def test_state_round_trip_and_identical_continuation(digits_benchmarks):
    check_state_round_trip_and_identical_continuation(digits_benchmarks, "scp")


# ------------------------------------------------------------------------------ end to end

def test_scp_forgets_less_than_naive_in_domain_il(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "domain"
    digits_cfg["methods"] = ["naive", "scp"]
    naive, scp = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == scp["status"] == "finished", (naive.get("error"), scp.get("error"))
    assert naive["summary"]["bwt"] < -0.05
    assert scp["summary"]["bwt"] > naive["summary"]["bwt"] + 0.03


# ------------------------------------------------------------------------------ arguments

@pytest.mark.parametrize("kwargs, pattern", [
    ({"scp_lambda": -1.0}, r"scp_lambda must be in \[0, inf\); got -1.0"),
    ({"n_slices": 0}, r"n_slices must be in \[1, inf\); got 0"),
    ({"n_slices": 2.5}, r"n_slices must be an integer; got 2.5"),
    ({"mode": "separate"}, r"mode must be one of 'accumulate', 'online'; got 'separate'"),
    ({"mode": "online", "gamma": 1.5}, r"gamma must be in \[0, 1\]; got 1.5"),
    ({"gamma": 0.5}, r"gamma only applies to mode='online'"),
    ({"seed": -1}, r"seed must be in \[0, inf\); got -1"),
])
def test_scp_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SCPPlugin(**kwargs)


def test_incompatible_models_are_reported(digits_benchmarks):
    info = digits_benchmarks["domain"]
    model = digits_model(info)
    scp = SCPPlugin(n_slices=2, seed=0)
    finish_experience(scp, model, info.benchmark.train_stream[0])
    model.head = nn.Linear(7, 3).double()
    with pytest.raises(ValueError, match=r"shared parameters changed.*reshaped \['head.weight'"):
        scp.penalty(model)


def test_registry_header():
    spec = MethodSpec.from_plugin(SCPPlugin)
    assert spec.scenarios == ("task", "domain", "class") and spec.paper and spec.summary
    SCPPlugin(**spec.defaults)  # the defaults are valid arguments
    assert set(spec.sweep) <= set(spec.defaults)
