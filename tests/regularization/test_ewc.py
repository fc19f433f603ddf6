"""EWC (Kirkpatrick et al. 2017): closed-form Fisher, penalty gradient, bookkeeping (also
against online EWC), state, forgetting (EWC and online EWC against naive), arguments."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from torch.utils.data import TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.params import shared_parameters
from cl_plugins.models import build_model
from cl_plugins.registry import signature_defaults
from cl_plugins.regularization.ewc import FISHER_TYPES, EWCPlugin
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

from helpers import (check_ewc_penalty_value_and_gradient, check_ewc_registry_header,
                     check_ewc_state_round_trip)


def _linear_problem(n=37, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    model = torch.nn.Linear(d, c).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return model, TensorDataset(x, y, torch.zeros(n, dtype=torch.long)), x, y


def _closed_form(model, x, y, fisher):
    """Softmax regression: d(-log p_c)/dW = (p - e_c) x^T, d/db = p - e_c."""
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
    eye = torch.eye(p.shape[1], dtype=torch.float64)
    if fisher == "exact":  # sum_c p_c ((p - e_c) x)^2, mean over samples
        d = p[:, None, :] - eye[None]  # [n, label c, output k]: p_k - [c == k]
        fw = (p[:, :, None, None] * (d[:, :, :, None] * x[:, None, None, :]) ** 2).sum(1)
        fb = (p[:, :, None] * d ** 2).sum(1)
        return {"weight": fw.mean(0), "bias": fb.mean(0)}
    label = y if fisher == "empirical" else p.argmax(1)
    d = p - eye[label]
    return {"weight": ((d[:, :, None] * x[:, None, :]) ** 2).mean(0), "bias": (d ** 2).mean(0)}


@pytest.mark.parametrize("fisher", ["empirical", "exact", "predicted"])
def test_fisher_matches_closed_form_softmax_regression(fisher):
    model, ds, x, y = _linear_problem()
    got = EWCPlugin(fisher=fisher, fisher_batch_size=10).estimate_fisher(model, ds)
    want = _closed_form(model, x, y, fisher)
    assert set(got) == {"weight", "bias"}
    for n in want:
        assert got[n].dtype == torch.float64
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)
    # the three estimators differ on this (not perfectly confident) model
    other = _closed_form(model, x, y, "exact" if fisher != "exact" else "empirical")
    assert not torch.allclose(got["weight"], other["weight"], rtol=1e-3)


def test_true_fisher_is_an_unbiased_sample_of_the_exact_one():
    model, ds, x, y = _linear_problem(n=500)
    exact = _closed_form(model, x, y, "exact")["weight"]
    runs = [EWCPlugin(fisher="true", seed=s, fisher_batch_size=500).estimate_fisher(
        model, ds)["weight"] for s in range(40)]
    assert not torch.allclose(runs[0], runs[1])  # labels really are sampled
    one = EWCPlugin(fisher="true", seed=0).estimate_fisher(model, ds)["weight"]
    torch.testing.assert_close(one, runs[0], rtol=1e-12, atol=0)  # same seed, same labels
    err = (torch.stack(runs).mean(0) - exact).abs().max() / exact.abs().max()
    single = (runs[0] - exact).abs().max() / exact.abs().max()
    assert err < 0.05 and single > 2 * err  # the mean over 40 draws converges to the exact F


@pytest.mark.parametrize("fisher", FISHER_TYPES)
def test_fisher_does_not_depend_on_fisher_batch_size(fisher):
    model, ds, _, _ = _linear_problem(n=23)
    ref = EWCPlugin(fisher=fisher, fisher_batch_size=1, fisher_samples=17,
                    seed=3).estimate_fisher(model, ds)
    for bs in (4, 64):
        got = EWCPlugin(fisher=fisher, fisher_batch_size=bs, fisher_samples=17,
                        seed=3).estimate_fisher(model, ds)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-15)


def test_fisher_samples_draws_a_seeded_subset():
    # x_n = e_n: sample n alone reaches weight column n, so the subset can be read off
    n = 12
    x = torch.eye(n, dtype=torch.float64)
    y = torch.arange(n) % 2
    model = torch.nn.Linear(n, 2).double()
    ds = TensorDataset(x, y, torch.zeros(n, dtype=torch.long))
    per_sample = _closed_form(model, x, y, "empirical")["weight"] * n  # column n: sample n
    plugin = EWCPlugin(fisher="empirical", fisher_samples=5, seed=1)
    first = plugin.estimate_fisher(model, ds)["weight"]
    used = (first.abs().sum(0) > 0).nonzero().flatten()
    assert len(used) == 5
    torch.testing.assert_close(first[:, used], per_sample[:, used] / 5, rtol=1e-12, atol=0)
    second = plugin.estimate_fisher(model, ds)["weight"]  # the generator moved on
    assert not torch.equal((second.abs().sum(0) > 0), (first.abs().sum(0) > 0))
    again = EWCPlugin(fisher="empirical", fisher_samples=5, seed=1).estimate_fisher(model, ds)
    torch.testing.assert_close(again["weight"], first, rtol=0, atol=0)
    full = EWCPlugin(fisher="empirical", fisher_samples=10**6).estimate_fisher(model, ds)
    torch.testing.assert_close(full["weight"], per_sample / n, rtol=1e-12, atol=0)


def _loop_fisher(model, params, x, y, t, fisher):
    """Reference: one ordinary backward pass per sample (and per label for 'exact')."""
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        logits = model(x[i:i + 1], int(t[i]))
        p = F.softmax(logits.detach(), dim=1)[0]
        labels = [(c, p[c]) for c in range(len(p)) if p[c] > 0] if fisher == "exact" else \
            [(int(y[i]), 1.0)]
        for c, w in labels:
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1], int(t[i])), torch.tensor([c])).backward()
            for n, q in params.items():
                out[n] += w * q.grad ** 2
    return {n: o / len(x) for n, o in out.items()}


@pytest.mark.parametrize("scenario,fisher", [("task", "empirical"), ("class", "exact"),
                                             ("task", "predicted")])
def test_fisher_on_runner_models_matches_a_per_sample_loop(scenario, fisher):
    torch.manual_seed(0)
    info = build_benchmark("split_digits", scenario)
    model = build_model({"name": "mlp", "hidden": [6]}, info)
    for e in list(info.benchmark.train_stream)[:2]:  # adds heads (task) / unmasks classes
        avalanche_model_adaptation(model, e)
    model = model.double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (9,), generator=g)
    t = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    if scenario == "class":
        y, t = y + 2 * t, torch.zeros_like(t)  # class-IL: no task labels, 4 seen classes
    params = shared_parameters(model)
    if fisher == "predicted":  # the loop's label is each sample's arg-max under its own head
        with torch.no_grad():
            y = torch.stack([model(x[i:i + 1], int(t[i]))[0].argmax() for i in range(len(x))])
    want = _loop_fisher(model, params, x, y, t, fisher)
    model.train()
    got = EWCPlugin(fisher=fisher, fisher_batch_size=4).estimate_fisher(
        model, TensorDataset(x, y, t))
    assert model.training  # train mode restored
    assert set(got) == set(params)
    if scenario == "task":  # the old heads are excluded, the backbone is all that is shared
        assert all(n.startswith("backbone.") for n in got)
    else:  # the single masked head is shared; its unseen classes get no Fisher
        assert "head.linear.weight" in got
        assert torch.all(got["head.linear.weight"][4:] == 0)
        assert torch.all(got["head.linear.weight"][:4].sum(1) > 0)
    for n in want:
        assert torch.isfinite(got[n]).all()
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("make", [lambda: EWCPlugin(ewc_lambda=3.0),
                                  lambda: EWCPlugin(ewc_lambda=3.0, mode="accumulate")])
def test_penalty_value_and_gradient(make):
    check_ewc_penalty_value_and_gradient(make)


def test_separate_and_accumulate_agree_after_one_task():
    # one finished task: both modes hold the same single term, so value and gradient agree
    model, ds, _, _ = _linear_problem(seed=3)
    plugins = [EWCPlugin(ewc_lambda=7.0, fisher="predicted"),
               EWCPlugin(ewc_lambda=7.0, fisher="predicted", mode="accumulate"),
               OnlineEWCPlugin(ewc_lambda=7.0, gamma=0.3, fisher="predicted")]
    for plugin in plugins:
        plugin.after_training_exp(_fake_strategy(model, ds))
    g = torch.Generator().manual_seed(4)
    params = {n: (p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
              .requires_grad_() for n, p in model.named_parameters()}
    values, grads = [], []
    for plugin in plugins:
        v = plugin.penalty(params)
        values.append(v.item())
        grads.append(torch.autograd.grad(v, list(params.values())))
    assert values[0] > 0 and values[0] == values[1] == values[2]
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [1.0, 1e-10, 1e-25])
def test_collapsed_penalty_equals_the_sum_of_terms_in_float32(scale):
    # the S1 regime: float32 parameters, Fisher entries of ~1e-8 and below, anchors 1e-3 apart
    g = torch.Generator().manual_seed(5)
    shape = (40, 30)
    theta = (0.05 * torch.randn(shape, generator=g)).requires_grad_()
    plugin = EWCPlugin(ewc_lambda=200.0)
    for _ in range(3):
        fisher = scale * torch.rand(shape, generator=g) ** 4
        fisher[0, :5] = 0.0
        anchor = theta.detach() + 1e-3 * torch.randn(shape, generator=g)
        plugin.quadratic_penalty.add({"w": fisher}, {"w": anchor})
    value = plugin.penalty({"w": theta})
    (grad,) = torch.autograd.grad(value, [theta])
    assert value.dtype == grad.dtype == torch.float32
    th64 = theta.detach().double().requires_grad_()
    ref = sum(100.0 * (f["w"].double() * (th64 - a["w"].double()) ** 2).sum()
              for f, a in plugin.quadratic_penalty.terms)
    (ref_grad,) = torch.autograd.grad(ref, [th64])
    assert ref.item() > 0
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)
    # float32 rounding of the centre c: ~1e-6 relative on (theta - c), far below any effect
    assert float((grad.double() - ref_grad).norm() / ref_grad.norm()) < 1e-5
    plain = plugin.quadratic_penalty.reference_loss({"w": theta})
    assert value.item() == pytest.approx(plain.item(), rel=1e-5)


def _fake_strategy(model, ds):
    return SimpleNamespace(model=model, experience=SimpleNamespace(dataset=ds), loss=None)


def test_separate_accumulate_and_online_bookkeeping():
    model, ds1, _, _ = _linear_problem(seed=1)
    _, ds2, _, _ = _linear_problem(seed=2)
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    f1 = EWCPlugin(fisher="exact").estimate_fisher(model, ds1)
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(0.3)
    theta2 = {n: p.detach().clone() for n, p in model2.named_parameters()}
    f2 = EWCPlugin(fisher="exact").estimate_fisher(model2, ds2)

    plugins = {"separate": EWCPlugin(fisher="exact"),
               "accumulate": EWCPlugin(fisher="exact", mode="accumulate"),
               "online": OnlineEWCPlugin(fisher="exact", gamma=0.5)}
    for plugin in plugins.values():
        plugin.after_training_exp(_fake_strategy(model, ds1))
        plugin.after_training_exp(_fake_strategy(model2, ds2))

    def close(a, b):
        for n in b:
            torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=0)

    sep = plugins["separate"].quadratic_penalty.terms
    assert len(sep) == 2
    close(sep[0][0], f1), close(sep[0][1], theta1), close(sep[1][0], f2), close(sep[1][1], theta2)
    (acc,) = plugins["accumulate"].quadratic_penalty.terms
    close(acc[0], {n: f1[n] + f2[n] for n in f1}), close(acc[1], theta2)
    (onl,) = plugins["online"].quadratic_penalty.terms
    close(onl[0], {n: 0.5 * f1[n] + f2[n] for n in f1}), close(onl[1], theta2)

    # the penalty is added to the loss, never replaces it; separate = sum of its two terms
    params = dict(model.named_parameters())
    st = _fake_strategy(model, ds1)
    st.loss = torch.tensor(2.0, dtype=torch.float64)
    plugins["separate"].before_backward(st)
    want = 2.0 + sum(0.5 * 1e5 * (f[n] * (params[n] - a[n]) ** 2).sum()
                     for f, a in ((f1, theta1), (f2, theta2)) for n in f1)
    torch.testing.assert_close(st.loss, want, rtol=1e-10, atol=0)


def test_shape_change_raises_at_the_next_experience():
    model, ds, _, _ = _linear_problem()
    plugin = EWCPlugin()
    plugin.after_training_exp(_fake_strategy(model, ds))
    with pytest.raises(ValueError, match=r"'weight' changed shape from \(3, 4\) to \(5, 4\)"):
        plugin.before_training_exp(_fake_strategy(torch.nn.Linear(4, 5).double(), ds))


def test_state_round_trip_resumes_identically():
    check_ewc_state_round_trip(
        lambda: EWCPlugin(ewc_lambda=50.0, fisher="true", fisher_samples=100, seed=5))


def _run_registered(cfg, methods):
    """Run ``methods`` through the runner, which finds them in the built-in registry."""
    from cl_plugins.experiment.runner import run_experiment
    from cl_plugins.registry import get_method

    for cls in (EWCPlugin, OnlineEWCPlugin):  # the runner builds exactly these classes
        spec = get_method(cls.METHOD_NAME)
        assert spec.factory is cls and spec.defaults == signature_defaults(cls)
    cfg["methods"] = methods
    return run_experiment(cfg, echo=lambda *a: None)


def test_less_forgetting_than_naive_on_split_digits(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "domain"  # one shared head: naive forgets clearly
    runs = _run_registered(digits_cfg, [
        "naive",
        {"name": "ewc", "params": {"ewc_lambda": 100.0}},
        {"name": "online_ewc", "params": {}},  # the S1 defaults: lambda 800, arg-max Fisher
    ])
    naive, ewc, online = runs
    assert all(r["status"] == "finished" for r in runs), [r.get("error") for r in runs]
    assert naive["summary"]["bwt"] < -0.05
    assert ewc["summary"]["bwt"] > naive["summary"]["bwt"] + 0.03
    assert online["summary"]["bwt"] > naive["summary"]["bwt"] + 0.03


@pytest.mark.parametrize("kwargs,match", [
    ({"ewc_lambda": -1.0}, r"ewc_lambda must be in \[0, inf\)"),
    ({"ewc_lambda": "big"}, "ewc_lambda must be a number"),
    ({"mode": "online"}, "mode must be one of 'separate', 'accumulate'.*OnlineEWC"),
    ({"mode": "both"}, "mode must be one of"),
    ({"fisher": "fim"}, "fisher must be one of 'exact', 'true', 'empirical'"),
    ({"fisher_samples": 0}, r"fisher_samples must be in \[1, inf\)"),
    ({"fisher_samples": 2.5}, "fisher_samples must be an integer"),
    ({"fisher_batch_size": 0}, r"fisher_batch_size must be in \[1, inf\)"),
    ({"seed": -1}, r"seed must be in \[0, inf\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWCPlugin(**kwargs)


def test_registry_header():
    check_ewc_registry_header(EWCPlugin)
