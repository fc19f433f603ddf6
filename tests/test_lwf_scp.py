"""LwF (Li & Hoiem 2017) and SCP (Kolouri et al. 2020): math on small tensors, state, end to end."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training import Naive
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.distill import kd_loss
from cl_plugins.core.params import shared_parameters
from cl_plugins.core.schedule import vandeven_weights
from cl_plugins.core.snapshot import frozen_copy
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from cl_plugins.regularization.lwf import LwFPlugin
from cl_plugins.regularization.scp import SCPPlugin
from cl_plugins.registry import MethodSpec, _REGISTRY, get_method


@pytest.fixture(scope="module")
def bench():
    return {s: build_benchmark("split_digits", s) for s in ("task", "domain", "class")}


def _model(info, hidden=(7,), seed=0):
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "hidden": list(hidden)}, info).double()


def _x(info, exp, n=16):
    ds = info.benchmark.train_stream[exp].dataset
    return torch.stack([ds[i][0] for i in range(n)]).double()


def _adapt(model, exp):
    avalanche_model_adaptation(model, exp)
    model.double()  # new heads are created in float32


def _finish(plugin, model, exp):
    """Run the plugin's end-of-experience hook as the strategy would."""
    plugin.after_training_exp(SimpleNamespace(model=model, experience=exp, device="cpu",
                                              eval_mb_size=64))


# ------------------------------------------------------------------------------ kd_loss

def test_kd_t2_scaling_keeps_the_gradient_scale():
    # Near a uniform teacher, d KD / d s = J_softmax (s - q) / T^2 without the T^2 factor:
    # with it, the gradient does not depend on T.
    torch.manual_seed(0)
    q = torch.zeros(4, 5, dtype=torch.float64)
    s0 = 1e-3 * torch.randn(4, 5, dtype=torch.float64)

    def grad(T, scale):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, q, T, scale).backward()
        return s.grad

    g1, g4 = grad(1.0, True), grad(4.0, True)
    assert torch.allclose(g4, g1, rtol=1e-2, atol=0)
    ratio = grad(4.0, False).norm() / grad(1.0, False).norm()
    assert ratio == pytest.approx(1 / 16, rel=1e-2)


# ------------------------------------------------------------------------------ LwF math

def test_lwf_multihead_distils_every_old_head(bench):
    info = bench["task"]
    exps = info.benchmark.train_stream
    model = _model(info)
    plugin = LwFPlugin()  # defaults: mean over old heads
    _adapt(model, exps[0])
    _finish(plugin, model, exps[0])
    _adapt(model, exps[1])
    x = _x(info, 1)
    assert plugin.distillation_term(model, x).item() < 1e-14  # right after copying: zero

    with torch.no_grad():
        model.head.classifiers["1"].classifier.weight.add_(1.0)  # the new head: not distilled
    assert plugin.distillation_term(model, x).item() < 1e-14
    with torch.no_grad():
        w0 = model.backbone.layers[0].weight
        w0.add_(0.3 * torch.randn_like(w0))
    after_shared = plugin.distillation_term(model, x).item()
    assert after_shared > 1e-4

    # second old head: the term is the mean of the per-head KD terms, computed by hand
    _finish(plugin, model, exps[1])
    _adapt(model, exps[2])
    with torch.no_grad():
        for p in shared_parameters(model).values():
            p.add_(0.2 * torch.randn_like(p))
        model.head.classifiers["0"].classifier.bias.add_(0.5)
    x = _x(info, 2)
    teacher = plugin.teacher
    by_hand = []
    for k in (0, 1):
        by_hand.append(kd_loss(model(x, k), teacher(x, k), 2.0))
    got = plugin.distillation_term(model, x)
    assert got.item() == pytest.approx(((by_hand[0] + by_hand[1]) / 2).item(), rel=1e-12)
    # the features captured from the strategy's forward give the same term
    feats = model.backbone(x)
    assert plugin.distillation_term(model, x, features=feats).item() == pytest.approx(
        got.item(), rel=1e-12)
    plugin_sum = LwFPlugin(task_reduction="sum")
    plugin_sum.load_state_dict({**plugin.state_dict(), "config": plugin_sum.state_dict()["config"]})
    assert plugin_sum.distillation_term(model, x).item() == pytest.approx(
        (by_hand[0] + by_hand[1]).item(), rel=1e-12)


def test_lwf_class_il_distils_only_old_classes(bench):
    info = bench["class"]
    exps = info.benchmark.train_stream
    model = _model(info)
    plugin = LwFPlugin(temperature=3.0, class_il_softmax="old")
    model.train()
    _adapt(model, exps[0])
    _finish(plugin, model, exps[0])
    assert plugin.old_classes == {0: [0, 1]}
    _adapt(model, exps[1])  # unmasks classes 2, 3
    x = _x(info, 1)
    with torch.no_grad():
        model.backbone.layers[0].bias.add_(0.5)
    base = plugin.distillation_term(model, x).item()
    student, teacher = model(x), plugin.teacher(x)
    assert base == pytest.approx(kd_loss(student[:, :2], teacher[:, :2], 3.0).item(), rel=1e-12)
    assert base > 1e-6
    with torch.no_grad():  # the new classes' weights do not enter the term
        model.head.linear.weight[2:4].add_(5.0)
        model.head.linear.bias[2:4].add_(5.0)
    assert plugin.distillation_term(model, x).item() == base
    with torch.no_grad():  # an old class's weights do
        model.head.linear.weight[0].add_(0.5)
    assert plugin.distillation_term(model, x).item() != pytest.approx(base, rel=1e-6)


class _FixedLogits(nn.Module):
    """A 'model' whose output is a fixed logit matrix (the teacher of the hand-computed tests)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits


def test_lwf_class_il_seen_softmax_hand_computed():
    # old classes {0, 1}, current classes {2, 3}; T = 2; scale_t2 on (van de Ven's loss_fn_kd)
    import math

    teacher = torch.tensor([[0.0, 0.0, 9.0, 9.0], [2.0, 0.0, -5.0, 7.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 4.0, -2.0]], dtype=torch.float64,
                           requires_grad=True)
    x = torch.zeros(2, 1, dtype=torch.float64)
    seen = LwFPlugin(temperature=2.0, class_il_softmax="seen")
    old = LwFPlugin(temperature=2.0, class_il_softmax="old")
    for p in (seen, old):
        p.teacher, p.old_classes = _FixedLogits(teacher), {0: [0, 1]}

    # sample 1: q = (1/2, 1/2) (padded: 1/2, 1/2, 0, 0), p = (1/4, 1/4, 1/4, 1/4):
    #   KL = 2 * 1/2 * (log 1/2 - log 1/4) = log 2;  CE = -log(1/4) = 2 log 2 = KL + H(q)
    # sample 2: z_t / T = (1, 0), z_s / T = (0, 1, 2, -1)
    q2 = [math.e / (1 + math.e), 1 / (1 + math.e)]
    zs = [0.0, 1.0, 2.0, -1.0]
    lse = math.log(sum(math.exp(z) for z in zs))
    kl2 = sum(q * (math.log(q) - (z - lse)) for q, z in zip(q2, zs[:2]))
    ce2 = -sum(q * (z - lse) for q, z in zip(q2, zs[:2]))
    h2 = -sum(q * math.log(q) for q in q2)
    want = 4.0 * (math.log(2) + kl2) / 2  # T^2 * mean over the batch
    got = seen.distillation_term(nn.Identity(), x, student_output=student, current_classes=[2, 3])
    assert got.item() == pytest.approx(want, rel=1e-13)
    # van de Ven's cross-entropy form: the same up to the teacher's entropy (a constant)
    assert want == pytest.approx(4.0 * ((2 * math.log(2) - math.log(2)) + (ce2 - h2)) / 2,
                                 rel=1e-13)
    # gradient w.r.t. the student's logits: T (p - q_padded) / batch
    got.backward()
    p1 = [0.25] * 4
    p2 = [math.exp(z - lse) for z in zs]
    g = [[2.0 * (a - b) / 2 for a, b in zip(p1, [0.5, 0.5, 0, 0])],
         [2.0 * (a - b) / 2 for a, b in zip(p2, q2 + [0, 0])]]
    torch.testing.assert_close(student.grad, torch.tensor(g, dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert bool((student.grad[:, 2:] > 0).all())  # the current classes are pushed down

    # "old": the softmax spans the old classes only; sample 1 is then exactly at the teacher
    want_old = 4.0 * (0.0 + sum(q * (math.log(q) - math.log(pp)) for q, pp in
                                zip(q2, [1 / (1 + math.e), math.e / (1 + math.e)]))) / 2
    s2 = student.detach()
    assert old.distillation_term(nn.Identity(), x, student_output=s2,
                                 current_classes=[2, 3]).item() == pytest.approx(want_old,
                                                                                 rel=1e-13)
    # no current class outside the old ones (domain-IL): "seen" = "old"
    assert seen.distillation_term(nn.Identity(), x, student_output=s2,
                                  current_classes=[0, 1]).item() == pytest.approx(want_old,
                                                                                  rel=1e-13)


def test_lwf_class_il_seen_softmax_in_a_strategy(bench):
    # before_training_exp records the current classes; the term spans old + current columns
    info = bench["class"]
    exps = info.benchmark.train_stream
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [8]}, info)
    plugin = LwFPlugin(class_il_softmax="seen")
    seen_terms = []

    class Probe(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            if plugin.teacher is not None and not seen_terms:
                x, out = strategy.mb_x, strategy.mb_output
                with torch.no_grad():
                    q = plugin.teacher(x)
                seen_terms.append((plugin.distillation_term(strategy.model, x, out).item(),
                                   kd_loss(out[:, [0, 1, 2, 3]], q[:, [0, 1]], 2.0).item(),
                                   kd_loss(out[:, :2], q[:, :2], 2.0).item()))

    strat = _strategy(model, plugin)
    strat.plugins.append(Probe())
    for e in range(2):
        strat.train(exps[e])
    assert plugin._current_classes == {} and plugin.old_classes == {0: [0, 1, 2, 3]}
    (got, want, old_form), = seen_terms
    assert got == pytest.approx(want, rel=1e-6) and got != pytest.approx(old_form, rel=1e-3)


def test_lwf_domain_il_distils_all_outputs(bench):
    info = bench["domain"]
    exps = info.benchmark.train_stream
    model = _model(info)
    plugin = LwFPlugin()
    _finish(plugin, model, exps[0])
    assert sorted(plugin.old_classes[0]) == list(range(info.n_outputs))
    with torch.no_grad():
        model.head.weight.add_(0.3)
        model.head.weight[1].add_(0.4)
    x = _x(info, 1)
    assert plugin.distillation_term(model, x).item() == pytest.approx(
        kd_loss(model(x), plugin.teacher(x), 2.0).item(), rel=1e-12)


# ------------------------------------------------------------------------------ variants

def _softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _kl(q, p):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(q, p) if a > 0)


def _variant_plugins(alpha=1.0):
    return {"standard": LwFPlugin(alpha=alpha),
            "vandeven2018": LwFPlugin(alpha=alpha, variant="vandeven2018"),
            "vandeven2022": LwFPlugin(alpha=alpha, variant="vandeven2022", scale_t2=False)}


def _tiny_pair(n_out, seed=0):
    """A tiny single-head student (one linear layer) and a frozen, perturbed teacher copy."""
    torch.manual_seed(seed)
    student = nn.Linear(3, n_out).double()
    teacher = frozen_copy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    return student, teacher


def _loss_after_before_backward(plugin, student, x, y):
    out = student(x)
    ce = nn.functional.cross_entropy(out, y)
    strat = SimpleNamespace(model=student, mb_x=x, mb_output=out, loss=ce.clone(), device="cpu",
                            mb_task_id=torch.zeros(len(x), dtype=torch.long))
    plugin.before_backward(strat)
    return ce.item(), strat.loss.item()


def test_lwf_variants_class_il_loss_by_hand_on_a_tiny_model():
    # 8 outputs, training task 3 (t = 3): old classes 0-3, current 4-5, 6-7 never seen; an
    # unmasked head (model.mask = none), as van de Ven's 2022 code's --active-classes=all.
    student, teacher = _tiny_pair(8)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([4, 5, 4, 5])
    zs, zt = student(x).tolist(), teacher(x).tolist()
    T = 2.0
    # the 2018-2021 term: student softmax over the seen classes 0-5, teacher's over 0-3 padded
    seen = sum(_kl(_softmax([v / T for v in a[:4]]) + [0.0, 0.0], _softmax([v / T for v in b[:6]]))
               for a, b in zip(zt, zs)) / 4
    # the 2022 term: both softmaxes over all 8 outputs, no padding
    every = sum(_kl(_softmax([v / T for v in a]), _softmax([v / T for v in b]))
                for a, b in zip(zt, zs)) / 4
    want = {"standard": 2 * T * T * seen,         # (t - 1) * T^2 * KD
            "vandeven2018": 2 * T * T * seen / 6,  # ... divided by the 6 columns it spans
            "vandeven2022": 1.0 * every}           # class-IL: weight 1, no T^2
    got = {}
    for name, plugin in _variant_plugins().items():
        plugin.teacher, plugin.n_experiences = teacher, 2
        plugin.old_classes, plugin._current_classes = {0: [0, 1, 2, 3]}, {0: [4, 5]}
        ce, total = _loss_after_before_backward(plugin, student, x, y)
        got[name] = total - ce
        assert total == pytest.approx(ce + want[name], rel=1e-12), name
    assert len({round(v, 9) for v in got.values()}) == 3  # three different losses


def test_lwf_variants_domain_il_loss_by_hand_on_a_tiny_model():
    # same labels in every experience: 2022 keeps the (t - 1) weight, drops T^2
    student, teacher = _tiny_pair(2, seed=1)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    zs, zt = student(x).tolist(), teacher(x).tolist()
    kd = sum(_kl(_softmax([v / 2 for v in a]), _softmax([v / 2 for v in b]))
             for a, b in zip(zt, zs)) / 5
    want = {"standard": 2 * 4 * kd, "vandeven2018": 2 * 4 * kd / 2, "vandeven2022": 2 * kd}
    for name, plugin in _variant_plugins().items():
        plugin.teacher, plugin.n_experiences = teacher, 2
        plugin.old_classes, plugin._current_classes = {0: [0, 1]}, {0: [0, 1]}
        ce, total = _loss_after_before_backward(plugin, student, x, y)
        assert total == pytest.approx(ce + want[name], rel=1e-12), name


def test_lwf_variants_on_task_heads(bench):
    # task-IL: per old head, 2018 divides by the head's 2 columns, 2022 drops T^2; both keep
    # the mean over old heads and the weight (t - 1), whatever classes the task brings
    info = bench["task"]
    exps = info.benchmark.train_stream
    model = _model(info)
    plugins = _variant_plugins(alpha=0.5)
    for e in range(2):
        _adapt(model, exps[e])
        for plugin in plugins.values():
            _finish(plugin, model, exps[e])
    _adapt(model, exps[2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = _x(info, 2)
    terms = {n: p.distillation_term(model, x).item() for n, p in plugins.items()}
    assert terms["standard"] > 0
    assert terms["vandeven2018"] == pytest.approx(terms["standard"] / 2, rel=1e-12)
    assert terms["vandeven2022"] == pytest.approx(terms["standard"] / 4, rel=1e-12)
    v22 = plugins["vandeven2022"]
    v22._current_classes = {2: [4, 5]}  # even with new labels: per-task heads, no class-IL rule
    assert not v22._new_classes(model)
    assert v22.kd_weight(3, v22._new_classes(model)) == pytest.approx(1.0)
    assert v22.kd_weight(3, new_classes=True) == 0.5  # a single head's class-IL step
    assert plugins["standard"].kd_weight(3, new_classes=True) == pytest.approx(1.0)  # keeps t - 1


def test_lwf_vandeven2022_in_a_class_il_strategy(bench):
    # the hooks record the classes: in the second experience of class-IL the weight is alpha
    # and the term spans all 10 outputs of the unmasked head, without T^2
    info = bench["class"]
    exps = info.benchmark.train_stream
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [8], "mask": "none"}, info)
    plugin = LwFPlugin(alpha=0.7, variant="vandeven2022", scale_t2=False)
    seen = []

    class Probe(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            if plugin.teacher is not None and not seen:
                x, out = strategy.mb_x, strategy.mb_output
                with torch.no_grad():
                    q = plugin.teacher(x)
                seen.append((plugin.kd_weight(2, plugin._new_classes(strategy.model)),
                             plugin.distillation_term(strategy.model, x, out).item(),
                             kd_loss(out, q, 2.0, scale_t2=False).item(), out.shape[1]))

    strat = _strategy(model, plugin)
    strat.plugins.append(Probe())
    for e in range(2):
        strat.train(exps[e])
    (weight, got, want, n_out), = seen
    assert weight == 0.7 and n_out == 10 and got == pytest.approx(want, rel=1e-6)


def test_lwf_variant_state_round_trip(bench):
    info = bench["class"]
    exps = info.benchmark.train_stream
    model = _model(info)
    plugin = LwFPlugin(variant="vandeven2022", scale_t2=False)
    _finish(plugin, model, exps[0])
    state = plugin.state_dict()
    assert state["config"]["variant"] == "vandeven2022"
    fresh = LwFPlugin(variant="vandeven2022", scale_t2=False)
    fresh.load_state_dict(copy.deepcopy(state))
    with torch.no_grad():
        model.head.linear.weight.add_(0.2)
    x = _x(info, 1)
    assert fresh.distillation_term(model, x).item() == plugin.distillation_term(model, x).item()
    assert fresh.variant == "vandeven2022" and fresh.old_classes == {0: [0, 1]}
    with pytest.raises(ValueError, match=r"LwFPlugin.load_state_dict: the state was saved with "
                                         r"variant='vandeven2022', this plugin has "
                                         r"variant='standard'"):
        LwFPlugin(scale_t2=False).load_state_dict(copy.deepcopy(state))
    old = copy.deepcopy(state)  # saved before the option existed: the standard term
    del old["config"]["variant"]
    LwFPlugin(scale_t2=False).load_state_dict(old)


def test_lwf_teacher_carries_no_hooks_of_other_plugins(bench):
    info = bench["domain"]
    model = _model(info)
    calls = []

    class Recorder:  # another plugin's layer hook; its owner cannot even be deep-copied
        def __init__(self):
            self.gen = (i for i in range(3))

        def __call__(self, module, inputs, output):
            calls.append(module)

    model.backbone.layers[0].register_forward_hook(Recorder())
    plugin = LwFPlugin()
    _finish(plugin, model, info.benchmark.train_stream[0])
    assert all(not m._forward_hooks for m in plugin.teacher.modules())
    assert not any(p.requires_grad for p in plugin.teacher.parameters())
    assert not plugin.teacher.training
    plugin.teacher(_x(info, 1))
    assert calls == []  # the student's hook did not fire on the teacher
    model(_x(info, 1))
    assert calls == [model.backbone.layers[0]]


def test_vandeven_weighting_values():
    w = vandeven_weights
    assert w(1) == (1.0, 0.0)
    assert w(2) == (0.5, 0.5)
    assert w(3) == pytest.approx((1 / 3, 2 / 3))
    p = LwFPlugin(alpha=1.5)
    # the KD term is added with weight alpha * w_kd / w_ce = alpha * (t - 1)
    assert [p.kd_weight(t) for t in (1, 2, 3)] == pytest.approx([0.0, 1.5, 3.0])
    assert [LwFPlugin(alpha=1.5, schedule="constant").kd_weight(t) for t in (1, 2, 3)] == [1.5] * 3
    lst = LwFPlugin(alpha=[0.0, 0.5, 4 / 3], schedule="constant")
    assert [lst.kd_weight(t) for t in (1, 2, 3)] == pytest.approx([0.0, 0.5, 4 / 3])
    with pytest.raises(ValueError, match="alpha lists 3 values"):
        lst.kd_weight(4)


def test_lwf_before_backward_adds_weighted_term(bench):
    info = bench["domain"]
    exps = info.benchmark.train_stream
    model = _model(info)
    plugin = LwFPlugin(alpha=0.7)
    _finish(plugin, model, exps[0])
    _finish(plugin, model, exps[1])  # now training the third task: weight 0.7 * 2
    with torch.no_grad():
        model.backbone.layers[0].weight.mul_(1.5)
    x = _x(info, 2)
    out = model(x)
    base = torch.tensor(0.25, dtype=torch.float64)
    strat = SimpleNamespace(model=model, mb_x=x, mb_output=out, mb_task_id=torch.zeros(16),
                            loss=base.clone(), device="cpu")
    plugin.before_backward(strat)
    kd = kd_loss(out, plugin.teacher(x), 2.0)
    assert strat.loss.item() == pytest.approx(0.25 + 1.4 * kd.item(), rel=1e-12)


def test_lwf_term_gradient_matches_finite_differences(bench):
    info = bench["task"]
    exps = info.benchmark.train_stream
    model = _model(info)
    plugin = LwFPlugin()
    for e in range(2):
        _adapt(model, exps[e])
        _finish(plugin, model, exps[e])
    _adapt(model, exps[2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = _x(info, 2, n=8)
    w = model.backbone.layers[0].weight
    model.zero_grad()
    plugin.distillation_term(model, x).backward()
    g = w.grad.clone()
    eps = 1e-6
    for idx in [(0, 0), (3, 17), (6, 40)]:
        with torch.no_grad():
            w[idx] += eps
            up = plugin.distillation_term(model, x).item()
            w[idx] -= 2 * eps
            down = plugin.distillation_term(model, x).item()
            w[idx] += eps
        assert g[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-10)


# ------------------------------------------------------------------------------ SCP math

def _loader(x, batch_size):
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)),
                      batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("n_slices", [1, 3])  # L < d and L >= d take different paths
def test_scp_importance_by_hand_on_a_linear_model(n_slices):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    xi = torch.randn(n_slices, 2, dtype=torch.float64)
    xi = xi / xi.norm(dim=1, keepdim=True)
    gamma = SCPPlugin(n_slices=n_slices, seed=0).importance(model, _loader(x, 4), slices=xi)
    # phi(x) = W x + b; d <xi, mean phi> / dW = xi xbar^T, / db = xi
    xbar = x.mean(0)
    want_w = (xi.pow(2).mean(0)[:, None] * xbar.pow(2)[None, :])
    want_b = xi.pow(2).mean(0)
    assert torch.allclose(gamma["weight"], want_w, atol=1e-14)
    assert torch.allclose(gamma["bias"], want_b, atol=1e-14)


def test_scp_importance_is_the_sliced_mean_output_gradient_on_an_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(13, 4, dtype=torch.float64)
    plugin = SCPPlugin(n_slices=7, seed=3)
    xi = SCPPlugin(n_slices=7, seed=3).draw_slices(3)  # the same generator state
    gamma = plugin.importance(model, _loader(x, 5))
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for l in range(7):  # the definition, one slice at a time, on the whole data at once
        model.zero_grad()
        (model(x).mean(0) @ xi[l]).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad.pow(2) / 7
    for n in want:
        assert torch.allclose(gamma[n], want[n], atol=1e-14), n
    # a different number of slices than outputs takes the other path: same definition
    g2 = SCPPlugin(n_slices=2, seed=0).importance(model, _loader(x, 13), slices=xi[:2])
    want2 = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for l in range(2):
        model.zero_grad()
        (model(x).mean(0) @ xi[l]).backward()
        for n, p in model.named_parameters():
            want2[n] += p.grad.pow(2) / 2
    for n in want2:
        assert torch.allclose(g2[n], want2[n], atol=1e-14), n


def test_scp_slices_come_from_the_seeded_generator():
    got = SCPPlugin(n_slices=5, seed=11).draw_slices(4)
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.equal(got, g / g.norm(dim=1, keepdim=True))
    assert torch.allclose(got.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_scp_multihead_uses_the_task_head_and_masked_heads_their_open_columns(bench):
    info = bench["task"]
    model = _model(info)
    for e in range(2):
        _adapt(model, info.benchmark.train_stream[e])
    x = _x(info, 1, n=12)
    xi = torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    gamma = SCPPlugin(n_slices=2, seed=0).importance(model, _loader(x, 5), task_label=1,
                                                     slices=xi)
    assert set(gamma) == set(shared_parameters(model))  # heads are not penalised
    want = {n: torch.zeros_like(p) for n, p in shared_parameters(model).items()}
    for l in range(2):
        model.zero_grad()
        (model(x, 1).mean(0) @ xi[l]).backward()
        for n, p in shared_parameters(model).items():
            want[n] += p.grad.pow(2) / 2
    for n in want:
        assert torch.allclose(gamma[n], want[n], atol=1e-14), n

    info = bench["class"]
    model = _model(info)
    model.train()
    _adapt(model, info.benchmark.train_stream[0])  # 2 of 10 classes open
    x = _x(info, 0)
    g = SCPPlugin(n_slices=2, seed=0).importance(model, _loader(x, 8), task_label=0, slices=xi)
    assert g["head.linear.weight"][2:].abs().max() == 0 and g["head.linear.weight"][:2].sum() > 0
    want = {n: torch.zeros_like(p) for n, p in shared_parameters(model).items()}
    for l in range(2):  # the slices live in the space of the two open logits
        model.zero_grad()
        (model(x, 0)[:, :2].mean(0) @ xi[l]).backward()
        for n, p in shared_parameters(model).items():
            want[n] += p.grad.pow(2) / 2
    for n in want:
        assert torch.allclose(g[n], want[n], atol=1e-14), n
    with pytest.raises(ValueError, match=r"slices must have shape \[L, 2\]"):
        SCPPlugin(n_slices=2, seed=0).importance(model, _loader(_x(info, 0), 8), task_label=0,
                                                 slices=torch.ones(2, 10))


def test_scp_penalty_value_and_gradient(bench):
    info = bench["domain"]
    model = _model(info)
    plugin = SCPPlugin(scp_lambda=3.0, n_slices=4, seed=0)
    _finish(plugin, model, info.benchmark.train_stream[0])
    gamma, anchor = plugin.quadratic_penalty.terms[0]
    assert plugin.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = shared_parameters(model)
    by_hand = 3.0 * sum((gamma[n] * (params[n] - anchor[n]) ** 2).sum() for n in params)
    assert plugin.penalty(model).item() == pytest.approx(by_hand.item(), rel=1e-12)
    model.zero_grad()
    plugin.penalty(model).backward()
    w = model.backbone.layers[0].weight
    eps = 1e-6
    for idx in [(0, 0), (2, 30), (6, 63)]:
        with torch.no_grad():
            w[idx] += eps
            up = plugin.penalty(model).item()
            w[idx] -= 2 * eps
            down = plugin.penalty(model).item()
            w[idx] += eps
        assert w.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-12)
    # accumulate: a second task's importance adds up, the anchor moves to the latest weights
    _finish(plugin, model, info.benchmark.train_stream[1])
    g2, a2 = plugin.quadratic_penalty.terms[0]
    assert len(plugin.quadratic_penalty) == 1 and torch.equal(a2["head.weight"], model.head.weight)
    assert torch.all(g2["head.weight"] >= gamma["head.weight"])


# ------------------------------------------------------------------------------ state

def _strategy(model, plugin, epochs=1):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=epochs,
                 eval_mb_size=128, device="cpu", plugins=[plugin], evaluator=None,
                 eval_every=-1)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lwf", "scp"])
def test_state_round_trip_and_identical_continuation(bench, method):
    info = bench["task"]
    exps = info.benchmark.train_stream
    make = {"lwf": lambda seed: LwFPlugin(alpha=2.0),
            "scp": lambda seed: SCPPlugin(scp_lambda=50.0, n_slices=3, seed=seed)}[method]
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    plugin = make(1)
    strat = _strategy(model, plugin)
    for e in range(2):
        strat.train(exps[e])
    state = plugin.state_dict()
    tensors = [v for v in (state.get("teacher") or {}).values()] + \
        [t for term in state.get("penalty", {}).get("terms", []) for d in term for t in d.values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)

    fresh = make(99)  # another seed: the restored generator state must take over
    fresh.load_state_dict(copy.deepcopy(state))
    x = torch.stack([exps[2].dataset[i][0] for i in range(16)])
    avalanche_model_adaptation(model, exps[2])  # the next task's head exists already
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model_b = copy.deepcopy(model)
    if method == "lwf":
        v_a, v_b = plugin.distillation_term(model, x), fresh.distillation_term(model_b, x)
        assert v_a.item() > 0
        restored = fresh.teacher.state_dict()
        for n, a in plugin.teacher.state_dict().items():
            assert torch.equal(a, restored[n]), n
    else:
        v_a, v_b = plugin.penalty(model), fresh.penalty(model_b)
        assert v_a.item() > 0
    assert v_a.item() == v_b.item()

    # identical continuation on the next experience (SGD without momentum: no optimizer state)
    strat_b = _strategy(model_b, fresh)
    torch.manual_seed(5)
    strat.train(exps[2])
    torch.manual_seed(5)
    strat_b.train(exps[2])
    pa, pb = _params(model), _params(model_b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    sa, sb = plugin.state_dict(), fresh.state_dict()
    assert sa["n_experiences"] == sb["n_experiences"] == 3
    if method == "scp":
        assert torch.equal(sa["generator"], sb["generator"])
        for (ia, aa), (ib, ab) in zip(sa["penalty"]["terms"], sb["penalty"]["terms"]):
            assert all(torch.equal(ia[n], ib[n]) and torch.equal(aa[n], ab[n]) for n in ia)


def test_lwf_multihead_runs_the_student_backbone_once_per_step(bench):
    info = bench["task"]
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    plugin = LwFPlugin()
    strat = _strategy(model, plugin)
    strat.train(info.benchmark.train_stream[0])
    calls, steps = [], []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(m.training))

    class Steps(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs):
            steps.append(1)

    strat.plugins.append(Steps())
    strat.train(info.benchmark.train_stream[1])
    assert sum(calls) == len(steps) > 0  # the KD term reused the forward pass's features


# ------------------------------------------------------------------------------ end to end

def _with_registered(fn):
    get_method("naive")  # load the built-in registry first
    saved = {c.METHOD_NAME: _REGISTRY.get(c.METHOD_NAME) for c in (LwFPlugin, SCPPlugin)}
    for c in (LwFPlugin, SCPPlugin):
        _REGISTRY[c.METHOD_NAME] = MethodSpec.from_plugin(c)
    try:
        return fn()
    finally:
        for name, spec in saved.items():
            if spec is None:
                del _REGISTRY[name]
            else:
                _REGISTRY[name] = spec


def test_lwf_forgets_less_than_naive_in_task_il(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "task"
    digits_cfg["optimizer"]["lr"] = 0.03  # large steps: naive's shared layers drift
    digits_cfg["strategy"]["epochs"] = 4
    digits_cfg["methods"] = ["naive", "lwf"]
    naive, lwf = _with_registered(lambda: run_experiment(digits_cfg, echo=lambda *a: None))
    assert naive["status"] == lwf["status"] == "finished", (naive.get("error"), lwf.get("error"))
    assert naive["summary"]["bwt"] < -0.02
    assert lwf["summary"]["bwt"] > naive["summary"]["bwt"] + 0.02


def test_scp_forgets_less_than_naive_in_domain_il(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "domain"
    digits_cfg["methods"] = ["naive", "scp"]
    naive, scp = _with_registered(lambda: run_experiment(digits_cfg, echo=lambda *a: None))
    assert naive["status"] == scp["status"] == "finished", (naive.get("error"), scp.get("error"))
    assert naive["summary"]["bwt"] < -0.05
    assert scp["summary"]["bwt"] > naive["summary"]["bwt"] + 0.03


# ------------------------------------------------------------------------------ arguments

@pytest.mark.parametrize("kwargs, pattern", [
    ({"alpha": -1.0}, r"alpha must be in \[0, inf\); got -1.0"),
    ({"alpha": []}, r"alpha must be a number >= 0 or a non-empty list"),
    ({"alpha": [1.0, -2.0]}, r"alpha\[1\] must be in \[0, inf\)"),
    ({"alpha": "1"}, r"alpha must be a number"),
    ({"temperature": 0.0}, r"temperature must be in \(0, inf\); got 0.0"),
    ({"schedule": "linear"}, r"schedule must be one of 'constant', 'vandeven'; got 'linear'"),
    ({"task_reduction": "max"}, r"task_reduction must be one of 'mean', 'sum'"),
    ({"scale_t2": 1}, r"scale_t2 must be one of True, False; got 1"),
    ({"class_il_softmax": "all"}, r"class_il_softmax must be one of 'old', 'seen'; got 'all'"),
    ({"variant": "vandeven"},
     r"variant must be one of 'standard', 'vandeven2018', 'vandeven2022'; got 'vandeven'"),
    ({"variant": "vandeven2022"}, r"scale_t2 must be False with variant='vandeven2022'"),
    ({"variant": "vandeven2022", "scale_t2": False, "schedule": "constant"},
     r"schedule must be 'vandeven' with variant='vandeven2022'"),
    ({"variant": "vandeven2022", "scale_t2": False, "task_reduction": "sum"},
     r"task_reduction must be 'mean' with variant='vandeven2022'"),
    ({"variant": "vandeven2018", "scale_t2": False}, r"scale_t2 must be True with variant="),
    ({"variant": "vandeven2018", "class_il_softmax": "old"},
     r"class_il_softmax must be 'seen' with variant='vandeven2018'"),
])
def test_lwf_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LwFPlugin(**kwargs)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"scp_lambda": -1.0}, r"scp_lambda must be in \[0, inf\); got -1.0"),
    ({"n_slices": 0}, r"n_slices must be in \[1, inf\); got 0"),
    ({"n_slices": 2.5}, r"n_slices must be an integer; got 2.5"),
    ({"mode": "separate"}, r"mode must be one of 'accumulate', 'online'; got 'separate'"),
    ({"mode": "online", "gamma": 1.5}, r"gamma must be in \[0, 1\]; got 1.5"),
    ({"gamma": 0.5}, r"gamma only applies to mode='online'"),
    ({"seed": -1}, r"seed must be in \[0, inf\); got -1"),
])
def test_scp_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SCPPlugin(**kwargs)


def test_incompatible_models_are_reported(bench):
    class Wrapped(nn.Module):  # a per-task head inside a module that takes no task label
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, 0)

    info = bench["task"]
    plugin = LwFPlugin()
    model = Wrapped(_model(info))
    _finish(plugin, model, info.benchmark.train_stream[0])
    with pytest.raises(ValueError, match="not an Avalanche MultiTaskModule"):
        plugin.distillation_term(model, _x(info, 1))

    info = bench["domain"]
    model = _model(info)
    scp = SCPPlugin(n_slices=2, seed=0)
    _finish(scp, model, info.benchmark.train_stream[0])
    model.head = nn.Linear(7, 3).double()
    with pytest.raises(ValueError, match=r"shared parameters changed.*reshaped \['head.weight'"):
        scp.penalty(model)


def test_registry_headers():
    for cls, scenarios in ((LwFPlugin, ("task", "domain", "class")),
                           (SCPPlugin, ("task", "domain", "class"))):
        spec = MethodSpec.from_plugin(cls)
        assert spec.scenarios == scenarios and spec.paper and spec.summary
        cls(**spec.defaults)  # the defaults are valid arguments
        assert set(spec.sweep) <= set(spec.defaults)
