"""Which parameters a method protects, and detached snapshots of them.

Task-specific output heads (Avalanche's ``MultiHeadClassifier`` heads, the networks of a
``TaskEnsemble``) are only ever trained on their own task: they get no gradient from later tasks,
so penalties, importances and projections concern the *shared* parameters only.
"""

from __future__ import annotations

from typing import Dict, Iterable, Set

import torch
from avalanche.models import MultiHeadClassifier
from torch import nn


def task_specific_prefixes(model: nn.Module) -> Set[str]:
    """Name prefixes (ending in '.') of every parameter that belongs to one task only."""
    from cl_plugins.models.ensemble import TaskEnsemble

    prefixes = set()
    for name, module in model.named_modules():
        base = f"{name}." if name else ""
        if isinstance(module, MultiHeadClassifier):
            prefixes.add(f"{base}classifiers.")
        elif isinstance(module, TaskEnsemble):
            prefixes.add(f"{base}members.")
    return prefixes


def shared_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Trainable parameters that every task uses (task-specific heads excluded), by name."""
    skip = tuple(task_specific_prefixes(model))
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and not (skip and n.startswith(skip))}


def snapshot(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached copies (same device and dtype), safe to keep while training continues."""
    return {n: p.detach().clone() for n, p in params.items()}


def check_same_keys(found: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raise when a restored state does not cover exactly the model's parameters."""
    found, expected = set(found), set(expected)
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ValueError(f"{what} does not match the model's shared parameters: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
