"""Online EWC (Schwarz et al. 2018): the running penalty's value and gradient, the per-task Fisher
normalisation (by hand, a zero Fisher, the merge), state round trip, arguments. (Its bookkeeping
against EWC's modes and the forgetting against naive are in test_ewc.py.)"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.core.fisher_scale import fisher_scale, normalize_fisher
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.models.mlp import MLP
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

from helpers import (check_ewc_penalty_value_and_gradient, check_ewc_registry_header,
                     check_ewc_state_round_trip)


def test_penalty_value_and_gradient():
    check_ewc_penalty_value_and_gradient(lambda: OnlineEWCPlugin(ewc_lambda=3.0, gamma=0.7))


def test_state_round_trip_resumes_identically():
    check_ewc_state_round_trip(
        lambda: OnlineEWCPlugin(ewc_lambda=50.0, gamma=0.8, fisher="true", fisher_samples=100))


@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"gamma": -0.1}, r"gamma must be in \[0, 1\]"),
    ({"fisher": "sample"}, "fisher must be one of"),
    ({"ewc_lambda": -2}, "ewc_lambda"),
    ({"fisher_norm": "l2"}, "fisher_norm must be one of 'none', 'mean', 'max'; got 'l2'"),
    ({"fisher_norm": None}, "fisher_norm must be one of 'none', 'mean', 'max'; got None"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineEWCPlugin(**kwargs)


def test_registry_header():
    check_ewc_registry_header(OnlineEWCPlugin)


def test_fisher_norm_by_hand():
    f = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[0.0, 4.0]], dtype=torch.float64)}
    # "mean": over every entry of every tensor, (1 + 3 + 0 + 4) / 4 = 2; "max": 4
    assert fisher_scale(f, "mean") == 2.0 and fisher_scale(f, "max") == 4.0
    mean, top, none = (normalize_fisher(f, n) for n in ("mean", "max", "none"))
    assert torch.equal(mean["a"], torch.tensor([0.5, 1.5]))
    assert torch.equal(mean["b"], torch.tensor([[0.0, 2.0]], dtype=torch.float64))
    assert torch.equal(top["a"], torch.tensor([0.25, 0.75]))
    assert torch.equal(top["b"], torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    assert all(none[k] is f[k] for k in f)  # "none": the estimate itself
    assert mean["a"].dtype == torch.float32 and mean["b"].dtype == torch.float64
    with pytest.raises(ValueError, match="fisher_norm must be one of"):
        normalize_fisher(f, "l2")


@pytest.mark.parametrize("norm", ["mean", "max"])
def test_a_zero_fisher_is_merged_unchanged_without_nan(norm):
    zero = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    assert fisher_scale(zero, norm) == 1.0
    out = normalize_fisher(zero, norm)
    assert all(torch.equal(out[k], zero[k]) for k in zero)
    plugin = OnlineEWCPlugin(ewc_lambda=2.0, gamma=0.5, fisher_norm=norm)
    one = {"a": torch.ones(3), "b": torch.ones(2, 2)}
    anchor = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    plugin.quadratic_penalty.add(normalize_fisher(one, norm), anchor)
    plugin.quadratic_penalty.add(out, anchor)  # the zero task adds nothing: F* = 0.5 * 1
    params = {"a": torch.full((3,), 2.0), "b": torch.full((2, 2), 2.0)}
    value = plugin.penalty(params).item()
    assert math.isfinite(value) and value == pytest.approx(1.0 * 0.5 * 4 * 7)


def _strategy_on(model, seed):
    torch.manual_seed(seed)
    x = torch.randn(20, 4)
    data = TensorDataset(x, torch.randint(0, 3, (20,)), torch.zeros(20, dtype=torch.long))
    return SimpleNamespace(model=model, experience=SimpleNamespace(dataset=data))


def test_normalised_fishers_merge_with_gamma():
    """F* = gamma F_1 / norm(F_1) + F_2 / norm(F_2): each task's raw estimate (EWCPlugin's) is
    divided by its own norm before the merge."""
    torch.manual_seed(0)
    model = ClassifierNet(MLP(4, (5,)), nn.Linear(5, 3))
    for norm in ("mean", "max"):
        plugin = OnlineEWCPlugin(gamma=0.5, fisher_norm=norm)
        raw_plugin = OnlineEWCPlugin(gamma=0.5)
        raws = []
        for seed in (1, 2):
            st = _strategy_on(model, seed)
            raws.append(raw_plugin.estimate_fisher(model, st.experience.dataset))
            plugin.after_training_exp(st)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1)
        (merged, _), = plugin.quadratic_penalty.terms
        s1, s2 = (fisher_scale(r, norm) for r in raws)
        assert s1 != pytest.approx(s2, rel=1e-2)  # raw scales differ: the norm matters
        for k in merged:
            assert torch.allclose(merged[k].double(), 0.5 * raws[0][k] / s1 + raws[1][k] / s2,
                                  rtol=1e-5)
        top = max(float(f.max()) for f in merged.values()) if norm == "max" else None
        assert top is None or top <= 1.5 + 1e-6


def test_fisher_norm_is_part_of_the_state():
    plugin = OnlineEWCPlugin(fisher_norm="mean")
    state = plugin.state_dict()
    assert state["fisher_norm"] == "mean"
    OnlineEWCPlugin(fisher_norm="mean").load_state_dict(copy.deepcopy(state))
    with pytest.raises(ValueError, match="saved with fisher_norm='mean', this plugin has "
                                         "fisher_norm='max'"):
        OnlineEWCPlugin(fisher_norm="max").load_state_dict(copy.deepcopy(state))
    old = {k: v for k, v in OnlineEWCPlugin().state_dict().items() if k != "fisher_norm"}
    OnlineEWCPlugin().load_state_dict(old)  # written before the setting: raw Fishers, "none"
    with pytest.raises(ValueError, match="saved with fisher_norm='none'"):
        OnlineEWCPlugin(fisher_norm="mean").load_state_dict(old)
