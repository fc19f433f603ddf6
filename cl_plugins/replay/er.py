"""Experience Replay (ER) with a reservoir or class-balanced memory, online, per minibatch.

Name: ``er``. Scenarios: task-, domain- and class-IL. Task labels: not needed (stored with every
sample, so task-IL multi-head models route replayed samples to their own head).

Papers: A. Chaudhry, M. Rohrbach, M. Elhoseiny, T. Ajanthan, P. K. Dokania, P. H. S. Torr,
M. Ranzato, "On Tiny Episodic Memories in Continual Learning", arXiv:1902.10486, 2019 (ER with a
reservoir memory, each incoming minibatch concatenated with a memory minibatch); protocol and
code as the ER baseline of P. Buzzega, M. Boschini, A. Porrello, D. Abati, S. Calderara, "Dark
Experience for General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020 (Mammoth's
``models/er.py``). The class-balanced memory is CBRS (Chrysakis & Moens, ICML 2020).

Algorithm, at every training step with incoming minibatch B = (x, y, t) of size n:

    (x_m, y_m, t_m) <- m samples drawn uniformly without replacement from memory M (if M != {})
    loss = CE(f([x; x_m], [t; t_m]), [y; y_m])           (mean over the n + m samples)
    theta <- optimizer step on loss
    M <- policy(M, B)                                      (reservoir: Vitter's algorithm R)

i.e. the replayed samples simply join the minibatch, so the strategy's own criterion covers them
and any other plugin's loss term composes with them. m = ``replay_mb_size`` (default: the
strategy's ``train_mb_size``, Mammoth's ``minibatch_size = batch_size``). Inserted samples are the
incoming ones (never the replayed ones) and only after the optimizer step, so the memory batch of
step s never contains step s's own samples (as Mammoth). The first step of the first experience
trains on B alone.

Hooks: ``before_training_exp`` (dataloader-ownership check: ER reads the incoming minibatches as
the stream, so it refuses a plugin that replaces the dataloader, see
``cl_plugins.core.replay_loader``), ``before_training_iteration`` (records the incoming
minibatch before any plugin extends it), ``before_forward`` (appends the memory batch to
``strategy.mbatch``: rows 0..n-1 stay the stream), ``after_training_iteration`` (memory update).
ER never touches ``strategy.dataloader``.

Hyper-parameters (defaults = ANCHORS R1, buffer 500, DER paper Table 2 / Mammoth):

- ``mem_size`` (int >= 1, default 500): memory slots. R1 uses 200 / 500 (lr 0.2 / 0.2 on
  Rotated MNIST); S1 uses 1,100 / 4,400; S2 100 per class.
- ``replay_mb_size`` (int >= 1 or None = ``train_mb_size``, default None).
- ``policy`` (default ``"reservoir"``): ``"reservoir"``, ``"class_balanced"`` (CBRS) or
  ``"greedy_class_balanced"`` (GDumb's sampler); see ``cl_plugins.core.buffer``.
- ``seed`` (int >= 0 or None, default None): seed of the memory's generator (sampling and
  reservoir draws); None draws it from torch's global RNG at construction, so it follows the run
  seed. Its state is part of ``state_dict()``.
- ``x_dtype`` (None, ``"float32"``, ``"float16"``, ..., default None = the inputs' dtype):
  storage dtype of the inputs; see the memory accounting in ``cl_plugins.core.buffer``.

Choices and deviations:

- Augmentation: Mammoth stores non-augmented inputs and augments replayed ones. Here the incoming
  inputs are recorded before any plugin changes them, and a ``BatchAugmentPlugin`` placed after
  ER in the plugin list (the runner's order) augments the whole extended batch; one placed
  before ER has already run, so ER augments its memory batch itself with the same settings.
- Inputs are stored as float32 by default (our benchmarks hold normalised float tensors; the
  uint8 source is not available from the Avalanche datasets): 3,136 bytes per 28x28 sample.
- Cost: a step trains on n + m samples, so with m = ``train_mb_size`` it costs up to ~2x
  naive's (measured: 2.05x on the R1 MLP 100-100, 1.46x on the S1 MLP-400, batch 128); the
  memory update and the draw take ~0.1 ms per step (the class-balanced loop included).
- Several epochs over one experience offer its samples to the memory again at every pass (as
  Mammoth's multi-epoch settings do); the online protocols (R1) train a single epoch.
- Task-IL multi-head models: the replayed samples carry their task labels; Avalanche's
  ``MultiTaskModule.forward`` (our ``ClassifierNet`` head) splits a mixed-task batch by task
  label, and the backbone runs once on the whole batch.
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.augment import random_crop_flip
from cl_plugins.core.buffer import POLICIES, ReplayBuffer
from cl_plugins.core.checks import check_choice, check_int
from cl_plugins.core.replay_loader import (augmenter_before, check_minibatch,
                                           require_stream_batches)


class ERPlugin(SupervisedPlugin):
    METHOD_NAME = "er"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    DEFAULTS: dict = {"mem_size": 500, "replay_mb_size": None, "policy": "reservoir",
                      "seed": None, "x_dtype": None}
    SWEEP: dict = {"mem_size": {"values": [200, 500, 1100, 4400]},
                   "replay_mb_size": {"values": [10, 32, 128]},
                   "policy": {"values": ["reservoir", "class_balanced"]}}
    PAPER = ("Experience Replay (Chaudhry et al. 2019; ER baseline of Buzzega et al., "
             "NeurIPS 2020)")
    SUMMARY = ("each minibatch is concatenated with a random minibatch of a reservoir (or "
               "class-balanced) memory, updated online after every step")
    SETS_DATALOADER = False  # extends the minibatch in before_forward instead
    supports_distributed = False

    def __init__(self, mem_size: int = 500, replay_mb_size: Optional[int] = None,
                 policy: str = "reservoir", seed: Optional[int] = None,
                 x_dtype: Optional[str] = None):
        super().__init__()
        check_int("mem_size", mem_size, 1)
        if replay_mb_size is not None:
            check_int("replay_mb_size", replay_mb_size, 1)
        check_choice("policy", policy, POLICIES)
        if seed is not None:
            check_int("seed", seed, 0)
        self.mem_size, self.replay_mb_size, self.policy = mem_size, replay_mb_size, policy
        self.buffer = ReplayBuffer(mem_size, policy=policy, seed=seed, x_dtype=x_dtype)
        self._incoming = None  # (x, y, t) of the current step, before any extension
        self._augment = None

    def before_training_exp(self, strategy, **kwargs):
        require_stream_batches(strategy, self)
        self._augment = augmenter_before(strategy, self)

    def before_training_iteration(self, strategy, **kwargs):
        check_minibatch(type(self).__name__, strategy.mbatch)
        x, y, t = strategy.mbatch
        self._incoming = (x, y, t)

    def before_forward(self, strategy, **kwargs):
        if self.buffer.is_empty:
            return
        m = self.replay_mb_size or strategy.train_mb_size
        mem = self.buffer.sample(m, device=strategy.device)
        xm = mem.x
        if self._augment is not None:
            xm = random_crop_flip(xm, self._augment.padding, self._augment.flip_p)
        mb = strategy.mbatch
        mb[0] = torch.cat([mb[0], xm])
        mb[1] = torch.cat([mb[1], mem.y])
        mb[2] = torch.cat([mb[2], mem.t])

    def after_training_iteration(self, strategy, **kwargs):
        x, y, t = self._incoming
        self.buffer.add(x, y, t)
        self._incoming = None

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
