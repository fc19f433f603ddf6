"""Deep Generative Replay (DGR) and DGR+distill, in van de Ven's Split MNIST form.

Name: ``generative_replay``. Scenarios: task-, domain- and class-IL. Task labels: not needed
(per-task heads get the replayed inputs once per past task label).

Papers: H. Shin, J. K. Lee, J. Kim, J. Kim, "Continual Learning with Deep Generative Replay",
NeurIPS 2017 (a generator and a solver; the generator's samples, labelled by the previous
solver, are replayed with the new data). Protocol and code: G. M. van de Ven & A. S. Tolias,
"Three scenarios for continual learning", arXiv:1904.07734, 2019, and G. M. van de Ven,
T. Tuytelaars & A. S. Tolias, "Three types of incremental learning", Nature Machine
Intelligence 2022; code GMvandeVen/continual-learning (checked files and commits in
docs/methods/generative_replay.md).

Training experience t (t = 1, 2, ...), at every step with incoming minibatch (x, y):

    x~ <- m samples of G_{t-1}                      (frozen copy of the generator after t - 1)
    per past head k (task-IL) or once (one head):
        q = f_{t-1}(x~, k)                          (frozen copy of the solver after t - 1)
        hard: y~ = argmax q                         soft (distill=True): p~ = softmax(q / T)
    L_rep = CE(f(x~, k), y~)      or     T^2 * mean_n sum_c -p~_c log softmax(f(x~, k) / T)_c
    L     = (1/t) CE(f(x), y) + (1 - 1/t) L_rep      (t = 1: CE alone)       # Eq. W
    G     <- one Adam step on (1/t) L_VAE(x) + (1 - 1/t) L_VAE(x~)          (core.vae)

As his ``train_a_batch``: CE and KD are batch means, the task-IL replay loss is the mean over
the past heads (``models/classifier.py``; 2019: ``encoder.py``), the generator trains for as
many steps as the solver (``--g-iters`` = ``--iters``) on the same replayed inputs. Which
classes a loss spans is the model head's: ``head.mask="seen"`` (the classes seen so far, the
teacher's old ones; his 2019 ``active_classes`` for class-IL, teacher scores cut to the old
classes and padded with zero probabilities) or ``"none"`` (all outputs, his 2022 default
``--active-classes=all``). Labels are the argmax over the teacher's outputs (its masked
classes have probability 0). Mechanics (generator lifecycle, rows, weighting, state):
``cl_plugins.core.generative.GenerativeReplayBase``; the generator protocol:
``cl_plugins.core.generator``; the VAE: ``cl_plugins.core.vae``.

Hooks: ``before_train_dataset_adaptation`` / ``before_training_exp`` (restore the teacher,
head layout, devices), ``before_training_iteration`` (records the stream rows; builds the VAE at
the first step), ``before_forward`` (appends the replayed rows), ``before_backward`` (Eq. W),
``after_training_iteration`` (generator step), ``after_training_exp`` (frozen copies).

Hyper-parameters (defaults: his 2019 Split MNIST settings, ``main.py`` / ``param_values.py``):

- ``distill`` (False): soft targets (``--distill``, DGR+distill) instead of hard labels;
- ``temperature`` (2.0, > 0): T (``--temp``); ``scale_t2`` (True): the T^2 factor of his 2019
  ``utils.loss_fn_kd``; his 2022 ``loss_fn_kd`` has ``norm=False`` (no T^2): set False;
- ``replay_mb_size`` (None = ``train_mb_size``, his ``batch_size``): m;
- ``loss_weighting`` ("vandeven" = Eq. W; "batch" = one mean over all rows);
- ``generator`` (None = the VAE below; or any module of the ``core.generator`` protocol);
- ``vae_fc_layers`` 3, ``vae_fc_units`` 400, ``vae_z_dim`` 100, ``vae_lr`` 0.001 (Adam, betas
  (0.9, 0.999)): his ``--g-fc-lay``/``--g-fc-uni``/``--g-z-dim``/``--lr-gen`` defaults;
- ``x_range`` (None = each channel's min and max over the batches seen; [lo, hi] or one pair
  per channel: fixed, an input outside raises; his ToTensor MNIST: [0, 1]): the inputs' range,
  which the VAE maps to [0, 1] for its BCE (``cl_plugins.core.vae``);
- ``seed`` (None = drawn from the global RNG): the plugin's generator (VAE initialisation,
  sampling and reparameterisation noise), saved in ``state_dict()``.

Deviations: a task-IL copy runs the backbone once per past head (his Classifier runs it once
and slices its active classes; the same values, more compute); KD is his soft-target
cross-entropy (``core.distill.kd_loss`` is a KL: same gradient, other values); with ``--g-iters`` != ``--iters`` his loop runs
max(iters, g_iters) steps and each model stops at its own count (``train_task_based.py``; not
modelled: one generator step per solver step); the plugin does not augment the replayed rows
(an augmentation plugin listed after it augments the whole extended batch). His XdG masks,
conditional generators and replay-through-feedback are not modelled.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_plugins.core.checks import check_bool, check_positive
from cl_plugins.core.generative import BASE_SETTINGS, GenerativeReplayBase


def soft_target_ce(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                   scale_t2: bool) -> torch.Tensor:
    """mean_n sum_c -softmax(teacher/T)_c log softmax(student/T)_c, times T^2 if ``scale_t2``
    (his ``loss_fn_kd``). Classes the teacher masks have probability 0 and add nothing."""
    p = F.softmax(teacher.detach() / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    loss = -(p * log_q).sum(dim=1).mean()
    return loss * temperature ** 2 if scale_t2 else loss


class GenerativeReplayPlugin(GenerativeReplayBase, supports_distributed=True):
    METHOD_NAME = "generative_replay"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"distill": {"values": [False, True]},
                   "temperature": {"values": [1.0, 2.0, 4.0]},
                   "vae_z_dim": {"values": [32, 100]}}
    PAPER = ("Deep Generative Replay (Shin et al., NeurIPS 2017), in van de Ven & Tolias 2019 / "
             "van de Ven et al., Nat. Mach. Intell. 2022 form")
    SUMMARY = ("a VAE trained on the data and its own replay generates inputs that the previous "
               "solver labels (hard, or soft with distill); weights 1/t current, 1 - 1/t replay")
    SETTINGS = BASE_SETTINGS + ("distill", "temperature", "scale_t2")

    def __init__(self, distill: bool = False, temperature: float = 2.0, scale_t2: bool = True,
                 replay_mb_size: Optional[int] = None, loss_weighting: str = "vandeven",
                 generator: Optional[nn.Module] = None, vae_fc_layers: int = 3,
                 vae_fc_units: int = 400, vae_z_dim: int = 100, vae_lr: float = 0.001,
                 x_range: Optional[Sequence] = None, seed: Optional[int] = None):
        super().__init__(generator, replay_mb_size, loss_weighting, seed, vae_fc_layers,
                         vae_fc_units, vae_z_dim, vae_lr, x_range)
        self.distill = check_bool("distill", distill)
        self.temperature = float(check_positive("temperature", temperature))
        self.scale_t2 = check_bool("scale_t2", scale_t2)

    def replay_loss(self, out: torch.Tensor, teacher_out: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        if self.distill:  # L_rep, soft
            return soft_target_ce(out, teacher_out, self.temperature, self.scale_t2)
        return F.cross_entropy(out, y)  # L_rep, hard
