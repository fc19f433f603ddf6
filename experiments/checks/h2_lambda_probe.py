"""The probe behind protocol H2's lambda grid (docs/methods/pnc.md, "Protocol H2").

Online EWC with mean-normalised Fishers (fisher_norm="mean", gamma 0.95) on the first three tasks
of Split MNIST task-IL with S2's model and optimizer (MLP 784-400-400, Adam 1e-3, batch 128) at
500 iterations per task, seed 0; prints, per lambda, the test accuracy on the tasks seen after
each task (lambda -1: naive fine-tuning). Run from the repository root, with a *copy* of the MNIST
files (the first read extracts them next to the .gz files):

    OMP_NUM_THREADS=1 python experiments/checks/h2_lambda_probe.py DATA_ROOT \
        -1 0.001 0.01 0.1 10 1000
"""

from __future__ import annotations

import sys
import time

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.core.tensor_batches import TensorBatchesPlugin
from cl_plugins.models import build_model
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin


def main(root: str, lambdas):
    torch.set_num_threads(1)
    info = build_benchmark("split_mnist", "task", 5, class_order="vandeven2022",
                           normalize=False, data_root=root)
    tests = list(info.benchmark.test_stream)
    for lam in lambdas:
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": [400, 400], "head": "auto"}, info)
        plugins = [IterationBudgetPlugin(500), TensorBatchesPlugin()]
        if lam >= 0:
            plugins.append(OnlineEWCPlugin(ewc_lambda=lam, gamma=0.95, fisher_norm="mean"))
        st = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                   criterion=nn.CrossEntropyLoss(), train_mb_size=128, train_epochs=1,
                   eval_mb_size=1000, device="cpu", plugins=plugins,
                   evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
        rows, t0 = [], time.time()
        for k, exp in enumerate(list(info.benchmark.train_stream)[:3]):
            st.train(exp)
            res = st.eval(tests[:k + 1])
            rows.append([round(v, 4) for n, v in res.items() if n.startswith("Top1_Acc_Exp")])
        print(lam, rows, f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [float(a) for a in sys.argv[2:]])
