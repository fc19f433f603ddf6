"""Check a whole resolved config before anything runs, and lay out where each run's files go.

``plan_experiment(cfg)`` checks every section, key and value the runs will use: the sections'
types, the benchmark's name, options and data files (the raw arrays are read, which also
warms the per-process cache the runs read from), the class split, every method entry's name,
scenario and hyper-parameters (each plugin is *constructed*, so its own ``__init__`` checks
apply: the rules are written once, in the plugin), ``method_params`` names, the model (built
once per distinct model section on the benchmark's shapes), optimizer, strategy, device, seeds,
loggers and the output directory. Every problem found goes into one :class:`ConfigError`; the
caller reports them together and writes nothing.

Where results go (decided here, documented in the README): each run writes
``OUTPUT_DIR/NAME/LABEL/<settings fingerprint>/seed<N>.json`` (and its plots and checkpoint
beside it). The settings fingerprint hashes everything that determines the run's numbers
except the seed (the config minus output settings and data root, and the entry with the
``method_params`` that apply to it). Running again with the same settings finds the same
folder (resume, ``--skip-finished``); other settings get another folder, so no run ever
replaces another's files.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

from cl_plugins.core.distributed import launched_world_size

SECTIONS = ("benchmark", "model", "optimizer", "strategy", "loggers", "method_params")
# Config keys that do not change what a run computes.
_NOT_SETTINGS = {"output_dir", "loggers", "seeds", "methods", "method_params"}
# Options added after the first results, left out of the fingerprint at their default value, so
# the runs they do not change keep their folders: (section, key) -> default.
_LATER_OPTIONS = {("benchmark", "first_exp_classes"): None,
                  # an execution option: the minibatches are bit-identical either way
                  ("strategy", "tensor_batches"): True, ("strategy", "threads"): "auto"}


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` lists them all."""

    def __init__(self, problems: List[str]):
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(f"{problems[0]} (nothing was run)")
        else:
            super().__init__(f"{len(problems)} problems in the config, nothing was run:\n" +
                             "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class PlannedRun:
    entry: Dict[str, Any]
    seed: int
    label: str
    settings: str  # settings fingerprint (no seed): the run's folder
    run_id: str  # settings + seed


@dataclass
class Plan:
    cfg: Dict[str, Any]
    entries: List[Dict[str, Any]]
    runs: List[PlannedRun] = field(default_factory=list)


def method_label(entry: Dict[str, Any]) -> str:
    return entry.get("label") or "+".join([entry["name"]] + [p["name"] for p in entry["plus"]])


def expand_methods(methods: List[Dict[str, Any]], scenario: str) -> List[Dict[str, Any]]:
    """Replace an entry named 'all' by every registered method that supports ``scenario``
    (other libraries' reference implementations only run when named). An entry of the same
    list that names one of those methods, with no label and no ``plus``, customises it: it
    takes that method's place in 'all' instead of running a second time (``methods: [all,
    {name: rgo, optimizer: {name: sgd}}]``)."""
    from cl_plugins.registry import list_methods

    if not any(m["name"] == "all" for m in methods):
        return list(methods)
    specs = [s for s in list_methods(scenario) if not s.reference]
    specs.sort(key=lambda s: (s.name != "naive", s.name))
    names = [s.name for s in specs]
    custom = {m["name"]: m for m in methods
              if m["name"] in names and not m.get("label") and not m.get("plus")}
    out = []
    for m in methods:
        if m["name"] == "all":
            out += [custom.get(n) or {"name": n, "params": {}, "plus": []} for n in names]
        elif custom.get(m["name"]) is not m:  # else: placed by 'all'
            out.append(m)
    return out


def instantiate(spec, params: Dict[str, Any]):
    """Construct a plugin method from the hyper-parameters a config gives it, over the
    registry's defaults (for our plugins, read from their signature, where they are declared);
    the plugin's ``__init__`` validates them."""
    params = {**spec.defaults, **(params or {})}
    sig = inspect.signature(spec.factory.__init__)
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [n for n in sig.parameters if n != "self"]
    unknown = [k for k in params if k not in allowed]
    if unknown and not accepts_any:
        raise ValueError(f"Unknown hyper-parameter(s) {unknown} for method {spec.name!r}; "
                         f"valid: {allowed or 'none'}")
    return spec.factory(**params)


def entry_params(cfg: Dict[str, Any], part: Dict[str, Any]) -> Dict[str, Any]:
    """A method's parameters in an entry: ``method_params[name]`` updated by its own params."""
    return {**(cfg.get("method_params") or {}).get(part["name"], {}), **part["params"]}


def _digest(obj: Any, n: int) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def settings_fingerprint(cfg: Dict[str, Any], entry: Dict[str, Any]) -> str:
    kept = {k: v for k, v in cfg.items() if k not in _NOT_SETTINGS}
    kept["benchmark"] = {k: v for k, v in cfg["benchmark"].items() if k != "data_root"}
    for (section, key), default in _LATER_OPTIONS.items():
        if key in kept.get(section, {}) and kept[section][key] == default:
            kept[section] = {k: v for k, v in kept[section].items() if k != key}
    if launched_world_size() > 1:  # N ranks at batch B are the batch N*B of one process
        kept["world_size"] = launched_world_size()
    effective = {**entry, "params": entry_params(cfg, entry),
                 "plus": [{**p, "params": entry_params(cfg, p)} for p in entry["plus"]]}
    return _digest({"cfg": kept, "entry": effective}, 8)


def run_fingerprint(settings: str, seed: int) -> str:
    return _digest({"settings": settings, "seed": seed}, 16)


def run_dir(out_dir: Path, cfg: Dict[str, Any], entry: Dict[str, Any]) -> Path:
    return Path(out_dir) / cfg["name"] / method_label(entry) / settings_fingerprint(cfg, entry)


def json_path(out_dir: Path, cfg: Dict[str, Any], entry: Dict[str, Any], seed: int) -> Path:
    return run_dir(out_dir, cfg, entry) / f"seed{seed}.json"


# ------------------------------------------------------------------------------ checks

def _non_finite(node: Any, where: str) -> List[str]:
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{where} is {node!r}; every number in a config must be finite"]
    if isinstance(node, dict):
        return [m for k, v in node.items() for m in _non_finite(v, f"{where}.{k}" if where
                                                                  else str(k))]
    if isinstance(node, (list, tuple)):
        return [m for i, v in enumerate(node) for m in _non_finite(v, f"{where}[{i}]")]
    return []


def _check_output_dir(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"output_dir must be a folder path; got {value!r}")
    path = Path(value)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"output_dir {str(path)!r}: {str(probe)!r} exists and is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {str(path)!r} cannot be written: no write permission on "
                         f"{str(probe)!r}")


def _check_loggers(lg: Dict[str, Any]) -> None:
    for key in ("progress", "wandb", "json", "plots", "checkpoint"):
        if not isinstance(lg.get(key), bool):
            raise ValueError(f"loggers.{key} must be true or false; got {lg.get(key)!r}")
    stale = lg.get("claim_stale_s")
    if isinstance(stale, bool) or not isinstance(stale, (int, float)) or not stale >= 120:
        raise ValueError(f"loggers.claim_stale_s must be a number of seconds >= 120 (how long "
                         f"another machine's claim on a run may go untouched before it is taken "
                         f"over); got {stale!r}")


DISTRIBUTED_TEMPLATES = ("naive", "joint", "cumulative")  # loops DataParallelPlugin covers


def _check_distributed(spec, where: str) -> None:
    """Under torchrun, a method runs only if it is marked distributed-safe (docs/distributed.md)."""
    safe = (spec.name in DISTRIBUTED_TEMPLATES if spec.kind == "template" else
            getattr(spec.factory, "supports_distributed", False) and not spec.reference)
    if not safe:
        note = getattr(spec.factory, "distributed_note", "") or \
            "its behaviour over several processes has not been checked yet"
        if spec.reference:  # Avalanche's flag follows its DistributedSampler design, not ours
            note = ("Avalanche's own method, whose data handling cl-run's data parallelism "
                    "(docs/distributed.md) does not cover")
        raise ValueError(f"{where}: {spec.name} cannot run under torch.distributed "
                         f"({launched_world_size()} processes): {note}. Run it in one process "
                         "(no --nproc, no torchrun)")


def plan_experiment(cfg: Dict[str, Any]) -> Plan:
    """Check ``cfg`` completely (see the module docstring); return the runs it describes, or
    raise :class:`ConfigError` with every problem. ``cfg`` is normalised in place (methods as
    entries, the scenario's canonical name, seeds as a list, paths as strings)."""
    from cl_plugins.benchmarks import describe_benchmark, resolve_scenario
    from cl_plugins.models import BACKBONES, build_backbone, build_model
    from cl_plugins.registry import get_method

    from .config import DEFAULT_CONFIG, _check_optimizer, _check_strategy, check_seeds, \
        expand_paths, normalize_methods, section_for
    from .runner import resolve_device

    problems: List[str] = []
    expand_paths(cfg)

    def attempt(fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
            msg = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
            if msg not in problems:
                problems.append(msg)
            return None

    for name in SECTIONS:
        if not isinstance(cfg.get(name), dict):
            keys = ", ".join(DEFAULT_CONFIG[name]) or "method names"
            problems.append(f"section '{name}' must be a mapping of keys ({keys}); got "
                            f"{cfg.get(name)!r}")
            cfg[name] = copy.deepcopy(DEFAULT_CONFIG[name])  # so the other checks can go on
    if not isinstance(cfg.get("name"), str) or not cfg["name"] or "/" in cfg["name"]:
        problems.append(f"name must be a non-empty string without '/'; got {cfg.get('name')!r}")
        cfg["name"] = "default"
    attempt(_check_output_dir, cfg["output_dir"])
    attempt(_check_loggers, cfg["loggers"])
    seeds = attempt(check_seeds, cfg["seeds"])
    cfg["seeds"] = seeds or []
    methods = attempt(normalize_methods, cfg["methods"]) or []
    cfg["methods"] = methods
    attempt(_check_optimizer, cfg["optimizer"], "optimizer")
    attempt(_check_strategy, cfg["strategy"], "strategy")
    scenario = attempt(resolve_scenario, cfg["benchmark"].get("scenario"))
    if scenario:
        cfg["benchmark"]["scenario"] = scenario
    bench = dict(cfg["benchmark"])
    bench_seed = bench.pop("seed")
    shape = None
    if scenario:
        shape = attempt(describe_benchmark, **bench, seed=0 if bench_seed is None else bench_seed)
    entries = expand_methods(methods, scenario) if scenario else methods
    from cl_plugins.registry import list_methods

    known = {s.name for s in list_methods()}
    for mname, params in cfg["method_params"].items():
        if mname not in known:
            attempt(get_method, mname)  # unknown name: the error lists the valid ones
        elif not isinstance(params, dict):
            problems.append(f"method_params.{mname} must be a mapping of hyper-parameters; got "
                            f"{params!r}")
    used = {p["name"] for e in entries for p in [e] + e["plus"]}
    for mname, params in cfg["method_params"].items():  # also names no entry uses
        if mname in known and mname not in used and isinstance(params, dict):
            spec = get_method(mname)
            if spec.kind == "plugin":
                attempt(instantiate, spec, params)
    models_checked: Dict[str, Any] = {}
    labels: Dict[str, int] = {}
    for i, entry in enumerate(entries):
        label = method_label(entry)
        where = f"methods[{i}] ({label})"
        if label in labels:
            problems.append(f"{where}: label {label!r} is also methods[{labels[label]}]'s; give "
                            "one of them another 'label'")
        labels[label] = i
        templates, built = 0, []
        for part in [entry] + entry["plus"]:
            spec = attempt(get_method, part["name"])
            if spec is None:
                continue
            if scenario:
                attempt(spec.check_scenario, scenario)
            params = entry_params(cfg, part)
            if launched_world_size() > 1:
                attempt(_check_distributed, spec, where)
            if spec.kind == "template":
                templates += 1
                attempt(_check_template_kwargs, spec, {**spec.defaults, **params}, where)
            else:
                built.append(attempt(lambda s=spec, p=params: _prefixed(where, instantiate, s, p)))
        if templates > 1:
            problems.append(f"{where}: at most one training template (naive, joint, "
                            f"cumulative) per entry; got {templates}")
        opt = attempt(section_for, cfg, entry, "optimizer")
        if opt is not None and entry.get("optimizer"):
            attempt(_check_optimizer, opt, f"methods[{i}].optimizer")
        st = attempt(section_for, cfg, entry, "strategy")
        if st is not None and (entry.get("strategy") or i == 0):
            if entry.get("strategy"):
                attempt(_check_strategy, st, f"methods[{i}].strategy")
            attempt(resolve_device, st.get("device"))
        for plugin in built:  # a method's settings against the strategy's (``check_strategy``)
            if st is not None and hasattr(plugin, "check_strategy"):
                attempt(_prefixed, where, plugin.check_strategy, st)
        model_cfg = attempt(section_for, cfg, entry, "model")
        if model_cfg is not None and shape is None:  # no shapes to build with: the name alone
            name = model_cfg.get("name", "mlp")
            if not (isinstance(name, str) and name in BACKBONES):
                attempt(build_backbone, name, None)  # the unknown-name error, with the names
        if model_cfg is not None and shape is not None:
            key = json.dumps(model_cfg, sort_keys=True, default=str)
            if key not in models_checked:
                info = SimpleNamespace(scenario=scenario, task_labels=scenario == "task",
                                       **shape)
                models_checked[key] = attempt(build_model, model_cfg, info)
    if os.environ.get("WANDB_SWEEP_ID") and (len(entries) != 1 or len(cfg["seeds"]) != 1):
        problems.append("under a wandb sweep agent each run must be one method and one seed "
                        f"(got {len(entries)} methods, seeds {cfg['seeds']}); make the seed a "
                        "sweep parameter instead")
    # Numbers no check above looked at (e.g. a hyper-parameter a plugin does not range-check).
    problems += [m for m in _non_finite(cfg, "") if not any(m.split(" is ")[0].split(".")[-1]
                                                             in p for p in problems)]
    if problems:
        raise ConfigError(problems)
    plan = Plan(cfg=cfg, entries=entries)
    for entry in entries:
        settings = settings_fingerprint(cfg, entry)
        for seed in cfg["seeds"]:
            plan.runs.append(PlannedRun(entry, seed, method_label(entry), settings,
                                        run_fingerprint(settings, seed)))
    return plan


def _prefixed(where: str, fn: Callable, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None


def _check_template_kwargs(spec, kwargs: Dict[str, Any], where: str) -> None:
    sig = inspect.signature(spec.factory.__init__)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return  # Avalanche's templates pass their keywords on; they check them themselves
    allowed = [n for n in sig.parameters if n != "self"]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown hyper-parameter(s) {unknown} for method "
                         f"{spec.name!r}")
