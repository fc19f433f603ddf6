"""Every sweep file is valid, and one sweep point runs through the agent's exact command line."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cl_plugins.experiment.config import known_keys, load_config

from helpers import REPO

SWEEPS = sorted(glob.glob(str(REPO / "experiments" / "sweeps" / "*.yaml")))


def _base_config(sweep):
    cfg_arg = next(a for a in sweep["command"] if str(a).startswith("--config="))
    return load_config(REPO / cfg_arg.split("=", 1)[1])


def test_there_are_sweeps():
    assert any(Path(s).name == "naive_lr.yaml" for s in SWEEPS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: Path(p).name)
def test_sweep_file_is_valid(path):
    sweep = yaml.safe_load(Path(path).read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["name"].startswith("final/") and sweep["metric"]["goal"] in (
        "maximize", "minimize")
    keys = set(known_keys(_base_config(sweep)))
    unknown = [p for p in sweep["parameters"] if p not in keys]
    assert not unknown, f"{Path(path).name}: parameters not in the config schema: {unknown}"
    assert "${args}" in sweep["command"]


def _agent_command(sweep, params):
    """Expand the sweep command as `wandb agent` does, using wandb's own helpers."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(sweep["command"])
    args = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in
                                                            params.items()}})
    out = []
    for token in command:
        if token == "${env}":
            out.append("/usr/bin/env")
        elif token == "${args}":
            out.extend(args["args"])
        elif token == "cl-run":
            out.append(str(Path(sys.executable).with_name("cl-run")))
        else:
            out.append(token)
    return out


def test_one_sweep_point_runs_like_the_agent(tmp_path):
    sweep = yaml.safe_load((REPO / "experiments" / "sweeps" / "naive_lr.yaml").read_text())
    cmd = _agent_command(sweep, {"optimizer.lr": 0.05, "optimizer.momentum": 0.9, "seeds": 1})
    assert "--optimizer.lr=0.05" in cmd and "--seeds=1" in cmd
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path),
               WANDB_SWEEP_ID="testsweep", WANDB_RUN_ID="sweeprun1")
    cmd += [f"--output_dir={tmp_path / 'runs'}", "--strategy.epochs=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    r = json.loads(next((tmp_path / "runs" / "digits_naive_sweep" / "naive").glob("*/seed1.json"))
                   .read_text())
    assert r["config"]["optimizer"]["lr"] == 0.05 and r["config"]["optimizer"]["momentum"] == 0.9
    assert r["seed"] == 1 and r["status"] == "finished"


def test_the_grid_sweep_gives_every_method_and_seed_one_point():
    from cl_plugins.registry import get_method

    sweep = yaml.safe_load((REPO / "experiments" / "sweeps" / "digits_methods_grid.yaml")
                           .read_text())
    assert sweep["method"] == "grid"
    methods, seeds = (sweep["parameters"][k]["values"] for k in ("methods", "seeds"))
    assert len(set(methods)) == len(methods) and len(set(seeds)) == len(seeds)
    scenario = _base_config(sweep)["benchmark"]["scenario"]
    for name in methods:  # each point is runnable on the base config's scenario
        assert scenario in get_method(name).scenarios, name
