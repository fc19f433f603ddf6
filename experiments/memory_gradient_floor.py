#!/usr/bin/env python
"""The arithmetic floor of GEM's and A-GEM's step on the B1 configs, against naive's step.

    python experiments/memory_gradient_floor.py [--steps 200]

GEM (Lopez-Paz & Ranzato 2017) and A-GEM (Chaudhry et al. 2019) compute, at *every* step, the
gradient of the loss on episodic memory: GEM one per past experience over all its stored samples
(B1-GEM: 1000 per experience; speed.py's row is measured at the third experience, so 2 x 1000),
A-GEM one over a random reference batch (B1-AGEM: 256 samples). That forward and backward pass is
the method itself, not overhead: this script times it alone, with nothing else (one plain
``torch.autograd.grad`` of a cross-entropy on a contiguous batch, per memory, and, for GEM, also
all memories in one concatenated forward with one backward per memory), next to naive's whole
step (batch 10: forward, backward, SGD update) on the same MLP. A method step cannot be cheaper
than naive's step plus this floor; the ratio printed is (naive + floor) / naive.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def _mlp(hidden):
    sizes = [784, *hidden, 10]
    layers = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def _median_ms(fn, steps):
    for _ in range(10):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"threads: {torch.get_num_threads()}\n")
    print("| config | naive step (ms) | memory gradients alone (ms) | floor ratio |\n|---|---|---|---|")
    for name, hidden, memories in (("B1-GEM, 2 memories x 1000", (100, 100), [1000, 1000]),
                                   ("B1-AGEM, reference batch 256", (256, 256), [256])):
        model = _mlp(hidden)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.1)
        x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
        mem = [(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))) for n in memories]

        def naive():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        def separate():
            for mx, my in mem:
                torch.autograd.grad(nn.functional.cross_entropy(model(mx), my), params)

        def concatenated():
            out = model(torch.cat([m[0] for m in mem]))
            start = 0
            for k, (mx, my) in enumerate(mem):
                loss = nn.functional.cross_entropy(out[start:start + len(my)], my)
                torch.autograd.grad(loss, params, retain_graph=k < len(mem) - 1)
                start += len(my)

        t_naive = _median_ms(naive, a.steps)
        t_mem = min(_median_ms(separate, a.steps), _median_ms(concatenated, a.steps))
        print(f"| {name} | {t_naive:.3f} | {t_mem:.3f} | {(t_naive + t_mem) / t_naive:.1f}x |")


if __name__ == "__main__":
    main()
