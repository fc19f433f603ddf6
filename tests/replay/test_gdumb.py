"""GDumb (Prabhu et al. 2020): the schedule, greedy balance, re-initialisation, memory-only
training, dataloader ownership, clipping, train_only_last, the official recipe, state round trip,
arguments; GDumb and MIR forget much less than naive on split_digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import (GDumbPlugin as AvalancheGDumb, LRSchedulerPlugin,
                                        ReplayPlugin)
from torch import nn

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.experiment.runner import run_experiment
from cl_plugins.registry import signature_defaults
from cl_plugins.replay.er import ERPlugin
from cl_plugins.replay.gdumb import GDumbPlugin, gdumb_lr

from helpers import REPO, gdumb_mir_strategy, param_copies


def _gdumb(**kw):
    base = dict(mem_size=120, epochs_on_memory=3, crop_padding=0, seed=0)
    return GDumbPlugin(**{**base, **kw})


def _stream_xy(exp):
    ds = exp.dataset
    xs = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    return xs, ys


def test_gdumb_lr_matches_the_official_warm_restart_loop():
    lr_max, lr_min = 0.05, 0.0005
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr_max)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1, T_mult=2,
                                                                 eta_min=lr_min)
    expected = []
    for epoch in range(128):  # GDumb's main.py: warm start, then max, then scheduler.step()
        if epoch == 0:
            opt.param_groups[0]["lr"] = 0.1 * lr_max
        elif epoch == 1:
            opt.param_groups[0]["lr"] = lr_max
        else:
            sched.step()
        expected.append(opt.param_groups[0]["lr"])
    got = [gdumb_lr(e, lr_max, lr_min) for e in range(128)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[2] == lr_max and got[127] < 1.1 * lr_min  # restarts at 2, 4, 8, ..., 64


def test_gdumb_sets_the_lr_per_pass_and_restores_it():
    lrs = []

    class _Lr(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kwargs):
            lrs.append((strategy.clock.train_exp_epochs, strategy.optimizer.param_groups[0]["lr"]))

    g = _gdumb(epochs_on_memory=6, lr_max=0.2, lr_min=0.01)
    st, info = gdumb_mir_strategy([g, _Lr()], lr=0.123)
    st.train(info.benchmark.train_stream[0])
    per_epoch = dict(lrs)
    assert sorted(per_epoch) == list(range(6))
    assert [per_epoch[e] for e in range(6)] == [gdumb_lr(e, 0.2, 0.01) for e in range(6)]
    assert st.optimizer.param_groups[0]["lr"] == 0.123 and st.train_epochs == 1


def test_gdumb_memory_is_greedy_class_balanced_stream_samples():
    g = _gdumb(mem_size=100, epochs_on_memory=1)
    st, info = gdumb_mir_strategy([g])
    stream = list(info.benchmark.train_stream)
    seen = 0
    for k, e in enumerate(stream):
        st.train(e)
        seen += len(e.dataset)
        counts = g.class_counts()
        assert sorted(counts) == [(0, c) for c in range(2 * (k + 1))]  # every class seen has slots
        assert max(counts.values()) - min(counts.values()) <= 1, counts
        assert len(g.buffer) == 100 and g.buffer.n_seen == seen
    xs = torch.cat([_stream_xy(e)[0] for e in stream])
    ys = torch.cat([_stream_xy(e)[1] for e in stream])
    mem_x, mem_y, _ = g.memory_dataset().tensors
    for row, y in zip(mem_x.flatten(1), mem_y):  # exact stream samples, right label
        hit = (xs == row).all(1)
        assert hit.any() and int(ys[hit][0]) == int(y)


@pytest.mark.parametrize("shuffle", [True, False])
def test_gdumb_memory_draws_from_the_whole_experience(shuffle):
    """The official code fills a class's slots with a scrambled subset of all its training
    samples (numpy's unstable argsort), Avalanche's buffer with a random one. An experience's
    dataset is a set (class-sorted, in file order, here and on MNIST): offered in that order, the
    greedy memory would hold only the first samples of every class (on G1, MLP-100, memory 500:
    ~1.5 points of ACC)."""
    exp = build_benchmark("split_digits", "class").benchmark.train_stream[0]
    xs, ys = _stream_xy(exp)
    assert bool((ys[1:] >= ys[:-1]).all())  # class-sorted: the head of a class is its start

    def ranks(seed):
        g = _gdumb(mem_size=20, seed=seed, shuffle_stream=shuffle)
        g.fill_memory(exp.dataset)
        mem_x, mem_y, _ = g.memory_dataset().tensors
        hit = (mem_x.flatten(1)[:, None, :] == xs[None]).all(-1).float().argmax(1)
        start = {int(c): int((ys < c).sum()) for c in ys.unique()}
        return {int(c): sorted(int(i) - start[int(c)] for i, y in zip(hit, mem_y) if y == c)
                for c in mem_y.unique()}

    got = ranks(0)
    assert sorted(got) == [0, 1] and [len(v) for v in got.values()] == [10, 10]
    n = {c: int((ys == c).sum()) for c in (0, 1)}
    if shuffle:  # spread over each class, and drawn from the plugin's seed
        assert all(max(got[c]) >= n[c] // 2 for c in (0, 1)), got
        assert ranks(0) == got and ranks(1) != got
    else:  # the first 20 zeros fill the memory, the first 10 ones evict half of them
        assert max(got[0]) < 20 and got[1] == list(range(10))


class _Before(SupervisedPlugin):
    """Placed before GDumb: the weights before its reset."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def before_training_exp(self, strategy, **kwargs):
        self.weights.append(param_copies(strategy.model))


class _After(SupervisedPlugin):
    """Placed after GDumb: the weights after its reset and at the first step, the optimizer
    state at the first step, every training minibatch."""

    def __init__(self):
        super().__init__()
        self.weights, self.first_step, self.opt_state, self.batches = [], [], [], []

    def before_training_exp(self, strategy, **kwargs):
        self.weights.append(param_copies(strategy.model))
        self.batches.append([])

    def before_training_iteration(self, strategy, **kwargs):
        if not self.batches[-1]:
            self.first_step.append(param_copies(strategy.model))
            self.opt_state.append(len(strategy.optimizer.state))
        self.batches[-1].append((strategy.mb_x.clone(), strategy.mb_y.clone()))


def test_gdumb_reinitialises_and_trains_on_the_memory_only():
    before, after = _Before(), _After()
    g = _gdumb(mem_size=90, epochs_on_memory=2)
    st, info = gdumb_mir_strategy([before, g, after], mb=16)
    init = param_copies(st.model)
    stream = list(info.benchmark.train_stream)
    for k, e in enumerate(stream[:3]):
        st.train(e)
        mem_x, mem_y, _ = g.memory_dataset().tensors
        mem_x = mem_x.flatten(1)
        batches = after.batches[k]
        assert len(batches) == 2 * int(np.ceil(len(g.buffer) / 16))  # 2 passes over the memory
        rows = torch.cat([b[0] for b in batches]).flatten(1)
        labels = torch.cat([b[1] for b in batches])
        assert rows.shape[0] == 2 * len(g.buffer)
        # every training row is a memory sample, with its label; each pass covers the memory
        match = (rows[:, None, :] == mem_x[None]).all(-1)
        assert bool(match.any(1).all())
        assert torch.equal(mem_y[match.float().argmax(1)], labels)
        assert bool((match.sum(0) == 2).all())
        assert len(e.dataset) > len(g.buffer)  # so the experience's data was not used
    for k in range(3):
        for n in init:
            assert torch.equal(after.weights[k][n], init[n]), (k, n)
            assert torch.equal(after.first_step[k][n], init[n]), (k, n)
        assert after.opt_state[k] == 0  # no momentum carried over
        if k:  # the model had been trained: the reset really changed it
            assert any(not torch.equal(before.weights[k][n], init[n]) for n in init)
    assert torch.equal(g.initial_state["head.linear.weight"], init["head.linear.weight"])


def test_gdumb_task_il_resets_every_head():
    g = _gdumb(mem_size=60, epochs_on_memory=1)
    st, info = gdumb_mir_strategy([g], scenario="task")
    stream = list(info.benchmark.train_stream)
    st.train(stream[0])
    head0 = {n: v.clone() for n, v in g.initial_state.items() if "classifiers" in n}
    assert head0 and all(".0." in n for n in head0)
    st.train(stream[1])
    st.train(stream[2])
    snap = g.initial_state
    # head 1 was stored fresh at experience 1 and restored at experience 2; head 0 from exp 0
    assert any(".1." in n for n in snap) and any(".2." in n for n in snap)
    for n, v in head0.items():
        assert torch.equal(snap[n], v)
    # each task's classes count apart (labels restart at 0 in every task): balanced over 6
    counts = g.class_counts()
    assert sorted(counts) == [(t, c) for t in range(3) for c in range(2)], counts
    assert set(counts.values()) == {10}
    assert set(g.memory_dataset().tensors[1].tolist()) == {0, 1}


def test_gdumb_dataloader_ownership():
    for other, pattern in ((ReplayPlugin(mem_size=10), r"GDumbPlugin \('gdumb'\) and ReplayPlugin"),
                           (AvalancheGDumb(mem_size=10), r"GDumbPlugin \('gdumb'\) and GDumbPlugin")):
        st, info = gdumb_mir_strategy([_gdumb(), other])
        with pytest.raises(ValueError, match=pattern):
            st.train(info.benchmark.train_stream[0])
    # a plugin that stores the incoming minibatches as the stream refuses GDumb's loader
    st, info = gdumb_mir_strategy([_gdumb(), ERPlugin(mem_size=10, seed=0)])
    with pytest.raises(ValueError, match=r"ERPlugin.*GDumbPlugin"):
        st.train(info.benchmark.train_stream[0])


def test_gdumb_refuses_a_second_lr_or_epoch_controller():
    st, info = gdumb_mir_strategy([_gdumb()])
    st.plugins.append(LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(st.optimizer, 1)))
    with pytest.raises(ValueError, match="warm_restarts"):
        st.train(info.benchmark.train_stream[0])
    st, info = gdumb_mir_strategy([_gdumb(), IterationBudgetPlugin(5)])
    with pytest.raises(ValueError, match="epochs_on_memory"):
        st.train(info.benchmark.train_stream[0])
    st, info = gdumb_mir_strategy([_gdumb(epochs_on_memory=None), IterationBudgetPlugin(5)])
    st.train(info.benchmark.train_stream[0])  # the budget alone sets the steps: fine


@pytest.mark.parametrize("clip", [1e-3, None])
def test_gdumb_clips_the_gradient_norm(clip):
    norms = []

    class _Norm(SupervisedPlugin):
        def before_update(self, strategy, **kwargs):
            g = [p.grad for p in strategy.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(x) for x in g]))))

    st, info = gdumb_mir_strategy([_gdumb(clip_grad_norm=clip), _Norm()])
    st.train(info.benchmark.train_stream[0])
    if clip is None:
        assert max(norms) > 1e-2
    else:
        assert max(norms) <= clip * (1 + 1e-5) and min(norms) > 0.9 * clip


def test_gdumb_train_only_last():
    steps = []

    class _Count(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            steps.append(0)

        def after_training_iteration(self, strategy, **kwargs):
            steps[-1] += 1

    g = _gdumb(mem_size=100, epochs_on_memory=2, train_only_last=True)
    st, info = gdumb_mir_strategy([g, _Count()])
    for e in info.benchmark.train_stream:
        st.train(e)
    assert steps[:4] == [0, 0, 0, 0] and steps[4] == 2 * int(np.ceil(100 / 16))
    assert len(g.class_counts()) == 10 and st.train_epochs == 1


def test_gdumb_crop_augments_memory_batches():
    rows = []

    class _Rows(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            rows.append(strategy.mb_x.clone())

    g = _gdumb(crop_padding=2)
    st, info = gdumb_mir_strategy([g, _Rows()])
    st.train(info.benchmark.train_stream[0])
    mem = g.buffer.x.flatten(1)
    got = torch.cat(rows).flatten(1)
    exact = (got[:, None, :] == mem[None]).all(-1).any(1)
    assert exact.float().mean() < 0.5  # most rows were shifted
    assert got.shape[1] == mem.shape[1]


def test_gdumb_defaults_are_the_official_recipe():
    """drimpossible/GDumb: src/opts.py (maxlr 0.05, minlr 0.0005, clip 10), src/main.py
    (warm-restart schedule), src/dataloader.py (RandomCrop(28, padding=4), no flip for MNIST),
    scripts/replicate.sh (128 passes, memory 4400 for MLP-400)."""
    expected = {"mem_size": 4400, "epochs_on_memory": 128, "lr_max": 0.05, "lr_min": 0.0005,
                "warm_restarts": True, "clip_grad_norm": 10.0, "crop_padding": 4,
                "hflip": False, "train_only_last": False, "shuffle_stream": True, "seed": None,
                "x_dtype": None, "x_range": None}
    assert signature_defaults(GDumbPlugin) == expected


def test_g1_config_is_the_official_mnist_protocol():
    from cl_plugins.experiment.config import load_config, normalize_methods, section_for

    path = REPO / "experiments/configs/prabhu2020_gdumb_split_mnist.yaml"
    cfg = load_config(path)
    b, st = cfg["benchmark"], cfg["strategy"]
    assert (b["name"], b["scenario"], b["n_experiences"], b["pad_to_32"]) == \
        ("split_mnist", "class", 5, False)
    assert b["normalize"] and b["mean"] == [0.1307] and b["std"] == [0.3081]
    assert st["train_mb_size"] == 16 and st["augment"] is None
    entries = {e.get("label", e["name"]): e for e in normalize_methods(cfg["methods"])}
    gdumb = {k: e for k, e in entries.items() if e["name"] == "gdumb"}
    assert sorted(gdumb) == ["gdumb", "gdumb-bn", "gdumb-mlp100", "gdumb-mlp100-bn"]
    for label, e in gdumb.items():
        opt = section_for(cfg, e, "optimizer")
        assert (opt["name"], opt["momentum"], opt["weight_decay"], opt["nesterov"]) == \
            ("sgd", 0.9, 1e-6, False)
        assert opt["scheduler"] is None
        model = section_for(cfg, e, "model")
        assert model["hidden"] == ([100, 100] if "mlp100" in label else [400, 400])
        assert e["params"]["mem_size"] == (500 if "mlp100" in label else 4400)
        # the recipe is the plugin's (official) defaults; only the BN-free MLP lowers lr_max
        assert set(e["params"]) <= {"mem_size", "lr_max"}
        assert e["params"].get("lr_max", 0.05) == (0.05 if "bn" in label else 0.01)
        if "bn" in label:
            assert (model["batch_norm"], model["bias"], model["bn_eps"]) == (True, False, 1e-6)


def test_gdumb_state_round_trip_resumes_identically():
    a = _gdumb(mem_size=80, epochs_on_memory=2, crop_padding=1, seed=3)
    st_a, info = gdumb_mir_strategy([a])
    stream = list(info.benchmark.train_stream)
    for e in stream[:2]:
        st_a.train(e)
    state = copy.deepcopy(a.state_dict())
    b = _gdumb(mem_size=80, epochs_on_memory=2, crop_padding=1, seed=11)
    b.load_state_dict(state)
    st_b, _ = gdumb_mir_strategy([b], seed=7)  # another initialisation: the stored one must win
    for e in stream[:2]:
        st_b.model.adaptation(e)
    st_b.model.load_state_dict(st_a.model.state_dict())
    torch.manual_seed(5)
    st_a.train(stream[2])
    torch.manual_seed(6)  # nothing of GDumb's training depends on the global RNG
    st_b.train(stream[2])
    for (n, pa), pb in zip(st_a.model.named_parameters(), st_b.model.parameters()):
        assert torch.equal(pa, pb), n
    assert torch.equal(a.buffer.x, b.buffer.x) and a.buffer.n_seen == b.buffer.n_seen


# ============================================================================ end to end

def test_gdumb_and_mir_forget_much_less_than_naive(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "class"
    digits_cfg["strategy"].update(epochs=1, train_mb_size=10)
    digits_cfg["optimizer"].update(name="sgd", lr=0.1)
    # seed 0 (measured): naive 0.19 / -0.96, MIR ~0.87 / -0.10, GDumb ~0.87 / -0.05 (ACC / BWT)
    digits_cfg["methods"] = [
        "naive",
        {"name": "mir", "params": {"mem_size": 300}},
        {"name": "gdumb", "params": {"mem_size": 300, "epochs_on_memory": 16,
                                     "crop_padding": 1},
         "strategy": {"train_mb_size": 16},
         "optimizer": {"momentum": 0.9, "weight_decay": 1e-6}},
    ]
    naive, mir, gdumb = run_experiment(digits_cfg, echo=lambda *a: None)
    for r in (naive, mir, gdumb):
        assert r["status"] == "finished", r.get("error")
    for r in (mir, gdumb):
        assert r["summary"]["bwt"] > naive["summary"]["bwt"] + 0.5, (r["method"], r["summary"])
        assert r["summary"]["acc"] > naive["summary"]["acc"] + 0.4, (r["method"], r["summary"])
        assert np.asarray(r["matrix"])[-1, :4].mean() > 0.6


# ============================================================================ arguments

def test_bad_arguments():
    for kw, name in [({"mem_size": 0}, "mem_size"), ({"epochs_on_memory": 0}, "epochs_on_memory"),
                     ({"lr_max": 0.0}, "lr_max"), ({"lr_min": -1e-3}, "lr_min"),
                     ({"lr_max": 0.01, "lr_min": 0.1}, "lr_min"),
                     ({"warm_restarts": 1}, "warm_restarts"),
                     ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
                     ({"crop_padding": -1}, "crop_padding"), ({"hflip": "yes"}, "hflip"),
                     ({"train_only_last": None}, "train_only_last"),
                     ({"shuffle_stream": "yes"}, "shuffle_stream"), ({"seed": -1}, "seed"),
                     ({"x_dtype": "float8"}, "x_dtype")]:
        with pytest.raises(ValueError, match=name):
            GDumbPlugin(**kw)
    # a flat input cannot be cropped: said at the first minibatch
    st, info = gdumb_mir_strategy([_gdumb(crop_padding=2)])

    class _Flat(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kwargs):
            strategy.mbatch[0] = strategy.mbatch[0].flatten(1)

    st.plugins.insert(0, _Flat())
    with pytest.raises(ValueError, match="crop_padding"):
        st.train(info.benchmark.train_stream[0])
