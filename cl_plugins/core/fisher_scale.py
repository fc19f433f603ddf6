"""Per-task normalisation of a diagonal Fisher before it joins a running sum (online EWC).

Schwarz et al. 2018 (Progress & Compress, Sec. 4, last paragraph) observe that the Fishers of
different tasks differ in overall scale (a more deterministic model has a larger one), and
rescale each task's Fisher F_k before the update F* <- gamma F* + F_k (their Eq. 9), so that every
task weighs in by the *relative* importance of the parameters. The paper does not say which norm;
the choices here (``fisher_norm``) are:

- ``"none"``: F_k unchanged;
- ``"mean"``: F_k / mean(F_k), the mean over every entry of every tensor (all shared parameters
  together, one scalar per task), so the normalised Fisher has mean entry 1;
- ``"max"``: F_k / max(F_k), the largest entry over all tensors, so its largest entry is 1.

A Fisher whose entries are all zero (nothing in the task moves the model's log-likelihood: a
model that predicts with certainty, or parameters no sample reaches) has no scale to divide by:
it is returned unchanged (all zeros), so the task adds nothing to F*, instead of 0/0 = NaN.
Computed in float64 whatever the input dtype; the tensors keep their dtype and device.
"""

from __future__ import annotations

from typing import Dict

import torch

from cl_plugins.core.checks import check_choice

FISHER_NORMS = ("none", "mean", "max")
Tensors = Dict[str, torch.Tensor]


def fisher_scale(fisher: Tensors, norm: str) -> float:
    """The scalar each entry of ``fisher`` is divided by (1.0 for ``"none"`` or a zero Fisher)."""
    check_choice("fisher_norm", norm, FISHER_NORMS)
    if norm == "none" or not fisher:
        return 1.0
    flat = [f.detach().reshape(-1).to(torch.float64) for f in fisher.values()]
    if norm == "mean":
        scale = sum(float(f.sum()) for f in flat) / sum(f.numel() for f in flat)
    else:
        scale = max((float(f.max()) for f in flat if f.numel()), default=0.0)
    return scale if scale > 0 else 1.0


def normalize_fisher(fisher: Tensors, norm: str) -> Tensors:
    """``fisher`` (name -> diagonal Fisher tensor) divided by its ``norm`` (module docstring)."""
    scale = fisher_scale(fisher, norm)
    if scale == 1.0:
        return dict(fisher)
    return {n: (f.to(torch.float64) / scale).to(f.dtype) for n, f in fisher.items()}
