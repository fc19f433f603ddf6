"""Piggyback (architectural/piggyback.py): a fixed backbone, straight-through mask gradients,
exact per-task outputs after later tasks, exact resume."""

import copy
import tempfile

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from torch import nn
from torch.func import functional_call

from cl_plugins.architectural.piggyback import PiggybackPlugin, binary_mask
from helpers import eval_outputs, masking_strategy, train_both_equal

PLAIN = ("backbone.layers.0", "backbone.layers.2")  # the Linear layers of an MLP without BN


def backbone_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}


class Faster(PiggybackPlugin):
    """Masks that move within a few steps (split_digits is tiny), from a random start around
    the threshold so that some entries are 0 from the first step."""

    def begin_task(self, strategy, task):
        super().begin_task(strategy, task)
        g = torch.Generator().manual_seed(task)
        for m in self.real.get(task, {}).values():
            with torch.no_grad():
                m.copy_(torch.rand(m.shape, generator=g) * 2 * self.threshold)


@pytest.mark.parametrize("pretrained", [False, True])
def test_the_backbone_never_changes_once_fixed(pretrained):
    plugin = Faster(mask_lr=1e-2, pretrained=pretrained)
    st, info = masking_strategy([plugin])
    stream = list(info.benchmark.train_stream)
    start = backbone_state(st.model)
    st.train(stream[0])
    after_first = backbone_state(st.model)
    changed = any(not torch.equal(start[k], v) for k, v in after_first.items())
    assert changed != pretrained  # trained by the first experience unless given pretrained
    for e in stream[1:3]:
        st.train(e)
    assert all(torch.equal(v, after_first[k]) for k, v in backbone_state(st.model).items())
    masked = [t for t in plugin.masks if any(not b.all() for b in plugin.masks[t].values())]
    assert masked == ([0, 1, 2] if pretrained else [1, 2])  # the backbone's task has none


def test_the_mask_gradient_is_the_straight_through_gradient():
    class Spy(SupervisedPlugin):
        def before_forward(self, strategy, **kwargs):  # listed first: the layers hold W0
            if 1 not in plugin.real:
                return
            self.w0 = {n: strategy.model.get_submodule(n).weight.detach().clone() for n in PLAIN}
            self.real = {n: m.detach().clone() for n, m in plugin.real[1].items()}
            self.model = copy.deepcopy(strategy.model)

        def before_update(self, strategy, **kwargs):  # every after_backward has run
            if 1 in plugin.real:
                self.grads = {n: m.grad.clone() for n, m in plugin.real[1].items()}

    plugin, spy = Faster(), Spy()
    st, info = masking_strategy([spy, plugin], batch_norm=False, epochs=1)
    st.train(info.benchmark.train_stream[0])
    st.train_mb_size = 10_000  # one step on the whole second experience
    exp = info.benchmark.train_stream[1]
    st.train(exp)
    x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
    y = torch.tensor([exp.dataset[i][1] for i in range(len(exp.dataset))])
    b = {n: (spy.real[n] > plugin.threshold).float() for n in PLAIN}  # (P1)
    assert all(0 < v.mean() < 1 for v in b.values())
    eff = {n + ".weight": (spy.w0[n] * b[n]).requires_grad_(True) for n in PLAIN}  # (P2)
    out = functional_call(spy.model, {**dict(spy.model.named_parameters()), **eff},
                          (x, torch.ones(len(x), dtype=torch.long)))
    grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), list(eff.values()))
    for n, g in zip(PLAIN, grads):
        torch.testing.assert_close(spy.grads[n], g * spy.w0[n], rtol=1e-5, atol=1e-7)  # (P3)
        assert spy.grads[n][b[n] == 0].abs().sum() > 0  # masked-out entries get it too


def test_binary_mask_values_and_identity_gradient():
    m = torch.tensor([0.001, 0.005, 0.0051, 0.2], requires_grad=True)
    b = binary_mask(m, 5e-3)
    assert b.tolist() == [0.0, 0.0, 1.0, 1.0]
    b.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_each_task_output_is_reproduced_exactly_after_later_tasks():
    plugin = Faster(mask_lr=1e-2)
    st, info = masking_strategy([plugin])
    train, test = list(info.benchmark.train_stream), info.benchmark.test_stream
    for e in train[:3]:
        st.train(e)
    before = [eval_outputs(st, test[t]) for t in range(3)]
    x = torch.stack([test[1].dataset[i][0] for i in range(8)])
    st.model.eval()
    assert not torch.allclose(before[1][:8], st.model(x, 1))  # task 1's mask is in use
    for e in train[3:]:
        st.train(e)
    assert all(torch.equal(eval_outputs(st, test[t]), before[t]) for t in range(3))


def test_state_round_trip_resume_cost_and_checks():
    sgd = dict(lr=0.1)
    a = Faster(mask_lr=1e-2)
    st_a, info = masking_strategy([a], sgd=sgd)
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    path = tempfile.mkdtemp() + "/state.pt"
    torch.save(a.state_dict(), path)
    b = Faster(mask_lr=1e-2)
    b.load_state_dict(torch.load(path, weights_only=True))
    st_b, _ = masking_strategy([b], sgd=sgd, seed=5)
    for e in stream[:2]:
        avalanche_model_adaptation(st_b.model, e)
    train_both_equal(st_a, st_b, stream[2], (), copy.deepcopy(st_a.model.state_dict()))
    assert a.trained_tasks == b.trained_tasks == [0, 1, 2] and a.backbone_task == 0
    assert all(torch.equal(a.masks[2][n], b.masks[2][n]) for n in a.masks[2])
    n = 64 * 16 + 16 * 16
    assert a.cost_per_task() == {0: {"params": 0, "bytes": 0}, 1: {"params": n, "bytes": n},
                                 2: {"params": n, "bytes": n}}
    with pytest.raises(ValueError, match="saved with mask_lr=0.01, this plugin has mask_lr"):
        Faster().load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="mask_init must be above threshold"):
        PiggybackPlugin(mask_init=1e-3)
    with pytest.raises(ValueError, match="pretrained must be one of True, False"):
        PiggybackPlugin(pretrained=1)
    assert isinstance(PiggybackPlugin().make_optimizer(None, [nn.Parameter(torch.ones(1))]),
                      torch.optim.Adam)
