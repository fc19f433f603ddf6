"""HintsPlugin (FitNets): the term against loops by hand, its regressors (shapes, optimizer,
state, resume), errors, end to end on split_digits, and Avalanche's FeatureDistillationPlugin
beside it (docs/methods/hints.md)."""

from __future__ import annotations

import io

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, FeatureDistillationPlugin
from torch import nn

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.distillation.hints import HintsPlugin
from cl_plugins.experiment.checkpoint import (load_optimizer_state_by_name,
                                              optimizer_state_by_name)
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from helpers import check_registry_header, train_both_equal

PAIR = {"layers": "backbone.layers.1", "teacher_layers": "backbone"}  # MLP [32, 16]: 32 -> 16
KEY = "backbone.layers.1->backbone"


def _strategy(plugins, model_cfg=None, scenario="domain", seed=0, pad=False):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario, pad_to_32=pad)
    model = build_model(model_cfg or {"name": "mlp", "hidden": [32, 16]}, info)
    st = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info.benchmark.train_stream


def _reload(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_term_against_loops():
    torch.manual_seed(0)
    plugin = HintsPlugin(weight=1.0, layers=["a", "b"], teacher_layers=["c", "d"])
    s = {"a": torch.randn(3, 4), "b": torch.randn(3, 5)}
    t = {"c": torch.randn(3, 4), "d": torch.randn(3, 2)}
    got = plugin.distill_loss(s, t, None, None)
    reg = plugin.regressors.modules["b->d"]  # [5] -> [2]: linear
    w, b = reg.weight.detach(), reg.bias.detach()
    want = 0.0
    for n in range(3):  # mean over samples of 1/2 ||u_h - r(v_g)||^2, summed over the pairs
        want += 0.5 * sum(float(s["a"][n, k] - t["c"][n, k]) ** 2 for k in range(4)) / 3
        for j in range(2):
            r = float(b[j]) + sum(float(w[j, k] * s["b"][n, k]) for k in range(5))
            want += 0.5 * (r - float(t["d"][n, j])) ** 2 / 3
    assert got.item() == pytest.approx(want, rel=1e-5)
    mse = HintsPlugin(layers="a", reduction="mse").distill_loss({"a": s["a"]}, {"a": t["c"]},
                                                               None, None)
    want = sum(float(s["a"][n, k] - t["c"][n, k]) ** 2 for n in range(3) for k in range(4)) / 12
    assert mse.item() == pytest.approx(want, rel=1e-5)


def test_registry_header_and_defaults():
    check_registry_header(HintsPlugin)
    p = HintsPlugin()
    assert (p.weight, p.layers, p.teacher_layers, p.inputs) == (0.1, ("backbone",),
                                                                ("backbone",), "current")


@pytest.mark.parametrize("kwargs, match", [
    ({"reduction": "sum"}, r"reduction must be one of 'half_sum', 'mse'; got 'sum'"),
    ({"regressor_relu": 1}, r"regressor_relu must be one of True, False; got 1"),
    ({"teacher_layers": ["a", "b"]}, r"teacher_layers must name one teacher module per student "
                                     r"layer \(1: \['backbone'\]\); got \['a', 'b'\]"),
    ({"teacher_layers": []}, r"teacher_layers must be a module name or a non-empty list"),
    ({"layers": ""}, r"^layers must be a module name"),
    ({"weight": -1.0}, r"weight must be in \[0, inf\)"),
    ({"inputs": "memory"}, r"inputs must be one of"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HintsPlugin(**kwargs)


def test_regressor_is_built_trained_with_the_model_and_leaves_the_optimizer():
    plugin = HintsPlugin(**PAIR)
    seen = {"first": None, "held": []}

    class Probe(SupervisedPlugin):  # after HintsPlugin in the list: sees the new regressor
        def before_backward(self, strategy, **kwargs):
            reg = plugin.regressors.modules.get(KEY)
            if reg is not None and seen["first"] is None:
                seen["first"] = reg.weight.detach().clone()

        def after_training_iteration(self, strategy, **kwargs):
            held = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
            seen["held"].append({id(p) for p in plugin.regressors.parameters()} <= held)

    st, stream = _strategy([plugin, Probe()])
    st.train(stream[0])
    assert plugin.regressors.modules == {} and seen["held"] == [True] * len(seen["held"])
    st.train(stream[1])
    reg = plugin.regressors.modules[KEY]
    assert isinstance(reg, nn.Linear) and (reg.in_features, reg.out_features) == (32, 16)
    assert seen["held"][-1] and not torch.equal(reg.weight, seen["first"])  # trained
    held = {id(p) for g in st.optimizer.param_groups for p in g["params"]}
    assert not held & {id(p) for p in reg.parameters()}  # out again after the experience
    optimizer_state_by_name(st.optimizer, st.model)  # so the runner can checkpoint it


def test_state_round_trip_and_resume_with_a_regressor():
    plugin = HintsPlugin(**PAIR)
    st_a, stream = _strategy([plugin])
    for exp in stream[:2]:
        st_a.train(exp)
    state = _reload(plugin.state_dict())
    assert state["extra"]["regressors"]["shapes"] == {KEY: [[32], [16]]}
    restored = HintsPlugin(**PAIR)
    restored.load_state_dict(state)
    assert torch.equal(restored.regressors.modules[KEY].weight,
                       plugin.regressors.modules[KEY].weight)
    st_b, _ = _strategy([restored], seed=1)  # other initial weights: the states must do it all
    load_optimizer_state_by_name(st_b.optimizer, st_b.model,
                                 optimizer_state_by_name(st_a.optimizer, st_a.model))
    st_b.optimized_param_id = dict(st_b.model.named_parameters())  # as the runner's restore
    train_both_equal(st_a, st_b, stream[2], model_state=st_a.model.state_dict())
    assert torch.equal(restored.regressors.modules[KEY].weight,
                       plugin.regressors.modules[KEY].weight)
    with pytest.raises(ValueError, match="teacher_layers"):
        HintsPlugin(layers="backbone.layers.1").load_state_dict(state)
    with pytest.raises(ValueError, match="relu"):
        HintsPlugin(**PAIR, regressor_relu=True).load_state_dict(state)


def test_conv_regressor_on_lenet_and_shapes_no_regressor_maps():
    plugin = HintsPlugin(layers="backbone.conv1", teacher_layers="backbone.conv2")
    st, stream = _strategy([plugin], {"name": "lenet"}, pad=True)
    for exp in stream[:2]:
        st.train(exp)
    reg = plugin.regressors.modules["backbone.conv1->backbone.conv2"]  # [6, 28, 28] -> [16, 10, 10]
    assert isinstance(reg, nn.Conv2d) and reg.kernel_size == (19, 19)
    assert (reg.in_channels, reg.out_channels) == (6, 16)
    bad = HintsPlugin(layers="backbone.conv1", teacher_layers="backbone.fc1")
    st, stream = _strategy([bad], {"name": "lenet"}, pad=True)
    st.train(stream[0])
    with pytest.raises(ValueError, match=r"HintsPlugin \(backbone.conv1->backbone.fc1\): no "
                                         r"regressor maps the student's features of shape "
                                         r"\[6, 28, 28\] to the teacher's \[120\]"):
        st.train(stream[1])
    st, stream = _strategy([HintsPlugin(teacher_layers="nope")])
    with pytest.raises(ValueError, match=r"no module named \['nope'\]"):
        st.train(stream[0])


def test_hints_forget_less_than_naive_in_task_il(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "task"  # per-task heads: kept features keep outputs
    digits_cfg["optimizer"]["lr"] = 0.03  # large steps: naive's shared layers drift
    digits_cfg["strategy"]["epochs"] = 4
    digits_cfg["methods"] = ["naive", "hints"]
    naive, hints = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == hints["status"] == "finished", (naive.get("error"),
                                                               hints.get("error"))
    assert naive["summary"]["bwt"] < -0.02
    assert hints["summary"]["bwt"] > naive["summary"]["bwt"] + 0.02


# ------------------------------------------------- Avalanche's FeatureDistillationPlugin beside it

class FeatNet(nn.Module):
    """Avalanche's convention: the model stores its features in ``self.features`` (``store``;
    a tensor of the graph held by the model, which our teacher copy cannot deep-copy)."""

    def __init__(self, store: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.store, self.features = store, None

    def forward(self, x):
        features = self.body(x)
        if self.store:
            self.features = features
        return self.head(features)


def _avalanche(plugin, model=None):
    torch.manual_seed(0)
    info = build_benchmark("split_digits", "domain")
    model = model or FeatNet()
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               train_mb_size=32, train_epochs=1, device="cpu", plugins=[plugin],
               evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def test_avalanche_feature_distillation_mse_crashes_and_its_teacher_keeps_training_mode():
    st, info = _avalanche(FeatureDistillationPlugin(mode="mse"))
    st.train(info.benchmark.train_stream[0])  # no teacher yet: no term
    with pytest.raises(TypeError, match=r"mse_loss\(\) got an unexpected keyword argument 'dim'"):
        st.train(info.benchmark.train_stream[1])
    # cosine mode needs model.features: the runner's ClassifierNet has none
    st, info = _avalanche(FeatureDistillationPlugin(),
                          build_model({"name": "mlp", "hidden": [32]}, info))
    st.train(info.benchmark.train_stream[0])
    with pytest.raises(TypeError, match=r"cosine_similarity\(\).*NoneType"):
        st.train(info.benchmark.train_stream[1])
    # cosine mode runs on FeatNet, but its teacher is a plain copy left in training mode: its
    # BatchNorm statistics move with every teacher forward; ours is frozen in eval mode
    plugin = FeatureDistillationPlugin()
    st, info = _avalanche(plugin)
    st.train(info.benchmark.train_stream[0])
    bn = plugin.prev_model.body[2]
    before = bn.running_mean.clone()
    assert plugin.prev_model.training
    st.train(info.benchmark.train_stream[1])
    assert not torch.equal(bn.running_mean, before)
    ours = HintsPlugin(layers="body")
    st, info = _avalanche(ours, FeatNet(store=False))
    st.train(info.benchmark.train_stream[0])
    bn = ours.teacher.body[2]
    before = bn.running_mean.clone()
    st.train(info.benchmark.train_stream[1])
    assert not ours.teacher.training and torch.equal(bn.running_mean, before)
