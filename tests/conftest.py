"""Shared fixtures. MNIST-based tests use a scratch copy of ../shared/data (never the original:
the files must stay untouched), made once per test session; they skip when it is absent."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

# One intra-op thread for the whole suite: the tests run tiny models, where a second thread
# brings no speed-up, and on a loaded 2-core machine thread contention made small steps up to
# 100x slower (measured while several jobs shared the box).
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("CL_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> str:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {SHARED_DATA} (set CL_SHARED_DATA)")
    root = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        if (SHARED_DATA / name).is_dir():
            shutil.copytree(SHARED_DATA / name, root / name)
    return str(root)


@pytest.fixture
def digits_cfg(tmp_path):
    """A fast config on the embedded split_digits benchmark (no files, a few seconds)."""
    from cl_plugins.experiment.config import DEFAULT_CONFIG

    cfg = copy.deepcopy(DEFAULT_CONFIG)
    cfg["name"] = "test"
    cfg["model"] = {"name": "mlp", "hidden": [32]}
    cfg["strategy"].update(epochs=2, train_mb_size=32, eval_mb_size=256, device="cpu")
    cfg["methods"] = ["naive"]
    cfg["loggers"].update(progress=False, plots=False)
    cfg["output_dir"] = str(tmp_path / "runs")
    return cfg
