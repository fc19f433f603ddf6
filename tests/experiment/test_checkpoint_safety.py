"""Checkpoints hold plain data only (weights_only=True), and a bad checkpoint never blocks a rerun:
state_io's object <-> plain-data round trip, the RNG state, the .prev / .corrupt file policy."""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_plugins.experiment import checkpoint as ckpt_io
from cl_plugins.experiment.state_io import (UnrepresentableState, check_plain, restore_into,
                                            to_plain)

from helpers import REPO


def _reload(obj, tmp_path):
    f = tmp_path / "obj.pt"
    torch.save(obj, f)
    return torch.load(f, map_location="cpu", weights_only=True)


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------------ state_io

class _Leaf:
    def __init__(self):
        self.total, self.seen = 0.0, torch.zeros(2)


class _Tree:
    def __init__(self):
        self.leaf = _Leaf()
        self.by_task = defaultdict(_Leaf)
        self.first = {}
        self.history = []
        self.pair = (1, "a")
        self.flag = None


def test_state_io_round_trip_restores_into_fresh_objects(tmp_path):
    t = _Tree()
    t.leaf.total, t.leaf.seen = 3.5, torch.tensor([1.0, 2.0], dtype=torch.float64)
    t.by_task[0].total = 1.25
    t.by_task[7].seen = torch.arange(3)
    t.first = {0: 0.5, 3: 0.25, (1, "x"): True}
    t.history = [1, 2.5, [torch.ones(1)], None]
    plain = _reload(to_plain(t), tmp_path)  # loadable with weights_only=True
    fresh = _Tree()
    leaf, factory = fresh.leaf, fresh.by_task.default_factory
    assert restore_into(fresh, plain) is fresh
    assert fresh.leaf is leaf  # written into the existing objects, none created from the file
    assert fresh.leaf.total == 3.5 and torch.equal(fresh.leaf.seen, t.leaf.seen)
    assert fresh.leaf.seen.dtype == torch.float64
    assert isinstance(fresh.by_task, defaultdict) and fresh.by_task.default_factory is factory
    assert sorted(fresh.by_task) == [0, 7] and type(fresh.by_task[7]) is _Leaf
    assert fresh.by_task[0].total == 1.25 and torch.equal(fresh.by_task[7].seen, torch.arange(3))
    assert fresh.first == t.first and fresh.pair == (1, "a") and fresh.flag is None
    assert fresh.history[:2] == [1, 2.5] and torch.equal(fresh.history[2][0], torch.ones(1))
    assert _same(to_plain(fresh), to_plain(t))
    fresh.by_task[9].total = 1.0  # still a working defaultdict
    assert type(fresh.by_task[9]) is _Leaf


@pytest.mark.parametrize("value,where", [
    (np.float64(1.0), "numpy"), (np.zeros(2), "numpy"), ({1, 2}, "set"),
    (lambda: 0, "function"), (torch.float32, "dtype"), ({torch.zeros(1): 1}, "dict key"),
])
def test_state_io_refuses_what_plain_data_cannot_hold(value, where):
    t = _Tree()
    t.leaf.extra = value
    with pytest.raises(UnrepresentableState, match=r"state\.leaf\.extra"):
        to_plain(t)


def test_state_io_refuses_shared_objects_and_mismatched_targets():
    t = _Tree()
    t.history = [t.leaf]  # the same object twice: a restore would split it in two
    with pytest.raises(UnrepresentableState, match="reached twice"):
        to_plain(t)
    t = _Tree()
    t.history = [t.leaf.seen]  # the same tensor twice
    with pytest.raises(UnrepresentableState, match=r"state\.history\[0\]: torch.Tensor object "
                                                   "is reached twice"):
        to_plain(t)
    t = _Tree()
    t.history = [t.pair, ()]  # shared immutable tuples are fine
    t.leaf.shape = ()
    assert to_plain(t)["state"]["history"] == [(1, "a"), ()]
    plain = to_plain(_Tree())
    other = _Tree()
    other.leaf = _Tree()
    with pytest.raises(UnrepresentableState, match=r"state\.leaf: saved .*_Leaf, the rebuilt "):
        restore_into(other, plain)
    t = _Tree()
    t.history = [_Leaf()]  # an object with no counterpart in the fresh list
    with pytest.raises(UnrepresentableState, match="no counterpart"):
        restore_into(_Tree(), to_plain(t))


def test_check_plain_names_the_first_non_plain_value():
    check_plain({"a": [torch.zeros(1), (1, 2.0, "x", None, True)], 3: {"b": {}}})
    with pytest.raises(UnrepresentableState, match=r"checkpoint\['p'\]\[1\]\['g'\]"):
        check_plain({"p": [{}, {"g": np.zeros(1)}]})


def test_avalanche_metrics_restore_and_continue_identically(tmp_path):
    """The runner's evaluator metrics after 3 class-IL experiences: plain data through
    weights_only, into freshly built metrics; two more experiences with the original metrics and
    with the restored ones give the same numbers (stream BWT / forgetting keep their history)."""
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from cl_plugins.benchmarks import build_benchmark
    from cl_plugins.experiment.evaluation import TaskILAccuracy

    def metrics():
        return [accuracy_metrics(experience=True), bwt_metrics(stream=True),
                forgetting_metrics(stream=True), TaskILAccuracy()]

    info = build_benchmark("split_digits", "class")
    train, test = info.benchmark.train_stream, info.benchmark.test_stream
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    evaluator = EvaluationPlugin(*metrics(), strict_checks=False)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=torch.nn.CrossEntropyLoss(), train_mb_size=64, eval_mb_size=256,
                     device="cpu", evaluator=evaluator)
    for exp in train[:3]:
        strategy.train(exp)
        strategy.eval(test)
    plain = _reload(to_plain(list(evaluator.metrics)), tmp_path)
    assert "Forgetting" in json.dumps(plain, default=str)  # the nested history is in there
    restored = [m for group in metrics() for m in (group if isinstance(group, list) else [group])]
    assert [type(m) for m in restored] == [type(m) for m in evaluator.metrics]
    for i, (fresh, saved) in enumerate(zip(restored, plain)):
        assert restore_into(fresh, saved, f"metrics[{i}]") is fresh
    assert _same(to_plain(restored), to_plain(list(evaluator.metrics)))

    weights, clock = copy.deepcopy(model.state_dict()), copy.deepcopy(vars(strategy.clock))
    rng = torch.get_rng_state()

    def go_on():
        out = []
        for exp in train[3:]:
            strategy.train(exp)
            out.append(strategy.eval(test))
        return out

    want = go_on()
    model.load_state_dict(weights)
    vars(strategy.clock).update(clock)
    torch.set_rng_state(rng)
    evaluator.metrics = restored
    got = go_on()
    assert any(k.startswith("StreamBWT") for k in got[-1])
    assert any(k.startswith("TaskIL_Acc_Exp") for k in got[-1])
    assert got == want


# ------------------------------------------------------------------------------ RNG

def test_rng_state_is_plain_and_restores_exactly(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # a cached Gaussian in numpy's state
    random.gauss(0, 1)
    state = _reload(ckpt_io.rng_state(), tmp_path)
    check_plain(state)
    want = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.normal(), torch.rand(3))
    ckpt_io.set_rng_state(state)
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
           np.random.normal(), torch.rand(3))
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


# ------------------------------------------------------------------------------ files

def _ckpt(n):
    return {"format": ckpt_io.FORMAT_VERSION, "fingerprint": "f", "experiences_done": n,
            "model": {"w": torch.full((2,), float(n))}}


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_save_keeps_the_previous_checkpoint_and_remove_deletes_both(tmp_path):
    path = tmp_path / "run" / "seed0.ckpt.pt"
    prev = ckpt_io.previous_path(path)
    assert prev.name == "seed0.ckpt.prev.pt"
    ckpt_io.save(path, _ckpt(1))
    assert path.exists() and not prev.exists()
    ckpt_io.save(path, _ckpt(2))
    assert ckpt_io.load(path)["experiences_done"] == 2
    assert ckpt_io.load(prev)["experiences_done"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [prev.name, path.name]  # no .tmp
    ckpt, said = ckpt_io.load_latest(path)
    assert ckpt["experiences_done"] == 2 and said == []
    ckpt_io.remove(path)
    assert list(path.parent.iterdir()) == []
    ckpt_io.remove(path)  # nothing left: no error
    assert ckpt_io.load_latest(path) == (None, [])


def test_truncated_checkpoint_names_the_file_and_falls_back_to_prev(tmp_path):
    path = tmp_path / "seed0.ckpt.pt"
    ckpt_io.save(path, _ckpt(1))
    ckpt_io.save(path, _ckpt(2))
    _truncate(path)
    with pytest.raises(ckpt_io.CheckpointError, match=str(path)) as err:
        ckpt_io.load(path)
    assert isinstance(err.value, RuntimeError) and "cannot read" in str(err.value)
    ckpt, said = ckpt_io.load_latest(path)
    assert ckpt["experiences_done"] == 1
    corrupt = tmp_path / "seed0.ckpt.pt.corrupt"
    assert corrupt.exists() and not path.exists()  # moved aside, never deleted
    assert len(said) == 2 and str(path) in said[0] and str(corrupt) in said[0]
    assert "previous checkpoint" in said[1] and "after 1 experiences" in said[1]
    # The next save writes a new main file; the good .prev stays until then.
    ckpt_io.save(path, _ckpt(2))
    assert ckpt_io.load_latest(path)[0]["experiences_done"] == 2


def test_when_no_checkpoint_loads_the_run_starts_over(tmp_path):
    path = tmp_path / "seed0.ckpt.pt"
    ckpt_io.save(path, _ckpt(1))
    ckpt_io.save(path, _ckpt(2))
    (tmp_path / "seed0.ckpt.pt.corrupt").write_bytes(b"an earlier casualty")
    _truncate(path)
    ckpt_io.previous_path(path).write_bytes(b"")
    ckpt, said = ckpt_io.load_latest(path)
    assert ckpt is None and "starts over" in said[-1] and len(said) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["seed0.ckpt.prev.pt.corrupt", "seed0.ckpt.pt.2.corrupt",
                     "seed0.ckpt.pt.corrupt"]
    assert (tmp_path / "seed0.ckpt.pt.corrupt").read_bytes() == b"an earlier casualty"


def test_only_prev_left_after_a_crash_between_the_renames(tmp_path):
    path = tmp_path / "seed0.ckpt.pt"
    ckpt_io.save(path, _ckpt(1))
    path.rename(ckpt_io.previous_path(path))
    ckpt, said = ckpt_io.load_latest(path)
    assert ckpt["experiences_done"] == 1 and "previous checkpoint" in said[0]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_are_never_unpickled(tmp_path):
    """A file with pickled objects (format 1 held pickled metrics and numpy arrays; a hostile one
    holds code) is refused with weights_only=True: nothing in it runs."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "seed0.ckpt.pt"
    torch.save({**_ckpt(1), "metrics": _RunsCode(marker)}, path)
    with pytest.raises(ckpt_io.CheckpointError, match=str(path)):
        ckpt_io.load(path)
    assert not marker.exists()
    torch.save({"format": 1, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(ckpt_io.CheckpointError, match=str(path)):
        ckpt_io.load(path)
    torch.save({"format": 1, "experiences_done": 1}, path)  # plain, but the old layout
    with pytest.raises(ckpt_io.CheckpointError, match=r"format 1, this runner reads 2"):
        ckpt_io.load(path)
    ckpt, said = ckpt_io.load_latest(path)
    assert ckpt is None and "format 1" in said[0] and not marker.exists()


def test_save_refuses_non_plain_data_and_keeps_the_last_good_file(tmp_path):
    path = tmp_path / "seed0.ckpt.pt"
    ckpt_io.save(path, _ckpt(1))
    bad = {**_ckpt(2), "plugins": [{"saved_by": "XPlugin", "cache": np.zeros(2)}]}
    with pytest.raises(UnrepresentableState, match=r"\['plugins'\]\[0\]\['cache'\]"):
        ckpt_io.save(path, bad)
    assert ckpt_io.load(path)["experiences_done"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0.ckpt.pt"]


def test_gitignore_covers_every_checkpoint_file():
    import fnmatch

    root = REPO
    patterns = [ln.strip() for ln in (root / ".gitignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for name in ("seed0.ckpt.pt", "seed0.ckpt.prev.pt", "seed0.ckpt.pt.corrupt",
                 "seed0.ckpt.pt.2.corrupt", "seed0.ckpt.prev.pt.corrupt",
                 "seed0.ckpt.ptab12_x.tmp"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
