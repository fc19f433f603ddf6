#!/usr/bin/env python
"""Run a reproduction protocol as many independent cl-run processes at once (one per variant,
method and seed), for machines with many cores and/or a GPU. Results land exactly where
reproduce.py puts them; rebuild the tables afterwards with ``reproduce.py --table``.

    python experiments/parallel.py P2 --variants task,domain --seeds 0 --jobs 16 --data-root PATH

Other arguments go to every cl-run. Running the same command again after a stop resumes each
interrupted run from its last checkpoint; add ``--skip-finished`` to read back the runs that
already finished with the same settings instead of running them again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))


def main(argv=None) -> int:
    from reproduce import PROTOCOLS, RESULTS_DIR, labels_for

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("protocol", choices=sorted(PROTOCOLS))
    ap.add_argument("--variants", help="comma-separated (default: all)")
    ap.add_argument("--seeds", help="comma-separated (default: the protocol's)")
    ap.add_argument("--only", help="comma-separated method labels (default: all in the config)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=float, default=None, help="seconds per process")
    ap.add_argument("--data-root", default=os.environ.get("CL_DATA_ROOT"))
    args, extra = ap.parse_known_args(argv)
    proto = PROTOCOLS[args.protocol]
    variants = args.variants.split(",") if args.variants else list(proto["variants"])
    seeds = args.seeds.split(",") if args.seeds else [str(s) for s in proto["seeds"]]
    jobs = []
    for v in variants:
        labels = labels_for(proto, v)
        if args.only:
            labels = [lb for lb in labels if lb in args.only.split(",")]
        for lb in labels:
            for s in seeds:
                jobs.append((f"{v}/{lb}/seed{s}",
                             job_command(args.protocol, v, lb, s, args.data_root, extra)))
    return run_jobs(jobs, args.jobs, RESULTS_DIR / args.protocol / "logs", args.timeout)


def job_command(protocol, variant, label, seed, data_root=None, extra=()):
    """The cl-run command of one (variant, method label, seed) of a protocol."""
    from reproduce import PROTOCOLS, RESULTS_DIR, config_for

    proto = PROTOCOLS[protocol]
    cmd = [sys.executable, "-m", "cl_plugins.experiment.cli",
           "--config", str(REPO / config_for(proto, variant)), *proto["variants"][variant],
           f"--only={label}", f"--seeds={seed}", "--no-progress", "--no-plots",
           f"--output_dir={RESULTS_DIR / protocol / variant}", *extra]
    if data_root:
        cmd.append(f"--benchmark.data_root={data_root}")
    return cmd


def run_jobs(jobs, n_jobs, logs, timeout=None, skip=None) -> int:
    """Run ``[(name, command)]`` as processes, ``n_jobs`` at a time, one thread each; a log per
    job under ``logs``. ``skip(name)``, when given, is asked just before a job starts: a
    non-empty answer (the reason) leaves the job out. A command may also be a function, called
    just before the job starts: it returns the command, or a string (the reason to leave the
    job out). Returns 1 if any failed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    logs.mkdir(parents=True, exist_ok=True)
    running, failed, t0 = [], [], time.time()
    while jobs or running:
        while jobs and len(running) < n_jobs:
            name, cmd = jobs.pop(0)
            why = skip(name) if skip is not None else None
            if not why and callable(cmd):
                cmd = cmd()
                why = cmd if isinstance(cmd, str) else None
            if why:
                print(f"[{time.time() - t0:6.0f} s] {name}: skipped ({why})", flush=True)
                continue
            log = open(logs / f"{name.replace('/', '_')}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                   env=env), time.time()))
        time.sleep(1)
        for item in list(running):
            name, proc, started = item
            if timeout and proc.poll() is None and time.time() - started > timeout:
                proc.kill()
            if proc.poll() is not None:
                running.remove(item)
                status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                if proc.returncode:
                    failed.append(name)
                print(f"[{time.time() - t0:6.0f} s] {name}: {status}", flush=True)
    print(f"done: {len(failed)} failed {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
