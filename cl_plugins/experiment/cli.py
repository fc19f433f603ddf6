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
a run whose JSON is finished and was computed with the same settings instead of running it).

A run that stops part-way (crash, pre-emption, Ctrl-C) resumes from its last finished experience
when the same command is run again (``loggers.checkpoint``, on by default).
"""

from __future__ import annotations

import sys
import time
from typing import List, Optional

from .config import apply_override, load_config, parse_value

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
            config_path = argv[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--only="):
            only = [x for x in arg.split("=", 1)[1].split(",") if x]
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides.append((SHORTCUTS.get(key, key), parse_value(value)))
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
    from .runner import method_label

    entries = normalize_methods(cfg["methods"])
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


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config_path, overrides, list_only, only, skip_finished = parse_args(argv)
        if list_only:
            print(list_methods_text())
            return 0
        cfg = load_config(config_path)
        for key, value in overrides:
            apply_override(cfg, key, value)
        if only:
            select_methods(cfg, only)
        from .runner import run_experiment
        from . import results as res

        t0 = time.perf_counter()
        runs = run_experiment(cfg, skip_finished=skip_finished)
    except (ValueError, FileNotFoundError) as err:
        print(f"cl-run: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    rows = res.summary_rows(runs)
    print(f"\n{cfg['name']}: {cfg['benchmark']['name']}, {cfg['benchmark']['scenario']}-IL, "
          f"seeds {cfg['seeds']}")
    print(res.text_table(rows, cfg["benchmark"]["scenario"] == "class"))
    print(f"\nresults: {cfg['output_dir']}/{cfg['name']}/  (total {elapsed:.1f} s)")
    return 1 if any(r["status"] != "finished" for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
