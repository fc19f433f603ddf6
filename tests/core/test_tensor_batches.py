"""TensorBatchesPlugin serves exactly Avalanche's minibatches and random stream, only faster."""

from __future__ import annotations

import json

import pytest
import torch
from avalanche.benchmarks.utils import concat_datasets
from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader, TaskBalancedDataLoader

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.benchmarks.stored import PixelPermutedDataset, UInt8ImageDataset
from cl_plugins.core import tensor_batches as tb
from cl_plugins.experiment.cli import main


def _batches(loader, seed, epochs=2):
    torch.manual_seed(seed)
    out = [[b for b in loader] for _ in range(epochs)]
    return out, torch.get_rng_state()


def _same(a, b):
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb)
        for ba, bb in zip(ea, eb):
            assert len(ba) == len(bb)
            for fa, fb in zip(ba, bb):
                assert fa.dtype == fb.dtype and torch.equal(fa, fb)


@pytest.mark.parametrize("class_order", ["fixed", "seeded"])
@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_train_and_eval_batches_and_the_random_stream_are_avalanches(scenario, class_order):
    # "seeded": a class mapping that is not the identity, read before any sample was read one
    # by one (until 2026-12-07 the concatenation's later parts kept their unmapped labels)
    info = build_benchmark("split_digits", scenario, class_order=class_order, seed=3)
    stream = info.benchmark.train_stream
    datasets = {"one experience": stream[1].dataset.train(),
                "three concatenated (several task groups in task-IL)":
                    concat_datasets([e.dataset.train() for e in stream[:3]])}
    for what, ds in datasets.items():
        for loader in (TaskBalancedDataLoader(ds, oversample_small_groups=True, batch_size=32,
                                              shuffle=True),
                       SingleDatasetDataLoader(ds.eval(), batch_size=100, shuffle=False)):
            assert tb.eligible(loader), what
            fields = tb.read_all(loader, 1 << 30)
            expected, rng = _batches(loader, 5)
            got, rng_fast = _batches(tb.TensorLoader(loader, fields), 5)
            _same(expected, got)
            assert torch.equal(rng, rng_fast), what
            assert len(tb.TensorLoader(loader, fields)) == len(loader)


def test_row_readers_equal_the_per_sample_reads():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(20, 1, 4, 4, generator=g)
    y = torch.arange(20) % 3
    idx = torch.tensor([3, 0, 7, 7, 12])
    for perm in (None, torch.randperm(16, generator=g)):
        ds = PixelPermutedDataset(src, y, torch.arange(5, 20), perm)
        x, t = ds.rows(idx)
        assert torch.equal(x, torch.stack([ds[int(i)][0] for i in idx]))
        assert torch.equal(t, torch.stack([ds[int(i)][1] for i in idx]))
    for c in (1, 3):
        imgs = torch.randint(0, 256, (10, c, 5, 5), generator=g, dtype=torch.uint8)
        ds = UInt8ImageDataset(imgs, torch.arange(10), [0.5] * c, [0.25] * c)
        x, _ = ds.rows(torch.tensor([9, 2, 2]))
        assert torch.equal(x, torch.stack([ds[i][0] for i in (9, 2, 2)]))


def test_an_input_transform_or_workers_keep_the_per_sample_path():
    ds = build_benchmark("split_digits", "task").benchmark.train_stream[0].dataset.train()
    noisy = ds.replace_current_transform_group(lambda x: x + torch.randn_like(x))
    assert not tb.fixed_samples(noisy)
    # (Avalanche's TaskBalancedDataLoader splits by task with subset(), which drops a replaced
    # current transform group: its own per-sample path reads such data untransformed too.)
    assert not tb.eligible(SingleDatasetDataLoader(noisy, batch_size=8))
    assert not tb.eligible(TaskBalancedDataLoader(ds, batch_size=8, shuffle=True, num_workers=1))
    assert tb.eligible(TaskBalancedDataLoader(ds, batch_size=8, shuffle=True))
    assert not tb.eligible(torch.utils.data.DataLoader(ds, batch_size=8))


def test_a_memory_budget_too_small_keeps_the_per_sample_path():
    ds = build_benchmark("split_digits", "task").benchmark.train_stream[0].dataset.train()
    loader = TaskBalancedDataLoader(ds, batch_size=8, shuffle=True)
    assert tb.read_all(loader, 1000) is None and tb.read_all(loader, 1 << 30) is not None
    with pytest.raises(ValueError, match="max_bytes"):
        tb.TensorBatchesPlugin(max_bytes=-1)


@pytest.mark.parametrize("scenario,methods,extra", [
    ("task", "naive,cumulative,joint,lwf,er,ewc", []),
    ("class", "naive,icarl,gdumb,der", []),
    # a class order that is not the identity: joint and cumulative read concatenations of
    # class-mapped experiences (joint's S2 rows were at 49-64 instead of 98 before 2026-12-07)
    ("class", "joint,cumulative,er", ["--benchmark.class_order=seeded"])])
def test_whole_runs_are_bit_identical_with_and_without(tmp_path, monkeypatch, scenario, methods,
                                                       extra):
    served = {"n": 0}
    original = tb.TensorLoader.__iter__

    def counting(self):
        served["n"] += 1
        return original(self)

    monkeypatch.setattr(tb.TensorLoader, "__iter__", counting)
    common = [f"--methods=[{methods}]", f"--benchmark.scenario={scenario}", "--strategy.epochs=2",
              "--no-plots", "--no-progress", "--no-checkpoint", *extra]
    for flag, out in (("true", tmp_path / "on"), ("false", tmp_path / "off")):
        assert main([f"--out={out}", f"--strategy.tensor_batches={flag}", *common]) == 0
        if flag == "true":
            assert served["n"] > 0
            served["n"] = 0
    assert served["n"] == 0  # off: never used
    for method in methods.split(","):
        (on,) = (tmp_path / "on" / "default" / method).glob("*/seed0.json")
        (off,) = (tmp_path / "off" / "default" / method).glob("*/seed0.json")
        assert json.loads(on.read_text())["matrix"] == json.loads(off.read_text())["matrix"], \
            method
