"""OGD (Farajtabar et al., AISTATS 2020): exact float64 checks of the stored basis and the
projection, the first-order guarantee on a linear model, state round trip, end-to-end."""

from __future__ import annotations

import copy
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from avalanche.models import MultiHeadClassifier
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.params import shared_parameters
from cl_plugins.models import build_model
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.models.mlp import MLP
from cl_plugins.core import step_operators
from cl_plugins.projection.ogd import OGDPlugin, output_gradients
from cl_plugins.registry import signature_defaults

from helpers import continue_both, naive_sgd


def _data(n, d=5, c=3, seed=0, task=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y, TensorDataset(x, y, torch.full((n,), task, dtype=torch.long))


def _mlp(seed=0, d=5, h=8, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()


def _strategy(model, ds=None, task=0, optimizer=None):
    return SimpleNamespace(model=model, optimizer=optimizer,
                           experience=SimpleNamespace(dataset=ds, task_labels=[task]))


def _autograd_rows(model, x, y, variant, task=None):
    """Hand-computed output gradients, one autograd call per sample and output."""
    params = list(shared_parameters(model).values())
    rows = []
    for i in range(len(x)):
        out = model(x[i:i + 1]) if task is None else model(x[i:i + 1], task)
        outputs = {"gtl": [out[0, y[i]]], "ave": [out[0].mean()],
                   "all": [out[0, j] for j in range(out.shape[1])]}[variant]
        for o in outputs:
            grads = torch.autograd.grad(o, params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _perturb(model, scale=0.3, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("variant", ["gtl", "ave", "all"])
def test_output_gradients_equal_autograd_per_sample(variant):
    model = _mlp()
    x, y, _ = _data(6)
    got = output_gradients(model, shared_parameters(model), x, y, variant)
    want = _autograd_rows(model, x, y, variant)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


STORAGES = pytest.mark.parametrize("storage", ["dense", "factored"])


@STORAGES
@pytest.mark.parametrize("variant", ["gtl", "all"])
def test_basis_orthonormal_and_projection_equals_brute_force(variant, storage):
    model = _mlp()  # 75 parameters
    x1, y1, ds1 = _data(10, seed=1)
    x2, y2, ds2 = _data(10, seed=2)
    plugin = OGDPlugin(variant=variant, memory_per_task=10, grad_batch_size=4, storage=storage)
    plugin.after_training_exp(_strategy(model, ds1))
    g1 = _autograd_rows(model, x1, y1, variant)
    _perturb(model)  # task 2's gradients are taken at other weights
    plugin.after_training_exp(_strategy(model, ds2))
    g2 = _autograd_rows(model, x2, y2, variant)
    raw = torch.cat([g1, g2])  # [k, 75]
    s = plugin.basis
    assert s.dtype == torch.float64 and s.shape[0] == 75
    assert s.shape[1] == torch.linalg.matrix_rank(raw).item() == min(raw.shape)
    assert plugin.directions_per_exp == [len(g1), s.shape[1] - len(g1)]
    torch.testing.assert_close(s.T @ s, torch.eye(s.shape[1], dtype=torch.float64),
                               rtol=0, atol=1e-12)

    g = torch.randn(75, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    projected = plugin.project(g)
    # orthogonal to every stored (raw) output gradient...
    assert (raw @ projected).abs().max() < 1e-12 * g.norm()
    # ...and equal to the residual of the least-squares fit of g by those gradients
    coef = torch.linalg.lstsq(raw.T, g.unsqueeze(1)).solution
    brute = g - (raw.T @ coef).squeeze(1)
    torch.testing.assert_close(projected, brute, rtol=0, atol=1e-12)
    assert projected.norm() > 0.5 * g.norm()  # 75 - k dimensions left: not a trivial zero

    # the hook does the same, in place on the parameters' .grad
    params = list(model.parameters())
    offs = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for p, a, b in zip(params, offs[:-1], offs[1:]):
        p.grad = g[a:b].view_as(p).clone()
    st = _strategy(model)
    plugin.before_training_exp(st)
    plugin.before_update(st)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, brute, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_rows", [1, 3, 1000])
def test_blocked_step_equals_the_projection(monkeypatch, block_rows):
    """The step reads S^T in blocks of rows (sized for a CPU cache); any block size gives the
    projection of the whole gradient, also when a parameter has no gradient (taken as 0)."""
    model = _mlp()
    plugin = OGDPlugin(memory_per_task=10, grad_batch_size=4, storage="dense")
    for seed in (1, 2):
        plugin.after_training_exp(_strategy(model, _data(10, seed=seed)[2]))
        _perturb(model)
    assert plugin.n_directions == 20
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    monkeypatch.setattr(step_operators, "STEP_BLOCK_BYTES", block_rows * n * 8)
    g = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    offs = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for p, a, b in zip(params, offs[:-1], offs[1:]):
        p.grad = g[a:b].view_as(p).clone()
    params[1].grad = None
    g[offs[1]:offs[2]] = 0
    st = _strategy(model)
    plugin.before_training_exp(st)
    plugin.before_update(st)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, plugin.project(g), rtol=0, atol=1e-12)
    assert (plugin.basis.T @ got).abs().max() < 1e-12 * g.norm()
    assert got.norm() > 0.5 * g.norm()


@STORAGES
def test_dependent_vectors_are_dropped_and_count_is_the_rank(storage):
    # A bias-free linear model: the gtl gradient of sample i is e_{y_i} x_i^T. All labels 0 and
    # inputs in a 2-D subspace: 8 samples span 2 directions; "all" spans 3 classes x 2.
    lin = nn.Linear(4, 3, bias=False).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 4, generator=g, dtype=torch.float64)
    ds = TensorDataset(x, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    for variant, rank in (("gtl", 2), ("all", 6)):
        plugin = OGDPlugin(variant=variant, memory_per_task=8, storage=storage)
        plugin.after_training_exp(_strategy(lin, ds))
        assert plugin.directions_per_exp == [rank] and plugin.n_directions == rank
        # dense: S (12 x rank); factored: inputs (4) and output gradients (3) per direction,
        # and R and K^-1 (rank x rank), float64
        assert plugin.memory_bytes == (12 * rank * 8 if storage == "dense" else
                                       (4 + 3) * rank * 8 + 2 * rank * rank * 8)
        # the same data again adds nothing
        plugin.after_training_exp(_strategy(lin, ds))
        assert plugin.directions_per_exp == [rank, 0]


@STORAGES
def test_basis_stays_orthonormal_with_nearly_dependent_vectors(storage):
    # One output, no bias: the gtl gradient of x is x itself. Task 2 holds x_a and
    # x_a + 1e-9 d: with drop_tol=0 the tiny residual is kept, and normalising it must not
    # amplify the rounding left along task 1's directions (the second Gram-Schmidt pass).
    lin = nn.Linear(20, 1, bias=False).double()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(5, 20, generator=g, dtype=torch.float64)
    xa = torch.randn(1, 20, generator=g, dtype=torch.float64)
    x2 = torch.cat([xa, xa + 1e-9 * torch.randn(1, 20, generator=g, dtype=torch.float64),
                    torch.randn(3, 20, generator=g, dtype=torch.float64)])
    plugin = OGDPlugin(memory_per_task=5, drop_tol=0.0)  # dense: factored needs >= 1e-6
    zeros = torch.zeros(5, dtype=torch.long)
    for x in (x1, x2):
        plugin.after_training_exp(_strategy(lin, TensorDataset(x, zeros, zeros)))
    s = plugin.basis
    assert s.shape == (20, 10)
    torch.testing.assert_close(s.T @ s, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)
    assert plugin.store.form == "dense"
    dropping = OGDPlugin(memory_per_task=5, storage=storage)  # default drop_tol: dropped
    for x in (x1, x2):
        dropping.after_training_exp(_strategy(lin, TensorDataset(x, zeros, zeros)))
    assert dropping.directions_per_exp == [5, 4] and dropping.store.form == storage
    s = dropping.basis
    torch.testing.assert_close(s.T @ s, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-12)


@STORAGES
def test_linear_model_keeps_old_gtl_logits_exactly(storage):
    """f(x) = W x + b is linear in its parameters: d f_y / d theta does not depend on theta, so
    an OGD step changes none of the stored samples' true-class logits, at any step size."""
    model1 = nn.Linear(10, 3).double()
    x1, y1, ds1 = _data(15, d=10, seed=1)
    x2, y2, _ = _data(40, d=10, seed=2)
    results = {}
    for use_ogd in (True, False):
        model = copy.deepcopy(model1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        plugin = OGDPlugin(memory_per_task=15, storage=storage)
        st = _strategy(model, ds1, optimizer=opt)
        before = model(x1).detach()
        if use_ogd:
            plugin.after_training_exp(st)
            plugin.before_training_exp(st)
        for step in range(40):
            sel = slice(step % 4 * 10, step % 4 * 10 + 10)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x2[sel]), y2[sel]).backward()
            if use_ogd:
                plugin.before_update(st)
            opt.step()
        after = model(x1).detach()
        results[use_ogd] = (before.gather(1, y1[:, None]), after.gather(1, y1[:, None]),
                            (after - before).abs().max())
    b, a, moved = results[True]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert moved > 0.1  # other logits do move: the test is not vacuous
    b, a, _ = results[False]
    assert (a - b).abs().max() > 0.1  # plain SGD moves the stored logits


@STORAGES
def test_multihead_uses_the_task_head_and_excludes_heads(storage):
    torch.manual_seed(0)
    net = ClassifierNet(MLP(input_size=5, hidden=[6]), MultiHeadClassifier(6, 3)).double()
    for t in (0, 1):
        net.head.adaptation(SimpleNamespace(task_labels=[t], classes_in_this_experience=[0, 1, 2]))
    net.double()
    x, y, ds = _data(8, task=1)
    plugin = OGDPlugin(memory_per_task=8, storage=storage)
    plugin.after_training_exp(_strategy(net, ds, task=1))
    assert plugin.store.form == storage
    assert [n for n, _ in plugin.layout] == ["backbone.layers.0.weight", "backbone.layers.0.bias"]
    want = _autograd_rows(net, x, y, "gtl", task=1)  # gradients of the backbone only
    torch.testing.assert_close(plugin.basis @ (plugin.basis.T @ want.T), want.T, rtol=0,
                               atol=1e-12)  # span(S) = span(task-1 head's gtl gradients)
    # the head's gradient is left alone by the step's projection
    out = net(x, 1)
    out.sum().backward()
    head_grads = [p.grad.clone() for n, p in net.named_parameters() if n.startswith("head.")
                  and p.grad is not None]
    st = _strategy(net)
    plugin.before_training_exp(st)
    plugin.before_update(st)
    assert head_grads and all(torch.equal(a, p.grad) for a, p in zip(
        head_grads, [p for n, p in net.named_parameters() if n.startswith("head.")
                     and p.grad is not None]))


@STORAGES
def test_max_directions_raises_and_keeps_the_state(storage):
    model = _mlp()
    _, _, ds1 = _data(10, seed=1)
    _, _, ds2 = _data(10, seed=2)
    plugin = OGDPlugin(memory_per_task=10, max_directions=15, storage=storage)
    plugin.after_training_exp(_strategy(model, ds1))
    basis = plugin.basis.clone()
    with pytest.raises(ValueError, match=r"20 directions after this experience \(10 new\), more "
                                         r"than max_directions=15"):
        plugin.after_training_exp(_strategy(model, ds2))
    assert torch.equal(plugin.basis, basis) and plugin.directions_per_exp == [10]


def test_layout_change_raises_at_the_next_experience():
    model = _mlp()
    _, _, ds = _data(5)
    plugin = OGDPlugin(memory_per_task=5)
    plugin.after_training_exp(_strategy(model, ds))
    with pytest.raises(ValueError, match=r"shared parameters changed.*\('2.weight', \(4, 8\)\) "
                                         r"vs stored \('2.weight', \(3, 8\)\)"):
        plugin.before_training_exp(_strategy(_mlp(c=4)))


def test_optimizer_warning():
    model = _mlp()
    for opt, warns in ((torch.optim.SGD(model.parameters(), lr=0.1), False),
                       (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), True),
                       (torch.optim.Adam(model.parameters()), True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            OGDPlugin().before_training_exp(_strategy(model, optimizer=opt))
        assert any("plain SGD" in str(w.message) for w in caught) == warns


@STORAGES
def test_state_round_trip_resumes_identically(storage):
    info = build_benchmark("split_digits", "domain")
    exps = list(info.benchmark.train_stream)
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)

    def make():
        return OGDPlugin(memory_per_task=30, seed=4, storage=storage)

    plugin = make()
    strategy = naive_sgd(model, plugin)
    for e in exps[:2]:
        strategy.train(e)
    state = plugin.state_dict()
    assert plugin.n_directions == 60 and plugin.store.form == storage
    if storage == "dense":
        assert state["basis"].device.type == "cpu" and state["basis"].shape[1] == 60
    else:  # factored: [60, in] inputs and [60, out] output gradients per layer, R [60, 60]
        f = state["factored"]
        assert state["basis"] is None and f["R"].shape == (60, 60)
        assert [tuple(a.shape) for a in f["A"]] == [(60, 64), (60, 16)]
    restored = make()
    restored.load_state_dict(copy.deepcopy(state))
    a, b = continue_both(strategy, model, plugin, restored, exps[2])
    assert torch.equal(plugin.basis, restored.basis) and torch.equal(a["generator"], b["generator"])
    assert a["memory_indices"] == b["memory_indices"] and a["directions_per_exp"] == [30] * 3
    with pytest.raises(ValueError, match="saved with memory_per_task=30, this plugin has "
                       "memory_per_task=200"):
        OGDPlugin().load_state_dict(state)


def test_less_forgetting_than_naive_on_split_digits(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    digits_cfg["benchmark"]["scenario"] = "domain"  # one shared head: naive forgets clearly
    digits_cfg["optimizer"].update(name="sgd", lr=0.1)  # the paper's optimizer
    digits_cfg["methods"] = ["naive", {"name": "ogd", "params": {"memory_per_task": 100}}]
    naive, ogd = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == ogd["status"] == "finished", ogd.get("error")
    assert naive["summary"]["bwt"] < -0.1
    assert ogd["summary"]["bwt"] > naive["summary"]["bwt"] + 0.1
    assert ogd["summary"]["acc"] > naive["summary"]["acc"]


@pytest.mark.parametrize("kwargs,match", [
    ({"variant": "GTL"}, "variant must be one of 'gtl', 'ave', 'all'"),
    ({"memory_per_task": 0}, r"memory_per_task must be in \[1, inf\)"),
    ({"memory_per_task": 2.5}, "memory_per_task must be an integer"),
    ({"max_directions": 0}, r"max_directions must be in \[1, inf\)"),
    ({"drop_tol": 1.0}, r"drop_tol must be in \[0, 1\)"),
    ({"drop_tol": -1e-3}, r"drop_tol must be in \[0, 1\)"),
    ({"grad_batch_size": 0}, r"grad_batch_size must be in \[1, inf\)"),
    ({"seed": -1}, r"seed must be in \[0, inf\)"),
    ({"storage": "low_rank"}, "storage must be one of 'auto', 'dense', 'factored'"),
    ({"storage": "factored", "drop_tol": 1e-8}, r"storage='factored' needs drop_tol >= 1e-06"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OGDPlugin(**kwargs)


def test_registry_header():
    sig = inspect.signature(OGDPlugin.__init__).parameters
    defaults = signature_defaults(OGDPlugin)
    assert defaults == {"variant": "gtl", "memory_per_task": 200, "max_directions": None,
                        "drop_tol": 1e-5, "grad_batch_size": 64, "seed": 0, "storage": "auto"}
    assert set(OGDPlugin.SWEEP) <= set(sig)
    OGDPlugin(**defaults)
    assert OGDPlugin.METHOD_NAME == "ogd" and not OGDPlugin.NEEDS_TASK_LABELS
