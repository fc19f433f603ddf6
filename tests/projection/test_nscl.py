"""Adam-NSCL (cl_plugins/projection/nscl.py): exact float64 checks of the statistics, the
projector and the projected update, the BN EWC penalty, state, errors, and an end-to-end run."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.models import MultiHeadClassifier
from torch import nn
from torch.utils.data import TensorDataset

from cl_plugins.core.layer_inputs import UnsupportedLayerError, weight_matrix
from cl_plugins.core.subspace import FanInProjector, LayerUpdateProjector
from cl_plugins.models.classifier import ClassifierNet
from cl_plugins.projection.nscl import NSCLPlugin, null_space

from helpers import param_copies

DT = torch.float64


# ------------------------------------------------------------------------------ helpers

def _backbone(*modules, out):
    net = nn.Sequential(*modules)
    net.out_features = out
    return net


def _mlp(d_in=6, hidden=5, n_out=3, bias=True, seed=0):
    torch.manual_seed(seed)
    bb = _backbone(nn.Linear(d_in, hidden, bias=bias), nn.ReLU(),
                   nn.Linear(hidden, hidden, bias=bias), nn.ReLU(), out=hidden)
    return ClassifierNet(bb, MultiHeadClassifier(hidden, n_out, masking=False)).double()


def _strategy(model, optimizer, x, y, t=None):
    t = torch.zeros(len(x), dtype=torch.long) if t is None else t
    return SimpleNamespace(model=model, optimizer=optimizer, device=torch.device("cpu"),
                           experience=SimpleNamespace(dataset=TensorDataset(x, y, t)),
                           loss=None)


def _step(model, opt, x, y, plugin=None, strategy=None):
    """One training step in Avalanche's hook order."""
    if plugin is not None:
        plugin.before_training_iteration(strategy)
    opt.zero_grad()
    loss = F.cross_entropy(model(x, 0), y)
    if plugin is not None:
        strategy.loss = loss
        plugin.before_backward(strategy)
        loss = strategy.loss
    loss.backward()
    if plugin is not None:
        plugin.before_update(strategy)
    opt.step()
    if plugin is not None:
        plugin.after_update(strategy)
        plugin.after_training_iteration(strategy)


# ------------------------------------------------------------------ projector and bound

@pytest.mark.parametrize("rank", [10, 4])
def test_projector_bound_and_descent(rank):
    """||X_old D^T||_F^2 <= a lambda_min ||D||_F^2 and <D, G> >= 0 for D = G T."""
    g = torch.Generator().manual_seed(rank)
    n, d, a = 40, 10, 10.0
    scales = torch.logspace(0, -3, d, dtype=DT)  # a decaying spectrum
    x = torch.randn(n, rank, generator=g, dtype=DT) @ torch.randn(rank, d, generator=g,
                                                                  dtype=DT) * scales
    cov = x.T @ x
    basis, complement = null_space(cov, a)
    k = basis.shape[1]
    mags = torch.linalg.eigvalsh(cov).abs()
    lam_min = torch.maximum(mags.min(), d * torch.finfo(DT).eps * mags.max())
    assert k == int((mags <= a * lam_min).sum()) >= 1
    if rank < d:
        assert k == d - rank  # the whole numerical null space
    t_mat = basis @ basis.T / math.sqrt(k)
    assert torch.linalg.matrix_norm(basis @ basis.T) == pytest.approx(math.sqrt(k))
    proj = FanInProjector(basis, "onto", 1 / math.sqrt(k), complement=complement, dtype=DT)
    torch.testing.assert_close(proj.matrix(), t_mat, rtol=0, atol=1e-12)
    for trial in range(5):
        grad = torch.randn(7, d, generator=g, dtype=DT)
        dstep = grad @ t_mat
        lhs = (x @ dstep.T).pow(2).sum()
        assert lhs <= a * lam_min * dstep.pow(2).sum() * (1 + 1e-9) + 1e-24
        assert (dstep * grad).sum() >= 0
    # a step that ignores the projector violates the bound (the check can fail)
    grad = torch.randn(7, d, generator=g, dtype=DT)
    assert (x @ grad.T).pow(2).sum() > a * lam_min * grad.pow(2).sum()


def test_null_space_rule_on_a_known_spectrum():
    """Keep |lambda| <= a * lambda_min (the smallest, not a fraction of the largest)."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DT))
    lam = torch.tensor([2e-3, 1e-3, 9.99e-3, 1.001e-2, 3.0, 7.0], dtype=DT)
    cov = q @ torch.diag(lam) @ q.T

    def kept(a, c):
        basis, complement = null_space(c, a)
        assert basis.shape[1] + complement.shape[1] == c.shape[0]
        return basis

    for a, idx in ((10.0, [0, 1, 2]), (30.0, [0, 1, 2, 3]), (1.0, [1])):
        basis = kept(a, cov)
        torch.testing.assert_close(basis @ basis.T, q[:, idx] @ q[:, idx].T, rtol=0,
                                   atol=1e-10)
    # a rank-deficient C has tiny eigenvalues of either sign: they are below the rank
    # tolerance, so all of them are kept (3 zeros + the -1e-17), and 1e-3 is not
    cov = q[:, :3] @ torch.diag(torch.tensor([-1e-17, 1e-3, 1.0], dtype=DT)) @ q[:, :3].T
    assert kept(10.0, cov).shape[1] == 4


def _code_rule(cov, a, dtype):
    """The official code's selection: singular values of ``torch.svd(C)`` at most a times the
    smallest (in the code's float32, or float64)."""
    _, sv, vecs = torch.svd(cov.to(dtype), some=False)
    keep = sv <= sv[-1] * a
    return vecs[:, keep].to(DT)


@pytest.mark.parametrize("seed", range(4))
def test_a_rank_deficient_covariance_keeps_its_whole_null_space(seed):
    """64-d fan-in, 20 rows (a batch-mean statistic): the null space has exactly 44 dimensions.
    Thresholding the signed-noise eigenvalues at a * min |lambda| kept 1-4 of them; the rule
    keeps all 44, and contains whatever the code's float32 SVD rule keeps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 64, generator=g, dtype=DT) * torch.rand(64, generator=g, dtype=DT)
    cov = torch.zeros(64, 64, dtype=DT)
    for row in x:  # accumulated row by row, as the statistics pass does
        cov.addr_(row, row)
    basis, complement = null_space(cov, 10.0)
    assert basis.shape[1] == 44 and complement.shape[1] == 20
    assert (x @ basis).abs().max() < 1e-9 * x.abs().max()  # it is the null space
    mags = torch.linalg.eigvalsh(cov).abs()
    assert int((mags <= 10.0 * mags.min()).sum()) < 44  # the old rule (can fail)
    code = _code_rule(cov, 10.0, torch.float32)
    assert 1 <= code.shape[1] <= 44
    inside = basis @ (basis.T @ code)  # the code's directions lie in ours
    assert torch.linalg.matrix_norm(inside - code) < 1e-3 * math.sqrt(code.shape[1])


def test_a_full_rank_covariance_follows_the_code_rule_exactly():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 16, generator=g, dtype=DT) * torch.logspace(0, -1.5, 16, dtype=DT)
    cov = x.T @ x
    for a in (3.0, 10.0, 30.0):
        basis, _ = null_space(cov, a)
        code = _code_rule(cov, a, DT)
        assert basis.shape[1] == code.shape[1] >= 1
        torch.testing.assert_close(basis @ basis.T, code @ code.T, rtol=0, atol=1e-10)


def test_frobenius_scale_option():
    x = torch.randn(3, 5, dtype=DT)  # rank 3 of 5: a 2-dim (+ bias) null space
    model = ClassifierNet(_backbone(nn.Linear(5, 4, bias=False), out=4),
                          MultiHeadClassifier(4, 2))
    mats = {}
    for scale in (True, False):
        plugin = NSCLPlugin(frobenius_scale=scale, features="per_sample",
                            bn_ewc_lambda=0.0)
        plugin.after_training_exp(_strategy(model.double(), None, x,
                                            torch.zeros(3, dtype=torch.long)))
        mats[scale] = plugin.projection_matrix("backbone.0")
        assert plugin.null_dims["backbone.0"] == 2
    torch.testing.assert_close(mats[True], mats[False] / math.sqrt(2))
    torch.testing.assert_close(torch.linalg.matrix_norm(mats[True]), torch.tensor(1.0, dtype=DT))
    torch.testing.assert_close(x @ mats[False], torch.zeros(3, 5, dtype=DT), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 7])  # k < d - k: through B; k > d - k: through the complement
@pytest.mark.parametrize("bias", [True, False])
def test_fused_update_equals_projector_apply(k, bias):
    torch.manual_seed(k)
    layer = nn.Linear(8, 4, bias=bias).double()
    d = 8 + int(bias)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DT))
    proj = FanInProjector(q[:, :k], "onto", 1 / math.sqrt(k), complement=q[:, k:], dtype=DT)
    assert proj.subtract == (k > d - k)
    step = LayerUpdateProjector(layer, proj, "append")
    old = weight_matrix(layer, True).detach().clone()
    torch._foreach_copy_(*reversed(step.tensors()))  # snapshot (old <- current)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
        delta = weight_matrix(layer, True) - old
        step.project()
    torch.testing.assert_close(weight_matrix(layer, True), old + proj.apply(delta),
                               rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- statistics

def _patches_by_hand(img, k):
    """Rows of a stride-1, no-padding k x k conv on one [C, H, W] image, ordered (c, i, j)."""
    c, h, w = img.shape
    rows = []
    for r in range(h - k + 1):
        for s in range(w - k + 1):
            rows.append(torch.stack([img[ci, r + i, s + j] for ci in range(c)
                                     for i in range(k) for j in range(k)]))
    return torch.stack(rows)


@pytest.mark.parametrize("features", ["batch_mean", "per_sample"])
def test_covariances_by_hand(features):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 2, bias=False)
    lin = nn.Linear(3 * 2 * 2, 4, bias=True)
    model = ClassifierNet(_backbone(conv, nn.Flatten(), lin, out=4),
                          MultiHeadClassifier(4, 2, masking=False)).double()
    x = torch.randn(5, 2, 3, 3, dtype=DT)
    y = torch.zeros(5, dtype=torch.long)
    plugin = NSCLPlugin(features=features, stats_batch_size=2, stats_shuffle=False,
                        bn_ewc_lambda=0.0)
    plugin.after_training_exp(_strategy(model, None, x, y))
    batches = [x[0:2], x[2:4], x[4:5]]
    c_conv = torch.zeros(8, 8, dtype=DT)
    c_lin = torch.zeros(13, 13, dtype=DT)
    with torch.no_grad():
        for xb in batches:
            hidden = conv(xb).flatten(1)
            if features == "batch_mean":
                imgs, hid = [xb.mean(0)], hidden.mean(0, keepdim=True)
            else:
                imgs, hid = list(xb), hidden
            for img in imgs:
                p = _patches_by_hand(img, 2)
                c_conv += p.T @ p
            hid1 = torch.cat([hid, torch.ones(len(hid), 1, dtype=DT)], 1)  # bias="append"
            c_lin += hid1.T @ hid1
    torch.testing.assert_close(plugin.covariances["backbone.0"], c_conv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plugin.covariances["backbone.2"], c_lin, rtol=1e-12, atol=1e-12)
    assert plugin.covariances["backbone.0"].dtype == DT
    # accumulated over tasks, never reset
    plugin.after_training_exp(_strategy(model, None, x, y))
    torch.testing.assert_close(plugin.covariances["backbone.0"], 2 * c_conv)
    assert set(plugin.covariances) == {"backbone.0", "backbone.2"}  # head excluded


# ------------------------------------------------------------------------ ordering

def test_task1_is_plain_adam_and_task2_step_is_adam_step_times_T():
    x1, y1 = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    x2, y2 = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-5)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=5e-5)
    plugin = NSCLPlugin(stats_batch_size=4, features="per_sample")
    st = _strategy(model, opt, x1, y1)
    plugin.before_training_exp(st)
    for _ in range(3):  # task 1: no statistics, identical to plain Adam
        _step(model, opt, x1, y1, plugin, st)
        _step(ref, opt_ref, x1, y1)
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[n]), n
    plugin.after_training_exp(st)

    # task 2: the same Adam state on a copy without projection gives the raw step u
    st2 = _strategy(model, opt, x2, y2)
    plugin.before_training_exp(st2)
    ks = set()
    for _ in range(3):
        ref = copy.deepcopy(model)
        opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=5e-5)
        opt_ref.load_state_dict(copy.deepcopy(opt.state_dict()))
        before = param_copies(model)
        _step(model, opt, x2, y2, plugin, st2)
        _step(ref, opt_ref, x2, y2)
        layers = dict(model.named_modules())
        for name in ("backbone.0", "backbone.2"):
            mod, mod_ref = layers[name], dict(ref.named_modules())[name]
            u = weight_matrix(mod_ref, True) - torch.cat(
                [before[f"{name}.weight"], before[f"{name}.bias"][:, None]], 1)
            t_mat = plugin.projection_matrix(name)
            got = weight_matrix(mod, True).detach() - torch.cat(
                [before[f"{name}.weight"], before[f"{name}.bias"][:, None]], 1)
            torch.testing.assert_close(got, u @ t_mat, rtol=1e-10, atol=1e-14)
            assert not torch.allclose(got, u)  # the projection does something
            ks.add(plugin.null_dims[name])
        # the task head is not projected: exactly Adam's step
        for n in ("head.classifiers.0.classifier.weight", "head.classifiers.0.classifier.bias"):
            assert torch.equal(dict(model.named_parameters())[n],
                               dict(ref.named_parameters())[n])
    assert all(0 < k < 7 for k in ks)


def test_lr_after_first_sets_the_projected_groups_only():
    model = _mlp()
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.Adam([{"params": body}, {"params": head, "lr": 1e-3}], lr=1e-4)
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
    plugin = NSCLPlugin(lr_after_first=5e-5, bn_ewc_lambda=0.0)
    st = _strategy(model, opt, x, y)
    plugin.before_training_exp(st)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]  # task 1 unchanged
    plugin.after_training_exp(st)
    plugin.before_training_exp(st)
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 1e-3]
    shared = torch.optim.Adam(model.parameters(), lr=1e-4)
    with pytest.warns(UserWarning, match="head.classifiers.0"):
        plugin.before_training_exp(_strategy(model, shared, x, y))
    assert shared.param_groups[0]["lr"] == 5e-5


# ---------------------------------------------------------------------- integration

def test_old_task_outputs_unchanged_after_many_projected_steps():
    """Task-1 inputs span a 3-dim subspace of R^12 (12 samples, hidden width 24 > 12): the
    projected network keeps its task-1 outputs while plain Adam changes them by O(1)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 12, generator=g, dtype=DT)
    x1 = torch.randn(12, 3, generator=g, dtype=DT) @ basis
    y1 = torch.randint(0, 3, (12,), generator=g)
    x2 = torch.randn(64, 12, generator=g, dtype=DT)
    y2 = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    bb = _backbone(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), out=24)
    model = ClassifierNet(bb, nn.Linear(24, 3)).double()  # a shared head: protected too

    def run(project):
        net = copy.deepcopy(model)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        plugin = NSCLPlugin(features="per_sample", stats_batch_size=5)
        st = _strategy(net, opt, x1, y1)
        plugin.before_training_exp(st)
        for _ in range(20):
            _step(net, opt, x1, y1, plugin, st)
        plugin.after_training_exp(st)
        with torch.no_grad():
            out1 = net(x1, 0)
        start = param_copies(net)
        st2 = _strategy(net, opt, x2, y2)
        if project:
            plugin.before_training_exp(st2)
        for _ in range(200):
            _step(net, opt, x2, y2, plugin if project else None, st2)
        with torch.no_grad():
            change = (net(x1, 0) - out1).norm() / out1.norm()
        moved = max(((p - start[n]).norm() / start[n].norm()).item()
                    for n, p in net.named_parameters())
        return change.item(), moved

    change, moved = run(project=True)
    change_plain, _ = run(project=False)
    assert change < 1e-6 and moved > 1e-2  # the weights moved, old outputs did not
    assert change_plain > 0.1


# ------------------------------------------------------------------------ BN penalty

def _bn_model():
    torch.manual_seed(3)
    bb = _backbone(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU(), out=5)
    return ClassifierNet(bb, MultiHeadClassifier(5, 3, masking=False)).double()


@pytest.mark.parametrize("importance", ["batch", "per_sample"])
def test_bn_fisher_penalty_and_not_projected(importance):
    model = _bn_model()
    x1, y1 = torch.randn(10, 6, dtype=DT), torch.randint(0, 3, (10,))
    x2, y2 = torch.randn(10, 6, dtype=DT), torch.randint(0, 3, (10,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    plugin = NSCLPlugin(bn_ewc_lambda=100.0, stats_batch_size=4, stats_shuffle=False,
                        bn_importance=importance)
    st = _strategy(model, opt, x1, y1)
    plugin.before_training_exp(st)
    _step(model, opt, x1, y1, plugin, st)  # train mode: BN batch statistics, running stats move
    plugin.after_training_exp(st)
    bn = model.backbone[1]
    names = ["backbone.1.weight", "backbone.1.bias"]
    (fisher, anchor), = plugin.quadratic_penalty.terms
    assert sorted(fisher) == sorted(names)  # BN affine parameters only
    # by hand, at the predicted label, eval mode. per_sample: the mean of the per-sample
    # squared gradients; batch (the code): the mean over the batches (4, 4, 2 samples) of
    # B_b times the squared gradient of the batch's mean loss
    model.eval()
    by_hand = {n: torch.zeros_like(p) for n, p in zip(names, (bn.weight, bn.bias))}
    chunks = [(i, i + 1, 1 / 10) for i in range(10)] if importance == "per_sample" else \
        [(0, 4, 4 / 3), (4, 8, 4 / 3), (8, 10, 2 / 3)]
    for lo, hi, weight in chunks:
        model.zero_grad()
        out = model(x1[lo:hi], 0)
        F.cross_entropy(out, out.argmax(1)).backward()
        by_hand[names[0]] += bn.weight.grad ** 2 * weight
        by_hand[names[1]] += bn.bias.grad ** 2 * weight
    model.train()
    for n in names:
        torch.testing.assert_close(fisher[n], by_hand[n], rtol=1e-10, atol=1e-14)
        assert torch.equal(anchor[n], dict(model.named_parameters())[n])

    # task 2: the penalty is added to the loss, and BN parameters take Adam's step unprojected
    st2 = _strategy(model, opt, x2, y2)
    plugin.before_training_exp(st2)
    with torch.no_grad():
        bn.weight.add_(0.1)
        bn.bias.sub_(0.05)
    st2.loss = torch.zeros((), dtype=DT)
    plugin.before_backward(st2)
    expected = 100.0 * sum((fisher[n] * (p - anchor[n]) ** 2).sum()
                           for n, p in zip(names, (bn.weight, bn.bias)))
    assert st2.loss.item() == pytest.approx(expected.item(), rel=1e-12) and expected > 0
    ref = copy.deepcopy(model)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt_ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    _step(model, opt, x2, y2, plugin, st2)
    # reference: same loss (task + the same penalty), no projection
    opt_ref.zero_grad()
    ref_bn = {n: p for n, p in ref.named_parameters() if n in names}
    (F.cross_entropy(ref(x2, 0), y2) + plugin.quadratic_penalty.loss(ref_bn)).backward()
    opt_ref.step()
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    for n in names:
        assert torch.equal(got[n], want[n]), n
    assert not torch.allclose(got["backbone.0.weight"], want["backbone.0.weight"])


def test_bn_penalty_with_several_terms_is_the_sum_of_its_terms():
    """Three tasks: before_backward adds bn_ewc_lambda * sum_k sum_i F_k,i (theta_i -
    theta*_k,i)^2, one term per task anchored at the parameters at the end of that task."""
    model = _bn_model()
    plugin = NSCLPlugin(bn_ewc_lambda=7.0, stats_batch_size=3)
    names = ["backbone.1.weight", "backbone.1.bias"]
    anchors = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(9, 6, generator=g, dtype=DT)
        st = _strategy(model, None, x, torch.zeros(9, dtype=torch.long))
        plugin.before_training_exp(st)
        plugin.after_training_exp(st)
        anchors.append(param_copies(model))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
    terms = plugin.quadratic_penalty.terms
    assert len(terms) == 3
    params = {n: p for n, p in model.named_parameters() if n in names}
    plugin.before_training_exp(st)
    st.loss = torch.zeros((), dtype=DT)
    plugin.before_backward(st)
    by_hand = torch.zeros((), dtype=DT)
    grad_by_hand = {n: torch.zeros_like(p) for n, p in params.items()}
    for (fisher, anchor), anchor_k in zip(terms, anchors):
        assert sorted(fisher) == sorted(anchor) == sorted(names)
        for n, p in params.items():
            assert torch.equal(anchor[n], anchor_k[n]) and (fisher[n] >= 0).all()
            by_hand = by_hand + 7.0 * (fisher[n] * (p.detach() - anchor[n]) ** 2).sum()
            grad_by_hand[n] += 2 * 7.0 * fisher[n] * (p.detach() - anchor[n])
    assert by_hand > 0
    torch.testing.assert_close(st.loss, by_hand, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(st.loss, list(params.values()))
    for gr, n in zip(grads, params):
        torch.testing.assert_close(gr, grad_by_hand[n], rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ state and errors

def test_state_round_trip_gives_identical_continuation():
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from cl_plugins.benchmarks import build_benchmark

    info = build_benchmark("split_digits", "task", n_experiences=2)
    exp0, exp1 = list(info.benchmark.train_stream)

    def make(model, plugin):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return Naive(model=model, optimizer=opt, train_mb_size=64, train_epochs=1,
                     device="cpu", plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]))

    torch.manual_seed(0)
    bb = _backbone(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), out=16)
    model_a = ClassifierNet(bb, MultiHeadClassifier(16, 2, masking=False))
    plugin_a = NSCLPlugin()
    strat_a = make(model_a, plugin_a)
    strat_a.train(exp0)
    state = copy.deepcopy(plugin_a.state_dict())
    assert state["covariances"]["backbone.1"].dtype == DT and state["projectors"]

    def continue_with(plugin, model):
        torch.manual_seed(1)
        make(model, plugin).train(exp1, reset_optimizer_state=True)
        return param_copies(model)

    model_b = copy.deepcopy(model_a)
    model_c = copy.deepcopy(model_a)
    plugin_b = NSCLPlugin()
    plugin_b.load_state_dict(state)
    after_b = continue_with(plugin_b, model_b)
    torch.manual_seed(1)
    strat_a.train(exp1, reset_optimizer_state=True)
    after_a = param_copies(model_a)
    for n in after_a:
        assert torch.equal(after_a[n], after_b[n]), n
    torch.testing.assert_close(plugin_b.covariances["backbone.1"],
                               plugin_a.covariances["backbone.1"], rtol=0, atol=0)
    # a fresh plugin (nothing restored) continues differently: the state matters
    after_c = continue_with(NSCLPlugin(), model_c)
    assert not torch.equal(after_c["backbone.1.weight"], after_a["backbone.1.weight"])
    with pytest.raises(ValueError, match="a="):
        NSCLPlugin(a=30.0).load_state_dict(state)


def test_unsupported_layer_raises_with_its_path():
    bb = _backbone(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), out=4)
    model = ClassifierNet(bb, MultiHeadClassifier(4, 2, masking=False))
    plugin = NSCLPlugin()
    st = _strategy(model, None, torch.randn(2, 4, 5, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UnsupportedLayerError, match=r"'backbone\.0'.*groups=2"):
        plugin.before_training_exp(st)
    bb = _backbone(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 4), out=4)
    model = ClassifierNet(bb, MultiHeadClassifier(4, 2, masking=False))
    with pytest.raises(UnsupportedLayerError, match=r"'backbone\.0'.*Conv1d"):
        plugin.before_training_exp(_strategy(model, None, torch.randn(2, 2, 5),
                                             torch.zeros(2, dtype=torch.long)))


def test_changed_layers_raise():
    plugin = NSCLPlugin(bn_ewc_lambda=0.0)
    x, y = torch.randn(4, 6, dtype=DT), torch.zeros(4, dtype=torch.long)
    plugin.after_training_exp(_strategy(_mlp(), None, x, y))
    with pytest.raises(ValueError, match="fan-in"):
        plugin.before_training_exp(_strategy(_mlp(bias=False), None, x, y))


@pytest.mark.parametrize("kwargs, match", [
    ({"a": 0.5}, "a must be"), ({"features": "mean"}, "features"),
    ({"frobenius_scale": 1}, "frobenius_scale"), ({"bn_importance": "fisher"}, "bn_importance"),
    ({"bias": "drop"}, "bias"),
    ({"stats_batch_size": 0}, "stats_batch_size"), ({"stats_shuffle": "yes"}, "stats_shuffle"),
    ({"bn_ewc_lambda": -1.0}, "bn_ewc_lambda"), ({"lr_after_first": 0.0}, "lr_after_first"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSCLPlugin(**kwargs)


# ------------------------------------------------------------------------- end to end

def test_split_digits_less_forgetting_than_naive(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    digits_cfg["benchmark"]["scenario"] = "domain"  # one shared head: naive forgets
    digits_cfg["strategy"]["epochs"] = 3
    digits_cfg["methods"] = ["naive", {"name": "nscl", "params": {
        "frobenius_scale": False}}]
    naive, nscl = run_experiment(digits_cfg, echo=lambda *a: None)
    assert naive["status"] == nscl["status"] == "finished", nscl.get("error")
    a = np.asarray(nscl["matrix"])
    assert naive["summary"]["bwt"] < -0.05
    assert nscl["summary"]["bwt"] > -0.02
    assert nscl["summary"]["bwt"] > naive["summary"]["bwt"] + 0.05
    # and it still learns the later experiences: each A[j][j] above A[j-1][j] on average
    gains = [a[j, j] - a[j - 1, j] for j in range(1, len(a))]
    assert np.mean(gains) > 0.02


def test_bias_freeze_keeps_biases_and_drops_the_bias_column():
    x1, y1 = torch.randn(4, 6, dtype=DT), torch.randint(0, 3, (4,))
    x2, y2 = torch.randn(16, 6, dtype=DT), torch.randint(0, 3, (16,))
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    plugin = NSCLPlugin(bias="freeze", features="per_sample")
    st = _strategy(model, opt, x1, y1)
    plugin.before_training_exp(st)
    _step(model, opt, x1, y1, plugin, st)
    plugin.after_training_exp(st)
    assert plugin.covariances["backbone.0"].shape == (6, 6)  # no constant column
    frozen = param_copies(model)
    st2 = _strategy(model, opt, x2, y2)
    plugin.before_training_exp(st2)
    for _ in range(5):
        _step(model, opt, x2, y2, plugin, st2)
    now = param_copies(model)
    for name in ("backbone.0.bias", "backbone.2.bias"):
        assert torch.equal(now[name], frozen[name])
    assert not torch.equal(now["backbone.0.weight"], frozen["backbone.0.weight"])
    # rank-deficient task-1 inputs (4 samples in R^6): their layer outputs are unchanged
    torch.testing.assert_close(model.backbone[0](x1), nn.functional.linear(
        x1, frozen["backbone.0.weight"], frozen["backbone.0.bias"]), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------ plain-SGD gradient path

@pytest.mark.parametrize("bias", ["append", "freeze"])
def test_gradient_path_equals_update_path_under_plain_sgd(bias):
    # With plain SGD the update is -lr * grad, so projecting the gradient (from the step's
    # inputs, rank <= batch) must give the same parameters as projecting the update.
    torch.manual_seed(3)
    x1, y1 = torch.randn(40, 30, dtype=DT), torch.randint(0, 3, (40,))
    x2, y2 = torch.randn(4, 30, dtype=DT), torch.randint(0, 3, (4,))
    results, used = {}, {}
    for path in ("update", "gradient"):
        model = _mlp(d_in=30, hidden=40, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        plugin = NSCLPlugin(bias=bias, bn_ewc_lambda=0.0, projection_path=path,
                            stats_batch_size=1)
        st = _strategy(model, opt, x1, y1)
        plugin.after_training_exp(st)
        plugin.before_training_exp(st)
        gp = plugin._grad_projector
        calls = []
        inner = gp._from_inputs
        gp._from_inputs = lambda *a: calls.append(inner(*a) is not None) or inner(*a)
        for _ in range(3):
            _step(model, opt, x2, y2, plugin, st)
        assert plugin._path == path
        results[path], used[path] = param_copies(model), calls
    assert any(used["gradient"]) and not used["update"]  # the input side was taken
    for n in results["update"]:
        torch.testing.assert_close(results["gradient"][n], results["update"][n],
                                   rtol=0, atol=1e-12)


def test_projection_path_choice_follows_the_optimizer():
    model = _mlp()
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
    for opt, path, want in [
            (torch.optim.SGD(model.parameters(), lr=0.1), "auto", "gradient"),
            (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "auto", "update"),
            (torch.optim.Adam(model.parameters()), "auto", "update"),
            (torch.optim.SGD(model.parameters(), lr=0.1), "update", "update")]:
        plugin = NSCLPlugin(bn_ewc_lambda=0.0, projection_path=path)
        st = _strategy(model, opt, x, y)
        plugin.after_training_exp(st)
        plugin.before_training_exp(st)
        _step(model, opt, x, y, plugin, st)
        assert plugin._path == want, (type(opt).__name__, path)
    plugin = NSCLPlugin(bn_ewc_lambda=0.0, projection_path="gradient")
    opt = torch.optim.Adam(model.parameters())
    st = _strategy(model, opt, x, y)
    plugin.after_training_exp(st)
    plugin.before_training_exp(st)
    with pytest.raises(ValueError, match="projection_path='gradient' needs plain SGD"):
        _step(model, opt, x, y, plugin, st)
    with pytest.raises(ValueError, match="projection_path"):
        NSCLPlugin(projection_path="fast")
