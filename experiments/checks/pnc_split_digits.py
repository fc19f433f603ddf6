"""Progress & Compress next to online EWC and naive fine-tuning on split_digits task-IL.

The measurements of docs/methods/pnc.md of 2026-12-05 (its "Before the audit fixes" tables),
and the helpers (``run``, ``forgetting``, ``SEEDS``) of pnc_norm_split_digits.py, which made the
current ones. Since the audit fixes (temperature 2, compress as long as progress), setting A below
stops at a DivergenceError: raw Fishers at lambda 800 with momentum 0.9 are past the stability
edge of this SGD. Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/checks/pnc_split_digits.py

Model: ClassifierNet, MLP [32, 32] + multi-head head; minibatch 32; seeds 0-4 (the global seed
before the model is built and, for P&C, the plugin's seed). Settings:

- A: SGD lr 0.05 momentum 0.9, 2 epochs, ewc_lambda 800 (both methods' default);
- B: SGD lr 0.05 no momentum, 2 epochs, ewc_lambda 800;
- C: SGD lr 0.05 momentum 0.9, 2 epochs, ewc_lambda 100;
- T (forward transfer): SGD lr 0.05 no momentum, 1 epoch: test accuracy of the column that
  learnt task k right after its training (P&C: the AC before compress; "ensemble": a freshly
  initialised network per task, i.e. no transfer).
Accuracy: Avalanche's experience accuracy on the test set; forgetting: mean over tasks 1-4 of
(best accuracy seen on the task - final accuracy on it).
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.baselines.ensemble import EnsemblePlugin
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.hybrid.pnc import ProgressCompressPlugin
from cl_plugins.models import build_model
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

SEEDS = range(5)


class Probe(SupervisedPlugin):
    """Test accuracy of strategy.model on the current task at after_training_exp."""

    def __init__(self, tests):
        super().__init__()
        self.tests, self.acc = tests, []

    def after_training_exp(self, strategy, **kwargs):
        te = self.tests[strategy.experience.current_experience]
        x = torch.stack([te.dataset[i][0] for i in range(len(te.dataset))])
        y = torch.tensor([te.dataset[i][1] for i in range(len(te.dataset))])
        model = strategy.model
        model.eval()
        with torch.no_grad():
            self.acc.append((model(x, torch.full((len(y),), te.task_label)).argmax(1) == y)
                            .float().mean().item())
        model.train()


def run(make_plugins, seed, momentum, epochs):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [32, 32]}, info)
    tests = list(info.benchmark.test_stream)
    plugins = make_plugins(seed, tests)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05,
                                                      momentum=momentum),
               criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs,
               eval_mb_size=256, device="cpu", plugins=plugins,
               evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    rows = []
    for e, exp in enumerate(info.benchmark.train_stream):
        st.train(exp)
        res = st.eval(tests[:e + 1])
        rows.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{te.task_label:03d}/"
                         f"Exp{te.current_experience:03d}"] for te in tests[:e + 1]])
    return rows, plugins


def forgetting(rows):
    n = len(rows)
    return sum(max(r[j] for r in rows[j:]) - rows[-1][j] for j in range(n - 1)) / (n - 1)


def main():
    torch.set_num_threads(1)
    settings = {"A": (0.9, 800.0), "B": (0.0, 800.0), "C": (0.9, 100.0)}
    for label, (momentum, lam) in settings.items():
        methods = {"pnc": lambda s, t: [ProgressCompressPlugin(ewc_lambda=lam, seed=s)],
                   "online_ewc": lambda s, t: [OnlineEWCPlugin(ewc_lambda=lam)],
                   "naive": lambda s, t: []}
        for name, make in methods.items():
            final, forg = [], []
            for seed in SEEDS:
                rows, _ = run(make, seed, momentum, epochs=2)
                final.append(sum(rows[-1]) / len(rows[-1]))
                forg.append(forgetting(rows))
            print(f"{label} {name:10s} final " + " ".join(f"{v:.3f}" for v in final)
                  + f" mean {sum(final) / len(final):.3f} | forgetting "
                  + " ".join(f"{v:.3f}" for v in forg) + f" mean {sum(forg) / len(forg):.3f}",
                  flush=True)
    for name in ("pnc", "ensemble"):
        per_task = []
        for seed in SEEDS:
            if name == "pnc":  # the probe before P&C: it sees the AC before compress
                def make(s, t):
                    return [Probe(t), ProgressCompressPlugin(seed=s)]
            else:
                def make(s, t):
                    return [EnsemblePlugin(), Probe(t)]
            _, plugins = run(make, seed, 0.0, epochs=1)
            probe = [p for p in plugins if isinstance(p, Probe)][0]
            per_task.append(probe.acc)
        means = [sum(a[k] for a in per_task) / len(per_task) for k in range(5)]
        print(f"T {name:10s} per task " + " ".join(f"{v:.3f}" for v in means)
              + f" | tasks 2-5 mean {sum(means[1:]) / 4:.3f}", flush=True)


if __name__ == "__main__":
    main()
