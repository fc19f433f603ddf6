"""B1 check without cl_plugins: Avalanche's own SynapticIntelligence template on Split MNIST
task-IL with the continual-learning-baselines settings (MLP 784-256-256 with one head per task,
Adam lr 1e-3, batch 64, 10 epochs, si_lambda 1, eps 1e-3; target ACC 0.97).

It shows whether a gap between Avalanche's SI and that target comes from Avalanche itself or from
our runner: it uses only Avalanche's benchmark, model classes and strategy.

    python experiments/checks/b1_avalanche_si.py DATA_ROOT SEED [--copy-snapshots]

On a CPU, Avalanche 0.6's SI snapshots alias the parameters (``.cpu()`` returns the same
storage), so its importance stays 0 for every parameter that is never re-created (see
cl_plugins/baselines/avalanche_si.py); the reference runs used a GPU. ``--copy-snapshots``
runs the same thing with cl_plugins' two-copy workaround (Naive + AvalancheSIPlugin).
Measured (CPU): stock seed 0 / 1: 84.97 / 94.56.

DATA_ROOT holds MNIST/raw (copy ../shared/data first: torchvision extracts next to the .gz).
Prints the per-experience test accuracies after each experience and their mean.
"""
import sys, torch, numpy as np, random
from torch import nn
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.models import MultiTaskModule, MultiHeadClassifier
from avalanche.training import Naive, SynapticIntelligence
from avalanche.training.plugins import EvaluationPlugin
from avalanche.evaluation.metrics import accuracy_metrics

root, seed = sys.argv[1], int(sys.argv[2])
copy_snapshots = "--copy-snapshots" in sys.argv[3:]
torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)

class Net(MultiTaskModule):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(),
                                      nn.Linear(256, 256), nn.ReLU())
        self.classifier = MultiHeadClassifier(256)
    def forward_single_task(self, x, task_label):
        return self.classifier(self.features(x), task_label)

bm = SplitMNIST(5, return_task_id=True, fixed_class_order=list(range(10)), dataset_root=root)
model = Net()
ev = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
opt = torch.optim.Adam(model.parameters(), lr=0.001)
common = dict(train_mb_size=64, train_epochs=10, eval_mb_size=128, evaluator=ev)
if copy_snapshots:
    from cl_plugins.baselines.avalanche_si import AvalancheSIPlugin
    st = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
               plugins=[AvalancheSIPlugin(si_lambda=1.0, eps=0.001)], **common)
else:
    st = SynapticIntelligence(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                              si_lambda=1.0, eps=0.001, **common)
for exp in bm.train_stream:
    st.train(exp)
    res = st.eval(bm.test_stream)
    accs = [v for k, v in res.items() if "Top1_Acc_Exp" in k]
    print(exp.current_experience, [round(a, 4) for a in accs], "mean of all 5:", round(sum(accs) / len(accs), 4), flush=True)
