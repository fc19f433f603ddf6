"""CWR and CWR*: per-class consolidated weights of the output layer, temporary weights trained.

Name: ``cwr``. Scenarios: domain-IL (CORe50's NI: known classes come back) and class-IL (NC,
NIC). Task labels: not used. Task-IL is refused: per-task heads (``MultiHeadClassifier``) have
no single row per class to consolidate (``core.cwr.head_linear`` raises, naming them), and CWR
is a single-incremental-task method.

Papers: CWR, "copy weights with re-init": V. Lomonaco and D. Maltoni, "CORe50: a New Dataset and
Benchmark for Continuous Object Recognition", CoRL 2017 (PMLR 78, arXiv 1705.03550); CWR+ (zero
init, mean shift): D. Maltoni and V. Lomonaco, Neural Networks 116, 2019 (arXiv 1806.08568);
CWR*: V. Lomonaco, D. Maltoni and L. Pellegrini, CVPR-W 2020 (arXiv 1907.03799). The papers'
text could not be read here; the rules below come from the authors' codes, read for facts:
vlomonaco/core50 ``core/inc_finetuning.py`` (strategy ``copyfc8_with_reinit``, the 2017 CWR),
lrzpellegrini/Latent-Replay ``Project Source/cwr.py`` and ``inc_training_Core50.py`` (CWR*), and
Avalanche 0.6 ``training/plugins/cwr_star.py``. Notes, sources, measurements:
docs/methods/cwr.md. Mechanics: ``core.cwr`` (shared with ``ar1``), ``core.freeze``.

Per experience, with cur_j examples of class j (its classes: cur_j > 0), tw the head's rows:

    variant "cwr" (2017 code):
      (R)  tw <- tw0                       # every row back to the head's weights before exp. 1
      (C)  cw_j <- (cw_j n_j + tw_j) / (n_j + 1);  n_j += 1     # n_j: earlier experiences with j
    variant "cwr_star":
      (R*) tw <- 0;  tw_j <- cw_j for current classes already consolidated
      (C*) tw_j <- tw_j - mean(tw[current]);  w_j = sqrt(past_j / cur_j)
           cw_j <- (cw_j w_j + tw_j) / (w_j + 1);  past_j += cur_j
    both:
      (F)  from the second experience on, only the head trains (``freeze_below_head``)
      (I)  after the experience, the rows of every consolidated class <- cw (inference)

A new class has n_j = 0 (w_j = 0): cw_j = tw_j. ``core.cwr.ConsolidatedWeights`` does (R*),
(C*) and (I) (vectorised over classes, float64); for "cwr" it counts one per present class
(cur_j = 1, so past_j = n_j) with the weight ``cwr_past_weight`` and no mean shift.

Hooks: ``before_training_exp`` (reset, bias held at 0, (F)), ``after_training_exp``
(consolidation, (I)), ``before_eval`` / ``after_eval`` (an evaluation in the middle of an
experience sees the cw the experience would consolidate now; tw is put back after).

Hyper-parameters:

- ``variant``: ``"cwr_star"`` (default) or ``"cwr"``.
- ``freeze_below_head``: True (default): from the second experience on, every parameter outside
  the head's Linear is frozen and those modules run in eval mode (``core.freeze``): Avalanche's
  ``freeze_remaining_model=True`` (from its second experience) and the Latent-Replay code, which
  sets the learning rate of every layer below the CWR layer to 0 from the second batch
  (``zeros_non_cwr_layers_lr``). False: the lower layers keep training (CWR on a free backbone).

Deviations and choices:

- The head's bias is held at 0 and out of training in both variants (``hold_bias_at_zero``):
  CWR*'s codes train no bias (Latent-Replay: ``zeros_cwr_layer_bias_lr``). The 2017 code
  re-initialises and averages the biases like the weights; here "cwr" does not (a deviation).
- Not done: the 2017 code's ``weights_mult`` (3 in its configs), which multiplies the first
  batch's consolidated rows by 3 when the second batch is consolidated.
- (R) uses the head's own initial weights, kept by the plugin (the 2017 code also restores the
  initial values, saved at its first batch), not a fresh random draw.
- Counts are the experience's labels (``dataset.targets``), once per experience.
- Avalanche's ``CWRStarPlugin`` (registered as ``avalanche_cwr_star``) trains the head's bias
  and never resets or consolidates it, and computes in float32 with numpy; with a bias-free head
  the two give the same cw up to float32 rounding (tests/architectural/test_cwr.py).

Growth: none per task. ``cost_per_task`` reports the constant store under task label 0: cw and
past (plus tw0 for "cwr"), 4 bytes per float32 element and 8 per int64 count.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import check_bool, check_choice
from cl_plugins.core.cwr import ConsolidatedWeights, class_counts, head_linear, hold_bias_at_zero
from cl_plugins.core.freeze import freeze_all_but
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.weight_override import tensor_cost

VARIANTS = ("cwr_star", "cwr")


def cwr_past_weight(past: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """CWR's (2017 code) weight of the consolidated row: past_j / cur_j, which is n_j (the
    earlier experiences holding class j) when the counts are one per present class."""
    return past.double() / cur.double()


class CWRPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "cwr"
    SCENARIOS = ("domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"variant": {"values": list(VARIANTS)},
                   "freeze_below_head": {"values": [True, False]}}
    PAPER = ("CWR (Lomonaco & Maltoni, CoRL 2017) and CWR* (Lomonaco, Maltoni & Pellegrini, "
             "CVPR-W 2020)")
    SUMMARY = ("consolidated per-class output weights; the head is reset each experience, "
               "trained alone after the first, and its rows merged into cw (CWR*: weighted by "
               "class counts)")
    SETTINGS = ("variant", "freeze_below_head")

    def __init__(self, variant: str = "cwr_star", freeze_below_head: bool = True):
        super().__init__()
        self.variant = check_choice("variant", variant, VARIANTS)
        self.freeze_below_head = check_bool("freeze_below_head", freeze_below_head)
        star = self.variant == "cwr_star"
        self.cwr = ConsolidatedWeights() if star else ConsolidatedWeights(
            from_cw=False, mean_shift=False, past_weight=cwr_past_weight)
        self.init: Optional[torch.Tensor] = None  # tw0 ("cwr"), on the CPU
        self.experiences = 0  # experiences trained and consolidated

    @property
    def who(self) -> str:
        return type(self).__name__

    @torch.no_grad()
    def before_training_exp(self, strategy, **kwargs):
        linear = head_linear(strategy.model, self.who)
        if self.freeze_below_head and self.experiences > 0:
            freeze_all_but(strategy.model, linear)  # (F)
        hold_bias_at_zero(linear)
        if self.cwr.cur is not None:
            return  # resumed in the middle of an experience: the head holds its tw
        cur = class_counts(strategy.experience.dataset.targets, linear.out_features)
        if self.variant == "cwr":
            if self.init is None:
                self.init = linear.weight.detach().cpu().clone()
            self.cwr.begin(linear, (cur > 0).long())  # counts experiences, not examples
            linear.weight.copy_(self.init.to(linear.weight.device))  # (R)
        else:
            self.cwr.begin(linear, cur)  # (R*)

    def after_training_exp(self, strategy, **kwargs):
        self.cwr.end(head_linear(strategy.model, self.who))  # (C) / (C*), then (I)
        self.experiences += 1

    def before_eval(self, strategy, **kwargs):
        self.cwr.show_provisional(head_linear(strategy.model, self.who))

    def after_eval(self, strategy, **kwargs):
        self.cwr.hide_provisional(head_linear(strategy.model, self.who))

    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        """The constant store (not per task), under task label 0; {} before any training."""
        if self.cwr.cw is None:
            return {}
        extra = [] if self.init is None else [self.init]
        return {0: tensor_cost([self.cwr.cw, self.cwr.past, *extra])}

    def state_dict(self) -> dict:
        return {**settings_of(self, self.SETTINGS), "cwr": self.cwr.state_dict(),
                "init": None if self.init is None else self.init.clone(),
                "experiences": self.experiences}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, self.SETTINGS)
        self.cwr.load_state_dict(state["cwr"])
        self.init = None if state["init"] is None else state["init"].clone().cpu()
        self.experiences = int(state["experiences"])
