"""P&C on split_digits task-IL with the per-task Fisher normalisation, and its forward transfer.

The measurements of docs/methods/pnc.md made after the audit fixes (temperature 2, compress as
long as progress, fisher_norm, eval_column, adapters). Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/checks/pnc_norm_split_digits.py

Model, data, optimizer and metrics as experiments/checks/pnc_split_digits.py (MLP [32, 32] +
multi-head head, minibatch 32, SGD lr 0.05, seeds 0-4 for the global seed and P&C's seed):

- N: momentum 0.9, 2 epochs; pnc with mean-normalised Fishers at lambda 0.2 (the setting of
  tests/hybrid/test_pnc_split_digits.py) and at lambda 0 (distillation alone), online EWC at
  lambda 0.2 with mean-normalised Fishers, naive. A diverged run prints "div".
- T: no momentum, 1 epoch; the diagonal of the accuracy matrix of pnc evaluated on its active
  column (eval_column="ac"), with and without adapters, and of ensemble (a fresh network per task).
"""

from __future__ import annotations

import torch

from cl_plugins.baselines.ensemble import EnsemblePlugin
from cl_plugins.core.divergence import DivergenceError
from cl_plugins.hybrid.pnc import ProgressCompressPlugin
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin
from pnc_split_digits import SEEDS, forgetting, run


def fmt(values):
    return " ".join("div" if v is None else f"{v:.3f}" for v in values)


def mean(values):
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")


def main():
    torch.set_num_threads(1)
    methods = {
        "pnc mean 0.2": lambda s, t: [ProgressCompressPlugin(fisher_norm="mean", ewc_lambda=0.2,
                                                             seed=s)],
        "pnc mean 0": lambda s, t: [ProgressCompressPlugin(fisher_norm="mean", ewc_lambda=0.0,
                                                           seed=s)],
        "online_ewc mean 0.2": lambda s, t: [OnlineEWCPlugin(fisher_norm="mean",
                                                             ewc_lambda=0.2)],
        "naive": lambda s, t: []}
    for name, make in methods.items():
        final, forg = [], []
        for seed in SEEDS:
            try:
                rows, _ = run(make, seed, 0.9, epochs=2)
                final.append(sum(rows[-1]) / len(rows[-1]))
                forg.append(forgetting(rows))
            except DivergenceError:
                final.append(None)
                forg.append(None)
        print(f"N {name:20s} final {fmt(final)} mean {mean(final):.3f} | forgetting "
              f"{fmt(forg)} mean {mean(forg):.3f}", flush=True)
    transfer = {
        "pnc ac": lambda s, t: [ProgressCompressPlugin(eval_column="ac", seed=s)],
        "pnc ac, no adapters": lambda s, t: [ProgressCompressPlugin(eval_column="ac",
                                                                    adapters=False, seed=s)],
        "ensemble": lambda s, t: [EnsemblePlugin()]}
    for name, make in transfer.items():
        diag = []
        for seed in SEEDS:
            rows, _ = run(make, seed, 0.0, epochs=1)
            diag.append([rows[k][k] for k in range(len(rows))])
        means = [sum(d[k] for d in diag) / len(diag) for k in range(len(diag[0]))]
        print(f"T {name:20s} diagonal {fmt(means)} | tasks 2-5 mean {mean(means[1:]):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
