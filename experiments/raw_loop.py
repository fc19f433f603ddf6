#!/usr/bin/env python
"""The same protocol as ``cl-run``, written as a plain PyTorch loop: the yardstick of our speed.

    python experiments/raw_loop.py s1 --data-root PATH [--seed 0] [--json OUT]
    python experiments/raw_loop.py p1 --data-root PATH [--samples-per-task 6000] [--epochs 1]

``s1``: S1 domain-IL, naive with Adam (hsu2018_split_mnist.yaml, label naive-adam): split MNIST,
digits {0,1}, {2,3}, ... with the label y mod 2, 28x28 zero-padded to 32x32 and normalised with
(0.1000, 0.2752), MLP 1024-400-400-2, Adam lr 1e-3 whose zero_grad keeps zeroed gradients, one
optimizer for the whole stream, 4 epochs at batch 128, the whole test stream evaluated at batch
1000 after each experience.
``p1``: P1's naive (saha2021_gpm_permuted_mnist.yaml): 10 pixel permutations of MNIST (the
first permuted too), normalised with (0.1307, 0.3081), MLP 784-100-100-10 without biases, SGD lr
0.01 at batch 10, 5 epochs (``--epochs``), ``--samples-per-task`` training images per task drawn
uniformly at random (all 60000 when omitted).

Nothing here imports cl_plugins or Avalanche: the data files are read with gzip and numpy, the
batches are index slices of tensors, the accuracy is counted by hand. It prints one JSON line
(the accuracy matrix in %, the wall times) and writes it to ``--json``.
``experiments/end_to_end_speed.py`` runs it against ``cl-run`` on the same settings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

T_IMPORT = time.perf_counter() - T0


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def mnist(root: Path, split: str):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz")
    y = read_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(x.copy()).float().div_(255), torch.from_numpy(y.astype(np.int64))


def mlp(sizes, bias=True):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(nn.Flatten(), *layers)


def s1_tasks(root: Path):
    tasks = {"train": [], "test": []}
    for split in ("train", "test"):
        x, y = mnist(root, split)
        x = (nn.functional.pad(x, (2, 2, 2, 2)) - 0.1000) / 0.2752
        for t in range(5):
            keep = (y == 2 * t) | (y == 2 * t + 1)
            tasks[split].append((x[keep].contiguous(), y[keep] % 2))
    return tasks


def p1_tasks(root: Path, seed: int, samples_per_task):
    tasks = {"train": [], "test": []}
    g = torch.Generator().manual_seed(seed)
    data = {s: mnist(root, s) for s in ("train", "test")}
    for _ in range(10):
        perm = torch.randperm(784, generator=g)
        for split, (x, y) in data.items():
            x = ((x - 0.1307) / 0.3081).reshape(len(x), 784)[:, perm]
            if split == "train" and samples_per_task:
                pick = torch.randperm(len(x), generator=g)[:samples_per_task]
                x, y = x[pick], y[pick]
            tasks[split].append((x.contiguous(), y))
    return tasks


def accuracy(model, x, y, batch):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return 100.0 * correct / len(x)


def run(protocol: str, root: Path, seed: int, samples_per_task, epochs):
    torch.manual_seed(seed)
    if protocol == "s1":
        tasks = s1_tasks(root)
        model = mlp([1024, 400, 400, 2])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batch, eval_batch, epochs, to_none = 128, 1000, epochs or 4, False
    else:
        tasks = p1_tasks(root, seed, samples_per_task)
        model = mlp([784, 100, 100, 10], bias=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        batch, eval_batch, epochs, to_none = 10, 1000, epochs or 5, True
    t_data = time.perf_counter() - T0
    loss_fn = nn.CrossEntropyLoss()
    matrix, train_s = [], 0.0
    for x, y in tasks["train"]:
        t = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for i in range(0, len(x), batch):
                idx = order[i:i + batch]
                opt.zero_grad(set_to_none=to_none)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
        train_s += time.perf_counter() - t
        matrix.append([accuracy(model, xt, yt, eval_batch) for xt, yt in tasks["test"]])
    return {"protocol": protocol, "seed": seed, "matrix": matrix,
            "acc": float(np.mean(matrix[-1])), "import_s": T_IMPORT, "data_s": t_data - T_IMPORT,
            "train_s": train_s, "total_s": time.perf_counter() - T0,
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("protocol", choices=["s1", "p1"])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples-per-task", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = run(a.protocol, Path(a.data_root), a.seed, a.samples_per_task, a.epochs)
    line = json.dumps(out)
    print(line)
    if a.json:
        Path(a.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
