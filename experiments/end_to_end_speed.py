#!/usr/bin/env python
"""Whole-process wall time of ``cl-run`` against a plain PyTorch loop of the same protocol.

    python experiments/end_to_end_speed.py s1 --data-root PATH [--reps 3] [--threads 1]
    python experiments/end_to_end_speed.py p1 --data-root PATH --reps 3

Each repetition runs the two commands one after the other, alternating which goes first, as
separate processes (so imports, data loading, training, evaluation and result writing all
count); the table gives the median of each and the ratio of the medians. The raw loop is
``experiments/raw_loop.py``; the cl-run command is the protocol's config restricted to naive:

- ``s1``: ``cl-run --config experiments/configs/hsu2018_split_mnist.yaml
  --benchmark.scenario=domain --only=naive-adam --seeds=[0] --no-checkpoint``;
- ``p1``: ``cl-run --config experiments/configs/saha2021_gpm_permuted_mnist.yaml --only=naive
  --seeds=[0] --no-checkpoint --benchmark.samples_per_task=6000 --strategy.epochs=1`` (P1's
  model, optimizer and batch 10 on a tenth of its data, one epoch: 6,000 steps).

``--threads N`` sets ``OMP_NUM_THREADS=N`` for both; ``--threads none`` leaves the variable unset
(each picks its own). Proof that both do the same work: the final accuracies of the two runs are
printed side by side (the runs differ in their random streams, so they agree within seed noise,
not exactly). ``--json PATH`` keeps every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROTOCOLS = {
    "s1": {"config": "experiments/configs/hsu2018_split_mnist.yaml",
           "args": ["--benchmark.scenario=domain", "--only=naive-adam"], "raw": []},
    "p1": {"config": "experiments/configs/saha2021_gpm_permuted_mnist.yaml",
           "args": ["--only=naive", "--benchmark.samples_per_task=6000", "--strategy.epochs=1"],
           "raw": ["--samples-per-task", "6000", "--epochs", "1"]},
}


def _timed(cmd, env):
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("protocol", choices=sorted(PROTOCOLS))
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1", help="OMP_NUM_THREADS for both, or 'none'")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.reps < 1:
        ap.error("--reps must be >= 1")
    if a.threads != "none" and not a.threads.isdigit():
        ap.error("--threads must be a whole number or 'none'")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if a.threads != "none":
        env["OMP_NUM_THREADS"] = a.threads
    proto = PROTOCOLS[a.protocol]
    cl_run = str(Path(sys.executable).with_name("cl-run"))
    walls = {"cl-run": [], "raw": []}
    accs = {"cl-run": [], "raw": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            out, raw_json = Path(tmp) / f"runs{rep}", Path(tmp) / f"raw{rep}.json"
            ours = [cl_run, f"--config={proto['config']}", *proto["args"], "--seeds=[0]",
                    "--no-checkpoint", f"--data-root={a.data_root}", f"--out={out}"]
            raw = [sys.executable, "experiments/raw_loop.py", a.protocol,
                   f"--data-root={a.data_root}", f"--json={raw_json}", *proto["raw"]]
            order = [("cl-run", ours), ("raw", raw)]
            for name, cmd in (order if rep % 2 == 0 else order[::-1]):
                walls[name].append(_timed(cmd, env))
            (res,) = out.glob("*/*/*/seed0.json")
            accs["cl-run"].append(100 * json.loads(res.read_text())["summary"]["acc"])
            accs["raw"].append(json.loads(raw_json.read_text())["acc"])
            print(f"rep {rep}: cl-run {walls['cl-run'][-1]:.1f} s (ACC {accs['cl-run'][-1]:.2f}),"
                  f" raw {walls['raw'][-1]:.1f} s (ACC {accs['raw'][-1]:.2f})", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, OMP_NUM_THREADS={a.threads}")
    print(f"\n| protocol | cl-run median (s) | raw loop median (s) | ratio | reps | machine |\n"
          f"|---|---|---|---|---|---|\n| {a.protocol} | {med['cl-run']:.1f} | {med['raw']:.1f} | "
          f"{med['cl-run'] / med['raw']:.2f}x | {a.reps} | {machine} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"protocol": a.protocol, "walls": walls, "acc": accs,
                                            "median": med, "machine": machine}, indent=1))


if __name__ == "__main__":
    main()
