"""AR1 next to CWR* alone and naive fine-tuning on split_digits (the measurements of
docs/methods/ar1.md). Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/checks/ar1_split_digits.py [SCENARIO] [SETTING]

SCENARIO: ``class`` (default) or ``domain``. SETTING:

- ``adam`` (default): the runner's defaults: MLP [256, 256] + the scenario's head (class-IL:
  MaskedHead "seen"; domain-IL: Linear), Adam lr 1e-3, 10 epochs, minibatch 32;
- ``sgd``: MLP [256, 256], SGD lr 0.01 momentum 0.9, 4 epochs (AR1's own optimizer and epochs),
  minibatch 32.

Methods: naive; CWR* alone (AR1Plugin with si_lambda=0 and head_lr_scale=1, the backbone frozen
after the first experience, as CWR+/CWR* in the authors' Caffe code); AR1 without penalty
("ar1-free", the backbone trained freely); AR1 over a range of si_lambda; latent replay alone
and AR1* (AR1 composed with latent replay, as the ``plus: [latent_replay]`` of a config) at the
first hidden layer.

Seeds 0-4 (the global seed before the model is built). Prints, per method, the final mean test
accuracy over the experiences (ACC) and the mean forgetting (best accuracy on an experience minus
its final accuracy, experiences 1..n-1), mean and standard deviation over the seeds.
"""

from __future__ import annotations

import statistics
import sys

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.hybrid.ar1 import AR1Plugin
from cl_plugins.models import build_model
from cl_plugins.replay.latent_replay import LatentReplayPlugin

SEEDS = range(5)
SETTINGS = {"adam": dict(opt="adam", lr=1e-3, epochs=10),
            "sgd": dict(opt="sgd", lr=0.01, epochs=4)}


def run(make_plugins, seed, scenario, setting):
    s = SETTINGS[setting]
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [256, 256]}, info)
    opt = (torch.optim.Adam(model.parameters(), lr=s["lr"]) if s["opt"] == "adam"
           else torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9))
    tests = list(info.benchmark.test_stream)
    st = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=32,
               train_epochs=s["epochs"], eval_mb_size=256, device="cpu",
               plugins=make_plugins(), evaluator=EvaluationPlugin(
                   accuracy_metrics(experience=True), loggers=[]))
    rows = []
    for e, exp in enumerate(info.benchmark.train_stream):
        st.train(exp)
        res = st.eval(tests[:e + 1])
        rows.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{te.task_label:03d}/"
                         f"Exp{te.current_experience:03d}"] for te in tests[:e + 1]])
    n = len(rows)
    acc = sum(rows[-1]) / n
    fgt = sum(max(r[j] for r in rows[j:]) - rows[-1][j] for j in range(n - 1)) / (n - 1)
    return acc, fgt


class FreezeBackbone(SupervisedPlugin):
    """CWR*'s own protocol: the layers below the head are trained on the first experience only
    (the Caffe code sets their learning rate to 0 for 'cwr+' from the second batch on)."""

    def before_training_exp(self, strategy, **kwargs):
        if strategy.experience.current_experience > 0:
            strategy.model.backbone.requires_grad_(False)
            strategy.model.backbone.eval()

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.experience.current_experience > 0:
            strategy.model.backbone.eval()  # BN statistics fixed too


METHODS = {
    "naive": lambda: [],
    "cwr* (frozen backbone after exp 1, head_lr_scale=1)":
        lambda: [AR1Plugin(si_lambda=0, head_lr_scale=1.0), FreezeBackbone()],
    "ar1-free (si_lambda=0, head_lr_scale=10)": lambda: [AR1Plugin(si_lambda=0)],
    **{f"ar1 (si_lambda={lam:g})": (lambda lam=lam: [AR1Plugin(si_lambda=lam)])
       for lam in (1e2, 1e3, 1e4, 1e5, 1e6)},
    # AR1*: latent replay at the first hidden layer's output (layers.1, after its ReLU); memory
    # 200 activations (about 11% of split_digits' 1797 samples); seed 0 for the memory draws
    "latent_replay (layers.1, mem 200)":
        lambda: [LatentReplayPlugin(layer="backbone.layers.1", mem_size=200, seed=0)],
    "ar1* (ar1 + latent_replay layers.1, mem 200)":
        lambda: [AR1Plugin(), LatentReplayPlugin(layer="backbone.layers.1", mem_size=200,
                                                 seed=0)],
}

if __name__ == "__main__":
    scenario = sys.argv[1] if len(sys.argv) > 1 else "class"
    setting = sys.argv[2] if len(sys.argv) > 2 else "adam"
    torch.set_num_threads(1)
    only = sys.argv[3:]  # optional: method names to run
    for name, make in METHODS.items():
        if only and name.split(" ")[0] not in only:  # e.g. naive ar1 ar1*
            continue
        out = [run(make, seed, scenario, setting) for seed in SEEDS]
        accs, fgts = [a for a, _ in out], [f for _, f in out]
        print(f"{scenario} {setting} {name:40s} ACC {statistics.mean(accs):.4f} "
              f"± {statistics.stdev(accs):.4f}  forgetting {statistics.mean(fgts):.4f} "
              f"± {statistics.stdev(fgts):.4f}  seeds {[round(a, 4) for a in accs]}", flush=True)
