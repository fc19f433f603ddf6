"""Memory Aware Synapses (MAS): Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, "Memory
Aware Synapses: Learning what (not) to forget", ECCV 2018.

Name ``mas``. Scenarios: task-, domain- and class-IL (no task label is needed for training; the
task label of the experience selects the head on a multi-head model).

Equations (the paper's Eqs. 2-4, global version), for every shared parameter i, after training on
task n, with F the network's output function (the logits of the task's head):

- ``Omega_i^n = 1/N sum_k | d ||F(x_k)||_2^2 / d theta_i |`` over the N training samples of the
  task. The gradient is taken per sample (``per_sample_gradient_sums``: for a Linear layer
  ``sum_k |delta_k a_k^T| = |delta|^T |a|``, one matmul), so the absolute value is applied to
  each sample's gradient as in the paper's Eq. (4); no labels are used;
- the importances accumulate over tasks, ``Omega <- Omega + Omega^n`` (the paper's
  "accumulated importance"), and the anchor theta* becomes the parameters after task n;
- penalty while training later tasks: ``L = L_n + lambda * sum_i Omega_i (theta_i - theta*_i)^2``
  (no factor 1/2, as in the paper). This is a :class:`~cl_plugins.core.quadratic.QuadraticPenalty`
  in ``accumulate`` mode.

Which outputs enter the norm (``outputs``):

- ``"experience"`` (default): the logits of the classes of the current experience. On a
  multi-head model these are exactly the task head's outputs (the paper's multi-head setting); on
  a class-IL ``MaskedHead`` they are the units trained on this task.
- ``"seen"``: the logits of every class seen so far (the MaskedHead's unmasked units in class-IL),
  which also protects the old classes' logits.

Masked logits (-1e4 on a ``MaskedHead``) are never used: squared they would swamp the norm with a
constant that carries no information about the input.

Hooks: ``before_backward`` (adds the penalty), ``after_training_exp`` (importance over
``strategy.experience.dataset``, model in eval mode, then restored).

Hyper-parameters (defaults = protocol S1 task-IL, Hsu et al. 2018):

- ``mas_lambda`` (the paper's lambda): 1. S1 uses 1 / 10000 / 1 (task / domain / class-IL).
- ``outputs``: ``"experience"``.
- ``output_reduction``: ``"sum"`` (the paper's squared L2 norm, also in the released code) or
  ``"mean"`` (mean of the squared logits over the outputs, as Hsu et al.'s code, whose S1
  coefficients were tuned for it: the importance is then smaller by the number of outputs).
- ``importance_batch_size``: 128, the chunk size of the importance pass; it does not change the
  result. Linear layers need no per-sample copies (one matmul per chunk); other layers take
  the per-sample path, which holds this many copies of their parameters.

Deviations and choices:

- Per-sample absolute gradients, as in the paper's formula. The released code (and Hsu et al.'s)
  takes the absolute value of *mini-batch* gradients, which makes Omega depend on the batch size.
- Avalanche's MAS adds a moving average (``alpha``) of the importances over tasks; it is not in
  the paper and is left out: importances accumulate.
- Only shared parameters are protected (a task-specific head gets no gradient from later tasks).
- Importances are summed in float64 and stored in the parameters' dtype.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import check_choice, check_int, check_non_negative
from cl_plugins.core.params import shared_parameters, snapshot
from cl_plugins.core.per_sample import dataset_mean, eval_view, per_sample_gradient_sums
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.state import check_owner, owned_by

OUTPUTS = ("experience", "seen")
REDUCTIONS = ("sum", "mean")


class MASPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "mas"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"mas_lambda": {"distribution": "log_uniform_values", "min": 0.01, "max": 1e5}}
    PAPER = "Memory Aware Synapses (Aljundi et al., ECCV 2018)"
    SUMMARY = ("quadratic penalty weighted by the mean absolute gradient of the squared L2 norm "
               "of the outputs (unsupervised importance)")

    def __init__(self, mas_lambda: float = 1.0, outputs: str = "experience",
                 output_reduction: str = "sum", importance_batch_size: int = 128):
        super().__init__()
        self.mas_lambda = check_non_negative("mas_lambda", mas_lambda)
        self.outputs = check_choice("outputs", outputs, OUTPUTS)
        self.output_reduction = check_choice("output_reduction", output_reduction, REDUCTIONS)
        self.importance_batch_size = check_int("importance_batch_size", importance_batch_size, 1)
        self.quadratic_penalty = QuadraticPenalty(coef=mas_lambda, mode="accumulate")
        self.seen_classes: List[int] = []
        self._params = None

    def before_training_exp(self, strategy, **kwargs):
        self._params = shared_parameters(strategy.model)
        self.quadratic_penalty.to(strategy.device)

    def before_backward(self, strategy, **kwargs):
        if len(self.quadratic_penalty):
            if self._params is None:
                self._params = shared_parameters(strategy.model)
            strategy.loss += self.quadratic_penalty.loss(self._params)

    def after_training_exp(self, strategy, **kwargs):
        exp = strategy.experience
        current = sorted(int(c) for c in exp.classes_in_this_experience)
        self.seen_classes = sorted(set(self.seen_classes) | set(current))
        units = current if self.outputs == "experience" else self.seen_classes
        params = shared_parameters(strategy.model)
        importance = self.importance(strategy.model, params, exp.dataset, units,
                                     int(exp.task_labels[0]), strategy.device)
        self.quadratic_penalty.add(importance, snapshot(params))
        self._params = None

    def importance(self, model, params, dataset, units: List[int], task_label: int,
                   device) -> Dict[str, torch.Tensor]:
        """``1/N sum_k |d r(F(x_k)[units]^2) / d theta|`` (r = sum or mean), in params' dtype."""
        idx = torch.as_tensor(units, dtype=torch.long, device=device)
        top = max(units)
        reduce = torch.sum if self.output_reduction == "sum" else torch.mean

        def sq_norm(logits, _target):
            if top >= logits.shape[-1]:  # shapes are static under vmap: a plain check
                raise ValueError(f"MAS: class {top} of the experience has no output unit; the "
                                 f"model gives {logits.shape[-1]} outputs")
            return reduce(logits[:, idx].pow(2))

        def batch_sums(batch, _start):  # Eq. 4 for one chunk, in the parameters' dtype
            x = batch[0].to(device)
            yield per_sample_gradient_sums(model, params, x, torch.zeros(len(x), device=device),
                                           sq_norm, task_label=task_label, transform="abs")

        dataset = eval_view(dataset)  # no training augmentations
        if len(dataset) == 0:
            raise ValueError("MAS: the experience's dataset is empty; no importance to compute")
        mean = dataset_mean(model, params, dataset, self.importance_batch_size, batch_sums)
        return {n: t.to(params[n].dtype) for n, t in mean.items()}

    def state_dict(self) -> dict:
        return {**owned_by(self), "penalty": self.quadratic_penalty.state_dict(),
                "seen_classes": list(self.seen_classes)}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        self.quadratic_penalty.load_state_dict(state["penalty"])
        self.seen_classes = [int(c) for c in state["seen_classes"]]
        self._params = None
