"""Gradient projection of Linear layers computed from the step's inputs (GPM, Adam-NSCL's SGD
path), falling back to projecting the whole gradient.

For a Linear layer the data part of the weight gradient is ``D^T X`` (``X`` the layer's n input
rows of this step, ``D`` the gradients of its outputs), so its projection is ``D^T P(X)`` with
``P(X) = X - X M M^T`` or ``s X B B^T`` (a :class:`~cl_plugins.core.subspace.FanInProjector`
applied to rows): about ``4 n d (out + k')`` multiply-adds instead of ``4 out d k'`` for the
gradient itself, far cheaper with small batches (P1: n = 10, out = 100, d = 784). A forward hook
keeps a reference to ``X`` (autograd keeps it anyway) and a tensor hook on the output receives
``D``, only while a step is being captured. Whatever else is in the gradient (another plugin's
penalty gradient, forward passes outside the step) is ``G - D^T X``; it is projected the usual
way unless its norm is within the rounding bound ``n eps ||D||_F ||X||_F``. The capture itself is
:class:`~cl_plugins.core.step_capture.LinearStepCapture`. Conv layers
(n = batch x positions, usually > out) always take the whole-gradient path, and so does every
layer under torch.distributed (the averaged gradient is not this rank's D^T X).

Projecting the gradient projects the step only for plain SGD (:func:`plain_sgd`). Plugins that
use the projector inherit :class:`StepCaptureHooks`, which opens and closes the capture window
of every training step.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .distributed import is_distributed
from .step_capture import LinearStepCapture
from .subspace import FanInProjector


class InputSideGradientProjector:
    """Replaces each protected layer's gradient ``G`` (``[out, d]``, bias appended as the last
    column when ``with_bias``) by ``P(G)`` in :meth:`project`, between backward and the step."""

    def __init__(self):
        self._capture = LinearStepCapture()
        self._index: Dict[str, int] = {}  # hooked layer name -> its index in the capture

    @property
    def hooked(self) -> List[str]:
        """The names of the layers whose step inputs are captured, in the capture's order."""
        return list(self._index)

    @property
    def capture(self) -> LinearStepCapture:
        return self._capture

    def attach(self, layers: Dict[str, nn.Module], projectors: Dict[str, FanInProjector],
               input_side: bool = True) -> None:
        """Hook the Linear layers that have a projector (nothing to hook for the others)."""
        self.detach()
        if not input_side:
            return
        names = [name for name in projectors if isinstance(layers[name], nn.Linear)]
        self._capture.attach([layers[name] for name in names])
        self._index = {name: i for i, name in enumerate(names)}

    def detach(self) -> None:
        self._capture.detach()
        self._index = {}

    def start_step(self) -> None:
        self._capture.start()

    def end_step(self) -> None:
        self._capture.stop()

    @torch.no_grad()
    def project(self, layers: Dict[str, nn.Module], projectors: Dict[str, FanInProjector],
                with_bias: bool) -> None:
        """``grad <- P(grad)`` for every layer with a projector and a gradient."""
        self._capture.pause()
        for name, proj in projectors.items():
            module = layers[name]
            w = module.weight
            if w.grad is None:
                continue
            b = module.bias if with_bias else None
            if b is not None:
                gb = b.grad if b.grad is not None else torch.zeros_like(b)
                g = torch.cat([w.grad.reshape(w.shape[0], -1), gb.reshape(-1, 1)], dim=1)
            else:
                g = w.grad.reshape(w.shape[0], -1)
            new = None
            # under torch.distributed the gradient is the ranks' average while the captured
            # rows are this rank's: the whole-gradient path keeps every rank's result equal
            if name in self._index and not is_distributed():
                new = self._from_inputs(module, proj, self._capture.calls(self._index[name]), g)
            if new is None:
                new = proj.apply(g)
            if b is not None:
                w.grad.copy_(new[:, :-1].reshape(w.shape))
                if b.grad is not None:
                    b.grad.copy_(new[:, -1].reshape(b.shape))
                else:
                    b.grad = new[:, -1].reshape(b.shape).clone()
            else:
                w.grad.copy_(new.reshape(w.shape))
        self._capture.stop()  # used: nothing is kept for a later call

    @staticmethod
    def _from_inputs(module, proj: FanInProjector, pairs: List[tuple],
                     grad: torch.Tensor) -> Optional[torch.Tensor]:
        """The projected gradient from captured (input, output-gradient) pairs, or None when
        the whole-gradient path is cheaper."""
        if not pairs or proj.factor_rank == 0:
            return None
        out, k = grad.shape[0], proj.factor_rank
        n = sum(d.numel() // out for _, d in pairs)
        if n * (out + k) >= out * k:
            return None
        if len(pairs) == 1:  # the usual case: one forward pass per step
            x, dlt = pairs[0][0].reshape(-1, module.in_features), pairs[0][1].reshape(-1, out)
        else:
            x = torch.cat([x.reshape(-1, module.in_features) for x, _ in pairs])
            dlt = torch.cat([d.reshape(-1, out) for _, d in pairs])
        x, dlt = x.to(grad.dtype), dlt.to(grad.dtype)
        if grad.shape[1] == module.in_features + 1:  # bias appended: constant-1 column
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        dt = dlt.T
        rest = grad - dt @ x  # autograd computes the same product: usually exactly 0
        new = dt @ proj.apply(x)
        residual = float(rest.norm())
        if residual > 0.0:
            # |fl(D^T X) - D^T X| <= n eps |D|^T |X| (Frobenius bound): beyond it, rest is real
            tol = n * torch.finfo(grad.dtype).eps * float(dlt.norm()) * float(x.norm())
            if residual > tol:
                new += proj.apply(rest)
        return new


class StepCaptureHooks:
    """Plugin mixin: the capture window of ``self._grad_projector`` (an
    :class:`InputSideGradientProjector`) spans each training iteration."""

    def before_training_iteration(self, strategy, **kwargs):
        self._grad_projector.start_step()

    def after_training_iteration(self, strategy, **kwargs):
        self._grad_projector.end_step()


def groups_holding(optimizer, params: Iterable[torch.Tensor]) -> List[dict]:
    """The optimizer's parameter groups that contain any of ``params``."""
    ids = {id(p) for p in params}
    return [g for g in getattr(optimizer, "param_groups", [])
            if any(id(p) in ids for p in g["params"])]


def plain_sgd(optimizer, groups: Optional[List[dict]] = None) -> bool:
    """Whether ``optimizer`` is SGD without momentum or weight decay in ``groups`` (default: all
    its groups), i.e. whether its step is ``-lr * grad`` there."""
    groups = getattr(optimizer, "param_groups", []) if groups is None else groups
    return isinstance(optimizer, torch.optim.SGD) and all(
        not g.get("momentum", 0) and not g.get("weight_decay", 0) for g in groups)


def set_group_lr(optimizer, model: nn.Module, params: List[torch.Tensor], lr: float,
                 who: str) -> None:
    """Set the learning rate of every optimizer group holding any of ``params`` (Adam-NSCL's
    ``lr_after_first``, named in the message); warn (naming ``who``) about the other parameters
    of those groups, whose rate changes too."""
    ids = {id(p) for p in params}
    others = set()
    for group in groups_holding(optimizer, params):
        group["lr"] = lr
        others |= {id(p) for p in group["params"] if id(p) not in ids}
    if others:
        names = [n for n, p in model.named_parameters() if id(p) in others]
        warnings.warn(f"{who}: lr_after_first={lr} also applies to {len(others)} unprojected "
                      "parameter tensor(s) that share an optimizer parameter group with "
                      f"projected layers ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
                      "); put them in their own group (optimizer.param_groups) to keep their "
                      "learning rate")
