"""Benchmarks: scenarios, options, offline rules, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.checks import DatasetNotFoundError


def _labels(exp):
    return exp.dataset.targets.uniques if hasattr(exp.dataset.targets, "uniques") else \
        set(int(y) for y in exp.dataset.targets)


def _all_xy(exp):
    from torch.utils.data import DataLoader

    x, y, t = next(iter(DataLoader(exp.dataset, batch_size=len(exp.dataset), shuffle=False)))
    return x, y, t


@pytest.mark.parametrize("scenario, task_labels, classes", [
    ("task", [0, 1, 2, 3, 4], [[0, 1]] * 5),
    ("domain", [0] * 5, [[0, 1]] * 5),
    ("class", [0] * 5, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]),
])
def test_split_digits_scenarios(scenario, task_labels, classes):
    info = build_benchmark("split_digits", scenario)
    bm = info.benchmark
    assert [e.task_label for e in bm.train_stream] == task_labels
    assert [e.task_label for e in bm.test_stream] == task_labels
    assert info.classes_per_exp == classes
    assert info.original_classes_per_exp == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert info.n_outputs == (10 if scenario == "class" else 2)
    x, y, t = _all_xy(bm.train_stream[2])
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert sorted(set(y.tolist())) == classes[2]
    # the embedded data: 1797 images, 30% test, every image in exactly one experience
    assert sum(len(e.dataset) for e in bm.train_stream) + \
        sum(len(e.dataset) for e in bm.test_stream) == 1797


def test_normalisation_uses_train_statistics():
    info = build_benchmark("split_digits", "class")
    xs = torch.cat([_all_xy(e)[0] for e in info.benchmark.train_stream])
    assert abs(xs.mean().item()) < 1e-5 and abs(xs.std(unbiased=False).item() - 1) < 1e-5
    raw = build_benchmark("split_digits", "class", normalize=False)
    x0 = _all_xy(raw.benchmark.train_stream[0])[0]
    assert x0.min() >= 0 and x0.max() <= 1


def test_class_order_fixed_seeded_explicit():
    fixed = build_benchmark("split_digits", "task", class_order="fixed", seed=3)
    assert fixed.options["class_order"] == list(range(10))
    a = build_benchmark("split_digits", "task", class_order="seeded", seed=1)
    b = build_benchmark("split_digits", "task", class_order="seeded", seed=1)
    c = build_benchmark("split_digits", "task", class_order="seeded", seed=2)
    assert a.options["class_order"] == b.options["class_order"] != c.options["class_order"]
    assert sorted(a.options["class_order"]) == list(range(10))
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    e = build_benchmark("split_digits", "class", class_order=order)
    assert e.original_classes_per_exp[0] == [8, 9]
    with pytest.raises(ValueError, match="class_order"):
        build_benchmark("split_digits", "task", class_order=[0, 1, 2])


def test_class_order_vandeven2022_matches_his_relabelling():
    # His code: seed 0 keeps the digits in order; seed s relabels digit y as p[y] with
    # p = permutation drawn right after np.random.seed(s); task t = new labels {2t, 2t+1}.
    zero = build_benchmark("split_digits", "task", class_order="vandeven2022", seed=0)
    assert zero.original_classes_per_exp == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for seed in (1, 7):
        np.random.seed(seed)
        p = np.random.permutation(10)
        expected = [sorted(int(y) for y in range(10) if p[y] in (2 * t, 2 * t + 1))
                    for t in range(5)]
        info = build_benchmark("split_digits", "class", class_order="vandeven2022", seed=seed)
        assert info.original_classes_per_exp == expected
    assert expected != zero.original_classes_per_exp


def test_samples_per_task_cap():
    info = build_benchmark("split_digits", "task", samples_per_task=50, test_samples_per_task=20)
    assert [len(e.dataset) for e in info.benchmark.train_stream] == [50] * 5
    assert [len(e.dataset) for e in info.benchmark.test_stream] == [20] * 5


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"n_experiences must divide .* valid values: \[1, 2, 5, 10\]"):
        build_benchmark("split_digits", "task", n_experiences=3)
    with pytest.raises(ValueError, match="benchmark.scenario must be one of"):
        build_benchmark("split_digits", "incremental")
    with pytest.raises(ValueError, match=r"Unknown benchmark 'split_mnsit'.*Did you mean 'split_mnist'.*split_digits"):
        build_benchmark("split_mnsit", "task")
    with pytest.raises(ValueError, match="samples_per_task"):
        build_benchmark("split_digits", "task", samples_per_task=0)
    with pytest.raises(ValueError, match="test_samples_per_task=1 is smaller than the 2 classes"):
        build_benchmark("split_digits", "task", test_samples_per_task=1)


def test_missing_data_names_root_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_benchmark("split_mnist", "task", data_root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg and "MNIST" in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        build_benchmark("split_cifar100", "task", data_root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200"):
        build_benchmark("split_tinyimagenet", "task", data_root=str(tmp_path / "x"))


def test_split_mnist_hsu_preprocessing(mnist_root):
    info = build_benchmark("split_mnist", "class", pad_to_32=True, data_root=mnist_root)
    # per-channel stats of the padded training images = Hsu et al.'s (0.1000, 0.2752)
    assert info.options["mean"][0] == pytest.approx(0.1000, abs=1e-4)
    assert info.options["std"][0] == pytest.approx(0.2752, abs=1e-4)
    assert info.input_shape == (1, 32, 32)
    assert sum(len(e.dataset) for e in info.benchmark.train_stream) == 60000
    assert sum(len(e.dataset) for e in info.benchmark.test_stream) == 10000


def test_split_fmnist_loads(mnist_root):
    info = build_benchmark("split_fmnist", "task", data_root=mnist_root)
    assert info.n_experiences == 5 and info.input_shape == (1, 28, 28)


def test_permuted_mnist(mnist_root):
    info = build_benchmark("permuted_mnist", "domain", n_experiences=3, normalize=False,
                           samples_per_task=300, data_root=mnist_root)
    x0 = _all_xy(info.benchmark.test_stream[0])[0]
    x1 = _all_xy(info.benchmark.test_stream[1])[0]
    # same test images in the same order, pixels permuted: equal sorted pixel values per image
    assert not torch.equal(x0, x1)
    assert torch.equal(x0.flatten(1).sort(1).values, x1.flatten(1).sort(1).values)
    assert info.classes_per_exp == [list(range(10))] * 3
    cls = build_benchmark("permuted_mnist", "class", n_experiences=3, samples_per_task=100,
                          test_samples_per_task=100, data_root=mnist_root)
    assert cls.classes_per_exp[2] == list(range(20, 30)) and cls.n_outputs == 30
    # GEM protocol: 1000 training samples per task
    gem = build_benchmark("permuted_mnist", "task", n_experiences=2, samples_per_task=1000,
                          test_samples_per_task=10, data_root=mnist_root)
    assert [len(e.dataset) for e in gem.benchmark.train_stream] == [1000, 1000]


def test_rotated_mnist_angles(mnist_root):
    info = build_benchmark("rotated_mnist", "domain", n_experiences=4, angle_range=[0, 180],
                           angle_sampling="stratified", samples_per_task=10,
                           test_samples_per_task=10, data_root=mnist_root, seed=5)
    angles = info.options["angles"]
    for t, a in enumerate(angles):
        assert 45 * t <= a < 45 * (t + 1)
    uni = build_benchmark("rotated_mnist", "domain", n_experiences=20, samples_per_task=10,
                          test_samples_per_task=10, data_root=mnist_root, seed=5)
    assert all(0 <= a < 180 for a in uni.options["angles"])
    fixed = build_benchmark("rotated_mnist", "task", n_experiences=2, angles=[0, 90],
                            normalize=False, samples_per_task=10, data_root=mnist_root)
    x0 = _all_xy(fixed.benchmark.test_stream[0])[0]
    x1 = _all_xy(fixed.benchmark.test_stream[1])[0]
    # 90 degrees counter-clockwise equals torch.rot90 on the image plane
    assert torch.equal(torch.rot90(x0, 1, dims=(2, 3)), x1)


def _write_cifar10(root, n=4):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n * 10, 3072), dtype=np.uint8),
                         "labels": [i % 10 for i in range(n * 10)]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_split_cifar10_on_tiny_real_format_files(tmp_path):
    _write_cifar10(tmp_path)
    info = build_benchmark("split_cifar10", "class", data_root=str(tmp_path))
    assert info.input_shape == (3, 32, 32) and info.n_outputs == 10
    assert len(info.options["mean"]) == 3
    assert [len(e.dataset) for e in info.benchmark.train_stream] == [40] * 5


def test_subsample_is_class_balanced_and_seeded():
    from cl_plugins.benchmarks.preprocess import subsample

    y = torch.tensor([0] * 90 + [1] * 5 + [2] * 5)
    idx = subsample(y, 9, torch.Generator().manual_seed(0))
    assert torch.bincount(y[idx], minlength=3).tolist() == [3, 3, 3]
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 9
    again = subsample(y, 9, torch.Generator().manual_seed(0))
    other = subsample(y, 9, torch.Generator().manual_seed(1))
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    assert torch.equal(subsample(y, None, torch.Generator()), torch.arange(100))


def test_permuted_and_rotated_experiences_are_stored_compactly(mnist_root):
    # 20 float32 copies of MNIST would be ~5 GB per process: permuted experiences share one
    # source tensor, rotated ones keep uint8 images.
    per = build_benchmark("permuted_mnist", "domain", n_experiences=3, samples_per_task=50,
                          test_samples_per_task=20, data_root=mnist_root)
    from cl_plugins.benchmarks.stored import PixelPermutedDataset, UInt8ImageDataset

    sets = _leaf_datasets(per.benchmark.train_stream)
    assert len(sets) == 3 and all(isinstance(d, PixelPermutedDataset) for d in sets)
    assert len({d.source.data_ptr() for d in sets}) == 1
    rot = build_benchmark("rotated_mnist", "domain", n_experiences=2, samples_per_task=30,
                          test_samples_per_task=20, data_root=mnist_root)
    sets = _leaf_datasets(rot.benchmark.train_stream)
    assert len(sets) == 2
    assert all(isinstance(d, UInt8ImageDataset) and d.images.dtype == torch.uint8 for d in sets)


def _leaf_datasets(stream):
    """The datasets handed to nc_benchmark, found inside Avalanche's wrappers."""
    from cl_plugins.benchmarks.stored import PixelPermutedDataset, UInt8ImageDataset

    found, todo = {}, [e.dataset for e in stream]
    while todo:
        d = todo.pop()
        if isinstance(d, (PixelPermutedDataset, UInt8ImageDataset)):
            found[id(d)] = d
            continue
        for attr in ("_datasets", "datasets", "dataset", "_flat_data"):
            sub = getattr(d, attr, None)
            if isinstance(sub, (list, tuple)):
                todo.extend(sub)
            elif sub is not None and sub is not d:
                todo.append(sub)
    return list(found.values())


def test_uint8_lookup_matches_float_normalisation():
    from cl_plugins.benchmarks import preprocess as pp
    from cl_plugins.benchmarks.stored import UInt8ImageDataset

    g = torch.Generator().manual_seed(0)
    for c, mean, std in [(1, [0.1307], [0.3081]), (3, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])]:
        imgs = torch.randint(0, 256, (4, c, 5, 6), generator=g, dtype=torch.uint8)
        ds = UInt8ImageDataset(imgs, torch.arange(4), mean, std)
        want = pp.normalize(pp.to_float(imgs), mean, std)
        assert torch.equal(torch.stack([ds[i][0] for i in range(4)]), want)
        raw = UInt8ImageDataset(imgs, torch.arange(4), None, None)
        assert torch.equal(raw[2][0], pp.to_float(imgs[2:3])[0])
    with pytest.raises(TypeError, match="uint8"):
        UInt8ImageDataset(imgs.float(), torch.arange(4), None, None)
