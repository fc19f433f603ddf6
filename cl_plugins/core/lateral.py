"""Two columns of one MLP classifier joined by lateral adapters (Progress & Compress).

``TwoColumnNet(kb)`` holds the user's ``ClassifierNet`` as the *knowledge base* (KB, the same
object, so a reference to the user's model sees the KB), a hook-free copy of it as the *active
column* (AC), and one adapter per lateral connection. With ``column = "ac"`` its forward is the
AC's (below); with ``column = "kb"`` it is the KB's own forward, arguments passed through.

AC forward, layer i of the MLP backbone (i = 1 .. L, 1-based; h_0 = x flattened, the same input
for both columns) and the output layer o = L + 1:

    a_i = W_i h_{i-1} + b_i + alpha_i * U_i s(V_i hKB_{i-1} + c_i)        (i >= 2)
    a_1 = W_1 h_0 + b_1                                                   (no lateral: same input)
    h_i = s(a_i) [then dropout, as the backbone's own layers]
    logits = head_AC(h_L, t) + alpha_o * head_U(s(V_o hKB_L + c_o), t)

hKB_{i-1}: the KB's output of layer i - 1 (the input of its i-th Linear), computed without
gradient and in eval mode (the KB is frozen while the AC trains). s: the backbone's own
nonlinearity. V_i: Linear(width of hKB_{i-1} -> ``width``, with bias c_i); U_i: Linear(``width``
-> width of layer i, no bias); alpha_i: one learned scale per unit, initialised uniform in
[0, 0.1) (a small random value, as progressive networks' scales). The output layer's U is a
freshly initialised copy of the head (so a multi-head or masked head keeps its per-task or
per-class layout, its bias included); alpha_o is then one scalar, since heads of different tasks
may have different widths; V_o keeps the feature width (the head's input).

Supported models: ``ClassifierNet`` with an ``MLP`` backbone without batch norm (any activation,
dropout allowed) and an ``nn.Linear``, ``MaskedHead`` or ``MultiHeadClassifier`` head
(``check_two_column_model``). Convolutional backbones would need adapters per feature map and
are refused with a ValueError.

``reinit_(module, generator)`` re-initialises every parameter of ``module`` in place (PyTorch's
default initialisation of each Linear, alpha as above) from a seed drawn from ``generator``, on
the CPU, so the draw does not touch the global RNG and is the same on any device.
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import nn

from cl_plugins.core.snapshot import frozen_copy

COLUMNS = ("ac", "kb")
ALPHA_INIT = 0.1  # alpha ~ uniform[0, ALPHA_INIT)


def check_two_column_model(model: nn.Module, who: str) -> None:
    """Raise a ValueError naming ``who`` unless ``model`` is a supported MLP ClassifierNet."""
    from cl_plugins.models.classifier import ClassifierNet
    from cl_plugins.models.heads import MaskedHead
    from cl_plugins.models.mlp import MLP

    supported = ("supported: a ClassifierNet with an 'mlp' backbone (no batch norm) and a "
                 "linear, masked or multihead head")
    if not isinstance(model, ClassifierNet):
        raise ValueError(f"{who} needs a ClassifierNet; got {type(model).__name__} ({supported})")
    if type(model.backbone) is not MLP:
        raise ValueError(f"{who} supports MLP backbones only; got {type(model.backbone).__name__}"
                         f" ({supported})")
    if any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.backbone.modules()):
        raise ValueError(f"{who} does not support batch norm in the backbone (model.batch_norm="
                         f"true) ({supported})")
    if not isinstance(model.head, (nn.Linear, MaskedHead, MultiHeadClassifier)):
        raise ValueError(f"{who} does not support the head {type(model.head).__name__} "
                         f"({supported})")


def call_head(head: nn.Module, features: torch.Tensor, task_labels) -> torch.Tensor:
    """The head's logits for ``features``; a multi-task head gets the task labels."""
    if isinstance(head, MultiTaskModule):
        return head(features, task_labels)
    return head(features)


def linear_inputs(backbone: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The input of each Linear of an MLP backbone, then its output (the features)."""
    h = x.flatten(1)
    if h.shape[1] != backbone.input_size:
        raise ValueError(f"MLP expects {backbone.input_size} input features per sample; got "
                         f"{h.shape[1]} (input shape {tuple(x.shape)})")
    found = []
    for layer in backbone.layers:
        if isinstance(layer, nn.Linear):
            found.append(h)
        h = layer(h)
    return found + [h]


def _activation(backbone: nn.Module) -> nn.Module:
    for layer in backbone.layers:
        if not isinstance(layer, (nn.Linear, nn.Dropout)):
            return copy.deepcopy(layer)
    raise ValueError("the MLP backbone has no activation layer")


class LateralAdapter(nn.Module):
    """alpha * U s(V h + c): one lateral connection into a hidden layer's pre-activation."""

    def __init__(self, in_features: int, out_features: int, width: int, activation: nn.Module):
        super().__init__()
        self.V = nn.Linear(in_features, width)
        self.act = activation
        self.U = nn.Linear(width, out_features, bias=False)
        self.alpha = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:  # alpha only: V and U reset themselves
        with torch.no_grad():
            self.alpha.uniform_(0.0, ALPHA_INIT)

    def forward(self, h_kb: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.U(self.act(self.V(h_kb)))


class HeadAdapter(nn.Module):
    """alpha_o * head_U(s(V_o h + c_o), t): the lateral connection into the output layer."""

    def __init__(self, features: int, head: nn.Module, activation: nn.Module):
        super().__init__()
        self.V = nn.Linear(features, features)
        self.act = activation
        self.U = head
        self.alpha = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.uniform_(0.0, ALPHA_INIT)

    def forward(self, h_kb: torch.Tensor, task_labels) -> torch.Tensor:
        return self.alpha * call_head(self.U, self.act(self.V(h_kb)), task_labels)


def _trainable(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train()


class TwoColumnNet(MultiTaskModule):
    def __init__(self, kb: nn.Module, width: Optional[int] = None):
        super().__init__()
        check_two_column_model(kb, "TwoColumnNet")
        self.kb = kb
        self.ac = _trainable(frozen_copy(kb))  # hook-free: other plugins' taps stay on the KB
        act = _activation(kb.backbone)
        widths = [m for m in kb.backbone.layers if isinstance(m, nn.Linear)]
        device = next(kb.parameters()).device
        with torch.random.fork_rng(devices=[]):  # placeholders (reinit_ or a state follows):
            self.lateral = nn.ModuleList([  # building them leaves the global RNG untouched
                LateralAdapter(lin.in_features, lin.out_features, width or lin.in_features,
                               copy.deepcopy(act)) for lin in widths[1:]]).to(device)
            self.head_adapter = HeadAdapter(kb.backbone.out_features,
                                            _trainable(frozen_copy(kb.head)),
                                            copy.deepcopy(act)).to(device)
        self.column = "kb"

    def active_modules(self) -> List[nn.Module]:
        """The AC and its adapters: what the progress phase trains and a new task resets."""
        return [self.ac, self.lateral, self.head_adapter]

    def forward(self, x, *task_labels):
        if self.column == "kb":
            return self.kb(x, *task_labels)
        t = task_labels[0] if task_labels else None
        was_training = self.kb.training
        self.kb.eval()
        with torch.no_grad():
            kb_in = linear_inputs(self.kb.backbone, x)
        self.kb.train(was_training)
        h, i = x.flatten(1), 0
        for layer in self.ac.backbone.layers:
            if isinstance(layer, nn.Linear):
                out = layer(h)
                h = out + self.lateral[i - 1](kb_in[i]) if i > 0 else out  # Eq. 1
                i += 1
            else:
                h = layer(h)
        return call_head(self.ac.head, h, t) + self.head_adapter(kb_in[-1], t)

    def forward_single_task(self, x, task_label):
        return self.forward(x, task_label)


@torch.no_grad()
def reinit_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter of ``module`` in place, from a seed drawn from
    ``generator`` (module docstring); buffers (e.g. MaskedHead's seen classes) are kept."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    fresh = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for p, q in zip(module.parameters(), fresh.parameters()):
        p.copy_(q)
