#!/usr/bin/env python
"""Rerun every stale row of RESULTS.md (or list them), with the seeds each row holds.

    python experiments/rerun_stale.py --list                     # stale rows, their seeds
    python experiments/rerun_stale.py --jobs 2 --data-root PATH  # rerun them all
    python experiments/rerun_stale.py --protocols S2,G1 --jobs 2 --data-root PATH
    python experiments/rerun_stale.py --list --skip 'nscl*,*lwf*'  # leave some methods out

A row is stale when a file it depends on changed since its results were computed, or its
config now asks for other settings (``provenance_check.py``). Each stale row becomes one cl-run
process over the seeds whose own result is stale (``--seeds=a,b,...``; the seeds are read again
just before the process starts: a seed rerun meanwhile with today's code is not run again; a
diverged seed belongs to its row and is rerun when stale, like a finished one). One process per
row, not per seed: starting one (imports, registry) and reading the results cost about 20 s on
the 2-core machine, as much as a D1 run's training. Rows are
taken in the protocols' table order, cheapest protocol first unless ``--protocols`` orders them.
The rerun results land beside the old ones, in their settings folder; ``reproduce.py --table``
then shows the current ones. Running the command again after a stop resumes each interrupted
run from its checkpoint and skips what has become current.

Reruns are best run in a separate worktree at a fixed commit (the checkout you edit would make
them dirty); ``--collect WORKTREE`` then copies into this checkout each result JSON of WORKTREE
that has finished (or diverged), was made from a clean tree, and is current against this
checkout's code (``provenance_check``), replacing an older file of the same run:

    git worktree add ../rerun HEAD   # then, there: python experiments/rerun_stale.py --jobs 2
    python experiments/rerun_stale.py --collect ../rerun && python experiments/reproduce.py --table

``--moved COMMIT`` lists the runs whose result JSON was added or changed since COMMIT (committed
or not), each against the result of the same protocol, variant, config, method and seed that
COMMIT held (same path, or another settings folder of that method): "identical" (the same
accuracy matrix), "old -> new" final ACC, or "new" (none before):

    python experiments/rerun_stale.py --moved bbba07d
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def stale_jobs(protocols=None, variants=None, methods=None, skip=None):
    """Stale rows, in the order of ``protocols``, ``variants`` and ``methods`` when given,
    without the method labels that match one of the ``skip`` patterns (fnmatch)."""
    from reproduce import PROTOCOLS, collect

    rows, seen = [], set()
    for r in collect(protocols):
        if r["stale"] == "current" or any(fnmatch.fnmatchcase(r["method"], pat)
                                          for pat in skip or ()):
            continue
        # a task-view row (D1's task-IL) is read from its class-IL runs: rerun those, once
        views = {v: run for run, v in PROTOCOLS[r["protocol"]].get("task_view", {}).items()}
        r = {**r, "variant": views.get(r["variant"], r["variant"])}
        key = (r["protocol"], r["variant"], r["method"])
        if key in seen:
            seen_row = next(x for x in rows if (x["protocol"], x["variant"], x["method"]) == key)
            merged = set(seen_row["stale_seeds"].split(",")) | set(r["stale_seeds"].split(","))
            seen_row["stale_seeds"] = ",".join(sorted(merged, key=int))
            continue
        seen.add(key)
        rows.append(r)
    keys = [(protocols or list(PROTOCOLS), "protocol"), (variants, "variant"),
            (methods, "method")]
    for order, key in keys:
        if order:
            rows = [r for r in rows if r[key] in order]
    rows.sort(key=lambda r: tuple(order.index(r[key]) if order else 0 for order, key in keys))
    return rows


def collect(worktree: Path, results_dir: Path) -> list:
    """Copy the current, clean, finished rerun JSONs of ``worktree``'s results into
    ``results_dir`` (same relative paths); returns the copied paths (relative)."""
    from provenance_check import Staleness

    repo = Path(__file__).resolve().parent.parent  # this checkout's code decides "current"
    check, src, copied = Staleness(repo), Path(worktree) / "results", []
    for f in sorted(src.rglob("seed*.json")):
        if f.name.endswith(".rerun.json"):
            continue
        r = json.loads(f.read_text())
        prov = r.get("provenance") or {}
        if r.get("status") not in ("finished", "diverged") or prov.get("git_dirty") is not False:
            continue
        if check.reasons(r, None):  # stale here (settings are checked by --table)
            continue
        dest = results_dir / f.relative_to(src)
        if dest.exists() and dest.read_bytes() == f.read_bytes():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
        copied.append(str(f.relative_to(src)))
    return copied


def moved(since: str, repo: Path) -> list:
    """``(path, old, new)`` per result JSON under ``repo/results`` added or changed since the
    commit ``since``: ``old`` the final ACC (%) of the same run at ``since`` (None: no such run),
    ``new`` today's; both the string "identical" when the matrices are equal."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True).stdout

    def acc(r):
        row = (r.get("matrix") or [[]])[-1]
        return round(100 * sum(row) / len(row), 2) if row else None

    changed = git("diff", "--name-only", "--diff-filter=AM", since, "--", "results").split()
    changed += git("ls-files", "--others", "--exclude-standard", "--", "results").split()
    out = []
    for path in sorted(set(changed)):
        p = Path(path)
        if not (p.name.startswith("seed") and p.suffix == ".json") or ".rerun." in p.name:
            continue
        new = json.loads((repo / p).read_text())
        if new.get("status") not in ("finished", "diverged"):
            continue
        settings = re.fullmatch(r"[0-9a-f]{8}", p.parent.name)  # a settings-fingerprint folder
        method = p.parent.parent if settings else p.parent
        before = [q for q in git("ls-tree", "-r", "--name-only", since, "--",
                                 f"{method}/").split() if Path(q).name == p.name]
        old = json.loads(git("show", f"{since}:{sorted(before, key=lambda q: q != path)[0]}")) \
            if before else None
        if old is not None and old.get("matrix") == new.get("matrix"):
            out.append((path, "identical", "identical"))
        else:
            out.append((path, None if old is None else acc(old), acc(new)))
    return out


def main(argv=None) -> int:
    from parallel import job_command, run_jobs
    from reproduce import RESULTS_DIR

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="only list the stale rows")
    ap.add_argument("--protocols", help="comma-separated, in the order to run them")
    ap.add_argument("--variants", help="comma-separated variants, in the order to run them")
    ap.add_argument("--methods", help="comma-separated method labels, in the order to run them")
    ap.add_argument("--skip", help="comma-separated method-label patterns to leave out "
                                   "(fnmatch: 'nscl*,*lwf*')")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=float, default=None, help="seconds per process")
    ap.add_argument("--data-root", default=os.environ.get("CL_DATA_ROOT"))
    ap.add_argument("--collect", metavar="WORKTREE",
                    help="instead: copy WORKTREE's finished, clean, current results here")
    ap.add_argument("--moved", metavar="COMMIT",
                    help="instead: list the runs whose result changed since COMMIT")
    args, extra = ap.parse_known_args(argv)
    if args.moved:
        rows = moved(args.moved, RESULTS_DIR.parent)
        for path, old, new in rows:
            print(f"{path}\t{'new' if old is None else old if old == new else f'{old} -> {new}'}")
        print(f"{len(rows)} runs: {sum(o == 'identical' for _, o, _ in rows)} identical, "
              f"{sum(o is None for _, o, _ in rows)} new")
        return 0
    if args.collect:
        copied = collect(Path(args.collect), RESULTS_DIR)
        print("\n".join(copied + [f"{len(copied)} result files copied"]))
        return 0
    split = (lambda v: v.split(",") if v else None)  # noqa: E731
    rows = stale_jobs(split(args.protocols), split(args.variants), split(args.methods),
                      split(args.skip))
    if args.list:
        for r in rows:
            print(f"{r['protocol']}\t{r['variant']}\t{r['method']}\tseeds {r['stale_seeds']}"
                  f" of {r['seeds']}\t{r['stale']}")
        print(f"{len(rows)} stale rows")
        return 0
    def row_job(r):  # the command, built when the job starts, over the seeds still stale then
        def command():
            seeds = still_stale(r["protocol"], r["variant"], r["method"])
            if not seeds:
                return "current now: rerun meanwhile by another process"
            return job_command(r["protocol"], r["variant"], r["method"], ",".join(seeds),
                               args.data_root, extra)
        return f"{r['protocol']}/{r['variant']}/{r['method']}", command

    jobs = [row_job(r) for r in rows]
    print(f"{sum(len(r['stale_seeds'].split(',')) for r in rows)} runs from {len(rows)} stale "
          "rows (one process per row)", flush=True)
    return run_jobs(jobs, args.jobs, RESULTS_DIR / "logs", args.timeout)


def still_stale(protocol: str, variant: str, method: str) -> list:
    """Asked just before a row's process starts: the row's seeds whose result is stale now (the
    list is made once at the start; another process may have rerun some since). Before that,
    checkpoints of the protocol written by other code for their row are set aside
    (``provenance_check.set_aside_foreign_checkpoints``): a resumed run never mixes code."""
    from provenance_check import set_aside_foreign_checkpoints
    from reproduce import REPO, RESULTS_DIR

    for ckpt in set_aside_foreign_checkpoints(RESULTS_DIR / protocol / variant, REPO):
        print(f"{ckpt}: written by other code for this row; set aside, the run starts afresh",
              flush=True)
    for r in stale_jobs([protocol]):
        if (r["protocol"], r["variant"], r["method"]) == (protocol, variant, method):
            return r["stale_seeds"].split(",")
    return []


if __name__ == "__main__":
    sys.exit(main())
