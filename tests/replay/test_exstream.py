"""ExStream: the centroids replayed into the head with their labels (by hand), one pass over the
stream (base initialisation, then first epochs only), the frozen lower part, bytes equal to a
given ER budget, arguments, exact resume, and it beats naive on split_digits class-IL. The merge
rule itself: tests/core/test_cluster_buffer.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cl_plugins.core.cluster_buffer import capacity_for_bytes
from cl_plugins.replay.exstream import ExStreamPlugin

from helpers import (HeadInputSpy, digits_strategy, final_mean_accuracy, param_copies,
                     train_both_equal)


_strategy = digits_strategy


class _Spy(HeadInputSpy):
    """The buffer's contents before each step, after the common record."""

    def extra(self):
        return ([v.clone() for v in self.plugin.buffer.contents()],)


def test_every_centroid_reaches_the_head_with_its_label():
    ex = ExStreamPlugin(mem_per_class=4, seed=0)
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
        ExStreamPlugin(replay_mb_size=0)
    with pytest.raises(ValueError, match="freeze_after must be in"):
        ExStreamPlugin(freeze_after=3)
    with pytest.raises(ValueError, match="layer must be a module name"):
        ExStreamPlugin(layer=None)
    with pytest.raises(ValueError, match="seed"):
        ExStreamPlugin(seed=-1)


def test_state_round_trip_resumes_exactly():
    def make(seed=1):
        return ExStreamPlugin(mem_per_class=6, replay_mb_size=20, seed=seed)

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
        ExStreamPlugin(mem_per_class=7, replay_mb_size=20).load_state_dict(state)
    from cl_plugins.replay.latent_replay import LatentReplayPlugin

    with pytest.raises(ValueError, match="^this state was saved by ExStreamPlugin; "
                                         "LatentReplayPlugin cannot load it$"):
        LatentReplayPlugin().load_state_dict(state)
    with pytest.raises(ValueError, match="names no plugin class"):
        make().load_state_dict({k: v for k, v in state.items() if k != "saved_by"})


def test_beats_naive_on_split_digits_class_il():
    # measured (seed 0, Adam 1e-3, 5 epochs, 64-64 MLP split after its first hidden layer):
    # naive 0.19, ExStream (30 a class, 79,360 bytes) 0.835
    accs = {}
    for name, plugins in (("naive", []), ("exstream", [ExStreamPlugin(
            layer="backbone.layers.1", mem_per_class=30, seed=0)])):
        accs[name] = final_mean_accuracy(plugins, hidden=(64, 64), epochs=5, sgd=False)
    assert accs["exstream"] > accs["naive"] + 0.4, accs
