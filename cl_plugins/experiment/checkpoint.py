"""Per-run checkpoints: a run that stops (crash, pre-emption, Ctrl-C) resumes where it stopped.

After every training experience the runner writes ``seed<S>.ckpt.pt`` next to the run's JSON:
the model, the optimizer (keyed by parameter name, so grown heads find their state again), each
plugin's ``state_dict()`` (the contract in ARCHITECTURE.md: everything a method accumulates), the
evaluator's metric objects (Avalanche's stream BWT / forgetting keep the first accuracy of every
experience), the strategy clock, every RNG and the results measured so far. Starting the same run
again (same config, method entry and seed) loads it and trains only the experiences left; the
continuation is identical to a run that never stopped. The file is deleted when the run finishes.

Only runs whose every stateful part can be saved are checkpointed: the ``naive`` template plus
plugins that implement ``state_dict`` / ``load_state_dict``. Other templates (joint, cumulative,
Avalanche's DER / iCaRL) and Avalanche's own plugins keep state we cannot save faithfully, so for
them the JSON says ``"checkpoint": "off: <why>"`` rather than resuming into a different run. A
checkpoint that cannot be written (e.g. a plugin replaced ``strategy.model``) switches
checkpointing off with a warning; it never stops the run.

Why not Avalanche's ``avalanche.checkpointing.save_checkpoint``: it dill-pickles the whole
strategy, datasets and plugin hook closures included, and with avalanche-lib 0.6.0 and the
current typing_extensions it fails even for a plain ``Naive`` strategy (``PicklingError: Can't
pickle sentinel``, checked 2026-11-21). The plugins' own ``state_dict`` is the contract we test.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT_VERSION = 1
# Config keys that do not change what a run computes: changing them must not block a resume.
_NOT_COMPUTATION = {"output_dir", "loggers", "seeds", "methods"}


def checkpoint_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + ".ckpt.pt")


def fingerprint(cfg: Dict[str, Any], entry: Dict[str, Any], seed: int) -> str:
    """Hash of everything that determines the run's numbers: the config minus output settings
    and the data root."""
    kept = {k: v for k, v in cfg.items() if k not in _NOT_COMPUTATION}
    # The same files under another path are the same data.
    kept["benchmark"] = {k: v for k, v in cfg["benchmark"].items() if k != "data_root"}
    blob = json.dumps({"cfg": kept, "entry": entry, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def why_not_resumable(template_cls, template_kwargs: Dict[str, Any], plugins: List[Any],
                      trains_on_stream: bool) -> Optional[str]:
    """None when the run can be checkpointed, else the reason it cannot."""
    from avalanche.training import Naive

    if trains_on_stream:
        return "the template trains once on the whole stream"
    if template_cls is not Naive or template_kwargs:
        return (f"template {getattr(template_cls, '__name__', template_cls)} keeps state outside "
                "the plugins' state_dict")
    missing = [type(p).__name__ for p in plugins
               if not (hasattr(p, "state_dict") and hasattr(p, "load_state_dict"))]
    if missing:
        return f"{', '.join(missing)} has no state_dict / load_state_dict"
    return None


# ------------------------------------------------------------------------------ RNG

def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ optimizer

def optimizer_state_by_name(optimizer: torch.optim.Optimizer,
                            model: torch.nn.Module) -> Dict[str, Any]:
    """The optimizer's groups and per-parameter state, with parameters named rather than
    numbered: a fresh model's parameters are new objects and its heads may be added in another
    order, so positions would not line up."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in optimizer.param_groups:
        unknown = [tuple(p.shape) for p in g["params"] if id(p) not in name_of]
        if unknown:
            raise RuntimeError(f"cannot checkpoint the optimizer: it holds parameters of shapes "
                               f"{unknown} that are not in the model")
        groups.append({"names": [name_of[id(p)] for p in g["params"]],
                       "hyper": {k: v for k, v in g.items() if k != "params"}})
    state = {name_of[id(p)]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                              for k, v in s.items()}
             for p, s in optimizer.state.items() if id(p) in name_of}
    return {"groups": groups, "state": state}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                                 saved: Dict[str, Any]) -> None:
    named = dict(model.named_parameters())
    missing = [n for g in saved["groups"] for n in g["names"] if n not in named]
    if missing:
        raise RuntimeError(f"checkpointed optimizer refers to parameters {missing} that the "
                           "rebuilt model does not have")
    while len(optimizer.param_groups) < len(saved["groups"]):
        optimizer.param_groups.append({"params": []})
    del optimizer.param_groups[len(saved["groups"]):]
    for group, g in zip(optimizer.param_groups, saved["groups"]):
        group.clear()
        group.update(copy.deepcopy(g["hyper"]))
        group["params"] = [named[n] for n in g["names"]]
    optimizer.state.clear()
    for n, s in saved["state"].items():
        p = named[n]
        # Like Optimizer.load_state_dict: float state follows the parameter's dtype, except
        # Adam's scalar "step" counters.
        optimizer.state[p] = {k: (v.to(p.device, p.dtype if v.is_floating_point() and k != "step"
                                        else v.dtype) if torch.is_tensor(v) else v)
                              for k, v in s.items()}


# ------------------------------------------------------------------------------ save / load

def capture(*, strategy, model, optimizer, plugins, result: Dict[str, Any],
            fingerprint_: str, experiences_done: int) -> Dict[str, Any]:
    return {
        "format": FORMAT_VERSION, "fingerprint": fingerprint_,
        "experiences_done": experiences_done, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer_state_by_name(optimizer, model),
        "plugins": [p.state_dict() for p in plugins],
        "metrics": pickle.dumps(strategy.evaluator.metrics),
        "clock": dict(vars(strategy.clock)),
        "rng": rng_state(),
        "result": copy.deepcopy(result),
    }


def save(path: Path, ckpt: Dict[str, Any]) -> None:
    """Atomic: a crash while writing leaves the previous checkpoint in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: Path) -> Dict[str, Any]:
    # weights_only=False: the file holds plugin states (numpy, tuples) and pickled metric
    # objects; it is one this runner wrote next to the run's results.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format") != FORMAT_VERSION:
        raise RuntimeError(f"{path}: checkpoint format {ckpt.get('format')!r}, this runner "
                           f"reads {FORMAT_VERSION}")
    return ckpt


def restore(ckpt: Dict[str, Any], *, strategy, model, optimizer, plugins,
            train_experiences, eval_experiences) -> None:
    """Bring a freshly built strategy to the state saved after ``experiences_done`` experiences.
    Call right before training the next experience: the RNG state is set last."""
    from avalanche.models.utils import avalanche_model_adaptation

    # Grow dynamic modules (task heads) as the run grew them: Avalanche adapts the model to each
    # training experience and, in the evaluation after it, to every test experience.
    for exp in list(train_experiences)[:ckpt["experiences_done"]]:
        avalanche_model_adaptation(model, exp)
        for test_exp in eval_experiences:
            avalanche_model_adaptation(model, test_exp)
    model.load_state_dict(ckpt["model"])
    load_optimizer_state_by_name(optimizer, model, ckpt["optimizer"])
    # Avalanche maps parameters to optimizer slots through this dict; without it the first
    # train() call would rebuild the optimizer and drop the restored state.
    strategy.optimized_param_id = dict(model.named_parameters())
    if len(ckpt["plugins"]) != len(plugins):
        raise RuntimeError(f"checkpoint has {len(ckpt['plugins'])} plugin states, the run "
                           f"builds {len(plugins)} plugins")
    for plugin, state in zip(plugins, ckpt["plugins"]):
        plugin.load_state_dict(state)
    for fresh, saved in zip(strategy.evaluator.metrics, pickle.loads(ckpt["metrics"])):
        fresh.__dict__.update(saved.__dict__)
    vars(strategy.clock).update(ckpt["clock"])
    set_rng_state(ckpt["rng"])
