"""ClusterBuffer (ExStream's merge rule): hand examples with exact centroids and counts (merges
of equal counts, and of unequal counts, where the count-weighted mean differs from the
midpoint), the vectorised rounds against a plain sequential reference, bytes, state, errors."""

from __future__ import annotations

import pytest
import torch

from cl_plugins.core.cluster_buffer import ClusterBuffer, capacity_for_bytes


def _by_key(buf):
    c, y, t, n = buf.contents()
    out = {}
    for k in range(c.shape[0]):
        out.setdefault((int(t[k]), int(y[k])), []).append((c[k].tolist(), int(n[k])))
    return out


def test_merge_rule_by_hand():
    buf = ClusterBuffer(3)
    zero = torch.zeros(1, dtype=torch.long)

    def add(p, label=0):
        buf.insert(torch.tensor([p], dtype=torch.float32), zero + label, zero)

    for p in ([0.0, 0.0], [4.0, 0.0], [3.0, 9.0]):  # room: three clusters of count 1
        add(p)
    assert _by_key(buf)[(0, 0)] == [([0, 0], 1), ([4, 0], 1), ([3, 9], 1)]
    # full: d(0,1) = 16 < d(1,2) = 82 < d(0,2) = 90: slots 0 and 1 merge into slot 1, the new
    # sample takes slot 0
    add([3.0, 11.0])
    assert _by_key(buf)[(0, 0)] == [([3, 11], 1), ([2, 0], 2), ([3, 9], 1)]
    add([50.0, 50.0])  # closest: slots 0 and 2 (distance 4) -> mean [3, 10], count 2
    assert _by_key(buf)[(0, 0)] == [([50, 50], 1), ([2, 0], 2), ([3, 10], 2)]
    add([2.0, 2.0])  # closest: slots 1, 2 (101 < 3809 < 4804): (2 [2,0] + 2 [3,10]) / 4
    assert _by_key(buf)[(0, 0)] == [([50, 50], 1), ([2, 2], 1), ([2.5, 5], 4)]
    add([7.0, 7.0], label=1)  # another class has its own buffer
    assert _by_key(buf)[(0, 1)] == [([7, 7], 1)]
    assert buf.n_seen == 7 and len(buf) == 4
    assert torch.equal(buf.counts.sum(1), torch.tensor([6, 1]))  # counts add up to the stream


def test_unequal_counts_merge_into_the_count_weighted_mean_by_hand():
    # the authors' slots: the merged cluster goes to the larger index j, the new point to i
    buf = ClusterBuffer(2, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.long)
    for p in ([0.0, 0.0], [1.0, 0.0], [10.0, 0.0]):
        buf.insert(torch.tensor([p], dtype=torch.float64), zero, zero)
    # full at [10, 0]: the only pair (0, 1) merges into slot 1 with count 2, [10, 0] takes slot 0
    assert _by_key(buf)[(0, 0)] == [([10, 0], 1), ([0.5, 0], 2)]
    buf.insert(torch.tensor([[11.0, 0.0]], dtype=torch.float64), zero, zero)
    # (1 x [10, 0] + 2 x [0.5, 0]) / 3 = [11/3, 0], count 3; the midpoint would be [5.25, 0]
    assert _by_key(buf)[(0, 0)] == [([11.0, 0.0], 1), ([11 / 3, 0.0], 3)]
    assert buf.counts[0].tolist() == [1, 3] and buf.n_seen == 4


def _reference(stream, capacity):
    """The authors' rule, one sample at a time, with plain Python lists."""
    bufs = {}
    for z, key in stream:
        cl = bufs.setdefault(key, [])
        if len(cl) < capacity:
            cl.append([z.clone(), 1])
            continue
        best, pair = None, None
        for i in range(len(cl)):
            for j in range(len(cl)):
                if i != j:
                    d = float(((cl[i][0] - cl[j][0]) ** 2).sum())
                    if best is None or d < best:
                        best, pair = d, (min(i, j), max(i, j))
        i, j = pair
        (ci, ni), (cj, nj) = cl[i], cl[j]
        cl[j] = [(ci * ni + cj * nj) / (ni + nj), ni + nj]
        cl[i] = [z.clone(), 1]
    return bufs


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_rounds_equal_the_sequential_rule(batch):
    g = torch.Generator().manual_seed(batch)
    n, d = 300, 5
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    t = torch.randint(0, 2, (n,), generator=g)
    buf = ClusterBuffer(6, dtype=torch.float64)
    for i in range(0, n, batch):
        buf.insert(z[i:i + batch], y[i:i + batch], t[i:i + batch])
    ref = _reference([(z[i], (int(t[i]), int(y[i]))) for i in range(n)], 6)
    got = _by_key(buf)
    assert set(got) == set(ref)
    for key, clusters in ref.items():
        assert len(got[key]) == len(clusters)
        for (c, cnt), (rc, rn) in zip(got[key], clusters):
            assert cnt == rn
            assert torch.allclose(torch.tensor(c, dtype=torch.float64), rc, rtol=0, atol=1e-12)
    assert buf.n_seen == n and int(buf.counts.sum()) == n


def test_bytes_and_capacity_for_bytes():
    buf = ClusterBuffer(30)
    assert buf.nbytes == 0
    for c in range(10):
        buf.insert(torch.randn(3, 64), torch.full((3,), c), torch.zeros(3, dtype=torch.long))
    # per class: 30 slots x (64 float32 + int64 count) + two int64 labels
    assert buf.nbytes == 10 * (30 * (64 * 4 + 8) + 16) == 79_360
    assert buf.cache_nbytes == 10 * 30 * 30 * 4
    # ER's 300 split_digits samples: 300 x (64 x 4 + 16) bytes = 81,600 -> 30 per class fit
    assert capacity_for_bytes(81_600, 10, 64) == 30
    # the largest that fits: 31 a class takes 82,000 bytes, so one byte less gives 30
    assert capacity_for_bytes(82_000, 10, 64) == 31 and capacity_for_bytes(81_999, 10, 64) == 30


def test_state_round_trip_continues_identically():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(80, 3, generator=g), torch.randint(0, 3, (80,), generator=g)
    t = torch.zeros(80, dtype=torch.long)
    a = ClusterBuffer(4)
    a.insert(z[:40], y[:40], t[:40])
    b = ClusterBuffer(4)
    b.load_state_dict(a.state_dict())
    a.insert(z[40:], y[40:], t[40:])
    b.insert(z[40:], y[40:], t[40:])
    for u, v in zip(a.contents(), b.contents()):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="capacity=4, this buffer has capacity=5"):
        ClusterBuffer(5).load_state_dict(a.state_dict())


def test_errors():
    with pytest.raises(ValueError, match="capacity"):
        ClusterBuffer(1)
    buf = ClusterBuffer(2)
    zero = torch.zeros(1, dtype=torch.long)
    buf.insert(torch.zeros(1, 3), zero, zero)
    with pytest.raises(ValueError, match="embeddings have 4 values"):
        buf.insert(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long),
                   torch.zeros(1, dtype=torch.long))
