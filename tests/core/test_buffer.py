"""ReplayBuffer: reservoir and class-balanced policies (statistics with fixed seeds), exact
sequential semantics of the vectorised update, state round trip, bytes accounting, errors."""

from __future__ import annotations

import math

import pytest
import torch

from cl_plugins.core.buffer import ReplayBuffer


def _stream(n, d=1):
    """Sample i has features i (so stored samples can be identified) and label i % 5."""
    ids = torch.arange(n)
    return ids.float().unsqueeze(1).repeat(1, d), ids % 5


def _feed(buf, x, y, batch_sizes):
    i, k = 0, 0
    while i < x.shape[0]:
        b = batch_sizes[k % len(batch_sizes)]
        buf.add(x[i:i + b], y[i:i + b])
        i, k = i + b, k + 1


def test_reservoir_inclusion_is_uniform():
    """Each of 1000 stream samples must end in a 100-slot buffer with probability 0.1."""
    reps, n, m = 2000, 1000, 100
    x, y = _stream(n)
    counts = torch.zeros(n)
    for r in range(reps):
        buf = ReplayBuffer(m, seed=r)
        # batches larger than the buffer exercise several samples drawing the same slot
        _feed(buf, x, y, [7, 250, 64])
        ids = buf.x[:, 0].long()
        assert len(buf) == m and buf.n_seen == n and ids.unique().numel() == m
        assert torch.equal(buf.y, ids % 5)  # fields stay aligned
        counts[ids] += 1
    p = m / n
    # sum over cells of (c - reps p)^2 / (reps p (1 - p)) is ~ chi-square with ~n dof
    z = float(((counts - reps * p) ** 2).sum() / (reps * p * (1 - p)))
    assert abs(z - n) < 5 * math.sqrt(2 * n), z
    # no order bias: early, middle and late samples are equally likely to be kept
    rate = counts / reps
    for part in (rate[:100], rate[450:550], rate[-100:]):
        assert abs(float(part.mean()) - p) < 0.006


def _sequential_reservoir(seed, m, batches):
    """Algorithm R one sample at a time, with the random numbers the buffer draws per batch."""
    g = torch.Generator().manual_seed(seed)
    slots, k = [None] * m, 0
    for batch in batches:
        u = torch.rand(len(batch), generator=g, dtype=torch.float64).tolist()
        for item, ui in zip(batch, u):
            if k < m:
                slots[k] = item
            else:
                j = math.floor(ui * (k + 1))
                if j < m:
                    slots[j] = item
            k += 1
    return slots


def test_vectorised_reservoir_matches_sequential_algorithm():
    x, y = _stream(600)
    sizes = [5, 40, 97, 3, 200]
    buf = ReplayBuffer(50, seed=11)
    batches, i, k = [], 0, 0
    while i < 600:
        b = sizes[k % len(sizes)]
        ret = buf.add(x[i:i + b], y[i:i + b])
        # the returned slot of every sample still stored is where it is
        kept = ret >= 0
        assert torch.equal(buf.x[ret[kept], 0].long(), torch.arange(i, i + ret.numel())[kept])
        batches.append(list(range(i, min(i + b, 600))))
        i, k = i + b, k + 1
    assert buf.x[:, 0].long().tolist() == _sequential_reservoir(11, 50, batches)


def test_class_balanced_equal_slots_and_uniform_within_class():
    # class-incremental stream: 5 classes one after the other, 300 samples each
    buf = ReplayBuffer(100, policy="class_balanced", seed=0)
    for c in range(5):
        buf.add(torch.zeros(300, 2), torch.full((300,), c))
        counts = buf.class_counts()
        assert sorted(counts) == list(range(c + 1)) and sum(counts.values()) == 100
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert buf.class_counts() == {c: 20 for c in range(5)}
    # imbalanced interleaved stream: class 0 is 90% of it; both classes get 50 slots, and
    # within class 0 inclusion is uniform over its 900 samples (reservoir inside the class)
    reps = 400
    labels = (torch.arange(1000) % 10 == 0).long()  # class 1 every 10th sample
    x = torch.arange(1000).float().unsqueeze(1)
    cls0 = (labels == 0).nonzero().squeeze(1)
    counts = torch.zeros(1000)
    for r in range(reps):
        buf = ReplayBuffer(100, policy="class_balanced", seed=r)
        _feed(buf, x, labels, [32])
        assert buf.class_counts() == {0: 50, 1: 50}
        counts[buf.x[:, 0].long()] += 1
    rate0 = counts[cls0] / reps
    assert abs(float(rate0.mean()) - 50 / 900) < 1e-6  # exactly 50 of 900 every time
    first, last = rate0[:300].mean(), rate0[-300:].mean()
    # per-sample rate ~0.056 with sd 0.0115 over 400 reps; means of 300 cells: sd ~7e-4
    assert abs(float(first - last)) < 0.006, (first, last)
    rate1 = counts[labels == 1] / reps  # 50 of the 100 class-1 samples, uniformly
    assert abs(float(rate1.mean()) - 0.5) < 1e-6
    assert abs(float(rate1[:50].mean() - rate1[50:].mean())) < 0.03


def test_greedy_class_balanced_is_balanced_and_never_replaces_within_class():
    buf = ReplayBuffer(90, policy="greedy_class_balanced", seed=0)
    x = torch.arange(900).float().unsqueeze(1)
    y = torch.arange(900) // 300  # classes 0, 1, 2, in order
    _feed(buf, x, y, [32])
    assert buf.class_counts() == {0: 30, 1: 30, 2: 30}
    # class 2 arrived last into a full buffer and filled its 30 slots first-come
    kept2 = sorted(buf.x[buf.y == 2, 0].long().tolist())
    assert kept2 == list(range(600, 630))


def test_state_round_trip_continues_identically():
    x, y = _stream(700, d=3)
    t = torch.arange(700) // 140
    logits = torch.randn(700, 4, generator=torch.Generator().manual_seed(0))
    for policy in ("reservoir", "class_balanced", "greedy_class_balanced"):
        a = ReplayBuffer(64, policy=policy, seed=5)
        a.add(x[:300], y[:300], t[:300], logits[:300])
        a.sample(10)
        b = ReplayBuffer(64, policy=policy, seed=999)
        b.load_state_dict(a.state_dict())
        for buf in (a, b):
            buf.add(x[300:], y[300:], t[300:], logits[300:])
        sa, sb = a.sample(20), b.sample(20)
        for f in ("x", "y", "t", "logits", "index"):
            assert torch.equal(getattr(sa, f), getattr(sb, f)), (policy, f)
        assert torch.equal(a.x, b.x) and a.n_seen == b.n_seen == 700
        assert a.seen_per_class == b.seen_per_class
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(65).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(64, policy="reservoir").load_state_dict(a.state_dict())


def test_bytes_accounting_and_storage_dtypes():
    x = torch.randn(10, 1, 8, 8)
    y, t = torch.arange(10), torch.zeros(10, dtype=torch.long)
    buf = ReplayBuffer(50, seed=0)
    assert buf.nbytes == 0
    buf.add(x, y, t, torch.randn(10, 10))
    # float32 inputs (64 x 4 bytes) + int64 label + int64 task label + 10 float32 logits
    assert buf.bytes_per_sample == 64 * 4 + 8 + 8 + 10 * 4
    assert buf.nbytes == 50 * buf.bytes_per_sample
    half = ReplayBuffer(50, seed=0, x_dtype="float16")
    half.add(x, y)
    assert half.bytes_per_sample == 64 * 2 + 8
    back = half.get(torch.arange(10))
    assert back.x.dtype == torch.float32 and torch.allclose(back.x, x, atol=2e-3)
    assert back.t is None and back.logits is None
    u8 = ReplayBuffer(50, seed=0)
    u8.add(torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8), y)
    assert u8.bytes_per_sample == 28 * 28 + 8 and u8.sample(4).x.dtype == torch.uint8


def test_sample_get_iterate_and_dataset():
    x, y = _stream(30, d=2)
    buf = ReplayBuffer(20, seed=1)
    buf.add(x, y)
    s = buf.sample(8)
    assert s.index.unique().numel() == 8 and torch.equal(s.x, buf.x[s.index])
    assert buf.sample(100).index.sort().values.tolist() == list(range(20))  # min(n, len)
    seen = torch.cat([b.index for b in buf.iter_batches(6)])
    assert seen.tolist() == list(range(20))
    shuffled = torch.cat([b.index for b in buf.iter_batches(6, shuffle=True)])
    assert sorted(shuffled.tolist()) == list(range(20)) and shuffled.tolist() != list(range(20))
    ds = buf.to_dataset()
    assert len(ds) == 20 and torch.equal(ds[3][0], buf.x[3]) and int(ds[3][2]) == 0
    new_x = torch.full((5, 2), 7.0)
    buf.set_contents(new_x, torch.arange(5), logits=torch.ones(5, 3))
    assert len(buf) == 5 and buf.n_seen == 30 and buf.stores_logits
    assert buf.class_counts() == {c: 1 for c in range(5)}
    # free slots left by set_contents are filled first, then reservoir sampling resumes
    ret = buf.add(torch.zeros(15, 2), torch.full((15,), 9), logits=torch.zeros(15, 3))
    assert ret.tolist() == list(range(5, 20)) and buf.is_full and buf.n_seen == 45


def test_sample_per_task_draws_ceil_n_over_k_from_each_task():
    buf = ReplayBuffer(30, seed=0)
    t = torch.tensor([2] * 12 + [0] * 12 + [1] * 3)
    x, y = _stream(27)
    buf.add(x, y, t=t)
    for n, want in ((9, {0: 3, 1: 3, 2: 3}), (12, {0: 4, 1: 3, 2: 4}), (1, {0: 1, 1: 1, 2: 1})):
        b = buf.sample_per_task(n)
        counts = {int(k): int(c) for k, c in zip(*torch.unique(b.t, return_counts=True))}
        assert counts == want, (n, counts)  # task 1 holds only 3 samples
        assert b.index.unique().numel() == b.index.numel()  # distinct
        assert b.t.tolist() == sorted(b.t.tolist())  # grouped by task label
        assert torch.equal(b.x, buf.x[b.index]) and torch.equal(b.t, buf.t[b.index])
    # every sample of a task is reachable (uniform within the task)
    hits = torch.cat([buf.sample_per_task(6).index for _ in range(200)])
    assert set(hits.tolist()) == set(range(27))
    # one task label: exactly sample(n), same draws
    one = ReplayBuffer(20, seed=4)
    one.add(*_stream(20), t=torch.zeros(20, dtype=torch.long))
    state = one.generator.get_state()
    a = one.sample_per_task(7)
    one.generator.set_state(state)
    assert torch.equal(a.index, one.sample(7).index)
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(5, seed=0).sample_per_task(2)


def test_global_seed_makes_unseeded_buffers_reproducible():
    torch.manual_seed(3)
    a = ReplayBuffer(10)
    torch.manual_seed(3)
    b = ReplayBuffer(10)
    torch.manual_seed(4)
    c = ReplayBuffer(10)
    assert a.seed == b.seed != c.seed


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(10, policy="fifo")
    with pytest.raises(ValueError, match="x_dtype"):
        ReplayBuffer(10, x_dtype="int3")
    with pytest.raises(ValueError, match="seed"):
        ReplayBuffer(10, seed=-1)
    buf = ReplayBuffer(10, seed=0)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(2)
    buf.add(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), t=torch.zeros(4))
    with pytest.raises(ValueError, match="stores t"):
        buf.add(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        buf.add(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), t=torch.zeros(4))
    with pytest.raises(ValueError, match="one label per row"):
        buf.add(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), t=torch.zeros(4))
    with pytest.raises(ValueError, match="slots"):
        buf.get(torch.tensor([7]))
    with pytest.raises(ValueError, match="capacity"):
        buf.set_contents(torch.zeros(11, 3), torch.zeros(11, dtype=torch.long))
