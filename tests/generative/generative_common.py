"""Helpers of the generative-replay tests (imported by the test files of this folder): a small
strategy on split_digits in [0, 1], a recorder of each step, a state reload, the resume check."""

from __future__ import annotations

import copy
import io

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.models import build_model

# a small VAE, so that the tests train it in a few steps
SMALL_VAE = dict(vae_fc_layers=2, vae_fc_units=32, vae_z_dim=8, vae_lr=0.003)


def digits_strategy(plugins, scenario="class", seed=0, sgd=False, epochs=1, model=None):
    """Naive on split_digits (inputs in [0, 1]: normalize=False), MLP [32], minibatch 32."""
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario, normalize=False)
    model = model if model is not None else build_model({"name": "mlp", "hidden": [32]}, info)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05) if sgd
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    st = Naive(model=model, optimizer=opt, train_mb_size=32, train_epochs=epochs,
               eval_mb_size=256, device="cpu", plugins=plugins,
               evaluator=EvaluationPlugin(loggers=[]))
    return st, info


class StepRecorder(SupervisedPlugin):
    """Placed after the replay plugin: keeps, per step of experiences >= 2, the stream size, the
    extended minibatch, the outputs and the loss at ``before_backward`` (a check may run there)."""

    def __init__(self, check=None):
        super().__init__()
        self.check, self.steps, self._n = check, [], 0

    def before_training_iteration(self, strategy, **kwargs):
        self._n = strategy.mbatch[0].shape[0]

    def before_backward(self, strategy, **kwargs):
        if strategy.mbatch[0].shape[0] == self._n:
            return
        rec = {"n": self._n, "x": strategy.mbatch[0].detach().clone(),
               "y": strategy.mbatch[1].clone(), "t": strategy.mbatch[2].clone(),
               "out": strategy.mb_output, "loss": strategy.loss,
               "exp": strategy.experience.current_experience}
        if self.check is not None:
            self.check(strategy, rec)
        self.steps.append({k: (v.detach() if torch.is_tensor(v) else v) for k, v in rec.items()})


def reload(state):
    """``state`` through torch.save / torch.load(weights_only=True), as a checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a, b, path="state"):
    """Nested dicts / lists / tensors equal (tensors exactly)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def check_exact_resume(make, scenario="class"):
    """Train experience 1 with ``make(seed=0)``; load its saved state into ``make(seed=123)``
    beside a copy of the model; train both on experience 2 (same shuffle): the models, and the
    plugins' states (generator, optimizer, RNG), end exactly equal to the uninterrupted run."""
    a = make(seed=0)
    st_a, info = digits_strategy([a], scenario, sgd=True)
    exps = info.benchmark.train_stream
    st_a.train(exps[0])
    state = reload(a.state_dict())
    b = make(seed=123)
    b.load_state_dict(state)
    st_b, _ = digits_strategy([b], scenario, sgd=True, model=copy.deepcopy(st_a.model))
    for st in (st_a, st_b):
        torch.manual_seed(99)  # the same dataloader shuffle
        st.train(exps[1])
    for (name, p), q in zip(st_a.model.named_parameters(), st_b.model.parameters()):
        assert torch.equal(p, q), name
    assert_same(a.state_dict(), b.state_dict())
    return a, b


def train_and_predict_old(plugins, seed=0, n_exp=2, epochs=10):
    """Train on the first ``n_exp`` experiences of split_digits (class-IL); return the train
    stream and, for each earlier experience's test set, (predicted labels, true labels)."""
    from avalanche.models.utils import avalanche_forward

    st, info = digits_strategy(plugins, seed=seed, epochs=epochs)
    exps = info.benchmark.train_stream
    for e in list(exps)[:n_exp]:
        st.train(e)
    model, out = st.model.eval(), []
    with torch.no_grad():
        for e in list(info.benchmark.test_stream)[:n_exp - 1]:
            ds = e.dataset
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            y = torch.tensor([ds[i][1] for i in range(len(ds))])
            out.append((avalanche_forward(model, x, torch.zeros_like(y)).argmax(1), y))
    return exps, out
