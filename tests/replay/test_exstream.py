"""ExStream: after each incoming minibatch, one pass over the whole buffer (optimizer steps,
rows and labels of every step checked against the buffer); the earlier joint step (centroids
appended to the incoming rows, by hand); the base initialisation's budget equal to latent
replay's first experience; a non-finite loss inside a pass stops the run; one pass over the
stream (base initialisation, then first epochs only), the frozen lower part, bytes equal to a
given ER budget, arguments, exact resume, and it beats naive on split_digits class-IL. The merge
rule itself: tests/core/test_cluster_buffer.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cl_plugins.core.buffer_pass import pass_batches, steps_per_pass
from cl_plugins.core.cluster_buffer import capacity_for_bytes
from cl_plugins.core.divergence import DivergenceError
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.replay.exstream import ExStreamPlugin
from cl_plugins.replay.latent_replay import LatentReplayPlugin

from helpers import (HeadInputSpy, digits_strategy, final_mean_accuracy, param_copies,
                     train_both_equal)


_strategy = digits_strategy


class _Spy(HeadInputSpy):
    """The buffer's contents before each step, after the common record."""

    def extra(self):
        return ([v.clone() for v in self.plugin.buffer.contents()],)


class _PassSpy(SupervisedPlugin):
    """Listed after ExStream: every optimizer step's head input and labels (the strategy's
    criterion and optimizer wrapped), grouped by incoming minibatch, with the buffer then."""

    def __init__(self, ex, st):
        super().__init__()
        self.ex, self.passes, self.cur = ex, [], []
        crit, step = st._criterion, st.optimizer.step
        st._criterion = lambda out, y: (self.cur[-1].append(y.clone()), crit(out, y))[1]
        st.optimizer.step = lambda *a, **k: (self.cur[-1].append("step"), step(*a, **k))[1]
        st.model.head.register_forward_hook(lambda m, i, o: self.cur.append([i[0].detach()]))

    def after_training_iteration(self, strategy, **kwargs):
        self.passes.append((strategy.experience.current_experience, self.cur,
                            self.ex.buffer.contents()))
        self.cur = []


def test_after_each_incoming_minibatch_one_pass_over_the_whole_buffer():
    ex = ExStreamPlugin(mem_per_class=5, buffer_batch_size=6, seed=0)
    st, stream, _ = _strategy([ex], hidden=(16,), sgd=False)
    spy = _PassSpy(ex, st)
    st.plugins.append(spy)
    steps = []
    for e in stream[:3]:
        st.train(e)
        steps.append(ex.steps)
    assert steps[0] == st.clock.train_exp_iterations  # base initialisation: the strategy's
    checked = 0
    for exp, calls, (c, yc, tc, _) in spy.passes:
        if exp == 0:
            assert len(calls) == 1
            continue
        # one optimizer step per minibatch of the pass: ceil(|C| / 6), each of 6 rows
        assert len(calls) == steps_per_pass(c.shape[0], 6) == math.ceil(c.shape[0] / 6)
        seen = []
        for head_in, y, step in calls:
            assert step == "step" and head_in.shape[0] == 6 == y.shape[0]
            hit = (head_in[:, None] == c[None]).all(-1)  # each row is one stored centroid
            assert bool((hit.sum(1) == 1).all())
            idx = hit.float().argmax(1)
            assert torch.equal(y, yc[idx])  # with its own label
            seen.append(idx)
        # the pass covers every cluster once; the last minibatch overlaps the one before
        assert sorted(torch.cat(seen[:-1]).tolist()) == sorted(set(torch.cat(seen[:-1]).tolist()))
        assert set(torch.cat(seen).tolist()) == set(range(c.shape[0]))
        checked += 1
    assert checked == sum(1 for p in spy.passes if p[0] > 0) > 10
    # the pass sizes add up to the plugin's count of this experience's optimizer steps
    assert steps[2] == sum(len(calls) for exp, calls, _ in spy.passes if exp == 2)


def test_pass_batches_follow_the_authors_loop():
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    got = pass_batches(20, 6, g)
    assert [b.tolist() for b in got] == [perm[s:s + 6].tolist() for s in (0, 6, 12, 14)]
    assert [b.tolist() for b in pass_batches(3, 100, g)] and len(pass_batches(3, 100, g)[0]) == 3
    assert pass_batches(0, 6, g) == [] and steps_per_pass(0, 6) == 0


def test_joint_step_appends_every_centroid_with_its_label():
    ex = ExStreamPlugin(mem_per_class=4, training="joint_step", seed=0)
    spy = _Spy(ex)
    st, stream, _ = _strategy([ex, spy], epochs=2)
    for e in stream[:3]:
        st.train(e)
    checked = 0
    for exp, n, own, head_in, y, t, loss, out, (c, yc, tc, _) in spy.steps:
        if exp == 0:  # base initialisation: no buffer yet
            assert c.shape[0] == 0 and head_in.shape[0] == n
            continue
        m = c.shape[0]
        assert m > 0 and head_in.shape[0] == n + m == y.shape[0] == t.shape[0] == out.shape[0]
        assert torch.allclose(head_in[:n], own)
        assert torch.equal(head_in[n:], c) and torch.equal(y[n:], yc) and torch.equal(t[n:], tc)
        assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)
        checked += 1
    assert checked > 10
    # after experience 1 (classes 0, 1) the base initialisation filled 4 clusters a class
    first = [s for s in spy.steps if s[0] == 1][0][-1]
    assert sorted(first[1].tolist()) == [0] * 4 + [1] * 4


def test_base_iterations_give_latent_replays_first_experience():
    lat = LatentReplayPlugin(layer="backbone.layers.1", mem_size=40, seed=0)
    st_a, stream_a, _ = _strategy([lat, IterationBudgetPlugin(20)], hidden=(16, 16), sgd=False)
    st_a.train(stream_a[0])
    ex = ExStreamPlugin(layer="backbone.layers.1", mem_per_class=4, base_iterations=20, seed=0)
    st_b, stream_b, _ = _strategy([ex], hidden=(16, 16), sgd=False)
    st_b.train(stream_b[0])  # 20 steps over 3 epochs, then train_epochs is 1 again
    assert ex.steps == st_b.clock.train_exp_iterations == 20 and st_b.train_epochs == 1
    a, b = param_copies(st_a.model), param_copies(st_b.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    st_b.train(stream_b[1])  # one pass over the second experience
    assert st_b.clock.train_exp_iterations == math.ceil(len(stream_b[1].dataset) / 32)
    bad, stream, _ = _strategy([ExStreamPlugin(base_iterations=5), IterationBudgetPlugin(5)])
    with pytest.raises(ValueError, match="base_iterations=5.*IterationBudgetPlugin"):
        bad.train(stream[0])


class _NanHead(SupervisedPlugin):
    def after_training_iteration(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1:
            with torch.no_grad():
                for p in strategy.model.head.parameters():
                    p.fill_(float("nan"))


def test_a_non_finite_loss_inside_a_pass_raises():
    ex = ExStreamPlugin(mem_per_class=5, buffer_batch_size=4, seed=0)
    st, stream, _ = _strategy([_NanHead(), ex])  # the NaN comes after step 1 of the pass
    st.train(stream[0])
    with pytest.raises(DivergenceError, match="non-finite loss in the buffer pass ending at "
                                              "optimizer step 5 of this experience"):
        st.train(stream[1])


def test_one_pass_over_the_stream_and_frozen_lower_part():
    ex = ExStreamPlugin(mem_per_class=5, seed=0)
    st, stream, _ = _strategy([ex], epochs=3)
    st.train(stream[0])
    after1 = param_copies(st.model)
    assert ex.buffer.n_seen == len(stream[0].dataset)  # base initialisation: one pass
    for e in stream[1:3]:
        st.train(e)
    # three epochs, yet every sample entered the buffers once
    assert ex.buffer.n_seen == sum(len(e.dataset) for e in stream[:3])
    _, y, _, counts = ex.buffer.contents()
    assert int(counts.sum()) == ex.buffer.n_seen and sorted(set(y.tolist())) == list(range(6))
    assert all(int((y == c).sum()) == 5 for c in range(6))
    now = param_copies(st.model)
    for name in now:
        assert torch.equal(now[name], after1[name]) == name.startswith("backbone"), name


def test_streaming_from_the_start_with_freeze_after_zero():
    ex = ExStreamPlugin(mem_per_class=3, freeze_after=0, seed=0)
    st, stream, _ = _strategy([ex])
    before = param_copies(st.model)
    st.train(stream[0])
    assert ex.buffer.n_seen == len(stream[0].dataset)
    assert torch.equal(before["backbone.layers.0.weight"],
                       st.model.backbone.layers[0].weight)


def test_bytes_for_an_er_budget():
    # ER's 300 split_digits samples take 300 x (64 x 4 + 16) = 81,600 bytes; a 64-unit
    # embedding fits 30 clusters a class for 10 classes
    cap = capacity_for_bytes(81_600, 10, 64)
    ex = ExStreamPlugin(layer="backbone.layers.1", mem_per_class=cap, seed=0)
    st, stream, _ = _strategy([ex], hidden=(64, 64))
    for e in stream:
        st.train(e)
    assert ex.nbytes == 10 * (30 * (64 * 4 + 8) + 16) == 79_360 <= 81_600


def test_bad_arguments():
    with pytest.raises(ValueError, match="mem_per_class must be in"):
        ExStreamPlugin(mem_per_class=1)
    with pytest.raises(ValueError, match="replay_mb_size"):
        ExStreamPlugin(replay_mb_size=0, training="joint_step")
    with pytest.raises(ValueError, match="replay_mb_size applies to training='joint_step'"):
        ExStreamPlugin(replay_mb_size=8)
    with pytest.raises(ValueError, match="buffer_batch_size must be in"):
        ExStreamPlugin(buffer_batch_size=0)
    with pytest.raises(ValueError, match="training must be one of 'buffer_epoch', 'joint_step'"):
        ExStreamPlugin(training="per_sample")
    with pytest.raises(ValueError, match="base_iterations must be in"):
        ExStreamPlugin(base_iterations=0)
    with pytest.raises(ValueError, match="base_iterations=10 .*freeze_after=0"):
        ExStreamPlugin(base_iterations=10, freeze_after=0)
    with pytest.raises(ValueError, match="freeze_after must be in"):
        ExStreamPlugin(freeze_after=3)
    with pytest.raises(ValueError, match="layer must be a module name"):
        ExStreamPlugin(layer=None)
    with pytest.raises(ValueError, match="seed"):
        ExStreamPlugin(seed=-1)


def test_state_round_trip_resumes_exactly():
    def make(seed=1):  # the pass orders draw from the plugin's generator
        return ExStreamPlugin(mem_per_class=6, buffer_batch_size=16, seed=seed)

    a = make()
    st_a, stream, _ = _strategy([a])
    for e in stream[:2]:
        st_a.train(e)
    state, model_state = copy.deepcopy(a.state_dict()), copy.deepcopy(st_a.model.state_dict())
    b = make(seed=99)
    b.load_state_dict(state)
    st_b, _, _ = _strategy([b], seed=7)
    train_both_equal(st_a, st_b, stream[2], stream[:2], model_state)
    for u, v in zip(a.buffer.contents(), b.buffer.contents()):
        assert torch.equal(u, v)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    with pytest.raises(ValueError, match="saved with mem_per_class=6, this plugin has "
                                         "mem_per_class=7"):
        ExStreamPlugin(mem_per_class=7, buffer_batch_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with training='buffer_epoch'"):
        ExStreamPlugin(mem_per_class=6, buffer_batch_size=16,
                       training="joint_step").load_state_dict(state)
    from cl_plugins.replay.latent_replay import LatentReplayPlugin

    with pytest.raises(ValueError, match="^this state was saved by ExStreamPlugin; "
                                         "LatentReplayPlugin cannot load it$"):
        LatentReplayPlugin().load_state_dict(state)
    with pytest.raises(ValueError, match="names no plugin class"):
        make().load_state_dict({k: v for k, v in state.items() if k != "saved_by"})


def test_beats_naive_on_split_digits_class_il():
    # measured (seed 0, Adam 1e-3, 5 epochs, 64-64 MLP split after its first hidden layer):
    # naive 0.19, ExStream (30 a class, 79,360 bytes) 0.916 (0.835 with training="joint_step")
    accs = {}
    for name, plugins in (("naive", []), ("exstream", [ExStreamPlugin(
            layer="backbone.layers.1", mem_per_class=30, seed=0)])):
        accs[name] = final_mean_accuracy(plugins, hidden=(64, 64), epochs=5, sgd=False)
    assert accs["exstream"] > accs["naive"] + 0.4, accs
