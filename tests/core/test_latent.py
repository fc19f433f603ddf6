"""core.latent: AR1's memory update by hand, bytes, the lower part found by tracing, the scaled
step equal to a scaled learning rate (SGD with momentum and weight decay, Adam), the split's
hook (append, stop, inert copies), AR1's replay share and the replay order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cl_plugins.core.latent import (LatentMemory, LatentSplit, LowerPart, ReplayOrder,
                                   replay_share, trace_lower)


def _experience(k, n):
    """n activations of experience k: value k in every entry, labels k, task 0."""
    return torch.full((n, 3), float(k)), torch.full((n,), k), torch.zeros(n, dtype=torch.long)


def test_ar1_memory_update_by_hand():
    mem, gen = LatentMemory(12, None, seed=0), torch.Generator().manual_seed(0)
    mem.update(*_experience(1, 30), 1, gen)  # h = min(12 // 1, 30) = 12
    assert len(mem) == 12 and mem.buffer.class_counts() == {1: 12}
    mem.update(*_experience(2, 30), 2, gen)  # h = 6 replace 6 random
    assert mem.buffer.class_counts() == {1: 6, 2: 6}
    mem.update(*_experience(3, 30), 3, gen)  # h = 4 replace 4 random of the 12
    counts = mem.buffer.class_counts()
    assert counts[3] == 4 and counts[1] + counts[2] == 8 and len(mem) == 12
    b = mem.buffer.get(torch.arange(12))
    assert torch.equal(b.x[:, 0].long(), b.y)  # activations stay with their labels
    # a first experience smaller than the memory: free slots are filled first
    mem, gen = LatentMemory(10, None, seed=0), torch.Generator().manual_seed(0)
    mem.update(*_experience(1, 4), 1, gen)
    mem.update(*_experience(2, 30), 2, gen)  # h = 5 <= 6 free slots: none replaced
    assert mem.buffer.class_counts() == {1: 4, 2: 5}


def test_memory_bytes_match_er_accounting():
    mem = LatentMemory(None, 81_600, seed=0)  # ER's 300 digits: 300 x (64 x 4 + 16)
    z, y, t = _experience(1, 1000)
    z = torch.zeros(1000, 32)  # a 32-unit layer: 32 x 4 + 16 = 144 bytes a slot
    assert mem.slot_bytes((32,), torch.float32) == 144
    mem.update(z, y, t, 1, torch.Generator().manual_seed(0))
    assert mem.buffer.capacity == 81_600 // 144 == 566 and mem.nbytes == 566 * 144
    half = LatentMemory(None, 81_600, dtype="float16", seed=0)
    assert half.slot_bytes((32,), torch.float32) == 80
    with pytest.raises(ValueError, match="less than one stored activation"):
        LatentMemory(None, 100, seed=0).update(z, y, t, 1, torch.Generator())
    with pytest.raises(ValueError, match="exactly one of mem_size"):
        LatentMemory(5, 100)
    with pytest.raises(ValueError, match="exactly one of mem_size"):
        LatentMemory(None, None)
    with pytest.raises(ValueError, match="latent_dtype"):
        LatentMemory(5, None, dtype="uint8")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(3, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.bn(self.a(x)))))


def test_trace_lower_and_split_hook():
    net = _Net()
    lower = trace_lower(net, net.bn, lambda: net(torch.randn(2, 4)))
    assert lower == [net.a, net.bn]
    part = LowerPart(lower)
    assert {id(p) for p in part.params} == {id(p) for m in (net.a, net.bn) for p in m.parameters()}
    split = LatentSplit(net, "b", "test")
    x, extra = torch.randn(3, 4), torch.randn(2, 3)
    split.armed, split.extra = True, extra
    out = net(x)
    split.armed = False
    h = split.take()
    assert out.shape == (5, 2)
    assert torch.allclose(out, net.c(torch.relu(torch.cat([h, extra]))))
    assert torch.allclose(split.latents(net, x, torch.zeros(3, dtype=torch.long)),
                          net.eval().b(net.bn(net.a(x))))
    net.train()
    clone = copy.deepcopy(net)  # the copied hook is inert
    split.armed, split.extra = True, extra
    assert clone(x).shape == (3, 2)
    split.armed = False
    with pytest.raises(ValueError, match="no module named"):
        LatentSplit(net, "nope", "test")


@pytest.mark.parametrize("make", [
    lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.01),
    lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1)])
def test_scaled_step_is_a_scaled_learning_rate(make):
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3).double(), None
    b = copy.deepcopy(a)
    part = LowerPart([a])
    opt_a, opt_b = make(a.parameters(), 0.1), make(b.parameters(), 0.1 * 0.25)
    for step in range(5):
        x = torch.randn(8, 4, dtype=torch.float64)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
        part.snapshot()
        opt_a.step()
        part.scale_step(0.25)
        opt_b.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-12), step


def test_replay_share_and_order():
    # AR1's proportion: an epoch of 288 samples in minibatches of 32 passes once over 300 rows
    assert replay_share(32, 300, 288) == 34 and replay_share(32, 0, 288) == 0
    assert replay_share(32, 10, 5) == 10  # never more than the memory
    order, gen = ReplayOrder(), torch.Generator().manual_seed(0)
    slots = torch.cat([order.next(4, 10, gen) for _ in range(5)])  # two full passes
    assert sorted(slots[:10].tolist()) == list(range(10))
    assert sorted(slots[10:20].tolist()) == list(range(10))
    order.reset()
    assert order.queue.numel() == 0
