"""LwF (Li & Hoiem 2017): the KD term on small tensors and by hand, its variants, state, end to
end, arguments."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from cl_plugins.core.distill import kd_loss
from cl_plugins.core.params import shared_parameters
from cl_plugins.core.schedule import vandeven_weights
from cl_plugins.core.snapshot import frozen_copy
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.models import build_model
from cl_plugins.registry import MethodSpec
from cl_plugins.regularization.lwf import LwFPlugin

from helpers import (adapt_double, check_state_round_trip_and_identical_continuation, digits_model,
                     finish_experience, first_inputs, naive_with)


# ------------------------------------------------------------------------------ LwF math

def test_lwf_multihead_distils_every_old_head(digits_benchmarks):
    info = digits_benchmarks["task"]
    exps = info.benchmark.train_stream
    model = digits_model(info)
    plugin = LwFPlugin()  # defaults: mean over old heads
    adapt_double(model, exps[0])
    finish_experience(plugin, model, exps[0])
    adapt_double(model, exps[1])
    x = first_inputs(info, 1)
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
    finish_experience(plugin, model, exps[1])
    adapt_double(model, exps[2])
    with torch.no_grad():
        for p in shared_parameters(model).values():
            p.add_(0.2 * torch.randn_like(p))
        model.head.classifiers["0"].classifier.bias.add_(0.5)
    x = first_inputs(info, 2)
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


def test_lwf_class_il_distils_only_old_classes(digits_benchmarks):
    info = digits_benchmarks["class"]
    exps = info.benchmark.train_stream
    model = digits_model(info)
    plugin = LwFPlugin(temperature=3.0, class_il_softmax="old")
    model.train()
    adapt_double(model, exps[0])
    finish_experience(plugin, model, exps[0])
    assert plugin.old_classes == {0: [0, 1]}
    adapt_double(model, exps[1])  # unmasks classes 2, 3
    x = first_inputs(info, 1)
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


def test_lwf_class_il_seen_softmax_in_a_strategy(digits_benchmarks):
    # before_training_exp records the current classes; the term spans old + current columns
    info = digits_benchmarks["class"]
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

    strat = naive_with(model, plugin)
    strat.plugins.append(Probe())
    for e in range(2):
        strat.train(exps[e])
    assert plugin._current_classes == {} and plugin.old_classes == {0: [0, 1, 2, 3]}
    (got, want, old_form), = seen_terms
    assert got == pytest.approx(want, rel=1e-6) and got != pytest.approx(old_form, rel=1e-3)


def test_lwf_domain_il_distils_all_outputs(digits_benchmarks):
    info = digits_benchmarks["domain"]
    exps = info.benchmark.train_stream
    model = digits_model(info)
    plugin = LwFPlugin()
    finish_experience(plugin, model, exps[0])
    assert sorted(plugin.old_classes[0]) == list(range(info.n_outputs))
    with torch.no_grad():
        model.head.weight.add_(0.3)
        model.head.weight[1].add_(0.4)
    x = first_inputs(info, 1)
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


def test_lwf_variants_on_task_heads(digits_benchmarks):
    # task-IL: per old head, 2018 divides by the head's 2 columns, 2022 drops T^2; both keep
    # the mean over old heads and the weight (t - 1), whatever classes the task brings
    info = digits_benchmarks["task"]
    exps = info.benchmark.train_stream
    model = digits_model(info)
    plugins = _variant_plugins(alpha=0.5)
    for e in range(2):
        adapt_double(model, exps[e])
        for plugin in plugins.values():
            finish_experience(plugin, model, exps[e])
    adapt_double(model, exps[2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = first_inputs(info, 2)
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


def test_lwf_vandeven2022_in_a_class_il_strategy(digits_benchmarks):
    # the hooks record the classes: in the second experience of class-IL the weight is alpha
    # and the term spans all 10 outputs of the unmasked head, without T^2
    info = digits_benchmarks["class"]
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

    strat = naive_with(model, plugin)
    strat.plugins.append(Probe())
    for e in range(2):
        strat.train(exps[e])
    (weight, got, want, n_out), = seen
    assert weight == 0.7 and n_out == 10 and got == pytest.approx(want, rel=1e-6)


def test_lwf_variant_state_round_trip(digits_benchmarks):
    info = digits_benchmarks["class"]
    exps = info.benchmark.train_stream
    model = digits_model(info)
    plugin = LwFPlugin(variant="vandeven2022", scale_t2=False)
    finish_experience(plugin, model, exps[0])
    state = plugin.state_dict()
    assert state["config"]["variant"] == "vandeven2022"
    fresh = LwFPlugin(variant="vandeven2022", scale_t2=False)
    fresh.load_state_dict(copy.deepcopy(state))
    with torch.no_grad():
        model.head.linear.weight.add_(0.2)
    x = first_inputs(info, 1)
    assert fresh.distillation_term(model, x).item() == plugin.distillation_term(model, x).item()
    assert fresh.variant == "vandeven2022" and fresh.old_classes == {0: [0, 1]}
    with pytest.raises(ValueError, match=r"LwFPlugin.load_state_dict: the state was saved with "
                                         r"variant='vandeven2022', this plugin has "
                                         r"variant='standard'"):
        LwFPlugin(scale_t2=False).load_state_dict(copy.deepcopy(state))
    old = copy.deepcopy(state)  # saved before the option existed: the standard term
    del old["config"]["variant"]
    LwFPlugin(scale_t2=False).load_state_dict(old)


def test_lwf_teacher_carries_no_hooks_of_other_plugins(digits_benchmarks):
    info = digits_benchmarks["domain"]
    model = digits_model(info)
    calls = []

    class Recorder:  # another plugin's layer hook; its owner cannot even be deep-copied
        def __init__(self):
            self.gen = (i for i in range(3))

        def __call__(self, module, inputs, output):
            calls.append(module)

    model.backbone.layers[0].register_forward_hook(Recorder())
    plugin = LwFPlugin()
    finish_experience(plugin, model, info.benchmark.train_stream[0])
    assert all(not m._forward_hooks for m in plugin.teacher.modules())
    assert not any(p.requires_grad for p in plugin.teacher.parameters())
    assert not plugin.teacher.training
    plugin.teacher(first_inputs(info, 1))
    assert calls == []  # the student's hook did not fire on the teacher
    model(first_inputs(info, 1))
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


def test_lwf_before_backward_adds_weighted_term(digits_benchmarks):
    info = digits_benchmarks["domain"]
    exps = info.benchmark.train_stream
    model = digits_model(info)
    plugin = LwFPlugin(alpha=0.7)
    finish_experience(plugin, model, exps[0])
    finish_experience(plugin, model, exps[1])  # now training the third task: weight 0.7 * 2
    with torch.no_grad():
        model.backbone.layers[0].weight.mul_(1.5)
    x = first_inputs(info, 2)
    out = model(x)
    base = torch.tensor(0.25, dtype=torch.float64)
    strat = SimpleNamespace(model=model, mb_x=x, mb_output=out, mb_task_id=torch.zeros(16),
                            loss=base.clone(), device="cpu")
    plugin.before_backward(strat)
    kd = kd_loss(out, plugin.teacher(x), 2.0)
    assert strat.loss.item() == pytest.approx(0.25 + 1.4 * kd.item(), rel=1e-12)


def test_lwf_term_gradient_matches_finite_differences(digits_benchmarks):
    info = digits_benchmarks["task"]
    exps = info.benchmark.train_stream
    model = digits_model(info)
    plugin = LwFPlugin()
    for e in range(2):
        adapt_double(model, exps[e])
        finish_experience(plugin, model, exps[e])
    adapt_double(model, exps[2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = first_inputs(info, 2, n=8)
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


# ------------------------------------------------------------------------------ state

def test_state_round_trip_and_identical_continuation(digits_benchmarks):
    check_state_round_trip_and_identical_continuation(digits_benchmarks, "lwf")


def test_lwf_multihead_runs_the_student_backbone_once_per_step(digits_benchmarks):
    info = digits_benchmarks["task"]
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    plugin = LwFPlugin()
    strat = naive_with(model, plugin)
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

def test_lwf_forgets_less_than_naive_in_task_il(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "task"
    digits_cfg["optimizer"]["lr"] = 0.03  # large steps: naive's shared layers drift
    digits_cfg["strategy"]["epochs"] = 4
    digits_cfg["methods"] = ["naive", "lwf"]
    naive, lwf = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == lwf["status"] == "finished", (naive.get("error"), lwf.get("error"))
    assert naive["summary"]["bwt"] < -0.02
    assert lwf["summary"]["bwt"] > naive["summary"]["bwt"] + 0.02


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


def test_incompatible_models_are_reported(digits_benchmarks):
    class Wrapped(nn.Module):  # a per-task head inside a module that takes no task label
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, 0)

    info = digits_benchmarks["task"]
    plugin = LwFPlugin()
    model = Wrapped(digits_model(info))
    finish_experience(plugin, model, info.benchmark.train_stream[0])
    with pytest.raises(ValueError, match="not an Avalanche MultiTaskModule"):
        plugin.distillation_term(model, first_inputs(info, 1))


def test_registry_header():
    spec = MethodSpec.from_plugin(LwFPlugin)
    assert spec.scenarios == ("task", "domain", "class") and spec.paper and spec.summary
    LwFPlugin(**spec.defaults)  # the defaults are valid arguments
    assert set(spec.sweep) <= set(spec.defaults)
