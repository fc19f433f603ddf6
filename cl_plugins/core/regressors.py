"""Regressors that bring a student's features to the shape of a teacher's, for feature losses.

FitNets (Romero et al., ICLR 2015, Sec. 2.2) compares a student's *guided* layer with a
teacher's *hint* layer through a regressor r(.; W_r) when the two differ in shape. Written once
here, built when the shapes are first seen (``RegressorSet``), so other feature-distillation
methods (PODNet-style ones, projection heads) can reuse it. Shapes are per sample (no batch
dimension):

- equal shapes: no regressor (the identity);
- vectors ``[D_s] -> [D_t]``: a linear layer;
- maps ``[C_s, H_s, W_s] -> [C_t, H_t, W_t]``: a convolution with C_t filters of size
  (H_s - H_t + 1) x (W_s - W_t + 1), no padding, stride 1, so that its output has the teacher's
  spatial size: FitNets' convolutional regressor (the official code,
  adri-romsor/FitNets ``scripts/fitnets_training.py``, ``generateConvRegressor``); a 1x1
  convolution when the spatial sizes agree. A student map smaller than the teacher's cannot be
  enlarged that way and raises ``ValueError`` (the official code raises too);
- anything else (a map against a vector, other ranks) raises ``ValueError`` naming the shapes.

``relu=True`` ends the regressor with a ReLU: FitNets gives r the non-linearity of the hint
layer, so that both sides are comparable. Weights use PyTorch's default initialisation.

A ``RegressorSet``'s parameters are not the model's: a plugin adds them to the strategy's
optimizer for one experience (``feature_distill.add_param_group``) and takes them out again at
its end (``remove_params``), so that the optimizer holds only the model's parameters between
experiences (where the runner checkpoints it by parameter name). Its state (shapes and weights)
goes into the plugin's state.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn


def build_regressor(student_shape: Sequence[int], teacher_shape: Sequence[int],
                    relu: bool = False, where: str = "regressor") -> Optional[nn.Module]:
    """The regressor from per-sample features of ``student_shape`` to ``teacher_shape`` (see
    the module docstring); None when they are equal."""
    s, t = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    if s == t:
        return None
    if len(s) == 1 and len(t) == 1:
        layer: nn.Module = nn.Linear(s[0], t[0])
    elif len(s) == 3 and len(t) == 3:
        (c_s, h_s, w_s), (c_t, h_t, w_t) = s, t
        if h_s < h_t or w_s < w_t:
            raise ValueError(f"{where}: the student's map {list(s)} is smaller than the teacher's "
                             f"{list(t)}; a convolutional regressor (no padding) can only shrink "
                             "it: tap a larger student layer or a smaller teacher layer")
        layer = nn.Conv2d(c_s, c_t, kernel_size=(h_s - h_t + 1, w_s - w_t + 1))
    else:
        raise ValueError(f"{where}: no regressor maps the student's features of shape {list(s)} "
                         f"to the teacher's {list(t)}: both must be vectors [D] or both maps "
                         "[C, H, W] (per sample)")
    return nn.Sequential(layer, nn.ReLU()) if relu else layer


def remove_params(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Take ``params`` out of ``optimizer`` (their groups, emptied groups, their state)."""
    ids = {id(p): p for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    for p in ids.values():
        optimizer.state.pop(p, None)
        p.grad = None


class RegressorSet:
    """Regressors by key (e.g. one per student/teacher layer pair), each built the first time
    ``apply`` sees its pair of shapes and checked against them afterwards."""

    def __init__(self, relu: bool = False, who: str = "regressor"):
        self.relu, self.who = bool(relu), who
        self.shapes: Dict[str, List[List[int]]] = {}  # key -> [student shape, teacher shape]
        self.modules: Dict[str, nn.Module] = {}  # keys whose shapes differ
        self.created = False  # a regressor was built since the flag was last cleared

    def apply(self, key: str, s: Tensor, t: Tensor) -> Tensor:
        """``s`` [N, ...] mapped to the shape of ``t`` (the identity for equal shapes)."""
        shapes = [list(s.shape[1:]), list(t.shape[1:])]
        if key not in self.shapes:
            reg = build_regressor(*shapes, relu=self.relu, where=f"{self.who} ({key})")
            self.shapes[key] = shapes
            if reg is not None:
                self.modules[key] = reg.to(device=s.device, dtype=s.dtype)
                self.created = True
        elif self.shapes[key] != shapes:
            raise ValueError(f"{self.who} ({key}): the regressor was built for student/teacher "
                             f"features of shapes {self.shapes[key]}; got {shapes}")
        reg = self.modules.get(key)
        return s if reg is None else reg(s)

    def parameters(self) -> List[nn.Parameter]:
        return [p for key in sorted(self.modules) for p in self.modules[key].parameters()]

    def to(self, device) -> "RegressorSet":
        for reg in self.modules.values():
            reg.to(device)
        return self

    def state(self) -> Dict:
        """Plain data: shapes and CPU weights (loads with ``torch.load(weights_only=True)``)."""
        return {"relu": self.relu, "shapes": {k: [list(a) for a in v] for k, v in
                                              self.shapes.items()},
                "weights": {k: {n: v.detach().cpu().clone() for n, v in m.state_dict().items()}
                            for k, m in self.modules.items()}}

    def load(self, state: Dict) -> None:
        if bool(state["relu"]) != self.relu:
            raise ValueError(f"{self.who}: the regressors were saved with relu={state['relu']}, "
                             f"this one has relu={self.relu}")
        self.shapes = {k: [list(a) for a in v] for k, v in state["shapes"].items()}
        self.modules, self.created = {}, False
        for key, (s, t) in self.shapes.items():
            reg = build_regressor(s, t, relu=self.relu, where=f"{self.who} ({key})")
            if reg is not None:
                reg.load_state_dict(state["weights"][key])
                self.modules[key] = reg
