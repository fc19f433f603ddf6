"""Scaled-down CPU smoke runs of the GPU protocol configs (CIFAR-100, TinyImageNet).

Neither dataset is on this machine, and the protocols take GPU-hours. This script writes a tiny
synthetic copy of each dataset in its real on-disk format (the pickles of ``cifar-100-python``;
the folders, JPEGs, ``wnids.txt`` and ``val_annotations.txt`` of ``tiny-imagenet-200``), then runs
each config end to end on the CPU with only these settings scaled down (everything else, the
benchmark split, the model family, the optimizer and its parameter groups, the scheduler, the
method and its hyper-parameters, is the config's):

- the data: ``per_class`` training and 1 test image per class (random pixels: the accuracies mean
  nothing; this checks that the protocol runs, not what it reaches);
- the ResNets' width (``model.width`` / ``model.nf`` = 8 instead of 64; GPM's 5-layer AlexNet
  keeps its size) and GPM's 95% training subsample (``samples_per_task``: the whole tiny copy);
- one epoch per experience, one seed, on the CPU.

    python experiments/smoke_gpu_configs.py [CONFIG ...] [--workdir DIR]

Without CONFIG it runs every GPU config of the projection family (``GPU_CONFIGS``) and prints, per
config and method, the status, the experiences trained, the steps and the seconds. The tests run
the same function (``tests/test_gpu_configs_smoke.py``).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "experiments" / "configs"
GPU_CONFIGS = ["wang2021_nscl_cifar100_10split", "wang2021_nscl_cifar100_20split",
               "wang2021_nscl_tinyimagenet_25split", "liu2022_rgo_cifar100_20split",
               "saha2021_gpm_cifar100_10split"]
SMOKE_WIDTH = 8
WIDTH_KEYS = {"preact_resnet18": "model.width", "resnet18_nobn": "model.nf",
              "resnet32": "model.nf"}  # AlexNet: as is


def write_tiny_cifar100(root: Path, per_class: int = 2, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` with ``per_class`` training images and one test
    image per class, as the official pickles (uint8 rows of 3072, channel-major)."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("test", 1)):
        fine = np.repeat(np.arange(100), n).tolist()
        data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
        with open(base / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [c % 20 for c in fine],
                         "filenames": [f"{split}_{i}.png" for i in range(len(fine))]}, f, protocol=2)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse_{i}" for i in range(20)]}, f, protocol=2)
    return Path(root)


def write_tiny_tinyimagenet(root: Path, per_class: int = 2, seed: int = 0) -> Path:
    """``root/tiny-imagenet-200`` in the layout of the official zip: 200 wnids, ``per_class``
    64x64 training JPEGs per class, one validation JPEG per class with its annotation line."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{10000000 + i}" for i in range(200)]
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for i, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{k}.JPEG", format="JPEG")
        name = f"val_{i}.JPEG"
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(
            base / "val" / "images" / name, format="JPEG")
        annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return Path(root)


def smoke_config(name: str, workdir: Path, per_class: int = 2) -> List[Dict[str, Any]]:
    """Run config ``name`` scaled down (module docstring) under ``workdir``; return its runs."""
    from cl_plugins.experiment.config import apply_override, load_config
    from cl_plugins.experiment.runner import run_experiment

    cfg = load_config(CONFIGS / f"{name}.yaml")
    data_root = Path(workdir) / "data"
    bench = cfg["benchmark"]["name"]
    if bench == "split_cifar100":
        if not (data_root / "cifar-100-python").exists():
            write_tiny_cifar100(data_root, per_class)
    elif bench == "split_tinyimagenet":
        if not (data_root / "tiny-imagenet-200").exists():
            write_tiny_tinyimagenet(data_root, per_class)
    else:
        raise ValueError(f"{name}: benchmark {bench!r} is not a GPU-protocol dataset this smoke "
                         "run knows (split_cifar100, split_tinyimagenet)")
    overrides = {"benchmark.data_root": str(data_root), "strategy.epochs": 1,
                 "strategy.device": "cpu", "seeds": [0], "output_dir": str(Path(workdir) / "runs"),
                 "loggers.json": False, "loggers.plots": False, "loggers.progress": False}
    width_key = WIDTH_KEYS.get(cfg["model"]["name"])
    if width_key:
        overrides[width_key] = SMOKE_WIDTH
    if cfg["benchmark"].get("samples_per_task"):  # more than the tiny copy holds
        overrides["benchmark.samples_per_task"] = None
    for key, value in overrides.items():
        apply_override(cfg, key, value)
    return run_experiment(cfg, echo=print)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", default=GPU_CONFIGS, help="config names (no .yaml)")
    ap.add_argument("--workdir", help="where the tiny data and the runs go (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        print("| config | method | status | experiences | steps | seconds (whole config) |")
        print("|---|---|---|---|---|---|")
        failed = 0
        for name in args.configs:
            t0 = time.perf_counter()
            runs = smoke_config(name, workdir)
            secs = time.perf_counter() - t0
            for r in runs:
                failed += r["status"] != "finished"
                print(f"| {name} | {r['method']} | {r['status']} | {len(r.get('matrix', []))} | "
                      f"{sum(r.get('steps_per_exp', []))} | {secs:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
