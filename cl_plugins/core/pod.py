"""Pooled outputs distillation (POD), PODNet's feature losses, as plain functions.

Douillard, Cord, Ollion, Robert & Valle, "PODNet: Pooled Outputs Distillation for Small-Tasks
Incremental Learning", ECCV 2020; official code github.com/arthurdouillard/
incremental_learning.pytorch (``inclearn/lib/losses/distillation.py``: ``pod`` with
``collapse_channels="spatial"``, ``embeddings_similarity``; ``inclearn/models/podnet.py``: the
adaptive factor). The student's features ``s`` carry the gradient; the teacher's ``t`` (the
frozen previous model, same inputs, row i = sample i) are detached here.

- ``pod_spatial_pool(h)``: for a map h in R^{C x H x W}, each activation squared (the code's
  ``pow(2)``), summed over the width and over the height, the two poolings concatenated,
  ``[N, C*H + C*W]``: Phi(h) = [ sum_w h^2_{c,:,w} || sum_h h^2_{c,h,:} ];
- ``pod_spatial(S, T)``: mean over the L stages and the N samples of
  || Phi(s_l) / ||Phi(s_l)|| - Phi(t_l) / ||Phi(t_l)|| ||_2 (l2-normalised per sample,
  Euclidean distance, not squared);
- ``pod_flat(s, t)``: mean over samples of 1 - cos(s_i, t_i) on the final embeddings (the
  code's ``F.cosine_embedding_loss`` with target 1);
- ``adaptive_factor(n_seen, n_new)``: sqrt(N / T), N the classes seen so far (the current
  task's included), T the current task's new classes: each POD weight lambda is multiplied by it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from cl_plugins.core.checks import check_int


def _check_pair(name: str, s: torch.Tensor, t: torch.Tensor, dims: int) -> None:
    if s.dim() != dims or s.shape != t.shape:
        what = "[N, C, H, W] maps" if dims == 4 else "[N, D] embeddings"
        raise ValueError(f"{name} needs {what} of equal shapes for the student and the teacher; "
                         f"got {tuple(s.shape)} and {tuple(t.shape)}")


def pod_spatial_pool(h: torch.Tensor) -> torch.Tensor:
    """[N, C*H + C*W]: the squared activations of ``h`` [N, C, H, W] summed over the width
    (C*H values, channel-major) then over the height (C*W values)."""
    sq = h.pow(2)
    return torch.cat([sq.sum(dim=3).flatten(1), sq.sum(dim=2).flatten(1)], dim=1)


def pod_spatial(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """POD-spatial over L stages (module docstring); 0 for L = 0 would hide a mistake: raises."""
    if len(student) != len(teacher) or not len(student):
        raise ValueError(f"pod_spatial needs one teacher map per student map (at least one); got "
                         f"{len(student)} and {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher):
        _check_pair("pod_spatial", s, t, 4)
        a = F.normalize(pod_spatial_pool(s), p=2, dim=1)
        b = F.normalize(pod_spatial_pool(t.detach()), p=2, dim=1)
        terms.append((a - b).norm(p=2, dim=1).mean())
    return torch.stack(terms).mean()


def pod_flat(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over samples of 1 - cos(s_i, t_i) (embeddings flattened per sample)."""
    s, t = s.flatten(1), t.detach().flatten(1)
    _check_pair("pod_flat", s, t, 2)
    return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()


def adaptive_factor(n_seen: int, n_new: int) -> float:
    """sqrt(n_seen / n_new): n_seen classes so far (the new ones included), n_new >= 1 new."""
    check_int("n_new", n_new, 1)
    check_int("n_seen", n_seen, n_new)
    return math.sqrt(n_seen / n_new)
