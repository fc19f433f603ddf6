"""``benchmark.first_exp_classes``: a larger first experience, then even steps (PODNet's 50 + 10 x 5
CIFAR-100 split), in the builder, its up-front check and the settings fingerprint."""

from __future__ import annotations

import copy

import pytest

from cl_plugins.benchmarks import build_benchmark, describe_benchmark


def test_first_experience_holds_the_given_classes_then_even_steps():
    order = [9, 3, 0, 5, 7, 1, 2, 8, 4, 6]
    info = build_benchmark("split_digits", "class", 4, class_order=order, first_exp_classes=4)
    # the order's first 4 classes, then 2 at a time (labels relabelled 0.. in stream order)
    assert info.original_classes_per_exp == [[0, 3, 5, 9], [1, 7], [2, 8], [4, 6]]
    assert info.classes_per_exp == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert info.n_outputs == 10 and info.options["first_exp_classes"] == 4
    sizes = [len(e.dataset) for e in info.benchmark.train_stream]
    labels = info.benchmark.train_stream[0].dataset.targets
    assert sorted(set(int(y) for y in labels)) == [0, 1, 2, 3] and sizes[0] > 1.5 * sizes[1]
    task = build_benchmark("split_digits", "task", 4, first_exp_classes=4)
    assert task.classes_per_exp == [[0, 1, 2, 3], [0, 1], [0, 1], [0, 1]]
    assert task.n_outputs == 4  # the widest experience
    described = describe_benchmark("split_digits", "task", 4, first_exp_classes=4)
    assert described["n_outputs"] == 4 and described["n_experiences"] == 4
    assert describe_benchmark("split_digits", "class", 4, first_exp_classes=4)["n_outputs"] == 10


def test_without_it_nothing_changes():
    info = build_benchmark("split_digits", "class")
    assert info.classes_per_exp == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert "first_exp_classes" not in info.options
    assert build_benchmark("split_digits", "class", 1, first_exp_classes=10).classes_per_exp == \
        [list(range(10))]


@pytest.mark.parametrize("n_exp, first, match", [
    (4, 5, r"leaves 5 of the 10 classes.*valid n_experiences: \[2, 6\]; got 4"),
    (3, 10, r"leaves 0 of the 10 classes.*valid n_experiences: \[1\]; got 3"),
    (1, 4, r"leaves 6 of the 10 classes"),
    (2, 0, "first_exp_classes"),
    (2, 11, "first_exp_classes"),
])
def test_a_split_that_does_not_fit_names_the_option(n_exp, first, match):
    for fn in (build_benchmark, describe_benchmark):
        with pytest.raises(ValueError, match=match):
            fn("split_digits", "class", n_exp, first_exp_classes=first)


def test_fingerprint_ignores_the_option_at_its_default_only(digits_cfg):
    from cl_plugins.experiment.config import validate
    from cl_plugins.experiment.plan import settings_fingerprint

    cfg = validate(copy.deepcopy(digits_cfg))
    entry = {"name": "naive", "params": {}, "plus": []}
    without = copy.deepcopy(cfg)
    del without["benchmark"]["first_exp_classes"]  # a config from before the option existed
    assert settings_fingerprint(cfg, entry) == settings_fingerprint(without, entry)
    cfg["benchmark"]["first_exp_classes"] = 4
    assert settings_fingerprint(cfg, entry) != settings_fingerprint(without, entry)
