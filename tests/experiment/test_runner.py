"""The experiment runner: accuracy matrix and metrics, determinism, errors, no lost results."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.experiment.config import (apply_override, load_config, parse_value, section_for,
                                         validate)
from cl_plugins.experiment.evaluation import summarize
from cl_plugins.experiment.runner import build_optimizer, run_experiment
from cl_plugins.registry import MethodSpec, get_method


def test_summarize_by_hand():
    a = [[0.9, 0.1, 0.0],
         [0.7, 0.8, 0.1],
         [0.5, 0.6, 0.9]]
    s = summarize(a)
    assert s["acc"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert s["bwt"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    # forgetting: task 0 max(0.9, 0.7) - 0.5 = 0.4; task 1 0.8 - 0.6 = 0.2
    assert s["forgetting"] == pytest.approx(0.3)
    assert s["acc_curve"] == pytest.approx([0.9, 0.75, 2.0 / 3])
    joint = summarize([[0.9, 0.8]])
    assert joint["acc"] == pytest.approx(0.85) and joint["bwt"] is None


def test_naive_run_matrix_and_metrics(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "class"
    digits_cfg["strategy"]["epochs"] = 5
    (r,) = run_experiment(digits_cfg, echo=lambda *a: None)
    assert r["status"] == "finished"
    a = np.asarray(r["matrix"])
    assert a.shape == (5, 5)
    # class-IL naive forgets: the last experience is learnt, the first ones collapse
    assert a[-1, -1] > 0.85 and a[-1, :3].max() < 0.25
    # future experiences' classes are masked (never seen): accuracy exactly 0
    assert np.all(a[np.triu_indices(5, 1)] == 0)
    s = r["summary"]
    assert s["acc"] == pytest.approx(a[-1].mean())
    assert s["bwt"] == pytest.approx(np.mean([a[-1, j] - a[j, j] for j in range(4)]))
    # Avalanche's own StreamBWT over the whole test stream agrees with ours
    assert r["avalanche"]["StreamBWT/eval_phase/test_stream"] == pytest.approx(s["bwt"], abs=1e-6)
    # the task-IL view of the same single-head model is far better than the class-IL view
    assert r["summary_task_view"]["acc"] > s["acc"] + 0.3
    assert len(r["train_time_s_per_exp"]) == 5 and all(t > 0 for t in r["train_time_s_per_exp"])
    assert r["steps_per_exp"] == [40] * 5  # 5 epochs x ceil(251 / 32) = 8 batches
    assert r["peak_rss_mb"][-1] > 0
    saved = json.loads(next((Path(digits_cfg["output_dir"]) / "test" / "naive").glob("*/seed0.json"))
                       .read_text())
    assert saved["matrix"] == r["matrix"] and saved["versions"]["avalanche-lib"].startswith("0.6")
    assert (Path(digits_cfg["output_dir"]) / "test" / "summary.md").read_text().count("| naive |") == 1


def test_same_seed_same_matrix_on_cpu(digits_cfg):
    digits_cfg["benchmark"]["scenario"] = "domain"
    digits_cfg["seeds"] = [3]
    first = run_experiment(copy.deepcopy(digits_cfg), echo=lambda *a: None)[0]["matrix"]
    second = run_experiment(copy.deepcopy(digits_cfg), echo=lambda *a: None)[0]["matrix"]
    digits_cfg["seeds"] = [4]
    other = run_experiment(copy.deepcopy(digits_cfg), echo=lambda *a: None)[0]["matrix"]
    assert first == second
    assert first != other


def test_joint_has_one_row_and_ensemble_does_not_forget(digits_cfg):
    digits_cfg["methods"] = ["joint", "ensemble"]
    joint, ens = run_experiment(digits_cfg, echo=lambda *a: None)
    assert len(joint["matrix"]) == 1 and joint["summary"]["bwt"] is None
    a = np.asarray(ens["matrix"])
    # separate networks: an old task's accuracy never changes once its network is trained
    for j in range(5):
        assert np.all(a[j:, j] == a[j, j])
    assert ens["summary"]["bwt"] == 0.0 and ens["summary"]["acc"] > 0.9


class _FailAt(SupervisedPlugin):
    def __init__(self, exp_id):
        super().__init__()
        self.exp_id = exp_id

    def before_training_exp(self, strategy, **kwargs):
        if strategy.experience.current_experience == self.exp_id:
            raise RuntimeError("injected failure")


def test_results_written_before_a_failure_are_kept(digits_cfg, monkeypatch, register_methods):
    register_methods(MethodSpec("_fail_at_3", "plugin", _FailAt, defaults={"exp_id": 3}))
    digits_cfg["methods"] = ["_fail_at_3", "naive"]
    runs = run_experiment(digits_cfg, echo=lambda *a: None)
    failed, ok = runs
    assert failed["status"] == "failed" and "injected failure" in failed["error"]
    assert ok["status"] == "finished"  # one failing method does not stop the others
    saved = json.loads(next((Path(digits_cfg["output_dir"]) / "test" / "_fail_at_3").glob("*/seed0.json"))
                       .read_text())
    assert saved["status"] == "failed" and len(saved["matrix"]) == 3
    assert "injected failure" in saved["traceback"]


def test_iteration_budget_and_param_groups(digits_cfg):
    digits_cfg["strategy"]["train_iterations"] = 11
    digits_cfg["optimizer"].update(name="sgd", lr=0.1,
                                   param_groups=[{"params": r"^head\.", "lr": 0.5}])
    (r,) = run_experiment(digits_cfg, echo=lambda *a: None)
    assert r["steps_per_exp"] == [11] * 5


def test_build_optimizer_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    cfg = load_config()["optimizer"]
    cfg.update(name="sgd", lr=0.1, momentum=0.9, param_groups=[{"params": r"^1\.", "lr": 0.01}])
    opt = build_optimizer(cfg, model)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert opt.param_groups[1]["params"][0] is model[1].weight
    assert opt.param_groups[0]["momentum"] == 0.9
    cfg["param_groups"] = [{"params": "nomatch"}]
    with pytest.raises(ValueError, match="matches no parameter"):
        build_optimizer(cfg, model)


def test_zero_grad_in_place_option():
    p = torch.nn.Parameter(torch.ones(2))
    cfg = load_config()["optimizer"]
    cfg["zero_grad_to_none"] = False
    opt = build_optimizer(cfg, torch.nn.ParameterList([p]))
    p.sum().backward()
    opt.zero_grad()
    assert p.grad is not None and torch.all(p.grad == 0)
    cfg["zero_grad_to_none"] = True
    opt = build_optimizer(cfg, torch.nn.ParameterList([p]))
    opt.zero_grad()
    assert p.grad is None


# ------------------------------------------------------------------------------------ errors

def test_unknown_names_list_the_options(digits_cfg):
    digits_cfg["methods"] = ["nave"]
    with pytest.raises(ValueError, match=r"Unknown method 'nave'.*Did you mean 'naive'.*cumulative"):
        run_experiment(digits_cfg)
    with pytest.raises(ValueError, match=r"Unknown config key in 'strategy' 'epoch'.*epochs"):
        apply_override(load_config(), "strategy.epoch", 3)
    with pytest.raises(ValueError, match=r"Unknown config key 'bench'.*benchmark"):
        apply_override(load_config(), "bench.name", "x")
    cfg = copy.deepcopy(digits_cfg)
    cfg["methods"] = ["naive"]
    cfg["benchmark"]["name"] = "split_cifar"
    # Checked before anything runs (it used to fail once per method, after work had started).
    with pytest.raises(ValueError, match=r"Unknown benchmark 'split_cifar'.*split_cifar10"):
        run_experiment(cfg, echo=lambda *a: None)
    assert not Path(cfg["output_dir"]).exists()


def test_task_label_method_in_class_il_says_so(digits_cfg):
    digits_cfg["methods"] = ["ensemble"]
    digits_cfg["benchmark"]["scenario"] = "class"
    with pytest.raises(ValueError, match="'ensemble' needs task labels.*class-IL"):
        run_experiment(digits_cfg)


@pytest.mark.parametrize("key, value, pattern", [
    ("strategy.epochs", 0, r"strategy.epochs must be in \[1, inf\); got 0"),
    ("optimizer.lr", -1.0, r"optimizer.lr must be in \(0, inf\); got -1.0"),
    ("optimizer.name", "rmsprop", r"optimizer.name must be one of 'sgd', 'adam', 'adamw'"),
    ("seeds", [-1], r"seeds\[\] must be in \[0, inf\)"),
])
def test_bad_values_name_argument_and_range(digits_cfg, key, value, pattern):
    apply_override(digits_cfg, key, value)
    with pytest.raises(ValueError, match=pattern):
        run_experiment(digits_cfg)


def test_bad_method_hyperparameter_is_named(digits_cfg):
    digits_cfg["methods"] = [{"name": "ensemble", "params": {"n_members": 3}}]
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) \['n_members'\] for "
                                         r"method 'ensemble'"):
        run_experiment(digits_cfg, echo=lambda *a: None)
    assert not Path(digits_cfg["output_dir"]).exists()  # checked before anything was written


def test_override_parsing():
    cfg = load_config()
    apply_override(cfg, "optimizer.lr", parse_value("1e-3"))
    apply_override(cfg, "model.hidden", parse_value("[8, 8]"))
    apply_override(cfg, "seeds", parse_value("0,1,2"))
    apply_override(cfg, "methods", parse_value("naive,joint"))
    apply_override(cfg, "methods.1.params.foo", 2)
    assert cfg["optimizer"]["lr"] == 0.001 and isinstance(cfg["optimizer"]["lr"], float)
    assert cfg["model"]["hidden"] == [8, 8] and cfg["seeds"] == [0, 1, 2]
    assert cfg["methods"][1] == {"name": "joint", "params": {"foo": 2}, "plus": []}


def test_registry_entries_are_complete():
    for name in ("naive", "joint", "cumulative", "ensemble"):
        spec = get_method(name)
        assert spec.paper and spec.summary and spec.scenarios
    assert get_method("ensemble").needs_task_labels


def test_method_entry_overrides_are_checked(digits_cfg):
    digits_cfg["methods"] = [{"name": "naive", "optimizer": {"name": "lbfgs"}}]
    with pytest.raises(ValueError, match=r"methods\[0\].optimizer.name must be one of"):
        run_experiment(digits_cfg)
    digits_cfg["methods"] = [{"name": "naive", "strategy": {"epoch": 2}}]
    with pytest.raises(ValueError, match=r"Unknown key in methods\[\].strategy 'epoch'"):
        run_experiment(digits_cfg)


def test_method_params_apply_by_name_and_are_not_inherited(digits_cfg, tmp_path):
    from cl_plugins.experiment.config import MAIN_JOB_METHOD_PARAMS

    assert load_config()["method_params"] == MAIN_JOB_METHOD_PARAMS
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: x\n")
    assert load_config(cfg_file)["method_params"] == {}
    digits_cfg["methods"] = ["ensemble"]
    digits_cfg["method_params"] = {"ensemble": {"bogus": 1}}
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) \['bogus'\] for method "
                                         r"'ensemble'"):
        run_experiment(digits_cfg, echo=lambda *a: None)


def test_an_entry_beside_all_customises_that_method_in_place():
    from cl_plugins.experiment.config import normalize_methods
    from cl_plugins.experiment.plan import expand_methods

    plain = [e["name"] for e in expand_methods(normalize_methods(["all"]), "task")]
    sgd = {"name": "sgd", "lr": 0.1}
    got = expand_methods(normalize_methods(
        [{"name": "rgo", "optimizer": sgd}, "all", {"name": "rgo", "label": "rgo-2"},
         {"name": "ewc", "plus": ["er"]}]), "task")
    names = [e["name"] for e in got]
    assert names[:len(plain)] == plain  # same methods, same order, rgo once
    assert got[plain.index("rgo")]["optimizer"] == sgd
    assert [e.get("label") for e in got[len(plain):]] == ["rgo-2", None]  # labelled / plus: extra
    assert got[-1]["plus"] == [{"name": "er", "params": {}}]
    # without 'all', entries are kept as they are
    assert expand_methods(normalize_methods(["rgo", "rgo"]), "task") == normalize_methods(
        ["rgo", "rgo"])


def test_the_main_job_steps_the_projection_methods_with_plain_sgd():
    from cl_plugins.experiment.cli import prepare

    plan, _ = prepare([])
    by_name = {e["name"]: e for e in plan.entries}
    assert len(by_name) == len(plan.entries)  # each method once
    for name in ("gpm", "ogd", "rgo"):
        opt = by_name[name]["optimizer"]
        assert opt["name"] == "sgd" and opt["momentum"] == 0 and opt["weight_decay"] == 0
    assert "optimizer" not in by_name["naive"]
    # --only selects among the methods 'all' stands for, customised entries included
    plan, _ = prepare(["--only=naive,rgo"])
    assert [e["name"] for e in plan.entries] == ["naive", "rgo"]
    assert plan.entries[1]["optimizer"]["name"] == "sgd"


class _RecordLR(SupervisedPlugin):
    """Records the first parameter group's learning rate at the start of every epoch."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def before_training_epoch(self, strategy, **kwargs):
        self.log.append((strategy.clock.train_exp_counter,
                         strategy.optimizer.param_groups[0]["lr"]))


def test_multistep_scheduler_restarts_every_experience(digits_cfg, register_methods):
    log = []
    register_methods(MethodSpec("_record_lr", "plugin", lambda: _RecordLR(log)))
    digits_cfg["strategy"]["epochs"] = 4
    digits_cfg["benchmark"]["n_experiences"] = 2
    digits_cfg["optimizer"].update(name="sgd", lr=0.1,
                                   scheduler={"name": "multistep", "milestones": [1, 3],
                                              "gamma": 0.5})
    digits_cfg["methods"] = ["_record_lr"]
    (r,) = run_experiment(validate(digits_cfg), echo=lambda *a: None)
    assert r["status"] == "finished"
    lrs = [round(lr, 6) for _, lr in log]
    assert lrs == [0.1, 0.05, 0.05, 0.025] * 2  # x0.5 after epochs 1 and 3, reset per task


def test_cosine_scheduler_restarts_every_experience(digits_cfg, register_methods):
    log = []
    register_methods(MethodSpec("_record_lr", "plugin", lambda: _RecordLR(log)))
    digits_cfg["strategy"]["epochs"] = 4
    digits_cfg["benchmark"]["n_experiences"] = 2
    digits_cfg["optimizer"].update(name="sgd", lr=0.1, scheduler={"name": "cosine", "t_max": 4})
    digits_cfg["methods"] = ["_record_lr"]
    (r,) = run_experiment(validate(digits_cfg), echo=lambda *a: None)
    assert r["status"] == "finished"
    # 0.1 (1 + cos(pi e / 4)) / 2 at the start of epoch e = 0..3, reset per task
    want = [0.1, 0.1 * (1 + 2 ** -0.5) / 2, 0.05, 0.1 * (1 - 2 ** -0.5) / 2] * 2
    assert [round(lr, 9) for _, lr in log] == [round(w, 9) for w in want]


@pytest.mark.parametrize("bad, match", [
    ({"name": "step"}, "scheduler.name"),
    ({"name": "cosine"}, "t_max"),
    ({"name": "cosine", "t_max": 5, "milestones": [2]}, "milestones"),
    ({"name": "multistep", "milestones": [3, 1]}, "milestones"),
    ({"name": "multistep", "milestones": [2], "step": 1}, "step"),
])
def test_scheduler_config_errors(digits_cfg, bad, match):
    digits_cfg["optimizer"]["scheduler"] = bad
    with pytest.raises(ValueError, match=match):
        validate(digits_cfg)


class _CaptureModel(SupervisedPlugin):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def before_training(self, strategy, **kwargs):
        self.seen.append(sum(p.numel() for p in strategy.model.parameters()))


def test_per_method_model_override(digits_cfg, register_methods):
    seen = []
    register_methods(MethodSpec("_capture", "plugin", lambda: _CaptureModel(seen)))
    digits_cfg["methods"] = [{"name": "_capture", "label": "wide", "model": {"hidden": [48]}},
                             "_capture"]
    digits_cfg["benchmark"]["n_experiences"] = 2
    digits_cfg["strategy"]["epochs"] = 1
    wide, plain = run_experiment(validate(digits_cfg), echo=lambda *a: None)
    assert wide["method"] == "wide" and plain["method"] == "_capture"
    assert seen[0] > seen[-1]  # 64-48-heads vs 64-32-heads
    model_cfg = section_for(digits_cfg, digits_cfg["methods"][0], "model")
    assert model_cfg == {"name": "mlp", "hidden": [48]}
    assert section_for(digits_cfg, digits_cfg["methods"][1], "model")["hidden"] == [32]


def test_main_job_overrides_name_real_parameters():
    """The main job's override table names only methods that exist and parameters their
    signatures declare; a renamed parameter would otherwise be silently dropped from it."""
    import inspect

    from cl_plugins.experiment.config import MAIN_JOB_METHOD_PARAMS
    from cl_plugins.registry import get_method, signature_defaults

    for name, params in MAIN_JOB_METHOD_PARAMS.items():
        spec = get_method(name)
        assert spec.defaults == signature_defaults(spec.factory)
        declared = set(inspect.signature(spec.factory.__init__).parameters) - {"self"}
        assert set(params) <= declared, (name, set(params) - declared)
        for key, value in params.items():
            assert value != spec.defaults[key], f"{name}.{key} overrides with the default"
