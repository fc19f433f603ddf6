"""Every registered plugin's state: plain data (loads with weights_only=True), names its class, and
is refused by any other plugin class with a message naming both; library misuse that would
silently turn a method into another one raises instead."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from avalanche.training import Naive

from cl_plugins.core.state import OWNER_KEY, check_owner, owned_by
from cl_plugins.registry import PLUGIN_CLASSES
from helpers import use_conv_model_if_needed

CLASSES = [p.split(":")[1] for p in PLUGIN_CLASSES]


class _Stop(RuntimeError):
    pass


def _spec_and_params(cls_name):
    from cl_plugins.experiment.config import MAIN_JOB_METHOD_PARAMS
    from cl_plugins.registry import list_methods

    path = next(p for p in PLUGIN_CLASSES if p.endswith(":" + cls_name))
    cls = getattr(importlib.import_module(path.split(":")[0]), cls_name)
    spec = next(s for s in list_methods() if s.factory is cls)
    return spec, MAIN_JOB_METHOD_PARAMS.get(spec.name, {})


def _fresh(cls_name):
    spec, params = _spec_and_params(cls_name)
    return spec.factory(**{**spec.defaults, **params})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{class name: (plugin after 2 split_digits experiences, its state saved and re-read with
    torch.load(weights_only=True))}, each method in its first scenario (domain, task, class)."""
    from cl_plugins.experiment.config import DEFAULT_CONFIG, validate
    from cl_plugins.experiment.runner import run_single

    out = {}
    owner = next(c for c in Naive.__mro__ if "train" in vars(c))
    original = owner.train
    for cls_name in CLASSES:
        spec, params = _spec_and_params(cls_name)
        cfg = copy.deepcopy(DEFAULT_CONFIG)
        cfg.update(name="state", output_dir=str(tmp_path_factory.mktemp("runs")))
        cfg["model"] = {"name": "mlp", "hidden": [32]}
        use_conv_model_if_needed(cfg, spec.factory)
        cfg["strategy"].update(epochs=1, train_mb_size=64, eval_mb_size=512, device="cpu")
        cfg["loggers"].update(progress=False, plots=False, json=False, checkpoint=False)
        cfg["benchmark"]["scenario"] = next(s for s in ("domain", "task", "class")
                                            if s in spec.scenarios)
        seen = {"calls": 0, "strategy": None}

        def train(self, *args, **kwargs):
            seen["calls"] += 1
            seen["strategy"] = self
            if seen["calls"] == 3:
                raise _Stop()
            return original(self, *args, **kwargs)

        owner.train = train
        try:
            with pytest.raises(_Stop):
                run_single(validate(cfg), {"name": spec.name, "params": params, "plus": []}, 0,
                           tmp_path_factory.mktemp("out"), progress=False)
        finally:
            owner.train = original
        plugin = next(p for p in seen["strategy"].plugins if type(p).__name__ == cls_name)
        path = tmp_path_factory.mktemp("state") / "state.pt"
        torch.save(plugin.state_dict(), path)
        out[cls_name] = (plugin, torch.load(path, map_location="cpu", weights_only=True))
    return out


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("cls_name", CLASSES)
def test_state_loads_with_weights_only_into_a_fresh_plugin(trained, cls_name):
    plugin, state = trained[cls_name]
    assert state[OWNER_KEY] == cls_name
    fresh = _fresh(cls_name)
    fresh.load_state_dict(state)
    assert _equal(fresh.state_dict(), plugin.state_dict())


@pytest.mark.parametrize("cls_name", CLASSES)
def test_state_of_another_plugin_class_is_refused_naming_both(trained, cls_name):
    fresh = _fresh(cls_name)
    for other in CLASSES:
        if other == cls_name:
            continue
        with pytest.raises(ValueError, match=f"^this state was saved by {other}; {cls_name} "
                                             "cannot load it$"):
            fresh.load_state_dict(trained[other][1])
    unnamed = {k: v for k, v in trained[cls_name][1].items() if k != OWNER_KEY}
    with pytest.raises(ValueError, match=f"names no plugin class.*{cls_name} cannot load it"):
        fresh.load_state_dict(unnamed)
    fresh.load_state_dict(trained[cls_name][1])  # its own class's state still loads


def test_owner_helpers():
    class APlugin:
        pass

    class BPlugin(APlugin):
        pass

    state = {**owned_by(BPlugin()), "x": 1}
    check_owner(BPlugin(), state)
    with pytest.raises(ValueError, match="saved by BPlugin; APlugin cannot load it"):
        check_owner(APlugin(), state)  # a subclass's state is not its base's
    with pytest.raises(ValueError, match="expects the dict"):
        check_owner(APlugin(), [state])


# ------------------------------------------------------------------------------ misuse

NEEDS_LABELS = [path.split(":")[1] for path in PLUGIN_CLASSES
                if getattr(getattr(importlib.import_module(path.split(":")[0]),
                                   path.split(":")[1]), "NEEDS_TASK_LABELS", False)]


def _naive(plugin, info):
    from cl_plugins.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, info)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=64, eval_mb_size=256,
                     device="cpu", plugins=[plugin])
    return model, strategy


def test_the_registry_headers_declare_who_needs_task_labels():
    assert "EnsemblePlugin" in NEEDS_LABELS


@pytest.mark.parametrize("cls_name", NEEDS_LABELS)
@pytest.mark.parametrize("scenario", ["class", "domain"])
def test_stream_without_task_labels_is_refused_before_training(cls_name, scenario):
    from cl_plugins.benchmarks import build_benchmark

    info = build_benchmark("split_digits", scenario)
    model, strategy = _naive(_fresh(cls_name), info)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"needs task labels.*5 experiences all have task "
                                         r"label 0"):
        strategy.train(info.benchmark.train_stream[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls_name", NEEDS_LABELS)
def test_repeated_task_label_is_refused(cls_name):
    from cl_plugins.benchmarks import build_benchmark

    info = build_benchmark("split_digits", "task")
    plugin = _fresh(cls_name)
    _, strategy = _naive(plugin, info)
    strategy.train(info.benchmark.train_stream[0])
    strategy.train(info.benchmark.train_stream[1])  # a new task label: fine
    with pytest.raises(ValueError, match=r"experience 1 has task label\(s\) \[1\], already "
                                         r"trained on"):
        strategy.train(info.benchmark.train_stream[1])
    fresh = _fresh(cls_name)
    fresh.load_state_dict(plugin.state_dict())  # the labels trained on are part of the state
    assert _equal(fresh.state_dict(), plugin.state_dict())


def test_require_task_labels_on_plain_experiences():
    from types import SimpleNamespace as NS

    from cl_plugins.core.task_labels import require_task_labels

    def stream(*labels):
        exps = [NS(task_labels=[t], current_experience=i) for i, t in enumerate(labels)]
        for e in exps:
            e.origin_stream = exps
        return exps

    assert require_task_labels("X", stream(0, 1, 2)[2], [0, 1]) == [2]
    assert require_task_labels("X", stream(0)[0], []) == [0]  # one experience: nothing to tell
    with pytest.raises(ValueError, match="X needs task labels.*3 experiences all have task "
                                         "label 4"):
        require_task_labels("X", stream(4, 4, 4)[0], [])
    with pytest.raises(ValueError, match=r"experience 2 has task label\(s\) \[0\]"):
        require_task_labels("X", stream(0, 1, 0)[2], [0, 1])
    lazy = NS(task_labels=[3], current_experience=5, origin_stream=iter(()))  # no len()
    with pytest.raises(ValueError, match=r"\[3\], already trained"):
        require_task_labels("X", lazy, [3])


def test_dir_lists_every_plugin_class():
    import cl_plugins

    names = dir(cl_plugins)
    assert set(CLASSES) <= set(names) and "register" in names and names == sorted(names)
    assert all(getattr(cl_plugins, c).__name__ == c for c in CLASSES)
