"""SupSup (cl_plugins/architectural/supsup.py): edge-popup masks, the fixed signed-constant
network, straight-through score gradients by hand, exact outputs of old tasks, resume."""

import copy
import io
import math

import pytest
import torch
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.func import functional_call

from cl_plugins.architectural.supsup import SupSupPlugin, supermask
from cl_plugins.benchmarks import build_benchmark
from cl_plugins.models import build_model
from helpers import eval_outputs


@pytest.fixture(scope="module")
def info():
    return build_benchmark("split_digits", "task")


def make(info, plugin, seed=0, hidden=(32,), epochs=2, mb=32, **model_kw):
    torch.manual_seed(seed)
    model = build_model({"name": "mlp", "hidden": list(hidden), **model_kw}, info)
    st = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                                      weight_decay=1e-3),
               train_mb_size=mb, eval_mb_size=512, train_epochs=epochs, device="cpu",
               plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))
    return st, model


def test_supermask_keeps_the_largest_scores_or_the_non_negative_ones():
    s = torch.tensor([[0.3, -0.9], [0.1, -0.2]])
    assert torch.equal(supermask(s, 0.5), torch.tensor([[True, True], [False, False]]))
    assert torch.equal(supermask(s, 0.5, "threshold"), torch.tensor([[True, False],
                                                                     [True, False]]))
    s = torch.tensor([0.5, -0.1, 0.05, 0.8, -0.7, 0.2, 0.3, -0.01])
    assert supermask(s, 0.25).nonzero().flatten().tolist() == [3, 4]  # int(0.75 * 8) = 6 dropped


def test_the_network_is_a_fixed_signed_constant_and_old_masks_give_the_same_outputs(info):
    plugin = SupSupPlugin()
    st, model = make(info, plugin)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    st.train(info.benchmark.train_stream[0])
    out0 = eval_outputs(st, info.benchmark.test_stream[0])
    y0 = torch.tensor(list(info.benchmark.test_stream[0].dataset.targets))
    assert (out0.argmax(1) == y0).float().mean() > 0.8  # a supermask of a random net learned it
    fixed = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, w in init.items():  # W0 = sign(W_init) sqrt(2 / fan_in), biases 0
        want = torch.zeros_like(w) if n.endswith("bias") else \
            w.sign() * math.sqrt(2.0 / w[0].numel())
        assert torch.equal(fixed[n], want), n
    for e in (1, 2):
        st.train(info.benchmark.train_stream[e])
    for n, p in model.named_parameters():  # weight decay and momentum never reached them
        if n in fixed:
            assert torch.equal(p, fixed[n]), n
    assert set(plugin.masks) == {0, 1, 2} and not plugin.scores
    assert not torch.equal(plugin.masks[0]["backbone.layers.0"],
                           plugin.masks[1]["backbone.layers.0"])
    assert torch.equal(eval_outputs(st, info.benchmark.test_stream[0]), out0)  # exactly


class Spy(SupSupPlugin):
    def after_backward(self, strategy, **kwargs):
        self.g_eff = {n: m.weight.grad.clone() for n, m in self.layers.layers.items()}
        self.w0 = {n: w.clone() for n, w in self.layers.base().items()}
        self.s = {n: s.detach().clone() for n, s in self.scores[self._task].items()}
        super().after_backward(strategy, **kwargs)

    def after_update(self, strategy, **kwargs):
        self.g_s = {n: s.grad.clone() for n, s in self.scores[self._task].items()}
        super().after_update(strategy, **kwargs)


@pytest.mark.parametrize("rule", ["topk", "threshold"])
def test_score_gradient_is_the_straight_through_gradient_by_hand(info, rule):
    plugin = Spy(density=0.3, mask_rule=rule)
    st, model = make(info, plugin, epochs=1, mb=1000)  # one step on the whole experience
    exp = info.benchmark.train_stream[0]
    x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
    y = torch.tensor([exp.dataset[i][1] for i in range(len(exp.dataset))])
    st.train(exp)
    names = ["backbone.layers.0", "head.classifiers.0.classifier"]
    assert sorted(plugin.s) == sorted(names)  # the task's head is masked too
    w_eff = {}
    for n in names:
        s = plugin.s[n]
        m = (s >= 0) if rule == "threshold" else \
            s.abs() >= s.abs().flatten().sort().values[int((1 - 0.3) * s.numel())]
        w_eff[n + ".weight"] = (plugin.w0[n] * m).requires_grad_(True)
    params = {**{k: v.detach() for k, v in model.named_parameters()}, **w_eff}
    out = functional_call(model, params, (x, torch.zeros(len(x), dtype=torch.long)))
    grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), list(w_eff.values()))
    for n, g in zip(names, grads):
        assert torch.allclose(plugin.g_eff[n], g, atol=1e-7)
        sign = torch.ones_like(g) if rule == "threshold" else plugin.s[n].sign()
        assert torch.allclose(plugin.g_s[n], sign * plugin.w0[n] * g, atol=1e-8)
        assert plugin.g_s[n].abs().sum() > 0


def test_resume_is_exact(info):
    plugin = SupSupPlugin(density=0.4)
    st, model = make(info, plugin)
    stream = info.benchmark.train_stream
    for e in (0, 1):
        st.train(stream[e])
    for test_exp in info.benchmark.test_stream:  # as the runner's restore (and the evaluation)
        avalanche_model_adaptation(model, test_exp)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "plugin": plugin.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = SupSupPlugin(density=0.4)
    fresh.load_state_dict(saved["plugin"])
    st2, model2 = make(info, fresh, seed=5)
    for exp in list(stream[:2]) + list(info.benchmark.test_stream):
        avalanche_model_adaptation(model2, exp)
    model2.load_state_dict(copy.deepcopy(saved["model"]))
    for s in (st, st2):
        torch.manual_seed(99)
        s.train(stream[2])
    a, b = plugin.state_dict(), fresh.state_dict()
    assert a["trained_tasks"] == b["trained_tasks"] == [0, 1, 2]
    for t in (0, 1, 2):
        assert all(torch.equal(a["masks"][t][n], b["masks"][t][n]) for n in a["masks"][t])
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(eval_outputs(st, info.benchmark.test_stream[2]),
                       eval_outputs(st2, info.benchmark.test_stream[2]))


def test_cost_options_and_refusals(info):
    plugin = SupSupPlugin(score_optimizer="rmsprop", score_lr=1e-3)
    st, _ = make(info, plugin, hidden=(16,), epochs=1)
    st.train(info.benchmark.train_stream[0])
    assert plugin.cost_per_task() == {0: {"params": 64 * 16 + 16 * 2, "bytes": 64 * 16 + 32}}
    st.train(info.benchmark.train_stream[1])
    assert plugin.own_optimizer is None  # dropped at the end of the task
    for kw, match in (({"density": 0.0}, "density must be in"),
                      ({"mask_rule": "sign"}, "mask_rule must be one of")):
        with pytest.raises(ValueError, match=match):
            SupSupPlugin(**kw)
    st, _ = make(info, SupSupPlugin(), epochs=1, batch_norm=True)
    with pytest.raises(ValueError, match="normalisation layers.*backbone.layers.1"):
        st.train(info.benchmark.train_stream[0])


def test_rmsprop_scores_optimizer():
    plugin = SupSupPlugin(score_optimizer="rmsprop", score_lr=1e-4)
    st = type("S", (), {"optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)})
    opt = plugin.make_optimizer(st, [nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.RMSprop and opt.param_groups[0]["lr"] == 1e-4
    opt = SupSupPlugin().make_optimizer(st, [nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.5
