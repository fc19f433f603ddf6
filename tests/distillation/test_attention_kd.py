"""AttentionKDPlugin: the term against the official at/at_loss written as loops, the errors on
layers without spatial maps (before any update), state and resume on LeNet, and less forgetting
than naive on split_digits."""

from __future__ import annotations

import io
import math

import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.distillation.attention_kd import AttentionKDPlugin
from cl_plugins.experiment.checkpoint import (load_optimizer_state_by_name,
                                              optimizer_state_by_name)
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from helpers import check_registry_header, param_copies, train_both_equal


def _at_map_by_loops(a, n, p=2.0):
    """Attention map of sample n of a [N, C, H, W], by loops: mean over channels of |A|^p
    (the official code's pow(2).mean(1) for p = 2), flattened, divided by its l2 norm."""
    _, c, h, w = a.shape
    q = [sum(abs(float(a[n, k, i, j])) ** p for k in range(c)) / c
         for i in range(h) for j in range(w)]
    norm = math.sqrt(sum(v * v for v in q))
    return [v / norm for v in q]


def _at_loss_by_loops(s, t, p=2.0, distance="mean_sq"):
    per = []
    for n in range(s.shape[0]):
        d = [x - y for x, y in zip(_at_map_by_loops(s, n, p), _at_map_by_loops(t, n, p))]
        per.append(sum(v * v for v in d) / len(d) if distance == "mean_sq" else
                   math.sqrt(sum(v * v for v in d)))
    return sum(per) / len(per)


@pytest.mark.parametrize("p, distance", [(2.0, "mean_sq"), (2.0, "norm"), (1.0, "mean_sq")])
def test_term_against_the_official_formula_by_loops(p, distance):
    torch.manual_seed(0)
    s = {"x": torch.randn(3, 4, 3, 2), "y": torch.randn(3, 2, 2, 2)}
    t = {"x": torch.randn(3, 5, 3, 2), "y": torch.randn(3, 6, 2, 2)}  # other channel counts
    plugin = AttentionKDPlugin(layers=["x", "y"], p=p, distance=distance)
    want = sum(_at_loss_by_loops(s[k], t[k], p, distance) for k in ("x", "y"))  # summed layers
    assert plugin.distill_loss(s, t, None, None).item() == pytest.approx(want, rel=1e-5)
    pair = AttentionKDPlugin(layers="x", teacher_layers="z")
    got = pair.distill_loss({"x": s["x"]}, {"z": t["x"]}, None, None)
    assert got.item() == pytest.approx(_at_loss_by_loops(s["x"], t["x"]), rel=1e-5)
    with pytest.raises(ValueError, match=r"the student's layer 'x' gives maps of spatial size "
                                         r"\(3, 2\), the teacher's 'z' \(2, 2\)"):
        pair.distill_loss({"x": s["x"]}, {"z": t["y"]}, None, None)


def test_registry_header_and_defaults():
    check_registry_header(AttentionKDPlugin)
    p = AttentionKDPlugin()
    assert (p.weight, p.p, p.distance, p.layers) == (1000.0, 2.0, "mean_sq",
                                                     ("backbone.conv1", "backbone.conv2"))
    assert AttentionKDPlugin.NEEDS_SPATIAL


@pytest.mark.parametrize("kwargs, match", [
    ({"p": 0.0}, r"p must be in \(0, inf\); got 0.0"),
    ({"distance": "l1"}, r"distance must be one of 'mean_sq', 'norm'; got 'l1'"),
    ({"weight": -1.0}, r"weight must be in \[0, inf\)"),
    ({"layers": []}, r"^layers must be a module name"),
    ({"teacher_layers": ["a"] * 3}, r"teacher_layers must name one teacher module per student"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionKDPlugin(**kwargs)


def _strategy(plugin, model_cfg, scenario="task", pad=True, seed=0):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario, pad_to_32=pad)
    model = build_model(model_cfg, info)
    st = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    return st, info.benchmark.train_stream


def test_layers_without_spatial_maps_fail_before_any_update():
    st, stream = _strategy(AttentionKDPlugin(layers="backbone"), {"name": "mlp", "hidden": [32]},
                           pad=False)
    before = param_copies(st.model)
    with pytest.raises(ValueError, match=r"AttentionKDPlugin: layer 'backbone' gives features of "
                                         r"shape \(32, 32\); attention transfer taps spatial "
                                         r"feature maps \[N, C, H, W\]: this model's "
                                         r"convolutional stages are \[\] \(an MLP has none"):
        st.train(stream[0])  # the first experience: no teacher needed to find out
    assert all(torch.equal(p, before[n]) for n, p in st.model.named_parameters())
    st, stream = _strategy(AttentionKDPlugin(), {"name": "mlp", "hidden": [32]}, pad=False)
    with pytest.raises(ValueError, match=r"the model has no module named \['backbone.conv1', "
                                         r"'backbone.conv2'\]; attention transfer taps spatial"):
        st.train(stream[0])
    st, stream = _strategy(AttentionKDPlugin(layers="backbone.fc1"), {"name": "lenet"})
    with pytest.raises(ValueError, match=r"layer 'backbone.fc1' gives features of shape \(32, "
                                         r"120\).*stages are \['backbone.conv1', "
                                         r"'backbone.conv2'\]"):
        st.train(stream[0])


def test_state_round_trip_and_resume_on_lenet():
    plugin = AttentionKDPlugin()
    st_a, stream = _strategy(plugin, {"name": "lenet"}, scenario="domain")  # one head
    for exp in stream[:2]:
        st_a.train(exp)
    buf = io.BytesIO()
    torch.save(plugin.state_dict(), buf)
    buf.seek(0)
    restored = AttentionKDPlugin()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    st_b, _ = _strategy(restored, {"name": "lenet"}, scenario="domain", seed=1)
    load_optimizer_state_by_name(st_b.optimizer, st_b.model,
                                 optimizer_state_by_name(st_a.optimizer, st_a.model))
    st_b.optimized_param_id = dict(st_b.model.named_parameters())  # as the runner's restore
    train_both_equal(st_a, st_b, stream[2], model_state=st_a.model.state_dict())
    with pytest.raises(ValueError, match="distance"):
        AttentionKDPlugin(distance="norm").load_state_dict(plugin.state_dict())


def test_attention_forgets_less_than_naive_on_lenet(digits_cfg):
    digits_cfg["model"] = {"name": "lenet"}
    digits_cfg["benchmark"].update(scenario="task", pad_to_32=True)
    digits_cfg["optimizer"]["lr"] = 0.02  # large steps: naive's shared conv layers drift
    digits_cfg["methods"] = ["naive", "attention_kd"]
    naive, at = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == at["status"] == "finished", (naive.get("error"), at.get("error"))
    assert naive["summary"]["bwt"] < -0.1
    assert at["summary"]["bwt"] > naive["summary"]["bwt"] + 0.03
