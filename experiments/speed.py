#!/usr/bin/env python
"""Per-step cost of each method as a ratio to naive, measured in the same process on the same data.

    python experiments/speed.py --config experiments/configs/hsu2018_split_mnist.yaml \
        --methods naive,ewc,si,avalanche_ewc --data-root PATH [--experiences 2]

For each method: train on the first ``--experiences`` experiences (the penalty or projection is
active from the second one on) and time, on the LAST trained experience, every training step from
the first plugin's ``before_training_iteration`` to the last plugin's
``after_training_iteration`` (forward, loss terms, backward, update: data loading excluded), and
the end-of-experience work of the first trained experience (``after_training_exp``: importances,
statistics, SVDs). ``strategy.train_iterations`` and the config's ``method_params`` apply as in the
runner (before 2026-12-05 both were ignored here: the earlier tables' commands that set
``train_iterations`` trained whole epochs). For an architectural method, what it stores for its last trained task
(``cost_per_task()``: masks, embeddings, columns), and the bytes of the tensors in each plugin's
``state_dict()`` after the last trained experience (buffers, generators, teachers, importances).
Prints a markdown table. Each method's ratio uses a naive run measured right
before it (``--no-paired``: the first naive run for all), so slow drifts of the machine's load
cancel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin

REPO = Path(__file__).resolve().parent.parent


class _Clock(SupervisedPlugin):
    """Two instances, first and last in the plugin list, bracket each hook's work."""

    def __init__(self, role, record):
        super().__init__()
        self.role, self.record = role, record

    def before_training_iteration(self, strategy, **kw):
        if self.role == "first":
            self.record["t_step"] = time.perf_counter()

    def after_training_iteration(self, strategy, **kw):
        if self.role == "last":
            exp = strategy.experience.current_experience
            self.record.setdefault("steps", {}).setdefault(exp, []).append(
                time.perf_counter() - self.record["t_step"])

    def after_training_exp(self, strategy, **kw):
        exp = strategy.experience.current_experience
        if self.role == "first":
            self.record["t_exp"] = time.perf_counter()
        else:
            self.record.setdefault("exp_end", {})[exp] = time.perf_counter() - self.record["t_exp"]


def _timed_guard(record):
    """The runner's DivergenceGuard with its per-step hook timed on its own."""
    from cl_plugins.core.divergence import DivergenceGuard

    class TimedGuard(DivergenceGuard):
        def after_update(self, strategy, **kw):
            t0 = time.perf_counter()
            super().after_update(strategy, **kw)
            elapsed = time.perf_counter() - t0
            exp = strategy.experience.current_experience
            record.setdefault("guard", {}).setdefault(exp, []).append(elapsed)

    return TimedGuard("speed")


def measure(cfg, entry, n_exp, seed=0, guard=False):
    from cl_plugins.benchmarks import build_benchmark
    from cl_plugins.core.iterations import IterationBudgetPlugin
    from cl_plugins.experiment.config import section_for
    from cl_plugins.experiment.plan import entry_params, instantiate
    from cl_plugins.experiment.runner import build_optimizer, seed_everything
    from cl_plugins.models import build_model
    from cl_plugins.registry import get_method
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    bench = dict(cfg["benchmark"])
    bench_seed = bench.pop("seed")
    seed_everything(seed)
    info = build_benchmark(**bench, seed=seed if bench_seed is None else bench_seed)
    seed_everything(seed)
    model = build_model(section_for(cfg, entry, "model"), info)
    opt = build_optimizer(section_for(cfg, entry, "optimizer"), model)
    st = section_for(cfg, entry, "strategy")
    spec = get_method(entry["name"])
    # a template method (Avalanche's DER, iCaRL, ...) owns its training loop: time that loop
    params = entry_params(cfg, entry)  # method_params[name], then the entry's own, as the runner
    template, template_kwargs, plugins = Naive, {}, []
    if spec.kind == "template":
        template, template_kwargs = spec.factory, {**spec.defaults, **params}
    else:
        plugins = [instantiate(spec, params)]
    # the runner's iteration budget (strategy.train_iterations), after the method's plugins as
    # in the runner (a plugin that reads train_epochs at the first epoch sees the budget's)
    budget = ([IterationBudgetPlugin(st["train_iterations"])]
              if st.get("train_iterations") is not None else [])
    record = {}
    strategy = template(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(),
                        train_mb_size=st["train_mb_size"], train_epochs=st["epochs"],
                        eval_mb_size=st["eval_mb_size"],
                        device=st["device"] if st["device"] != "auto" else "cpu",
                        plugins=[_Clock("first", record), *plugins,
                                 *([_timed_guard(record)] if guard else []), *budget,
                                 _Clock("last", record)],
                        evaluator=EvaluationPlugin(loggers=[]), **template_kwargs)
    for exp in list(info.benchmark.train_stream)[:n_exp]:
        strategy.train(exp)
    last = n_exp - 1
    steps = record["steps"][last][5:]  # skip warm-up steps
    if guard:  # (median step with the guard, median time of the guard's own check)
        return statistics.median(steps), statistics.median(record["guard"][last][5:])
    return (statistics.median(steps), record.get("exp_end", {}).get(0, float("nan")),
            _bytes_per_sample(plugins), _growth(plugins), _state_bytes(plugins))


def _state_bytes(plugins):
    """Bytes of the tensors in the plugins' ``state_dict()`` after the last trained experience:
    what a method keeps between experiences (buffers, generators, teacher copies, importances,
    bases), as its checkpoint stores it; None for a template method (no plugin)."""
    if not plugins:
        return None
    total, todo = 0, [p.state_dict() for p in plugins if hasattr(p, "state_dict")]
    while todo:
        v = todo.pop()
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            todo.extend(v)
    return total


def _growth(plugins):
    """(parameters, bytes) an architectural plugin stores for its last trained task (its
    ``cost_per_task()``), or None."""
    for p in plugins:
        costs = p.cost_per_task() if hasattr(p, "cost_per_task") else {}
        if costs:
            last = costs[max(costs)]
            return last["params"], last["bytes"]
    return None


def _bytes_per_sample(plugins):
    """Storage bytes per stored sample of the first ReplayBuffer a plugin holds (or None)."""
    from cl_plugins.core.buffer import ReplayBuffer

    for p in plugins:
        todo = list(vars(p).values())
        while todo:
            v = todo.pop(0)
            if isinstance(v, ReplayBuffer) and v.capacity:
                return v.bytes_per_sample
            if hasattr(v, "__dict__") and not isinstance(v, (torch.Tensor, torch.nn.Module)):
                todo.extend(x for x in vars(v).values() if isinstance(x, ReplayBuffer))
    return None


def main(argv=None):
    from cl_plugins.experiment.config import apply_override, load_config, normalize_methods

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "experiments/configs/hsu2018_split_mnist.yaml"))
    ap.add_argument("--methods", default="naive")
    ap.add_argument("--experiences", type=int, default=2)
    ap.add_argument("--data-root")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    ap.add_argument("--no-paired", dest="paired", action="store_false",
                    help="one naive reference for all methods (default: a naive run right "
                         "before each method, its ratio's denominator)")
    ap.add_argument("--guard", action="store_true",
                    help="instead: the cost of the runner's divergence check (DivergenceGuard) "
                         "per step, timed on its own and as a share of each method's step")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(args.config)
    if args.data_root:
        cfg["benchmark"]["data_root"] = args.data_root
    for kv in args.set:
        k, v = kv.split("=", 1)
        from cl_plugins.experiment.config import parse_value
        apply_override(cfg, k, parse_value(v))
    names = [m for m in args.methods.split(",") if m and m != "naive"]
    # A method the config lists keeps the config's entry (its protocol hyper-parameters and
    # optimizer/strategy overrides); others run with their registry defaults.
    in_config = {e.get("label") or e["name"]: e for e in normalize_methods(cfg["methods"])}
    entries = [in_config.get(n) or normalize_methods([n])[0] for n in ["naive"] + names]
    # Each method is paired with a naive run measured right before it: on a shared machine the
    # load drifts over minutes, and a ratio to one naive run at the start would absorb the drift.
    if args.guard:
        print(f"\n{cfg['name']}: {cfg['benchmark']['name']} {cfg['benchmark']['scenario']}-IL, "
              f"batch {cfg['strategy']['train_mb_size']}, torch threads "
              f"{torch.get_num_threads()}")
        print("| method | step with the check (ms, median) | check (ms, median) | "
              "share of the step |")
        print("|---|---|---|---|")
        for e in entries:
            step, check = measure(cfg, e, args.experiences, guard=True)
            print(f"| {e.get('label') or e['name']} | {1000 * step:.3f} | {1000 * check:.4f} | "
                  f"{100 * check / step:.2f}% |")
        return 0
    rows = []
    naive_entry = entries[0]
    for e in entries:
        step, end, bps, growth, state = measure(cfg, e, args.experiences)
        if e is naive_entry:
            ref = step
        else:
            ref = measure(cfg, naive_entry, args.experiences)[0] if args.paired else rows[0][4]
        rows.append((e.get("label") or e["name"], step, end, bps, ref, growth, state))
    print(f"\n{cfg['name']}: {cfg['benchmark']['name']} {cfg['benchmark']['scenario']}-IL, "
          f"batch {cfg['strategy']['train_mb_size']}, torch threads {torch.get_num_threads()}")
    print("| method | step (ms, median) | ratio to naive | end-of-experience work (s) | "
          "buffer bytes per sample | stored for the last task (parameters / bytes) | "
          "plugin state (bytes) |")
    print("|---|---|---|---|---|---|---|")
    for name, step, end, bps, ref, growth, state in rows:
        print(f"| {name} | {1000 * step:.3f} | {step / ref:.2f} | {end:.3f} | "
              f"{'–' if bps is None else f'{bps:,.0f}'} | "
              f"{'–' if growth is None else f'{growth[0]:,} / {growth[1]:,}'} | "
              f"{'–' if state is None else f'{state:,}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
