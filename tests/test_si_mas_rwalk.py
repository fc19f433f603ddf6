"""SI, MAS and RWalk: importances against closed forms, penalty gradients against finite
differences, state round trips, and less forgetting than naive on split_digits."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.core.params import shared_parameters
from cl_plugins.core.path_integral import loss_gradients as _loss_gradients
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.registry import signature_defaults
from cl_plugins.regularization.mas import MASPlugin
from cl_plugins.regularization.rwalk import RWalkPlugin
from cl_plugins.regularization.si import SIPlugin

PLUGINS = (SIPlugin, MASPlugin, RWalkPlugin)


# ---------------------------------------------------------------------------- a tiny driver

class Vec(nn.Module):
    """One parameter vector theta; the 'task loss' is a function of theta alone."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())


def quad_loss(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return lambda model: 0.5 * (a * (model.theta - b).pow(2)).sum()


class Driver:
    """Calls the plugins' hooks in the order of Avalanche's training loop (SGDUpdate)."""

    def __init__(self, model, plugins, optimizer, experience=None):
        self.model, self.plugins, self.optimizer = model, list(plugins), optimizer
        self.device = torch.device("cpu")
        self.experience = experience
        self.loss = None

    def call(self, hook):
        for p in self.plugins:
            fn = getattr(p, hook, None)
            if fn is not None:
                fn(self)

    def step(self, task_loss):
        self.optimizer.zero_grad()
        self.loss = task_loss(self.model)
        self.call("before_backward")
        self.loss.backward()
        self.call("after_backward")
        self.call("before_update")
        self.optimizer.step()
        self.call("after_update")

    def task(self, task_loss, steps):
        self.call("before_training_exp")
        for _ in range(steps):
            self.step(task_loss)
        self.call("after_training_exp")


def digits_experience(n=12, d=5, classes=(0, 1), task=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    ds = TensorDataset(x, y, torch.full((n,), task))
    return SimpleNamespace(dataset=ds, classes_in_this_experience=list(classes),
                           task_labels=[task])


# ------------------------------------------------------------------------------------- SI

def test_si_path_integral_plain_sgd_matches_closed_form():
    a, b = np.array([1.0, 3.0, 0.5]), np.array([0.5, -1.0, 2.0])
    theta0, lr, steps, xi = np.array([2.0, 1.0, -1.0]), 0.1, 7, 0.1
    model = Vec(theta0)
    si = SIPlugin(si_lambda=2.0, xi=xi)
    drv = Driver(model, [si], torch.optim.SGD(model.parameters(), lr=lr))
    drv.task(quad_loss(a, b), steps)
    # theta_t - b = r^t (theta_0 - b), r = 1 - lr a; g_t = a (theta_t - b); step = -lr g_t
    r = 1 - lr * a
    omega = lr * a**2 * (theta0 - b) ** 2 * sum(r ** (2 * t) for t in range(steps))
    total = (r**steps - 1) * (theta0 - b)
    importance, anchor = si.quadratic_penalty.terms[0]
    np.testing.assert_allclose(importance["theta"].numpy(), omega / (total**2 + xi), rtol=1e-12)
    np.testing.assert_allclose(anchor["theta"].numpy(), b + r**steps * (theta0 - b), rtol=1e-12)
    assert si.omega is None  # reset for the next task


def test_si_with_momentum_uses_the_real_displacement():
    a, b, theta0, lr, mu, steps = np.array([2.0, 0.7]), np.array([0.0, 1.0]), \
        np.array([1.0, -2.0]), 0.05, 0.9, 6
    model = Vec(theta0)
    si = SIPlugin(xi=0.1)
    drv = Driver(model, [si], torch.optim.SGD(model.parameters(), lr=lr, momentum=mu))
    drv.call("before_training_exp")
    for _ in range(steps):
        drv.step(quad_loss(a, b))
    # heavy-ball by hand: v <- mu v + g; theta <- theta - lr v
    theta, v, omega, naive = theta0.copy(), np.zeros(2), np.zeros(2), np.zeros(2)
    for _ in range(steps):
        g = a * (theta - b)
        v = mu * v + g
        new = theta - lr * v
        omega += -g * (new - theta)
        naive += lr * g * g
        theta = new
    np.testing.assert_allclose(si.omega["theta"].numpy(), omega, rtol=1e-12)
    assert not np.allclose(omega, naive, rtol=1e-3)  # -lr g would be wrong under momentum


def _two_task_si(gradient, extra=()):
    model = Vec([1.0, -1.0, 0.5])
    si = SIPlugin(si_lambda=3.0, gradient=gradient)
    drv = Driver(model, [si, *extra], torch.optim.SGD(model.parameters(), lr=0.1))
    drv.task(quad_loss([1.0, 2.0, 0.5], [0.0, 1.0, -1.0]), 5)
    return model, si, drv


def test_si_task_and_full_gradients_differ_by_the_penalty_gradient():
    class OtherPenalty(QuadraticPenalty):  # another method's penalty, found by penalties_of
        pass

    other = SimpleNamespace(quadratic_penalty=OtherPenalty(coef=0.7))
    model, si, drv = _two_task_si("task", extra=[other])
    other.quadratic_penalty.add({"theta": torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)},
                                {"theta": torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)})
    task_loss = quad_loss([2.0, 0.5, 1.0], [1.0, 1.0, 1.0])
    drv.call("before_training_exp")
    drv.optimizer.zero_grad()
    drv.loss = task_loss(model)
    si.before_backward(drv)
    drv.loss = drv.loss + other.quadratic_penalty.loss({"theta": model.theta})
    drv.loss.backward()
    drv.call("after_backward")
    params = {"theta": model.theta}
    full = _loss_gradients(drv, params, "full", {"theta": torch.zeros_like(model.theta)})["theta"]
    (want_task,) = torch.autograd.grad(task_loss(model), model.theta)
    assert torch.allclose(si._steps.grads["theta"], want_task, atol=1e-12)
    pen = si.quadratic_penalty.loss(params) + other.quadratic_penalty.loss(params)
    (want_pen,) = torch.autograd.grad(pen, model.theta)
    assert want_pen.abs().min() > 1e-3  # the two gradients really differ
    assert torch.allclose(full - si._steps.grads["theta"], want_pen, atol=1e-12)
    # gradient="full" integrates exactly param.grad
    model_f, si_f, drv_f = _two_task_si("full")
    drv_f.call("before_training_exp")
    drv_f.optimizer.zero_grad()
    drv_f.loss = task_loss(model_f)
    si_f.before_backward(drv_f)
    drv_f.loss.backward()
    si_f.after_backward(drv_f)
    assert torch.allclose(si_f._steps.grads["theta"], model_f.theta.grad, atol=0)


def test_si_importance_accumulates_over_tasks():
    model, si, drv = _two_task_si("task")
    first = si.quadratic_penalty.terms[0][0]["theta"].clone()
    drv.call("before_training_exp")
    for _ in range(4):
        drv.step(quad_loss([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]))
    omega, start = si.omega["theta"].clone(), si.start["theta"].clone()
    drv.call("after_training_exp")
    second = omega / ((model.theta.detach() - start) ** 2 + si.xi)
    importance, anchor = si.quadratic_penalty.terms[0]
    assert len(si.quadratic_penalty) == 1
    assert torch.allclose(importance["theta"], first + second, atol=1e-12)
    assert torch.equal(anchor["theta"], model.theta.detach())


# ------------------------------------------------------------------------------------ MAS

def test_mas_importance_linear_model_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).double()
    exp = digits_experience(n=13, d=5, classes=(0, 1, 2))
    mas = MASPlugin(importance_batch_size=4)  # chunking must not change the result
    params = shared_parameters(model)
    x, W = exp.dataset.tensors[0], model.weight.detach()
    # d ||W x||^2 / dW = 2 (W x) x^T, averaged in absolute value over the samples
    want = (2 * (x @ W.T).unsqueeze(2) * x.unsqueeze(1)).abs().mean(0)
    got = mas.importance(model, params, exp.dataset, [0, 1, 2], 0, torch.device("cpu"))
    assert torch.allclose(got["weight"], want, atol=1e-12)
    # only class 1's output: rows of the other outputs get no importance
    got1 = mas.importance(model, params, exp.dataset, [1], 0, torch.device("cpu"))
    assert torch.allclose(got1["weight"][1], want[1], atol=1e-12)
    assert torch.all(got1["weight"][[0, 2]] == 0)
    mean = MASPlugin(output_reduction="mean").importance(model, params, exp.dataset, [0, 1, 2],
                                                         0, torch.device("cpu"))
    assert torch.allclose(mean["weight"], want / 3, atol=1e-12)
    assert model.training  # train mode restored


def test_mas_masked_head_ignores_masked_logits_and_accumulates():
    from cl_plugins.benchmarks import build_benchmark
    from cl_plugins.models import build_model

    torch.manual_seed(0)
    info = build_benchmark("split_digits", "class")
    model = build_model({"name": "mlp", "hidden": [6]}, info).double()
    exp0 = info.benchmark.train_stream[0]
    model.head.adaptation(exp0)  # classes of experience 0 unmasked, the other 8 at -1e4
    classes = sorted(exp0.classes_in_this_experience)
    x = torch.stack([exp0.dataset[i][0] for i in range(6)]).double()
    exp = SimpleNamespace(dataset=TensorDataset(x, torch.zeros(6, dtype=torch.long),
                                                torch.zeros(6, dtype=torch.long)),
                          classes_in_this_experience=classes, task_labels=[0])
    mas = MASPlugin(mas_lambda=2.0)
    drv = Driver(model, [mas], torch.optim.SGD(model.parameters(), lr=0.1), exp)
    drv.call("after_training_exp")
    params = shared_parameters(model)
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for i in range(6):  # a plain loop over samples, using the unmasked logits only
        out = model(x[i:i + 1], 0)
        assert (out == -1e4).sum() == 8
        grads = torch.autograd.grad(out[:, classes].pow(2).sum(), list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            want[n] += g.abs() / 6
    model.train()
    importance = mas.quadratic_penalty.terms[0][0]
    for n in params:
        assert torch.allclose(importance[n], want[n], atol=1e-10), n
    drv.call("after_training_exp")  # a second task: importances add up
    for n in params:
        assert torch.allclose(mas.quadratic_penalty.terms[0][0][n], 2 * want[n], atol=1e-10)
    assert mas.seen_classes == classes


# ---------------------------------------------------------------------------------- RWalk

def _rwalk_hand(theta0, a, b, lr, steps, delta_t, alpha, eps, fisher0=None):
    """RWalk's Fisher and scores for plain SGD on 0.5 sum a (theta - b)^2, step by step."""
    theta, fisher = theta0.copy(), np.zeros_like(theta0) if fisher0 is None else fisher0.copy()
    score, dl, sq, ckpt, k = np.zeros_like(theta0), 0.0, 0.0, theta0.copy(), 0
    for t in range(steps):
        g = a * (theta - b)
        new = theta - lr * g
        dl, sq, k = dl - g * (new - theta), sq + g * g, k + 1
        theta = new
        if k == delta_t or t == steps - 1:
            fisher = alpha * sq / k + (1 - alpha) * fisher
            score += np.maximum(dl / (0.5 * fisher * (theta - ckpt) ** 2 + eps), 0)
            dl, sq, ckpt, k = 0.0, 0.0, theta.copy(), 0
    return theta, fisher, score


@pytest.mark.parametrize("delta_t, steps", [(1, 2), (2, 2), (2, 5)])
def test_rwalk_fisher_and_scores_by_hand(delta_t, steps):
    a, b, theta0 = np.array([1.0, 4.0, 0.2]), np.array([0.0, 0.5, 1.0]), np.array([1.0, 1.0, -2.0])
    lr, alpha, eps = 0.1, 0.9, 1e-3
    model = Vec(theta0)
    rw = RWalkPlugin(ewc_lambda=1.0, alpha=alpha, delta_t=delta_t, eps=eps)
    drv = Driver(model, [rw], torch.optim.SGD(model.parameters(), lr=lr))
    drv.task(quad_loss(a, b), steps)
    theta, fisher, score = _rwalk_hand(theta0, a, b, lr, steps, delta_t, alpha, eps)
    if (delta_t, steps) == (1, 2):  # the 2-step example written out
        g0 = a * (theta0 - b)
        t1 = theta0 - lr * g0
        g1 = a * (t1 - b)
        f1, f2 = alpha * g0**2, alpha * g1**2 + (1 - alpha) * alpha * g0**2
        s = (lr * g0**2) / (0.5 * f1 * (lr * g0) ** 2 + eps) + \
            (lr * g1**2) / (0.5 * f2 * (lr * g1) ** 2 + eps)
        np.testing.assert_allclose(fisher, f2, rtol=1e-12)
        np.testing.assert_allclose(score, s, rtol=1e-12)
    np.testing.assert_allclose(rw.fisher["theta"].numpy(), fisher, rtol=1e-12)
    np.testing.assert_allclose(rw.scores["theta"].numpy(), score, rtol=1e-12)
    importance, anchor = rw.quadratic_penalty.terms[0]
    np.testing.assert_allclose(importance["theta"].numpy(),
                               fisher / fisher.max() + score / score.max(), rtol=1e-12)
    np.testing.assert_allclose(anchor["theta"].numpy(), theta, rtol=1e-12)


def test_rwalk_second_task_averages_scores_and_uses_task_gradient():
    a, b, theta0 = np.array([1.0, 2.0]), np.array([0.0, 1.0]), np.array([1.0, -1.0])
    model = Vec(theta0)
    rw = RWalkPlugin(ewc_lambda=5.0, delta_t=2, normalize="minmax")
    drv = Driver(model, [rw], torch.optim.SGD(model.parameters(), lr=0.1))
    drv.task(quad_loss(a, b), 4)
    first_scores, fisher = rw.scores["theta"].clone(), rw.fisher["theta"].clone()
    a2, b2 = torch.tensor([0.5, 3.0], dtype=torch.float64), torch.tensor([2.0, 2.0],
                                                                       dtype=torch.float64)
    task2 = quad_loss(a2, b2)
    drv.call("before_training_exp")
    sq = []
    for step in range(4):
        theta = model.theta.detach().clone()
        g_task = a2 * (theta - b2)  # the penalty's gradient is not part of it
        if step:  # away from the anchor, the penalty's gradient is not negligible
            pen = rw.quadratic_penalty.gradient({"theta": model.theta})["theta"]
            assert pen.abs().min() > 1e-4
        sq.append(g_task**2)
        drv.step(task2)
        if step == 0:
            assert torch.allclose(rw.interval_sq_grad["theta"], sq[0], atol=1e-12)
        if step == 1:  # the interval closes: EWC++ update of the Fisher carried over from task 1
            assert torch.allclose(rw.fisher["theta"], 0.9 * (sq[0] + sq[1]) / 2 + 0.1 * fisher,
                                  atol=1e-12)
    new_scores = rw.task_scores["theta"].clone()
    assert rw.interval_steps == 0
    drv.call("after_training_exp")
    assert torch.allclose(rw.scores["theta"], (first_scores + new_scores) / 2, atol=1e-12)
    s, f = rw.scores["theta"], rw.fisher["theta"]
    mm = (lambda v: (v - v.min()) / (v.max() - v.min() + 1e-32))
    assert torch.allclose(rw.quadratic_penalty.terms[0][0]["theta"], mm(f) + mm(s), atol=1e-12)
    assert len(rw.quadratic_penalty) == 1  # replaced, not accumulated
    assert torch.equal(rw.quadratic_penalty.terms[0][1]["theta"], model.theta.detach())


# ------------------------------------------------------------------- penalties, state, args

def _trained(cls, **kwargs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    exp = digits_experience(n=10, d=5, classes=(0, 1, 2))
    plugin = cls(**kwargs)
    drv = Driver(model, [plugin], torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5), exp)
    x, y = exp.dataset.tensors[0], exp.dataset.tensors[1]
    task = (lambda m: nn.functional.cross_entropy(m(x), y))
    drv.task(task, 7)
    return model, plugin, drv, task


@pytest.mark.parametrize("cls", PLUGINS)
def test_penalty_gradient_matches_finite_differences(cls):
    model, plugin, drv, _ = _trained(cls)
    with torch.no_grad():  # move away from the anchor
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = shared_parameters(model)
    drv.loss = torch.zeros((), dtype=torch.float64)
    plugin.before_backward(drv)
    grads = torch.autograd.grad(drv.loss, list(params.values()))
    closed = plugin.quadratic_penalty.gradient(params)
    h = 1e-6
    for (n, p), g in zip(params.items(), grads):
        assert torch.allclose(g, closed[n], atol=1e-10)
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            with torch.no_grad():
                old = p[idx].item()
                p[idx] = old + h
                up = plugin.quadratic_penalty.loss(params).item()
                p[idx] = old - h
                down = plugin.quadratic_penalty.loss(params).item()
                p[idx] = old
            assert (up - down) / (2 * h) == pytest.approx(g[idx].item(), rel=1e-5, abs=1e-9)
    assert drv.loss.item() > 0


@pytest.mark.parametrize("cls", PLUGINS)
def test_state_round_trip_resumes_identically(cls):
    model, plugin, drv, task = _trained(cls, **({"delta_t": 3} if cls is RWalkPlugin else {}))
    fresh = cls(**({"delta_t": 3} if cls is RWalkPlugin else {}))
    fresh.load_state_dict(copy.deepcopy(plugin.state_dict()))
    torch.manual_seed(2)  # evaluate both penalties away from the anchor
    moved = {n: p.detach() + 0.1 * torch.randn_like(p)
             for n, p in shared_parameters(model).items()}
    value = plugin.quadratic_penalty.loss(moved).item()
    assert value > 0 and value == fresh.quadratic_penalty.loss(moved).item()
    twin = copy.deepcopy(model)
    runs = []
    for m, p in ((model, plugin), (twin, fresh)):
        d = Driver(m, [p], torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5), drv.experience)
        d.task(task, 5)
        runs.append((m, p))
    (m1, p1), (m2, p2) = runs
    for a_, b_ in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a_, b_)
    s1, s2 = p1.state_dict(), p2.state_dict()
    for (i1, a1), (i2, a2) in zip(s1["penalty"]["terms"], s2["penalty"]["terms"]):
        for n in i1:
            assert torch.equal(i1[n], i2[n]) and torch.equal(a1[n], a2[n])


@pytest.mark.parametrize("cls", (SIPlugin, RWalkPlugin))
def test_state_round_trip_in_the_middle_of_a_task(cls):
    kwargs = {"delta_t": 2} if cls is RWalkPlugin else {}
    model, plugin, drv, task = _trained(cls, **kwargs)
    drv.call("before_training_exp")
    for _ in range(3):  # RWalk: one closed interval and one open
        drv.step(task)
    twin, fresh = copy.deepcopy(model), cls(**kwargs)
    fresh.load_state_dict(copy.deepcopy(plugin.state_dict()))
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.5)
    opt2.load_state_dict(copy.deepcopy(drv.optimizer.state_dict()))
    d2 = Driver(twin, [fresh], opt2, drv.experience)
    d2.call("before_training_exp")
    for d in (drv, d2):
        for _ in range(3):
            d.step(task)
        d.call("after_training_exp")
    i1, i2 = plugin.quadratic_penalty.terms[0][0], fresh.quadratic_penalty.terms[0][0]
    for n in i1:
        assert torch.equal(i1[n], i2[n])


def test_load_rejects_other_hyperparameters():
    _, plugin, _, _ = _trained(SIPlugin)
    with pytest.raises(ValueError, match="coef"):
        SIPlugin(si_lambda=1.0).load_state_dict(plugin.state_dict())


@pytest.mark.parametrize("cls, kwargs, pattern", [
    (SIPlugin, {"si_lambda": -1.0}, r"si_lambda must be in \[0, inf\)"),
    (SIPlugin, {"xi": 0.0}, r"xi must be in \(0, inf\)"),
    (SIPlugin, {"gradient": "total"}, r"gradient must be one of 'task', 'full'"),
    (MASPlugin, {"mas_lambda": "big"}, r"mas_lambda must be a number"),
    (MASPlugin, {"outputs": "all"}, r"outputs must be one of 'experience', 'seen'"),
    (MASPlugin, {"output_reduction": "max"}, r"output_reduction must be one of"),
    (MASPlugin, {"importance_batch_size": 0}, r"importance_batch_size must be in \[1, inf\)"),
    (RWalkPlugin, {"ewc_lambda": -0.1}, r"ewc_lambda must be in \[0, inf\)"),
    (RWalkPlugin, {"alpha": 0.0}, r"alpha must be in \(0, 1\]"),
    (RWalkPlugin, {"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
    (RWalkPlugin, {"delta_t": 2.5}, r"delta_t must be an integer"),
    (RWalkPlugin, {"eps": -1.0}, r"eps must be in \(0, inf\)"),
    (RWalkPlugin, {"normalize": "sum"}, r"normalize must be one of 'max', 'minmax'"),
])
def test_bad_arguments_are_named(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


def test_registry_headers():
    for cls in PLUGINS:
        defaults = signature_defaults(cls)
        cls(**defaults)
        assert cls.SCENARIOS == ("task", "domain", "class") and not cls.NEEDS_TASK_LABELS
        assert set(cls.SWEEP) <= set(defaults) and cls.PAPER and cls.SUMMARY
    # the protocol defaults the docstrings name (S1 task-IL for SI and MAS, B1 for RWalk)
    assert signature_defaults(SIPlugin) == {"si_lambda": 300.0, "xi": 0.1, "gradient": "task"}
    assert signature_defaults(MASPlugin)["mas_lambda"] == 1.0
    assert signature_defaults(RWalkPlugin) == {"ewc_lambda": 0.1, "alpha": 0.9, "delta_t": 10,
                                               "eps": 1e-3, "normalize": "max"}


# ------------------------------------------------------------------------------ end to end

def _check_registered():
    """The runner builds these methods from the built-in registry: it must hold these classes."""
    from cl_plugins.registry import get_method

    for cls in PLUGINS:
        spec = get_method(cls.METHOD_NAME)
        assert spec.factory is cls and spec.defaults == signature_defaults(cls)


def test_less_forgetting_than_naive_domain_il(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    digits_cfg["benchmark"]["scenario"] = "domain"
    digits_cfg["loggers"]["json"] = False
    digits_cfg["methods"] = [
        "naive",
        {"name": "si", "params": {"si_lambda": 1000.0}},
        {"name": "mas", "params": {"mas_lambda": 10.0}},
        {"name": "rwalk", "params": {"ewc_lambda": 30.0}},
    ]
    _check_registered()
    runs = run_experiment(digits_cfg, echo=lambda *a: None)
    assert [r["status"] for r in runs] == ["finished"] * 4, [r.get("error") for r in runs]
    naive, *methods = runs
    assert naive["summary"]["bwt"] < -0.05  # naive clearly forgets here
    for r in methods:
        assert r["summary"]["bwt"] > naive["summary"]["bwt"] + 0.03, r["method"]
        assert r["summary"]["acc"] > naive["summary"]["acc"] - 0.02, r["method"]


def test_all_three_compose_on_a_multihead_model(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    digits_cfg["strategy"]["epochs"] = 1
    digits_cfg["benchmark"]["n_experiences"] = 2
    digits_cfg["loggers"]["json"] = False
    digits_cfg["methods"] = [{"name": "si", "plus": [{"name": "mas"}, {"name": "rwalk"}]}]
    _check_registered()
    (r,) = run_experiment(digits_cfg, echo=lambda *a: None)
    assert r["status"] == "finished", r.get("error")
    assert r["summary"]["acc"] > 0.5  # 5 classes per task: chance is 0.2


def test_mas_says_when_a_class_has_no_output_unit():
    model = nn.Linear(5, 2, bias=False).double()
    exp = digits_experience(n=4, d=5, classes=(0, 3))
    with pytest.raises(ValueError, match="class 3 of the experience has no output unit; the model "
                                         "gives 2 outputs"):
        MASPlugin().importance(model, shared_parameters(model), exp.dataset, [0, 3], 0,
                               torch.device("cpu"))
