"""Generative negative replay: generated inputs of old classes serve only as negatives.

Name: ``negative_replay``. Scenarios: class-IL (one head over all classes). Task labels: not
needed.

Paper: G. Graffieti, D. Maltoni, L. Pellegrini, V. Lomonaco, "Generative negative replay for
continual learning", Neural Networks 162:369-383, 2023 (arXiv:2204.05842). Its abstract: the
generated data "are usually not able to improve the classification accuracy for the old
classes" but "can be effective as negative examples (or antagonists) to better learn the new
classes", above all when an experience holds one or a few classes.

NOT VERIFIED: the paper's exact rule. Only the abstract of the paper could be read with the
tools of this session (the stored copies of arXiv 2204.05842 return the abstract and the first
lines of the introduction), and no code by the authors was found
(``ggraffieti/brain-inspired-replay`` is a fork of van de Ven's BI-R code with ImageNet runs
and no negative replay; searched: the ``pages``, ``docs`` and ``code`` corpora, repositories
under ``ggraffieti`` and ``vlomonaco``). What follows is the closest reading of the abstract,
chosen here (search trail: docs/methods/negative_replay.md):

Training experience t with current classes C, at every step with incoming minibatch (x, y):

    x~ <- m samples of G_{t-1}              (frozen generator after t - 1, as generative_replay)
    y~ = argmax_{c in O} f_{t-1}(x~)_c      (O: classes of the finished experiences)
    for each replayed row:   z = f(x~)
        L_neg = -log( exp(sg(z_y~)) / (exp(sg(z_y~)) + sum_{c in C} exp(z_c)) )     # Eq. N
    L = (n CE(f(x), y) + r mean L_neg) / (n + r)      (loss_weighting="batch")      # Eq. B

sg = stop-gradient. A replayed row's loss spans only its pseudo-label's logit (held constant)
and the current classes' logits; its gradient pushes every current class's logit down in
proportion to its probability, and nothing else: no old class's logit is raised or lowered by
the replayed rows, so the generated inputs never act as positives for the old classes (which,
says the abstract, they usually cannot improve), only as negatives for the current ones. The anchor
sg(z_y~) makes the push stop once the current classes are well below the old class the
previous solver saw in the sample. ``loss_weighting="vandeven"`` weights the two parts 1/t and
1 - 1/t instead, as ``generative_replay``.

Mechanics shared with ``generative_replay`` (VAE and its training on current + replayed inputs,
frozen copies, appended rows, state): ``cl_plugins.core.generative.GenerativeReplayBase``; the
generator protocol: ``cl_plugins.core.generator``; the VAE: ``cl_plugins.core.vae``.

Hooks: as ``generative_replay`` (``before_training_exp`` also refuses per-task heads).

Hyper-parameters: ``replay_mb_size`` (None = ``train_mb_size``): m; ``loss_weighting``
("batch" = Eq. B, or "vandeven"); ``generator``, ``vae_fc_layers`` 3, ``vae_fc_units`` 400,
``vae_z_dim`` 100, ``vae_lr`` 0.001, ``x_range``, ``seed``: the generator, as
``generative_replay`` (van de Ven's Split MNIST VAE; the paper's own generators and their
settings are not known here).

Deviations (beyond the unverified rule above): the paper's generators, networks and
protocols (CORe50, ImageNet-1000) are not modelled; here a VAE generates inputs, as
``generative_replay``. The pseudo-label comes from the previous solver (how the paper attaches
a class to a generated input is not known here).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_plugins.core.generative import BASE_SETTINGS, GenerativeReplayBase
from cl_plugins.core.heads_layout import head_layout


def negative_replay_loss(out: torch.Tensor, y: torch.Tensor,
                         current: Sequence[int]) -> torch.Tensor:
    """Eq. N, mean over the rows: cross-entropy of the label ``y`` (its logit detached) against
    the ``current`` classes' logits. ``y`` must not be a current class."""
    cols = torch.as_tensor(list(current), device=out.device, dtype=torch.long)
    anchor = out.gather(1, y.reshape(-1, 1)).detach()  # sg(z_y~)
    logits = torch.cat([anchor, out.index_select(1, cols)], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(y))  # Eq. N


class NegativeReplayPlugin(GenerativeReplayBase, supports_distributed=True):
    METHOD_NAME = "negative_replay"
    SCENARIOS = ("class",)
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"replay_mb_size": {"values": [32, 64, 128]},
                   "loss_weighting": {"values": ["batch", "vandeven"]}}
    PAPER = ("Generative Negative Replay (Graffieti, Maltoni, Pellegrini & Lomonaco, Neural "
             "Networks 2023)")
    SUMMARY = ("generated inputs of old classes enter the loss only as negatives for the current "
               "classes (their label's logit held constant)")
    SETTINGS = BASE_SETTINGS

    def __init__(self, replay_mb_size: Optional[int] = None, loss_weighting: str = "batch",
                 generator: Optional[nn.Module] = None, vae_fc_layers: int = 3,
                 vae_fc_units: int = 400, vae_z_dim: int = 100, vae_lr: float = 0.001,
                 x_range: Optional[Sequence] = None, seed: Optional[int] = None):
        super().__init__(generator, replay_mb_size, loss_weighting, seed, vae_fc_layers,
                         vae_fc_units, vae_z_dim, vae_lr, x_range)

    def before_training_exp(self, strategy, **kwargs):
        if head_layout(strategy.model, type(self).__name__) != "single":
            raise ValueError("NegativeReplayPlugin needs one head over all classes (class-IL); "
                             "the model has per-task heads")
        super().before_training_exp(strategy, **kwargs)
        if set(self.current_classes) & set(self.old_classes):
            raise ValueError(f"NegativeReplayPlugin is for class-IL: experience classes "
                             f"{self.current_classes} were already trained "
                             f"({self.old_classes})")

    def label(self, teacher_out: torch.Tensor) -> torch.Tensor:
        """The previous solver's most probable class among the old classes."""
        old = torch.as_tensor(self.old_classes, device=teacher_out.device, dtype=torch.long)
        return old[teacher_out.index_select(1, old).argmax(dim=1)]

    def replay_loss(self, out: torch.Tensor, teacher_out: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        return negative_replay_loss(out, y, self.current_classes)
