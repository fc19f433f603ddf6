"""experiments/reproduce.py: the RESULTS.md table and the README block from results JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from helpers import REPO


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "experiments" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(root, variant, method, seed, acc, bwt, status="finished"):
    path = root / "S1" / variant / "hsu2018_split_mnist" / method / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": status, "method": method, "seed": seed,
                                "started": "2026-11-20T10:00:00",
                                "summary": {"acc": acc, "bwt": bwt}}))


def test_table_rows_and_spread_check(tmp_path, monkeypatch):
    rp = _load()
    monkeypatch.setattr(rp, "RESULTS_DIR", tmp_path)
    _write(tmp_path, "task", "naive-sgd", 0, 0.9790, -0.01)
    _write(tmp_path, "task", "naive-sgd", 1, 0.9810, -0.01)
    _write(tmp_path, "task", "naive-sgd", 2, 0.50, -0.5, status="failed")  # ignored
    _write(tmp_path, "class", "naive-adam", 0, 0.30, -0.9)  # far from 19.71 +- 0.08
    rows = rp.collect()
    assert [(r["variant"], r["method"]) for r in rows] == [("task", "naive-sgd"),
                                                           ("class", "naive-adam")]
    sgd, adam = rows
    assert sgd["acc"] == "98.00 ± 0.14" and sgd["seeds"] == "0,1" and sgd["ok"] == "yes"
    assert sgd["published"] == "97.98 ± 0.09"
    assert adam["ok"] == "**no**"
    table = rp.build_table(rows)
    assert "| S1 | naive-sgd | split_mnist | task-IL | 98.00 ± 0.14 | -1.00 ± 0.00 | 0,1 |" in table
    assert "`python experiments/reproduce.py S1 --variant task`" in table
    assert "outside the published spread" not in table  # no deviations file yet
    (tmp_path / "deviations.md").write_text("## Rows outside the published spread\n- naive-adam: x\n")
    table = rp.build_table(rows)
    assert table.index("- naive-adam: x") > table.index("| S1 | naive-sgd |")


def test_readme_block_is_rewritten(tmp_path, monkeypatch):
    rp = _load()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    monkeypatch.setattr(rp, "REPO", tmp_path)
    rp.update_readme([{"protocol": "S1", "method": "m", "variant": "task", "scenario": "task-IL",
                       "acc": "1.00 ± 0.00", "stale": "**stale**: core/x.py changed",
                       "published": "–", "n": 3}])
    text = readme.read_text()
    assert "old" not in text and "| S1 | m | task-IL | 1.00 ± 0.00 | – | 3 | stale |" in text
    assert text.startswith("intro\n") and text.endswith("rest\n")


def test_every_protocol_variant_builds_a_valid_config():
    """Each variant's config loads, its overrides apply to existing entries and validate."""
    from cl_plugins.experiment.config import apply_override, load_config, parse_value, validate

    rp = _load()
    for name, proto in rp.PROTOCOLS.items():
        for variant, args in proto["variants"].items():
            cfg = load_config(REPO / rp.config_for(proto, variant))
            for arg in args:
                key, value = arg[2:].split("=", 1)
                apply_override(cfg, key, parse_value(value))
            validate(cfg)
            labels = rp.labels_for(proto, variant)
            assert labels, (name, variant)
            for skipped in proto.get("skip", {}).get(variant, ()):
                assert skipped not in labels


def test_s2_skips_separate_networks_outside_task_il():
    rp = _load()
    s2 = rp.PROTOCOLS["S2"]
    assert "ensemble" in rp.labels_for(s2, "task")
    assert "ensemble" not in rp.labels_for(s2, "class")


def _provenanced(method, entry, files, settings=None):
    return {"status": "finished", "method": method, "seed": 0, "method_entry": entry,
            "started": "2026-12-04T10:00:00", "summary": {"acc": 0.9, "bwt": 0.0},
            "settings_fingerprint": settings,
            "provenance": {"git_commit": "a" * 40, "git_dirty": True, "files": files}}


def test_a_row_is_stale_when_a_file_it_depends_on_changed():
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    from provenance_check import Staleness

    check = Staleness(REPO)
    now = dict(check.current_files())
    ewc = {"name": "ewc", "params": {}, "plus": []}
    assert check.reasons(_provenanced("ewc", ewc, now), None) == []
    assert check.revision(_provenanced("ewc", ewc, now)) == "aaaaaaaa+dirty"
    for path, stale in [("cl_plugins/regularization/ewc.py", True),
                        ("cl_plugins/core/checks.py", True),
                        ("cl_plugins/benchmarks/builder.py", True),
                        ("cl_plugins/models/mlp.py", True),
                        ("cl_plugins/experiment/runner.py", True),
                        ("cl_plugins/models/heads.py", True),
                        ("cl_plugins/models/ensemble.py", True),  # imported by core/params.py
                        ("cl_plugins/models/fel.py", False),  # another backbone's code
                        ("cl_plugins/models/preact_resnet.py", False),
                        ("cl_plugins/replay/er.py", False),  # another method's file
                        ("cl_plugins/experiment/build.py", True),  # seeds, optimizer: runner
                        ("cl_plugins/experiment/plan.py", True),  # builds the plugins: runner
                        ("cl_plugins/core/seeding.py", True),  # imported by build.py
                        ("cl_plugins/core/buffer.py", False),  # core, but ewc never imports it
                        ("cl_plugins/core/distill.py", False),
                        ("cl_plugins/experiment/cli.py", False)]:  # not the computation
        then = {**now, path: "0" * 12}
        why = check.reasons(_provenanced("ewc", ewc, then), None)
        assert (why == [path.replace("cl_plugins/", "") + " changed"]) == stale, (path, why)
    er_plus = {"name": "naive", "params": {}, "plus": [{"name": "er", "params": {}}]}
    then = {**now, "cl_plugins/replay/er.py": "0" * 12}
    assert check.reasons(_provenanced("naive+er", er_plus, then), None) == ["replay/er.py changed"]
    ref = {"name": "avalanche_ewc", "params": {}, "plus": []}  # its defaults: avalanche_refs.py
    for path, why in [("cl_plugins/baselines/avalanche_refs.py", ["baselines/avalanche_refs.py changed"]),
                      ("cl_plugins/registry.py", [])]:  # adding a method of ours: not stale
        assert check.reasons(_provenanced("avalanche_ewc", ref, {**now, path: "0" * 12}),
                             None) == why
    rgo = {"name": "rgo", "params": {}, "plus": []}
    fel_row = {**_provenanced("rgo", rgo, {**now, "cl_plugins/models/fel.py": "0" * 12}),
               "config": {"model": {"name": "fel_mlp"}}}
    assert check.reasons(fel_row, None) == ["models/fel.py changed"]  # fel_mlp imports fel
    new_core = {**now, "cl_plugins/core/brand_new.py": "0" * 12}  # a file no row imports yet
    assert check.reasons(_provenanced("ewc", ewc, {k: v for k, v in now.items()}), None) == []
    assert check.reasons(_provenanced("ewc", ewc, new_core), None) == []
    then = {**now, "cl_plugins/core/buffer.py": "0" * 12}  # er imports it: an ER row is stale
    assert check.reasons(_provenanced("naive+er", er_plus, then), None) == ["core/buffer.py changed"]
    gone = {k: v for k, v in now.items() if k != "cl_plugins/core/checks.py"}
    assert check.reasons(_provenanced("ewc", ewc, gone), None) == ["core/checks.py changed"]
    assert check.reasons(_provenanced("ewc", ewc, now, settings="12345678"), "87654321") == [
        "settings changed"]


def test_expected_settings_follow_the_config_and_the_variant():
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    from provenance_check import expected_settings

    rp = _load()
    proto = rp.PROTOCOLS["S2"]
    domain = expected_settings(REPO / rp.config_for(proto, "domain"), proto["variants"]["domain"])
    task = expected_settings(REPO / rp.config_for(proto, "task"), proto["variants"]["task"])
    assert set(domain) >= {"ewc", "naive", "si"}
    assert domain["ewc"] != task["ewc"] and len(domain["ewc"]) == 8
    again = expected_settings(REPO / rp.config_for(proto, "domain"), proto["variants"]["domain"])
    assert again == domain


def test_only_the_stale_seeds_of_a_stale_row_are_rerun(tmp_path, monkeypatch):
    """A row with one seed rerun under today's code and one not: the row is stale, and
    rerun_stale's jobs hold only the stale seed (a current seed is not run again)."""
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    from provenance_check import Staleness

    rp = _load()
    monkeypatch.setattr(rp, "RESULTS_DIR", tmp_path)
    now = dict(Staleness(REPO).current_files())
    entry = {"name": "naive", "params": {}, "plus": []}
    for seed, files in [(0, now), (1, {**now, "cl_plugins/experiment/runner.py": "0" * 12})]:
        path = tmp_path / "S1" / "task" / "hsu2018_split_mnist" / "naive-sgd" / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**_provenanced("naive-sgd", entry, files), "seed": seed}))
    (row,) = rp.collect()
    assert row["stale"].startswith("**stale**") and row["seeds"] == "0,1"
    assert row["stale_seeds"] == "1"



def test_a_diverged_seed_stays_in_its_row_and_is_rerun_when_stale(tmp_path, monkeypatch):
    """A seed whose run diverged is shown in its row (not averaged), and when its code is stale
    it is among the seeds rerun_stale.py runs again (it used to be dropped from the row, so never
    rerun and never reported)."""
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    import rerun_stale
    from provenance_check import Staleness

    rp = _load()
    monkeypatch.setattr(rp, "RESULTS_DIR", tmp_path)
    now = dict(Staleness(REPO).current_files())
    old = {**now, "cl_plugins/experiment/runner.py": "0" * 12}
    entry = {"name": "naive", "params": {}, "plus": []}
    folder = tmp_path / "S1" / "task" / "hsu2018_split_mnist" / "naive-sgd"
    folder.mkdir(parents=True)
    for seed, files, status, acc in [(0, now, "finished", 0.9), (1, old, "diverged", None),
                                     (2, now, "finished", 0.8)]:
        r = {**_provenanced("naive-sgd", entry, files), "seed": seed, "status": status}
        r["summary"] = {"acc": acc, "bwt": 0.0} if acc is not None else None
        (folder / f"seed{seed}.json").write_text(json.dumps(r))
    (row,) = rp.collect()
    assert row["acc"] == "85.00 ± 7.07" and row["n"] == 2 and row["diverged"] == 1
    assert row["seeds"] == "0,2 (1 diverged)" and row["stale_seeds"] == "1"
    assert row["stale"].startswith("**stale**")
    monkeypatch.setitem(sys.modules, "reproduce", rp)
    (job,) = rerun_stale.stale_jobs()
    assert job["stale_seeds"] == "1"
    # asked again just before the row's process starts: seed 1 still stale; once rerun
    # elsewhere, none (the job is left out)
    assert rerun_stale.still_stale("S1", "task", "naive-sgd") == ["1"]
    rerun = json.loads((folder / "seed1.json").read_text())
    (folder / "seed1.json").write_text(json.dumps({**rerun, "provenance": {
        **rerun["provenance"], "files": now}}))
    assert rerun_stale.still_stale("S1", "task", "naive-sgd") == []
    (folder / "seed1.json").write_text(json.dumps(rerun))
    first = row
    # every seed diverged: the row says so instead of a number
    for seed in (0, 2):
        (folder / f"seed{seed}.json").unlink()
    (row,) = rp.collect()
    assert row["acc"] == "diverged" and row["seeds"] == "(1 diverged)"
    assert row["ok"].startswith("**no**")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    monkeypatch.setattr(rp, "REPO", tmp_path)
    rp.update_readme([first])
    assert "| 85.00 ± 7.07 | 97.98 ± 0.09 | 2 + 1 diverged | stale |" in readme.read_text()


# ------------------------------------------------------------------------------------------- D1
def _d1_entries(rp):
    from cl_plugins.experiment.config import load_config, normalize_methods
    from cl_plugins.experiment.runner import method_label

    cfg = load_config(REPO / rp.config_for(rp.PROTOCOLS["D1"], "class"))
    return cfg, {method_label(e): e for e in normalize_methods(cfg["methods"])}


def test_d1_config_is_mammoths_seq_mnist_with_one_unmasked_head():
    """Mammoth's seq-mnist: label-ordered pairs, ToTensor only, MLP 784-100-100 with ONE 10-way
    head trained unmasked, plain SGD, batch 10, one epoch; class-IL run (its task-IL view is read
    from the same runs)."""
    rp = _load()
    cfg, entries = _d1_entries(rp)
    b = cfg["benchmark"]
    assert (b["name"], b["scenario"], b["n_experiences"], b["class_order"]) == \
        ("split_mnist", "class", 5, "fixed")
    assert b["normalize"] is False and b["pad_to_32"] is False
    assert b["samples_per_task"] is None and b["test_samples_per_task"] is None
    assert cfg["model"] == {"name": "mlp", "hidden": [100, 100], "head": "masked", "mask": "none"}
    assert cfg["optimizer"]["name"] == "sgd"
    assert cfg["optimizer"]["momentum"] == 0.0 and cfg["optimizer"]["weight_decay"] == 0.0
    assert (cfg["strategy"]["train_mb_size"], cfg["strategy"]["epochs"]) == (10, 1)
    # only the methods whose Mammoth loss spans the seen classes get the "seen" mask
    masked = {lb for lb, e in entries.items() if (e.get("model") or {}).get("mask")}
    assert masked == {"lwf", "avalanche_lwf", "icarl-200", "icarl-500", "avalanche_icarl-200",
                      "avalanche_icarl-500"}
    assert len(cfg["seeds"]) >= 5
    d1 = rp.PROTOCOLS["D1"]
    assert list(d1["variants"]) == ["class"] and d1["task_view"] == {"class": "task"}


def _memory_sizes(entry):
    out = []
    for part in [entry, *entry["plus"]]:
        p = part.get("params", {})
        out += [p[k] for k in ("mem_size", "memory_size") if k in p]
    return out


def test_d1_memory_sizes_and_published_rows_match_the_config():
    """small = 200 and medium = 500 (ANCHORS D1): every '-200' / '-500' entry keeps exactly
    that many samples, the no-memory rows keep none, and every published number (both views)
    has an entry of the config to compare with."""
    rp = _load()
    _, entries = _d1_entries(rp)
    for label, entry in entries.items():
        suffix = label.rsplit("-", 1)[-1]
        sizes = _memory_sizes(entry)
        if suffix in ("200", "500"):
            assert sizes and set(sizes) == {int(suffix)}, (label, sizes)
        else:
            assert not sizes, (label, sizes)
    pub = rp.PROTOCOLS["D1"]["published"]
    assert set(pub) == {"task", "class"} and set(pub["task"]) == set(pub["class"])
    assert set(pub["class"]) <= set(entries)
    # ANCHORS D1, "Task-IL / Class-IL": a swap of the two views would fail here
    assert pub["task"]["der-200"] == (98.80, None) and pub["class"]["der-200"] == (84.55, None)
    assert pub["class"]["der+sd-500"] == (91.47, None) and pub["task"]["sgd"] == (87.15, None)
    assert pub["class"]["avalanche_icarl-500"] == pub["class"]["icarl-500"] == (74.55, None)


def test_d1_task_il_rows_come_from_the_class_il_runs(tmp_path, monkeypatch):
    rp = _load()
    monkeypatch.setattr(rp, "RESULTS_DIR", tmp_path)
    for seed, (cls, task) in enumerate([(0.80, 0.975), (0.82, 0.985)]):
        path = tmp_path / "D1" / "class" / "roy2023_sd_seq_mnist" / "er-200" / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "status": "finished", "method": "er-200", "seed": seed,
            "started": "2026-12-05T10:00:00", "summary": {"acc": cls, "bwt": -0.1},
            "summary_task_view": {"acc": task, "bwt": -0.01}}))
    rows = rp.collect()
    assert [(r["variant"], r["method"]) for r in rows] == [("class", "er-200"), ("task", "er-200")]
    cls_row, task_row = rows
    assert cls_row["acc"] == "81.00 ± 1.41" and cls_row["published"] == "80.43"
    assert cls_row["ok"] == "yes" and cls_row["scenario"] == "class-IL"
    assert task_row["acc"] == "98.00 ± 0.71" and task_row["published"] == "97.86"
    assert task_row["ok"] == "yes" and task_row["bwt"] == "-1.00 ± 0.00"
    assert task_row["scenario"].startswith("task-IL (same runs")
    assert "`python experiments/reproduce.py D1 --variant class`" == task_row["command"]


def test_a_stale_task_view_row_reruns_its_class_il_runs_once(tmp_path, monkeypatch):
    """D1's task-IL rows are views of the class-IL runs: rerun_stale turns both stale rows of a
    method into one job list on the run variant ('class'), with the union of their seeds."""
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    import rerun_stale
    rp = _load()
    rows = [{"protocol": "D1", "variant": "class", "method": "er-200", "stale": "**stale**: x",
             "stale_seeds": "0,1"},
            {"protocol": "D1", "variant": "task", "method": "er-200", "stale": "**stale**: x",
             "stale_seeds": "1,2"},
            {"protocol": "D1", "variant": "task", "method": "sgd", "stale": "**stale**: x",
             "stale_seeds": "3"},
            {"protocol": "D1", "variant": "class", "method": "joint", "stale": "current",
             "stale_seeds": ""}]
    monkeypatch.setattr(rp, "collect", lambda protocols=None: [dict(r) for r in rows])
    monkeypatch.setitem(sys.modules, "reproduce", rp)
    jobs = rerun_stale.stale_jobs(["D1"])
    assert [(r["variant"], r["method"], r["stale_seeds"]) for r in jobs] == \
        [("class", "er-200", "0,1,2"), ("class", "sgd", "3")]
    from parallel import job_command
    for r in jobs:  # every job is a command of a variant the protocol runs
        job_command(r["protocol"], r["variant"], r["method"], 0)


def test_collect_copies_only_finished_clean_current_reruns(tmp_path):
    """--collect: of a worktree's results, a finished clean current rerun replaces the older
    file; running, dirty and stale ones are left where they are."""
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    import rerun_stale
    from provenance_check import Staleness

    now = dict(Staleness(REPO).current_files())
    entry = {"name": "naive", "params": {}, "plus": []}
    tree, mine = tmp_path / "tree", tmp_path / "main" / "results"
    rel = Path("S1") / "task" / "hsu2018_split_mnist" / "naive-sgd" / "fp"
    cases = {0: ("finished", False, now), 1: ("running", False, now),
             2: ("finished", True, now),
             3: ("finished", False, {**now, "cl_plugins/experiment/runner.py": "0" * 12}),
             4: ("diverged", False, now)}
    for seed, (status, dirty, files) in cases.items():
        r = {**_provenanced("naive-sgd", entry, files), "seed": seed, "status": status}
        r["provenance"]["git_dirty"] = dirty
        (tree / "results" / rel).mkdir(parents=True, exist_ok=True)
        (tree / "results" / rel / f"seed{seed}.json").write_text(json.dumps(r))
    (mine / rel).mkdir(parents=True)
    (mine / rel / "seed0.json").write_text("old")
    copied = rerun_stale.collect(tree, mine)
    assert sorted(copied) == [str(rel / "seed0.json"), str(rel / "seed4.json")]
    assert json.loads((mine / rel / "seed0.json").read_text())["seed"] == 0
    assert sorted(p.name for p in (mine / rel).iterdir()) == ["seed0.json", "seed4.json"]
    assert rerun_stale.collect(tree, mine) == []  # nothing new the second time


def test_moved_lists_changed_runs_against_the_same_run_at_the_commit(tmp_path):
    """--moved: a rerun with the same matrix is "identical", one in another settings folder is
    compared with the old folder's run, a changed one shows old -> new ACC, a new one "new"
    (None); unfinished and .rerun files are skipped."""
    import subprocess
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    import rerun_stale

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    def put(rel, matrix, status="finished"):
        f = tmp_path / "results" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"status": status, "matrix": matrix}))

    m = "S1/task/cfg/naive"
    put(f"{m}/aaaaaaaa/seed0.json", [[0.5, 0.1], [0.5, 0.7]])
    put(f"{m}/aaaaaaaa/seed1.json", [[0.9, 0.1], [0.8, 0.6]])
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "old")
    put(f"{m}/aaaaaaaa/seed0.json", [[0.5, 0.1], [0.5, 0.7]], "diverged")  # same matrix
    put(f"{m}/bbbbbbbb/seed1.json", [[0.9, 0.1], [0.9, 0.8]])  # new settings folder
    put(f"{m}/bbbbbbbb/seed2.json", [[1.0, 0.0], [0.5, 0.5]])  # no old run
    put(f"{m}/bbbbbbbb/seed3.json", [[1.0]], status="running")
    put(f"{m}/bbbbbbbb/seed1.rerun.json", [[0.0]])
    got = rerun_stale.moved("HEAD", tmp_path)
    assert got == [(f"results/{m}/aaaaaaaa/seed0.json", "identical", "identical"),
                   (f"results/{m}/bbbbbbbb/seed1.json", 70.0, 85.0),
                   (f"results/{m}/bbbbbbbb/seed2.json", None, 50.0)]
    put(f"{m}/aaaaaaaa/seed0.json", [[0.5, 0.1], [0.4, 0.7]])  # now changed in place
    assert rerun_stale.moved("HEAD", tmp_path)[0] == (f"results/{m}/aaaaaaaa/seed0.json", 60.0,
                                                       55.0)


def test_run_jobs_asks_skip_before_each_job(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    import parallel

    jobs = [(f"P/v/m/seed{i}", [sys.executable, "-c", "print('ran')"]) for i in range(3)]
    asked = []

    def skip(name):
        asked.append(name)
        return "done elsewhere" if name.endswith("seed1") else ""

    assert parallel.run_jobs(jobs, 1, tmp_path, skip=skip) == 0
    assert asked == [f"P/v/m/seed{i}" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P_v_m_seed0.log", "P_v_m_seed2.log"]


def test_run_jobs_builds_a_callable_command_when_the_job_starts(tmp_path):
    """rerun_stale.py's jobs are one process per row, their seeds read just before it starts:
    a command given as a function is called then (after the jobs before it ended), and a string
    it returns is the reason to leave the job out."""
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    import parallel

    mark = tmp_path / "first-ran"
    seen = []

    def second():
        seen.append(mark.exists())
        return [sys.executable, "-c", "print('second')"]

    jobs = [("P/v/first", [sys.executable, "-c", f"open({str(mark)!r}, 'w').close()"]),
            ("P/v/second", second), ("P/v/third", lambda: "current now")]
    assert parallel.run_jobs(jobs, 1, tmp_path / "logs") == 0
    assert seen == [True]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["P_v_first.log",
                                                                      "P_v_second.log"]
    assert (tmp_path / "logs" / "P_v_second.log").read_text().strip() == "second"


def test_checkpoints_written_by_other_code_are_set_aside(tmp_path):
    """A checkpoint whose recorded run has other row files than today's is renamed aside (the
    run starts afresh instead of finishing another code's steps), whatever its run JSON says (a
    failed resume rewrites that with today's provenance); one written by today's code stays."""
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    from provenance_check import Staleness, set_aside_foreign_checkpoints

    from cl_plugins.experiment import checkpoint as ckpt_io

    now = dict(Staleness(REPO).current_files())
    old = {**now, "cl_plugins/experiment/runner.py": "0" * 12}
    entry = {"name": "naive", "params": {}, "plus": []}
    folder = tmp_path / "S1" / "task" / "cfg" / "naive-sgd" / "abc"

    def ckpt(name, files):
        result = {**_provenanced("naive-sgd", entry, files), "status": "running"}
        ckpt_io.save(folder / name, {"format": ckpt_io.FORMAT_VERSION, "result": result})

    ckpt("seed0.ckpt.pt", old)
    ckpt("seed0.ckpt.pt", old)  # the first becomes seed0.ckpt.prev.pt
    ckpt("seed1.ckpt.pt", now)
    (folder / "seed0.json").write_text(json.dumps(  # a failed resume's JSON: today's code
        {**_provenanced("naive-sgd", entry, now), "status": "failed"}))
    (folder / "seed2.ckpt.pt").write_bytes(b"truncated")  # the runner's to handle
    moved = set_aside_foreign_checkpoints(tmp_path, REPO)
    assert moved == [str(folder / "seed0.ckpt.prev.pt"), str(folder / "seed0.ckpt.pt")]
    assert sorted(p.name for p in folder.iterdir() if ".ckpt" in p.name) == [
        "seed0.ckpt.prev.pt.stale-aaaaaaaa", "seed0.ckpt.pt.stale-aaaaaaaa", "seed1.ckpt.pt",
        "seed2.ckpt.pt"]
    assert set_aside_foreign_checkpoints(tmp_path, REPO) == []


def test_a_result_resumed_across_commits_before_the_check_is_stale():
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    from provenance_check import CHECKPOINTS_CHECKED_SINCE, Staleness

    check = Staleness(REPO)
    head = check._git("rev-parse", "HEAD").strip()
    made = check.commit_time(head)
    entry = {"name": "naive", "params": {}, "plus": []}
    r = {**_provenanced("naive-sgd", entry, dict(check.current_files())),
         "provenance": {"git_commit": head, "git_dirty": False, "files": check.current_files()},
         "resumed": [{"after_experiences": 2, "at": "x"}]}
    early = "2020-01-01T00:00:00+0000"  # before HEAD was made and before the check existed
    assert "resumed across commits" in " ".join(check.reasons({**r, "started": early}, None))
    assert check.reasons({**r, "started": early, "resumed": []}, None) == []
    late = made.strftime("%Y-%m-%dT%H:%M:%S%z")  # started at the commit's time: not before it
    assert check.reasons({**r, "started": late}, None) == []
    assert CHECKPOINTS_CHECKED_SINCE.startswith("2026-12-06")


def test_a_resumed_result_is_stale_when_any_part_ran_other_row_files():
    import sys

    sys.path.insert(0, str(REPO / "experiments"))
    from provenance_check import Staleness

    check = Staleness(REPO)
    now = dict(check.current_files())
    entry = {"name": "naive", "params": {}, "plus": []}
    r = {**_provenanced("naive-sgd", entry, now), "started": "2026-12-07T10:00:00+0000"}
    same = {"files": now, "git_commit": "a" * 40}
    assert check.reasons({**r, "resumed": [{"after_experiences": 2, "provenance_before": same}]},
                         None) == []
    older = {"files": {**now, "cl_plugins/experiment/runner.py": "0" * 12}}
    why = check.reasons({**r, "resumed": [{"after_experiences": 1, "provenance_before": same},
                                          {"after_experiences": 3, "provenance_before": older}]},
                        None)
    assert why == ["experiment/runner.py changed (a part before a resume)"]
    unrelated = {"files": {**now, "cl_plugins/projection/gpm.py": "0" * 12}}  # not a naive row's
    assert check.reasons({**r, "resumed": [{"after_experiences": 2,
                                            "provenance_before": unrelated}]}, None) == []


def test_the_campaign_names_every_protocol_and_only_known_ones():
    """experiments/campaign.sh runs every protocol (a new one must be added to a lane) and every
    protocol it names exists, each variant it fills too, and each entry it names with --only
    is one the variant runs."""
    import re

    rp = _load()
    text = (REPO / "experiments" / "campaign.sh").read_text()
    named, loop = set(), ""
    for line in text.splitlines():
        line = line.split("#")[0]
        head = re.match(r"\s*for v in ([\w ]+); do\s*$", line)  # a loop over lines below
        loop = head.group(1) if head else ("" if re.match(r"\s*done", line) else loop)
        m = re.search(r"--protocols ([\w,-]+)", line)
        if m:
            named |= set(m.group(1).split(","))
        m = re.match(r"\s*(?:for v in ([\w ]+); do )?fill ([\w-]+)(?: --variant (\w+|\"\$v\"))?",
                     line)
        if m:
            named.add(m.group(2))
            variants = (m.group(1) or loop).split() if m.group(3) == '"$v"' else [m.group(3)]
            for v in filter(None, variants):
                assert v in rp.PROTOCOLS[m.group(2)]["variants"], (m.group(2), v)
                only = re.search(r"--only=([\w,+-]+)", line)
                if only:  # each name an entry the variant runs (cl-run would refuse the row)
                    runs = rp.labels_for(rp.PROTOCOLS[m.group(2)], v)
                    unknown = set(only.group(1).split(",")) - set(runs)
                    assert not unknown, (m.group(2), v, unknown)
    assert named <= set(rp.PROTOCOLS), named - set(rp.PROTOCOLS)
    assert set(rp.PROTOCOLS) <= named, set(rp.PROTOCOLS) - named
