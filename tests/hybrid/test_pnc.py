"""Progress & Compress (Schwarz et al. 2018): the compress loss and one compress step by hand
(teacher = the AC, temperature, online-EWC term), the Fisher taken after compress, compress as
long as progress, the AC's reset per task, the frozen KB during progress, evaluation on the KB or
on the AC, adapters off, arguments and models, an exact resume from the plugin state.
(split_digits next to online EWC: test_pnc_split_digits.py.)"""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.utils.data import TensorDataset

import cl_plugins.hybrid.pnc as pnc_module
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.core.lateral import TwoColumnNet
from cl_plugins.core.minibatches import dataset_tensors
from cl_plugins.hybrid.pnc import ProgressCompressPlugin
from cl_plugins.models import build_model
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.models.mlp import MLP
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

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


def kl_by_hand(teacher_logits, student_logits, temperature):
    """mean_x sum_c p_c (log p_c - log q_c), p and q softmaxes at the temperature, no T^2."""
    p = torch.softmax(teacher_logits / temperature, 1)
    log_q = torch.log_softmax(student_logits / temperature, 1)
    return (p * (p.log() - log_q)).sum(1).mean()


def test_compress_loss_is_kl_plus_online_ewc_by_hand():
    torch.manual_seed(0)
    kb = ClassifierNet(MLP(3, (4,)), nn.Linear(4, 3)).double()
    teacher = ClassifierNet(MLP(3, (4,)), nn.Linear(4, 3)).double()
    plugin = ProgressCompressPlugin(ewc_lambda=3.0, gamma=0.5, temperature=2.5)
    x, t = torch.randn(6, 3, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    total, kl, ewc = plugin.compress_loss(teacher, kb, x, t)
    kl_hand = kl_by_hand(teacher(x), kb(x), 2.5)
    assert kl.item() == pytest.approx(kl_hand.item(), rel=1e-12) and ewc.item() == 0
    assert kl.item() != pytest.approx(kl_by_hand(teacher(x), kb(x), 1.0).item(), rel=1e-3)
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


def end_of_progress(seed=0, n=10, **kwargs):
    """A plugin holding a tiny float64 TwoColumnNet as progress leaves it (column "ac", KB
    frozen, one earlier online-EWC term, one progress update counted), its data and a stand-in
    strategy (plain SGD, lr 0.1: replaced by compress_lr 0.05)."""
    torch.manual_seed(seed)
    net = TwoColumnNet(ClassifierNet(MLP(3, (4, 4)), nn.Linear(4, 3))).double()
    with torch.no_grad():
        for p in net.active_modules()[0].parameters():
            p.add_(torch.randn_like(p))  # an AC unlike the KB
    plugin = ProgressCompressPlugin(ewc_lambda=3.0, gamma=0.5, temperature=2.0,
                                    compress_lr=0.05, **kwargs)
    plugin.net, plugin.n_tasks, plugin.progress_updates = net, 1, 1
    kb = dict(net.kb.named_parameters())
    f1 = {k: torch.rand_like(v) for k, v in kb.items()}
    a1 = {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in kb.items()}
    plugin.ewc.quadratic_penalty.add(f1, a1)
    for p in net.kb.parameters():
        p.requires_grad_(False)
    net.column = "ac"
    data = TensorDataset(torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 3, (n,)),
                         torch.zeros(n, dtype=torch.long))
    st = SimpleNamespace(optimizer=torch.optim.SGD(net.parameters(), lr=0.1), device="cpu",
                         adapted_dataset=data, train_mb_size=n,
                         experience=SimpleNamespace(dataset=data))
    return plugin, net, st, f1, a1


def test_one_compress_step_is_minus_lr_grad_of_kl_from_the_ac_plus_ewc():
    """Eq. 2, one plain-SGD step on the whole batch: the KB moves by -lr grad(KL(p_AC || p_KB)
    at T = 2 + (lambda/2) sum F1 (theta - a1)^2), the teacher being column "ac" as progress left
    it; the new term is gamma F1 + F2 with F2 the KB's Fisher *after* that step, anchored there."""
    plugin, net, st, f1, a1 = end_of_progress()
    x, _, t = st.adapted_dataset.tensors
    with torch.no_grad():
        ac_logits = net(x, t)  # column "ac": the teacher
    before = copy.deepcopy(net.kb)
    for p in before.parameters():
        p.requires_grad_(True)
    theta = dict(before.named_parameters())
    kl = kl_by_hand(ac_logits, before(x, t), 2.0)
    ewc = 1.5 * sum((f1[k] * (theta[k] - a1[k]) ** 2).sum() for k in theta)
    grads = dict(zip(theta, torch.autograd.grad(kl + ewc, list(theta.values()),
                                                retain_graph=True)))
    kl_grads = torch.autograd.grad(kl, list(theta.values()))
    pre_fisher = OnlineEWCPlugin(fisher="predicted").estimate_fisher(before, st.experience.dataset)

    plugin.after_training_exp(st)
    after = dict(net.kb.named_parameters())
    for k in theta:
        assert torch.allclose(after[k], theta[k] - 0.05 * grads[k], rtol=1e-10, atol=1e-13), k
    # the KL term pulls: with the KB as its own teacher (column "kb") its gradient would be 0
    assert max(float(g.abs().max()) for g in kl_grads) > 1e-3
    post_fisher = OnlineEWCPlugin(fisher="predicted").estimate_fisher(net.kb,
                                                                      st.experience.dataset)
    (merged, anchor), = plugin.ewc.quadratic_penalty.terms
    for k in theta:
        assert torch.allclose(merged[k], 0.5 * f1[k] + post_fisher[k], rtol=1e-10, atol=0)
        assert torch.equal(anchor[k], after[k].detach())
    assert any(not torch.allclose(pre_fisher[k], post_fisher[k], rtol=1e-6) for k in theta)
    assert net.column == "kb" and plugin.n_tasks == 2


def test_fisher_norm_reaches_the_merged_term():
    plugin, net, st, f1, _ = end_of_progress(fisher_norm="max")
    plugin.after_training_exp(st)
    raw = OnlineEWCPlugin(fisher="predicted").estimate_fisher(net.kb, st.experience.dataset)
    top = max(float(f.max()) for f in raw.values())
    (merged, _), = plugin.ewc.quadratic_penalty.terms
    assert all(torch.allclose(merged[k], 0.5 * f1[k] + raw[k] / top, rtol=1e-10) for k in raw)


def count_compress_updates(monkeypatch):
    counts = []
    real = pnc_module.minimise

    def minimise(*args, **kwargs):
        counts.append(real(*args, **kwargs))
        return counts[-1]

    monkeypatch.setattr(pnc_module, "minimise", minimise)
    return counts


@pytest.mark.parametrize("budget,epochs,compress_epochs", [(11, 1, None), (None, 2, None),
                                                           (11, 1, 2)])
def test_compress_runs_as_many_updates_as_progress(monkeypatch, budget, epochs,
                                                   compress_epochs):
    """compress_epochs=None: exactly the progress phase's update count (the iteration budget's
    11, although it sets train_epochs to 2 passes of 8 minibatches); an int: that many passes."""
    counts = count_compress_updates(monkeypatch)
    plugin = ProgressCompressPlugin(compress_epochs=compress_epochs)
    extra = [IterationBudgetPlugin(budget)] if budget else []
    st, info, _ = strategy([plugin] + extra, epochs=epochs)
    stream = list(info.benchmark.train_stream)
    for exp in stream[:2]:
        st.train(exp)
    batches = [-(-len(exp.dataset) // 32) for exp in stream[:2]]
    progress = [budget] * 2 if budget else [epochs * b for b in batches]
    assert plugin.progress_updates == progress[-1]
    assert counts == (progress if compress_epochs is None else [2 * b for b in batches])


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


def inputs_of(test):
    x = torch.stack([test.dataset[i][0] for i in range(len(test.dataset))])
    return x, torch.full((len(x),), test.task_label, dtype=torch.long)


class Outputs(SupervisedPlugin):
    """Put before P&C in the plugin list: the logits of strategy.model on ``test`` when progress
    ends (column "ac", before compress), and every evaluation minibatch's logits."""

    def __init__(self, test):
        super().__init__()
        self.x, self.t = inputs_of(test)
        self.at_end, self.evaluated = None, []

    def after_training_exp(self, strategy, **kwargs):
        assert strategy.model.column == "ac"
        strategy.model.eval()
        with torch.no_grad():
            self.at_end = strategy.model(self.x, self.t)
        strategy.model.train()

    def after_eval_forward(self, strategy, **kwargs):
        self.evaluated.append(strategy.mb_output.detach().clone())


def test_eval_column_ac_evaluates_the_active_column_as_progress_left_it():
    test = build_benchmark("split_digits", "task").benchmark.test_stream[0]
    out = Outputs(test)
    plugin = ProgressCompressPlugin(eval_column="ac")
    st, info, model = strategy([out, plugin], metrics=True)
    st.train(info.benchmark.train_stream[0])
    st.eval([test])
    (evaluated,) = out.evaluated  # one minibatch, in dataset order
    assert torch.equal(evaluated, out.at_end)
    net = st.model
    assert net.column == "kb" and st.model is plugin.net  # the wrapper is back after eval
    net.eval()
    with torch.no_grad():
        kb_out = net(out.x, out.t)
        net.column = "ac"
        live_ac = net(out.x, out.t)  # the AC reading the KB compress has changed
        net.column = "kb"
    assert float((evaluated - kb_out).abs().max()) > 1e-2
    assert float((evaluated - live_ac).abs().max()) > 1e-5


def test_eval_column_does_not_change_training():
    finals = []
    for column in ("kb", "ac"):
        st, info, _ = strategy([ProgressCompressPlugin(eval_column=column)], momentum=0.9)
        for exp in list(info.benchmark.train_stream)[:3]:
            st.train(exp)
            st.eval(info.benchmark.test_stream)  # new heads for unseen tasks are drawn too
        finals.append(st.model.state_dict())
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_adapters_off_make_the_active_column_independent_of_the_kb():
    independent = {}
    for adapters in (False, True):
        st, info, _ = strategy([ProgressCompressPlugin(adapters=adapters)])
        for exp in list(info.benchmark.train_stream)[:2]:
            st.train(exp)
        net = st.model
        x, t = inputs_of(info.benchmark.test_stream[1])
        net.column = "ac"
        net.eval()
        with torch.no_grad():
            before = net(x, t)
            for p in net.kb.parameters():
                p.add_(torch.randn_like(p))
            independent[adapters] = torch.equal(before, net(x, t))
        adapter_params = [p for m in (net.lateral, net.head_adapter) for p in m.parameters()]
        if not adapters:
            assert all(float(m.alpha.abs().max()) == 0 for m in (*net.lateral, net.head_adapter))
            assert not any(p.requires_grad for p in adapter_params)
    assert independent == {False: True, True: False}


@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"ewc_lambda": -1.0}, "ewc_lambda"),
    ({"fisher": "sample"}, "fisher must be one of"),
    ({"compress_epochs": 0}, "compress_epochs"),
    ({"compress_lr": 0.0}, "compress_lr"),
    ({"reset_active": 1}, "reset_active must be one of True, False"),
    ({"adapter_width": 0}, "adapter_width"),
    ({"seed": -1}, "seed"),
    ({"fisher_norm": "l2"}, "fisher_norm must be one of 'none', 'mean', 'max'; got 'l2'"),
    ({"temperature": 0.0}, r"temperature must be in \(0, inf\)"),
    ({"eval_column": "both"}, "eval_column must be one of 'ac', 'kb'; got 'both'"),
    ({"adapters": 1}, "adapters must be one of True, False"),
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


@pytest.mark.parametrize("extra", [{}, {"fisher_norm": "mean", "temperature": 1.5,
                                         "eval_column": "ac", "adapters": False,
                                         "reset_active": False, "compress_lr": 0.02}])
def test_state_round_trip_resumes_exactly(extra):
    a = ProgressCompressPlugin(ewc_lambda=50.0, gamma=0.7, fisher_samples=100, seed=2, **extra)
    st_a, info, _ = strategy([a])
    stream = list(info.benchmark.train_stream)
    for exp in stream[:2]:
        st_a.train(exp)
    state = copy.deepcopy(a.state_dict())
    buf = io.BytesIO()
    torch.save(state, buf)  # plain data: loads without pickle
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    b = ProgressCompressPlugin(ewc_lambda=50.0, gamma=0.7, fisher_samples=100, seed=2, **extra)
    b.generator.manual_seed(999)  # must be overwritten by the state
    b.progress_updates = 5
    b.load_state_dict(state)
    assert b.progress_updates == 8  # the last progress phase's count (its compress's length)
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
    assert state["progress_updates"] == sa["progress_updates"] == sb["progress_updates"] == 8
    assert all(sa[k] == sb[k] for k in extra)
    (fa, ca), = sa["ewc"]["penalty"]["terms"]
    (fb, cb), = sb["ewc"]["penalty"]["terms"]
    assert all(torch.equal(fa[n], fb[n]) and torch.equal(ca[n], cb[n]) for n in fa)
    with pytest.raises(ValueError, match="gamma=0.7"):
        ProgressCompressPlugin(ewc_lambda=50.0, gamma=0.9, seed=2, **extra).load_state_dict(state)
    if extra:
        with pytest.raises(ValueError, match="saved with fisher_norm='mean', this plugin has "
                                             "fisher_norm='max'"):
            ProgressCompressPlugin(ewc_lambda=50.0, gamma=0.7, fisher_samples=100, seed=2,
                                   **{**extra, "fisher_norm": "max"}).load_state_dict(state)
