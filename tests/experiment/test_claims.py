"""Exactly-once runs across processes sharing output_dir (claims.py), and pre-emption.

The sweep test starts several ``cl-run`` processes at once, each with one sweep point's command
line as ``wandb agent`` would run it (offline: no wandb server is reachable here), with every
point given to two agents: each (method, seed) must train in exactly one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from avalanche.training import Naive

from cl_plugins.experiment.claims import RunClaim, claim_path
from cl_plugins.experiment.cli import main

from helpers import REPO
from wandb_offline import iter_records

FAST = ["--strategy.epochs=1", "--no-plots", "--no-progress"]


def _holder(path: Path, **fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "token": "t0", "started": "then", **fields}))


def test_a_claim_is_exclusive_and_released(tmp_path):
    js = tmp_path / "run" / "seed0.json"
    a, b = RunClaim(js), RunClaim(js)
    assert a.acquire() is None and claim_path(js).exists()
    held = b.acquire()
    assert held is not None and str(os.getpid()) in held
    a.release()
    assert not claim_path(js).exists()
    assert b.acquire() is None
    b.release()


def test_a_dead_holder_on_this_host_is_taken_over_and_kept_aside(tmp_path):
    js = tmp_path / "seed0.json"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _holder(claim_path(js), pid=gone.pid, token="dead")
    c = RunClaim(js)
    assert c.acquire() is None
    assert json.loads(claim_path(js).read_text())["token"] == c.token
    assert (tmp_path / "seed0.claim.stale-dead").exists()  # the record of the taken-over claim
    c.release()


def test_another_hosts_claim_is_stale_only_after_claim_stale_s(tmp_path):
    js = tmp_path / "seed0.json"
    _holder(claim_path(js), host="elsewhere.example", pid=1, token="far")
    c = RunClaim(js, stale_after_s=300)
    assert "elsewhere.example" in c.acquire()  # touched just now: alive
    old = time.time() - 301
    os.utime(claim_path(js), (old, old))
    assert c.acquire() is None  # untouched for longer than 300 s: taken over
    c.release()


def test_the_heartbeat_keeps_the_claim_fresh_and_release_spares_a_foreign_claim(tmp_path):
    js = tmp_path / "seed0.json"
    c = RunClaim(js, stale_after_s=1.0, heartbeat_s=0.05)
    assert c.acquire() is None
    old = time.time() - 100
    os.utime(claim_path(js), (old, old))
    time.sleep(0.3)
    assert time.time() - claim_path(js).stat().st_mtime < 1.0
    _holder(claim_path(js), token="someone-else")  # replaced behind its back
    c.release()
    assert claim_path(js).exists()  # not ours: left alone


def test_bad_claim_stale_s_is_refused_before_any_work(tmp_path, capsys):
    assert main([f"--out={tmp_path}", "--methods=naive", "--loggers.claim_stale_s=5", *FAST]) == 2
    assert "loggers.claim_stale_s" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_run_claimed_elsewhere_is_skipped_without_failing(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main([f"--out={out}", "--methods=naive", *FAST]) == 0
    (js,) = (out / "default" / "naive").glob("*/seed0.json")
    js.unlink()
    _holder(claim_path(js), host="elsewhere.example", pid=1, token="far")
    assert main([f"--out={out}", "--methods=naive", *FAST]) == 0
    assert "runs elsewhere" in capsys.readouterr().out and not js.exists()


def test_sigterm_preempts_marks_wandb_preempting_and_the_rerun_resumes(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    calls, original = {"n": 0}, Naive.train

    def train(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Naive, "train", train)
    out = tmp_path / "runs"
    args = [f"--out={out}", "--methods=naive", "--wandb", *FAST]
    assert main(args) == 128 + signal.SIGTERM
    assert "pre-empted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    (js,) = (out / "default" / "naive").glob("*/seed0.json")
    r = json.loads(js.read_text())
    assert r["status"] == "preempted" and len(r["matrix"]) == 2
    assert js.with_name("seed0.ckpt.pt").exists() and not claim_path(js).exists()
    from wandb.proto import wandb_internal_pb2 as pb

    kinds = set()
    for f in (out / "wandb").glob("offline-run-*/run-*.wandb"):
        for raw in iter_records(f):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kinds.add(rec.WhichOneof("record_type"))
    assert "preempting" in kinds
    monkeypatch.setattr(Naive, "train", original)
    assert main(args) == 0
    r = json.loads(js.read_text())
    assert r["status"] == "finished" and r["resumed"][0]["after_experiences"] == 2


# Two agents on one point in the default suite; four agents on two points (64 s on the loaded
# 2-core machine, 4 process starts) with -m slow.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("agent_seeds",
                         [(0, 0), pytest.param((0, 1, 0, 1), marks=pytest.mark.slow)],
                         ids=["2-agents-1-point", "4-agents-2-points"])
def test_agents_sharing_output_dir_run_each_point_exactly_once(tmp_path, agent_seeds):
    """Agents sharing one output_dir, each sweep point (a naive seed) given to two of them."""
    cl_run = str(Path(sys.executable).with_name("cl-run"))
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path),
               WANDB_SWEEP_ID="testsweep", OMP_NUM_THREADS="1")
    procs = []
    for i, seed in enumerate(agent_seeds):
        cmd = [cl_run, "--config=experiments/configs/digits_naive_sweep.yaml", f"--seeds={seed}",
               f"--output_dir={tmp_path / 'runs'}", "--strategy.epochs=3", "--no-plots"]
        procs.append((seed, subprocess.Popen(cmd, cwd=REPO, env=dict(env, WANDB_RUN_ID=f"r{i}"),
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True)))
    trained = dict.fromkeys(agent_seeds, 0)
    for seed, p in procs:
        out, _ = p.communicate(timeout=550)
        assert p.returncode == 0, out[-3000:]
        skipped = any(s in out for s in ("running elsewhere, skipped", "a sweep point already run",
                                         "finished elsewhere meanwhile"))
        trained[seed] += not skipped
    assert trained == dict.fromkeys(agent_seeds, 1)
    base = tmp_path / "runs" / "digits_naive_sweep" / "naive"
    for seed in set(agent_seeds):
        (js,) = base.glob(f"*/seed{seed}.json")
        assert json.loads(js.read_text())["status"] == "finished"
        assert not claim_path(js).exists()
