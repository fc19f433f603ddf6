"""``cl-run``: the main job.

    cl-run                                   # embedded default: split_digits, task-IL, all methods
    cl-run --config experiments/configs/X.yaml [--key=value ...]
    cl-run --list                            # every registered method and its scenarios

Overrides use the ``--section.key=value`` form that a wandb sweep agent passes (values are read
as YAML: numbers, booleans, [lists]). Shortcuts: ``--data-root=PATH`` (benchmark.data_root),
``--out=DIR`` (output_dir), ``--wandb`` (loggers.wandb=true), ``--no-progress``,
``--only=LABEL[,LABEL]`` (only the entries with these labels; a method name that is no
entry's label selects every entry of that method),
``--no-checkpoint`` (no per-experience checkpoint, so no resume), ``--skip-finished`` (read back
a run whose JSON is finished and was computed with the same settings instead of running it),
``--nproc=N`` (N processes on this machine through ``torchrun``, each with batch
``strategy.train_mb_size``: the run equals one process at N times that batch; docs/distributed.md).

A run that stops part-way (crash, pre-emption, Ctrl-C) resumes from its last finished experience
when the same command is run again (``loggers.checkpoint``, on by default). SIGTERM or SIGUSR1
stops it as pre-empted: exit code 128 + the signal, and under a wandb sweep the run is marked
``preempting`` so that the next agent resumes it. Each run is claimed while it trains
(``claims.py``): a second process, here or on a machine sharing ``output_dir``, skips it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

from .claims import Preempted, preemption_signals
from .config import PATH_KEYS, apply_override, load_config, parse_value

USAGE = __doc__

SHORTCUTS = {"data-root": "benchmark.data_root", "data_root": "benchmark.data_root",
             "out": "output_dir", "methods": "methods", "seeds": "seeds"}
FLAGS = {"wandb": ("loggers.wandb", True), "no-progress": ("loggers.progress", False),
         "no-plots": ("loggers.plots", False), "no-checkpoint": ("loggers.checkpoint", False)}


def parse_args(argv: List[str]):
    config_path, overrides, list_only, only, skip_finished = None, [], False, None, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--list":
            list_only = True
        elif arg == "--skip-finished":
            skip_finished = True
        elif arg == "--config" and i + 1 < len(argv):
            config_path = os.path.expanduser(argv[i + 1])
            i += 1
        elif arg.startswith("--config="):
            config_path = os.path.expanduser(arg.split("=", 1)[1])
        elif arg.startswith("--only="):
            only = [x for x in arg.split("=", 1)[1].split(",") if x]
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            key = SHORTCUTS.get(key, key)
            # A path is read as a path: --out=123 and --out=no are folders, not a number and
            # a boolean.
            overrides.append((key, value if key in PATH_KEYS else parse_value(value)))
        elif arg.startswith("--") and arg[2:] in FLAGS:
            overrides.append(FLAGS[arg[2:]])
        else:
            raise ValueError(f"cannot parse argument {arg!r}: use --key=value, --config PATH, "
                             f"--list, or one of --{', --'.join(FLAGS)}")
        i += 1
    return config_path, overrides, list_only, only, skip_finished


def select_methods(cfg, only):
    """Keep the method entries named by ``only``. A token that is some entry's label selects
    that entry alone (``--only=ogd`` does not also run the entry labelled ``ogd-lr0.001``); any
    other token selects every entry of that method name."""
    from .config import normalize_methods
    from .plan import expand_methods, method_label

    entries = normalize_methods(cfg["methods"])
    if any(e["name"] == "all" for e in entries):  # select among the methods 'all' stands for
        from cl_plugins.benchmarks import resolve_scenario

        try:
            entries = expand_methods(entries, resolve_scenario(cfg["benchmark"]["scenario"]))
        except (ValueError, KeyError, TypeError):
            pass  # a bad scenario: the plan reports it
    labels = {method_label(e) for e in entries}
    kept = [e for e in entries
            if method_label(e) in only or any(t == e["name"] and t not in labels for t in only)]
    if not kept:
        raise ValueError(f"--only={','.join(only)} matches no method entry; the config has "
                         f"{[method_label(e) for e in entries]}")
    cfg["methods"] = kept


def list_methods_text() -> str:
    from cl_plugins.registry import list_methods

    return "\n".join(f"{s.name}\t{','.join(s.scenarios)}" for s in list_methods())


def prepare(argv: List[str]):
    """Parse the command line and check the whole config: (plan, skip_finished), or None for
    ``--list``. Raises ConfigError listing every problem found."""
    from .plan import ConfigError, plan_experiment

    config_path, overrides, list_only, only, skip_finished = parse_args(argv)
    if list_only:
        print(list_methods_text())
        return None
    cfg = load_config(config_path)
    problems = []
    for key, value in overrides:
        try:
            apply_override(cfg, key, value)
        except ValueError as err:
            problems.append(str(err))
    if only and not problems:
        select_methods(cfg, only)
    try:
        plan = plan_experiment(cfg)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    if problems:
        raise ConfigError(problems)
    return plan, skip_finished


def pop_nproc(argv: List[str]):
    """(N from ``--nproc=N`` or None, the other arguments)."""
    nproc, rest = None, []
    for arg in argv:
        if arg.startswith("--nproc="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--nproc must be a whole number of processes >= 1; got {value!r}")
            nproc = int(value)
        else:
            rest.append(arg)
    return nproc, rest


def launch(nproc: int, argv: List[str]) -> int:
    """Run this command again under ``torchrun`` with ``nproc`` processes; its exit code."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "cl_plugins.experiment.cli", *argv]
    return subprocess.call(cmd)


def start_process_group(cfg) -> None:
    """Under torchrun: the process group, through Avalanche's DistributedHelper (nccl when the
    strategy's device is CUDA, else gloo)."""
    import torch
    from avalanche.distributed import DistributedHelper

    from cl_plugins.core.distributed import launched_world_size

    if launched_world_size() < 2 or torch.distributed.is_initialized():
        return
    device = str(cfg["strategy"].get("device") or "cpu")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    DistributedHelper.init_distributed(random_seed=0, backend="nccl" if use_cuda else "gloo",
                                       use_cuda=use_cuda)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        nproc, argv = pop_nproc(argv)
        if nproc is not None and nproc > 1:
            if os.environ.get("WORLD_SIZE"):
                raise ValueError("--nproc is for a plain cl-run; this process already runs "
                                 "under torchrun (WORLD_SIZE is set)")
            os.environ["CL_RUN_NPROC"] = str(nproc)  # the plan checks N processes' settings
        prepared = prepare(argv)
        if prepared is None:
            return 0
        if nproc is not None and nproc > 1:  # checked above in this process, then launched
            return launch(nproc, argv)
        plan, skip_finished = prepared
        cfg = plan.cfg
        start_process_group(cfg)
        from .runner import run_experiment
        from . import results as res

        t0 = time.perf_counter()
        with preemption_signals():
            runs = run_experiment(cfg, skip_finished=skip_finished, plan=plan)
    except Preempted as err:
        print(f"\ncl-run: pre-empted ({err}). The checkpoint is kept: the same command, here "
              "or on another machine sharing output_dir, resumes it.", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("\ncl-run: interrupted. Run the same command again to resume: finished runs are "
              "kept and each interrupted run continues from its last finished experience.",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"cl-run: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    from cl_plugins.core.distributed import is_main_process

    if not is_main_process():  # rank 0 alone reports
        return 1 if any(r["status"] != "finished" for r in runs) else 0
    rows = res.summary_rows(runs)
    print(f"\n{cfg['name']}: {cfg['benchmark']['name']}, {cfg['benchmark']['scenario']}-IL, "
          f"seeds {cfg['seeds']}")
    print(res.text_table(rows, cfg["benchmark"]["scenario"] == "class"))
    print(f"\nresults: {cfg['output_dir']}/{cfg['name']}/  (total {elapsed:.1f} s)")
    bad = [r for r in runs if r["status"] not in ("finished", "running_elsewhere")]
    for r in runs:  # another process (or machine) holds it: not a failure of this one
        if r["status"] == "running_elsewhere":
            print(f"cl-run: {r['method']} seed {r['seed']} runs elsewhere: {r['holder']}")
    for r in bad:
        print(f"cl-run: {r['method']} seed {r['seed']} {r['status']}: {r.get('error', '')}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
