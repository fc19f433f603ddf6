"""Progressive neural networks (Rusu et al. 2016): the column forward by hand (Eq. 2), frozen
columns whose outputs never change (MLP and LeNet), gradients reaching the new column only, the
evaluation path, growth, arguments, and an exact resume with grown columns."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.architectural.pnn import PNNPlugin
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.progressive import ColumnAdapters, arm, column_inputs, disarm
from cl_plugins.models import build_model
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.models.mlp import MLP
from cl_plugins.registry import signature_defaults

CONV = {"name": "lenet", "channels": [3, 4], "hidden": [8, 6]}


def strategy(plugins, model_cfg=None, seed=0, lr=0.05):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", "task", pad_to_32=model_cfg is not None)
    model = build_model(model_cfg or {"name": "mlp", "hidden": [16, 16]}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))
    return st, info, model


def inputs(info, exp=0, n=20):
    ds = info.benchmark.test_stream[exp].dataset
    return torch.stack([ds[i][0] for i in range(n)])


def test_live_column_forward_by_hand():
    """Column 1 of a 3-4-2-2 MLP: Eq. 2 on layer 2 and on the head, none on layer 1."""
    torch.manual_seed(0)
    col0 = ClassifierNet(MLP(3, (4, 2)), nn.Linear(2, 2)).double()
    live = ClassifierNet(MLP(3, (4, 2)), nn.Linear(2, 2)).double()
    ad = ColumnAdapters(live, 1, 0).double()
    with torch.no_grad():  # alpha away from its small init, so the laterals weigh in
        for p in ad.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x, r = torch.randn(5, 3, dtype=torch.float64), torch.relu
    k1, k2 = col0.backbone.layers[0], col0.backbone.layers[2]
    g1 = r(x @ k1.weight.T + k1.bias)                                  # column 0, layer 1
    g2 = r(g1 @ k2.weight.T + k2.bias)                                 # column 0 features
    a1, a2, head = live.backbone.layers[0], live.backbone.layers[2], live.head
    l2, lo = ad.adapters[0], ad.adapters[1]
    h1 = r(x @ a1.weight.T + a1.bias)                                  # no lateral
    h2 = r(h1 @ a2.weight.T + a2.bias + r((l2.alpha[0] * g1) @ l2.V.weight.T + l2.V.bias)
           @ l2.U.weight.T)                                            # Eq. 2
    out = h2 @ head.weight.T + head.bias + \
        r((lo.alpha[0] * g2) @ lo.V.weight.T + lo.V.bias) @ lo.U.weight.T
    prev = column_inputs([col0], [None], x)
    assert torch.equal(prev[0][1], g1) and torch.allclose(prev[0][2], g2, atol=1e-14)
    handles = arm(live, ad, prev)
    got = live(x, 0)
    disarm(handles)
    assert torch.allclose(got, out, atol=1e-12)
    assert not torch.allclose(live(x, 0), out)  # disarmed: the plain column


def test_linear_adapter_is_eq1_and_conv_adapters_follow_the_layer():
    torch.manual_seed(0)
    live = ClassifierNet(MLP(3, (4, 2)), nn.Linear(2, 2)).double()
    ad = ColumnAdapters(live, 2, 0, adapter="linear").double()
    h = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    U = ad.adapters[0].U
    assert torch.allclose(ad(1, h), torch.cat(h, 1) @ U.weight.T, atol=1e-12)
    info = build_benchmark("split_digits", "task", pad_to_32=True)
    conv = ColumnAdapters(build_model(CONV, info), 2, 0)
    V, U = conv.adapters[0].V, conv.adapters[0].U  # into conv2 (3 -> 4 channels, 5x5)
    assert V.kernel_size == (1, 1) and (V.in_channels, V.out_channels) == (6, 3)
    assert U.kernel_size == (5, 5) and (U.in_channels, U.out_channels) == (3, 4) and U.bias is None
    alpha = conv.adapters[0].alpha.detach()
    assert alpha.shape == (2,) and float(alpha.max()) < 0.1


class OutputSpy(SupervisedPlugin):
    """The outputs the strategy's evaluation saw (``mb_output``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def after_eval_iteration(self, strategy, **kwargs):
        self.seen.append(strategy.mb_output.detach().clone())


class GradSpy(SupervisedPlugin):
    def __init__(self, pnn):
        super().__init__()
        self.pnn, self.seen = pnn, []

    def after_backward(self, strategy, **kwargs):
        if len(self.pnn.tasks) == 3:
            g = lambda ps: [None if p.grad is None else p.grad.abs().sum() for p in ps]
            self.seen.append((g(self.pnn.adapters[-1].parameters()),
                              g(self.pnn.adapters[1].parameters()),
                              [p.requires_grad for c in self.pnn.frozen for p in c.parameters()],
                              g(strategy.model.backbone.parameters())))


@pytest.mark.parametrize("model_cfg", [None, CONV], ids=["mlp", "lenet"])
def test_old_columns_never_change_and_only_the_new_column_gets_gradients(model_cfg):
    plugin, outputs = PNNPlugin(), OutputSpy()
    spy = GradSpy(plugin)
    st, info, model = strategy([plugin, spy, outputs], model_cfg)
    x0, x1 = inputs(info, 0), inputs(info, 1)
    st.train(info.benchmark.train_stream[0])
    with torch.no_grad():
        out0 = model(x0, 0).clone()
    st.train(info.benchmark.train_stream[1])
    assert torch.equal(plugin.column_output(x0, 0), out0)  # the frozen copy of column 0
    st.eval([info.benchmark.test_stream[1]])
    prev = column_inputs(plugin.frozen, plugin.adapters, x1)
    handles = arm(model, plugin.adapters[1], prev)
    with torch.no_grad():
        out1 = model(x1, 1).clone()
    disarm(handles)
    assert torch.allclose(outputs.seen[0][:20], out1, atol=1e-6)  # evaluation: with laterals
    snapshot = [copy.deepcopy(plugin.adapters[1].state_dict())]
    st.train(info.benchmark.train_stream[2])
    assert torch.equal(plugin.column_output(x0, 0), out0)
    assert torch.equal(plugin.column_output(x1, 1), out1)
    assert all(torch.equal(v, snapshot[0][k]) for k, v in plugin.adapters[1].state_dict().items())
    outputs.seen.clear()
    st.eval([info.benchmark.test_stream[0]])  # an old task: that column's output
    assert torch.allclose(outputs.seen[0][:20], out0, atol=1e-6)
    new_ad, old_ad, frozen_flags, live = spy.seen[0]
    assert all(g is not None and g > 0 for g in new_ad)  # V, U and alpha of the new adapters
    assert all(g is None for g in old_ad) and not any(frozen_flags)
    assert all(g is not None and g > 0 for g in live)  # the new column itself


def test_a_new_column_is_reinitialised_and_growth_is_reported():
    plugin = PNNPlugin()
    st, info, model = strategy([plugin])
    st.train(info.benchmark.train_stream[0])
    trained = copy.deepcopy(model.backbone.state_dict())
    st.train(info.benchmark.train_stream[1])
    assert all(torch.equal(v, plugin.frozen[0].backbone.state_dict()[k])
               for k, v in trained.items())
    assert list(plugin.frozen[0].head.classifiers) == ["0"]  # its own head only
    cost = plugin.cost_per_task()
    n_col = sum(p.numel() for p in model.backbone.parameters()) + 16 * 2 + 2
    n_ad = sum(p.numel() for p in plugin.adapters[1].parameters())
    assert cost[0]["params"] >= n_col and cost[1]["params"] >= n_col + n_ad
    assert cost[1]["params"] - cost[0]["params"] == n_ad
    assert cost[1]["bytes"] - cost[0]["bytes"] == 4 * n_ad


def test_arguments_and_models_are_checked():
    assert signature_defaults(PNNPlugin) == {"adapter": "mlp", "seed": 0}
    assert PNNPlugin.SCENARIOS == ("task",) and PNNPlugin.NEEDS_TASK_LABELS
    with pytest.raises(ValueError, match="adapter must be one of 'mlp', 'linear'; got 'x'"):
        PNNPlugin(adapter="x")
    with pytest.raises(ValueError, match="seed must be in"):
        PNNPlugin(seed=-1)
    info = build_benchmark("split_digits", "task")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               device="cpu", plugins=[PNNPlugin()], evaluator=EvaluationPlugin(loggers=[]))
    with pytest.raises(ValueError, match="need a ClassifierNet"):
        st.train(info.benchmark.train_stream[0])


def test_exact_resume_with_grown_columns():
    a = PNNPlugin(seed=3)
    st_a, info, model_a = strategy([a], seed=1)
    stream = info.benchmark.train_stream
    for e in stream[:3]:
        st_a.train(e)
    buf = io.BytesIO()
    torch.save({"plugin": a.state_dict(), "model": model_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = PNNPlugin(seed=3)
    st_b, _, model_b = strategy([b], seed=7)  # another init: the state must take over
    for e in stream[:3]:  # the runner's restore: grow the heads, then load
        avalanche_model_adaptation(model_b, e)
    model_b.load_state_dict(saved["model"])
    b.load_state_dict(saved["plugin"])
    assert b.tasks == [0, 1, 2] and len(saved["plugin"]["frozen"]) == 2
    for st in (st_a, st_b):
        torch.manual_seed(5)
        st.train(stream[3])
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), n
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["tasks"] == sb["tasks"] == [0, 1, 2, 3]
    for ca, cb in zip(sa["frozen"] + sa["adapters"][1:], sb["frozen"] + sb["adapters"][1:]):
        assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    x = inputs(info, 1)
    assert torch.equal(a.column_output(x, 1), b.column_output(x, 1))
    with pytest.raises(ValueError, match="saved with adapter='mlp', this plugin has "
                                         "adapter='linear'"):
        PNNPlugin(adapter="linear").load_state_dict(saved["plugin"])
