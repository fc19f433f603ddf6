"""Shared fixtures, for the whole tree (the one conftest.py). MNIST-based tests use a scratch copy
of ../shared/data (never the original: the files must stay untouched), made once per test
session; they skip when it is absent. Plain helper functions shared by several test files are in
helpers.py beside this file."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import COLOURS, VAL, WNIDS, dump_pickle, index_pattern, rgb_pattern, save_jpeg

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


@pytest.fixture(scope="module")
def digits_benchmarks():
    """split_digits in each scenario, built once per test module: {scenario: BenchmarkInfo}."""
    from cl_plugins.benchmarks import build_benchmark

    return {s: build_benchmark("split_digits", s) for s in ("task", "domain", "class")}


@pytest.fixture
def register_methods():
    """``register_methods(spec, ...)`` adds throwaway MethodSpecs to the registry for one test;
    the registry is restored afterwards. The built-in methods are loaded first (every plugin of
    ``PLUGIN_CLASSES`` is registered already: never re-register one), and a name that is taken
    is an error, so a test cannot shadow a real method by accident."""
    from cl_plugins import registry

    registry.list_methods()
    saved = dict(registry._REGISTRY)

    def register(*specs):
        for spec in specs:
            registry.register(spec)

    yield register
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


# ------------------------------------------------ tiny CIFAR / TinyImageNet trees, real layouts

@pytest.fixture
def cifar10_root(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    batches = {}
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = [(4 * (i - 1) + j) % 10 for j in range(4)]  # 0..9, 0..9, ...
        batches[f"data_batch_{i}"] = (data, labels)
    batches["data_batch_1"][0][0] = rgb_pattern()
    batches["data_batch_1"][0][1] = index_pattern()
    batches["test_batch"] = (rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), [9, 8, 7, 6])
    for name, (data, labels) in batches.items():
        dump_pickle(base / name, {"batch_label": name, "data": data, "labels": labels,
                                  "filenames": [f"img_{k}.png" for k in range(len(labels))]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump_pickle(base / "batches.meta",
                {"label_names": names, "num_cases_per_batch": 4, "num_vis": 3072})
    return tmp_path, batches, names


@pytest.fixture
def cifar100_root(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    splits = {
        "train": (rng.integers(0, 256, size=(6, 3072), dtype=np.uint8), [0, 99, 42, 7, 50, 99]),
        "test": (rng.integers(0, 256, size=(3, 3072), dtype=np.uint8), [5, 98, 0]),
    }
    splits["train"][0][2] = rgb_pattern()
    for name, (data, fine) in splits.items():
        dump_pickle(base / name, {"data": data, "fine_labels": fine,
                                  "coarse_labels": [f % 20 for f in fine],
                                  "filenames": ["x.png"] * len(fine)})
    fine_names = [f"fine_{i}" for i in range(100)]
    dump_pickle(base / "meta", {"fine_label_names": fine_names,
                                "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return tmp_path, splits, fine_names


@pytest.fixture
def tiny_root(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    # words.txt covers the whole of ImageNet; here two of our wnids and an unrelated one
    (base / "words.txt").write_text(
        "n00000009\tentity\n"
        f"{WNIDS[0]}\tgoldfish, Carassius auratus\n"
        f"{WNIDS[1]}\tEgyptian cat\n"
    )
    for label, wnid in enumerate(WNIDS):
        class_dir = base / "train" / wnid
        # _10 and _2: natural order puts _2 first; _2 is slightly darker to tell them apart
        r, g, b = COLOURS[label]
        save_jpeg(class_dir / "images" / f"{wnid}_2.JPEG", (r - 20, g - 20, b - 20))
        save_jpeg(class_dir / "images" / f"{wnid}_10.JPEG", (r, g, b))
        (class_dir / f"{wnid}_boxes.txt").write_text(f"{wnid}_2.JPEG\t0\t0\t63\t63\n")
    # one grayscale training image, replacing class 1's _10
    save_jpeg(base / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_10.JPEG", 128, mode="L")

    lines = []
    for filename, label in VAL:
        save_jpeg(base / "val" / "images" / filename, COLOURS[label])
        lines.append(f"{filename}\t{WNIDS[label]}\t0\t5\t60\t62")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path
