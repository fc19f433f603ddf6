"""Where a model keeps its per-task outputs, and how to read one task's outputs.

``head_layout(model, method)`` names one of three layouts:

- ``"single"``: no per-task head; every task shares the outputs (domain-, class-IL);
- ``"heads"``: a ``ClassifierNet`` (``model.backbone`` + ``model.head``) whose head is per-task
  (Avalanche's ``MultiHeadClassifier``, or a ``MaskedHead(mask="task")``): one backbone pass
  serves every task, ``model.head.forward_single_task(features, k)``;
- ``"tasks"``: any other Avalanche ``MultiTaskModule`` holding a per-task head: ``model(x, k)``.

``task_outputs`` returns ``k -> outputs of task k on x`` for the two per-task layouts, and
``task_output_pairs`` a model's and its teacher's outputs task by task (distillation per head).
``require_backbone_single_head`` is the check of methods that need ``model.backbone`` and one
head over all classes (iCaRL's feature extractor and class-IL head).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import nn


def per_task_head(model: nn.Module) -> Optional[nn.Module]:
    """The first module of ``model`` that keeps outputs per task label, or None."""
    from cl_plugins.models.heads import MaskedHead

    for m in model.modules():
        if isinstance(m, MultiHeadClassifier) or (isinstance(m, MaskedHead) and m.mask == "task"):
            return m
    return None


def head_layout(model: nn.Module, method: str) -> str:
    """``"single"``, ``"heads"`` or ``"tasks"`` (see the module docstring); ``ValueError`` naming
    ``method`` for a per-task head that cannot be reached with a task label."""
    head = per_task_head(model)
    if head is None:
        return "single"
    if getattr(model, "head", None) is head and hasattr(model, "backbone"):
        return "heads"
    if isinstance(model, MultiTaskModule):
        return "tasks"
    raise ValueError(f"{method} found a per-task head ({type(head).__name__}) inside a "
                     f"{type(model).__name__}, which is not an Avalanche MultiTaskModule, so "
                     "it cannot be called with an old task's label. Supported: ClassifierNet "
                     "(backbone + head) or any MultiTaskModule.")


def task_outputs(model: nn.Module, x: torch.Tensor, layout: str,
                 features: Optional[torch.Tensor] = None) -> Callable[[int], torch.Tensor]:
    """``k -> model's outputs of task k on x`` for a per-task ``layout``. ``"heads"`` runs the
    backbone now, once (unless ``features``, its output on ``x``, is given); ``"tasks"`` calls
    ``model(x, k)`` when asked for task k."""
    if layout == "heads":
        feats = features if features is not None else model.backbone(x)
        return lambda k: model.head.forward_single_task(feats, k)
    if layout == "tasks":
        return lambda k: model(x, k)
    raise ValueError(f"task_outputs needs a per-task layout ('heads' or 'tasks'); got {layout!r}")


def task_output_pairs(model: nn.Module, teacher: nn.Module, x: torch.Tensor, layout: str,
                      columns: Dict[int, List[int]], features: Optional[torch.Tensor] = None
                      ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(model's, teacher's)`` outputs of each task k in ``columns`` (sorted) on ``x``, cut to
    the columns ``columns[k]``; the teacher's without gradient. ``features``: ``model``'s
    backbone output on ``x`` (``"heads"``; computed if None)."""
    student_k = task_outputs(model, x, layout, features)
    with torch.no_grad():
        teacher_k = task_outputs(teacher, x, layout)
    for k in sorted(columns):
        cols = columns[k]
        s = student_k(k)[:, cols]
        with torch.no_grad():
            q = teacher_k(k)[:, cols]
        yield s, q


def require_backbone_single_head(model: nn.Module, method: str) -> None:
    """``ValueError`` naming ``method`` unless ``model.backbone`` is a module and ``model.head``
    is not a ``MultiHeadClassifier``."""
    if not isinstance(getattr(model, "backbone", None), nn.Module):
        raise ValueError(f"{method} needs a model with a feature extractor at model.backbone "
                         f"(cl_plugins' ClassifierNet); got {type(model).__name__} without one")
    if isinstance(getattr(model, "head", None), MultiHeadClassifier):
        raise ValueError(f"{method} is a class-IL method: it needs one head over all classes "
                         "(model.head 'masked' or 'linear'); found a MultiHeadClassifier at "
                         "model.head")

