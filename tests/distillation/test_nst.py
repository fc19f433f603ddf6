"""NST (Huang & Wang 2017): the term a strategy adds (by hand), the default taps on conv
backbones, clear errors on an MLP, state, arguments, and less forgetting than naive end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.conv_stages import conv_stages
from cl_plugins.core.distill_losses import mmd2
from cl_plugins.distillation.nst import NSTPlugin
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from cl_plugins.registry import MethodSpec, signature_defaults


class LossSpy(SupervisedPlugin):
    """Keeps strategy.loss (and the minibatch) at its ``before_backward``."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def before_backward(self, strategy, **kwargs):
        self.seen.append((strategy.loss.item(), strategy.mb_x.clone()))


def strategy(plugins, model_cfg=None, scenario="task", pad=True, lr=1e-3):
    torch.manual_seed(0)
    info = build_benchmark("split_digits", scenario, pad_to_32=pad)
    model = build_model(model_cfg or {"name": "lenet"}, info)
    st = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def lenet_conv2(backbone, x):
    """LeNet's conv2 output, computed by hand from its layers."""
    return backbone.conv2(F.max_pool2d(F.relu(backbone.conv1(x)), 2))


def test_the_term_is_weight_times_mmd2_of_the_last_conv_maps():
    before, after = LossSpy(), LossSpy()
    plugin = NSTPlugin(weight=7.0, kernel="gaussian", sigma=0.8)
    st, info = strategy([before, plugin, after])
    st.train(info.benchmark.train_stream[0])
    assert plugin.layers == ("backbone.conv2",) and before.seen  # no term without a teacher
    assert [a[0] for a in after.seen] == [b[0] for b in before.seen]
    before.seen.clear(), after.seen.clear()
    model = st.model
    teacher_backbone = copy.deepcopy(plugin.teacher.backbone)

    class Check(SupervisedPlugin):  # the student's maps before its update, by hand
        def __init__(self):
            super().__init__()
            self.expected = []

        def before_backward(self, strategy, **kwargs):
            with torch.no_grad():
                s = lenet_conv2(model.backbone, strategy.mb_x)
                t = lenet_conv2(teacher_backbone, strategy.mb_x)
                self.expected.append(7.0 * mmd2(s, t, "gaussian", sigma=0.8).item())

    check = Check()
    st.plugins.append(check)
    st.train(info.benchmark.train_stream[1])
    terms = [a[0] - b[0] for a, b in zip(after.seen, before.seen)]
    assert len(terms) == len(check.expected) > 3
    assert terms[0] == pytest.approx(0.0, abs=1e-6)  # the student starts as the teacher
    assert terms == pytest.approx(check.expected, rel=1e-4, abs=1e-7)
    assert max(terms) > 1e-4


def test_auto_taps_the_last_conv_stage_of_our_conv_backbones():
    info = build_benchmark("split_digits", "task")
    padded = build_benchmark("split_digits", "task", pad_to_32=True)
    plugin = NSTPlugin()
    lenet = build_model({"name": "lenet"}, padded)
    resnet = build_model({"name": "reduced_resnet18", "nf": 4}, info)
    assert conv_stages(lenet) == ["backbone.conv1", "backbone.conv2"]
    assert plugin.resolve_layers(lenet) == ("backbone.conv2",)
    assert plugin.resolve_layers(resnet) == ("backbone.layer4",)
    assert NSTPlugin(layers=["backbone.conv1"]).resolve_layers(lenet) == ("backbone.conv1",)
    # the reduced ResNet-18 takes the 8x8 digits as they are and distils its last stage
    st, info = strategy([plugin], {"name": "reduced_resnet18", "nf": 4}, pad=False)
    for e in range(2):
        st.train(info.benchmark.train_stream[e])
    assert plugin.layers == ("backbone.layer4",) and plugin.n_experiences == 2


def test_the_main_job_gives_nst_a_conv_model():
    from cl_plugins.experiment.config import DEFAULT_CONFIG, MAIN_JOB_METHODS, section_for

    entry = next(e for e in MAIN_JOB_METHODS if isinstance(e, dict) and e["name"] == "nst")
    model_cfg = section_for(DEFAULT_CONFIG, entry, "model")  # the MLP's `hidden` is dropped
    assert model_cfg == {"name": "reduced_resnet18", "nf": 8, "head": "auto"}
    model = build_model(model_cfg, build_benchmark("split_digits", "task"))
    assert NSTPlugin().resolve_layers(model) == ("backbone.layer4",)


def test_an_mlp_is_refused_before_any_update_naming_the_layer_and_shape():
    mlp = {"name": "mlp", "hidden": [16]}
    st, info = strategy([NSTPlugin()], mlp, pad=False)
    before = copy.deepcopy(st.model.state_dict())
    with pytest.raises(ValueError, match=r"layers='auto' .* MLP has no convolution"):
        st.train(info.benchmark.train_stream[0])
    st, info = strategy([NSTPlugin(layers="backbone")], mlp, pad=False)
    with pytest.raises(ValueError, match=r"layer 'backbone' gives features of shape \(32, 16\); "
                                         r"NST needs spatial feature maps"):
        st.train(info.benchmark.train_stream[0])  # at the first step of the first experience
    assert all(torch.equal(v, before[k]) for k, v in st.model.state_dict().items())


def test_state_round_trip_keeps_the_requested_layers():
    plugin = NSTPlugin(weight=3.0, kernel="linear")
    st, info = strategy([plugin])
    st.train(info.benchmark.train_stream[0])
    state = plugin.state_dict()
    assert state["config"]["requested_layers"] == ("auto",) and state["n_experiences"] == 1
    fresh = NSTPlugin(weight=3.0, kernel="linear")
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.state_dict()["teacher"].keys() == state["teacher"].keys()
    with pytest.raises(ValueError, match="saved with kernel='linear', this plugin has "
                                         "kernel='poly'"):
        NSTPlugin(weight=3.0).load_state_dict(state)
    with pytest.raises(ValueError, match="requested_layers"):
        NSTPlugin(weight=3.0, kernel="linear", layers="backbone.conv1").load_state_dict(state)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"weight": -1.0}, r"weight must be in \[0, inf\)"),
    ({"kernel": "rbf"}, r"kernel must be one of 'linear', 'poly', 'gaussian'; got 'rbf'"),
    ({"degree": 0}, r"degree must be in \[1, inf\)"),
    ({"degree": 2.0}, r"degree must be an integer"),
    ({"sigma": 0.0}, r"sigma must be in \(0, inf\)"),
    ({"c": float("nan")}, r"c must be a number"),
    ({"layers": ["auto", "backbone.conv1"]}, r"layers: 'auto' stands alone"),
    ({"layers": []}, r"layers must be a module name"),
    ({"inputs": "memory"}, r"inputs must be one of"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NSTPlugin(**kwargs)


def test_registry_header():
    spec = MethodSpec.from_plugin(NSTPlugin)
    assert spec.name == "nst" and spec.scenarios == ("task", "domain", "class")
    assert not spec.needs_task_labels and spec.paper and spec.summary
    assert NSTPlugin.NEEDS_SPATIAL  # the generic tests give it a conv model
    defaults = signature_defaults(NSTPlugin)
    assert defaults["weight"] == 50.0 and defaults["kernel"] == "poly"  # the official code's
    assert (defaults["degree"], defaults["c"]) == (2, 0.0)  # the paper's polynomial kernel
    NSTPlugin(**defaults)
    assert set(spec.sweep) <= set(defaults)


def test_nst_forgets_less_than_naive_in_task_il(digits_cfg):
    digits_cfg["benchmark"].update(scenario="task", pad_to_32=True)
    digits_cfg["model"] = {"name": "lenet"}
    digits_cfg["optimizer"]["lr"] = 0.003  # large steps: naive's conv layers drift
    digits_cfg["methods"] = ["naive", {"name": "nst", "params": {"weight": 200.0}}]
    naive, nst = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == nst["status"] == "finished", (naive.get("error"), nst.get("error"))
    assert naive["summary"]["bwt"] < -0.1
    assert nst["summary"]["bwt"] > naive["summary"]["bwt"] + 0.08
