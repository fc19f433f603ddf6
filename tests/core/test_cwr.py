"""core.cwr: CWR* consolidation on a hand example and against a per-class reference, the head
reset, counts, head lookup, the step scale and the state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from avalanche.models import MultiHeadClassifier
from torch import nn

from cl_plugins.core.cwr import (ConsolidatedWeights, StepScale, class_counts, consolidate,
                                 cwr_star_past_weight, head_linear, hold_bias_at_zero,
                                 reset_head)
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.models.heads import MaskedHead


def _linear(c=3, d=2):
    lin = nn.Linear(d, c)
    with torch.no_grad():
        lin.weight.normal_()
    return lin


def test_hand_example_two_experiences():
    lin, cwr = _linear(), ConsolidatedWeights()
    # experience 1: class 0 (2 examples), class 1 (1 example)
    cwr.begin(lin, class_counts([0, 1, 0], 3))
    assert torch.equal(lin.weight, torch.zeros(3, 2))  # nothing consolidated yet: all zero
    with torch.no_grad():
        lin.weight[0] = torch.tensor([1.0, 3.0])
        lin.weight[1] = torch.tensor([3.0, 5.0])
    cwr.end(lin)
    # mean of the current rows = 3; new classes: cw = tw - 3
    assert torch.equal(cwr.cw, torch.tensor([[-2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    assert cwr.past.tolist() == [2, 1, 0] and cwr.cur is None
    assert torch.equal(lin.weight, cwr.cw)  # inference uses cw
    # experience 2: class 1 (4 examples, seen before), class 2 (2 examples, new)
    cwr.begin(lin, class_counts([1, 2, 1, 1, 2, 1], 3))
    # CWR* reset: zero, then cw for the current classes already seen (class 1 only)
    assert torch.equal(lin.weight, torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    with torch.no_grad():
        lin.weight[1] = torch.tensor([4.0, 6.0])
        lin.weight[2] = torch.tensor([2.0, 0.0])
    cwr.end(lin)
    # mean = 3: shifted rows [1, 3] and [-1, -3]; class 1: wpast = sqrt(1/4) = 0.5,
    # cw_1 = (0.5 [0, 2] + [1, 3]) / 1.5 = [2/3, 8/3]; class 2 is new: [-1, -3]
    expected = torch.tensor([[-2.0, 0.0], [2 / 3, 8 / 3], [-1.0, -3.0]])
    torch.testing.assert_close(cwr.cw, expected, rtol=0, atol=1e-7)
    assert cwr.past.tolist() == [2, 5, 2]
    torch.testing.assert_close(lin.weight.detach(), expected, rtol=0, atol=1e-7)


def _reference(cw, past, tw, cur):
    """Avalanche's CWRStarPlugin.consolidate_weights, one class at a time."""
    cw, past = cw.clone().double(), past.clone()
    classes = [c for c in range(len(cur)) if cur[c] > 0]
    avg = tw[classes].double().mean()
    for c in classes:
        new = tw[c].double() - avg
        if past[c] > 0:
            w = math.sqrt(past[c] / cur[c])
            cw[c] = (cw[c] * w + new) / (w + 1)
        else:
            cw[c] = new
        past[c] += cur[c]
    return cw, past


def test_vectorised_consolidation_matches_a_per_class_loop():
    g = torch.Generator().manual_seed(0)
    cw = torch.randn(6, 4, generator=g, dtype=torch.float64)
    past = torch.tensor([0, 3, 0, 7, 2, 0])
    cur = torch.tensor([5, 2, 0, 1, 0, 4])
    tw = torch.randn(6, 4, generator=g, dtype=torch.float64)
    new_cw, new_past = consolidate(cw, past, tw, cur)
    ref_cw, ref_past = _reference(cw, past, tw, cur)
    torch.testing.assert_close(new_cw, ref_cw, rtol=0, atol=1e-12)
    assert torch.equal(new_past, ref_past)
    assert torch.equal(new_cw[[2, 4]], cw[[2, 4]])  # classes not in the experience: untouched


def test_options_mean_shift_past_weight_and_plain_reset():
    cw = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    past, cur = torch.tensor([2, 0]), torch.tensor([2, 2])
    tw = torch.tensor([[3.0, 3.0], [1.0, 1.0]])
    out, _ = consolidate(cw, past, tw, cur, mean_shift=False,
                         past_weight=lambda p, c: p.double() / c.double())
    assert torch.equal(out, torch.tensor([[2.0, 2.0], [1.0, 1.0]]))  # (1*1 + 3)/2, new: tw
    w = torch.full((2, 2), 5.0)
    reset_head(w, cw, past, cur, from_cw=False)  # CWR+: zero for every class
    assert torch.equal(w, torch.zeros(2, 2))
    assert torch.equal(cwr_star_past_weight(torch.tensor([0, 4]), torch.tensor([1, 1])),
                       torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_counts_head_lookup_and_bias():
    assert class_counts(torch.tensor([2, 0, 2]), 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        class_counts([4], 4)
    backbone = nn.Flatten()
    backbone.out_features = 4
    linear = nn.Linear(4, 3)
    assert head_linear(ClassifierNet(backbone, linear)) is linear
    masked = MaskedHead(4, 3)
    assert head_linear(ClassifierNet(backbone, masked)) is masked.linear
    with pytest.raises(ValueError, match="per-task heads"):
        head_linear(ClassifierNet(backbone, MultiHeadClassifier(4, 2)), "AR1Plugin")
    with pytest.raises(ValueError, match="Linear output layer.*Sequential"):
        head_linear(ClassifierNet(backbone, nn.Sequential(nn.Linear(4, 3))))
    hold_bias_at_zero(linear)
    assert torch.equal(linear.bias, torch.zeros(3)) and not linear.bias.requires_grad


def test_step_scale_is_a_learning_rate_multiplier_for_sgd_with_momentum():
    def train(lr, scale):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(5))
        opt = torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=0.01)
        step = StepScale(scale)
        for k in range(4):
            opt.zero_grad()
            ((p - k) ** 2).sum().backward()
            step.before_step([p])
            opt.step()
            step.after_step()
        return p.detach()

    torch.testing.assert_close(train(0.01, 10.0), train(0.1, 1.0), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(train(0.01, 1.0), train(0.1, 1.0))
    with pytest.raises(ValueError, match="head_lr_scale"):
        StepScale(-1.0, "head_lr_scale")


def test_state_round_trip_and_shape_check():
    lin, cwr = _linear(), ConsolidatedWeights()
    cwr.begin(lin, torch.tensor([1, 1, 0]))
    state = copy.deepcopy(cwr.state_dict())
    other = ConsolidatedWeights()
    other.load_state_dict(state)
    for k in ("cw", "past", "cur"):
        assert torch.equal(getattr(other, k), getattr(cwr, k))
    with pytest.raises(ValueError, match="consolidated weights have shape"):
        other.begin(_linear(c=4), torch.tensor([1, 0, 0, 0]))
