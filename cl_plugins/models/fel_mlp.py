"""MLP backbone with RGO's Feature Encoding Layer after every hidden activation.

Paper: H. Liu, H. Liu, "Continual Learning with Recursive Gradient Optimization", ICLR 2022.
Permuted / Rotated MNIST network of the RGO protocol (ANCHORS R2): 784-256-256-10 with biases,
``Linear -> ReLU -> FEL`` for each hidden layer; the 10-way output layer is the head that
``build_model`` adds (the reference code shares one 10-way output across tasks: ``head: linear``).

Layers: ``fcs[i]`` (``nn.Linear``), ReLU, ``fels[i]``
(:class:`~cl_plugins.models.fel.FeatureEncodingLayer`, width ``hidden[i]``). ``forward(x,
task_labels)`` returns ``[N, hidden[-1]]`` features; inside a ``ClassifierNet`` built by
``build_model`` the labels are routed to it (see ``fel.py``).

Options: ``fel`` (default True; False = identity encodings, "RGO without FEL", with the same
parameters and initialisation), ``fel_seed`` (None = drawn from torch's global RNG at the end of
construction, i.e. from the run seed the runner set; whatever ``fel`` is, so both variants get
identical weights), ``init`` (``"code"``: weights U(-1/sqrt(in), 1/sqrt(in)), biases 0, as the
reference code; ``"torch"``: PyTorch's defaults, whose weights have the same distribution and
whose biases are U(-1/sqrt(in), 1/sqrt(in))).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from cl_plugins.core.checks import check_bool, check_choice, check_int

from .fel import FeatureEncodingLayer
from .mlp import check_widths

INITS = ("code", "torch")


class FELMLP(nn.Module):
    def __init__(self, input_size: int, hidden: Sequence[int] = (256, 256), bias: bool = True,
                 fel: bool = True, fel_seed: Optional[int] = None, init: str = "code"):
        super().__init__()
        hidden = check_widths(input_size, hidden)
        check_bool("model.fel", fel)
        check_choice("model.init", init, INITS)
        if fel_seed is not None:
            check_int("model.fel_seed", fel_seed, 0)
        self.input_size = input_size
        widths = [input_size] + hidden
        self.fcs = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, hidden))
        if init == "code":
            with torch.no_grad():
                for fc in self.fcs:
                    bound = 1.0 / math.sqrt(fc.in_features)
                    fc.weight.uniform_(-bound, bound)
                    if fc.bias is not None:
                        fc.bias.zero_()
        if fel_seed is None:  # after the weights: fel=True/False nets get the same weights
            fel_seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
        self.fels = nn.ModuleList(FeatureEncodingLayer(h, fel_seed, fel) for h in hidden)
        self.fel = fel
        self.out_features = hidden[-1]
        self._task_labels = None

    def set_task_labels(self, task_labels) -> None:
        """Labels for the next forward calls that get none (set by the ClassifierNet hook)."""
        self._task_labels = task_labels

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.input_size:
            raise ValueError(f"FELMLP expects {self.input_size} input features per sample; "
                             f"got {x.shape[1]} (input shape {tuple(x.shape)})")
        labels = None
        if self.fel:
            labels = FeatureEncodingLayer.resolve(
                self._task_labels if task_labels is None else task_labels)
        for fc, fel in zip(self.fcs, self.fels):
            x = fel(torch.relu(fc(x)), labels)
        return x
