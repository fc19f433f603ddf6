"""RKD (Park et al. 2019): the term a strategy adds (by hand), the O(N^3) guard, state,
arguments, and less forgetting than naive end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.distill_losses import rkd_distance
from cl_plugins.distillation.relational_kd import RelationalKDPlugin
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from cl_plugins.registry import MethodSpec, signature_defaults
from cl_plugins.replay.er import ERPlugin
from helpers import rkd_angle


class TermSpy(SupervisedPlugin):
    """Placed around the plugin: strategy.loss at ``before_backward``."""

    def __init__(self):
        super().__init__()
        self.loss = []

    def before_backward(self, strategy, **kwargs):
        self.loss.append(strategy.loss.item())


class Expected(SupervisedPlugin):
    """The term by hand: the backbone's features of the selected rows, student and teacher."""

    def __init__(self, plugin, rows):
        super().__init__()
        self.plugin, self.rows, self.terms = plugin, rows, []

    def before_backward(self, strategy, **kwargs):
        if self.plugin.teacher is None:
            return
        x = strategy.mb_x[self.rows(strategy)]
        with torch.no_grad():
            s, t = strategy.model.backbone(x), self.plugin.teacher.backbone(x)
            p = self.plugin
            self.terms.append(p.weight * (p.distance_weight * rkd_distance(s, t)
                                          + p.angle_weight * rkd_angle(s, t)).item())


def strategy(plugins, scenario="domain", lr=1e-3):
    torch.manual_seed(0)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    st = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info


@pytest.mark.parametrize("inputs", ["current", "both"])
def test_the_term_is_the_weighted_rkd_losses_of_the_embeddings(inputs):
    plugin = RelationalKDPlugin(weight=0.5, distance_weight=3.0, angle_weight=2.0,
                                inputs=inputs)
    n_stream = {}

    class Rows(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kwargs):
            n_stream["n"] = strategy.mbatch[0].shape[0]

    rows = (lambda st: slice(0, n_stream["n"])) if inputs == "current" else \
        (lambda st: slice(0, None))
    before, after = TermSpy(), TermSpy()
    expected = Expected(plugin, rows)
    plugins = [Rows(), ERPlugin(mem_size=60, seed=0)] if inputs == "both" else [Rows()]
    st, info = strategy(plugins + [before, plugin, after, expected])
    for e in range(2):
        st.train(info.benchmark.train_stream[e])
    n_first = len(before.loss) - len(expected.terms)
    terms = [a - b for a, b in zip(after.loss[n_first:], before.loss[n_first:])]
    assert all(a == b for a, b in zip(after.loss[:n_first], before.loss[:n_first]))
    assert len(terms) == len(expected.terms) > 3
    assert terms[0] == pytest.approx(0.0, abs=1e-6)  # the student starts as the teacher
    assert terms == pytest.approx(expected.terms, rel=1e-4, abs=1e-7)
    assert max(terms) > 1e-3


def test_the_angle_loss_refuses_a_batch_too_large_for_its_memory():
    plugin = RelationalKDPlugin(max_angle_rows=20)
    s, t = torch.randn(21, 4), torch.randn(21, 4)
    y = torch.zeros(21, dtype=torch.long)
    with pytest.raises(ValueError, match=r"angle loss on 21 rows needs O\(N\^3\) memory \(9,261 "
                                         r"cosines.*max_angle_rows=20"):
        plugin.distill_loss({"backbone": s}, {"backbone": t}, y, y)
    fine = RelationalKDPlugin(max_angle_rows=21).distill_loss({"backbone": s}, {"backbone": t},
                                                               y, y)
    assert fine.item() == pytest.approx(
        (25 * rkd_distance(s, t) + 50 * rkd_angle(s, t)).item(), rel=1e-6)
    no_angle = RelationalKDPlugin(max_angle_rows=20, angle_weight=0.0)
    assert no_angle.distill_loss({"backbone": s}, {"backbone": t}, y, y).item() == \
        pytest.approx(25 * rkd_distance(s, t).item(), rel=1e-6)


def test_two_layers_add_up():
    plugin = RelationalKDPlugin(layers=["a", "b"], distance_weight=1.0, angle_weight=0.0)
    g = torch.Generator().manual_seed(0)
    f = {k: torch.randn(6, 3, generator=g) for k in ("a", "b", "ta", "tb")}
    y = torch.zeros(6, dtype=torch.long)
    got = plugin.distill_loss({"a": f["a"], "b": f["b"]}, {"a": f["ta"], "b": f["tb"]}, y, y)
    assert got.item() == pytest.approx((rkd_distance(f["a"], f["ta"])
                                        + rkd_distance(f["b"], f["tb"])).item(), rel=1e-6)


def test_state_round_trip_and_settings():
    plugin = RelationalKDPlugin(angle_weight=10.0)
    st, info = strategy([plugin])
    st.train(info.benchmark.train_stream[0])
    state = copy.deepcopy(plugin.state_dict())
    fresh = RelationalKDPlugin(angle_weight=10.0)
    fresh.load_state_dict(state)
    assert fresh.n_experiences == 1 and fresh.state_dict()["config"] == state["config"]
    with pytest.raises(ValueError, match="saved with angle_weight=10.0, this plugin has "
                                         "angle_weight=50.0"):
        RelationalKDPlugin().load_state_dict(state)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"weight": -1.0}, r"weight must be in \[0, inf\)"),
    ({"distance_weight": -0.1}, r"distance_weight must be in \[0, inf\)"),
    ({"angle_weight": float("inf")}, r"angle_weight must be a number"),
    ({"max_angle_rows": 2}, r"max_angle_rows must be in \[3, inf\)"),
    ({"max_angle_rows": 100.0}, r"max_angle_rows must be an integer"),
    ({"layers": ""}, r"layers must be a module name"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RelationalKDPlugin(**kwargs)


def test_registry_header():
    spec = MethodSpec.from_plugin(RelationalKDPlugin)
    assert spec.name == "relational_kd" and spec.scenarios == ("task", "domain", "class")
    assert not spec.needs_task_labels and spec.paper and spec.summary
    defaults = signature_defaults(RelationalKDPlugin)
    assert (defaults["distance_weight"], defaults["angle_weight"]) == (25.0, 50.0)
    assert defaults["layers"] == "backbone" and defaults["inputs"] == "current"
    RelationalKDPlugin(**defaults)
    assert set(spec.sweep) <= set(defaults)


def test_relational_kd_forgets_less_than_naive_in_domain_il(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "domain"  # one head: the shared embedding matters
    digits_cfg["methods"] = ["naive", "relational_kd"]
    naive, rkd = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == rkd["status"] == "finished", (naive.get("error"), rkd.get("error"))
    assert naive["summary"]["bwt"] < -0.05
    assert rkd["summary"]["bwt"] > naive["summary"]["bwt"] + 0.05
    assert rkd["summary"]["acc"] > naive["summary"]["acc"]
