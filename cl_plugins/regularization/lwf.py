"""Learning without Forgetting (LwF): distil the previous model's outputs on the current inputs.

Name: ``lwf``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.

Paper: Z. Li and D. Hoiem, "Learning without Forgetting", IEEE TPAMI 40(12), 2017 (ECCV 2016).
Reference code of the anchors: GMvandeVen/continual-learning, whose LwF loss changed twice (see
``variant``): up to commit 26f00db (May 2019; the code of van de Ven & Tolias 2018, arXiv
1809.10635, behind the S1 LwF row that Hsu et al. 2018 list but their own code does not
implement), from 26f00db to df9f983 (Aug 2022), and since df9f983 (van de Ven, Tuytelaars &
Tolias, Nature Machine Intelligence 2022: S2). All use temperature 2.

What is implemented
-------------------
At the end of every experience a frozen copy of the model is taken (``copy.deepcopy``, eval mode,
``requires_grad=False``, without the forward/backward hooks other plugins put on the model): the
*teacher*. While training experience ``e`` (0-based; ``t = e + 1`` is the task number counted
from 1), for a minibatch ``x`` of the current experience:

    KD_k = T^2 * KL( softmax(z_old,k(x) / T) || softmax(z_k(x) / T) )        (kd_loss, core/distill)

- multi-head models (Avalanche ``MultiHeadClassifier`` head, or a ``MaskedHead(mask="task")``):
  one term per old task label ``k``, with ``z_k`` = the student's head ``k`` and ``z_old,k`` the
  teacher's head ``k`` (Li & Hoiem's L_old over the old tasks' outputs Y_o), restricted to the
  classes trained under ``k``. On a ``ClassifierNet`` the student's backbone features are
  captured by a forward hook during the strategy's own forward pass, so the old heads run on
  the same graph at the cost of one small linear layer each; the teacher runs its backbone once.
  Other multi-task models are called once per old task, ``model(x, k)``.
- single-head models (domain-IL, class-IL): one term over the logit columns of the classes seen
  in earlier experiences, using the strategy's ``mb_output`` (no extra student forward). In
  class-IL the student's softmax also spans the current experience's classes (default
  ``class_il_softmax="seen"``, van de Ven) or the old classes only (``"old"``, Li & Hoiem,
  Avalanche), see Deviations; in domain-IL every experience uses the same labels, so these
  are all of the head's outputs.

The terms over old tasks are averaged (``task_reduction="mean"``, van de Ven's code) or summed
(``"sum"``, Avalanche's ``LwF``; Li & Hoiem write one lambda_o-weighted L_old over the outputs of
all old tasks). The weight of the term:

- ``schedule="constant"``:  loss = CE + alpha_e * KD  (Li & Hoiem, lambda_o = alpha; Avalanche);
- ``schedule="vandeven"``:  van de Ven & Tolias's code before 2022 weights the current-data
  loss and the distillation ("replay") loss by how many tasks have been seen (``rnt = 1/t``):
      L_total = (1/t) * L_CE + (1 - 1/t) * L_KD.
  Plugins *add* to ``strategy.loss``, which at ``before_backward`` holds the criterion plus the
  terms of the plugins that ran before this one; scaling it by 1/t would scale those terms too
  but not the terms of plugins running after this one, so the relative weights would depend on
  plugin order. Instead we add ``alpha_e * (w_kd / w_ce) * KD = alpha_e * (t - 1) * KD``: the
  total equals ``t * L_total`` (alpha = 1), i.e. the same gradient direction, scaled by t.
  Under Adam (the protocols' optimizer) a constant loss scale leaves the updates unchanged (up to
  epsilon); under plain SGD it multiplies the learning rate by t during task t.

``alpha`` is one float or a list with one value per experience (as Avalanche's ``LwF``, used by
the continual-learning-baselines B1 run); it multiplies the schedule's weight.

``variant`` (which version of van de Ven's code the term follows; the other options must agree
with it or a ValueError names the one that does not):

- ``"standard"`` (default): the term above, as set by the other options. With the defaults it is
  his code from 26f00db to df9f983 (1/t weighting, T^2, class-IL softmax over the seen classes,
  KD summed over the classes).
- ``"vandeven2018"`` (requires the defaults: ``schedule="vandeven"``, ``scale_t2=True``,
  ``class_il_softmax="seen"``, ``task_reduction="mean"``): his 2018 code (``utils.loss_fn_kd``
  from e17b714, 2018, until 26f00db, 2019-05-17) averaged the KD over the batch *and* the
  n columns it spans instead of summing over the columns: every term above is divided by n
  (2 per head in split-MNIST task-IL, 2 in domain-IL, 2t in class-IL). S1 class-IL, seed 0:
  24.33 (published 24.17 +- 0.33; "standard" 20.69).
- ``"vandeven2022"`` (requires ``schedule="vandeven"``, ``scale_t2=False``,
  ``task_reduction="mean"``; ``class_il_softmax`` is not used): his code since df9f983 (2022,
  ``Classifier.train_a_batch``, ``lwf_weighting``; ``loss_fn_kd`` with ``norm=False``):

      loss = CE + w_t * KL(softmax(z_old / T) || softmax(z / T))       (no T^2)

  with w_t = alpha_e * (t - 1) on multi-head models and on a single head whose experience
  brings no new class (task-, domain-IL: (t - 1) x the mean over old heads, as ``"standard"``),
  and w_t = alpha_e (no (t - 1), no 1/t) when the experience brings classes not trained before
  on a single head (class-IL). On a single head the KD spans *every* output of the head, student
  and teacher, not padded (his default ``--active-classes=all``): the current task's CE and the
  teacher's targets then also span the outputs of classes not yet seen, which needs an unmasked
  head (``model: {mask: none}``); with the default seen-classes mask the unseen outputs sit at
  -1e4 and get zero probability on both sides.

Hooks
-----
``before_train_dataset_adaptation`` (rebuild a teacher restored by ``load_state_dict`` on the
model before Avalanche adapts it), ``before_training_exp`` (feature hook), ``before_backward``
(adds the term), ``after_training_exp`` (records the classes trained per task label, copies the
teacher), ``after_training`` (removes the hook).

Hyper-parameters (DEFAULTS = van de Ven's code from 26f00db to df9f983)
-----------------------------------------------------------------------
- ``alpha`` = 1.0: weight of the distillation term (float >= 0 or list of floats, one per
  experience);
- ``temperature`` = 2.0 (Li & Hoiem and van de Ven: T = 2);
- ``schedule`` = "vandeven" ("constant" for Li & Hoiem / Avalanche);
- ``task_reduction`` = "mean" (over old task heads; "sum" for Avalanche's behaviour);
- ``scale_t2`` = True: multiply the KD term by T^2 (Hinton et al. 2015; van de Ven's code
  before 2022, not since df9f983);
- ``class_il_softmax`` = "seen": which columns the student's softmax spans on a single-head
  model: ``"seen"`` = the classes of earlier experiences and of the current one, the teacher's
  probabilities padded with zeros for the current ones (van de Ven's code before 2022); ``"old"`` =
  the classes of earlier experiences only (Li & Hoiem, Avalanche). See Deviations;
- ``variant`` = "standard" (see above; S2 uses "vandeven2022", S1 "vandeven2018").

Deviations
----------
- Li & Hoiem's warm-up step (training only the new head with the shared layers frozen before
  joint optimisation) is not done, as in van de Ven's and Avalanche's implementations.
- Li & Hoiem record the old outputs Y_o once, before training the new task; a frozen teacher
  copy gives the same targets (and allows data augmentation to differ per epoch).
- Li & Hoiem, Avalanche and van de Ven's 2022 code use KD without the T^2 factor; set
  ``scale_t2=False`` to get it (with T = 1, as in Avalanche's baseline run, both are identical).
- Class-IL, ``class_il_softmax``: with ``"seen"`` (the default) the term is that of van de Ven's
  code before 2022 (``loss_fn_kd`` with the teacher's scores cut to the old classes; the 2018
  version, behind the S1 row 24.17, also divides by the number of columns, ``variant=
  "vandeven2018"``; the 2022 code behind S2's 21.89 is ``variant="vandeven2022"``): the
  student's softmax spans *all* classes seen so far, old and current, and the teacher's softmax
  over the old classes is padded with zero probabilities for the classes that are new in the
  current experience,

      KD = T^2 * sum_{c in old} q_c (log q_c - log p_c),
      q = softmax(z_old[old] / T),  p = softmax(z[old + new] / T)  (mean over the batch),

  which also pushes the current classes' logits down on the current inputs (the teacher gives
  them probability 0). His code uses the cross-entropy -sum q log p (see the KL note below:
  same gradient). With ``"old"``, as in Li & Hoiem (old-task outputs only) and
  Avalanche, the student's softmax spans the old classes only and the new classes' logits do
  not enter the term. The two are opposite failure modes of single-head LwF: with ``"old"``
  nothing holds the new classes' logits down on old inputs, so every earlier task is lost (S1
  seed 0: 19.74, the accuracy matrix is the identity); with ``"seen"`` the term outweighs the
  CE on the new classes: minimising CE + (t - 1) KD over free logits, T = 2, the new label's
  logit ends below the teacher's preferred old class for every t >= 2 (a tie only at t = 2
  with a uniform teacher), so the first task is kept and later tasks are barely learned (S1
  seed 0: 20.69; task accuracies after training them 0.2-3%). In domain-IL (same labels in
  every experience) and for multi-head layouts both options give the same term.
- KL divergence instead of the cross-entropy with soft targets: they differ by the teacher's
  entropy, a constant, so the gradients are identical and the term is 0 at the teacher.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.models.utils import avalanche_forward
from torch import nn

from cl_plugins.core.checks import check_bool, check_choice, check_non_negative, check_positive
from cl_plugins.core.distill import kd_loss
from cl_plugins.core.params import task_specific_prefixes
from cl_plugins.core.state import check_owner, owned_by

SCHEDULES = ("constant", "vandeven")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks_with_kwargs")
REDUCTIONS = ("mean", "sum")
CLASS_IL_SOFTMAX = ("old", "seen")
VARIANTS = ("standard", "vandeven2018", "vandeven2022")
# The options each code version fixes (class_il_softmax is not used by "vandeven2022").
_VARIANT_OPTIONS = {
    "vandeven2018": {"schedule": "vandeven", "scale_t2": True, "class_il_softmax": "seen",
                     "task_reduction": "mean"},
    "vandeven2022": {"schedule": "vandeven", "scale_t2": False, "task_reduction": "mean"},
}


class _FeatureTap:
    """Forward hook keeping the backbone's last training-mode output and the input it came from.

    Copies (``copy.deepcopy`` of the model by another plugin, pickling) get a fresh, empty tap:
    the tensors it holds are part of a live autograd graph and must not be copied.
    """

    def __init__(self):
        self.inp: Optional[torch.Tensor] = None
        self.out: Optional[torch.Tensor] = None

    def __call__(self, module, inputs, output):
        if module.training and torch.is_grad_enabled() and inputs:
            self.inp, self.out = inputs[0], output

    def take(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        out = self.out if self.inp is x else None
        self.inp = self.out = None
        return out

    def __reduce__(self):
        return (_FeatureTap, ())


def _check_alpha(alpha) -> Union[float, List[float]]:
    if isinstance(alpha, (list, tuple)):
        if not alpha:
            raise ValueError("alpha must be a number >= 0 or a non-empty list of numbers >= 0 "
                             "(one per experience); got an empty list.")
        return [float(check_non_negative(f"alpha[{i}]", a)) for i, a in enumerate(alpha)]
    return float(check_non_negative("alpha", alpha))


class LwFPlugin(SupervisedPlugin):
    METHOD_NAME = "lwf"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    DEFAULTS: dict = {"alpha": 1.0, "temperature": 2.0, "schedule": "vandeven",
                      "task_reduction": "mean", "scale_t2": True, "class_il_softmax": "seen",
                      "variant": "standard"}
    SWEEP: dict = {
        "alpha": {"distribution": "log_uniform_values", "min": 0.1, "max": 10.0},
        "temperature": {"values": [1.0, 2.0, 4.0]},
    }
    PAPER = "Learning without Forgetting (Li & Hoiem, TPAMI 2017)"
    SUMMARY = ("distils a frozen copy of the previous model's outputs (old heads / old classes) "
               "on the current inputs, temperature T")
    supports_distributed = False

    def __init__(self, alpha: Union[float, Sequence[float]] = 1.0, temperature: float = 2.0,
                 schedule: str = "vandeven", task_reduction: str = "mean",
                 scale_t2: bool = True, class_il_softmax: str = "seen",
                 variant: str = "standard"):
        super().__init__()
        self.alpha = _check_alpha(alpha)
        self.temperature = float(check_positive("temperature", temperature))
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.task_reduction = check_choice("task_reduction", task_reduction, REDUCTIONS)
        self.scale_t2 = check_bool("scale_t2", scale_t2)
        self.class_il_softmax = check_choice("class_il_softmax", class_il_softmax,
                                             CLASS_IL_SOFTMAX)
        self.variant = check_choice("variant", variant, VARIANTS)
        for key, want in _VARIANT_OPTIONS.get(variant, {}).items():
            if getattr(self, key) != want:
                raise ValueError(f"{key} must be {want!r} with variant={variant!r} (van de Ven's "
                                 f"{variant[-4:]} code); got {getattr(self, key)!r}.")

        self.teacher: Optional[nn.Module] = None
        self.n_experiences = 0  # finished experiences (the task count)
        self.old_classes: Dict[int, List[int]] = {}  # task label -> classes trained under it
        self._pending_teacher: Optional[Dict[str, torch.Tensor]] = None
        self._tap: Optional[_FeatureTap] = None
        self._tap_handle = None
        # classes of the experience being trained (class_il_softmax="seen"), by task label
        self._current_classes: Dict[int, List[int]] = {}

    # ------------------------------------------------------------------ weights

    @staticmethod
    def vandeven_weights(t: int) -> Tuple[float, float]:
        """(w_ce, w_kd) = (1/t, 1 - 1/t) for the t-th task (t counted from 1)."""
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"t (the task number, counted from 1) must be an integer >= 1; "
                             f"got {t!r}.")
        return 1.0 / t, 1.0 - 1.0 / t

    def alpha_at(self, exp_index: int) -> float:
        if isinstance(self.alpha, list):
            if exp_index >= len(self.alpha):
                raise ValueError(f"alpha lists {len(self.alpha)} values (one per experience) but "
                                 f"experience {exp_index} (0-based) is being trained; give one "
                                 "value per experience.")
            return self.alpha[exp_index]
        return self.alpha

    def kd_weight(self, t: int, new_classes: bool = False) -> float:
        """Weight of the KD term added to the loss while training task t (counted from 1).
        ``new_classes``: the experience brings classes not trained before on a single head
        (class-IL), where ``variant="vandeven2022"`` drops the (t - 1) factor."""
        a = self.alpha_at(t - 1)
        if self.schedule == "constant" or (new_classes and self.variant == "vandeven2022"):
            return a
        w_ce, w_kd = self.vandeven_weights(t)
        return a * w_kd / w_ce

    # ------------------------------------------------------------------ model layout

    @staticmethod
    def _per_task_module(model: nn.Module) -> Optional[nn.Module]:
        from cl_plugins.models.heads import MaskedHead

        for m in model.modules():
            if isinstance(m, MultiHeadClassifier) or (isinstance(m, MaskedHead)
                                                      and m.mask == "task"):
                return m
        return None

    def _layout(self, model: nn.Module) -> str:
        per_task = self._per_task_module(model)
        if per_task is None:
            return "single"
        if getattr(model, "head", None) is per_task and hasattr(model, "backbone"):
            return "heads"
        if isinstance(model, MultiTaskModule):
            return "tasks"
        raise ValueError(f"LwF found a per-task head ({type(per_task).__name__}) inside a "
                         f"{type(model).__name__}, which is not an Avalanche MultiTaskModule, so "
                         "it cannot be called with an old task's label. Supported: ClassifierNet "
                         "(backbone + head) or any MultiTaskModule.")

    # ------------------------------------------------------------------ the term

    def _ensure_teacher(self, model: nn.Module) -> None:
        """Build the teacher restored by ``load_state_dict`` from a copy of ``model``."""
        if self._pending_teacher is None:
            return
        teacher = self.frozen_copy(model)
        saved = self._pending_teacher
        own = teacher.state_dict()
        unexpected = sorted(set(saved) - set(own))
        missing = sorted(set(own) - set(saved))
        # Keys the saved teacher lacks can only be what Avalanche added for the current task
        # (a new task head and its unit mask); the teacher never uses them.
        skip = tuple(task_specific_prefixes(model))
        bad_missing = [k for k in missing if not ((skip and k.startswith(skip))
                                                  or ".active_units_T" in f".{k}")]
        if unexpected or bad_missing:
            raise ValueError(f"LwF: the saved teacher does not fit the model: unexpected keys "
                             f"{unexpected[:5]}, missing keys {bad_missing[:5]}")
        try:
            teacher.load_state_dict(saved, strict=False)
        except RuntimeError as err:
            raise ValueError(f"LwF: the saved teacher does not fit the model: {err}") from err
        self.teacher = teacher
        self._pending_teacher = None

    @staticmethod
    def _freeze(model: nn.Module) -> nn.Module:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @classmethod
    def frozen_copy(cls, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` in eval mode, without gradients and without forward/backward
        hooks. Hooks other plugins registered (e.g. layer-input recorders) would otherwise be
        deep-copied with their owners, and would record the teacher's activations."""
        memo = {}
        for m in model.modules():
            for attr in _HOOK_DICTS:
                for hook in getattr(m, attr, {}).values():
                    memo[id(hook)] = hook  # shared, not copied: they are dropped below
        teacher = copy.deepcopy(model, memo)
        for m in teacher.modules():
            for attr in _HOOK_DICTS + _HOOK_FLAGS:
                if hasattr(m, attr):
                    setattr(m, attr, type(getattr(m, attr))())
        return cls._freeze(teacher)

    def distillation_term(self, model: nn.Module, x: torch.Tensor,
                          student_output: Optional[torch.Tensor] = None,
                          task_labels: Optional[torch.Tensor] = None,
                          features: Optional[torch.Tensor] = None,
                          current_classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The KD term (without its weight) of ``model`` against the teacher on inputs ``x``.

        ``student_output``: the model's output on ``x`` (single-head models; recomputed if None).
        ``features``: the model's backbone output on ``x`` (multi-head ClassifierNet; recomputed
        if None). ``current_classes``: the classes of the experience being trained, used by
        ``class_il_softmax="seen"`` on single-head models (default: those recorded at
        ``before_training_exp``). Returns a zero tensor before the first experience has ended.
        """
        self._ensure_teacher(model)
        if self.teacher is None:
            return torch.zeros((), device=x.device)
        teacher, T = self.teacher, self.temperature
        layout = self._layout(model)
        terms = []
        if layout == "heads":
            feats = features if features is not None else model.backbone(x)
            with torch.no_grad():
                t_feats = teacher.backbone(x)
            for k in sorted(self.old_classes):
                cols = self.old_classes[k]
                s = model.head.forward_single_task(feats, k)[:, cols]
                with torch.no_grad():
                    q = teacher.head.forward_single_task(t_feats, k)[:, cols]
                terms.append(self._kd(s, q, T))
        elif layout == "tasks":
            for k in sorted(self.old_classes):
                cols = self.old_classes[k]
                s = model(x, k)[:, cols]
                with torch.no_grad():
                    q = teacher(x, k)[:, cols]
                terms.append(self._kd(s, q, T))
        else:
            cols = sorted(set().union(*self.old_classes.values()))
            if task_labels is None:  # single head: every sample goes through the same head
                task_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            out = student_output if student_output is not None else \
                avalanche_forward(model, x, task_labels)
            with torch.no_grad():
                q = avalanche_forward(teacher, x, task_labels)
            if self.variant == "vandeven2022":  # every output of the head, no padding
                terms.append(self._kd(out, q, T))
            elif self.class_il_softmax == "old":
                terms.append(self._kd(out[:, cols], q[:, cols], T))
            else:
                if current_classes is None:
                    current_classes = set().union(set(), *self._current_classes.values())
                new = sorted(set(int(c) for c in current_classes) - set(cols))
                terms.append(self._kd(out[:, cols + new], q[:, cols], T, padded=True))
        total = torch.stack(terms).sum()
        return total / len(terms) if self.task_reduction == "mean" else total

    def _kd(self, student: torch.Tensor, teacher: torch.Tensor, T: float,
            padded: bool = False) -> torch.Tensor:
        """One KD term (``_kd_padded`` if ``padded``, else ``kd_loss``); divided by the student's
        number of columns under ``variant="vandeven2018"``."""
        loss = self._kd_padded(student, teacher, T) if padded else \
            kd_loss(student, teacher, T, self.scale_t2)
        return loss / student.shape[1] if self.variant == "vandeven2018" else loss

    def _kd_padded(self, student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
        """KL(q || p) with p = softmax(student / T) over all its columns and q the teacher's
        softmax over its (fewer, leading) columns, padded with zeros for the remaining ones;
        mean over the batch, times T^2 if ``scale_t2``. Equals ``kd_loss`` when no column is
        padded."""
        log_p = torch.log_softmax(student / T, dim=1)
        q = torch.softmax(teacher.detach() / T, dim=1)
        q = torch.cat([q, q.new_zeros(q.shape[0], student.shape[1] - q.shape[1])], dim=1)
        # padded entries have q = 0 and contribute 0 (xlogy(0, 0) = 0 in kl_div)
        loss = torch.nn.functional.kl_div(log_p, q, reduction="batchmean")
        return loss * (T * T) if self.scale_t2 else loss

    # ------------------------------------------------------------------ hooks

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        # The model is still as it was after the previous experience: a restored teacher's
        # state dict fits it exactly.
        self._ensure_teacher(strategy.model)

    def before_training_exp(self, strategy, **kwargs):
        self._ensure_teacher(strategy.model)
        self.alpha_at(self.n_experiences)  # a too-short alpha list fails before any training
        ds = strategy.experience.dataset
        self._current_classes = {int(t): sorted(int(c) for c in ds.task_set[t].targets.uniques)
                                 for t in ds.targets_task_labels.uniques}
        if self.teacher is not None:
            self.teacher.to(strategy.device)
        self._remove_tap()
        if self.teacher is not None and self._layout(strategy.model) == "heads":
            self._tap = _FeatureTap()
            self._tap_handle = strategy.model.backbone.register_forward_hook(self._tap)

    def before_backward(self, strategy, **kwargs):
        if self.teacher is None and self._pending_teacher is None:
            return
        weight = self.kd_weight(self.n_experiences + 1, self._new_classes(strategy.model))
        if weight == 0.0:
            return
        feats = self._tap.take(strategy.mb_x) if self._tap is not None else None
        term = self.distillation_term(strategy.model, strategy.mb_x,
                                      student_output=strategy.mb_output,
                                      task_labels=strategy.mb_task_id, features=feats)
        strategy.loss += weight * term

    def _new_classes(self, model: nn.Module) -> bool:
        """Whether the current experience brings classes not trained before on a single head."""
        if self.variant != "vandeven2022":
            return False  # only that variant's weight depends on it
        old = set().union(set(), *self.old_classes.values())
        new = set().union(set(), *self._current_classes.values()) - old
        return bool(new) and self._layout(model) == "single"

    def after_training_exp(self, strategy, **kwargs):
        self._remove_tap()  # before the copy: the teacher must not carry the hook
        ds = strategy.experience.dataset
        for t in ds.targets_task_labels.uniques:
            classes = set(int(c) for c in ds.task_set[t].targets.uniques)
            self.old_classes[int(t)] = sorted(classes | set(self.old_classes.get(int(t), [])))
        self.n_experiences += 1
        self._pending_teacher = None
        self._current_classes = {}
        self.teacher = self.frozen_copy(strategy.model)

    def after_training(self, strategy, **kwargs):
        self._remove_tap()

    def _remove_tap(self):
        if self._tap_handle is not None:
            self._tap_handle.remove()
        self._tap_handle, self._tap = None, None

    # ------------------------------------------------------------------ state

    def _config(self) -> Dict:
        return {"alpha": self.alpha, "temperature": self.temperature, "schedule": self.schedule,
                "task_reduction": self.task_reduction, "scale_t2": self.scale_t2,
                "class_il_softmax": self.class_il_softmax, "variant": self.variant}

    def state_dict(self) -> Dict:
        if self.teacher is not None:
            teacher = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        elif self._pending_teacher is not None:
            teacher = {k: v.clone() for k, v in self._pending_teacher.items()}
        else:
            teacher = None
        return {**owned_by(self), "config": self._config(), "n_experiences": self.n_experiences,
                "old_classes": {k: list(v) for k, v in self.old_classes.items()},
                "teacher": teacher}

    def load_state_dict(self, state: Dict) -> None:
        check_owner(self, state)
        for key, value in state["config"].items():
            if getattr(self, key) != value:
                raise ValueError(f"saved LwF state has {key}={value!r}, this plugin "
                                 f"{getattr(self, key)!r}")
        self.n_experiences = int(state["n_experiences"])
        self.old_classes = {int(k): [int(c) for c in v] for k, v in state["old_classes"].items()}
        self.teacher = None
        self._pending_teacher = ({k: v.clone() for k, v in state["teacher"].items()}
                                 if state["teacher"] is not None else None)
        # The teacher is rebuilt from the model at the next hook (or distillation_term call).
