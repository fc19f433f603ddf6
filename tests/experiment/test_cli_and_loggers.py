"""cl-run's command line, --list, the default main job, and the wandb logger (offline)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from cl_plugins.experiment.cli import main
from cl_plugins.registry import list_methods

from helpers import REPO


def test_list_prints_every_method_with_scenarios(capsys):
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [s.name for s in list_methods()]
    assert "ensemble\ttask" in lines and "naive\ttask,domain,class" in lines


def test_default_main_job_runs_every_task_il_method(tmp_path, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # one epoch: the test checks that every method builds, trains, evaluates and reports
        # without a warning, not what it learns (38 task-IL methods: 2 epochs took 190 s)
        code = main([f"--out={tmp_path}", "--no-progress", "--strategy.epochs=1"])
    out = capsys.readouterr().out
    assert code == 0
    # no method warns about its optimizer or settings in the main job (GPM, OGD and RGO step
    # with plain SGD there); the one notice left is the missing checkpoint of the plugins that
    # replace strategy.model (the ensemble, P&C: the runner cannot rebuild their wrapper yet)
    replacing = {s.name for s in list_methods("task")
                 if s.name == "ensemble" or getattr(s.factory, "REPLACES_MODEL", False)}
    assert {"ensemble", "pnc"} <= replacing
    ours = [str(w.message) for w in caught if "cl_plugins" in w.filename
            and not any(str(w.message).startswith(f"{name} seed 0: no checkpoint (off after "
                                                  "experience 1: RuntimeError: a plugin "
                                                  "replaced strategy.model")
                        for name in replacing)]
    assert ours == []
    table = out[out.index("method"):]
    for spec in list_methods("task"):
        assert (f"\n{spec.name} " in table) != spec.reference
    assert "avalanche_ewc" in {s.name for s in list_methods("task")}
    assert "split_digits, task-IL" in out
    assert (tmp_path / "default" / "summary.md").is_file()
    assert (tmp_path / "default" / "acc_curve.png").stat().st_size > 1000
    assert next((tmp_path / "default" / "naive").glob("*/seed0.png")).stat().st_size > 1000


def test_cli_errors_are_clean(capsys):
    assert main(["--benchmark.nme=x"]) == 2
    assert "Unknown config key in 'benchmark' 'nme'" in capsys.readouterr().err
    assert main(["--config", "does/not/exist.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["positional"]) == 2


def test_every_shipped_config_loads():
    """Each shipped config loads and validates; its name is its file's stem (two configs never
    share an output folder); every method it runs is registered, supports its scenario, and
    its plugins accept the config's hyper-parameters (what plan_experiment checks, minus the
    data files the configs need)."""
    from cl_plugins.benchmarks import resolve_scenario
    from cl_plugins.experiment.config import load_config, validate
    from cl_plugins.experiment.plan import entry_params, expand_methods, instantiate
    from cl_plugins.registry import get_method

    paths = sorted((REPO / "experiments" / "configs").glob("*.yaml"))
    assert len(paths) >= 10, paths  # the folder really is the configs folder
    for path in paths:
        cfg = validate(load_config(path))
        assert cfg["name"] == path.stem
        scenario = resolve_scenario(cfg["benchmark"]["scenario"])
        for entry in expand_methods(cfg["methods"], scenario):
            for part in [entry] + entry["plus"]:
                spec = get_method(part["name"])
                spec.check_scenario(scenario)
                if spec.kind == "plugin":
                    instantiate(spec, entry_params(cfg, part))


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    from wandb_offline import read_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    code = main([f"--out={tmp_path / 'runs'}", "--no-progress", "--methods=naive",
                 "--strategy.epochs=1", "--wandb", "--loggers.wandb_project=test"])
    assert code == 0
    files = glob.glob(str(tmp_path / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    assert len(files) == 1
    rows = read_history(Path(files[0]))
    keys = set().union(*rows)
    assert "Top1_Acc_Exp/eval_phase/test_stream/Task004/Exp004" in keys
    assert "final/acc" in keys and "final/bwt" in keys
    result = json.loads(next((tmp_path / "runs" / "default" / "naive").glob("*/seed0.json"))
                        .read_text())
    final = [r["final/acc"] for r in rows if "final/acc" in r]
    assert final == [pytest.approx(result["summary"]["acc"])]
    # the accuracy-matrix plot went to wandb as an image
    assert any(r.get("final/acc_matrix/_type") == "image-file" for r in rows)
    assert any(r.get("final/acc_curve/_type") == "image-file" for r in rows)


def test_readme_stays_true():
    readme = (REPO / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ['pip install -e ".[dev]" && cl-run', "pytest"]
    for spec in list_methods():
        if not spec.reference:
            assert f"| `{spec.name}` |" in readme, f"README method table lacks {spec.name}"
    ci = (REPO / ".ci" / "run").read_text()
    assert "\npytest\n" in ci and 'pip install --quiet -e ".[dev]"' in ci


def test_only_selects_a_label_exactly_and_a_bare_name_by_method():
    from cl_plugins.experiment.cli import select_methods
    from cl_plugins.experiment.runner import method_label

    def picked(*only):
        cfg = {"methods": ["naive", "ogd", {"name": "ogd", "label": "ogd-lr0.001"},
                           {"name": "nscl", "label": "nscl-a"},
                           {"name": "nscl", "label": "nscl-b"}]}
        select_methods(cfg, list(only))
        return [method_label(e) for e in cfg["methods"]]

    assert picked("ogd") == ["ogd"]  # a label: that entry alone
    assert picked("ogd-lr0.001") == ["ogd-lr0.001"]
    assert picked("nscl") == ["nscl-a", "nscl-b"]  # no entry is labelled nscl: every nscl entry
    assert picked("naive", "nscl-b") == ["naive", "nscl-b"]
    with pytest.raises(ValueError, match="matches no method entry"):
        picked("gpm")
