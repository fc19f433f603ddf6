"""Builders of one run's parts from the resolved config: RNG seeding, the device, the optimizer
(with named parameter groups) and the per-experience learning-rate schedule."""

from __future__ import annotations

import functools
import random
import re
from typing import Any, Dict

import numpy as np
import torch
from avalanche.core import SupervisedPlugin


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
    with reset_lr and reset_scheduler): e.g. Adam-NSCL's x0.5 at epochs 30 and 60 of every task;
    ``cosine``: torch's CosineAnnealingLR over ``t_max`` epochs (PODNet's, restarted per task)."""
    from avalanche.training.plugins import LRSchedulerPlugin

    if sched_cfg["name"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=sched_cfg["t_max"], eta_min=sched_cfg.get("eta_min", 0.0))
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(sched_cfg["milestones"]), gamma=sched_cfg.get("gamma", 0.1))
    return LRSchedulerPlugin(scheduler, reset_scheduler=True, reset_lr=True,
                             step_granularity="epoch")
