"""Slow: one seed of protocol S1 (Hsu et al. 2018) naive SGD, task-IL, against the paper.

Excluded from the default run; `pytest -m slow` selects it (about a minute on 2 cores)."""

from __future__ import annotations


import pytest

from cl_plugins.experiment.config import load_config
from cl_plugins.experiment.runner import run_experiment

from helpers import REPO


@pytest.mark.slow
@pytest.mark.parametrize("scenario, published, spread", [("task", 97.98, 0.09),
                                                         ("class", 19.46, 0.04)])
def test_s1_naive_sgd_matches_hsu2018(mnist_root, tmp_path, scenario, published, spread):
    cfg = load_config(REPO / "experiments" / "configs" / "hsu2018_split_mnist.yaml")
    cfg["benchmark"].update(scenario=scenario, data_root=mnist_root)
    cfg["methods"] = [m for m in cfg["methods"] if m["label"] == "naive-sgd"]
    cfg.update(seeds=[0], output_dir=str(tmp_path))
    cfg["loggers"].update(plots=False)
    (r,) = run_experiment(cfg, echo=lambda *a: None)
    # one seed: allow three published standard deviations plus 0.3 points
    assert abs(100 * r["summary"]["acc"] - published) <= 3 * spread + 0.3
