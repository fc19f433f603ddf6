"""Avalanche's FeatureDistillationPlugin on the runner's ClassifierNet (``avalanche_feature_distillation``):
the hooks make it run, and the term it adds is its own cosine formula on the backbone's features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, FeatureDistillationPlugin

from cl_plugins.baselines.avalanche_feature_distill import AvalancheFeatureDistillation
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model


class _Spy(AvalancheFeatureDistillation):
    """Records the loss before and after Avalanche's before_backward, and both feature sets."""

    def before_backward(self, strategy, **kwargs):
        before = strategy.loss.detach().clone()
        super().before_backward(strategy, **kwargs)
        if self.prev_model is not None:
            with torch.no_grad():
                old = self.prev_model.backbone(strategy.mb_x)
            new = strategy.model.backbone(strategy.mb_x)
            want = self.alpha * (1 - F.cosine_similarity(new, old, dim=1).mean())
            self.records.append(((strategy.loss.detach() - before).item(), want.item()))


def _strategy(plugin, seed=0, scenario="domain"):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [16]}, info)  # no BatchNorm, no dropout
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def test_the_term_is_avalanches_cosine_on_the_backbone_features():
    spy = _Spy(alpha=2.0)
    spy.records = []
    st, info = _strategy(spy)
    st.train(info.benchmark.train_stream[0])
    assert spy.records == []  # no teacher during the first experience
    st.train(info.benchmark.train_stream[1])
    assert len(spy.records) > 5
    got, want = zip(*spy.records)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert max(want) > 1e-4  # the teacher's features differ from the student's: a real term


def test_plain_avalanche_plugin_fails_on_the_same_model_and_the_wrapper_does_not():
    st, info = _strategy(FeatureDistillationPlugin())
    st.train(info.benchmark.train_stream[0])
    with pytest.raises(TypeError, match=r"cosine_similarity\(\).*NoneType"):
        st.train(info.benchmark.train_stream[1])
    st, info = _strategy(AvalancheFeatureDistillation())
    st.train(info.benchmark.train_stream[0])
    st.train(info.benchmark.train_stream[1])
    x = torch.stack([info.benchmark.train_stream[1].dataset[i][0] for i in range(4)])
    st.model(x)
    assert torch.equal(st.model.features, st.model.backbone(x))


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="mode must be one of 'cosine', 'mse'"):
        AvalancheFeatureDistillation(mode="l2")
    with pytest.raises(ValueError, match="alpha"):
        AvalancheFeatureDistillation(alpha=-1.0)
    st, info = _strategy(AvalancheFeatureDistillation(layer="nope"))
    with pytest.raises(ValueError, match="layer 'nope' is not a module of ClassifierNet"):
        st.train(info.benchmark.train_stream[0])


def test_runner_runs_it_by_name_and_it_changes_training(digits_cfg):
    digits_cfg["benchmark"].update(scenario="domain", n_experiences=2)
    digits_cfg["strategy"]["epochs"] = 1
    digits_cfg["methods"] = ["naive", {"name": "avalanche_feature_distillation",
                                       "params": {"alpha": 5.0}}]
    naive, run = run_experiment(digits_cfg, echo=lambda *a: None)
    assert run["status"] == "finished", run.get("error")
    assert run["matrix"][0] == naive["matrix"][0] and run["matrix"][1] != naive["matrix"][1]
    assert str(run["checkpoint"]).startswith("off")


def test_task_il_the_teacher_gets_the_new_head_and_the_term_is_unchanged():
    """Per-task heads: Avalanche's teacher (a copy from the previous experience) has no head for
    the new task; the wrapper adapts it, and the term is still the cosine on the features."""
    spy = _Spy(alpha=2.0)
    spy.records = []
    st, info = _strategy(spy, scenario="task")
    st.train(info.benchmark.train_stream[0])
    st.train(info.benchmark.train_stream[1])
    assert len(spy.records) > 5
    got, want = zip(*spy.records)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7) and max(want) > 1e-4
    with_plain_copy = AvalancheFeatureDistillation()
    st, info = _strategy(with_plain_copy, scenario="task")
    st.train(info.benchmark.train_stream[0])
    with_plain_copy.before_training_exp = lambda strategy, **kw: None  # Avalanche's behaviour
    with pytest.raises(KeyError):
        st.train(info.benchmark.train_stream[1])

