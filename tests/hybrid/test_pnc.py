"""Progress & Compress (Schwarz et al. 2018): the compress loss by hand, the AC's reset per task,
the frozen KB during progress, evaluation on the KB, arguments and models, an exact resume from
the plugin state. (split_digits next to online EWC: test_pnc_split_digits.py.)"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.hybrid.pnc import ProgressCompressPlugin
from cl_plugins.models import build_model
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.models.mlp import MLP

from helpers import check_registry_header


def strategy(plugins, seed=0, scenario="task", epochs=1, momentum=0.0, metrics=False,
             hidden=(16, 16)):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": list(hidden)}, info)
    ev = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]) if metrics else \
        EvaluationPlugin(loggers=[])
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05,
                                                      momentum=momentum),
               criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs,
               eval_mb_size=256, device="cpu", plugins=plugins, evaluator=ev)
    return st, info, model


def copies(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_compress_loss_is_kl_plus_online_ewc_by_hand():
    torch.manual_seed(0)
    kb = ClassifierNet(MLP(3, (4,)), nn.Linear(4, 3)).double()
    teacher = ClassifierNet(MLP(3, (4,)), nn.Linear(4, 3)).double()
    plugin = ProgressCompressPlugin(ewc_lambda=3.0, gamma=0.5)
    x, t = torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    total, kl, ewc = plugin.compress_loss(teacher, kb, x, t)
    p, q = torch.softmax(teacher(x), 1), torch.softmax(kb(x), 1)
    kl_hand = (p * (p.log() - q.log())).sum(1).mean()
    assert kl.item() == pytest.approx(kl_hand.item(), rel=1e-12) and ewc.item() == 0
    assert total.item() == kl.item()
    # two online-EWC terms: F* = gamma F_1 + F_2, anchored at the second anchor
    params = dict(kb.named_parameters())
    f1 = {n: torch.rand_like(v) for n, v in params.items()}
    f2 = {n: torch.rand_like(v) for n, v in params.items()}
    a1 = {n: v.detach() + 1.0 for n, v in params.items()}
    a2 = {n: v.detach() + torch.randn_like(v) for n, v in params.items()}
    plugin.ewc.quadratic_penalty.add(f1, a1)
    plugin.ewc.quadratic_penalty.add(f2, a2)
    total, kl, ewc = plugin.compress_loss(teacher, kb, x, t)
    pen = sum(((0.5 * f1[n] + f2[n]) * (v - a2[n]) ** 2).sum() for n, v in params.items())
    assert ewc.item() == pytest.approx(3.0 / 2 * pen.item(), rel=1e-10)
    assert total.item() == pytest.approx(kl_hand.item() + 1.5 * pen.item(), rel=1e-10)
    total.backward()  # the gradient reaches the KB only
    assert all(v.grad is not None for v in params.values())
    assert all(v.grad is None for v in teacher.parameters())


class Spy(SupervisedPlugin):
    """After the P&C plugin in the list: what the AC and the KB hold at each hook."""

    def __init__(self):
        super().__init__()
        self.log = []

    def _record(self, strategy, hook):
        net = strategy.model
        if hook != "end":  # frozen for other plugins too (shared_parameters skips the KB)
            assert not any(p.requires_grad for p in net.kb.parameters())
        self.log.append((hook, copies(net.ac), copies(net.kb), copies(net.lateral),
                         [bool(strategy.optimizer.state.get(p)) for p in net.ac.parameters()]))

    def before_training_exp(self, strategy, **kwargs):
        self._record(strategy, "start")

    def after_training_epoch(self, strategy, **kwargs):
        self._record(strategy, "epoch")

    def after_training_exp(self, strategy, **kwargs):
        self._record(strategy, "end")


@pytest.mark.parametrize("reset_active", [True, False])
def test_active_column_reset_per_task_and_kb_frozen_during_progress(reset_active):
    spy = Spy()
    st, info, model = strategy([ProgressCompressPlugin(reset_active=reset_active), spy],
                               epochs=2, momentum=0.9)
    for exp in list(info.benchmark.train_stream)[:2]:
        st.train(exp)
    (h0, ac0, kb0, la0, _), (_, ac_e1, kb_e1, _, _), (_, ac_e2, kb_e2, _, _), \
        (_, ac1, kb1, la1, _), (h4, ac_s2, kb_s2, la_s2, opt_s2) = spy.log[:5]
    assert h0 == "start" and h4 == "start"
    # progress: the KB does not move, the AC does
    assert same(kb0, kb_e1) and same(kb0, kb_e2) and not same(ac0, ac_e1)
    # compress (after the last epoch) moves the KB, not the AC
    assert not same(kb_e2, kb1) and same(ac_e2, ac1)
    assert same(kb1, kb_s2[:len(kb1)])  # model adaptation only appended the new head
    if reset_active:  # a fresh AC and fresh adapters, without momentum from the last task
        assert all(not torch.equal(a, b) for a, b in zip(ac1, ac_s2))
        assert all(not torch.equal(a, b) for a, b in zip(la1, la_s2))
        assert not any(opt_s2)
    else:
        assert same(ac1, ac_s2[:len(ac1)]) and same(la1, la_s2)
    assert st.model.kb is model and st.model.column == "kb"


def test_first_active_column_comes_from_the_plugin_seed():
    starts = []
    for global_seed in (0, 1):
        spy = Spy()
        st, info, _ = strategy([ProgressCompressPlugin(seed=4), spy], seed=global_seed)
        st.train(info.benchmark.train_stream[0])
        starts.append(spy.log[0][1])
    assert same(*starts)


def test_evaluation_uses_the_knowledge_base():
    st, info, model = strategy([ProgressCompressPlugin()], metrics=True)
    st.train(info.benchmark.train_stream[0])
    test = info.benchmark.test_stream[0]
    res = st.eval([test])
    acc = [v for k, v in res.items() if k.startswith("Top1_Acc_Exp")][0]
    x = torch.stack([test.dataset[i][0] for i in range(len(test.dataset))])
    y = torch.tensor([test.dataset[i][1] for i in range(len(test.dataset))])
    model.eval()
    with torch.no_grad():
        kb_acc = (model(x, 0).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(kb_acc) and st.model.column == "kb"
    st.model.column = "ac"  # as inside the progress phase (eval_every): still the KB, then back
    res = st.eval([test])
    assert [v for k, v in res.items() if k.startswith("Top1_Acc_Exp")][0] == pytest.approx(acc)
    assert st.model.column == "ac"


@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"ewc_lambda": -1.0}, "ewc_lambda"),
    ({"fisher": "sample"}, "fisher must be one of"),
    ({"compress_epochs": 0}, "compress_epochs"),
    ({"compress_lr": 0.0}, "compress_lr"),
    ({"reset_active": 1}, "reset_active must be one of True, False"),
    ({"adapter_width": 0}, "adapter_width"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressCompressPlugin(**kwargs)


def test_unsupported_model_refused_before_training():
    st, info, model = strategy([ProgressCompressPlugin()])
    st.model = ClassifierNet(MLP(64, (8,), batch_norm=True), model.head)
    before = copies(st.model)
    with pytest.raises(ValueError, match="TwoColumnNet does not support batch norm"):
        st.train(info.benchmark.train_stream[0])
    assert same(before, copies(st.model))


def test_registry_header():
    check_registry_header(ProgressCompressPlugin)


def test_state_round_trip_resumes_exactly():
    a = ProgressCompressPlugin(ewc_lambda=50.0, gamma=0.7, fisher_samples=100, seed=2)
    st_a, info, _ = strategy([a])
    stream = list(info.benchmark.train_stream)
    for exp in stream[:2]:
        st_a.train(exp)
    state = copy.deepcopy(a.state_dict())
    buf = io.BytesIO()
    torch.save(state, buf)  # plain data: loads without pickle
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    b = ProgressCompressPlugin(ewc_lambda=50.0, gamma=0.7, fisher_samples=100, seed=2)
    b.generator.manual_seed(999)  # must be overwritten by the state
    b.load_state_dict(state)
    st_b, _, model_b = strategy([b], seed=7)  # another initialisation: the state must win
    for exp in stream[:2]:  # the heads of the tasks seen, as the runner's restore does
        avalanche_model_adaptation(model_b, exp)
    for st in (st_a, st_b):
        torch.manual_seed(11)  # the training loader's shuffle
        st.train(stream[2])
    assert st_b.model.kb is model_b
    pa, pb = st_a.model.state_dict(), st_b.model.state_dict()
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["n_tasks"] == sb["n_tasks"] == 3 and torch.equal(sa["generator"], sb["generator"])
    (fa, ca), = sa["ewc"]["penalty"]["terms"]
    (fb, cb), = sb["ewc"]["penalty"]["terms"]
    assert all(torch.equal(fa[n], fb[n]) and torch.equal(ca[n], cb[n]) for n in fa)
    with pytest.raises(ValueError, match="gamma=0.7"):
        ProgressCompressPlugin(ewc_lambda=50.0, gamma=0.9, seed=2).load_state_dict(state)
