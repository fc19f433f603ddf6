"""Can D1's joint recipe reach the published 97.92? A plain PyTorch loop, no cl_plugins.

D1's joint row (experiments/configs/roy2023_sd_seq_mnist.yaml) trains Avalanche's JointTraining
once on the whole MNIST training set: one epoch, SGD lr 0.03 without momentum, minibatch 10, MLP
784-100-100-10, pixels in [0, 1] (Mammoth's best_args for sgd, which its joint model uses). This
script trains the same recipe in a bare loop, with PyTorch's default Linear initialisation (ours)
and with Mammoth's Xavier-uniform weights and zero biases, and prints the class-IL ACC as D1
reports it: the mean over the five digit pairs of the accuracy on that pair's test digits, over
all 10 classes. Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/checks/d1_joint_recipe.py DATA_ROOT --seeds 3

DATA_ROOT holds MNIST/raw/*.gz (read directly, nothing is written).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    raw = root / "MNIST" / "raw"
    x = _idx(raw / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 784).astype(np.float32) / 255
    y = _idx(raw / f"{split}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def run(init: str, seed: int, train, test) -> list[float]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                        nn.Linear(100, 10))
    if init == "xavier":
        for layer in net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(net.parameters(), lr=0.03)
    (x, y), (xt, yt) = train, test
    order = torch.randperm(len(x))
    for start in range(0, len(x), 10):
        idx = order[start:start + 10]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        pred = net(xt).argmax(1)
    return [(pred[yt // 2 == t] == yt[yt // 2 == t]).float().mean().item() for t in range(5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_root", type=Path)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per initialisation")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(1)
    train, test = load(args.data_root, "train"), load(args.data_root, "t10k")
    for init in ("default", "xavier"):
        accs = []
        for seed in range(args.seeds):
            per_task = run(init, seed, train, test)
            accs.append(100 * float(np.mean(per_task)))
            print(f"{init:8s} seed {seed}: ACC {accs[-1]:.2f}  per pair "
                  + " / ".join(f"{100 * a:.1f}" for a in per_task), flush=True)
        std = np.std(accs, ddof=1) if len(accs) > 1 else 0.0
        print(f"{init:8s} mean {np.mean(accs):.2f} +- {std:.2f}")


if __name__ == "__main__":
    main()
