"""Latent replay: replayed activations reach the layers above with their labels (by hand), the
lower part frozen after experience 1 (BN statistics too) or slowed by lower_lr_scale (the step
by hand), memory bytes equal to ER's, arguments, exact resume, and it beats naive on
split_digits class-IL."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_plugins.replay.er import ERPlugin
from cl_plugins.replay.latent_replay import LatentReplayPlugin

from helpers import (HeadInputSpy, digits_strategy, final_mean_accuracy, param_copies,
                     train_both_equal)


_strategy = digits_strategy


class _Spy(HeadInputSpy):
    """Also the memory's contents at the start of each experience."""

    def __init__(self, plugin):
        super().__init__(plugin)
        self.memories = {}

    def before_training_exp(self, strategy, **kwargs):
        buf = self.plugin.memory.buffer
        if buf is not None:
            self.memories[strategy.experience.current_experience] = buf.get(
                torch.arange(len(buf)))


def test_replayed_activations_reach_the_head_with_their_labels():
    lr = LatentReplayPlugin(mem_size=40, replay_mb_size=8, seed=0)
    spy = _Spy(lr)
    st, stream, _ = _strategy([lr, spy], scenario="task")
    for e in stream[:3]:
        st.train(e)
    checked = 0
    for exp, n, own, head_in, y, t, loss, out in spy.steps:
        if exp == 0:  # nothing stored yet: the incoming rows alone
            assert head_in.shape[0] == n == y.shape[0]
            continue
        assert head_in.shape[0] == n + 8 == y.shape[0] == t.shape[0] == out.shape[0]
        assert torch.allclose(head_in[:n], own)  # rows 0..n-1: the incoming batch
        mem = spy.memories[exp]  # every replayed row is a stored one, with its labels
        for k in range(n, n + 8):
            hit = (mem.x == head_in[k]).all(1) & (mem.y == y[k]) & (mem.t == t[k])
            assert hit.any()
        checked += 1
        assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)
    assert checked > 5
    assert set(lr.memory.buffer.t.tolist()) == {0, 1, 2}  # task-IL: stored with task labels


def test_lower_part_frozen_after_experience_one_with_bn_statistics():
    lr = LatentReplayPlugin(mem_size=50, seed=0)
    st, stream, _ = _strategy([lr], batch_norm=True)
    before = param_copies(st.model)
    st.train(stream[0])
    after1 = param_copies(st.model)
    bn = st.model.backbone.layers[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    assert not torch.equal(before["backbone.layers.0.weight"], after1["backbone.layers.0.weight"])
    for e in stream[1:3]:
        st.train(e)
    now = param_copies(st.model)
    for name in now:
        same = torch.equal(now[name], after1[name])
        assert same == name.startswith("backbone"), name  # the head keeps learning
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert not any(p.requires_grad for p in st.model.backbone.parameters())


class _StepCheck(SupervisedPlugin):
    """Around the plugin: the lower part's step must be scale x the optimizer's own step."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def before_update(self, strategy, **kwargs):
        self.w = strategy.model.backbone.layers[0].weight
        self.old, self.g = self.w.detach().clone(), self.w.grad.detach().clone()

    def after_update(self, strategy, **kwargs):  # runs after the plugin's after_update
        if strategy.experience.current_experience > 0:
            expected = self.old - 0.05 * 0.1 * self.g  # SGD lr 0.05, scale 0.1
            assert torch.allclose(self.w.detach(), expected, rtol=0, atol=1e-7)
            self.checked += 1


def test_lower_lr_scale_slows_the_lower_part():
    lr, chk = LatentReplayPlugin(mem_size=50, lower_lr_scale=0.1, seed=0), _StepCheck()
    st, stream, _ = _strategy([chk, lr])
    # the checker's before_update runs first, its after_update after the plugin's: reorder
    st.plugins.remove(chk)
    st.plugins.insert(st.plugins.index(lr) + 1, chk)
    for e in stream[:2]:
        st.train(e)
    assert chk.checked > 5


def test_memory_in_bytes_matches_er():
    er = ERPlugin(mem_size=300, seed=0)
    st, stream, _ = _strategy([er])
    st.train(stream[0])
    assert er.buffer.nbytes == 300 * (64 * 4 + 16) == 81_600
    lr = LatentReplayPlugin(mem_size=None, mem_bytes=er.buffer.nbytes, seed=0)
    st, stream, _ = _strategy([lr], hidden=(32,))
    st.train(stream[0])
    # a 32-unit activation: 32 x 4 + 16 = 144 bytes a slot -> 566 slots within 81,600 bytes
    assert lr.memory.buffer.capacity == 566 and lr.nbytes == 566 * 144 <= 81_600


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of mem_size"):
        LatentReplayPlugin(mem_size=10, mem_bytes=1000)
    with pytest.raises(ValueError, match="lower_lr_scale must be in"):
        LatentReplayPlugin(lower_lr_scale=2.0)
    with pytest.raises(ValueError, match="freeze_after must be in"):
        LatentReplayPlugin(freeze_after=2)
    with pytest.raises(ValueError, match="replay_mb_size"):
        LatentReplayPlugin(replay_mb_size=0)
    with pytest.raises(ValueError, match="layer must be a module name"):
        LatentReplayPlugin(layer="")
    with pytest.raises(ValueError, match="latent_dtype"):
        LatentReplayPlugin(latent_dtype="int3")
    st, stream, _ = _strategy([LatentReplayPlugin(layer="backbone.nope", seed=0)])
    with pytest.raises(ValueError, match="no module named.*backbone.layers"):
        st.train(stream[0])


def test_state_round_trip_resumes_exactly():
    def make(seed=1):
        return LatentReplayPlugin(mem_size=60, replay_mb_size=10, lower_lr_scale=0.5, seed=seed)

    a = make()
    st_a, stream, _ = _strategy([a])
    for e in stream[:2]:
        st_a.train(e)
    state, model_state = copy.deepcopy(a.state_dict()), copy.deepcopy(st_a.model.state_dict())
    b = make(seed=99)  # the state's generator and seed must take over
    b.load_state_dict(state)
    st_b, _, _ = _strategy([b], seed=7)
    train_both_equal(st_a, st_b, stream[2], stream[:2], model_state)
    sa, sb = a.state_dict(), b.state_dict()
    assert torch.equal(sa["generator"], sb["generator"])
    assert torch.equal(a.memory.buffer.x, b.memory.buffer.x) and a.n_experiences == 3
    with pytest.raises(ValueError, match="saved with mem_size=60, this plugin has mem_size=61"):
        LatentReplayPlugin(mem_size=61, replay_mb_size=10, lower_lr_scale=0.5).load_state_dict(
            state)


def test_beats_naive_on_split_digits_class_il():
    # a 64-64 MLP split after its first hidden layer: the second layer and the head learn on
    # replayed activations (measured: naive 0.19, latent replay 0.71; seed 0)
    accs = {}
    for name, plugins in (("naive", []), ("latent", [LatentReplayPlugin(
            layer="backbone.layers.1", mem_size=300, seed=0)])):
        accs[name] = final_mean_accuracy(plugins, hidden=(64, 64), epochs=5, sgd=False)
    assert accs["latent"] > accs["naive"] + 0.3, accs


def test_memory_update_leaves_the_global_rng_alone():
    # the strategy's shuffling and the model draw from torch's global RNG: the plugin's
    # experience-end forward must not consume it (its loader has its own generator)
    lr = LatentReplayPlugin(mem_size=None, mem_bytes=20_000, seed=0)
    st, stream, _ = _strategy([lr])
    st.train(stream[0])
    st.experience = stream[1]
    torch.manual_seed(5)
    state = torch.get_rng_state().clone()
    lr.n_experiences = 2
    lr.end_experience(st)
    assert torch.equal(state, torch.get_rng_state())
    assert lr.memory.buffer.class_counts().keys() == {0, 1, 2, 3}


def test_composes_with_er_listed_before_and_refuses_it_after():
    er, lr = ERPlugin(mem_size=50, replay_mb_size=8, seed=0), LatentReplayPlugin(
        mem_size=40, replay_mb_size=4, seed=0)
    spy = _Spy(lr)
    st, stream, _ = _strategy([er, lr, spy])
    for e in stream[:2]:
        st.train(e)
    steps = [s for s in spy.steps if s[0] == 1]
    assert len(steps) > 5
    mem = spy.memories[1]
    for exp, n, own, head_in, y, t, loss, out in steps:  # stream, ER's 8 rows, 4 latents
        assert head_in.shape[0] == y.shape[0] == n + 4 and n - 8 in (32, len(stream[1].dataset)
                                                                      % 32)
        assert torch.allclose(head_in[:n], own)
        for k in range(n, n + 4):
            assert ((mem.x == head_in[k]).all(1) & (mem.y == y[k])).any()
    st, stream, _ = _strategy([LatentReplayPlugin(mem_size=40, seed=0), ERPlugin(mem_size=50)])
    with pytest.raises(ValueError, match="list it before LatentReplayPlugin"):
        for e in stream[:2]:
            st.train(e)
