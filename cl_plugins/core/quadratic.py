"""Quadratic parameter penalties: ``coef * sum_k sum_i omega_k,i (theta_i - anchor_k,i)^2``.

EWC (coef = lambda / 2, omega = Fisher), online EWC, SI (coef = c), MAS and RWalk all anchor
the shared parameters with per-parameter importances; only the importances differ. This module
holds the terms, evaluates the penalty and its gradient, and (de)serialises them.

Modes:
- ``separate``: one (importance, anchor) term per finished task (EWC as in Kirkpatrick et al.);
- ``accumulate``: one term; importances add up, the anchor is the latest parameters;
- ``online``: one term; importance <- gamma * importance + new, anchor = latest parameters
  (online EWC, Schwarz et al. 2018).

The penalty also exposes its analytic gradient, which SI uses to recover the task-loss gradient
from ``param.grad`` without a second backward pass.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from cl_plugins.core.checks import check_choice, check_non_negative, check_range

Tensors = Dict[str, torch.Tensor]
MODES = ("separate", "accumulate", "online")


class QuadraticPenalty:
    def __init__(self, coef: float, mode: str = "separate", gamma: float = 1.0):
        self.coef = check_non_negative("coef", coef)
        self.mode = check_choice("mode", mode, MODES)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0)
        self.terms: List[Tuple[Tensors, Tensors]] = []  # (importance, anchor)

    def __len__(self) -> int:
        return len(self.terms)

    def add(self, importance: Tensors, anchor: Tensors) -> None:
        importance = {n: t.detach().clone() for n, t in importance.items()}
        anchor = {n: t.detach().clone() for n, t in anchor.items()}
        if self.mode == "separate" or not self.terms:
            self.terms.append((importance, anchor))
            return
        old, _ = self.terms[0]
        decay = self.gamma if self.mode == "online" else 1.0
        merged = {n: decay * old[n] + importance[n] for n in importance}
        self.terms[0] = (merged, anchor)

    def loss(self, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(iter(params.values())).device
        total = torch.zeros((), device=device)
        for importance, anchor in self.terms:
            for n, p in params.items():
                total = total + (importance[n] * (p - anchor[n]).pow(2)).sum()
        return self.coef * total

    @torch.no_grad()
    def gradient(self, params: Dict[str, torch.Tensor]) -> Tensors:
        """d loss / d param, computed in closed form: 2 coef sum_k omega_k (theta - anchor_k)."""
        out = {n: torch.zeros_like(p) for n, p in params.items()}
        for importance, anchor in self.terms:
            for n, p in params.items():
                out[n].add_(importance[n] * (p - anchor[n]), alpha=2 * self.coef)
        return out

    def state_dict(self) -> Dict:
        return {"coef": self.coef, "mode": self.mode, "gamma": self.gamma,
                "terms": [({n: t.cpu() for n, t in imp.items()},
                           {n: t.cpu() for n, t in anc.items()}) for imp, anc in self.terms]}

    def load_state_dict(self, state: Dict, device: Optional[torch.device] = None) -> None:
        for key in ("coef", "mode", "gamma"):
            if state[key] != getattr(self, key):
                raise ValueError(f"saved penalty has {key}={state[key]!r}, this one "
                                 f"{getattr(self, key)!r}")
        self.terms = [({n: t.to(device) for n, t in imp.items()},
                       {n: t.to(device) for n, t in anc.items()})
                      for imp, anc in state["terms"]]

    def to(self, device) -> "QuadraticPenalty":
        self.terms = [({n: t.to(device) for n, t in imp.items()},
                       {n: t.to(device) for n, t in anc.items()}) for imp, anc in self.terms]
        return self


def penalties_of(strategy) -> List[QuadraticPenalty]:
    """Every QuadraticPenalty held by a plugin of ``strategy`` (attribute ``quadratic_penalty``)."""
    found = []
    for plugin in getattr(strategy, "plugins", []):
        pen = getattr(plugin, "quadratic_penalty", None)
        if isinstance(pen, QuadraticPenalty):
            found.append(pen)
    return found
