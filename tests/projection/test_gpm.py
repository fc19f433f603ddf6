"""GPM (Saha et al., ICLR 2021): memory update, gradient projection, freezing, state, end to end."""

from __future__ import annotations

import copy
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.layer_inputs import UnsupportedLayerError
from cl_plugins.models import build_model
from cl_plugins.projection.gpm import GPMPlugin
from cl_plugins.registry import signature_defaults

from helpers import continue_both, naive_sgd

F64 = torch.float64


def _dataset(x, n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (len(x),), generator=g)
    return TensorDataset(x, y, torch.zeros(len(x), dtype=torch.long))


def _strategy(model, ds, optimizer=None):
    return SimpleNamespace(model=model, device=torch.device("cpu"), optimizer=optimizer,
                           experience=SimpleNamespace(dataset=ds))


def _orthogonal(d, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=gen))
    return q


def _span_projector(m):
    return m @ m.T


# ---------------------------------------------------------------- memory update (exact, float64)

@pytest.mark.parametrize("eps,rule,k", [(0.9, "paper", 2), (0.95, "paper", 3), (0.5, "paper", 1),
                                        (0.9, "code", 1), (0.95, "code", 2)])
def test_first_task_basis_is_top_singular_vectors_with_energy_criterion(eps, rule, k):
    # R = U diag(3, 2, 1, 0.5) V^T: energies 9, 4, 1, 0.25 (total 14.25); cumulative ratios
    # 0.632, 0.912, 0.982, 1 -> eps 0.9 needs k = 2, eps 0.95 k = 3, eps 0.5 k = 1 (eq. 5);
    # the official code keeps one fewer.
    d = 4
    u, v = _orthogonal(d, 1), _orthogonal(d, 2)
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64)
    rep = u @ torch.diag(s) @ v.T  # [d, n]: columns are inputs
    model = nn.Sequential(nn.Linear(d, 2, bias=False)).double()
    plugin = GPMPlugin(threshold=eps, threshold_increment=0.0, n_samples=50, task1_rank=rule)
    ranks = plugin.update_memory(model, _dataset(rep.T.contiguous()), "cpu")
    m = plugin.bases["0"]
    assert ranks == {"0": k} and m.shape == (d, k) and m.dtype == F64
    torch.testing.assert_close(m.T @ m, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(_span_projector(m), _span_projector(u[:, :k]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps,added", [(0.5, []), (0.8, [1]), (0.9, [1, 2])])
def test_incremental_basis_adds_only_what_the_memory_does_not_explain(eps, added):
    # Task 1: inputs along e0 only -> M = e0. Task 2: samples 2 e0, 1.5 e1, 1 e2 (total energy
    # 7.25); M already explains 4 / 7.25 = 0.552; adding e1 gives 6.25 / 7.25 = 0.862, e2 1.0.
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    plugin = GPMPlugin(threshold=eps, threshold_increment=0.0, n_samples=10)
    x1 = torch.tensor([[1.0, 0, 0], [-2.0, 0, 0], [0.5, 0, 0]], dtype=F64)
    plugin.update_memory(model, _dataset(x1), "cpu")
    torch.testing.assert_close(_span_projector(plugin.bases["0"]),
                               torch.diag(torch.tensor([1.0, 0, 0], dtype=F64)))
    x2 = torch.tensor([[2.0, 0, 0], [0, 1.5, 0], [0, 0, 1.0]], dtype=F64)
    # a rotation of the input space must not matter
    rot = _orthogonal(3, 5)
    plugin_rot = GPMPlugin(threshold=eps, threshold_increment=0.0, n_samples=10)
    plugin_rot.update_memory(model, _dataset(x1 @ rot.T), "cpu")
    plugin.update_memory(model, _dataset(x2), "cpu")
    plugin_rot.update_memory(model, _dataset(x2 @ rot.T), "cpu")
    m = plugin.bases["0"]
    expect = torch.zeros(3, dtype=F64)
    expect[[0] + added] = 1.0
    assert m.shape == (3, 1 + len(added))
    torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(_span_projector(m), torch.diag(expect), rtol=0, atol=1e-12)
    torch.testing.assert_close(_span_projector(plugin_rot.bases["0"]),
                               rot @ torch.diag(expect) @ rot.T, rtol=0, atol=1e-12)
    assert plugin.history == [{"0": 1}, {"0": 1 + len(added)}]


def test_threshold_schedule_per_layer_and_increment():
    plugin = GPMPlugin(threshold=[0.95, 0.99], threshold_increment=0.003)
    assert plugin.thresholds(["a", "b"], 0) == {"a": 0.95, "b": 0.99}
    got = plugin.thresholds(["a", "b"], 2)
    assert got["a"] == pytest.approx(0.956) and got["b"] == pytest.approx(0.996)
    assert plugin.thresholds(["a", "b"], 10) == {"a": 0.98, "b": 1.0}  # clipped at 1
    # the schedule reaches the update: with 0.5 + 0.3 t, the second update uses 0.8 (see above)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    p = GPMPlugin(threshold=0.5, threshold_increment=0.3, n_samples=10)
    p.update_memory(model, _dataset(torch.tensor([[1.0, 0, 0]], dtype=F64)), "cpu")
    p.update_memory(model, _dataset(torch.tensor([[2.0, 0, 0], [0, 1.5, 0], [0, 0, 1.0]],
                                                 dtype=F64)), "cpu")
    assert p.bases["0"].shape[1] == 2


def test_conv_representation_uses_patches_and_layer_samples():
    # conv R = unfolded patches of the first layer_samples[l] examples: its span is what the
    # conv's fan-in sees. Inputs constant per channel -> every patch is (c0 * 1_9, c1 * 1_9).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=0, bias=False), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 2, bias=False)).double()
    c = torch.randn(6, 2, 1, 1, dtype=F64)
    x = c.expand(6, 2, 5, 5).contiguous()
    plugin = GPMPlugin(threshold=1.0, threshold_increment=0.0, n_samples=6, layer_samples=[1, 6])
    reps = plugin.representation(model, _dataset(x), "cpu")
    assert reps["0"].shape == (18, 1 * 3 * 3) and reps["2"].shape == (27, 6)
    plugin.update_memory(model, _dataset(x), "cpu")
    assert plugin.bases["0"].shape[1] == 1  # one image's patches: all equal, rank 1


# ---------------------------------------------------------------- projection and protection

def _two_layer(bias, conv=False):
    if conv:
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 4 * 4, 3, bias=bias))
    else:
        net = nn.Sequential(nn.Linear(20, 32, bias=bias), nn.ReLU(), nn.Linear(32, 3, bias=bias))
    return net.double()


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("bias", ["append", "freeze"])
def test_projected_gradient_is_orthogonal_to_the_memory(conv, bias):
    torch.manual_seed(0)
    model = _two_layer(True, conv)
    shape = (2, 4, 4) if conv else (20,)
    x1 = torch.randn(8, *shape, dtype=F64)
    plugin = GPMPlugin(threshold=0.9, threshold_increment=0.0, n_samples=8, bias=bias)
    st = _strategy(model, _dataset(x1))
    plugin.after_training_exp(st)
    plugin.before_training_exp(st)
    out = model(torch.randn(5, *shape, dtype=F64))
    out.pow(2).sum().backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    plugin.before_update(st)
    for name in ("0", "2" if conv is False else "3"):
        layer = model[int(name)]
        m = plugin.bases[name]
        assert 0 < m.shape[1] < m.shape[0]
        g = layer.weight.grad.reshape(layer.weight.shape[0], -1)
        if bias == "append":
            g = torch.cat([g, layer.bias.grad.reshape(-1, 1)], 1)
            raw_g = torch.cat([raw[f"{name}.weight"].reshape(g.shape[0], -1),
                               raw[f"{name}.bias"].reshape(-1, 1)], 1)
        else:
            assert torch.count_nonzero(layer.bias.grad) == 0  # frozen after task 1
            raw_g = raw[f"{name}.weight"].reshape(g.shape[0], -1)
        assert (g @ m).abs().max() < 1e-12 * raw_g.abs().max()
        torch.testing.assert_close(g, raw_g - raw_g @ m @ m.T, rtol=0, atol=1e-13)


@pytest.mark.parametrize("bias,input_side", [(None, True), (None, False), ("append", True),
                                             ("freeze", False)])
def test_old_task_layer_outputs_unchanged_after_many_projected_steps(bias, input_side):
    # Task-1 inputs span a known 5-dim subspace of R^20; eps = 1 - 1e-9 makes M span it (and the
    # span of the task-1 hidden activations). 300 SGD steps on generic task-2 data leave both
    # layers' outputs on task-1 inputs unchanged; naive SGD changes them by O(1).
    torch.manual_seed(0)
    basis = _orthogonal(20, 3)[:, :5]
    x1 = torch.randn(20, 5, dtype=F64) @ basis.T
    x2 = torch.randn(64, 20, dtype=F64)
    y2 = torch.randint(0, 3, (64,))
    init = _two_layer(bias is not None)
    changes = {}
    for method in ("gpm", "naive"):
        model = copy.deepcopy(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        st = _strategy(model, _dataset(x1), opt)
        plugin = GPMPlugin(threshold=1 - 1e-9, threshold_increment=0.0, n_samples=20,
                           bias=bias or "freeze", input_side=input_side)
        plugin.after_training_exp(st)
        if method == "gpm":
            assert [b.shape[1] for b in plugin.bases.values()][0] == 5 + (bias == "append")
        with torch.no_grad():
            h_before = model[0](x1)
            o_before = model[2](model[1](h_before))
        plugin.before_training_exp(st)
        for step in range(300):
            idx = torch.randint(0, 64, (10,))
            plugin.before_training_iteration(st)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x2[idx]), y2[idx]).backward()
            if method == "gpm":
                plugin.before_update(st)
            opt.step()
            if method == "gpm":
                plugin.after_update(st)
            plugin.after_training_iteration(st)
        with torch.no_grad():
            h_after = model[0](x1)
            o_after = model[2](model[1](h_after))
        changes[method] = (float((h_after - h_before).norm() / h_before.norm()),
                           float((o_after - o_before).norm() / o_before.norm()))
    assert max(changes["gpm"]) < 1e-6, changes
    assert min(changes["naive"]) > 0.1, changes


@pytest.mark.parametrize("bias", ["append", "freeze"])
def test_input_side_path_equals_gradient_path_and_keeps_other_gradient_terms(bias):
    # Linear layer, small batch: the projection is computed as D^T (X - X M M^T) from the step's
    # captured inputs/output gradients. It must equal the gradient path, also when the batch
    # has extra leading dims, the layer is used twice in one step, and another plugin adds a
    # gradient term that is not D^T X (which must be projected too, not dropped).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 3)).double()
    x1 = torch.randn(25, 40, dtype=F64)
    xa, xb, xc = (torch.randn(2, 3, 40, dtype=F64), torch.randn(4, 40, dtype=F64),
                  torch.randn(2, 40, dtype=F64))
    grads = {}
    for input_side in (True, False):
        model = copy.deepcopy(net)
        st = _strategy(model, _dataset(x1))
        plugin = GPMPlugin(threshold=0.9, threshold_increment=0.0, n_samples=25, bias=bias,
                           input_side=input_side)
        plugin.after_training_exp(st)
        plugin.before_training_exp(st)
        gp = plugin._grad_projector
        assert bool(gp.hooked) == input_side  # capture hooks only on the input side
        used = []
        inner = gp._from_inputs
        gp._from_inputs = lambda *a: used.append(inner(*a) is not None) or inner(*a)
        plugin.before_training_iteration(st)
        loss = model(xa).pow(2).sum() + model(xb).sin().sum()
        loss = loss + 0.3 * model[0].weight.pow(2).sum()  # a penalty term on W itself
        loss.backward()
        with torch.no_grad():
            model(xc)  # a forward without gradient: ignored
        if input_side:
            assert [len(gp.capture.calls(i)) for i in range(len(gp.hooked))] == [2, 2]
        plugin.before_update(st)
        # layer 0 (out 60, n = 10 rows) takes the input side; layer 2 (out 3) cannot gain
        assert used == ([True, False] if input_side else [])
        plugin.after_training_iteration(st)
        grads[input_side] = {n: p.grad.clone() for n, p in model.named_parameters()}
        m = plugin.bases["0"]
        g = model[0].weight.grad
        if bias == "append":
            g = torch.cat([g, model[0].bias.grad[:, None]], 1)
        assert 0 < m.shape[1] < m.shape[0] and (g @ m).abs().max() < 1e-12
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=0, atol=1e-12)


def test_biases_and_norms_frozen_exactly_after_the_first_task_even_with_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False),
                          nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(16, 6, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    st = _strategy(model, _dataset(x, 2), opt)
    plugin = GPMPlugin(threshold=0.5, threshold_increment=0.0, n_samples=16)
    plugin.after_training_exp(st)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="no longer orthogonal"):
        plugin.before_training_exp(st)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        plugin.before_update(st)
        opt.step()
        plugin.after_update(st)
    for n, p in model.named_parameters():
        if n.endswith("bias") or n.startswith("1."):
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n  # weights still train (projected)
    # freeze_norms_after_first=False: the BatchNorm trains
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    st2 = _strategy(model2, _dataset(x, 2), opt2)
    p2 = GPMPlugin(threshold=0.5, threshold_increment=0.0, n_samples=16,
                   freeze_norms_after_first=False, bias="free")
    p2.after_training_exp(st2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain SGD: no warning
        p2.before_training_exp(st2)
    w0 = model2[1].weight.detach().clone()
    b0 = model2[3].bias.detach().clone()  # (model2[0].bias feeds a BN: its gradient is 0)
    opt2.zero_grad()
    model2(x).pow(2).mean().backward()
    p2.before_update(st2)
    opt2.step()
    p2.after_update(st2)
    assert not torch.equal(model2[1].weight, w0) and not torch.equal(model2[3].bias, b0)


# ---------------------------------------------------------------- errors and arguments

def test_unsupported_layer_and_wrong_list_lengths_raise_at_the_first_experience():
    ds = _dataset(torch.randn(4, 4, 5, 5))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 2))
    with pytest.raises(UnsupportedLayerError, match=r"gpm: conv layer '0' has groups=2"):
        GPMPlugin().before_training_exp(_strategy(grouped, ds))
    emb = nn.ModuleDict({"emb": nn.Embedding(3, 2), "fc": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"gpm: layer 'emb' \(Embedding\)"):
        GPMPlugin().before_training_exp(_strategy(emb, ds))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(100, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"threshold has 3 values but the model has 2 "
                                         r"protected layers \['1', '3'\]"):
        GPMPlugin(threshold=[0.9, 0.9, 0.9]).before_training_exp(_strategy(mlp, ds))
    with pytest.raises(ValueError, match="layer_samples has 1 values"):
        GPMPlugin(layer_samples=[10]).before_training_exp(_strategy(mlp, ds))


@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
    ({"threshold": 1.2}, r"threshold must be in \(0, 1\]"),
    ({"threshold": [0.9, 1.5]}, r"threshold\[1\] must be in \(0, 1\]"),
    ({"threshold": []}, "threshold must be a number in"),
    ({"threshold": "high"}, "threshold must be a number"),
    ({"threshold_increment": -0.1}, r"threshold_increment must be in \[0, inf\)"),
    ({"n_samples": 0}, r"n_samples must be in \[1, inf\)"),
    ({"n_samples": 12.5}, "n_samples must be an integer"),
    ({"layer_samples": [10, 0]}, r"layer_samples\[1\] must be in \[1, 125\]"),
    ({"layer_samples": [200]}, r"layer_samples\[0\] must be in \[1, 125\]"),
    ({"layer_samples": 5}, "layer_samples must be None or a non-empty list"),
    ({"bias": "project"}, "bias must be one of 'freeze', 'append', 'free'"),
    ({"freeze_norms_after_first": 1}, "freeze_norms_after_first must be one of True, False"),
    ({"task1_rank": "svd"}, "task1_rank must be one of 'paper', 'code'"),
    ({"input_side": "yes"}, "input_side must be one of True, False"),
    ({"seed": -1}, r"seed must be in \[0, inf\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPMPlugin(**kwargs)


def test_registry_header():
    sig = inspect.signature(GPMPlugin.__init__).parameters
    defaults = signature_defaults(GPMPlugin)
    assert set(defaults) == set(sig) - {"self"} and set(GPMPlugin.SWEEP) <= set(sig)
    assert defaults == {"threshold": 0.97, "threshold_increment": 0.003, "n_samples": 125,
                        "layer_samples": None, "bias": "freeze",
                        "freeze_norms_after_first": True, "task1_rank": "paper",
                        "input_side": True, "seed": 0}  # the CIFAR-100 protocol
    GPMPlugin(**defaults)
    assert GPMPlugin.METHOD_NAME == "gpm" and not GPMPlugin.NEEDS_TASK_LABELS
    assert set(GPMPlugin.SCENARIOS) == {"task", "domain", "class"}


# ---------------------------------------------------------------- state and end to end

def test_state_round_trip_resumes_identically():
    info = build_benchmark("split_digits", "domain")
    exps = list(info.benchmark.train_stream)
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)  # biases: "append" exercised
    def make():
        return GPMPlugin(threshold=[0.9, 0.95], threshold_increment=0.01, n_samples=60,
                         bias="append", seed=3)

    plugin = make()
    strategy = naive_sgd(model, plugin)
    for e in exps[:2]:
        strategy.train(e)
    state = plugin.state_dict()
    assert plugin.n_experiences == 2 and all(b.device.type == "cpu" and b.dtype == F64
                                          for b in state["bases"].values())
    restored = make()
    restored.load_state_dict(copy.deepcopy(state))
    a, b = continue_both(strategy, model, plugin, restored, exps[2])
    assert torch.equal(a["generator"], b["generator"]) and a["history"] == b["history"]
    assert all(torch.equal(a["bases"][n], b["bases"][n]) for n in a["bases"])
    assert a["tasks_seen"] == b["tasks_seen"] == 3
    with pytest.raises(ValueError, match=r"threshold=\[0.9, 0.95\], this plugin has "
                                         r"threshold=0.97"):
        GPMPlugin(bias="append", seed=3).load_state_dict(state)


def test_less_forgetting_than_naive_on_split_digits(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    digits_cfg["benchmark"]["scenario"] = "domain"  # one shared head: naive forgets clearly
    digits_cfg["optimizer"].update(name="sgd", lr=0.1)
    digits_cfg["methods"] = ["naive", {"name": "gpm", "params": {"threshold": 0.97,
                                                                 "threshold_increment": 0.0}}]
    naive, gpm = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == gpm["status"] == "finished", (naive.get("error"), gpm.get("error"))
    assert naive["summary"]["bwt"] < -0.1
    assert gpm["summary"]["bwt"] > naive["summary"]["bwt"] + 0.1
    assert gpm["summary"]["bwt"] > -0.05
