"""Per-run checkpoints: a run that stops (crash, pre-emption, Ctrl-C) resumes where it stopped.

After every training experience the runner writes ``seed<S>.ckpt.pt`` next to the run's JSON:
the model, the optimizer (keyed by parameter name, so grown heads find their state again), each
plugin's ``state_dict()`` (the contract in ARCHITECTURE.md: everything a method accumulates), the
evaluator's metric objects (Avalanche's stream BWT / forgetting keep the first accuracy of every
experience), the strategy clock, every RNG and the results measured so far. Starting the same run
again (same config, method entry and seed) loads it and trains only the experiences left; the
continuation is identical to a run that never stopped. The files go (``remove``) once it finishes.

Only runs whose every stateful part can be saved are checkpointed: the ``naive`` template plus
plugins that implement ``state_dict`` / ``load_state_dict``. Other templates (joint, cumulative,
Avalanche's DER / iCaRL) and Avalanche's own plugins keep state we cannot save faithfully, so for
them the JSON says ``"checkpoint": "off: <why>"`` rather than resuming into a different run. A
checkpoint that cannot be written (e.g. a plugin replaced ``strategy.model``) switches
checkpointing off with a warning; it never stops the run.

Files and the recovery policy. ``save`` writes a temporary file, flushes it to disk, renames the
current ``seed<S>.ckpt.pt`` to ``seed<S>.ckpt.prev.pt`` (the previous good checkpoint) and renames
the new file in: a crash at any moment leaves at least one complete checkpoint. ``load_latest``
tries the main file, then the ``.prev`` one; a file that cannot be used (truncated, corrupt, of
another format, or holding anything but plain data) is renamed aside to ``<file>.corrupt``
(``<file>.<n>.corrupt`` if that name is taken; never deleted) and the reason goes into the
warnings it returns. When neither file loads it returns None and the run starts over (the caller
says so). ``remove`` deletes the checkpoint and its ``.prev`` once the run has finished; files
moved aside stay for inspection.

Safety: a checkpoint is loaded with ``torch.load(weights_only=True)`` only, never with full
pickle, so a checkpoint received from someone else cannot run code. It holds tensors and plain
data only: the metric objects' state goes through :mod:`cl_plugins.experiment.state_io` (restored
into the freshly built metric objects), the RNG states are lists and tensors, and every plugin's
``state_dict()`` is plain data (tested for every registered plugin). ``save`` refuses anything
else, naming the value, so an unloadable file is never written. Format 1 (pickled metrics and
numpy RNG state) is not read.

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
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .state_io import check_plain, restore_into, to_plain

FORMAT_VERSION = 2  # 2: plain data only, loaded with weights_only=True (1: pickled metrics)
# Config keys that do not change what a run computes: changing them must not block a resume.
_NOT_COMPUTATION = {"output_dir", "loggers", "seeds", "methods"}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def checkpoint_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + ".ckpt.pt")


def previous_path(path: Path) -> Path:
    """``seed0.ckpt.pt`` -> ``seed0.ckpt.prev.pt``: the checkpoint written before the latest."""
    path = Path(path)
    stem = path.name[:-3] if path.name.endswith(".pt") else path.name
    return path.with_name(stem + ".prev.pt")


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
    """Every global RNG as plain data (lists, ints, floats, tensors)."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
            "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
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
        "metrics": to_plain(list(strategy.evaluator.metrics), "metrics"),
        "clock": dict(vars(strategy.clock)),
        "rng": rng_state(),
        "result": copy.deepcopy(result),
    }


def save(path: Path, ckpt: Dict[str, Any]) -> None:
    """Atomic: the new file is complete on disk before it replaces the checkpoint, which is kept
    as ``.prev``. Refuses (``UnrepresentableState``) a checkpoint that is not plain data."""
    path = Path(path)
    check_plain(ckpt)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: Path) -> Dict[str, Any]:
    """The checkpoint at ``path``, read with ``weights_only=True``; :class:`CheckpointError`
    (naming the file and the reason) if it is truncated, corrupt, unsafe or of another format."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing or unreadable file: not the content's fault
        raise
    except Exception as err:  # zip / unpickling errors name neither the file nor the cause
        raise CheckpointError(f"{path}: cannot read the checkpoint: {_reason(err)}") from err
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this runner reads "
                              f"{FORMAT_VERSION}")
    return ckpt


def _reason(err: Exception) -> str:
    text = str(err)
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text, re.M)
    if refused:
        return ("it holds pickled objects, not only tensors and plain data (an older format or "
                f"not written by this runner; it is never unpickled): {refused.group(1).strip()}")
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else "no data"
    return f"truncated or corrupt ({type(err).__name__}: {first})"


def _move_aside(path: Path) -> Path:
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{n}.corrupt")
    os.replace(path, target)
    return target


def load_latest(path: Path) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """The newest usable checkpoint: ``path``, else its ``.prev``; with the warnings to show.
    Unusable files are renamed aside to ``.corrupt``; (None, warnings) when neither loads."""
    path, said = Path(path), []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            ckpt = load(candidate)
        except CheckpointError as err:
            said.append(f"{err}; moved aside to {_move_aside(candidate)}")
            continue
        if candidate != path:
            said.append(f"resuming from the previous checkpoint {candidate} (after "
                        f"{ckpt.get('experiences_done')} experiences)")
        return ckpt, said
    if said:
        said.append(f"no usable checkpoint for {path}: the run starts over")
    return None, said


def remove(path: Path) -> None:
    """Delete the checkpoint and its ``.prev`` (files moved aside as corrupt stay)."""
    for p in (Path(path), previous_path(path)):
        p.unlink(missing_ok=True)


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
    metrics = list(strategy.evaluator.metrics)
    if len(ckpt["metrics"]) != len(metrics):
        raise RuntimeError(f"checkpoint has {len(ckpt['metrics'])} metric states, the run "
                           f"builds {len(metrics)} metrics")
    for i, (fresh, saved) in enumerate(zip(metrics, ckpt["metrics"])):
        restore_into(fresh, saved, f"metrics[{i}]")
    vars(strategy.clock).update(ckpt["clock"])
    set_rng_state(ckpt["rng"])
