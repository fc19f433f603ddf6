"""HAT (cl_plugins/architectural/hat.py): Eq. 2-5 by hand, outputs kept, exact resume."""

import copy
import io

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from cl_plugins.architectural.hat import HATPlugin, annealed_s, attention_regulariser, \
    compensation, embedding_grad_scale
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.models import build_model
from helpers import eval_outputs


@pytest.fixture(scope="module")
def info():
    return build_benchmark("split_digits", "task")


def make(info, plugins, seed=0, hidden=(32, 32), momentum=0.0, epochs=3, **model_kw):
    torch.manual_seed(seed)
    model = build_model({"name": "mlp", "hidden": list(hidden), **model_kw}, info)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    st = Naive(model=model, optimizer=opt, train_mb_size=32, eval_mb_size=512,
               train_epochs=epochs, device="cpu", plugins=list(plugins),
               evaluator=EvaluationPlugin(loggers=[]))
    return st, model


def test_eq3_anneals_s_from_1_over_smax_to_smax_over_an_epoch():
    assert annealed_s(0, 9, 400.0) == pytest.approx(1 / 400)
    assert annealed_s(8, 9, 400.0) == pytest.approx(400.0)
    assert annealed_s(4, 9, 400.0) == pytest.approx(1 / 400 + (400 - 1 / 400) / 2)
    assert annealed_s(0, 1, 400.0) == pytest.approx(1 / 400)  # one batch: the code's value


def test_eq5_regulariser_is_the_hand_computation():
    gates = [torch.tensor([0.2, 0.9]), torch.tensor([0.5, 0.4, 0.1])]
    prev = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0, 0.25])]
    # numerator 0.2*0 + 0.9*1 + 0.5*0.5 + 0.4*0 + 0.1*0.75; denominator 0 + 1 + 0.5 + 0 + 0.75
    assert attention_regulariser(gates, prev).item() == pytest.approx(1.225 / 2.25)
    zeros = [torch.zeros(2), torch.zeros(3)]  # first task: the mean gate
    assert attention_regulariser(gates, zeros).item() == pytest.approx(2.1 / 5)
    assert attention_regulariser(gates, [torch.ones(2), torch.ones(3)]).item() == 0.0


def test_eq4_factor_and_conv_view_of_eq2():
    e = torch.tensor([-3.0, 0.0, 0.01, 2.0])
    s, s_max = 7.0, 400.0
    want = [s_max * (torch.cosh(torch.clamp(s * x, -50, 50)) + 1) / (s * (torch.cosh(x) + 1))
            for x in e]
    assert torch.allclose(embedding_grad_scale(e, s, s_max, 50.0), torch.stack(want))
    layers = {"conv": nn.Conv2d(1, 2, 3), "fc": nn.Linear(2 * 4, 3)}  # fc after a 2x2 map
    keep = compensation(layers, [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5, 0.0])])
    assert torch.equal(keep["conv.weight"].expand(2, 1, 3, 3)[:, 0, 0, 0], torch.tensor([0.0, 1.0]))
    pre = torch.tensor([1.0] * 4 + [0.0] * 4)  # channel 0 over its 4 positions, then channel 1
    post = torch.tensor([1.0, 0.5, 0.0])
    assert torch.equal(keep["fc.weight"], 1 - torch.minimum(post[:, None], pre[None, :]))
    assert torch.equal(keep["fc.bias"], 1 - post)


class Spy(SupervisedPlugin):
    """Copies the model's and HAT's embedding gradients at ``after_backward`` (placed before HAT:
    raw; after HAT: compensated) and the loss at ``before_backward``, on the first step."""

    def __init__(self, hat):
        super().__init__()
        self.hat, self.grads, self.loss, self.emb = hat, None, None, None

    def before_backward(self, strategy, **kwargs):
        if self.loss is None:
            self.loss = strategy.loss.item()
            self.s = self.hat._s
            self.emb = [e.detach().clone() for e in self.hat.embeddings[self.hat.task]]

    def after_backward(self, strategy, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in strategy.model.named_parameters()
                          if p.grad is not None}
            self.emb_grads = [e.grad.clone() for e in self.hat.embeddings[self.hat.task]]


def test_eq2_zeroes_gradients_between_fully_attended_units_and_old_weights_stay(info):
    hat = HATPlugin()
    st, model = make(info, [hat], momentum=0.9)
    st.train(info.benchmark.train_stream[0])
    a = hat.cumulative
    before, after = Spy(hat), Spy(hat)
    st.plugins.insert(st.plugins.index(hat), before)
    st.plugins.insert(st.plugins.index(hat) + 1, after)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    st.train(info.benchmark.train_stream[1])
    names = ["backbone.layers.0", "backbone.layers.2"]
    both = [a[0][:, None].expand(32, 64), torch.minimum(a[1][:, None], a[0][None, :])]
    closed = 0
    for n, m in zip(names, both):
        raw, got = before.grads[n + ".weight"], after.grads[n + ".weight"]
        assert torch.allclose(got, raw * (1 - m), atol=1e-7)
        full = m == 1.0
        closed += int(full.sum())
        assert torch.all(got[full] == 0) and torch.any(raw[full] != 0)
        assert torch.equal(model.get_parameter(n + ".weight")[full], w[n + ".weight"][full])
        assert not torch.equal(model.get_parameter(n + ".weight"), w[n + ".weight"])
    assert closed > 100  # task 0 fully uses part of each layer (gates at s_max are binary)
    # Eq. 4 on the embeddings of task 1, and Eq. 5 in the loss (hand computation)
    for g0, g1, e in zip(after.emb_grads, before.emb_grads, before.emb):
        assert torch.allclose(g0, g1 * embedding_grad_scale(e, before.s, 400.0, 50.0))
    gates = [torch.sigmoid(before.s * e) for e in before.emb]
    num = sum(float((g * (1 - p)).sum()) for g, p in zip(gates, a))
    den = sum(float((1 - p).sum()) for p in a)
    assert after.loss - before.loss == pytest.approx(0.75 * num / den, rel=1e-4)
    assert before.s == pytest.approx(1 / 400)  # first batch of the epoch


def test_a_finished_task_keeps_its_outputs_after_later_tasks(info):
    hat = HATPlugin()
    st, model = make(info, [hat], epochs=5)
    st.train(info.benchmark.train_stream[0])
    out0 = eval_outputs(st, info.benchmark.test_stream[0])
    gates = torch.cat([torch.sigmoid(400 * e) for e in hat.embeddings[0]])
    assert ((gates > 1e-6) & (gates < 1 - 1e-6)).float().mean() < 0.02  # binary-ish at s_max
    shared = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    for e in (1, 2):
        st.train(info.benchmark.train_stream[e])
    assert any(not torch.equal(p, shared[n]) for n, p in model.backbone.named_parameters())
    out1 = eval_outputs(st, info.benchmark.test_stream[0])
    assert torch.allclose(out0, out1, atol=1e-4, rtol=0)
    assert torch.equal(out0.argmax(1), out1.argmax(1))


def test_resume_is_exact(info):
    hat = HATPlugin(c=1.0)
    st, model = make(info, [hat], epochs=2)
    stream = info.benchmark.train_stream
    for e in (0, 1):
        st.train(stream[e])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "plugin": hat.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = HATPlugin(c=1.0)
    fresh.load_state_dict(saved["plugin"])
    st2, model2 = make(info, [fresh], seed=5, epochs=2)
    for e in (0, 1):
        avalanche_model_adaptation(model2, stream[e])
    for test_exp in info.benchmark.test_stream:  # as the runner's restore (and the evaluation)
        avalanche_model_adaptation(model2, test_exp)
        avalanche_model_adaptation(model, test_exp)
    model2.load_state_dict(copy.deepcopy(model.state_dict()))
    for s in (st, st2):
        torch.manual_seed(99)
        s.train(stream[2])
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    a, b = hat.state_dict(), fresh.state_dict()
    assert a["trained_tasks"] == b["trained_tasks"] == [0, 1, 2]
    for t in (0, 1, 2):
        assert all(torch.equal(x, y) for x, y in zip(a["embeddings"][t], b["embeddings"][t]))
    assert all(torch.equal(x, y) for x, y in zip(a["cumulative"], b["cumulative"]))


def test_cost_and_refusals(info):
    hat = HATPlugin()
    st, _ = make(info, [hat], hidden=(16, 8), epochs=1)
    st.train(info.benchmark.train_stream[0])
    assert hat.cost_per_task() == {0: {"params": 24, "bytes": 96}}
    with pytest.raises(ValueError, match="s_max must be in"):
        HATPlugin(s_max=1.0)
    for kw, match in (({"batch_norm": True}, "BatchNorm1d"), ({"activation": "tanh"}, "Tanh")):
        st, _ = make(info, [HATPlugin()], epochs=1, **kw)
        with pytest.raises(ValueError, match=match):
            st.train(info.benchmark.train_stream[0])
    st, model = make(info, [HATPlugin()], epochs=1)
    st.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    with pytest.raises(ValueError, match="weight decay"):
        st.train(info.benchmark.train_stream[0])
