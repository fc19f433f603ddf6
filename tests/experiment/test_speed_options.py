"""The runner's speed options: the quiet evaluator and the automatic thread count."""

from __future__ import annotations

import json

import pytest
import torch
from avalanche.evaluation.metrics import (accuracy_metrics, bwt_metrics, forgetting_metrics,
                                          loss_metrics)

from cl_plugins.experiment import threads as th
from cl_plugins.experiment.cli import main
from cl_plugins.experiment.evaluation import (TRAIN_STEP_HOOKS, RunnerEvaluationPlugin,
                                              TaskILAccuracy)

FAST = ["--methods=naive", "--strategy.epochs=1", "--no-plots", "--no-progress", "--no-checkpoint"]


def test_the_evaluator_hides_training_step_hooks_only_when_nothing_uses_them():
    quiet = RunnerEvaluationPlugin(accuracy_metrics(experience=True), bwt_metrics(stream=True),
                                   forgetting_metrics(stream=True), TaskILAccuracy(), loggers=[],
                                   strict_checks=False)
    assert quiet.quiet_training_steps
    assert not any(hasattr(quiet, h) for h in TRAIN_STEP_HOOKS)
    assert hasattr(quiet, "after_eval_iteration") and hasattr(quiet, "after_training_exp")
    busy = RunnerEvaluationPlugin(accuracy_metrics(minibatch=True), loss_metrics(epoch=True),
                                  loggers=[], strict_checks=False)
    assert not busy.quiet_training_steps
    assert all(hasattr(busy, h) for h in TRAIN_STEP_HOOKS)


def test_a_training_metric_still_gets_every_step(tmp_path):
    """Through a real strategy: a minibatch metric beside the runner's still records."""
    from avalanche.training import Naive

    from cl_plugins.benchmarks import build_benchmark
    from helpers import digits_model

    info = build_benchmark("split_digits", "task")
    ev = RunnerEvaluationPlugin(accuracy_metrics(minibatch=True, experience=True), loggers=[],
                                strict_checks=False)
    model = digits_model(info).float()
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               train_mb_size=32, eval_mb_size=256, train_epochs=1, evaluator=ev)
    st.train(info.benchmark.train_stream[0])
    keys = ev.get_last_metrics()
    assert any(k.startswith("Top1_Acc_MB/train_phase") for k in keys), sorted(keys)


def test_flop_count_and_auto_threads(monkeypatch):
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 10))
    flops = th.forward_flops(mlp, (1, 8, 8), 32)
    assert flops == pytest.approx(2 * 32 * (64 * 100 + 100 * 10), rel=0.01)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: 8)
    assert th.choose_threads("auto", mlp, (1, 8, 8), 32, "cpu")[0] == 1
    monkeypatch.setattr(th, "MIN_FLOPS_PER_THREAD", flops / 3.5)
    assert th.choose_threads("auto", mlp, (1, 8, 8), 32, "cpu")[0] == 3
    monkeypatch.setattr(th, "MIN_FLOPS_PER_THREAD", flops / 100)
    assert th.choose_threads("auto", mlp, (1, 8, 8), 32, "cpu")[0] == 8  # capped at the cores
    assert th.choose_threads(5, mlp, (1, 8, 8), 32, "cpu") == (5, "strategy.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert th.choose_threads("auto", mlp, (1, 8, 8), 32, "cpu")[1] == "OMP_NUM_THREADS"


def test_the_thread_choice_is_applied_and_recorded(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        assert main([f"--out={tmp_path}", "--strategy.threads=2", *FAST]) == 0
        (js,) = (tmp_path / "default" / "naive").glob("*/seed0.json")
        assert json.loads(js.read_text())["threads"] == {"threads": 2,
                                                         "reason": "strategy.threads"}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["0", "many", "true", "1.5"])
def test_bad_threads_are_refused_before_any_work(tmp_path, capsys, value):
    assert main([f"--out={tmp_path}", f"--strategy.threads={value}", *FAST]) == 2
    assert "strategy.threads" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_multihead_model_is_counted_through_its_first_head():
    from cl_plugins.benchmarks import build_benchmark
    from cl_plugins.models import build_model

    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [100]}, info)
    assert th.forward_flops(model, info.input_shape, 10) == pytest.approx(
        2 * 10 * (64 * 100 + 100 * 2), rel=0.01)
