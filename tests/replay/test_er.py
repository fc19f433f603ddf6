"""ER: the replayed minibatch, the stored samples, the memory policies and loss weighting, state
round trip, arguments; ER and DER++ forget much less than naive on split_digits and compose."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_plugins.experiment.runner import run_experiment
from cl_plugins.replay.er import ERPlugin

from helpers import (check_replay_state_round_trip, check_stream_replay_refuses_a_dataloader_owner,
                     er_der_strategy)


# ---------------------------------------------------------------------------- ER

class _BatchSpy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.sizes, self.tasks = [], []

    def after_forward(self, strategy, **kwargs):
        self.sizes.append((strategy.experience.current_experience, strategy.mb_x.shape[0],
                           strategy.mb_output.shape[0]))
        self.tasks.append(set(strategy.mb_task_id.tolist()))


def test_er_appends_a_memory_batch_and_stores_only_stream_samples():
    er, spy = ERPlugin(mem_size=100, replay_mb_size=16, seed=0), _BatchSpy()
    st, info = er_der_strategy([er, spy], scenario="task")
    stream = list(info.benchmark.train_stream)
    n_train = [len(e.dataset) for e in stream[:3]]
    for e in stream[:3]:
        st.train(e)
    # first step trains on the incoming batch alone; every later step has 16 replayed samples
    assert spy.sizes[0] == (0, 32, 32)
    tails = {n % 32 for n in n_train}
    assert all(s[1] == s[2] and s[1] - 16 in {32} | tails for s in spy.sizes[1:]), spy.sizes
    assert er.buffer.n_seen == sum(n_train)  # replayed samples are never stored again
    assert len(er.buffer) == 100 and set(er.buffer.t.tolist()) == {0, 1, 2}
    # task-IL multi-head: mixed-task batches go through the per-task heads
    assert any(len(t) > 1 for t in spy.tasks[-5:])
    # every stored sample is a sample of its task's training data, with its label
    for k in range(0, 100, 9):
        ds = stream[int(er.buffer.t[k])].dataset
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        hit = (xs == er.buffer.x[k]).flatten(1).all(1)
        assert hit.any() and int(ys[hit][0]) == int(er.buffer.y[k])


def test_er_stores_unaugmented_samples_and_augments_its_memory_batch():
    from cl_plugins.core.augment import BatchAugmentPlugin

    er, spy = ERPlugin(mem_size=40, replay_mb_size=8, seed=0), _BatchSpy()
    st, info = er_der_strategy([BatchAugmentPlugin(padding=2), er, spy])  # augmenter runs first
    seen = []

    class _Rows(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            seen.append(strategy.mb_x[-8:].clone())

    st.plugins.append(_Rows())
    exp = info.benchmark.train_stream[0]
    st.train(exp)
    xs = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))]).flatten(1)
    # every stored sample is an exact (unaugmented) training sample
    assert all((xs == row).all(1).any() for row in er.buffer.x.flatten(1))
    # the appended memory rows were augmented by ER itself (crops shift pixels off the grid)
    replayed = torch.cat(seen[1:]).flatten(1)
    exact = torch.tensor([bool((xs == row).all(1).any()) for row in replayed])
    assert exact.float().mean() < 0.5


def test_er_class_balanced_policy_balances_classes():
    er = ERPlugin(mem_size=60, policy="class_balanced", seed=0)
    st, info = er_der_strategy([er])
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert er.buffer.class_counts() == {c: 10 for c in range(6)}


def _dataset_rows(ds):
    xs = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    return xs, ys


def test_er_mem_per_class_fills_at_experience_end_and_grows():
    er, spy = ERPlugin(mem_size=None, mem_per_class=5, replay_mb_size=8, seed=0), _BatchSpy()
    st, info = er_der_strategy([er, spy], scenario="class")
    stream = list(info.benchmark.train_stream)
    st.train(stream[0])
    # nothing is stored or replayed while the first experience is trained
    assert all(s[1] == s[2] and s[1] <= 32 for s in spy.sizes) and er.n_experiences == 1
    assert er.store.class_counts() == {0: 5, 1: 5} and er.memory.sizes == [10]
    first = er.store.x.clone()
    spy.sizes.clear()
    st.train(stream[1])
    # every step of the second experience replays 8 samples, of the first experience's classes
    assert all(s[1] - 8 in {32, len(stream[1].dataset) % 32} for s in spy.sizes), spy.sizes
    assert er.store.class_counts() == {c: 5 for c in range(4)} and len(er.store) == 20
    assert torch.equal(er.store.x[:10], first)  # the first experience's samples stay
    for k, e in enumerate(stream[:2]):
        xs, ys = _dataset_rows(e.dataset)
        rows = er.store.x[10 * k:10 * (k + 1)].flatten(1)
        hit = (xs[None] == rows[:, None]).all(-1)
        assert hit.any(1).all() and hit.float().argmax(1).unique().numel() == 10  # distinct
        assert torch.equal(ys[hit.float().argmax(1)], er.store.y[10 * k:10 * (k + 1)])


class _LossRecorder(SupervisedPlugin):
    """Placed after ER: checks strategy.loss against the two weighted means by hand."""

    def __init__(self, er):
        super().__init__()
        self.er, self.checked = er, []

    def before_backward(self, strategy, **kwargs):
        n = self.er._incoming[0].shape[0]
        out, y = strategy.mb_output, strategy.mb_y
        if out.shape[0] == n:
            return
        t = strategy.experience.current_experience + 1
        cur, rep = F.cross_entropy(out[:n], y[:n]), F.cross_entropy(out[n:], y[n:])
        if self.er.loss_weighting == "vandeven":
            expected = cur / t + (1 - 1 / t) * rep
        else:
            expected = F.cross_entropy(out, y)
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        g = torch.autograd.grad(strategy.loss, params, retain_graph=True, allow_unused=True)
        g_exp = torch.autograd.grad(expected, params, retain_graph=True, allow_unused=True)
        for a, b, p in zip(g, g_exp, params):  # None: a head the loss does not touch
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
        assert float(strategy.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        self.checked.append(t)


@pytest.mark.parametrize("weighting", ["vandeven", "batch"])
def test_er_loss_weighting_by_hand(weighting):
    er = ERPlugin(mem_size=None, mem_per_class=10, replay_mb_size=16, seed=0,
                  loss_weighting=weighting)
    rec = _LossRecorder(er)
    st, info = er_der_strategy([er, rec], scenario="class")
    for e in list(info.benchmark.train_stream)[:3]:
        st.train(e)
    assert set(rec.checked) == {2, 3} and len(rec.checked) > 10
    # the weights themselves (ER takes them from cl_plugins.core.schedule)
    from cl_plugins.core.schedule import vandeven_weights
    assert vandeven_weights(1) == (1.0, 0.0)
    assert vandeven_weights(4) == (0.25, 0.75)


def test_er_per_task_sampling_balances_past_tasks():
    er = ERPlugin(mem_size=None, mem_per_class=5, replay_mb_size=8, seed=0,
                  batch_sampling="per_task")
    tails = []

    class _Tail(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            n = er._incoming[0].shape[0]
            tails.append((strategy.experience.current_experience,
                          strategy.mb_task_id[n:].tolist()))

    st, info = er_der_strategy([er, _Tail()], scenario="task")
    for e in list(info.benchmark.train_stream)[:4]:
        st.train(e)
    for exp, t in tails:
        if exp == 0:
            assert t == []
        else:  # ceil(8 / exp) samples of each past task, grouped by task
            k = -(-8 // exp)
            assert t == sorted(t) and all(t.count(j) == k for j in range(exp)), (exp, t)
            assert len(t) == k * exp
    # an online memory with one task label per sample is left as it was
    online = ERPlugin(mem_size=30, replay_mb_size=8, seed=0, batch_sampling="per_task")
    st, info = er_der_strategy([online], scenario="class")
    st.train(info.benchmark.train_stream[0])
    assert len(online.store) == 30


def test_per_experience_policy_replays_only_past_experiences_with_an_equal_split():
    # Hsu et al.'s Naive_Rehearsal memory: filled at the end of each experience, mem_size split
    # equally over the experiences seen, never the current experience's samples.
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    plugin = ERPlugin(mem_size=10, policy="per_experience", seed=0)
    assert plugin.store is None  # nothing before the first experience ends
    for k in range(3):
        x = torch.full((20, 2), float(k))
        ds = TensorDataset(x, torch.full((20,), k), torch.zeros(20, dtype=torch.long))
        st = SimpleNamespace(experience=SimpleNamespace(dataset=ds))
        plugin.after_training_exp(st)
        xs = plugin.store.get(torch.arange(len(plugin.store))).x
        counts = torch.bincount(xs[:, 0].long(), minlength=k + 1).tolist()
        assert counts == [10 // (k + 1)] * (k + 1), counts  # 10 // k per experience
    state = plugin.state_dict()
    other = ERPlugin(mem_size=10, policy="per_experience", seed=5)
    other.load_state_dict(state)
    assert len(other.store) == len(plugin.store)
    with pytest.raises(ValueError, match="experience-end memory"):
        ERPlugin(mem_size=10, policy="reservoir").load_state_dict(state)


def test_stream_replay_refuses_a_dataloader_owner():
    check_stream_replay_refuses_a_dataloader_owner(ERPlugin)


# ---------------------------------------------------------------------------- state

@pytest.mark.parametrize("make", [lambda: ERPlugin(mem_size=40, seed=1),
                                 lambda: ERPlugin(mem_size=40, seed=1, policy="class_balanced"),
                                 lambda: ERPlugin(mem_size=None, mem_per_class=8, seed=1,
                                                   loss_weighting="vandeven",
                                                   batch_sampling="per_task")])
def test_state_round_trip_resumes_identically(make):
    check_replay_state_round_trip(make)


# ---------------------------------------------------------------------------- end to end

def test_er_and_derpp_forget_much_less_than_naive_and_compose(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "class"
    # 5 epochs: naive ends near 0.19 ACC / -0.98 BWT, ER and DER++ near 0.75 / -0.25 (seeds 0-2)
    digits_cfg["strategy"]["epochs"] = 5
    digits_cfg["methods"] = [
        "naive",
        {"name": "er", "params": {"mem_size": 300}},
        {"name": "der", "params": {"mem_size": 300}},
        # composition through the runner's "plus": one strategy, two plugins
        {"name": "er", "params": {"mem_size": 300},
         "plus": [{"name": "ewc", "params": {"ewc_lambda": 1.0}}]},
        {"name": "der", "params": {"mem_size": 300},
         "plus": [{"name": "si", "params": {"si_lambda": 10.0}}]},
    ]
    naive, er, der, er_ewc, der_si = run_experiment(digits_cfg, echo=lambda *a: None)
    for r in (naive, er, der, er_ewc, der_si):
        assert r["status"] == "finished", r.get("error")
    assert er_ewc["method"] == "er+ewc" and der_si["method"] == "der+si"
    for r in (er, der):
        assert r["summary"]["bwt"] > naive["summary"]["bwt"] + 0.5, (r["method"], r["summary"])
        assert r["summary"]["acc"] > naive["summary"]["acc"] + 0.4, (r["method"], r["summary"])
        a = np.asarray(r["matrix"])
        assert a[-1, :4].mean() > 0.5  # old classes are still recognised at the end
    # the second plugin takes part (same seed, different training) and replay still works
    assert er_ewc["matrix"] != er["matrix"] and der_si["matrix"] != der["matrix"]
    for r in (er_ewc, der_si):
        assert r["summary"]["acc"] > naive["summary"]["acc"] + 0.3, (r["method"], r["summary"])


# ---------------------------------------------------------------------------- arguments

def test_bad_arguments():
    with pytest.raises(ValueError, match="mem_size"):
        ERPlugin(mem_size=0)
    with pytest.raises(ValueError, match="replay_mb_size"):
        ERPlugin(replay_mb_size=0)
    with pytest.raises(ValueError, match="policy"):
        ERPlugin(policy="ring")
    with pytest.raises(ValueError, match="x_dtype"):
        ERPlugin(x_dtype="float8")
    with pytest.raises(ValueError, match="mem_per_class"):
        ERPlugin(mem_size=None, mem_per_class=0)
    with pytest.raises(ValueError, match="set mem_size=None"):
        ERPlugin(mem_per_class=100)  # the default mem_size=500 is the online memory's
    with pytest.raises(ValueError, match="mem_size=None needs mem_per_class"):
        ERPlugin(mem_size=None)
    with pytest.raises(ValueError, match="leave policy"):
        ERPlugin(mem_size=None, mem_per_class=10, policy="class_balanced")
    with pytest.raises(ValueError, match="x_dtype"):
        ERPlugin(mem_size=None, mem_per_class=10, x_dtype="float8")
    with pytest.raises(ValueError, match="loss_weighting"):
        ERPlugin(loss_weighting="1/t")
    with pytest.raises(ValueError, match="batch_sampling"):
        ERPlugin(batch_sampling="balanced")
    with pytest.raises(ValueError, match="mem_per_class"):  # a state of the other memory kind
        ERPlugin(mem_size=10, seed=0).load_state_dict(
            ERPlugin(mem_size=None, mem_per_class=3, seed=0).state_dict())
