"""core.weight_override: per-task weights written in place on an unchanged model."""

import copy

import pytest
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.func import functional_call

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.weight_override import (LayerWeights, WeightOverridePlugin,
                                             minibatch_task, optimizer_like, tensor_cost,
                                             weight_layers)
from cl_plugins.models import build_model


class Scaled(WeightOverridePlugin):
    """W_eff(t) = W0 * (1 + s_t): one trainable scale tensor per task and layer."""

    def __init__(self):
        super().__init__()
        self.scales = {}

    def begin_task(self, strategy, task):
        base = self.layers.base()
        self.scales.setdefault(task, {n: torch.zeros_like(w, requires_grad=True)
                                      for n, w in base.items()})

    def own_parameters(self, task):
        return list(self.scales[task].values())

    def effective_weights(self, task, train):
        base = self.layers.base()
        return {n: base[n] * (1 + s) for n, s in self.scales[task].items()}


class Spy(Scaled):
    def after_backward(self, strategy, **kwargs):
        self.seen = {n: m.weight.grad.clone() for n, m in self.layers.layers.items()}
        self.eff = {n: w.detach().clone() for n, w in zip(self._names, self._graph)}
        super().after_backward(strategy, **kwargs)


def strategy(plugin, seed=0, lr=0.1):
    torch.manual_seed(seed)
    info = build_benchmark("split_digits", "task")
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                                      weight_decay=0.01),
               train_mb_size=32, eval_mb_size=64, train_epochs=1, device="cpu",
               plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    return st, info


def test_the_layers_keep_their_weights_and_the_scales_get_dl_dweff_times_w0():
    plugin = Spy()
    st, info = strategy(plugin)
    names = list(weight_layers(st.model))
    assert names and not any(n.startswith("head") for n in names)
    before = {n: st.model.get_parameter(n + ".weight").detach().clone() for n in names}
    st.train(info.benchmark.train_stream[0])
    for n in names:  # weight decay and momentum never reached them
        assert torch.equal(st.model.get_parameter(n + ".weight"), before[n])
    assert all(t.abs().sum() > 0 for t in plugin.scales[0].values())  # own optimizer stepped


def test_gradient_of_the_scale_is_the_chain_rule_by_hand():
    plugin = Spy()
    st, info = strategy(plugin)
    exp = info.benchmark.train_stream[0]
    st.train_epochs = 1
    st.train_mb_size = 1000  # one step on the whole experience
    x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
    y = torch.tensor([exp.dataset[i][1] for i in range(len(exp.dataset))])
    model0 = copy.deepcopy(st.model)
    st.train(exp)
    eff = {n + ".weight": w for n, w in plugin.eff.items()}
    params = {**{k: v.detach() for k, v in model0.named_parameters()}, **eff}
    for k in eff:
        params[k] = params[k].clone().requires_grad_(True)
    out = functional_call(model0, params, (x, torch.zeros(len(x), dtype=torch.long)))
    grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), [params[k] for k in eff])
    for (k, g) in zip(eff, grads):
        n = k[:-len(".weight")]
        assert torch.allclose(plugin.seen[n], g, atol=1e-6)
        # one SGD step from s = 0 (weight decay of 0 is 0): s = -lr * dL/dW_eff * W0
        w0 = model0.get_parameter(k).detach()
        assert torch.allclose(plugin.scales[0][n].detach(), -0.1 * g * w0, atol=1e-7)


def test_evaluation_uses_the_task_weights_and_restores_the_layers():
    plugin = Scaled()
    st, info = strategy(plugin)
    st.train(info.benchmark.train_stream[0])
    exp = info.benchmark.test_stream[0]
    x = torch.stack([exp.dataset[i][0] for i in range(20)])
    t = torch.zeros(20, dtype=torch.long)
    eff = {n + ".weight": w.detach() for n, w in plugin.effective_weights(0, False).items()}
    expected = functional_call(st.model, {**dict(st.model.named_parameters()), **eff}, (x, t))
    plain = st.model(x, t).detach()
    seen = []
    st.model.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    st.eval([exp])
    assert torch.allclose(seen[0][:20], expected, atol=1e-6)
    assert torch.equal(st.model(x, t).detach(), plain)  # restored after the evaluation


def test_a_minibatch_with_two_task_labels_is_refused():
    class St:
        mb_task_id = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="one task label.*\\[0, 1\\]"):
        minibatch_task(St(), "Piggyback")


def test_optimizer_like_copies_the_class_and_settings():
    p = nn.Parameter(torch.zeros(3))
    base = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=0.003, betas=(0.5, 0.9))
    opt = optimizer_like(base, [p], lr=0.1)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert opt.param_groups[0]["lr"] == 0.1


def test_layer_weights_save_write_restore_and_cost():
    lin = nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    lw = LayerWeights({"l": lin})
    lw.write({"l": torch.ones(2, 3)})
    assert torch.equal(lin.weight, torch.ones(2, 3)) and torch.equal(lw.base()["l"], w0)
    lw.restore()
    assert torch.equal(lin.weight, w0) and lw.saved is None
    assert tensor_cost([torch.zeros(2, 3), torch.zeros(4, dtype=torch.bool)]) == \
        {"params": 10, "bytes": 28}


def test_a_model_without_weight_layers_is_refused():
    with pytest.raises(ValueError, match="no Linear or Conv layer outside model.head"):
        weight_layers(nn.Sequential(nn.ReLU()))
