"""Config -> benchmark, model, strategy, plugins, evaluation, loggers -> results.

``run_single`` trains and evaluates one method entry with one seed, in five named steps:

1. ``resolve``: the method entry -> one Avalanche template and the plugins, built from the
   hyper-parameters the config gives (the rest are the plugins' signature defaults);
2. ``build``: the benchmark (already built by the caller), the model, the optimizer, the
   runner's own plugins, the evaluator and loggers, the strategy;
3. ``train_and_evaluate``: for every training experience, train on it, then evaluate on the
   whole test stream (one row of the accuracy matrix); the results JSON is rewritten after every
   experience, so a failure later in the stream never loses what was measured before it;
4. ``checkpoint``: after every experience but the last, the state a resumed run needs;
5. ``report``: the summary, the plots, the final wandb log; or, when the run stopped, the
   status (diverged, interrupted, failed) with what was measured.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.benchmarks import build_benchmark
from cl_plugins.core import distributed as dist
from cl_plugins.core.augment import BatchAugmentPlugin
from cl_plugins.core.data_parallel import DataParallelPlugin
from cl_plugins.core.divergence import DivergenceError, DivergenceGuard
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.core.tensor_batches import TensorBatchesPlugin
from cl_plugins.models import build_model
from cl_plugins.registry import get_method

from . import checkpoint as ckpt_io
from . import results as res
from .claims import Preempted, RunClaim
from .threads import apply_threads
from .build import build_optimizer, build_scheduler, resolve_device, seed_everything  # noqa: F401
from .config import section_for
from .evaluation import RunnerEvaluationPlugin
from .evaluation import ACC_KEY, TASK_VIEW_KEY, TaskILAccuracy, matrix_row, summarize
from .plan import (entry_params, expand_methods, instantiate, json_path, method_label,  # noqa: F401
                   plan_experiment, run_fingerprint, settings_fingerprint)
from .progress import ProgressBarPlugin

COMPLETE = ("finished", "diverged")  # a run that ended by itself: its result stands


# The runner records results itself; Avalanche's evaluator needs no logger of its own.
warnings.filterwarnings("ignore", message="No loggers specified, metrics will not be logged")


def _divergence_hint(opt_cfg: Dict[str, Any], parts) -> str:
    """The settings a diverged run's message points at: the learning rate, the coefficients."""
    coefs = [f"{spec.name}.{k}={v}" for spec, params in parts
             for k, v in {**spec.defaults, **params}.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)
             and any(w in k for w in ("lambda", "alpha", "beta", "strength", "reg", "c"))]
    return f"optimizer.lr={opt_cfg['lr']}" + (f"; {', '.join(coefs[:6])}" if coefs else "")


class _StepCounter(SupervisedPlugin, supports_distributed=True):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def after_training_iteration(self, strategy, **kwargs):
        self.steps += 1


@dataclass
class Method:
    """A resolved method entry: the template that owns the loop and the plugins added to it."""
    parts: list  # (registry spec, the config's hyper-parameters) for the entry and its 'plus'
    template_cls: Any = None
    template_kwargs: Dict[str, Any] = field(default_factory=dict)
    plugins: List[Any] = field(default_factory=list)
    trains_on_stream: bool = False


@dataclass
class Run:
    """One (method entry, seed) run: what it is built from, where it writes, what it measured."""
    cfg: Dict[str, Any]
    entry: Dict[str, Any]
    seed: int
    out_dir: Path
    label: str
    final_path: Path = None  # seed<N>.json in the settings folder
    path: Path = None  # where this run writes (seed<N>.rerun.json over a finished result)
    ckpt_path: Path = None
    run_id: str = ""
    checkpointing: bool = False
    result: Dict[str, Any] = field(default_factory=dict)
    wandb_logger: Any = None
    threads: Dict[str, Any] = field(default_factory=dict)  # intra-op threads and why

    def write(self) -> None:
        if self.cfg["loggers"]["json"] and dist.is_main_process():  # rank 0 alone writes
            res.write_json_atomic(self.path, self.result)


def resolve(cfg: Dict[str, Any], entry: Dict[str, Any], scenario: str, label: str) -> Method:
    """Step 1: the entry's template (default: naive) and its plugins, constructed."""
    method = Method(parts=[(get_method(e["name"]), entry_params(cfg, e))
                           for e in [entry] + entry["plus"]])
    for spec, params in method.parts:
        spec.check_scenario(scenario)
        if spec.kind == "template":
            if method.template_cls is not None:
                raise ValueError(f"{label}: at most one training template (naive, joint, "
                                 f"cumulative) per entry; got two")
            method.template_cls, method.template_kwargs = spec.factory, {**spec.defaults, **params}
            method.trains_on_stream = spec.trains_on_stream
        else:
            method.plugins.append(instantiate(spec, params))
    if method.template_cls is None:
        from avalanche.training import Naive

        method.template_cls = Naive
    return method


def open_checkpoint(run: Run, method: Method) -> Optional[Dict[str, Any]]:
    """Where the run writes, and the checkpoint it resumes from (None: it starts afresh)."""
    cfg, label, seed = run.cfg, run.label, run.seed
    run.run_id = run_fingerprint(settings_fingerprint(cfg, run.entry), seed)
    run.final_path = json_path(run.out_dir, cfg, run.entry, seed)
    previous = res.read_json(run.final_path)
    # A complete result (finished, or diverged: deterministic, it would diverge again) is kept
    # until the new run is complete too; only then does the new file take its place.
    rerun = previous is not None and previous.get("status") in COMPLETE
    run.path = run.final_path.with_name(f"seed{seed}.rerun.json") if rerun else run.final_path
    run.ckpt_path = ckpt_io.checkpoint_path(run.final_path)
    not_resumable = ckpt_io.why_not_resumable(method.template_cls, method.template_kwargs,
                                              method.plugins, method.trains_on_stream)
    run.checkpointing = cfg["loggers"]["checkpoint"] and not_resumable is None
    run.result["checkpoint"] = (str(run.ckpt_path) if run.checkpointing else
                                f"off: {not_resumable or 'loggers.checkpoint is false'}")
    if not run.checkpointing:
        return None
    saved, notes = ckpt_io.load_latest(run.ckpt_path)
    for note in notes:
        warnings.warn(f"{label} seed {seed}: {note}")
    if saved is not None and saved["fingerprint"] != run.run_id:
        warnings.warn(f"{run.ckpt_path} was written by a different config, method entry or seed "
                      f"(fingerprint {saved['fingerprint']}, this run {run.run_id}); starting "
                      "afresh and replacing it")
        saved = None
    return saved


def make_wandb_logger(run: Run, saved: Optional[Dict[str, Any]]):
    from .wandb_logger import WandBLogger

    cfg, lg = run.cfg, run.cfg["loggers"]
    params = {"reinit": "finish_previous"}
    if saved is not None and saved["result"].get("wandb_run_id"):
        params.update(id=saved["result"]["wandb_run_id"], resume="allow")
    if lg.get("wandb_entity"):
        params["entity"] = lg["wandb_entity"]
    if lg.get("wandb_group"):
        params["group"] = lg["wandb_group"]
    return WandBLogger(project_name=lg["wandb_project"],
                       run_name=f"{cfg['name']}/{run.label}/seed{run.seed}",
                       config={**cfg, "seed": run.seed, "method": run.label},
                       dir=str(run.out_dir), save_code=False, params=params)


def build(run: Run, method: Method, info, progress: bool):
    """Step 2: model, optimizer, the runner's plugins, evaluator and loggers, the strategy.
    Returns (strategy, model, optimizer, step counter, saved checkpoint or None)."""
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics

    cfg, entry, label, seed = run.cfg, run.entry, run.label, run.seed
    opt_cfg = section_for(cfg, entry, "optimizer")
    st_cfg = section_for(cfg, entry, "strategy")
    device = resolve_device(st_cfg["device"])
    world = dist.world_size()
    if world > 1 and device.type == "cuda":  # one GPU per rank (torchrun's LOCAL_RANK)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(seed)  # model init must not depend on how much RNG the benchmark used
    model = build_model(section_for(cfg, entry, "model"), info)
    run.threads = apply_threads(st_cfg["threads"], model, info.input_shape,
                                st_cfg["train_mb_size"], device)
    optimizer = build_optimizer(opt_cfg, model)
    counter = _StepCounter()
    extra: List[SupervisedPlugin] = [counter, DivergenceGuard(
        label, seed, _divergence_hint(opt_cfg, method.parts))]
    if st_cfg["train_iterations"] is not None:
        extra.append(IterationBudgetPlugin(st_cfg["train_iterations"]))
    if opt_cfg.get("scheduler"):
        extra.append(build_scheduler(opt_cfg["scheduler"], optimizer))
        extra[-1].supports_distributed = True  # stepped per epoch, the same on every rank
    if st_cfg["augment"] == "crop_flip":
        extra.append(BatchAugmentPlugin())
    if progress and dist.is_main_process():
        extra.append(ProgressBarPlugin(f"{label} s{seed}"))
    if st_cfg["tensor_batches"] and world == 1:  # last: a plugin's own loader stays its own
        extra.append(TensorBatchesPlugin())
    first: List[SupervisedPlugin] = []
    if world > 1:  # docs/distributed.md: N ranks at batch B are one process at batch N*B
        unsafe = dist.unsafe_plugins(method.plugins + extra)
        if unsafe:
            raise ValueError(f"{label}: not distributed-safe under {world} processes: "
                             f"{'; '.join(unsafe)}")
        first.append(DataParallelPlugin())
    saved = open_checkpoint(run, method)
    metrics = [accuracy_metrics(experience=True), bwt_metrics(stream=True),
               forgetting_metrics(stream=True)]
    if info.scenario == "class":
        metrics.append(TaskILAccuracy())
    if cfg["loggers"]["wandb"] and dist.is_main_process():
        run.wandb_logger = make_wandb_logger(run, saved)
    evaluator = RunnerEvaluationPlugin(*metrics, loggers=[run.wandb_logger] if run.wandb_logger
                                 else [], strict_checks=False)
    strategy = method.template_cls(
        model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=st_cfg["train_mb_size"] * world, train_epochs=st_cfg["epochs"],
        eval_mb_size=st_cfg["eval_mb_size"], device=device,
        plugins=first + method.plugins + extra,
        evaluator=evaluator, eval_every=-1, **method.template_kwargs)
    return strategy, model, optimizer, counter, saved


def start_result(run: Run, info, device, saved: Optional[Dict[str, Any]]) -> None:
    """The results dict: a fresh one, or the stopped run's, carried on."""
    checkpoint_note = run.result["checkpoint"]
    if saved is not None:  # carry on: the results measured before the stop come from the file
        before = saved["result"].get("provenance")
        run.result = {**saved["result"], "status": "running", "config": run.cfg,
                      "device": str(device), "provenance": res.provenance()}
        # Each part's code: `provenance` is the last part's, and each resume records the code
        # that ran the experiences before it (provenance_check compares every part).
        run.result["resumed"] = run.result.get("resumed", []) + [
            {"after_experiences": saved["experiences_done"],
             "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "provenance_before": before}]
        if before and before.get("source_hash") != run.result["provenance"]["source_hash"]:
            warnings.warn(f"{run.label} seed {run.seed}: resuming after experience "
                          f"{saved['experiences_done']} with other code than the run started "
                          f"with (source {before.get('source_hash')} at commit "
                          f"{before.get('git_commit')}, now {run.result['provenance']['source_hash']}"
                          "); the result records both, and a row whose files differ between "
                          "its parts is stale. Delete the checkpoint to start afresh.")
    else:
        run.result = {
            "status": "running", "method": run.label, "seed": run.seed, "config": run.cfg,
            "method_entry": run.entry, "benchmark": info.describe(),
            "versions": res.package_versions(), "provenance": res.provenance(),
            "settings_fingerprint": settings_fingerprint(run.cfg, run.entry),
            "device": str(device), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "view": info.scenario,
            "matrix": [], "matrix_task_view": [] if info.scenario == "class" else None,
            "train_time_s_per_exp": [], "steps_per_exp": [], "peak_rss_mb": [],
            "peak_cuda_mb": [], "avalanche": {}, "run_fingerprint": run.run_id,
            "checkpoint": checkpoint_note, "resumed": []}
        if dist.world_size() > 1:
            run.result["distributed"] = {
                "world_size": dist.world_size(), "backend": torch.distributed.get_backend(),
                "global_train_mb_size": section_for(run.cfg, run.entry, "strategy")[
                    "train_mb_size"] * dist.world_size()}
    run.result["threads"] = run.threads
    if run.wandb_logger is not None:
        run.result["wandb_run_id"] = run.wandb_logger.init_kwargs.get("id")


def checkpoint(run: Run, strategy, model, optimizer, plugins, experiences_done: int) -> None:
    """Step 4: save what a resumed run needs; a failure turns checkpoints off, never the run."""
    if not dist.is_main_process():
        return  # rank 0 alone writes the checkpoint; every rank holds the same state
    t0 = time.perf_counter()
    try:
        if strategy.model is not model:
            raise RuntimeError("a plugin replaced strategy.model (e.g. the ensemble's "
                               "wrapper), which a rebuilt run would not reproduce")
        ckpt_io.save(run.ckpt_path, ckpt_io.capture(
            strategy=strategy, model=model, optimizer=optimizer, plugins=plugins,
            result=run.result, fingerprint_=run.run_id, experiences_done=experiences_done))
    except Exception as err:  # a checkpoint must never cost the run itself
        run.checkpointing = False
        run.result["checkpoint"] = f"off after experience {experiences_done}: " \
                                   f"{type(err).__name__}: {err}"
        warnings.warn(f"{run.label} seed {run.seed}: no checkpoint ({run.result['checkpoint']});"
                      " the run goes on without one")
        ckpt_io.remove(run.ckpt_path)
    else:
        run.result.setdefault("checkpoint_s_per_exp", []).append(time.perf_counter() - t0)


def resume(run: Run, method: Method, info, strategy, model, optimizer, counter,
           saved: Dict[str, Any]) -> int:
    """Restore a stopped run from its checkpoint; returns how many experiences it had done."""
    counter.steps = sum(run.result["steps_per_exp"])
    ckpt_io.restore(saved, strategy=strategy, model=model, optimizer=optimizer,
                    plugins=method.plugins, train_experiences=experiences(method, info),
                    eval_experiences=list(info.benchmark.test_stream))
    return saved["experiences_done"]


def experiences(method: Method, info) -> list:
    """What one ``strategy.train`` call gets: each experience, or the whole stream (joint)."""
    stream = info.benchmark.train_stream
    return [stream] if method.trains_on_stream else list(stream)


def train_and_evaluate(run: Run, method: Method, info, strategy, model, optimizer, counter,
                       done: int = 0) -> None:
    """Step 3: train on each experience from the ``done``-th, then evaluate on the whole test
    stream."""
    result, device = run.result, strategy.device
    test_stream = info.benchmark.test_stream
    T = info.n_experiences
    reset_opt = bool(section_for(run.cfg, run.entry, "strategy")["reset_optimizer"])
    todo = experiences(method, info)
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
        if run.checkpointing and i + 1 < len(todo):
            checkpoint(run, strategy, model, optimizer, method.plugins, i + 1)
        run.write()


def report(run: Run, info) -> None:
    """Step 5: the finished run's summary, its file, plots and final wandb log."""
    cfg, result, label, seed = run.cfg, run.result, run.label, run.seed
    result["summary"] = summarize(result["matrix"])
    result["summary_task_view"] = (summarize(result["matrix_task_view"])
                                   if result["matrix_task_view"] else None)
    result["train_time_s"] = float(sum(result["train_time_s_per_exp"]))
    steps = sum(result["steps_per_exp"])
    result["step_time_ms"] = 1000 * result["train_time_s"] / steps if steps else None
    result["status"] = "finished"
    run.write()
    if not dist.is_main_process():
        return
    if run.path != run.final_path and cfg["loggers"]["json"]:
        os.replace(run.path, run.final_path)  # the rerun finished: it takes the result's place
        run.path = run.final_path
    if run.checkpointing:
        ckpt_io.remove(run.ckpt_path)  # the finished JSON holds everything the run measured
    final_path = run.final_path
    if cfg["loggers"]["plots"]:
        title = f"{cfg['name']} {label} seed {seed} ({info.scenario}-IL)"
        result["plots"] = {
            "acc_matrix": str(res.plot_matrix(result["matrix"],
                                              final_path.with_suffix(".png"), title)),
            "acc_curve": str(res.plot_curves({label: result["summary"]["acc_curve"]},
                                             final_path.with_name(f"seed{seed}_acc_curve.png"),
                                             title))}
        run.write()
    if run.wandb_logger is not None:
        wb = run.wandb_logger.wandb
        log = {f"final/{k}": v for k, v in result["summary"].items()
               if isinstance(v, (int, float))}
        for name, png in (result.get("plots") or {}).items():
            log[f"final/{name}"] = wb.Image(png)
        wb.log(log)
        for k, v in log.items():
            if not k.endswith(("acc_matrix", "acc_curve")):
                wb.run.summary[k] = v


def as_divergence(err: BaseException, model) -> BaseException:
    """An error raised while the model's parameters are non-finite (a plugin's SVD or QP solver
    that refuses NaN inputs before the divergence guard sees the loss) is the divergence."""
    if not isinstance(err, Exception) or isinstance(err, DivergenceError):
        return err
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not bad:
        return err
    return DivergenceError(f"non-finite parameters ({', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''}) when the run stopped with "
                           f"{type(err).__name__}: {err}. Usual causes: a learning rate or a "
                           "loss coefficient too large for this model")


def report_stop(run: Run, err: BaseException) -> None:
    """Step 5, when the run stopped: record why, with what was measured before."""
    result, label, seed = run.result, run.label, run.seed
    result["status"] = ("diverged" if isinstance(err, DivergenceError) else
                        "preempted" if isinstance(err, Preempted) else
                        "interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
    result["error"] = f"{type(err).__name__}: {err}"
    if result["status"] == "failed":
        result["traceback"] = traceback.format_exc()
    if run.checkpointing and run.ckpt_path.exists():
        result["resume"] = (f"checkpoint after {len(result['steps_per_exp'])} experiences "
                            f"at {run.ckpt_path}: run the same command again to resume")
        if result["status"] == "failed":
            print(f"[cl-run] {label} seed {seed}: {result['resume']}", file=sys.stderr)
    try:
        run.write()
    except OSError as werr:  # e.g. the disk is full: say so, keep the original error
        print(f"[cl-run] {label} seed {seed}: could not record the result in {run.path}: "
              f"{werr}", file=sys.stderr)


def keep_diverged(run: Run) -> None:
    """A rerun that diverged is a complete result of today's code: it takes the place of the
    result it reran (finished or diverged), as a finished rerun does."""
    if (run.path != run.final_path and run.cfg["loggers"]["json"] and dist.is_main_process()
            and run.path.exists()):
        os.replace(run.path, run.final_path)
        run.path = run.final_path


def run_single(cfg: Dict[str, Any], entry: Dict[str, Any], seed: int, out_dir: Path,
               progress: bool = True) -> Dict[str, Any]:
    """Train and evaluate one method entry with one seed; returns the results dict.

    A run whose training diverges returns with status ``diverged`` (the rows measured before
    are kept). Files: ``plan.json_path`` (settings fingerprint in the folder). When that file
    already holds a complete result (finished or diverged), the new run writes
    ``seed<N>.rerun.json`` and replaces that file only once it is complete itself (finished or
    diverged): a failing or interrupted rerun never replaces a complete result."""
    run = Run(cfg=cfg, entry=entry, seed=seed, out_dir=out_dir, label=method_label(entry))
    bench_cfg = dict(cfg["benchmark"])
    bench_seed = bench_cfg.pop("seed")
    seed_everything(seed)
    info = build_benchmark(**bench_cfg, seed=seed if bench_seed is None else bench_seed)
    method = resolve(cfg, entry, info.scenario, run.label)
    strategy, model, optimizer, counter, saved = build(run, method, info, progress)
    start_result(run, info, strategy.device, saved)
    try:
        run.write()
        done = 0
        if saved is not None:
            done = resume(run, method, info, strategy, model, optimizer, counter, saved)
            saved = None  # free the memory it holds
        train_and_evaluate(run, method, info, strategy, model, optimizer, counter, done)
        report(run, info)
    except BaseException as err:  # record: what was measured stays on disk
        report_stop(run, as_divergence(err, model))
        if run.result["status"] != "diverged":
            raise
        keep_diverged(run)
    finally:
        if run.wandb_logger is not None:
            finish_wandb(run)
    return run.result


def finish_wandb(run: Run) -> None:
    """Close the run's wandb run; a pre-empted one is marked ``preempting`` first, so that a
    sweep hands its point to the next agent (which resumes from the checkpoint)."""
    wb = run.wandb_logger.wandb
    if run.result.get("status") == "preempted" and wb.run is not None:
        wb.run.mark_preempting()
    wb.finish(exit_code=0 if run.result.get("status") == "finished" else 1)


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
    if not dist.is_main_process():
        echo = lambda *args, **kwargs: None  # noqa: E731  (rank 0 alone reports)
    if os.environ.get("WANDB_SWEEP_ID"):
        cfg["loggers"]["wandb"] = True
    progress = cfg["loggers"]["progress"] if progress is None else progress
    out_dir = Path(cfg["output_dir"])
    runs: List[Dict[str, Any]] = []
    sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
    skip_finished = skip_finished or sweep  # a sweep point already done is read back
    for planned in plan.runs:
        label, seed = planned.label, planned.seed
        if skip_finished:  # rank 0 decides, so every rank skips the same runs
            done = dist.broadcast_object(_finished_result(cfg, planned.entry, seed, out_dir))
            if done is not None:
                echo(f"[cl-run] {label} seed {seed}: finished with the same settings, "
                     "skipped" + (" (a sweep point already run)" if sweep else
                                  " (--skip-finished)"))
                runs.append(done)
                continue
        claim = (RunClaim(json_path(out_dir, cfg, planned.entry, seed),
                          cfg["loggers"]["claim_stale_s"])
                 if cfg["loggers"]["json"] and dist.is_main_process() else None)
        holder = dist.broadcast_object(claim.acquire() if claim is not None else None)
        if holder is not None:
            echo(f"[cl-run] {label} seed {seed}: running elsewhere, skipped: {holder}")
            runs.append({"method": label, "seed": seed, "status": "running_elsewhere",
                         "holder": holder})
            continue
        try:
            done = (dist.broadcast_object(_finished_result(cfg, planned.entry, seed, out_dir))
                    if skip_finished else None)  # finished between the check and the claim
            if done is not None:
                echo(f"[cl-run] {label} seed {seed}: finished elsewhere meanwhile, skipped")
                runs.append(done)
                continue
            result = run_single(cfg, planned.entry, seed, out_dir, progress=progress)
        except (KeyboardInterrupt, SystemExit, DatasetNotFoundError):
            raise
        except Exception as err:
            if type(err).__name__ == "DataFileError":
                raise
            echo(f"[cl-run] {label} seed {seed} FAILED: {type(err).__name__}: {err}")
            result = {"method": label, "seed": seed, "status": "failed",
                      "error": f"{type(err).__name__}: {err}"}
        finally:
            if claim is not None:
                claim.release()
        if result["status"] == "diverged":
            echo(f"[cl-run] {label} seed {seed} DIVERGED: {result['error']}")
        runs.append(result)
    if dist.is_main_process():
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
                                  r.get("seed")) not in known
              and r["status"] != "running_elsewhere"]  # its holder writes it
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
