"""Task-conditioned hypernetworks (von Oswald et al. 2020): the chunked hypernetwork and its output
regulariser by hand (value, gradient, lookahead), the regulariser pulling generated weights to
their stored targets, every parameter generated (biases and the task's head) and written into the
unchanged model, old tasks kept under a large beta, arguments, and an exact resume."""

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

from cl_plugins.architectural.hypernet import HypernetPlugin, target_slots
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.hypernetwork import ChunkedHypernet, adam_lookahead, output_regulariser
from cl_plugins.models import build_model
from cl_plugins.registry import signature_defaults

SMALL = dict(task_emb_dim=4, chunk_emb_dim=3, chunk_size=300, hnet_hidden=[8])


def tiny_hnet(seed=0):
    hnet = ChunkedHypernet(7, 3, 2, 2, [4]).double()  # 3 chunks, the last one cut to 1 output
    hnet.init_(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases, so every term is exercised
        for p in hnet.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1),
                                     dtype=p.dtype))
    return hnet


def test_chunked_forward_and_regulariser_by_hand_value_and_gradient():
    hnet = tiny_hnet()
    g = torch.Generator().manual_seed(3)
    E = torch.randn(2, 2, generator=g, dtype=torch.float64)
    T = torch.randn(2, 7, generator=g, dtype=torch.float64)
    delta = {n: 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
             for n, p in hnet.named_parameters()}
    W1, b1 = (hnet.mlp[0].weight + delta["mlp.0.weight"], hnet.mlp[0].bias + delta["mlp.0.bias"])
    W2, b2 = (hnet.mlp[2].weight + delta["mlp.2.weight"], hnet.mlp[2].bias + delta["mlp.2.bias"])
    C = hnet.chunk_emb + delta["chunk_emb"]
    value = output_regulariser(hnet, E, T, delta)
    hs, outs = [], []
    for j in range(2):  # by hand: chunk c of task j from [e_j, c_c]
        h = torch.relu(torch.cat([E[j].expand(3, 2), C], 1) @ W1.T + b1)
        hs.append(h)
        outs.append((h @ W2.T + b2).reshape(-1)[:7])
    by_hand = sum(((T[j] - outs[j]) ** 2).sum() for j in range(2)) / 2
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-12)
    assert torch.equal(hnet(E)[1], hnet(E[1])) and hnet(E).shape == (2, 7)  # batched = single
    value.backward()
    # output layer: dR/dW2 = -(2/n) sum_j sum_c r_jc h_jc^T, r the residual (0 past n_outputs)
    gW2, gb2 = torch.zeros_like(W2), torch.zeros_like(b2)
    for j in range(2):
        r = torch.zeros(9, dtype=torch.float64)
        r[:7] = T[j] - outs[j]
        r = r.reshape(3, 3)
        gW2 -= (2 / 2) * r.T @ hs[j]
        gb2 -= (2 / 2) * r.sum(0)
    assert torch.allclose(hnet.mlp[2].weight.grad, gW2.detach(), atol=1e-12)
    assert torch.allclose(hnet.mlp[2].bias.grad, gb2.detach(), atol=1e-12)
    # the lookahead is a constant: the gradient at theta + delta, nothing through delta
    eps, i = 1e-6, (1, 0)
    with torch.no_grad():
        hnet.chunk_emb[i] += eps
        up = output_regulariser(hnet, E, T, delta).item()
        hnet.chunk_emb[i] -= 2 * eps
        down = output_regulariser(hnet, E, T, delta).item()
        hnet.chunk_emb[i] += eps
    assert (up - down) / (2 * eps) == pytest.approx(hnet.chunk_emb.grad[i].item(), rel=1e-6)


def test_adam_lookahead_is_the_step_adam_takes_and_leaves_its_state():
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p, q], lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        ((p ** 3).sum() + (q ** 2).sum()).backward()
        opt.step()
    opt.zero_grad()
    ((p ** 3).sum()).backward()  # q has no gradient: no step
    state = copy.deepcopy(opt.state_dict())
    delta = adam_lookahead(opt, {"p": p, "q": q})
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    before = p.detach().clone()
    opt.step()
    assert torch.allclose(p.detach() - before, delta["p"], atol=1e-7, rtol=1e-5)
    assert torch.equal(delta["q"], torch.zeros(3))
    fresh = nn.Parameter(torch.ones(2))
    fresh.grad = torch.tensor([2.0, -0.5])
    step = adam_lookahead(torch.optim.Adam([fresh], lr=0.1), {"f": fresh})["f"]
    assert torch.allclose(step, torch.tensor([-0.1, 0.1]), atol=1e-6)  # first step: -lr sign(g)


def test_the_regulariser_pulls_generated_weights_to_their_targets():
    hnet = tiny_hnet(5)
    E = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        T = hnet(E).clone()  # the targets: the outputs of Theta_h*
        for p in hnet.parameters():
            p.add_(0.5 * torch.randn_like(p))
    opt = torch.optim.Adam(hnet.parameters(), lr=0.01)
    dist = []
    for _ in range(300):
        opt.zero_grad()
        reg = output_regulariser(hnet, E, T)
        dist.append(reg.item())
        reg.backward()
        opt.step()
    assert dist[-1] < 0.02 * dist[0] and dist[100] < dist[0]


def strategy(plugin, seed=0, hidden=(16,), lr=0.1):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": list(hidden)}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
               train_mb_size=32, train_epochs=1, eval_mb_size=256, device="cpu",
               plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    return st, info, model


class WrittenSpy(SupervisedPlugin):
    def __init__(self, hn):
        super().__init__()
        self.hn, self.checked = hn, 0

    def after_forward(self, strategy, **kwargs):
        if self.checked == 0:
            task = self.hn.tasks[-1]
            with torch.no_grad():
                gen = self.hn.generate(task)
            self.names = sorted(gen)
            assert all(torch.equal(strategy.model.get_parameter(n), gen[n]) for n in gen)
        self.checked += 1


def test_every_parameter_is_generated_and_the_model_is_never_trained():
    hn = HypernetPlugin(**SMALL)
    st, info, model = strategy(hn)
    spy = WrittenSpy(hn)
    st.plugins.append(spy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st.train(info.benchmark.train_stream[0])
    assert spy.checked > 0 and spy.names == sorted(
        ["backbone.layers.0.weight", "backbone.layers.0.bias",
         "head.classifiers.0.classifier.weight", "head.classifiers.0.classifier.bias"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert hn.hnet.n_outputs == 64 * 16 + 16 + 16 * 2 + 2 and hn.hnet.n_chunks == 4
    e0 = hn.embeddings[0].detach().clone()
    st.train(info.benchmark.train_stream[1])
    assert torch.equal(hn.embeddings[0], e0) and set(hn.stored) == {0}  # old embedding fixed
    assert target_slots(model, 1)[-1] == ("head.classifiers.{t}.classifier.bias", (2,))
    cost = hn.cost_per_task()
    assert cost[0] == {"params": 4 + hn.hnet.n_outputs, "bytes": 4 * (4 + hn.hnet.n_outputs)}
    assert cost[1] == {"params": 4, "bytes": 16}


def old_task_drift(beta):
    """||f_h(e_0) after task 1 - f_h(e_0) after task 0|| / ||f_h(e_0) after task 0||."""
    hn = HypernetPlugin(beta=beta, lr=0.01, **SMALL)
    st, info, _ = strategy(hn)
    st.train(info.benchmark.train_stream[0])
    with torch.no_grad():
        w0 = torch.cat([w.flatten() for w in hn.generate(0).values()])
    st.train(info.benchmark.train_stream[1])
    with torch.no_grad():
        w1 = torch.cat([w.flatten() for w in hn.generate(0).values()])
    return ((w1 - w0).norm() / w0.norm()).item()


def test_an_old_task_keeps_its_weights_under_a_large_beta():
    # Adam normalises the step, so a larger beta stops helping beyond some value: what is left
    # is the drift of one step of size lr, corrected by the next
    free, kept = old_task_drift(0.0), old_task_drift(100.0)
    assert free > 0.2 and kept < 0.1 * free, (free, kept)


def test_arguments_and_models_are_checked():
    d = signature_defaults(HypernetPlugin)
    assert d == {"beta": 0.01, "task_emb_dim": 96, "chunk_emb_dim": 96, "chunk_size": 42000,
                 "hnet_hidden": (10, 10), "activation": "relu", "lr": 0.001, "lookahead": True,
                 "seed": 0}
    assert HypernetPlugin.SCENARIOS == ("task",) and HypernetPlugin.NEEDS_TASK_LABELS
    for kwargs, match in [({"beta": -1.0}, "beta must be in"), ({"chunk_size": 0}, "chunk_size"),
                          ({"hnet_hidden": "10"}, "hnet_hidden must be a list"),
                          ({"hnet_hidden": [10, 0]}, r"hnet_hidden\[1\]"),
                          ({"activation": "tanh"}, "activation must be one of"),
                          ({"lookahead": 1}, "lookahead must be one of True, False")]:
        with pytest.raises(ValueError, match=match):
            HypernetPlugin(**kwargs)
    with pytest.raises(ValueError, match="needs a ClassifierNet"):
        target_slots(nn.Linear(2, 2), 0)


def test_exact_resume():
    a = HypernetPlugin(**SMALL)
    st_a, info, model_a = strategy(a, seed=1)
    stream = info.benchmark.train_stream
    for e in stream[:2]:
        st_a.train(e)
    buf = io.BytesIO()
    torch.save({"plugin": a.state_dict(), "model": model_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = HypernetPlugin(**SMALL)
    st_b, _, model_b = strategy(b, seed=7)
    for e in stream[:2]:
        avalanche_model_adaptation(model_b, e)
    model_b.load_state_dict(saved["model"])
    b.load_state_dict(saved["plugin"])
    assert b.state_dict()["hnet"] is saved["plugin"]["hnet"]  # unchanged: the state it loaded
    for st in (st_a, st_b):
        torch.manual_seed(5)
        st.train(stream[2])
    for (n, p), q in zip(a.hnet.named_parameters(), b.hnet.parameters()):
        assert torch.equal(p, q), n
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["tasks"] == sb["tasks"] == [0, 1, 2] and sa["stored_tasks"] == [0, 1]
    for key in ("embeddings", "stored"):
        assert all(torch.equal(x, y) for x, y in zip(sa[key], sb[key]))
    oa, ob = sa["own_optimizer"]["state"]["state"], sb["own_optimizer"]["state"]["state"]
    assert all(torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) for k in oa)
    with pytest.raises(ValueError, match="saved with beta=0.01, this plugin has beta=0.1"):
        HypernetPlugin(**{**SMALL, "beta": 0.1}).load_state_dict(saved["plugin"])
