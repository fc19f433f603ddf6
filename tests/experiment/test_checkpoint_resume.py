"""The runner's per-experience checkpoint: an interrupted run resumes into the very same run."""

import copy
import json
import re

import pytest
import torch
from avalanche.training import Naive

from cl_plugins.experiment import checkpoint as ckpt_io
from cl_plugins.experiment.config import validate
from cl_plugins.experiment.runner import run_single
from helpers import use_conv_model_if_needed


class SimulatedPreemption(RuntimeError):
    pass


def _interrupt_at(monkeypatch, n_calls):
    """Make Naive.train raise on its ``n_calls``-th call. Returns a dict counting the calls;
    setting its "stop_at" to None disarms it."""
    state = {"calls": 0, "stop_at": n_calls}
    owner = next(c for c in Naive.__mro__ if "train" in vars(c))  # Cumulative calls it too
    original = owner.train

    def train(self, *args, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["stop_at"]:
            raise SimulatedPreemption("stopped by the test")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, "train", train)
    return state


def _cfg(digits_cfg, scenario, optimizer, method=None):
    """``method``: a method name; one that needs spatial maps gets a conv model."""
    from cl_plugins.registry import get_method

    cfg = copy.deepcopy(digits_cfg)
    cfg["benchmark"]["scenario"] = scenario
    cfg["optimizer"].update(optimizer)
    if method is not None:
        use_conv_model_if_needed(cfg, get_method(method).factory)
    return validate(cfg)


def _paths(cfg, entry, seed=0):
    from pathlib import Path

    from cl_plugins.experiment.plan import json_path

    path = json_path(Path(cfg["output_dir"]), cfg, entry, seed)
    return path, ckpt_io.checkpoint_path(path)


def _entry(name, params=None, label=None):
    e = {"name": name, "params": params or {}, "plus": []}
    if label:
        e["label"] = label
    return e


def _all_cases():
    """Every method of ours with a state_dict, in its first scenario (domain before task before
    class), with the main job's hyper-parameters for split_digits."""
    from cl_plugins.experiment.config import MAIN_JOB_METHOD_PARAMS
    from cl_plugins.registry import list_methods

    cases = []
    for spec in list_methods():
        if spec.kind != "plugin" or spec.reference or spec.name == "ensemble" or \
                getattr(spec.factory, "REPLACES_MODEL", False):
            # Avalanche's own plugins have no state_dict; the ensemble: test below; P&C, which
            # also replaces the model: its own exact-resume test (tests/hybrid/test_pnc.py)
            continue
        scenario = next(s for s in ("domain", "task", "class") if s in spec.scenarios)
        cases.append((scenario, _entry(spec.name, MAIN_JOB_METHOD_PARAMS.get(spec.name))))
    return cases


# Optimizer state carried across experiences (Adam, no reset) and a per-experience LR schedule,
# so the optimizer, the plugins' state (importances, buffers, bases, their RNGs), the global RNG
# and the metric objects must all come back for the accuracies to match bit for bit.
# GDumb's case retrains from scratch on its memory at every experience (65 s on an idle 2-core
# machine, the longest of all): it runs with -m slow; tests/replay/test_gdumb.py covers its state.
SLOW_CASES = {"gdumb"}
CASES = [pytest.param(sc, e, id=e["name"],
                      marks=[pytest.mark.slow] if e["name"] in SLOW_CASES else [])
         for sc, e in _all_cases()]


@pytest.mark.parametrize("scenario,entry", CASES)
def test_interrupted_run_resumes_into_the_uninterrupted_run(digits_cfg, monkeypatch, scenario,
                                                            entry):
    opt = {"name": "adam", "lr": 3e-3,
           "scheduler": {"name": "multistep", "milestones": [1], "gamma": 0.5}}
    if entry["name"] == "gdumb":  # it schedules the learning rate itself (and says so)
        opt["scheduler"] = None
    cfg_ref = _cfg(digits_cfg, scenario, opt, entry["name"])
    cfg_ref["output_dir"] += "_ref"
    ref = run_single(cfg_ref, entry, 0, __import__("pathlib").Path(cfg_ref["output_dir"]),
                     progress=False)
    assert ref["status"] == "finished" and ref["resumed"] == []
    assert not _paths(cfg_ref, entry)[1].exists()  # removed once the run finished

    cfg = _cfg(digits_cfg, scenario, opt, entry["name"])
    out = __import__("pathlib").Path(cfg["output_dir"])
    json_path, ckpt_path = _paths(cfg, entry)
    calls = _interrupt_at(monkeypatch, 3)
    with pytest.raises(SimulatedPreemption):
        run_single(cfg, entry, 0, out, progress=False)
    stopped = json.loads(json_path.read_text())
    assert stopped["status"] == "failed" and len(stopped["matrix"]) == 2
    assert "run the same command again to resume" in stopped["resume"]
    assert len(stopped["checkpoint_s_per_exp"]) == 2
    assert ckpt_io.load(ckpt_path)["experiences_done"] == 2

    calls.update(calls=0, stop_at=None)
    resumed = run_single(cfg, entry, 0, out, progress=False)
    assert calls["calls"] == len(ref["matrix"]) - 2  # only the experiences left were trained
    assert resumed["status"] == "finished"
    assert [r["after_experiences"] for r in resumed["resumed"]] == [2]
    assert resumed["matrix"] == ref["matrix"]  # bit-identical accuracies, every row
    assert resumed["steps_per_exp"] == ref["steps_per_exp"]
    assert resumed["avalanche"] == ref["avalanche"]  # stream BWT / forgetting kept their history
    assert resumed["summary"] == ref["summary"]
    assert not ckpt_path.exists()


def test_checkpoint_of_another_config_is_not_resumed(digits_cfg, monkeypatch):
    entry = _entry("naive")
    cfg = _cfg(digits_cfg, "domain", {"name": "sgd", "lr": 0.05})
    out = __import__("pathlib").Path(cfg["output_dir"])
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(SimulatedPreemption):
        run_single(cfg, entry, 0, out, progress=False)
    monkeypatch.undo()
    old_ckpt = _paths(cfg, entry)[1]
    assert old_ckpt.exists()
    cfg["optimizer"]["lr"] = 0.1
    fresh = run_single(cfg, entry, 0, out, progress=False)  # another settings folder
    assert fresh["resumed"] == [] and len(fresh["steps_per_exp"]) == len(fresh["matrix"]) == 5
    assert old_ckpt.exists() and _paths(cfg, entry)[1].parent != old_ckpt.parent
    # A checkpoint of other settings found in this run's place is not resumed either.
    import shutil

    shutil.copy(old_ckpt, _paths(cfg, entry)[1])
    with pytest.warns(UserWarning, match="different config, method entry or seed"):
        fresh = run_single(cfg, entry, 0, out, progress=False)
    assert fresh["resumed"] == []
    # Output settings are not part of the run: they do not block a resume.
    from cl_plugins.experiment.plan import run_fingerprint, settings_fingerprint

    a = copy.deepcopy(cfg)
    a["loggers"]["plots"], a["output_dir"] = True, "elsewhere"
    assert settings_fingerprint(a, entry) == settings_fingerprint(cfg, entry)
    fp = settings_fingerprint(cfg, entry)
    assert run_fingerprint(fp, 1) != run_fingerprint(fp, 0)


def test_runs_that_cannot_save_their_state_say_so_and_write_no_checkpoint(digits_cfg,
                                                                          monkeypatch):
    cfg = _cfg(digits_cfg, "domain", {"name": "sgd", "lr": 0.05})
    out = __import__("pathlib").Path(cfg["output_dir"])
    for entry, why in [(_entry("avalanche_ewc", {"ewc_lambda": 1.0}), "EWCPlugin has no "
                        "state_dict"), (_entry("cumulative"), "template Cumulative")]:
        _interrupt_at(monkeypatch, 2)
        with pytest.raises(SimulatedPreemption):
            run_single(cfg, entry, 0, out, progress=False)
        monkeypatch.undo()
        json_path, ckpt_path = _paths(cfg, entry)
        assert why in json.loads(json_path.read_text())["checkpoint"]
        assert not ckpt_path.exists()
    cfg["loggers"]["checkpoint"] = False
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(SimulatedPreemption):
        run_single(cfg, _entry("naive"), 0, out, progress=False)
    assert not _paths(cfg, _entry("naive"))[1].exists()


def test_optimizer_state_follows_parameter_names_not_positions():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam([{"params": [a[1].weight, a[0].weight]},
                            {"params": [a[0].bias, a[1].bias], "lr": 0.5}], lr=0.1)
    a(torch.randn(5, 3)).sum().backward()
    opt.step()
    saved = ckpt_io.optimizer_state_by_name(opt, a)
    b = copy.deepcopy(a)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.1)  # one group, another order
    ckpt_io.load_optimizer_state_by_name(opt_b, b, saved)
    assert [g["lr"] for g in opt_b.param_groups] == [0.1, 0.5]
    assert opt_b.param_groups[0]["params"][0] is b[1].weight
    for pa, pb in [(a[1].weight, b[1].weight), (a[0].bias, b[0].bias)]:
        assert torch.equal(opt.state[pa]["exp_avg_sq"], opt_b.state[pb]["exp_avg_sq"])
    x = torch.randn(5, 3)
    for m, o in ((a, opt), (b, opt_b)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(RuntimeError, match=r"parameters \['2.weight'\]"):
        bad = {"groups": [{"names": ["2.weight"], "hyper": {}}], "state": {}}
        ckpt_io.load_optimizer_state_by_name(opt_b, b, bad)


def test_resumed_run_logs_to_the_same_wandb_run(digits_cfg, monkeypatch, tmp_path):
    import glob

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = _cfg(digits_cfg, "domain", {"name": "sgd", "lr": 0.05})
    cfg["strategy"]["epochs"] = 1
    cfg["loggers"].update(wandb=True, wandb_project="test")
    out, entry = __import__("pathlib").Path(cfg["output_dir"]), _entry("naive")
    calls = _interrupt_at(monkeypatch, 3)
    with pytest.raises(SimulatedPreemption):
        run_single(cfg, entry, 0, out, progress=False)
    first_id = json.loads(_paths(cfg, entry)[0].read_text())["wandb_run_id"]
    calls["stop_at"] = None
    resumed = run_single(cfg, entry, 0, out, progress=False)
    assert first_id and resumed["wandb_run_id"] == first_id
    runs = sorted(glob.glob(str(tmp_path / "**" / "offline-run-*"), recursive=True))
    # wandb names a second offline folder of the same id and second "<...>-<id>-1"
    assert len(runs) == 2 and all(re.search(rf"-{first_id}(-\d+)?$", r) for r in runs)


def test_a_checkpoint_that_cannot_be_written_never_stops_the_run(digits_cfg):
    # The ensemble replaces strategy.model by a wrapper a rebuilt run would not have.
    cfg = validate(copy.deepcopy(digits_cfg))
    entry = _entry("ensemble")
    out = __import__("pathlib").Path(cfg["output_dir"])
    with pytest.warns(UserWarning, match="no checkpoint"):
        result = run_single(cfg, entry, 0, out, progress=False)
    assert result["status"] == "finished" and len(result["matrix"]) == 5
    assert result["checkpoint"].startswith("off after experience 1: RuntimeError: a plugin "
                                           "replaced strategy.model")
    assert not _paths(cfg, entry)[1].exists()


def test_skip_finished_reads_back_only_runs_with_the_same_settings(digits_cfg):
    from cl_plugins.experiment.runner import run_experiment

    cfg = _cfg(digits_cfg, "domain", {"name": "sgd", "lr": 0.05})
    cfg["methods"], cfg["seeds"] = ["naive"], [0, 1]
    first = run_experiment(copy.deepcopy(cfg), echo=lambda *a: None)
    json_path = _paths(cfg, _entry("naive"), seed=1)[0]
    stamp = json_path.stat().st_mtime_ns
    said = []
    again = run_experiment(copy.deepcopy(cfg), echo=said.append, skip_finished=True)
    assert [r["matrix"] for r in again] == [r["matrix"] for r in first]
    assert len(said) == 2 and all("skipped (--skip-finished)" in s for s in said)
    assert json_path.stat().st_mtime_ns == stamp  # read, not rewritten
    moved = copy.deepcopy(cfg)
    moved["benchmark"]["data_root"] = "/some/other/copy"  # the same data elsewhere: still same
    said.clear()
    run_experiment(moved, echo=said.append, skip_finished=True)
    assert len(said) == 2
    cfg["optimizer"]["lr"] = 0.1  # other settings: run again
    said.clear()
    rerun = run_experiment(copy.deepcopy(cfg), echo=said.append, skip_finished=True)
    assert said == [] and rerun[0]["matrix"] != first[0]["matrix"]
    assert json_path.stat().st_mtime_ns == stamp  # other settings never replace a result
    assert _paths(cfg, _entry("naive"), seed=1)[0].exists()


def test_cli_flags(digits_cfg):
    from cl_plugins.experiment.cli import parse_args

    *_, skip = parse_args(["--skip-finished", "--no-checkpoint"])
    overrides = parse_args(["--no-checkpoint"])[1]
    assert skip is True and ("loggers.checkpoint", False) in overrides
    assert parse_args([])[-1] is False
