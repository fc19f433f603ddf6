"""Accuracy matrix, ACC, BWT, forgetting; the task-IL view of a single-head model.

A[i][j] is the accuracy on test experience j after training experience i (every experience is
evaluated after every training experience, future ones included). With T experiences:

- ACC = mean_j A[T-1][j];
- BWT = mean_{j<T-1} (A[T-1][j] - A[j][j])  (Lopez-Paz & Ranzato 2017; negative = forgetting);
- forgetting = mean_{j<T-1} max_{j<=l<T-1} (A[l][j] - A[T-1][j])  (Chaudhry et al. 2018);
- the ACC curve: after training experience i, mean_{j<=i} A[i][j].
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np
import torch
from avalanche.evaluation import GenericPluginMetric, Metric, PluginMetric
from avalanche.logging import BaseLogger
from avalanche.training.plugins import EvaluationPlugin

ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")
TASK_VIEW_KEY = re.compile(r"^TaskIL_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")


class _MaskedAccuracy(Metric[float]):
    def __init__(self):
        self.correct, self.total = 0, 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, y: torch.Tensor, classes) -> None:
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[torch.as_tensor(list(classes), device=logits.device)] = True
        pred = logits.masked_fill(~allowed, float("-inf")).argmax(1)
        self.correct += int((pred == y).sum())
        self.total += int(y.numel())

    def result(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def reset(self) -> None:
        self.correct, self.total = 0, 0


class TaskILAccuracy(GenericPluginMetric[float, _MaskedAccuracy]):
    """Task-IL accuracy of a single-head (class-IL) model: logits restricted to the classes of
    the evaluated experience, i.e. the prediction a task oracle would allow."""

    def __init__(self):
        super().__init__(_MaskedAccuracy(), reset_at="experience", emit_at="experience",
                         mode="eval")

    def update(self, strategy):
        self._metric.update(strategy.mb_output, strategy.mb_y,
                            strategy.experience.classes_in_this_experience)

    def __str__(self):
        return "TaskIL_Acc_Exp"


TRAIN_STEP_HOOKS = ("before_training_iteration", "before_forward", "after_forward",
                    "before_backward", "after_backward", "before_update", "after_update",
                    "after_training_iteration")


def _quiet_metric(metric) -> bool:
    """A metric whose training-step hooks do nothing: ``PluginMetric``'s no-ops, or
    ``GenericPluginMetric``'s in a metric that only measures in evaluation."""
    for h in TRAIN_STEP_HOOKS:
        fn = getattr(type(metric), h, None)
        if fn is getattr(PluginMetric, h, None):
            continue
        if fn is getattr(GenericPluginMetric, h, None) and getattr(metric, "_mode", None) == "eval":
            continue
        return False
    return True


def _quiet_logger(logger) -> bool:
    return all(getattr(type(logger), h, None) is getattr(BaseLogger, h, None)
               for h in TRAIN_STEP_HOOKS)


class RunnerEvaluationPlugin(EvaluationPlugin):
    """Avalanche's ``EvaluationPlugin``, minus its eight calls a training step when no metric
    and no logger does anything in them. Avalanche's forwards every ``before_*``/``after_*``
    hook to every metric and logger (and wraps the experience in a logging view each time):
    about 0.4 ms a step on the CPU, measured in docs/speed.md. When every metric is an
    evaluation-phase ``GenericPluginMetric`` or a ``PluginMetric`` with the base no-op hooks
    (the runner's accuracy, BWT, forgetting and task-IL metrics) and every logger keeps
    ``BaseLogger``'s, those hooks are hidden from the template's plugin loop; everything else,
    evaluation hooks included, is Avalanche's own."""

    def __init__(self, *metrics, **kwargs):
        super().__init__(*metrics, **kwargs)
        self.quiet_training_steps = (
            all(_quiet_metric(m) for m in self.metrics)
            and all(_quiet_logger(lg) for lg in self.loggers))

    def __getattribute__(self, item):
        if item in TRAIN_STEP_HOOKS and object.__getattribute__(self, "__dict__").get(
                "quiet_training_steps"):
            raise AttributeError(item)  # hasattr() is False: trigger_plugins skips it
        return super().__getattribute__(item)


def matrix_row(metrics: Dict[str, float], n_experiences: int, pattern=ACC_KEY) -> List[float]:
    """Pull one row of the accuracy matrix out of an Avalanche ``eval`` result dict."""
    row = [float("nan")] * n_experiences
    for key, value in metrics.items():
        m = pattern.match(key)
        if m:
            row[int(m.group(1))] = float(value)
    missing = [j for j, v in enumerate(row) if v != v]
    if missing:
        raise RuntimeError(f"evaluation returned no accuracy for test experiences {missing}")
    return row


def summarize(matrix: List[List[float]]) -> Dict[str, Optional[float]]:
    """ACC, BWT, forgetting and the ACC curve of a (rows x T) accuracy matrix."""
    a = np.asarray(matrix, dtype=np.float64)
    rows, t = a.shape
    out: Dict[str, Optional[float]] = {"acc": float(a[-1].mean())}
    if rows == t and t > 1:
        out["bwt"] = float(np.mean([a[-1, j] - a[j, j] for j in range(t - 1)]))
        out["forgetting"] = float(np.mean([a[j:t - 1, j].max() - a[-1, j] for j in range(t - 1)]))
        out["acc_curve"] = [float(a[i, : i + 1].mean()) for i in range(t)]
        out["avg_incremental_acc"] = float(np.mean(out["acc_curve"]))
    else:  # joint training has one row: BWT and forgetting are undefined
        out.update(bwt=None, forgetting=None, acc_curve=[out["acc"]], avg_incremental_acc=None)
    return out
