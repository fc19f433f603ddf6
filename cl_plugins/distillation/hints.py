"""FitNets hints: keep the features of chosen layers close to those of the previous model.

Name: ``hints``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.
Paper: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta and Y. Bengio, "FitNets: Hints
for Thin Deep Nets", ICLR 2015. Official code: adri-romsor/FitNets (Theano/pylearn2;
``costs/HintCost.py``, ``scripts/fitnets_training.py``). Notes, the comparison with Avalanche's
``FeatureDistillationPlugin`` and measurements: docs/methods/hints.md.

In continual learning the teacher is the frozen model that ended the previous experience
(``core.feature_distill``); the student is the model being trained. For each pair (guided
student layer g = ``layers[i]``, hint teacher layer h = ``teacher_layers[i]``), on the selected
rows x (``inputs``):

    L_HT,i = mean_x 1/2 || u_h(x) - r_i(v_g(x)) ||^2                 # Eq. 3 (core.hint_loss)
    loss  = CE + weight * sum_i L_HT,i

u_h: the teacher's output of module h; v_g: the student's output of module g; r_i: the identity
when both have the same shape, else a regressor built at the first step where the shapes are
known (``core.regressors``): linear for vectors, FitNets' convolution for maps (kernel
(H_g - H_h + 1) x (W_g - W_h + 1), a 1x1 convolution for equal spatial sizes), trained with the
model (its parameters join the strategy's optimizer for each experience). ``reduction="mse"``
averages over every element instead (``F.mse_loss``, the usual re-implementations).

Hooks (``FeatureDistillPlugin``): ``before_training_exp`` (taps, regressors to the device and
into the optimizer), ``before_forward``/``after_forward`` (the student's taps),
``before_backward`` (the term; new regressors join the optimizer), ``after_training_exp``
(regressors leave the optimizer, new teacher).

Hyper-parameters: ``weight`` = 0.1 (the paper trains the hint alone in a first stage, so it
has no weight against CE; 0.1 picked on split_digits task-IL, docs/methods/hints.md); ``layers`` =
"backbone" (the ClassifierNet's penultimate features; FitNets guides a middle layer of a thinner
student, which a same-architecture CL teacher does not need); ``teacher_layers`` = None (the
same names); ``inputs`` = "current" | "replay" | "both"; ``reduction`` = "half_sum" (Eq. 3) |
"mse"; ``regressor_relu`` = False (True: r ends with a ReLU, as FitNets when the hint layer
does).

Deviations:
- no stage-wise training (hint stage, then KD): the hint is a term added to the CE of every step
  from the second experience on, like other distillation terms in CL;
- several hint pairs are summed; FitNets trains one hint per stage;
- regressors keep their weights across experiences (the state holds them), but their optimizer
  state (momentum, Adam moments) restarts with each experience, since they leave the optimizer
  between experiences; initialisation is PyTorch's, not the code's uniform(-0.05, 0.05) with max
  kernel norm 0.9;
- for conv maps the official cost sums 1/2 (u - r)^2 over one axis and averages over the others;
  ``half_sum`` sums over all of a sample's elements, as Eq. 3.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from cl_plugins.core.checks import check_bool, check_choice
from cl_plugins.core.distill_losses import HINT_REDUCTIONS, hint_loss
from cl_plugins.core.feature_distill import FeatureDistillPlugin, add_param_group
from cl_plugins.core.regressors import RegressorSet, remove_params

Layers = Union[str, Sequence[str]]


class HintsPlugin(FeatureDistillPlugin, supports_distributed=True):
    METHOD_NAME = "hints"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"weight": {"distribution": "log_uniform_values", "min": 0.01, "max": 10.0}}
    PAPER = "FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015)"
    SUMMARY = ("keeps chosen layers' features close to the previous model's (1/2 L2, FitNets' "
               "hint), with a regressor where the student's and the teacher's shapes differ")
    SETTINGS = FeatureDistillPlugin.SETTINGS + ("teacher_layers", "reduction", "regressor_relu")

    def __init__(self, weight: float = 0.1, layers: Layers = "backbone",
                 teacher_layers: Optional[Layers] = None, inputs: str = "current",
                 reduction: str = "half_sum", regressor_relu: bool = False):
        super().__init__(weight, layers, inputs, teacher_layers)
        self.reduction = check_choice("reduction", reduction, HINT_REDUCTIONS)
        self.regressor_relu = check_bool("regressor_relu", regressor_relu)
        self.regressors = RegressorSet(self.regressor_relu, who=self.who)
        self._optimizer = None  # the optimizer the regressors joined for this experience

    def distill_loss(self, student: Dict[str, Tensor], teacher: Dict[str, Tensor], y: Tensor,
                     t: Tensor) -> Tensor:
        terms = [hint_loss(self.regressors.apply(f"{g}->{h}", student[g], teacher[h]),
                           teacher[h], self.reduction)  # Eq. 3
                 for g, h in zip(self.layers, self.teacher_layers)]
        return torch.stack(terms).sum()

    def _join(self, strategy) -> None:
        params = self.regressors.parameters()
        if params:
            add_param_group(strategy, params)
            self._optimizer = strategy.optimizer
        self.regressors.created = False

    def _leave(self) -> None:
        if self._optimizer is not None:
            remove_params(self._optimizer, self.regressors.parameters())
        self._optimizer = None

    def prepare(self, strategy) -> None:
        self.regressors.to(strategy.device)
        self._join(strategy)

    def before_backward(self, strategy, **kwargs):
        super().before_backward(strategy, **kwargs)
        if self.regressors.created:  # built on this step: trained from this step on
            self._join(strategy)

    def after_training_exp(self, strategy, **kwargs):
        self._leave()
        super().after_training_exp(strategy, **kwargs)

    def extra_state(self) -> Dict:
        return {"regressors": self.regressors.state()}

    def load_extra_state(self, state: Dict) -> None:
        self._leave()
        self.regressors.load(state["regressors"])
