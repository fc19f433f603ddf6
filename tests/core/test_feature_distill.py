"""FeatureDistillPlugin: which rows and layers reach the loss, the teacher, errors, state; and the
plain losses it ships for hints (hand computations)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from cl_plugins.core.distill_losses import (attention_loss, attention_map, hint_loss,
                                            triplet_cosines)
from cl_plugins.core.feature_distill import FeatureDistillPlugin, LayerTaps, add_param_group
from cl_plugins.replay.er import ERPlugin
from helpers import er_der_strategy


class Recorder(FeatureDistillPlugin):
    """Records what reaches ``distill_loss``; the term is the hint loss on every layer."""

    def __init__(self, weight: float = 1.0, layers="backbone", inputs: str = "current"):
        super().__init__(weight, layers, inputs)
        self.seen = []

    def distill_loss(self, student, teacher, y, t):
        self.seen.append({"rows": y.shape[0], "layers": sorted(student),
                          "grad": {k: v.requires_grad for k, v in student.items()},
                          "t_grad": any(v.requires_grad for v in teacher.values()),
                          "same": {k: torch.equal(student[k].detach(), teacher[k])
                                   for k in student}})
        return sum(hint_loss(student[k], teacher[k]) for k in student)


def test_hint_loss_by_hand():
    s = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # sample 0: (1 + 4) / 2 = 2.5; sample 1: (1 + 4) / 2 = 2.5
    assert hint_loss(s, t).item() == pytest.approx(2.5)
    assert hint_loss(s, t, "mse").item() == pytest.approx(10 / 4)
    hint_loss(s, t).backward()
    assert torch.allclose(s.grad, (s - t).detach() / 2)  # d/ds of the batch mean of 1/2 |s-t|^2
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss(s, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="reduction"):
        hint_loss(s, t, "sum")


def test_attention_map_and_triplet_cosines_by_hand():
    f = torch.zeros(1, 2, 1, 2)
    f[0, 0, 0] = torch.tensor([3.0, 0.0])
    f[0, 1, 0] = torch.tensor([0.0, 4.0])
    q = attention_map(f)  # [9, 16] / 5... normalised: [9, 16] / sqrt(81 + 256)
    assert torch.allclose(q, torch.tensor([[9.0, 16.0]]) / (81 + 256) ** 0.5)
    assert attention_loss(f, f).item() == 0.0
    with pytest.raises(ValueError, match="spatial"):
        attention_map(torch.zeros(2, 3))
    pts = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    cos = triplet_cosines(pts, torch.tensor([[0, 1, 2], [0, 1, 3], [2, 3, 0]]))
    # angle at p1 between p0 and p2: 90 deg; p0 and p3: 45 deg; at p3 between p2 (-1, 1) and p0
    # (0, -1): cos = -1 / sqrt(2)
    assert torch.allclose(cos, torch.tensor([0.0, 2 ** -0.5, -(2 ** -0.5)]), atol=1e-6)


@pytest.mark.parametrize("inputs,expect", [("current", {32, 28}), ("replay", {32}),
                                           ("both", {64, 60})])
def test_rows_layers_and_the_teacher(inputs, expect):
    plugin = Recorder(inputs=inputs, layers=["backbone", "backbone.layers.0"])
    st, info = er_der_strategy([ERPlugin(mem_size=100, seed=0), plugin])
    st.train(info.benchmark.train_stream[0])
    assert plugin.seen == [] and plugin.teacher is not None  # no teacher during experience 0
    assert all(not p.requires_grad for p in plugin.teacher.parameters())
    st.train(info.benchmark.train_stream[1])
    rows = {s["rows"] for s in plugin.seen}
    assert rows == expect  # 28: the last, short minibatch of the current experience
    for s in plugin.seen:
        assert s["layers"] == ["backbone", "backbone.layers.0"]
        assert all(s["grad"].values()) and not s["t_grad"]
    # first step of experience 1: the student still equals the teacher on the same rows
    assert all(plugin.seen[0]["same"].values())
    assert not all(plugin.seen[-1]["same"].values())
    # taps are gone after training, and evaluation forwards record nothing
    assert plugin._taps is None
    st.eval(info.benchmark.test_stream[:1])


def test_weight_zero_computes_nothing_and_the_term_starts_at_zero():
    values = {}
    for w in (0.0, 2.0):
        plugin = Recorder(weight=w)
        st, info = er_der_strategy([plugin], sgd=True)
        for e in range(2):
            st.train(info.benchmark.train_stream[e])
        values[w] = plugin.seen
    assert values[0.0] == []  # weight 0: the loss is not even computed
    assert all(values[2.0][0]["same"].values())  # student = teacher at the first step
    assert not all(values[2.0][1]["same"].values())


def test_clear_errors_before_any_training():
    with pytest.raises(ValueError, match="inputs"):
        Recorder(inputs="memory")
    with pytest.raises(ValueError, match="layers"):
        Recorder(layers=[])
    with pytest.raises(ValueError, match="weight"):
        Recorder(weight=-1.0)
    st, info = er_der_strategy([Recorder(layers="nope")])
    with pytest.raises(ValueError, match="no module named \\['nope'\\].*backbone"):
        st.train(info.benchmark.train_stream[0])  # experience 0 already: no teacher needed
    st, info = er_der_strategy([Recorder(inputs="replay")])
    with pytest.raises(ValueError, match="no plugin appends them"):
        st.train(info.benchmark.train_stream[0])


def test_a_layer_that_returns_no_tensor_is_named():
    class Pair(nn.Module):
        def forward(self, x):
            return (x, x)

    model = nn.Sequential()
    model.add_module("pair", Pair())
    taps = LayerTaps(model, ["pair"], "Who")
    taps.armed = True
    with pytest.raises(ValueError, match="Who: layer 'pair' \\(Pair\\) returns a tuple"):
        model(torch.zeros(1, 2))


def test_hooks_are_inert_in_copies_and_pickles():
    lin = nn.Linear(2, 2)
    taps = LayerTaps(lin, [""], "W")
    taps.armed = True
    twin = copy.deepcopy(lin)
    twin(torch.zeros(1, 2))
    assert taps.outputs == {}  # the copy's hook does not write into our taps
    pickle.loads(pickle.dumps(lin))(torch.zeros(1, 2))
    assert taps.outputs == {}
    lin(torch.zeros(1, 2))
    assert list(taps.outputs) == [""]
    taps.remove()
    assert not lin._forward_hooks


def test_state_round_trip_rebuilds_the_teacher_and_refuses_other_settings():
    plugin = Recorder()
    st, info = er_der_strategy([plugin])
    st.train(info.benchmark.train_stream[0])
    state = plugin.state_dict()
    assert state["n_experiences"] == 1 and state["config"]["layers"] == ("backbone",)
    fresh = Recorder()
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.teacher is None and fresh._pending_teacher is not None
    fresh._ensure_teacher(st.model)
    for k, v in plugin.teacher.state_dict().items():
        assert torch.equal(v, fresh.teacher.state_dict()[k])
    assert fresh.state_dict()["teacher"].keys() == state["teacher"].keys()
    with pytest.raises(ValueError, match="inputs"):
        Recorder(inputs="both").load_state_dict(copy.deepcopy(state))


def test_add_param_group_adds_each_parameter_once():
    model = nn.Linear(2, 2)
    extra = nn.Linear(2, 2)
    st = type("S", (), {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})()
    add_param_group(st, extra.parameters())
    add_param_group(st, list(extra.parameters()) + list(model.parameters()))
    assert len(st.optimizer.param_groups) == 2
    assert sum(len(g["params"]) for g in st.optimizer.param_groups) == 4
