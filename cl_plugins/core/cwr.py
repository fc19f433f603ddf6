"""CWR / CWR* mechanics: consolidated output weights per class (AR1, a later ``cwr`` plugin).

The output layer is a Linear map with one weight row per class (``head_linear``). CWR keeps,
outside the model, consolidated weights ``cw`` ([C, D], one row per class) and, per class, the
number of training examples already consolidated ``past`` ([C], int64). For each experience with
``cur`` examples per class (``class_counts``; the classes of the experience are ``cur > 0``):

1. ``reset_head``: the training weights tw (the head's rows) are set to zero; with
   ``from_cw=True`` (CWR*), the rows of the experience's classes already consolidated are loaded
   from cw (CWR*: Lomonaco, Maltoni & Pellegrini, CVPR-W 2020, arXiv 1907.03799; the reset of
   ar1-pytorch ``utils.reset_weights`` and Avalanche's ``CWRStarPlugin.reset_weights``);
2. the model is trained (the plugin's business);
3. ``consolidate`` (all classes of the experience at once, no per-class loop):
   ``tw_j <- tw_j - mean(tw[current])`` (``mean_shift``: CWR+'s global average of the current
   classes' rows, one scalar), then
   ``cw_j <- (cw_j * wpast_j + tw_j) / (wpast_j + 1)`` and ``past_j <- past_j + cur_j``,
   with ``wpast_j = sqrt(past_j / cur_j)`` (``cwr_star_past_weight``; 0 for a new class, so
   cw_j = tw_j). Another weighting (CWR's own) is passed as ``past_weight``;
4. ``write``: every consolidated class's row is set to cw (inference uses cw).

The head's bias is not part of CWR*: both authors' codes give the output layer no trainable bias
(ar1-pytorch: ``bias=False``; the Caffe code of Pellegrini et al.: learning rate 0 for it).
``hold_bias_at_zero`` keeps a head's bias at 0 and out of training.

``ConsolidatedWeights`` holds cw, past and the current experience's counts, with ``begin`` (1),
``end`` (3 + 4), ``provisional`` (what cw would be if the experience ended now), ``show_provisional``
/ ``hide_provisional`` (an evaluation in the middle of training sees that cw) and a state that round-trips exactly. ``StepScale`` multiplies the
optimizer's step on some parameters (a learning-rate multiplier for the head: exact for SGD with
or without momentum and weight decay, and for Adam, whose steps are proportional to the learning
rate given their state).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from avalanche.models import MultiHeadClassifier
from torch import Tensor, nn

from cl_plugins.core.checks import check_non_negative

PastWeight = Callable[[Tensor, Tensor], Tensor]


def head_linear(model: nn.Module, who: str = "CWR") -> nn.Linear:
    """The single Linear output layer of a ``ClassifierNet`` (``model.head`` itself, or the
    ``linear`` of a ``MaskedHead``); ValueError for per-task or other heads."""
    head = getattr(model, "head", None)
    if isinstance(head, MultiHeadClassifier):
        raise ValueError(f"{who} keeps one consolidated weight row per class of a single output "
                         "layer; the model has per-task heads (MultiHeadClassifier, task-IL). Use "
                         "model.head='linear' or 'masked' in domain- or class-IL.")
    if isinstance(head, nn.Linear):
        return head
    if isinstance(getattr(head, "linear", None), nn.Linear):
        return head.linear
    raise ValueError(f"{who} needs a model with a Linear output layer (model.head an nn.Linear or "
                     f"a MaskedHead); got head {type(head).__name__}")


def class_counts(targets, n_classes: int) -> Tensor:
    """Examples per class ([n_classes], int64) of a sequence of labels."""
    y = torch.as_tensor(list(targets) if not isinstance(targets, Tensor) else targets,
                        dtype=torch.long).reshape(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes - 1}] (the head has {n_classes} "
                         f"outputs); got labels from {int(y.min())} to {int(y.max())}")
    return torch.bincount(y, minlength=n_classes)


def cwr_star_past_weight(past: Tensor, cur: Tensor) -> Tensor:
    """CWR*'s weight of the consolidated row: sqrt(past_j / cur_j) (float64; 0 where past_j=0)."""
    return torch.sqrt(past.double() / cur.double())


@torch.no_grad()
def reset_head(weight: Tensor, cw: Tensor, past: Tensor, cur: Tensor, from_cw: bool = True):
    """tw <- 0; with ``from_cw``, rows of current classes already consolidated <- cw."""
    weight.zero_()
    if from_cw:
        rows = ((cur > 0) & (past > 0)).nonzero().flatten().to(weight.device)
        weight[rows] = cw[rows].to(weight.device, weight.dtype)


@torch.no_grad()
def consolidate(cw: Tensor, past: Tensor, tw: Tensor, cur: Tensor, mean_shift: bool = True,
                past_weight: PastWeight = cwr_star_past_weight) -> Tuple[Tensor, Tensor]:
    """New (cw, past) after an experience with counts ``cur`` and trained rows ``tw`` (step 3 of
    the module docstring); the inputs are not modified. Computed in float64, cw returned in its
    own dtype."""
    rows = (cur > 0).nonzero().flatten()
    new_cw, new_past = cw.clone(), past.clone()
    if rows.numel() == 0:
        return new_cw, new_past
    t = tw.detach().to(cw.device, torch.float64)[rows]
    if mean_shift:
        t = t - t.mean()
    w = past_weight(past[rows], cur[rows]).to(cw.device).unsqueeze(1)
    new_cw[rows] = ((cw[rows].double() * w + t) / (w + 1)).to(cw.dtype)
    new_past[rows] += cur[rows]
    return new_cw, new_past


@torch.no_grad()
def hold_bias_at_zero(linear: nn.Linear) -> None:
    if linear.bias is not None:
        linear.bias.zero_()
        linear.bias.requires_grad_(False)


class ConsolidatedWeights:
    """cw, past and the current experience's counts for one Linear head (module docstring)."""

    def __init__(self, from_cw: bool = True, mean_shift: bool = True,
                 past_weight: PastWeight = cwr_star_past_weight):
        self.from_cw, self.mean_shift, self.past_weight = from_cw, mean_shift, past_weight
        self.cw: Optional[Tensor] = None  # [C, D], the head's dtype, on the CPU
        self.past: Optional[Tensor] = None  # [C] int64
        self.cur: Optional[Tensor] = None  # [C] int64 while an experience is being trained
        self._tw: Optional[Tensor] = None  # training rows kept while an evaluation shows cw

    def _allocate(self, linear: nn.Linear) -> None:
        if self.cw is None:
            self.cw = torch.zeros_like(linear.weight, device="cpu")
            self.past = torch.zeros(linear.out_features, dtype=torch.long)
        elif self.cw.shape != linear.weight.shape:
            raise ValueError(f"the consolidated weights have shape {tuple(self.cw.shape)}; the "
                             f"head's weight has {tuple(linear.weight.shape)}")

    def begin(self, linear: nn.Linear, cur: Tensor) -> None:
        """Start of an experience with ``cur`` examples per class: reset the head (step 1)."""
        self._allocate(linear)
        self.cur = cur.to(torch.long).cpu()
        reset_head(linear.weight, self.cw, self.past, self.cur, self.from_cw)

    def provisional(self, tw: Tensor) -> Tuple[Tensor, Tensor]:
        """(cw, past) if the current experience ended with head rows ``tw``."""
        return consolidate(self.cw, self.past, tw.cpu(), self.cur, self.mean_shift,
                           self.past_weight)

    def end(self, linear: nn.Linear) -> None:
        """End of the experience: consolidate (step 3) and put cw in the head (step 4)."""
        self.cw, self.past = self.provisional(linear.weight)
        self.cur = None
        self.write(linear)

    @torch.no_grad()
    def write(self, linear: nn.Linear, cw: Optional[Tensor] = None,
              past: Optional[Tensor] = None) -> None:
        """Rows of the consolidated classes (past > 0) <- cw; the other rows are kept."""
        cw = self.cw if cw is None else cw
        past = self.past if past is None else past
        rows = (past > 0).nonzero().flatten()
        linear.weight[rows.to(linear.weight.device)] = cw[rows].to(linear.weight.device,
                                                                 linear.weight.dtype)

    @torch.no_grad()
    def show_provisional(self, linear: nn.Linear) -> None:
        """An evaluation in the middle of an experience sees the cw that the experience would
        consolidate now; the training rows are kept for ``hide_provisional``. Between
        experiences (the head already holds cw) it does nothing."""
        if self.cur is None or self._tw is not None:
            return
        self._tw = linear.weight.detach().clone()
        self.write(linear, *self.provisional(self._tw))

    @torch.no_grad()
    def hide_provisional(self, linear: nn.Linear) -> None:
        """Put back the training rows kept by ``show_provisional``."""
        if self._tw is not None:
            linear.weight.copy_(self._tw)
            self._tw = None

    def state_dict(self) -> Dict:
        copy = (lambda t: None if t is None else t.clone())
        return {"cw": copy(self.cw), "past": copy(self.past), "cur": copy(self.cur)}

    def load_state_dict(self, state: Dict) -> None:
        copy = (lambda t: None if t is None else t.clone().cpu())
        self.cw, self.past, self.cur = copy(state["cw"]), copy(state["past"]), copy(state["cur"])
        self._tw = None


class StepScale:
    """p <- p_old + scale (p - p_old) around an optimizer step: the step on ``params`` times
    ``scale`` (a learning-rate multiplier for SGD, with or without momentum and weight decay)."""

    def __init__(self, scale: float, name: str = "scale"):
        self.scale = check_non_negative(name, scale)
        self._params: List[Tensor] = []
        self._old: List[Tensor] = []

    @torch.no_grad()
    def before_step(self, params: List[Tensor]) -> None:
        if self.scale != 1.0:
            self._params = [p for p in params if p.requires_grad]
            self._old = [p.detach().clone() for p in self._params]

    @torch.no_grad()
    def after_step(self) -> None:
        for p, old in zip(self._params, self._old):
            p.copy_(old + self.scale * (p - old))
        self._params, self._old = [], []
