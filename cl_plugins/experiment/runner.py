"""Config -> benchmark, model, strategy, plugins, evaluation, loggers -> results.

For each method entry and each seed: seed every RNG, build the benchmark and the model, build the
strategy (an Avalanche template plus the method's plugins), then for every training experience
train on it and evaluate on the whole test stream. The results JSON is rewritten after every
experience, so a failure later in the stream never loses what was measured before it.
"""

from __future__ import annotations

import functools
import os
import random
import re
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core.augment import BatchAugmentPlugin
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.models import build_model
from cl_plugins.core.divergence import DivergenceError, DivergenceGuard
from cl_plugins.registry import get_method

from . import checkpoint as ckpt_io
from . import results as res
from .config import section_for
from .evaluation import ACC_KEY, TASK_VIEW_KEY, TaskILAccuracy, matrix_row, summarize
from .plan import (entry_params, expand_methods, instantiate, json_path, method_label,  # noqa: F401
                   plan_experiment, run_fingerprint, settings_fingerprint)
from .progress import ProgressBarPlugin


# The runner records results itself; Avalanche's evaluator needs no logger of its own.
warnings.filterwarnings("ignore", message="No loggers specified, metrics will not be logged")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"strategy.device={device!r} but CUDA is not available here; use 'cpu' "
                         "or 'auto'")
    return torch.device(device)


def build_optimizer(opt_cfg: Dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW; ``param_groups`` entries ``{params: REGEX, lr, weight_decay, ...}`` take
    the parameters whose name matches REGEX (first match wins); the rest form the first group."""
    name = opt_cfg["name"]
    common = {"lr": opt_cfg["lr"], "weight_decay": opt_cfg["weight_decay"]}
    if name == "sgd":
        common.update(momentum=opt_cfg["momentum"], nesterov=opt_cfg["nesterov"])
    else:
        common.update(betas=tuple(opt_cfg["betas"]))
    groups_cfg = opt_cfg.get("param_groups") or []
    named = list(model.named_parameters())
    taken, groups = set(), []
    for i, g in enumerate(groups_cfg):
        g = dict(g)
        if "params" not in g:
            raise ValueError(f"optimizer.param_groups[{i}] needs 'params': a regex over parameter "
                             "names such as 'head\\.' or 'backbone\\.layers\\.0'")
        pattern = re.compile(g.pop("params"))
        params = [p for n, p in named if pattern.search(n) and n not in taken]
        taken.update(n for n, _ in named if pattern.search(n))
        if not params:
            raise ValueError(f"optimizer.param_groups[{i}] matches no parameter; names are: "
                             f"{[n for n, _ in named]}")
        groups.append({"params": params, **g})
    rest = [p for n, p in named if n not in taken]
    all_groups = ([{"params": rest}] if rest else []) + groups
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    optimizer = cls(all_groups, **common)
    if not opt_cfg.get("zero_grad_to_none", True):
        # PyTorch < 2 zeroed gradients in place: a parameter that took part in an earlier step
        # keeps a zero gradient, so Adam keeps moving it with its decaying moments (old task heads
        # drift). Offered for fidelity to protocols run on that PyTorch (Hsu et al. 2018).
        optimizer.zero_grad = functools.partial(optimizer.zero_grad, set_to_none=False)
    return optimizer


def build_scheduler(sched_cfg: Dict[str, Any], optimizer) -> SupervisedPlugin:
    """Per-experience learning-rate schedule, stepped once per epoch. Each experience starts
    again from the optimizer's base learning rates and epoch 0 (Avalanche's LRSchedulerPlugin
    with reset_lr and reset_scheduler): e.g. Adam-NSCL's x0.5 at epochs 30 and 60 of every task."""
    from avalanche.training.plugins import LRSchedulerPlugin

    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(sched_cfg["milestones"]), gamma=sched_cfg.get("gamma", 0.1))
    return LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True,
                             step_granularity="epoch")


def _divergence_hint(opt_cfg: Dict[str, Any], parts) -> str:
    """The settings a diverged run's message points at: the learning rate, the coefficients."""
    coefs = [f"{spec.name}.{k}={v}" for spec, params in parts
             for k, v in {**spec.defaults, **params}.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)
             and any(w in k for w in ("lambda", "alpha", "beta", "strength", "reg", "c"))]
    return f"optimizer.lr={opt_cfg['lr']}" + (f"; {', '.join(coefs[:6])}" if coefs else "")


class _StepCounter(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def after_training_iteration(self, strategy, **kwargs):
        self.steps += 1


def run_single(cfg: Dict[str, Any], entry: Dict[str, Any], seed: int, out_dir: Path,
               progress: bool = True) -> Dict[str, Any]:
    """Train and evaluate one method entry with one seed; returns the results dict.

    A run whose training diverges returns with status ``diverged`` (the rows measured before
    are kept). Files: ``plan.json_path`` (settings fingerprint in the folder). When that file
    already holds a finished result, the new run writes ``seed<N>.rerun.json`` and replaces
    the finished file only once it has finished itself: a failing rerun never downgrades a
    finished result."""
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics

    label = method_label(entry)
    bench_cfg = dict(cfg["benchmark"])
    bench_seed = bench_cfg.pop("seed")
    opt_cfg = section_for(cfg, entry, "optimizer")
    st_cfg = section_for(cfg, entry, "strategy")
    seed_everything(seed)
    info = build_benchmark(**bench_cfg, seed=seed if bench_seed is None else bench_seed)

    # Resolve the method: one template (default naive) plus plugins.
    parts = [(get_method(e["name"]), entry_params(cfg, e)) for e in [entry] + entry["plus"]]
    template_cls, template_kwargs, plugins, trains_on_stream = None, {}, [], False
    for spec, params in parts:
        spec.check_scenario(info.scenario)
        if spec.kind == "template":
            if template_cls is not None:
                raise ValueError(f"{label}: at most one training template (naive, joint, "
                                 f"cumulative) per entry; got two")
            template_cls, template_kwargs = spec.factory, {**spec.defaults, **params}
            trains_on_stream = spec.trains_on_stream
        else:
            plugins.append(instantiate(spec, params))
    if template_cls is None:
        from avalanche.training import Naive as template_cls  # noqa: N813

    device = resolve_device(st_cfg["device"])
    seed_everything(seed)  # model init must not depend on how much RNG the benchmark used
    model = build_model(section_for(cfg, entry, "model"), info)
    optimizer = build_optimizer(opt_cfg, model)
    counter = _StepCounter()
    extra: List[SupervisedPlugin] = [counter, DivergenceGuard(
        label, seed, _divergence_hint(opt_cfg, parts))]
    if st_cfg["train_iterations"] is not None:
        extra.append(IterationBudgetPlugin(st_cfg["train_iterations"]))
    if opt_cfg.get("scheduler"):
        extra.append(build_scheduler(opt_cfg["scheduler"], optimizer))
    if st_cfg["augment"] == "crop_flip":
        extra.append(BatchAugmentPlugin())
    if progress:
        extra.append(ProgressBarPlugin(f"{label} s{seed}"))

    settings = settings_fingerprint(cfg, entry)
    run_id = run_fingerprint(settings, seed)
    final_path = json_path(out_dir, cfg, entry, seed)
    previous = res.read_json(final_path)
    rerun = previous is not None and previous.get("status") == "finished"
    path = final_path.with_name(f"seed{seed}.rerun.json") if rerun else final_path
    ckpt_path = ckpt_io.checkpoint_path(final_path)
    not_resumable = ckpt_io.why_not_resumable(template_cls, template_kwargs, plugins,
                                              trains_on_stream)
    checkpointing = cfg["loggers"]["checkpoint"] and not_resumable is None
    saved = None
    if checkpointing:
        saved, notes = ckpt_io.load_latest(ckpt_path)
        for note in notes:
            warnings.warn(f"{label} seed {seed}: {note}")
        if saved is not None and saved["fingerprint"] != run_id:
            warnings.warn(f"{ckpt_path} was written by a different config, method entry or seed "
                          f"(fingerprint {saved['fingerprint']}, this run {run_id}); starting "
                          "afresh and replacing it")
            saved = None
    metrics = [accuracy_metrics(experience=True), bwt_metrics(stream=True),
               forgetting_metrics(stream=True)]
    if info.scenario == "class":
        metrics.append(TaskILAccuracy())
    loggers = []
    wandb_logger = None
    if cfg["loggers"]["wandb"]:
        from .wandb_logger import WandBLogger

        lg = cfg["loggers"]
        params = {"reinit": "finish_previous"}
        if saved is not None and saved["result"].get("wandb_run_id"):
            params.update(id=saved["result"]["wandb_run_id"], resume="allow")
        if lg.get("wandb_entity"):
            params["entity"] = lg["wandb_entity"]
        if lg.get("wandb_group"):
            params["group"] = lg["wandb_group"]
        wandb_logger = WandBLogger(project_name=lg["wandb_project"],
                                   run_name=f"{cfg['name']}/{label}/seed{seed}",
                                   config={**cfg, "seed": seed, "method": label},
                                   dir=str(out_dir), save_code=False, params=params)
        loggers.append(wandb_logger)
    evaluator = EvaluationPlugin(*metrics, loggers=loggers, strict_checks=False)
    strategy = template_cls(model=model, optimizer=optimizer,
                            criterion=torch.nn.CrossEntropyLoss(),
                            train_mb_size=st_cfg["train_mb_size"], train_epochs=st_cfg["epochs"],
                            eval_mb_size=st_cfg["eval_mb_size"], device=device,
                            plugins=plugins + extra, evaluator=evaluator, eval_every=-1,
                            **template_kwargs)

    result: Dict[str, Any] = {
        "status": "running", "method": label, "seed": seed, "config": cfg,
        "method_entry": entry, "benchmark": info.describe(), "versions": res.package_versions(),
        "provenance": res.provenance(), "settings_fingerprint": settings,
        "device": str(device), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "view": info.scenario, "matrix": [], "matrix_task_view": [] if info.scenario == "class"
        else None, "train_time_s_per_exp": [], "steps_per_exp": [], "peak_rss_mb": [],
        "peak_cuda_mb": [], "avalanche": {}, "run_fingerprint": run_id,
        "checkpoint": str(ckpt_path) if checkpointing else
        f"off: {not_resumable or 'loggers.checkpoint is false'}", "resumed": [],
    }
    if saved is not None:  # carry on: the results measured before the stop come from the file
        result = {**saved["result"], "status": "running", "config": cfg, "device": str(device),
                  "provenance": res.provenance()}
        result["resumed"] = result.get("resumed", []) + [
            {"after_experiences": saved["experiences_done"],
             "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    write = (lambda: res.write_json_atomic(path, result)) if cfg["loggers"]["json"] else \
        (lambda: None)
    train_stream, test_stream = info.benchmark.train_stream, info.benchmark.test_stream
    T = info.n_experiences
    reset_opt = bool(st_cfg["reset_optimizer"])
    if wandb_logger is not None:
        result["wandb_run_id"] = wandb_logger.init_kwargs.get("id")
    try:
        write()
        todo = [train_stream] if trains_on_stream else list(train_stream)
        done = 0
        if saved is not None:
            done = saved["experiences_done"]
            counter.steps = sum(result["steps_per_exp"])
            ckpt_io.restore(saved, strategy=strategy, model=model, optimizer=optimizer,
                            plugins=plugins, train_experiences=todo,
                            eval_experiences=list(test_stream))
            saved = None  # free the memory it holds
        for i, item in enumerate(todo[done:], start=done):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            steps0 = counter.steps
            t0 = time.perf_counter()
            strategy.train(item, reset_optimizer_state=reset_opt)
            result["train_time_s_per_exp"].append(time.perf_counter() - t0)
            result["steps_per_exp"].append(counter.steps - steps0)
            result["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            result["peak_cuda_mb"].append(torch.cuda.max_memory_allocated(device) / 2**20
                                          if device.type == "cuda" else None)
            metrics_now = strategy.eval(test_stream)
            result["matrix"].append(matrix_row(metrics_now, T, ACC_KEY))
            if result["matrix_task_view"] is not None:
                result["matrix_task_view"].append(matrix_row(metrics_now, T, TASK_VIEW_KEY))
            result["avalanche"] = {k: float(v) for k, v in metrics_now.items()
                                   if k.startswith(("StreamBWT", "StreamForgetting"))}
            if checkpointing and i + 1 < len(todo):
                t0 = time.perf_counter()
                try:
                    if strategy.model is not model:
                        raise RuntimeError("a plugin replaced strategy.model (e.g. the ensemble's "
                                           "wrapper), which a rebuilt run would not reproduce")
                    ckpt_io.save(ckpt_path, ckpt_io.capture(
                        strategy=strategy, model=model, optimizer=optimizer, plugins=plugins,
                        result=result, fingerprint_=run_id, experiences_done=i + 1))
                except Exception as err:  # a checkpoint must never cost the run itself
                    checkpointing = False
                    result["checkpoint"] = (f"off after experience {i + 1}: "
                                            f"{type(err).__name__}: {err}")
                    warnings.warn(f"{label} seed {seed}: no checkpoint ({result['checkpoint']});"
                                  " the run goes on without one")
                    ckpt_io.remove(ckpt_path)
                else:
                    result.setdefault("checkpoint_s_per_exp", []).append(
                        time.perf_counter() - t0)
            write()
        result["summary"] = summarize(result["matrix"])
        result["summary_task_view"] = (summarize(result["matrix_task_view"])
                                       if result["matrix_task_view"] else None)
        result["train_time_s"] = float(sum(result["train_time_s_per_exp"]))
        steps = sum(result["steps_per_exp"])
        result["step_time_ms"] = 1000 * result["train_time_s"] / steps if steps else None
        result["status"] = "finished"
        write()
        if path != final_path and cfg["loggers"]["json"]:
            os.replace(path, final_path)  # the rerun finished: it takes the result's place
            path = final_path
        if checkpointing:
            ckpt_io.remove(ckpt_path)  # the finished JSON holds everything the run measured
        if cfg["loggers"]["plots"]:
            title = f"{cfg['name']} {label} seed {seed} ({info.scenario}-IL)"
            result["plots"] = {
                "acc_matrix": str(res.plot_matrix(result["matrix"],
                                                  final_path.with_suffix(".png"), title)),
                "acc_curve": str(res.plot_curves({label: result["summary"]["acc_curve"]},
                                                 final_path.with_name(f"seed{seed}_acc_curve.png"),
                                                 title))}
            write()
        if wandb_logger is not None:
            log = {f"final/{k}": v for k, v in result["summary"].items()
                   if isinstance(v, (int, float))}
            for name, png in (result.get("plots") or {}).items():
                log[f"final/{name}"] = wandb_logger.wandb.Image(png)
            wandb_logger.wandb.log(log)
            for k, v in log.items():
                if not k.endswith(("acc_matrix", "acc_curve")):
                    wandb_logger.wandb.run.summary[k] = v
    except BaseException as err:  # record: what was measured stays on disk
        result["status"] = ("diverged" if isinstance(err, DivergenceError) else
                            "interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
        result["error"] = f"{type(err).__name__}: {err}"
        if result["status"] == "failed":
            result["traceback"] = traceback.format_exc()
        if checkpointing and ckpt_path.exists():
            result["resume"] = (f"checkpoint after {len(result['steps_per_exp'])} experiences "
                                f"at {ckpt_path}: run the same command again to resume")
            if result["status"] == "failed":
                print(f"[cl-run] {label} seed {seed}: {result['resume']}", file=sys.stderr)
        try:
            write()
        except OSError as werr:  # e.g. the disk is full: say so, keep the original error
            print(f"[cl-run] {label} seed {seed}: could not record the result in {path}: "
                  f"{werr}", file=sys.stderr)
        if result["status"] != "diverged":
            raise
    finally:
        if wandb_logger is not None:
            wandb_logger.wandb.finish()
    return result


def run_experiment(cfg: Dict[str, Any], progress: bool | None = None,
                   echo=print, skip_finished: bool = False, plan=None) -> List[Dict[str, Any]]:
    """Run every method entry for every seed; write the summary; return the per-run results.

    The whole config is checked first (``plan.plan_experiment``; pass ``plan`` when already
    done): any problem raises ``ConfigError`` before anything is built or written.
    ``skip_finished``: a run whose JSON is finished with the same settings is read back instead
    of being run again. A run that diverges or fails is recorded and the others still run; a
    data-file error stops everything (it would fail every run the same way)."""
    from cl_plugins.core.checks import DatasetNotFoundError

    plan = plan if plan is not None else plan_experiment(cfg)
    cfg = plan.cfg
    if os.environ.get("WANDB_SWEEP_ID"):
        cfg["loggers"]["wandb"] = True
    progress = cfg["loggers"]["progress"] if progress is None else progress
    out_dir = Path(cfg["output_dir"])
    runs: List[Dict[str, Any]] = []
    for planned in plan.runs:
        label, seed = planned.label, planned.seed
        if skip_finished:
            done = _finished_result(cfg, planned.entry, seed, out_dir)
            if done is not None:
                echo(f"[cl-run] {label} seed {seed}: finished with the same settings, "
                     "skipped (--skip-finished)")
                runs.append(done)
                continue
        try:
            result = run_single(cfg, planned.entry, seed, out_dir, progress=progress)
        except (KeyboardInterrupt, SystemExit, DatasetNotFoundError):
            raise
        except Exception as err:
            if type(err).__name__ == "DataFileError":
                raise
            echo(f"[cl-run] {label} seed {seed} FAILED: {type(err).__name__}: {err}")
            result = {"method": label, "seed": seed, "status": "failed",
                      "error": f"{type(err).__name__}: {err}"}
        if result["status"] == "diverged":
            echo(f"[cl-run] {label} seed {seed} DIVERGED: {result['error']}")
        runs.append(result)
    write_summary(cfg, runs, out_dir)
    return runs


def _finished_result(cfg, entry, seed, out_dir: Path):
    found = res.read_json(json_path(out_dir, cfg, entry, seed))
    if found is None:
        return None
    same = found.get("run_fingerprint") == run_fingerprint(settings_fingerprint(cfg, entry), seed)
    return found if same and found.get("status") == "finished" else None


def write_summary(cfg: Dict[str, Any], runs: List[Dict[str, Any]], out_dir: Path) -> str:
    """``OUTPUT_DIR/NAME/summary.md`` and ``acc_curve.png``: an index of every result under
    ``OUTPUT_DIR/NAME``, one row per method label and settings fingerprint (this call's runs
    and every earlier one), so a run with other settings never replaces another's line."""
    base = out_dir / cfg["name"]
    found = [r for r in (res.read_json(p) for p in sorted(base.glob("*/*/seed*.json"))
                         if not p.name.endswith(".rerun.json")) if r is not None]
    known = {(r.get("method"), r.get("settings_fingerprint"), r.get("seed")) for r in found}
    found += [r for r in runs if (r.get("method"), r.get("settings_fingerprint"),
                                  r.get("seed")) not in known]
    labels = {}
    for r in found:
        labels.setdefault(r["method"], set()).add(r.get("settings_fingerprint"))
    grouped = [dict(r, method=f"{r['method']} @{r.get('settings_fingerprint')}"
                    if len(labels[r["method"]]) > 1 else r["method"]) for r in found]
    rows = res.summary_rows(grouped)
    task_view = cfg["benchmark"]["scenario"] == "class"
    md = (f"# {cfg['name']}\n\nEvery result under this folder (regenerated by each cl-run "
          f"with this config name); a label run with several settings shows each settings "
          f"fingerprint (the folder under the label).\n\n"
          + res.markdown_table(rows, task_view) + "\n")
    base.mkdir(parents=True, exist_ok=True)
    res.write_text_atomic(base / "summary.md", md)
    curves = {}
    for label in dict.fromkeys(r["method"] for r in grouped):
        done = [r for r in grouped if r["method"] == label and r["status"] == "finished"]
        if done and len(done[0]["summary"]["acc_curve"]) > 1:
            curves[label] = np.mean([r["summary"]["acc_curve"] for r in done], axis=0).tolist()
    if cfg["loggers"]["plots"] and curves:
        res.plot_curves(curves, base / "acc_curve.png", f"{cfg['name']}: ACC over experiences")
    return md
