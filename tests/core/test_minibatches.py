"""core.minibatches: a plugin's own training loop (P&C's compress phase): exactly N updates
cycling over the data or whole passes, the same batches whether samples are read from tensors
or through a DataLoader, the plugin's generator only; the optimizer copy and the loop."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.divergence import DivergenceError
from cl_plugins.core.minibatches import (dataset_tensors, minimise, optimizer_like,
                                         shuffled_minibatches)


class Items(Dataset):
    """The same samples as a TensorDataset, read one by one (no tensor fast path)."""

    def __init__(self, *tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)


def batches(data, seed=3, **length):
    return list(shuffled_minibatches(data, 4, torch.Generator().manual_seed(seed), **length))


def test_updates_cycle_over_reshuffled_passes():
    x = torch.arange(10).float().unsqueeze(1)
    data = TensorDataset(x, torch.arange(10))
    out = batches(data, updates=7)  # passes of 4 + 4 + 2, then 4 of the next pass
    assert [len(b[1]) for b in out] == [4, 4, 2, 4, 4, 2, 4]
    first, second = torch.cat([b[1] for b in out[:3]]), torch.cat([b[1] for b in out[3:6]])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()  # each pass drawn anew
    assert all(torch.equal(b[0].squeeze(1), b[1].float()) for b in out)  # rows stay together
    assert [len(b[1]) for b in batches(data, epochs=2)] == [4, 4, 2] * 2
    assert batches(data, updates=0) == [] and batches(data, epochs=0) == []


def test_same_batches_from_tensors_or_item_by_item_and_no_global_draw():
    x, y = torch.randn(9, 2), torch.arange(9)
    torch.manual_seed(0)
    fast = batches(TensorDataset(x, y), updates=5)
    after = torch.rand(1)
    torch.manual_seed(0)
    slow = batches(Items(x, y), updates=5)
    assert torch.equal(torch.rand(1), after)  # the global stream is untouched either way
    assert len(fast) == len(slow) == 5
    assert all(torch.equal(a, b) for fb, sb in zip(fast, slow) for a, b in zip(fb, sb))


def test_avalanche_training_data_is_read_once_as_tensors():
    exp = build_benchmark("split_digits", "task").benchmark.train_stream[1]
    data = exp.dataset.train()
    rows = dataset_tensors(data)
    assert rows is not None and len(rows) == 3 and len(rows[0]) == len(data)
    i = 7
    assert all(torch.equal(torch.as_tensor(r[i]), torch.as_tensor(f))
               for r, f in zip(rows, data[i]))
    got = batches(data, updates=3)
    assert torch.equal(got[0][2], torch.ones(4, dtype=got[0][2].dtype))  # task label 1


def test_bad_arguments():
    data = TensorDataset(torch.zeros(3, 1))
    g = torch.Generator()
    with pytest.raises(ValueError, match="exactly one of updates, epochs"):
        next(shuffled_minibatches(data, 2, g))
    with pytest.raises(ValueError, match="exactly one of updates, epochs"):
        next(shuffled_minibatches(data, 2, g, updates=1, epochs=1))
    with pytest.raises(ValueError, match="batch_size must be in"):
        next(shuffled_minibatches(data, 0, g, updates=1))
    with pytest.raises(ValueError, match="dataset is empty"):
        next(shuffled_minibatches(TensorDataset(torch.zeros(0, 1)), 2, g, updates=1))


def test_optimizer_like_and_minimise():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    base = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.5)
    opt = optimizer_like(base, [w], lr=0.25)
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    assert opt.param_groups[0]["lr"] == 0.25 and base.param_groups[0]["lr"] == 0.1
    plain = optimizer_like(torch.optim.SGD([w], lr=0.5), [w])
    assert minimise(lambda b: (w ** 2).sum(), [None, None], plain, "x") == 2
    assert torch.allclose(w.detach(), torch.tensor([0.0, 0.0]))  # w - 0.5 * 2w, twice
    with pytest.raises(DivergenceError, match="^who: non-finite loss \\(nan\\) at update 1$"):
        minimise(lambda b: (w * b).sum(), [torch.ones(2), torch.tensor([float("nan"), 0.0])],
                 plain, "who")
