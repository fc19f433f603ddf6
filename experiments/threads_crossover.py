#!/usr/bin/env python
"""Where a second intra-op thread starts to pay: training-step time at 1..N threads for models
of growing forward FLOPs (the measurement behind ``threads.MIN_FLOPS_PER_THREAD``).

    python experiments/threads_crossover.py [--max-threads 2] [--steps 30]

Each row: a model and batch (the S1 and P1 MLPs, the main job's MLP, a wide MLP, the reduced
ResNet-18 of our CIFAR configs at two widths), its forward GFLOP per minibatch (the same count
``cl_plugins.experiment.threads`` uses), and the median SGD step (forward, backward, update) at
each thread count, after warm-up. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from cl_plugins.experiment.threads import forward_flops


def _mlp(sizes):
    layers = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def _cases():
    from cl_plugins.models.reduced_resnet import ReducedResNet18

    yield "P1 MLP 784-100-100-10", _mlp([784, 100, 100, 10]), (1, 28, 28), 10
    yield "main job MLP 64-256-256-10", _mlp([64, 256, 256, 10]), (1, 8, 8), 32
    yield "S1 MLP 1024-400-400-2", _mlp([1024, 400, 400, 2]), (1, 32, 32), 128
    yield "MLP 1024-2000-2000-10", _mlp([1024, 2000, 2000, 10]), (1, 32, 32), 128
    for nf in (20, 64):
        backbone = ReducedResNet18(3, nf)
        yield (f"reduced ResNet-18 nf={nf}, CIFAR",
               nn.Sequential(backbone, nn.Linear(backbone.out_features, 100)), (3, 32, 32), 32)


def _step_ms(model, shape, batch, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn((batch,) + shape)
    y = torch.zeros(batch, dtype=torch.long)
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 5:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args(argv)
    counts = list(range(1, a.max_threads + 1))
    print("| model, batch | forward GFLOP | " + " | ".join(f"{n} thr (ms)" for n in counts)
          + " |\n|---|---|" + "---|" * len(counts))
    for name, model, shape, batch in _cases():
        gflop = forward_flops(model, shape, batch) / 1e9
        ms = []
        for n in counts:
            torch.set_num_threads(n)
            ms.append(_step_ms(model, shape, batch, a.steps))
        print(f"| {name}, {batch} | {gflop:.3g} | " + " | ".join(f"{m:.2f}" for m in ms) + " |",
              flush=True)


if __name__ == "__main__":
    main()
