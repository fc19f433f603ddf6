"""The inputs and output gradients of chosen ``nn.Linear`` layers during one training step.

For a Linear layer ``h = x W^T + b`` called on ``n`` rows in a step, autograd's weight gradient
is ``Delta^T X`` (``X`` [n, in] the inputs, ``Delta`` [n, out] the gradients of the outputs) and
the bias gradient is the column sums of ``Delta``. A projection that needs only products of the
gradient with stored vectors can take them from ``(X, Delta)``, about ``n (in + out)`` numbers
instead of ``in x out`` (OGD's factored step, ``core.factored_directions``).

:class:`LinearStepCapture` registers a forward hook on each layer; between ``start()`` and
``stop()`` the hook keeps a reference to the input (autograd keeps it anyway) and puts a tensor
hook on the output that receives ``Delta`` in the backward pass. A layer called several times in a
step (a second forward for replayed rows) gives the rows of every call, concatenated. Forward
passes without gradient (evaluation, a teacher under ``no_grad``) are ignored.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn


class LinearStepCapture:
    """(input rows, output-gradient rows) of each attached layer in the current step."""

    def __init__(self):
        self._handles: list = []
        self._layers: List[nn.Linear] = []
        self._entries: List[list] = []
        self._on = False

    @property
    def layers(self) -> List[nn.Linear]:
        return list(self._layers)

    def attach(self, layers: List[nn.Linear]) -> None:
        """Hook ``layers`` (replacing any earlier ones)."""
        self.detach()
        self._layers = list(layers)
        self._entries = [[] for _ in self._layers]
        for i, layer in enumerate(self._layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._layers, self._entries, self._on = [], [], [], False

    def start(self) -> None:
        for e in self._entries:
            e.clear()
        self._on = bool(self._layers)

    def pause(self) -> None:
        """Ignore later forward passes; what was captured stays readable."""
        self._on = False

    def stop(self) -> None:
        self._on = False
        for e in self._entries:
            e.clear()

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not (self._on and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return
            entry = [inputs[0].detach(), None]
            self._entries[i].append(entry)

            def grad_hook(grad, entry=entry):
                entry[1] = grad.detach() if entry[1] is None else entry[1] + grad.detach()

            output.register_hook(grad_hook)
        return hook

    def calls(self, i: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The ``(input, output gradient)`` of each call of layer ``i`` in the step whose
        backward pass has run, as the layer saw them (not reshaped)."""
        return [(x, d) for x, d in self._entries[i] if d is not None]

    def pairs(self) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """``(X [n, in], Delta [n, out])`` per attached layer for the step so far, or None when
        some layer has no complete pair (not called with gradient, or its backward not run)."""
        out = []
        for i, (layer, entries) in enumerate(zip(self._layers, self._entries)):
            done = self.calls(i)
            if not done or len(done) != len(entries):
                return None
            xs = [x.reshape(-1, layer.in_features) for x, _ in done]
            ds = [d.reshape(-1, layer.out_features) for _, d in done]
            out.append((xs[0], ds[0]) if len(done) == 1 else (torch.cat(xs), torch.cat(ds)))
        return out
