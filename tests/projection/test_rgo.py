"""RGO (Liu & Liu, ICLR 2022): RLS algebra, curvature vectors, the preconditioned step, the
optimizer warning, state round trip, unsupported layers and an end-to-end run."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.layer_inputs import UnsupportedLayerError
from cl_plugins.models import build_model
from cl_plugins.core.step_operators import rls_update
from cl_plugins.projection.rgo import RGOPlugin, curvature_vectors, protected_tensors


def _strategy(model, dataset=None, task=0, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    return SimpleNamespace(model=model, optimizer=optimizer, device=torch.device("cpu"),
                           experience=SimpleNamespace(dataset=dataset, task_labels=[task]))


def _dataset(x, y, task=0):
    return TensorDataset(x, y, torch.full((len(x),), task, dtype=torch.long))


def _closed_form(vectors, alpha):
    d = vectors.shape[1]
    G = vectors.T  # [d, m]
    return alpha * torch.linalg.inv(alpha * torch.eye(d, dtype=G.dtype) + G @ G.T)


# --------------------------------------------------------------------------- RLS algebra

@pytest.mark.parametrize("m", [3, 11])
def test_rls_equals_closed_form(m):
    torch.manual_seed(0)
    d, alpha = 6, 0.05
    V = torch.randn(m, d, dtype=torch.float64)
    expected = _closed_form(V, alpha)
    one_by_one = torch.eye(d, dtype=torch.float64)
    for row in V:
        rls_update(one_by_one, row[None], alpha)
    block = rls_update(torch.eye(d, dtype=torch.float64), V, alpha)
    for P in (one_by_one, block):
        assert torch.linalg.norm(P - expected) <= 1e-8 * torch.linalg.norm(expected)
        assert torch.equal(P, P.T) if P is one_by_one else torch.allclose(P, P.T)
        assert float(torch.linalg.eigvalsh(P).min()) > 0  # stays positive definite


def test_code_vector_by_hand_and_rls_pass():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    model = nn.Sequential(lin)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0])
    plugin = RGOPlugin(alpha=0.3, rls_batches=1, rls_batch_size=5)
    plugin.before_training_exp(_strategy(model))
    plugin.after_training_exp(_strategy(model, _dataset(x, y)))
    with torch.no_grad():
        p = F.softmax(lin(x), dim=1)[torch.arange(5), y]
    w = (p * (1 - p)).sqrt()
    # gradient of sum_i w_i z_{i,y_i}: W -> sum_i w_i e_{y_i} x_i^T (mean over the 3 rows),
    # b -> sum_i w_i e_{y_i}
    g_w = (w[:, None] * x).sum(0) / 3
    g_b = torch.zeros(3, dtype=torch.float64).index_add_(0, y, w)
    torch.testing.assert_close(plugin.P["0.weight"], _closed_form(g_w[None], 0.3),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(plugin.P["0.bias"], _closed_form(g_b[None], 0.3),
                               rtol=1e-10, atol=1e-12)
    assert plugin.n_vectors == {"0.weight": 1, "0.bias": 1} and plugin.n_experiences == 1


def test_rls_pass_uses_the_task_feature_encoding():
    torch.manual_seed(0)
    info = SimpleNamespace(input_shape=(1, 3, 3), scenario="task", task_labels=True,
                           n_outputs=3)
    model = build_model({"name": "fel_mlp", "hidden": [8], "head": "linear"}, info).double()
    x, y = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    plugin = RGOPlugin(alpha=1.0, rls_batches=1, rls_batch_size=4)
    plugin.before_training_exp(_strategy(model))
    plugin.after_training_exp(_strategy(model, _dataset(x, y, 2), task=2))
    with torch.no_grad():
        feats = model.backbone(x, 2)  # task 2's permutation of the hidden units
        p = F.softmax(model.head(feats), dim=1)[torch.arange(4), y]
    g = ((p * (1 - p)).sqrt()[:, None] * feats).sum(0) / 3
    torch.testing.assert_close(plugin.P["head.weight"], _closed_form(g[None], 1.0),
                               rtol=1e-10, atol=1e-12)
    assert model.training  # the pass restores train mode


def test_paper_vector_is_the_code_vector_of_one_sample_batches():
    torch.manual_seed(0)
    info = SimpleNamespace(input_shape=(1, 1, 5), scenario="task", task_labels=True,
                           n_outputs=3)
    # FEL net, task 2: the per-sample path (torch.func) goes through the task's encoding too
    model = build_model({"name": "fel_mlp", "hidden": [6, 6], "head": "linear"}, info).double()
    data = _dataset(torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,)), 2)
    paper = RGOPlugin(alpha=0.1, vector="paper", rls_batches=3, rls_batch_size=4, seed=7)
    code = RGOPlugin(alpha=0.1, vector="code", rls_batches=12, rls_batch_size=1, seed=7)
    for plugin in (paper, code):
        plugin.before_training_exp(_strategy(model))
        plugin.after_training_exp(_strategy(model, data, task=2))
    for n in code.P:
        torch.testing.assert_close(paper.P[n], code.P[n], rtol=1e-10, atol=1e-12)
    assert paper.n_vectors == code.n_vectors == {n: 12 for n in code.P}


@pytest.mark.parametrize("vector", ["code", "paper"])
def test_batch_softmax_support_only_differs_when_the_batch_lacks_classes(vector):
    torch.manual_seed(0)
    lin = nn.Linear(4, 5).double()
    model = nn.Sequential(lin)
    x = torch.randn(6, 4, dtype=torch.float64)
    plugins = {s: RGOPlugin(vector=vector, rls_softmax=s) for s in ("output", "batch")}
    for plugin in plugins.values():
        plugin.before_training_exp(_strategy(model))

    def vectors(y):
        return [curvature_vectors(model, protected_tensors(model), x, y, 0, vector, s)
                for s in ("output", "batch")]

    lacking = torch.tensor([0, 2, 2, 0, 1, 0])  # classes 3 and 4 absent
    full, batch = vectors(lacking)
    with torch.no_grad():  # by hand: the release's softmax over the classes {0, 1, 2} only
        p = F.softmax(lin(x)[:, :3], dim=1)[torch.arange(6), lacking]
    w = (p * (1 - p)).sqrt()
    by_hand = w[:, None] * x / 5 if vector == "paper" else (w[:, None] * x).sum(0, True) / 5
    torch.testing.assert_close(batch["0.weight"], by_hand, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(batch["0.weight"], full["0.weight"])
    full, batch = vectors(torch.tensor([0, 3, 2, 4, 1, 0]))  # every class present: identical
    for n in full:
        torch.testing.assert_close(batch[n], full[n], rtol=0, atol=0)
    state = plugins["output"].state_dict()
    assert state["rls_softmax"] == "output"
    with pytest.raises(ValueError, match="saved with rls_softmax='output', this plugin has "
                       "rls_softmax='batch'"):
        plugins["batch"].load_state_dict(state)
    del state["rls_softmax"]  # a state saved before the option existed: "output"
    RGOPlugin(vector=vector).load_state_dict(state)


# ------------------------------------------------------------------------------ the step

def test_identity_P_step_equals_sgd_exactly():
    bench = build_benchmark("split_digits", "task")
    params = []
    for use_rgo in (False, True):
        torch.manual_seed(0)
        model = build_model({"name": "fel_mlp", "hidden": [16], "head": "linear"}, bench)
        plugins = [RGOPlugin(rls_batches=3)] if use_rgo else []
        s = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  train_mb_size=16, train_epochs=1, device="cpu", plugins=plugins,
                  evaluator=EvaluationPlugin(loggers=[]))
        torch.manual_seed(1)
        s.train(bench.benchmark.train_stream[0])
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))  # task 1 is plain SGD, bit for bit


def _set_P(plugin, model, P_by_name, n_vectors):
    plugin.before_training_exp(_strategy(model))
    plugin.P.update(P_by_name)
    plugin.n_vectors.update({n: n_vectors for n in P_by_name})
    plugin.before_training_exp(_strategy(model))


@pytest.mark.parametrize("form", ["dense", "low_rank"])
def test_step_is_scaled_gradient_times_P(form):
    torch.manual_seed(0)
    d, out = 12, 20
    model = nn.Sequential(nn.Linear(d, out)).double()
    U = torch.linalg.qr(torch.randn(d, 3, dtype=torch.float64))[0]
    P = torch.eye(d, dtype=torch.float64) - U @ torch.diag(torch.tensor(
        [0.9, 0.5, 0.99], dtype=torch.float64)) @ U.T
    Pb = _closed_form(torch.randn(2, out, dtype=torch.float64), 0.5)
    plugin = RGOPlugin()
    _set_P(plugin, model, {"0.weight": P, "0.bias": Pb}, 3 if form == "low_rank" else d)
    assert [op.form for _, op in plugin._ops] == [form] * 2
    x = torch.randn(5, d, dtype=torch.float64)  # 5 rows < 20 outputs: the factored path
    for extra in (0.0, 1.0):  # 1.0: another loss term on the weight (residual check)
        model.zero_grad()
        loss = model(x).pow(2).sum() + extra * model[0].weight.pow(3).sum()
        loss.backward()
        g_w, g_b = model[0].weight.grad.clone(), model[0].bias.grad.clone()
        plugin.before_training_iteration(None)
        model.zero_grad()
        (model(x).pow(2).sum() + extra * model[0].weight.pow(3).sum()).backward()
        plugin.before_update(_strategy(model))
        torch.testing.assert_close(model[0].weight.grad, d / torch.trace(P) * g_w @ P,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[0].bias.grad, out / torch.trace(Pb) * g_b @ Pb,
                                   rtol=1e-12, atol=1e-12)


def test_interference_with_old_inputs_is_small_and_shrinks_with_alpha():
    torch.manual_seed(0)
    d, out, r = 10, 4, 3
    X1 = torch.randn(60, r, dtype=torch.float64) @ torch.randn(r, d, dtype=torch.float64)
    y1 = torch.randint(0, out, (60,))
    G = torch.randn(out, d, dtype=torch.float64)  # a task-2 gradient
    sgd = torch.linalg.norm(G @ X1.T)
    ratios = []
    for alpha in (1e-1, 1e-3, 1e-5):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(d, out, bias=False)).double()
        plugin = RGOPlugin(alpha=alpha, rls_batches=None, rls_batch_size=1)
        plugin.before_training_exp(_strategy(model))
        plugin.after_training_exp(_strategy(model, _dataset(X1, y1)))
        plugin.before_training_exp(_strategy(model))
        model[0].weight.grad = G.clone()
        plugin.before_update(_strategy(model))
        step = model[0].weight.grad
        ratios.append(float(torch.linalg.norm(step @ X1.T) / sgd))
        assert float((step * G).sum()) > 0  # still a descent direction
    assert ratios[0] < 0.5 and ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1e-3, ratios


# ------------------------------------------------------------------- checks and state

@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4),
    lambda p: torch.optim.Adam(p, lr=1e-3),
])
def test_warns_unless_plain_sgd(make):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="assumes plain SGD"):
        RGOPlugin().before_training_exp(_strategy(model, optimizer=make(model.parameters())))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RGOPlugin().before_training_exp(_strategy(model))  # plain SGD: silent


def test_state_round_trip_gives_identical_continuation():
    bench = build_benchmark("split_digits", "task")
    torch.manual_seed(0)
    model = build_model({"name": "fel_mlp", "hidden": [16], "head": "linear"}, bench)

    def strategy(m, plugin):
        return Naive(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                     train_mb_size=32, train_epochs=1, device="cpu", plugins=[plugin],
                     evaluator=EvaluationPlugin(loggers=[]))

    plugin = RGOPlugin(rls_batches=5, seed=3)
    s1 = strategy(model, plugin)
    torch.manual_seed(1)
    s1.train(bench.benchmark.train_stream[0])
    state = plugin.state_dict()
    assert all(P.dtype == torch.float64 and P.device.type == "cpu"
               for P in state["P"].values())
    restored = RGOPlugin(rls_batches=5, seed=3)
    restored.load_state_dict(copy.deepcopy(state))
    model2 = copy.deepcopy(model)
    s2 = strategy(model2, restored)
    for s in (s1, s2):
        for exp in list(bench.benchmark.train_stream)[1:3]:
            torch.manual_seed(2)
            s.train(exp)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    a, b = plugin.state_dict(), restored.state_dict()
    assert a["tasks_done"] == b["tasks_done"] == 3
    assert torch.equal(a["generator"], b["generator"])
    assert all(torch.equal(a["P"][n], b["P"][n]) for n in a["P"])
    with pytest.raises(ValueError, match="saved with alpha=0.01, this plugin has alpha=1.0"):
        RGOPlugin(alpha=1.0).load_state_dict(state)


def test_unsupported_layers_raise_with_the_module_path():
    emb = nn.ModuleDict({"emb": nn.Embedding(3, 2), "fc": nn.Linear(2, 2)})
    with pytest.raises(UnsupportedLayerError, match=r"rgo: layer 'emb' \(Embedding\)"):
        RGOPlugin().before_training_exp(_strategy(emb))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UnsupportedLayerError, match=r"'0'.*groups=2"):
        RGOPlugin().before_training_exp(_strategy(grouped))
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"normalisation layer '1' \(BatchNorm1d\)"):
        RGOPlugin().before_training_exp(_strategy(bn))
    plugin = RGOPlugin(norms="sgd")
    plugin.before_training_exp(_strategy(bn))
    assert sorted(plugin.P) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_norms_with_running_statistics_raise_even_without_affine_parameters():
    stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"normalisation layer '1' \(BatchNorm1d\) "
                       r"tracks running statistics.*old tasks' outputs.*"
                       r"track_running_stats=False or no normalisation"):
        RGOPlugin().before_training_exp(_strategy(stats))
    nested = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(
        nn.ReLU(), nn.InstanceNorm2d(2, track_running_stats=True)))
    with pytest.raises(UnsupportedLayerError, match=r"'1\.1' \(InstanceNorm2d\) tracks running"):
        RGOPlugin().before_training_exp(_strategy(nested))
    RGOPlugin(norms="sgd").before_training_exp(_strategy(stats))  # the drift accepted
    # no running statistics, no trainable parameters: accepted
    for norm in (nn.BatchNorm1d(4, affine=False, track_running_stats=False),
                 nn.LayerNorm(4, elementwise_affine=False), nn.GroupNorm(2, 4, affine=False),
                 nn.InstanceNorm1d(4)):
        plugin = RGOPlugin()
        plugin.before_training_exp(_strategy(nn.Sequential(nn.Linear(3, 4), norm,
                                                           nn.Linear(4, 2))))
        assert sorted(plugin.P) == ["0.bias", "0.weight", "2.bias", "2.weight"]


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": 0.0}, r"alpha must be in \(0, inf\)"),
    ({"alpha": "big"}, "alpha must be a number"),
    ({"vector": "exact"}, "vector must be one of 'code', 'paper'"),
    ({"rls_softmax": "present"}, "rls_softmax must be one of 'output', 'batch'"),
    ({"rls_batches": 0}, r"rls_batches must be in \[1, inf\)"),
    ({"rls_batch_size": 2.5}, "rls_batch_size must be an integer"),
    ({"norms": "freeze"}, "norms must be one of 'error', 'sgd'"),
    ({"seed": -1}, r"seed must be in \[0, inf\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RGOPlugin(**kwargs)


# ----------------------------------------------------------------------------- end to end

def test_less_forgetting_than_naive_on_split_digits(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    # one shared head, no feature encoding: naive forgets clearly (a domain-IL-like stream)
    digits_cfg["model"] = {"name": "fel_mlp", "hidden": [64, 64], "head": "linear", "fel": False}
    digits_cfg["optimizer"].update(name="sgd", lr=0.05)
    digits_cfg["strategy"].update(epochs=2, train_mb_size=10)
    digits_cfg["methods"] = ["naive", {"name": "rgo", "params": {"alpha": 1e-4,
                                                                 "rls_batches": None}}]
    naive, rgo = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == rgo["status"] == "finished", rgo.get("error")
    assert naive["summary"]["bwt"] < -0.1
    assert rgo["summary"]["bwt"] > 0.5 * naive["summary"]["bwt"]  # at most half the forgetting
    assert rgo["summary"]["acc"] > naive["summary"]["acc"] + 0.05
