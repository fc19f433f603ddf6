"""Why CWR (the 2017 rule) forgets far more than CWR* in class-IL: the rule's two differences
switched on one at a time, on split_digits class-IL (the measurements of docs/methods/cwr.md,
"Why CWR forgets"). Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/checks/cwr_rule_ablation.py [SEEDS]

SEEDS: how many seeds (default 3: seeds 0, 1, 2; the global seed before the model is built).
Settings: the main job's (MLP [256, 256] with the class-IL MaskedHead "seen", Adam lr 1e-3,
10 epochs, minibatch 32). The two ways CWR's reset and consolidation differ from CWR*'s on a
stream whose classes each come once (where CWR*'s count weighting plays no part):

- the reset: every head row back to the head's initial (random) weights, against CWR*'s zeros;
- the consolidation: no mean shift, against CWR*'s subtraction of the current rows' mean.

Rows: ``cwr_star``; ``cwr``; ``cwr`` with a zero reset; ``cwr`` with the mean shift; ``cwr``
with both (which must equal ``cwr_star`` here: a built-in check of the script); ``cwr`` with the
mean shift and the zero reset from the second experience on (the first experience, where the
layers below the head still train, starts from the random head as in ``cwr``). The two switches
are set on the plugin's internals (``CWRPlugin.init``, ``ConsolidatedWeights.mean_shift``): they
are not options of the method.

Prints, per row: ACC and BWT of the final row (BWT over experiences 1..n-1), the task view's ACC
(logits restricted to the experience's classes), means over the seeds; then, for the first seed,
the mean logit of each experience's two rows on each experience's test data and each
experience's mean head-row entry: the component that every input shares.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.architectural.cwr import CWRPlugin
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.cwr import head_linear
from cl_plugins.models import build_model

INFO = build_benchmark("split_digits", "class")
TRAIN = list(INFO.benchmark.train_stream)


def _stack(exp):
    loader = torch.utils.data.DataLoader(exp.dataset, batch_size=len(exp.dataset))
    x, y, *_ = next(iter(loader))
    return x, y


TESTS = [_stack(e) for e in INFO.benchmark.test_stream]
CLASSES = [torch.unique(y) for _, y in TESTS]
# (label, variant, zero reset from which experience (None: never), mean shift)
ROWS = [("cwr_star", "cwr_star", None, False), ("cwr", "cwr", None, False),
        ("cwr, zero reset", "cwr", 0, False), ("cwr, mean shift", "cwr", None, True),
        ("cwr, both", "cwr", 0, True), ("cwr, both from 2", "cwr", 1, True)]


def run(variant: str, zero_from, mean_shift: bool, seed: int):
    torch.manual_seed(seed)
    model = build_model({"name": "mlp", "hidden": [256, 256]}, INFO)
    plugin = CWRPlugin(variant=variant)
    if variant == "cwr":
        plugin.cwr.mean_shift = mean_shift
        if zero_from == 0:
            plugin.init = torch.zeros_like(head_linear(model).weight)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=10,
                     eval_mb_size=256, device="cpu", plugins=[plugin],
                     evaluator=EvaluationPlugin(loggers=[]))
    n = len(TRAIN)
    acc, task_view = np.zeros((n, n)), np.zeros((n, n))
    for i, exp in enumerate(TRAIN):
        if i > 0 and i == zero_from:
            plugin.init = torch.zeros_like(plugin.init)
        strategy.train(exp)
        model.eval()
        with torch.no_grad():
            for j, (x, y) in enumerate(TESTS):
                out = model(x)
                acc[i, j] = (out.argmax(1) == y).double().mean()
                c = CLASSES[j]
                task_view[i, j] = (c[out[:, c].argmax(1)] == y).double().mean()
        with torch.no_grad():
            logits = np.array([[model(x)[:, c].mean().item() for c in CLASSES] for x, _ in TESTS])
            weight = head_linear(model).weight
            row_means = [weight[c].mean().item() for c in CLASSES]
    bwt = np.mean([acc[-1, j] - acc[j, j] for j in range(n - 1)])
    return acc[-1].mean(), bwt, task_view[-1].mean(), logits, row_means


def main(n_seeds: int) -> None:
    for label, variant, zero_from, mean_shift in ROWS:
        out = [run(variant, zero_from, mean_shift, s) for s in range(n_seeds)]
        acc, bwt, tv = (100 * np.array([o[k] for o in out]) for k in range(3))
        print(f"{label:16s} ACC {acc.mean():6.2f} ± {acc.std(ddof=1) if n_seeds > 1 else 0:4.2f}"
              f"   BWT {bwt.mean():7.2f}   task view {tv.mean():6.2f}")
        logits, row_means = out[0][3], out[0][4]
        print("   seed 0, mean logit of experience i's rows (columns) on experience j's test "
              "data (lines):")
        for line in logits:
            print("     " + " ".join(f"{v:6.2f}" for v in line))
        print("   seed 0, mean head-row entry per experience: "
              + " ".join(f"{v:+.4f}" for v in row_means))
        sys.stdout.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
