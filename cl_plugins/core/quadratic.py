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

Per-step cost (``loss``): the terms are collapsed once per change into a single one,
``sum_k w_k (theta - a_k)^2 = W (theta - c)^2 + r`` element-wise, with ``W = sum_k w_k``,
``c = sum_k w_k a_k / W`` and the constant ``r = sum_k w_k (a_k - c)^2`` (an exact identity,
computed in float64), and evaluated by one autograd node (``QuadraticFn``) that produces the
value and its gradient ``2 coef W (theta - c)`` with fused multi-tensor kernels: the cost per step
does not grow with the number of tasks, and no graph is recorded through the penalty (about half
the element-wise passes of the plain expression). The identity needs ``W != 0`` wherever a term is
non-zero, which holds for non-negative importances (Fisher, MAS, SCP) and for a single term of
any sign (SI, RWalk keep one accumulated term); anything else (several terms with mixed signs)
is evaluated term by term (``reference_loss``). No double backward (create_graph=True) through
``loss``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from cl_plugins.core.checks import check_choice, check_non_negative, check_range
from cl_plugins.core.state import check_fields

Tensors = Dict[str, torch.Tensor]
MODES = ("separate", "accumulate", "online")


class QuadraticPenalty:
    def __init__(self, coef: float, mode: str = "separate", gamma: float = 1.0):
        self.coef = check_non_negative("coef", coef)
        self.mode = check_choice("mode", mode, MODES)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0)
        self.terms: List[Tuple[Tensors, Tensors]] = []  # (importance, anchor)
        self._collapsed = None  # (device, names, weight, center, const) for the current terms
        self._last_step = None  # (params, their _version, W (theta - c)) of the latest loss()

    def __len__(self) -> int:
        return len(self.terms)

    def add(self, importance: Tensors, anchor: Tensors) -> None:
        importance = {n: t.detach().clone() for n, t in importance.items()}
        anchor = {n: t.detach().clone() for n, t in anchor.items()}
        self._collapsed = self._last_step = None
        if self.mode == "separate" or not self.terms:
            self.terms.append((importance, anchor))
            return
        old, _ = self.terms[0]
        decay = self.gamma if self.mode == "online" else 1.0
        merged = {n: decay * old[n] + importance[n] for n in importance}
        self.terms[0] = (merged, anchor)

    def loss(self, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``coef * sum_k sum_i omega_k,i (theta_i - anchor_k,i)^2`` over ``params`` (by name),
        through the collapsed single term (module docstring)."""
        device = next(iter(params.values())).device
        cached = self._collapsed
        if cached is None or cached[0] != device or cached[1] != tuple(params):
            cached = self._collapsed = self._collapse(params, device)
        if cached[2] is None:  # not collapsible: several terms with mixed signs
            return self.reference_loss(params)
        _, names, weight, center, const = cached
        tensors = [params[n] for n in names]
        sink: list = []
        value = QuadraticFn.apply(self.coef, const, weight, center, sink, *tensors)
        self._last_step = (dict(zip(names, tensors)), [t._version for t in tensors],
                           dict(zip(names, sink[0])))
        return value

    @torch.no_grad()
    def subtract_gradient(self, params: Dict[str, torch.Tensor], out: Tensors) -> None:
        """``out[n] -= d loss / d params[n]`` for every name covered by the penalty.

        Right after ``loss`` at the same parameter values (SI's ``after_backward``), the
        ``W (theta - c)`` computed there is reused: one pass per tensor. The parameters' version
        counters tell whether they changed in between (an optimizer step)."""
        if not self.terms:
            return
        names = [n for n in params if n in self.terms[0][0]]
        last = self._last_step
        if last is not None and all(last[0].get(n) is params[n] for n in names) \
                and [last[0][n]._version for n in last[0]] == last[1]:
            for n in names:
                out[n].add_(last[2][n], alpha=-2.0 * self.coef)
            return
        for n, g in self.gradient({n: params[n] for n in names}).items():
            out[n].sub_(g)

    def _collapse(self, params: Dict[str, torch.Tensor], device):
        names = tuple(params)
        if len(self.terms) == 1:
            importance, anchor = self.terms[0]
            return (device, names, [importance[n].to(device, params[n].dtype) for n in names],
                    [anchor[n].to(device, params[n].dtype) for n in names], 0.0)
        if any(bool((imp[n] < 0).any()) for imp, _ in self.terms for n in names):
            return (device, names, None, None, None)
        weight, center, const = [], [], 0.0
        for n in names:
            f = torch.stack([imp[n].to(device, torch.float64) for imp, _ in self.terms])
            a = torch.stack([anc[n].to(device, torch.float64) for _, anc in self.terms])
            w = f.sum(0)
            c = torch.where(w > 0, (f * a).sum(0) / torch.where(w > 0, w, 1.0), a[-1])
            const += float((f * (a - c).pow(2)).sum())
            weight.append(w.to(params[n].dtype))
            center.append(c.to(params[n].dtype))
        return (device, names, weight, center, const)

    def reference_loss(self, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The same value as ``loss``, evaluated term by term with plain autograd."""
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

    def load_state_dict(self, state: Dict) -> None:
        check_fields("QuadraticPenalty", state,
                     {"coef": self.coef, "mode": self.mode, "gamma": self.gamma})
        self.terms = [(dict(imp), dict(anc)) for imp, anc in state["terms"]]
        self._collapsed = self._last_step = None

    def to(self, device) -> "QuadraticPenalty":
        self.terms = [({n: t.to(device) for n, t in imp.items()},
                       {n: t.to(device) for n, t in anc.items()}) for imp, anc in self.terms]
        self._collapsed = self._last_step = None
        return self


class QuadraticFn(torch.autograd.Function):
    """``coef * (sum_n <W_n (theta_n - c_n), theta_n - c_n> + const)`` as one autograd node.

    Value and gradient ``2 coef W (theta - c)`` come from fused multi-tensor (``torch._foreach_*``)
    kernels, without recording a graph through the penalty: a handful of kernel launches per step
    whatever the number of parameter tensors (GPU steps of small models are launch-bound).
    """

    @staticmethod
    def forward(ctx, coef, const, weight, center, sink, *params):
        diff = torch._foreach_sub(list(params), center)
        weighted = torch._foreach_mul(diff, weight)  # W (theta - c)
        value = torch.stack([torch.dot(w.reshape(-1), d.reshape(-1))
                             for w, d in zip(weighted, diff)]).sum()
        ctx.grads, ctx.scale = weighted, 2.0 * coef
        sink.append(weighted)  # read, never modified, by QuadraticPenalty.subtract_gradient
        return coef * (value + const)

    @staticmethod
    def backward(ctx, grad_output):
        grads = torch._foreach_mul(ctx.grads, grad_output * ctx.scale)
        return (None, None, None, None, None, *grads)


def penalties_of(strategy) -> List[QuadraticPenalty]:
    """Every QuadraticPenalty held by a plugin of ``strategy`` (attribute ``quadratic_penalty``)."""
    found = []
    for plugin in getattr(strategy, "plugins", []):
        pen = getattr(plugin, "quadratic_penalty", None)
        if isinstance(pen, QuadraticPenalty):
            found.append(pen)
    return found
