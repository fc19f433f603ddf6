"""Scaled-down CPU smoke runs of the GPU protocol configs (experiments/smoke_gpu_configs.py): each
config runs end to end on tiny synthetic files in the dataset's real on-disk format, with the
config's split, batch size, optimizer groups, scheduler and method hyper-parameters."""

from __future__ import annotations

import importlib.util
import math

import pytest

from helpers import REPO


def _smoke_module():
    spec = importlib.util.spec_from_file_location(
        "smoke_gpu_configs", REPO / "experiments" / "smoke_gpu_configs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SMOKE = _smoke_module()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_smoke")  # the tiny datasets are written once


# The TinyImageNet config's smoke run takes 134 s on an idle 2-core machine (200 classes, 25
# experiences): it runs with -m slow; its loader's format and errors are tested in
# tests/benchmarks/ (test_dataset_files.py, test_data_file_errors.py).
# NSCL's 20-split CIFAR-100 config (27 s under load) runs the 10-split one's model, method and
# loader with more experiences: -m slow too, to keep the default suite under 15 minutes.
SLOW_CONFIGS = {"wang2021_nscl_tinyimagenet_25split", "wang2021_nscl_cifar100_20split"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_CONFIGS
                                               else []) for n in SMOKE.GPU_CONFIGS])
def test_gpu_config_runs_scaled_down(name, workdir):
    from cl_plugins.experiment.config import load_config

    cfg = load_config(REPO / "experiments" / "configs" / f"{name}.yaml")
    runs = SMOKE.smoke_config(name, workdir)
    labels = [m if isinstance(m, str) else m.get("label", m["name"]) for m in cfg["methods"]]
    assert sorted(r["method"] for r in runs) == sorted(labels)
    T = cfg["benchmark"]["n_experiences"]
    n_classes = {"split_cifar100": 100, "split_tinyimagenet": 200}[cfg["benchmark"]["name"]]
    per_exp = 2 * n_classes // T  # 2 training images per class in the tiny copy
    steps = math.ceil(per_exp / cfg["strategy"]["train_mb_size"])
    for r in runs:
        assert r["status"] == "finished", r.get("error")
        assert len(r["matrix"]) == T and all(len(row) == T for row in r["matrix"])
        assert all(0.0 <= a <= 1.0 for row in r["matrix"] for a in row)
        assert r["steps_per_exp"] == [steps] * T  # the config's split and batch size


def test_unknown_benchmark_is_refused(workdir, tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\nbenchmark: {name: split_digits}\n")
    SMOKE.CONFIGS, saved = tmp_path, SMOKE.CONFIGS
    try:
        with pytest.raises(ValueError, match="split_digits"):
            SMOKE.smoke_config("x", workdir)
    finally:
        SMOKE.CONFIGS = saved
