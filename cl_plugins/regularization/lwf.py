"""Learning without Forgetting (LwF): distil the previous model's outputs on the current inputs.

Name: ``lwf``. Scenarios: task-IL, domain-IL, class-IL. Task labels: not needed.
Paper: Z. Li and D. Hoiem, "Learning without Forgetting", IEEE TPAMI 40(12), 2017. Anchors:
GMvandeVen/continual-learning, three versions of its LwF loss (``variant``); commits,
measurements, longer notes: docs/methods/lwf.md.

After every experience a frozen, hook-free copy of the model is kept: the *teacher*. Training
experience e (task t = e + 1), on a minibatch x of the current experience:

    KD_k = T^2 KL(softmax(z_old,k(x) / T) || softmax(z_k(x) / T))     # Eq. KD (core.distill)
    loss = CE + alpha_e * w_t * reduce_k KD_k                          # Eq. L

- per-task heads (``MultiHeadClassifier``, ``MaskedHead(mask="task")``): one KD_k per old task
  label k on head k's trained classes (Li & Hoiem's L_old). On a ClassifierNet a forward hook
  keeps the student's backbone features of the strategy's own forward and the teacher's backbone
  runs once; other ``MultiTaskModule``s are called ``model(x, k)`` (core.heads_layout).
- single head (domain-, class-IL): one term on ``mb_output`` over the classes of earlier
  experiences; with ``class_il_softmax="seen"`` the student's softmax also spans the current
  classes, the teacher's padded with zeros (van de Ven's code before 2022).
- reduce_k: mean or sum (``task_reduction``); w_t: 1 (``schedule="constant"``, Li & Hoiem's
  lambda_o) or t - 1 (``"vandeven"``: his (1/t) CE + (1 - 1/t) KD times t, as an added term so
  other plugins' terms keep their weight; under plain SGD a step t times larger).
- ``variant="vandeven2018"``: each KD_k divided by its number of columns (his 2018 code);
  ``"vandeven2022"``: no T^2, a single head's KD spans every output unpadded, and w_t = 1 when the
  experience brings new classes to a single head (class-IL). A variant fixes the options its code
  used: a conflicting option raises ValueError naming it.

Hooks: ``before_train_dataset_adaptation`` (rebuild a teacher restored by ``load_state_dict``),
``before_training_exp`` (current classes, feature hook), ``before_backward`` (adds the term),
``after_training_exp`` (classes per task label, teacher), ``after_training`` (removes the hook).

Hyper-parameters (defaults: van de Ven's code from 26f00db to df9f983): ``alpha`` = 1.0 (>= 0,
or a list, one per experience, as Avalanche's LwF); ``temperature`` = 2.0 (Li & Hoiem, van de
Ven); ``schedule`` = "vandeven" | "constant"; ``task_reduction`` = "mean" | "sum"; ``scale_t2``
= True (Hinton et al. 2015); ``class_il_softmax`` = "seen" | "old" (Li & Hoiem, Avalanche);
``variant`` = "standard" | "vandeven2018" (S1) | "vandeven2022" (S2, with scale_t2=False).

Deviations:
- no warm-up of the new head alone (Li & Hoiem) first, as in van de Ven's and Avalanche's code;
- Li & Hoiem record the old outputs once before training; the frozen teacher gives the same
  targets and lets augmentation differ per epoch;
- T^2 by default: Li & Hoiem, Avalanche and van de Ven's 2022 code have none (``scale_t2=False``;
  with T = 1, as Avalanche's baseline run, both agree);
- class-IL: "seen" also pushes the current classes' logits down and outweighs their CE (later
  tasks barely learned), "old" holds nothing down (every earlier task lost);
- KL, not van de Ven's soft-target cross-entropy: same gradients (they differ by a constant).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn

from cl_plugins.core.checks import check_bool, check_choice, check_non_negative, check_positive
from cl_plugins.core.distill import kd_loss, restore_teacher, teacher_state
from cl_plugins.core.heads_layout import head_layout, task_output_pairs
from cl_plugins.core.params import task_specific_prefixes
from cl_plugins.core.schedule import vandeven_weights
from cl_plugins.core.snapshot import FeatureTap, frozen_copy
from cl_plugins.core.state import check_owner, check_settings, owned_by

SCHEDULES = ("constant", "vandeven")
REDUCTIONS = ("mean", "sum")
SPANS = ("old", "seen")  # class_il_softmax: the classes a single head's KD spans
VARIANTS = ("standard", "vandeven2018", "vandeven2022")
SETTINGS = ("alpha", "temperature", "schedule", "task_reduction", "scale_t2", "class_il_softmax",
            "variant")
VARIANT_OPTIONS = {  # the options each code version fixes ("vandeven2022" uses no softmax span)
    "vandeven2018": {"schedule": "vandeven", "scale_t2": True, "class_il_softmax": "seen",
                     "task_reduction": "mean"},
    "vandeven2022": {"schedule": "vandeven", "scale_t2": False, "task_reduction": "mean"},
}


def check_alpha(alpha) -> Union[float, List[float]]:
    if isinstance(alpha, (list, tuple)):
        if not alpha:
            raise ValueError("alpha must be a number >= 0 or a non-empty list of numbers >= 0 "
                             "(one per experience); got an empty list.")
        return [float(check_non_negative(f"alpha[{i}]", a)) for i, a in enumerate(alpha)]
    return float(check_non_negative("alpha", alpha))


class LwFPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "lwf"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"alpha": {"distribution": "log_uniform_values", "min": 0.1, "max": 10.0},
                   "temperature": {"values": [1.0, 2.0, 4.0]}}
    PAPER = "Learning without Forgetting (Li & Hoiem, TPAMI 2017)"
    SUMMARY = ("distils a frozen copy of the previous model's outputs (old heads / old classes) "
               "on the current inputs, temperature T")

    def __init__(self, alpha: Union[float, Sequence[float]] = 1.0, temperature: float = 2.0,
                 schedule: str = "vandeven", task_reduction: str = "mean", scale_t2: bool = True,
                 class_il_softmax: str = "seen", variant: str = "standard"):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.temperature = float(check_positive("temperature", temperature))
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.task_reduction = check_choice("task_reduction", task_reduction, REDUCTIONS)
        self.scale_t2 = check_bool("scale_t2", scale_t2)
        self.class_il_softmax = check_choice("class_il_softmax", class_il_softmax, SPANS)
        self.variant = check_choice("variant", variant, VARIANTS)
        for key, want in VARIANT_OPTIONS.get(variant, {}).items():
            if getattr(self, key) != want:
                raise ValueError(f"{key} must be {want!r} with variant={variant!r} (van de Ven's "
                                 f"{variant[-4:]} code); got {getattr(self, key)!r}.")
        self.teacher: Optional[nn.Module] = None
        self.n_experiences = 0  # finished experiences (the task count)
        self.old_classes: Dict[int, List[int]] = {}  # task label -> classes trained under it
        self._current_classes: Dict[int, List[int]] = {}  # the same, experience being trained
        self._pending_teacher: Optional[Dict[str, torch.Tensor]] = None  # loaded, not rebuilt
        self._tap, self._tap_handle = None, None  # FeatureTap on the backbone, its hook

    def alpha_at(self, exp_index: int) -> float:
        if not isinstance(self.alpha, list):
            return self.alpha
        if exp_index >= len(self.alpha):
            raise ValueError(f"alpha lists {len(self.alpha)} values (one per experience) but "
                             f"experience {exp_index} (0-based) is being trained; give one "
                             "value per experience.")
        return self.alpha[exp_index]

    def kd_weight(self, t: int, new_classes: bool = False) -> float:
        """alpha_e w_t of Eq. L for task t (from 1); ``new_classes``: the experience brings
        classes new to a single head (class-IL: "vandeven2022" drops the (t - 1))."""
        a = self.alpha_at(t - 1)
        if self.schedule == "constant" or (new_classes and self.variant == "vandeven2022"):
            return a
        w_ce, w_kd = vandeven_weights(t)
        return a * w_kd / w_ce  # = alpha (t - 1)

    def distillation_term(self, model: nn.Module, x: Tensor,
                          student_output: Optional[Tensor] = None,
                          task_labels: Optional[Tensor] = None, features: Optional[Tensor] = None,
                          current_classes: Optional[Sequence[int]] = None) -> Tensor:
        """reduce_k KD_k of ``model`` on ``x`` (0 without teacher). Computed when None: the
        ``student_output``, the backbone's ``features``, the experience's ``current_classes``."""
        self._ensure_teacher(model)
        if self.teacher is None:
            return torch.zeros((), device=x.device)
        layout, per_column = head_layout(model, "LwF"), self.variant == "vandeven2018"
        if layout != "single":  # one term per old task label, on its head's classes
            terms = [kd_loss(s, q, self.temperature, self.scale_t2, per_column) for s, q in
                     task_output_pairs(model, self.teacher, x, layout, self.old_classes, features)]
        else:
            if task_labels is None:  # single head: every sample goes through the same head
                task_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            out = student_output if student_output is not None else \
                avalanche_forward(model, x, task_labels)
            with torch.no_grad():
                q = avalanche_forward(self.teacher, x, task_labels)
            old = sorted(set().union(*self.old_classes.values()))
            if self.variant == "vandeven2022":  # every output of the head, unpadded
                s = out
            elif self.class_il_softmax == "old":
                s, q = out[:, old], q[:, old]
            else:  # "seen": old + current classes; kd_loss pads the teacher's with zeros
                if current_classes is None:
                    current_classes = set().union(*self._current_classes.values())
                new = sorted(set(int(c) for c in current_classes) - set(old))
                s, q = out[:, old + new], q[:, old]
            terms = [kd_loss(s, q, self.temperature, self.scale_t2, per_column)]
        total = torch.stack(terms).sum()
        return total / len(terms) if self.task_reduction == "mean" else total

    def _ensure_teacher(self, model: nn.Module) -> None:
        """Build the teacher restored by ``load_state_dict`` from a copy of ``model``."""
        if self._pending_teacher is None:
            return
        # it may lack only what Avalanche added for the current task (a head, its unit mask)
        skip = tuple(task_specific_prefixes(model))
        self.teacher = restore_teacher(
            model, self._pending_teacher, "LwF",
            may_lack=lambda k: bool(skip and k.startswith(skip)) or ".active_units_T" in f".{k}")
        self._pending_teacher = None

    def _new_classes(self, model: nn.Module) -> bool:
        """Whether the current experience brings classes not trained before on a single head."""
        if self.variant != "vandeven2022":
            return False  # only that variant's weight depends on it
        new = set().union(*self._current_classes.values()) - set().union(*self.old_classes.values())
        return bool(new) and head_layout(model, "LwF") == "single"

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        self._ensure_teacher(strategy.model)

    def before_training_exp(self, strategy, **kwargs):
        self._ensure_teacher(strategy.model)
        self.alpha_at(self.n_experiences)  # a too-short alpha list fails before any training
        ds = strategy.experience.dataset
        self._current_classes = {int(t): sorted(int(c) for c in ds.task_set[t].targets.uniques)
                                 for t in ds.targets_task_labels.uniques}
        self._remove_tap()
        if self.teacher is not None:
            self.teacher.to(strategy.device)
            if head_layout(strategy.model, "LwF") == "heads":  # reuse the forward's features
                self._tap = FeatureTap("train")
                self._tap_handle = strategy.model.backbone.register_forward_hook(self._tap)

    def before_backward(self, strategy, **kwargs):
        if self.teacher is None and self._pending_teacher is None:
            return
        weight = self.kd_weight(self.n_experiences + 1, self._new_classes(strategy.model))
        if weight == 0.0:
            return
        feats = self._tap.take(strategy.mb_x) if self._tap is not None else None
        strategy.loss += weight * self.distillation_term(
            strategy.model, strategy.mb_x, student_output=strategy.mb_output,
            task_labels=strategy.mb_task_id, features=feats)

    def after_training_exp(self, strategy, **kwargs):
        self._remove_tap()  # before the copy: the teacher must not carry the hook
        ds = strategy.experience.dataset
        for t in ds.targets_task_labels.uniques:
            classes = set(int(c) for c in ds.task_set[t].targets.uniques)
            self.old_classes[int(t)] = sorted(classes | set(self.old_classes.get(int(t), [])))
        self.n_experiences += 1
        self._pending_teacher, self._current_classes = None, {}
        self.teacher = frozen_copy(strategy.model)

    def after_training(self, strategy, **kwargs):
        self._remove_tap()

    def _remove_tap(self):
        if self._tap_handle is not None:
            self._tap_handle.remove()
        self._tap_handle, self._tap = None, None

    def state_dict(self) -> Dict:
        return {**owned_by(self), "config": {k: getattr(self, k) for k in SETTINGS},
                "n_experiences": self.n_experiences,
                "old_classes": {k: list(v) for k, v in self.old_classes.items()},
                "teacher": teacher_state(self.teacher, self._pending_teacher)}

    def load_state_dict(self, state: Dict) -> None:
        check_owner(self, state)
        config = state["config"]  # states saved before a setting existed lack it: check the rest
        check_settings(self, {**state, **config}, config)
        self.n_experiences = int(state["n_experiences"])
        self.old_classes = {int(k): [int(c) for c in v] for k, v in state["old_classes"].items()}
        self.teacher = None  # rebuilt from the model at the next hook (or distillation_term)
        self._pending_teacher = teacher_state(None, state["teacher"])  # a copy, or None
