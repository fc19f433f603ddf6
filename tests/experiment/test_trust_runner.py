"""cl-run never reports a wrong result, never overwrites another, and fails before it starts.

One test per case of the trust audit: each asserts the exit code, the message and which files
exist afterwards."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from cl_plugins.experiment.cli import main
from cl_plugins.registry import MethodSpec

FAST = ["--no-progress", "--no-plots", "--strategy.epochs=1", "--model.hidden=[16]"]


def _files(root: Path):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _jsons(root: Path, label: str):
    return [json.loads(p.read_text()) for p in sorted((root / "default" / label).glob(
        "*/seed*.json")) if not p.name.endswith(".rerun.json")]


def _train_raising_at(call: int, error: BaseException):
    """Naive.train that raises ``error`` at its ``call``-th call (1-based), else trains."""
    original, calls = Naive.train, {"n": 0}

    def train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return original(self, *args, **kwargs)

    return train


# ------------------------------------------------------------------------------ divergence

def test_divergence_stops_each_run_records_it_and_the_rest_still_run(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main([f"--out={out}", "--methods=naive,ewc,er", "--optimizer.name=sgd",
                 "--optimizer.lr=1e6", "--no-progress", "--strategy.epochs=1"])
    err = capsys.readouterr().err
    assert code == 1
    for label in ("naive", "ewc", "er"):
        (r,) = _jsons(out, label)
        assert r["status"] == "diverged" and r["matrix"] == []
        assert "diverged at experience 0" in r["error"] and "optimizer.lr=1000000.0" in r["error"]
        assert f"{label} seed 0 diverged" in err
    assert "learning rate too high" in err and "Traceback" not in err
    assert "ewc.ewc_lambda=" in err  # the method's coefficient is named too


class _PoisonAt(SupervisedPlugin):
    """Writes a NaN into the first parameter after the first step of experience ``at``."""

    def __init__(self, at: int = 2):
        super().__init__()
        self.at = at

    def after_update(self, strategy, **kwargs):
        if strategy.experience.current_experience == self.at:
            with torch.no_grad():
                next(strategy.model.parameters()).view(-1)[0] = float("nan")


@pytest.fixture
def poison(register_methods):
    register_methods(MethodSpec("_poison", "plugin", _PoisonAt))


def test_divergence_mid_stream_keeps_the_rows_before(tmp_path, capsys, poison):
    out = tmp_path / "runs"
    code = main([f"--out={out}", "--methods=_poison,naive", *FAST])
    err = capsys.readouterr().err
    assert code == 1
    (bad,) = _jsons(out, "_poison")
    (good,) = _jsons(out, "naive")
    assert bad["status"] == "diverged" and len(bad["matrix"]) == 2
    assert "experience 2, epoch 0, step 2: non-finite" in bad["error"]
    assert good["status"] == "finished" and len(good["matrix"]) == 5
    assert "_poison seed 0 diverged" in err
    summary = (out / "default" / "summary.md").read_text()
    assert "0 diverged" in summary


class _PoisonThenRefuse(_PoisonAt):
    """Poisons a parameter, then, like an SVD or a QP solver given NaN inputs, raises its own
    error at the next step's loss, before the guard reads the loss."""

    def before_backward(self, strategy, **kwargs):
        if not torch.isfinite(strategy.mb_output).all():
            raise torch.linalg.LinAlgError("linalg.svd: the input matrix contained non-finite "
                                           "values")


class _Refuse(SupervisedPlugin):
    """Raises its own error with every parameter finite: a genuine failure."""

    def before_backward(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1:
            raise RuntimeError("a bug in a plugin")


def test_an_error_raised_on_non_finite_parameters_is_recorded_as_divergence(
        tmp_path, capsys, register_methods):
    register_methods(MethodSpec("_refuse_nan", "plugin", _PoisonThenRefuse),
                     MethodSpec("_bug", "plugin", _Refuse))
    out = tmp_path / "runs"
    code = main([f"--out={out}", "--methods=_refuse_nan,_bug,naive", *FAST])
    err = capsys.readouterr().err
    assert code == 1
    (bad,) = _jsons(out, "_refuse_nan")
    assert bad["status"] == "diverged" and len(bad["matrix"]) == 2
    assert bad["error"].startswith("DivergenceError: non-finite parameters (")
    assert "when the run stopped with _LinAlgError: linalg.svd" in bad["error"]
    (bug,) = _jsons(out, "_bug")  # finite parameters: still a failure, with its traceback
    assert bug["status"] == "failed" and "a bug in a plugin" in bug["error"]
    assert "Traceback" in bug["traceback"] and len(bug["matrix"]) == 1
    (good,) = _jsons(out, "naive")
    assert good["status"] == "finished"
    assert "_refuse_nan seed 0 diverged" in err


def test_guard_catches_non_finite_parameters_at_the_end_of_an_experience():
    from types import SimpleNamespace

    from cl_plugins.core.divergence import DivergenceError, DivergenceGuard

    model = torch.nn.Linear(2, 2)
    strategy = SimpleNamespace(model=model, experience=SimpleNamespace(current_experience=1),
                               clock=SimpleNamespace(train_exp_epochs=3),
                               loss=torch.tensor(1.0), mb_output=torch.ones(4, 2))
    guard = DivergenceGuard("m", 7, "optimizer.lr=0.1")
    guard.after_update(strategy)
    guard.after_training_exp(strategy)  # all finite: silent
    strategy.mb_output = torch.tensor([[1.0, float("-inf")]])  # a mask, not divergence
    strategy.loss = torch.nn.functional.cross_entropy(strategy.mb_output, torch.tensor([0]))
    guard.after_update(strategy)
    strategy.mb_output = torch.tensor([[1.0, float("inf")]])  # +inf: the loss turns NaN
    strategy.loss = torch.nn.functional.cross_entropy(strategy.mb_output, torch.tensor([0]))
    with pytest.raises(DivergenceError, match=r"m seed 7: .*experience 1, epoch 3, step 3: "
                                              r"non-finite loss \(nan\) from non-finite logits"
                                              r".*optimizer.lr=0.1"):
        guard.after_update(strategy)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(DivergenceError, match=r"non-finite parameters \(bias\)"):
        guard.after_training_exp(strategy)


def test_a_method_setting_that_the_strategy_cannot_meet_is_refused_before_anything_runs(
        tmp_path, capsys):
    out = tmp_path / "runs"
    args = [f"--out={out}", "--methods=naive,avalanche_packnet", "--benchmark.scenario=task",
            "--method_params.avalanche_packnet.post_prune_epochs=1", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nothing was run" in err
    assert "avalanche_packnet: post_prune_epochs=1 must be below strategy.epochs=1" in err
    assert not out.exists()
    # under an iteration budget the epochs are known only when the run starts: no early refusal
    assert main([*args, "--strategy.train_iterations=40", "--seeds=0"]) == 0


@pytest.mark.parametrize("arg", ["--optimizer.lr=.inf", "--method_params.ewc.ewc_lambda=.nan",
                                 "--method_params.lwf.alpha=.inf"])
def test_non_finite_hyper_parameters_are_rejected_before_anything_runs(tmp_path, capsys, arg):
    out = tmp_path / "runs"
    assert main([f"--out={out}", "--methods=ewc,lwf", arg, *FAST]) == 2
    err = capsys.readouterr().err
    assert "nothing was run" in err and ("finite" in err)
    assert not out.exists()


# ------------------------------------------------------------------------------ validation

def test_method_params_typo_is_an_error(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main([f"--out={out}", "--methods=ewc", "--method_params.ewcc.ewc_lambda=1",
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "Unknown method 'ewcc'. Did you mean 'ewc'?" in err
    assert not out.exists()


def test_every_problem_is_reported_once_before_any_work(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main([f"--out={out}", "--benchmark.name=split_digitz", "--model.name=mlpp",
                 "--method_params.ewc.ewc_lambda=-1", "--strategy.device=cuda:0",
                 "--benchmark.nme=x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "problems in the config, nothing was run" in err
    assert "Unknown config key in 'benchmark' 'nme'" in err
    assert "Unknown benchmark 'split_digitz'" in err
    # the model's name needs no shapes: checked even when the benchmark is unknown
    assert "Unknown model 'mlpp'. Did you mean 'mlp'?" in err
    if not torch.cuda.is_available():
        assert "CUDA is not available" in err
    assert "ewc_lambda must be in [0, inf); got -1" in err
    assert err.count("ewc_lambda must be") == 1  # once, not once per method
    assert "Traceback" not in err and not out.exists()


def test_model_key_class_split_and_scenario_are_checked_first(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main([f"--out={out}", "--model.name=mlpp", "--benchmark.n_experiences=3",
                 "--methods=ensemble,icarl", "--benchmark.scenario=domain"])
    err = capsys.readouterr().err
    assert code == 2
    assert "n_experiences must divide the 10 classes" in err
    assert "'ensemble' needs task labels" in err
    assert "Method 'icarl' supports the scenarios ['class']" in err
    assert not out.exists()
    code = main([f"--out={out}", "--model.name=mlpp", "--methods=naive"])
    assert code == 2 and "Unknown model 'mlpp'. Did you mean 'mlp'?" in capsys.readouterr().err
    code = main([f"--out={out}", "--model.hiden=[3]", "--methods=naive"])
    err = capsys.readouterr().err
    assert code == 2 and "model.hiden: model 'mlp' has no such key; its keys: " in err
    assert "unexpected keyword" not in err
    assert not out.exists()


def test_two_training_templates_in_one_entry_are_counted(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("methods: [{name: naive, plus: [joint]}]\n")
    assert main(["--config", str(cfg), f"--out={tmp_path / 'runs'}"]) == 2
    assert "at most one training template (naive, joint, cumulative) per entry; got 2" in \
        capsys.readouterr().err


def test_duplicate_labels_are_an_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("methods: [{name: ewc, label: x}, {name: si, label: x}]\n")
    assert main(["--config", str(cfg), f"--out={tmp_path / 'runs'}"]) == 2
    assert "label 'x' is also methods[0]'s" in capsys.readouterr().err


# ------------------------------------------------------------------------------ errors

def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("benchmark:\n  name: split_digits\n  scenario: [task\n")
    assert main(["--config", str(cfg), f"--out={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert f"config file '{cfg}', line 4, column 1: not valid YAML" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_a_section_written_as_a_scalar(tmp_path, capsys):
    cfg = tmp_path / "scalar.yaml"
    cfg.write_text("benchmark: split_digits\n")
    assert main(["--config", str(cfg), f"--out={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "section 'benchmark' must be a mapping of keys (name, scenario" in err
    assert "got 'split_digits'" in err and not (tmp_path / "runs").exists()
    assert main([f"--out={tmp_path / 'runs'}", "--benchmark=3", "--benchmark.name=x"]) == 2
    assert "benchmark is not a section" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["123", "no", "~/cl-runs-test"])
def test_path_options_are_paths(tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main([f"--out={value}", "--methods=naive", *FAST]) == 0
    where = tmp_path / "home" / "cl-runs-test" if value.startswith("~") else tmp_path / value
    assert (where / "default" / "summary.md").is_file()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {value}\nbenchmark: {{data_root: no}}\nmethods: [naive]\n")
    assert main(["--config", str(cfg), *FAST]) == 0
    assert len(_jsons(where, "naive")) == 1  # the same settings: the same file


def test_an_output_dir_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main([f"--out={blocker}/runs", "--methods=naive", *FAST]) == 2
    err = capsys.readouterr().err
    assert f"'{blocker}' exists and is not a folder" in err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([f"--out={locked}/runs", "--methods=naive", *FAST]) == 2
        assert "cannot be written" in capsys.readouterr().err


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = Naive.train

    def train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Naive, "train", train)
    out = tmp_path / "runs"
    assert main([f"--out={out}", "--methods=naive", *FAST]) == 130
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "resume" in lines[0]
    (r,) = _jsons(out, "naive")
    assert r["status"] == "interrupted" and len(r["matrix"]) == 2
    assert len(list((out / "default" / "naive").glob("*/seed0.ckpt.pt"))) == 1
    monkeypatch.setattr(Naive, "train", original)
    assert main([f"--out={out}", "--methods=naive", *FAST]) == 0  # resumes
    (r,) = _jsons(out, "naive")
    assert r["status"] == "finished" and r["resumed"][0]["after_experiences"] == 2


def _tiny_mnist(root: Path, n_train=20, n_test=10, truncate=None, labels_off=0):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        y = (torch.arange(n + labels_off) % 10).to(torch.uint8)
        img = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) \
            + x.numpy().tobytes()
        lab = (2049).to_bytes(4, "big") + (n + labels_off).to_bytes(4, "big") + y.numpy().tobytes()
        for name, blob in ((f"{prefix}-images-idx3-ubyte.gz", img),
                           (f"{prefix}-labels-idx1-ubyte.gz", lab)):
            data = gzip.compress(blob)
            (raw / name).write_bytes(data[:truncate] if truncate and prefix == "train"
                                     and "images" in name else data)
    return raw


@pytest.mark.parametrize("case", ["truncated", "labels", "missing"])
def test_data_file_problems_fail_once_with_the_file_named(tmp_path, capsys, case):
    data = tmp_path / "data"
    raw = _tiny_mnist(data, truncate=200 if case == "truncated" else None,
                      labels_off=1 if case == "labels" else 0)
    if case == "missing":
        (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    out = tmp_path / "runs"
    code = main([f"--out={out}", f"--data-root={data}", "--benchmark.name=split_mnist",
                 "--methods=naive,ewc", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert err.count("cl-run: error") == 1
    if case == "truncated":
        assert str(raw / "train-images-idx3-ubyte.gz") in err and "truncated" in err
    elif case == "labels":
        assert "21 labels" in err and "20 images" in err
    else:
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            assert name in err


# ------------------------------------------------------------------------------ overwriting

def test_other_settings_never_replace_a_result(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main([f"--out={out}", "--methods=gpm", *FAST]) == 0
    (first,) = _jsons(out, "gpm")
    first_text = next((out / "default" / "gpm").glob("*/seed0.json")).read_text()
    assert main([f"--out={out}", "--methods=gpm", *FAST, "--optimizer.lr=0.01"]) == 0
    runs = _jsons(out, "gpm")
    assert len(runs) == 2 and {r["config"]["optimizer"]["lr"] for r in runs} == {0.001, 0.01}
    assert first["settings_fingerprint"] in {r["settings_fingerprint"] for r in runs}
    assert (out / "default" / "gpm" / first["settings_fingerprint"] / "seed0.json").read_text() \
        == first_text
    summary = (out / "default" / "summary.md").read_text()
    for r in runs:
        assert f"gpm @{r['settings_fingerprint']}" in summary


def test_a_failing_rerun_never_downgrades_a_finished_result(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    assert main([f"--out={out}", "--methods=naive", *FAST, "--no-checkpoint"]) == 0
    path = next((out / "default" / "naive").glob("*/seed0.json"))
    finished = path.read_text()
    original = Naive.train
    monkeypatch.setattr(Naive, "train", _train_raising_at(2, RuntimeError("injected failure")))
    assert main([f"--out={out}", "--methods=naive", *FAST, "--no-checkpoint"]) == 1
    assert path.read_text() == finished
    rerun = json.loads(path.with_name("seed0.rerun.json").read_text())
    assert rerun["status"] == "failed" and "injected failure" in rerun["error"]
    monkeypatch.setattr(Naive, "train", original)
    assert main([f"--out={out}", "--methods=naive", *FAST, "--no-checkpoint"]) == 0
    assert not path.with_name("seed0.rerun.json").exists()  # the finished rerun took its place
    assert json.loads(path.read_text())["status"] == "finished"


def test_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    from cl_plugins.experiment import results as res

    target = tmp_path / "r" / "seed0.json"
    res.write_json_atomic(target, {"status": "finished"})

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError, match="No space left"):
        res.write_json_atomic(target, {"status": "running"})
    assert _files(tmp_path) == ["r/seed0.json"]
    assert json.loads(target.read_text()) == {"status": "finished"}


# ------------------------------------------------------------------------------ provenance

def test_every_result_records_its_code_and_settings(tmp_path):
    from cl_plugins.experiment.results import provenance

    out = tmp_path / "runs"
    assert main([f"--out={out}", "--methods=naive", *FAST]) == 0
    (r,) = _jsons(out, "naive")
    prov = r["provenance"]
    assert prov["cl_plugins"] == "0.1.0" and len(prov["source_hash"]) == 16
    assert prov["files"]["cl_plugins/experiment/runner.py"] == provenance()["files"][
        "cl_plugins/experiment/runner.py"]
    if prov["git_commit"] is not None:
        assert len(prov["git_commit"]) == 40 and isinstance(prov["git_dirty"], bool)
    assert len(r["settings_fingerprint"]) == 8
    assert next((out / "default" / "naive").glob("*/seed0.json")).parent.name == \
        r["settings_fingerprint"]


# ------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("damage", ["latest", "both"])
def test_a_truncated_checkpoint_is_named_set_aside_and_the_run_recovers(tmp_path, monkeypatch,
                                                                        capsys, damage):
    calls = {"n": 0}
    original = Naive.train

    def train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Naive, "train", train)
    out = tmp_path / "runs"
    args = [f"--out={out}", "--methods=ewc", *FAST]
    assert main(args) == 130
    folder = next((out / "default" / "ewc").glob("*"))
    latest, prev = folder / "seed0.ckpt.pt", folder / "seed0.ckpt.prev.pt"
    assert latest.exists() and prev.exists()  # after experiences 3 and 2
    for path in [latest] + ([prev] if damage == "both" else []):
        path.write_bytes(path.read_bytes()[:100])
    monkeypatch.setattr(Naive, "train", original)
    capsys.readouterr()
    with pytest.warns(UserWarning) as caught:
        assert main(args) == 0
    said = " ".join(str(w.message) for w in caught)
    assert str(latest) in said and "corrupt" in said
    (r,) = _jsons(out, "ewc")
    assert r["status"] == "finished" and len(r["matrix"]) == 5
    if damage == "latest":  # resumed from the previous good checkpoint
        assert r["resumed"][0]["after_experiences"] == 2
    else:  # nothing usable: started over
        assert r["resumed"] == [] and "starts over" in said
    assert (folder / "seed0.ckpt.pt.corrupt").exists()  # set aside, never deleted
    assert not latest.exists() and not prev.exists()  # removed once the run finished


def test_a_rerun_of_a_diverged_result_keeps_it_until_the_rerun_is_complete(
        tmp_path, monkeypatch, capsys, poison):
    out = tmp_path / "runs"
    args = [f"--out={out}", "--methods=_poison", *FAST, "--no-checkpoint"]
    assert main(args) == 1
    path = next((out / "default" / "_poison").glob("*/seed0.json"))
    diverged = path.read_text()
    assert json.loads(diverged)["status"] == "diverged"
    original = Naive.train  # a rerun that fails: the diverged record stays
    monkeypatch.setattr(Naive, "train", _train_raising_at(2, RuntimeError("injected failure")))
    assert main(args) == 1
    assert path.read_text() == diverged
    assert json.loads(path.with_name("seed0.rerun.json").read_text())["status"] == "failed"
    monkeypatch.setattr(Naive, "train", original)
    seen = {}

    def watch(self, *a, **k):  # while the rerun trains, the diverged record is untouched
        seen.setdefault("during", path.read_text())
        return original(self, *a, **k)

    monkeypatch.setattr(Naive, "train", watch)
    assert main(args) == 1  # diverges again: a complete result of this code, it takes the place
    assert seen["during"] == diverged
    again = json.loads(path.read_text())
    assert again["status"] == "diverged" and again["started"] >= json.loads(diverged)["started"]
    assert again["run_fingerprint"] == json.loads(diverged)["run_fingerprint"]
    assert path.read_text() != diverged  # the new record (its own start time, timings)
    assert not path.with_name("seed0.rerun.json").exists()


def test_a_resumed_run_records_the_code_of_each_part(tmp_path, monkeypatch, recwarn):
    from cl_plugins.experiment import results as res

    out = tmp_path / "runs"
    args = [f"--out={out}", "--methods=naive", *FAST]
    real = res.provenance()
    older = {**real, "source_hash": "0" * 16, "git_commit": "a" * 40,
             "files": {**real["files"], "cl_plugins/experiment/runner.py": "0" * 12}}
    original = Naive.train
    monkeypatch.setattr(res, "provenance", lambda: older)  # the first part: other code
    monkeypatch.setattr(Naive, "train", _train_raising_at(3, RuntimeError("stopped")))
    assert main(args) == 1
    monkeypatch.setattr(res, "provenance", lambda: real)
    monkeypatch.setattr(Naive, "train", original)
    assert main(args) == 0
    (r,) = _jsons(out, "naive")
    assert r["status"] == "finished" and len(r["matrix"]) == 5
    assert r["provenance"] == real
    (part,) = r["resumed"]
    assert part["after_experiences"] == 2 and part["provenance_before"] == older
    assert any("resuming after experience 2 with other code" in str(w.message) for w in recwarn)
