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
trains on B alone. Variant of van de Ven et al. 2022 (``--replay=buffer``, protocol S2), set by
``mem_per_class``, ``loss_weighting="vandeven"`` and ``batch_sampling="per_task"`` below: M is
filled with a fixed number of samples per class at the end of each experience, and

    loss = (1/t) CE(f(x, t), y) + (1 - 1/t) CE(f(x_m, t_m), y_m)     (t-th experience)

Hooks: ``before_training_exp`` (dataloader-ownership check: ER reads the incoming minibatches as
the stream, so it refuses a plugin that replaces the dataloader, see
``cl_plugins.core.replay_loader``), ``before_training_iteration`` (records the incoming
minibatch before any plugin extends it), ``before_forward`` (appends the memory batch to
``strategy.mbatch``: rows 0..n-1 stay the stream), ``before_backward`` (``"vandeven"`` loss
weighting only), ``after_training_iteration`` (online memory update), ``after_training_exp``
(experience-end memory update; experience count). ER never touches ``strategy.dataloader``.

Hyper-parameters (defaults = ANCHORS R1, buffer 500, DER paper Table 2 / Mammoth):

- ``mem_size`` (int >= 1, or None together with ``mem_per_class``; default 500): slots of the
  online memory. R1 uses 200 / 500 (lr 0.2 / 0.2 on Rotated MNIST); S1 uses 1,100 / 4,400.
- ``mem_per_class`` (int >= 1 or None, default None = the online memory above): van de Ven et
  al.'s memory (code GMvandeVen/continual-learning, ``--replay=buffer``, ``--budget``; S2: 100).
  Nothing is stored during an experience; at its end (``after_training_exp``)
  ``min(mem_per_class, n_c)`` samples of every class c of the experience are drawn uniformly
  without replacement from its training data (his ``construct_memory_set`` with random
  selection) and added for good, so the memory grows by ``mem_per_class`` per class seen and
  the current experience is never replayed while it is trained on. In domain-IL a label seen
  in two experiences counts twice (his code keeps one set per class of every context). Needs
  ``mem_size=None`` and ``policy="reservoir"`` (the online memory's settings, unused here);
  ``x_dtype``, ``x_range`` and ``seed`` apply. His ``--use-full-capacity`` (a fixed total split
  over the classes seen) is not modelled.
- ``replay_mb_size`` (int >= 1 or None = ``train_mb_size``, default None).
- ``policy`` (default ``"reservoir"``): ``"reservoir"``, ``"class_balanced"`` (CBRS) or
  ``"greedy_class_balanced"`` (GDumb's sampler), updated online every step, see
  ``cl_plugins.core.buffer``; or ``"per_experience"``: Hsu et al.'s Naive_Rehearsal memory
  (GT-RIPL/Continual-Learning-Benchmark, protocol S1): nothing is stored during an experience;
  at its end a uniform random subset is kept, and ``mem_size`` is split equally over the
  experiences seen (``mem_size // k`` each after k experiences, older subsets truncated; the
  same episodic memory as GEM's ``mem_size``), so only *past* experiences are replayed. The
  online policies also replay the current experience's stored samples (at the second
  experience about half of a full memory): on S1 domain-IL that costs ~0.6 points
  (class_balanced 94.57 +- 0.20 vs the published 95.16 +- 0.49, seeds 0-2).
- ``seed`` (int >= 0 or None, default None): seed of the memory's generator (sampling and
  reservoir draws); None draws it from torch's global RNG at construction, so it follows the run
  seed. Its state is part of ``state_dict()``.
- ``x_dtype`` (None, ``"float32"``, ``"float16"``, ``"uint8"``, ..., default None = the
  inputs' dtype): storage dtype of the inputs; see the memory accounting in
  ``cl_plugins.core.buffer``.
- ``x_range`` (None, ``[lo, hi]`` or ``[[lo_c, ...], [hi_c, ...]]``, default None): with
  ``x_dtype="uint8"``, the input values of pixel levels 0 and 255 (``[0.0, 1.0]`` without
  normalisation; ``cl_plugins.core.buffer.grid_range(mean, std)`` for normalised inputs): the
  memory stores every input value as its 1-byte pixel level (784 bytes per 28x28 image instead
  of 3,136) and replays the float32 values exactly; inputs off that grid raise a ValueError.
- ``loss_weighting`` (default ``"batch"``): ``"batch"`` = the replayed samples join the
  minibatch and the criterion averages over all n + m samples (Chaudhry et al., Mammoth), i.e.
  weights n / (n + m) and m / (n + m); ``"vandeven"`` = separate means over the stream rows and
  the replayed rows, weighted 1/t and 1 - 1/t while training the t-th experience (t counted
  from 1): van de Ven et al.'s ``rnt * loss_cur + (1 - rnt) * loss_replay`` with
  ``rnt = 1/context``. Done at ``before_backward`` by replacing the criterion's share of
  ``strategy.loss`` (recomputed from the same outputs and subtracted) with the two weighted
  means, so terms that other plugins add stay unweighted, as the weight penalties in his code.
  Exact up to float rounding; assumes a per-sample-mean criterion (the strategy's own is used).
- ``batch_sampling`` (default ``"uniform"``): how the m replayed samples are drawn:
  ``"uniform"`` = m distinct samples from the whole memory; ``"per_task"`` = ceil(m / K)
  distinct samples from each of the K task labels in memory (``ReplayBuffer.sample_per_task``):
  van de Ven et al.'s task-IL replay (one batch of ceil(128 / K) per past task); with a single
  task label (domain-/class-IL) it is ``"uniform"``, same draws included, which is also his
  domain-/class-IL replay (one batch of 128 from the whole memory).

Choices and deviations:

- Augmentation: Mammoth stores non-augmented inputs and augments replayed ones. Here the incoming
  inputs are recorded before any plugin changes them, and a ``BatchAugmentPlugin`` placed after
  ER in the plugin list (the runner's order) augments the whole extended batch; one placed
  before ER has already run, so ER augments its memory batch itself with the same settings.
- Inputs are stored as float32 by default (our benchmarks hold normalised float tensors; the
  uint8 source is not available from the Avalanche datasets): 3,136 bytes per 28x28 sample;
  ``x_dtype="uint8"`` with ``x_range`` stores the pixel levels (784 bytes).
- Cost: a step trains on n + m samples, so with m = ``train_mb_size`` it costs up to ~2x
  naive's (measured: 2.05x on the R1 MLP 100-100, 1.46x on the S1 MLP-400, batch 128); the
  memory update and the draw take ~0.1 ms per step (the class-balanced loop included).
- Several epochs over one experience offer its samples to the memory again at every pass (as
  Mammoth's multi-epoch settings do); the online protocols (R1) train a single epoch.
- Task-IL multi-head models: the replayed samples carry their task labels; Avalanche's
  ``MultiTaskModule.forward`` (our ``ClassifierNet`` head) splits a mixed-task batch by task
  label, and the backbone runs once on the whole batch.
- van de Ven et al.'s replay draws its batches epoch-wise from a shuffled ``DataLoader`` over the
  memory (``drop_last``, a new loader after each pass), here every step draws afresh: the same
  marginal distribution, without the no-repeat-within-a-pass coupling between steps. His
  task-IL replay loss is the mean over past tasks of per-task means; with ``"per_task"`` the
  tasks contribute equal counts, so this is the plain mean over the replayed rows (as long as
  every task holds at least ceil(m / K) samples: 200 >= 128 on S2). His forward runs the
  replayed and the current batch separately (no BatchNorm in the S2 MLP, so no difference).
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.augment import random_crop_flip
from cl_plugins.core.buffer import POLICIES, ReplayBuffer, _dtype, check_x_range
from cl_plugins.core.checks import check_choice, check_int
from cl_plugins.core.replay_loader import (augmenter_before, check_minibatch,
                                           require_stream_batches)
from cl_plugins.core.state import check_owner, owned_by
from cl_plugins.replay.gem import _EpisodicMemory

LOSS_WEIGHTINGS = ("batch", "vandeven")
BATCH_SAMPLINGS = ("uniform", "per_task")


class ERPlugin(SupervisedPlugin):
    METHOD_NAME = "er"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    DEFAULTS: dict = {"mem_size": 500, "replay_mb_size": None, "policy": "reservoir",
                      "seed": None, "x_dtype": None, "mem_per_class": None,
                      "loss_weighting": "batch", "batch_sampling": "uniform", "x_range": None}
    SWEEP: dict = {"mem_size": {"values": [200, 500, 1100, 4400]},
                   "replay_mb_size": {"values": [10, 32, 128]},
                   "policy": {"values": ["reservoir", "class_balanced"]}}
    PAPER = ("Experience Replay (Chaudhry et al. 2019; ER baseline of Buzzega et al., "
             "NeurIPS 2020)")
    SUMMARY = ("each minibatch is concatenated with a random minibatch of a reservoir (or "
               "class-balanced) memory, updated online after every step")
    SETS_DATALOADER = False  # extends the minibatch in before_forward instead
    supports_distributed = False

    def __init__(self, mem_size: Optional[int] = 500, replay_mb_size: Optional[int] = None,
                 policy: str = "reservoir", seed: Optional[int] = None,
                 x_dtype: Optional[str] = None, mem_per_class: Optional[int] = None,
                 loss_weighting: str = "batch", batch_sampling: str = "uniform",
                 x_range=None):
        super().__init__()
        if replay_mb_size is not None:
            check_int("replay_mb_size", replay_mb_size, 1)
        check_choice("policy", policy, POLICIES + ("per_experience",))
        if seed is not None:
            check_int("seed", seed, 0)
        check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        check_choice("batch_sampling", batch_sampling, BATCH_SAMPLINGS)
        if mem_per_class is None:
            if mem_size is None:
                raise ValueError("mem_size=None needs mem_per_class (the memory filled at the end "
                                 "of each experience); set mem_size >= 1 for the online memory")
            check_int("mem_size", mem_size, 1)
        else:
            check_int("mem_per_class", mem_per_class, 1)
            if mem_size is not None:
                raise ValueError(f"mem_per_class={mem_per_class} gives a memory that grows by "
                                 "mem_per_class per class seen; set mem_size=None (mem_size, "
                                 f"here {mem_size!r}, is the size of the online memory)")
            if policy != "reservoir":
                raise ValueError(f"policy={policy!r} applies to the online memory (mem_size); "
                                 "with mem_per_class the memory is filled at the end of each "
                                 "experience, per class: leave policy at 'reservoir'")
        self.mem_size, self.replay_mb_size, self.policy = mem_size, replay_mb_size, policy
        self.mem_per_class = mem_per_class
        self.loss_weighting, self.batch_sampling = loss_weighting, batch_sampling
        if policy == "per_experience":
            # Hsu et al.'s Naive_Rehearsal budget: filled at each experience's end, mem_size
            # split equally over the experiences seen (GEM's episodic memory, shared)
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            self.buffer = None
            dtype = _dtype("x_dtype", x_dtype)
            self.memory = _EpisodicMemory(None, mem_size, seed, x_dtype=dtype,
                                          x_range=check_x_range(x_range, dtype))
        elif mem_per_class is None:
            self.buffer = ReplayBuffer(mem_size, policy=policy, seed=seed, x_dtype=x_dtype,
                                       x_range=x_range)
            self.memory = None
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            check_int("seed", seed, 0)
            self.buffer = None
            dtype = _dtype("x_dtype", x_dtype)
            self.memory = _EpisodicMemory(None, None, seed, patterns_per_class=mem_per_class,
                                          x_dtype=dtype, x_range=check_x_range(x_range, dtype))
        self.n_trained = 0  # experiences trained so far (t - 1 while training the t-th)
        self._incoming = None  # (x, y, t) of the current step, before any extension
        self._n_replayed = 0  # rows appended this step
        self._augment = None

    @property
    def store(self) -> Optional[ReplayBuffer]:
        """The buffer replayed from: the online one, or the experience-end memory's (None
        before its first experience ends)."""
        return self.buffer if self.memory is None else self.memory.buffer

    @staticmethod
    def vandeven_weights(t: int) -> tuple:
        """(w_current, w_replay) = (1/t, 1 - 1/t) while training the t-th experience."""
        check_int("t", t, 1)
        return 1.0 / t, 1.0 - 1.0 / t

    def before_training_exp(self, strategy, **kwargs):
        require_stream_batches(strategy, self)
        self._augment = augmenter_before(strategy, self)

    def before_training_iteration(self, strategy, **kwargs):
        check_minibatch(type(self).__name__, strategy.mbatch)
        x, y, t = strategy.mbatch
        self._incoming = (x, y, t)
        self._n_replayed = 0

    def before_forward(self, strategy, **kwargs):
        store = self.store
        if store is None or store.is_empty:
            return
        m = self.replay_mb_size or strategy.train_mb_size
        if self.batch_sampling == "per_task":
            mem = store.sample_per_task(m, device=strategy.device)
        else:
            mem = store.sample(m, device=strategy.device)
        xm = mem.x
        if self._augment is not None:
            xm = random_crop_flip(xm, self._augment.padding, self._augment.flip_p)
        mb = strategy.mbatch
        mb[0] = torch.cat([mb[0], xm])
        mb[1] = torch.cat([mb[1], mem.y])
        mb[2] = torch.cat([mb[2], mem.t])
        self._n_replayed = xm.shape[0]

    def before_backward(self, strategy, **kwargs):
        if self.loss_weighting != "vandeven" or self._n_replayed == 0:
            return
        n = self._incoming[0].shape[0]
        out, y = strategy.mb_output, strategy.mb_y
        crit = strategy._criterion
        w_cur, w_rep = self.vandeven_weights(self.n_trained + 1)
        # strategy.loss holds crit(out, y) (mean over all rows) plus other plugins' terms:
        # swap the criterion's share for the two weighted means.
        strategy.loss += (w_cur * crit(out[:n], y[:n]) + w_rep * crit(out[n:], y[n:])
                          - crit(out, y))

    def after_training_iteration(self, strategy, **kwargs):
        if self.memory is None:
            x, y, t = self._incoming
            self.buffer.add(x, y, t)
        self._incoming = None

    def after_training_exp(self, strategy, **kwargs):
        if self.memory is not None:
            self.memory.add_experience(strategy.experience.dataset)
        self.n_trained += 1

    def state_dict(self) -> dict:
        kept = ({"buffer": self.buffer.state_dict()} if self.memory is None
                else {"memory": self.memory.state_dict()})
        return {**owned_by(self), **kept, "n_trained": self.n_trained}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        kinds = {True: "an experience-end memory (mem_per_class or policy='per_experience')",
                 False: "an online memory"}
        if ("memory" in state) != (self.memory is not None):
            raise ValueError(f"ERPlugin.load_state_dict: the state is of an ER with "
                             f"{kinds['memory' in state]}, this plugin has "
                             f"{kinds[self.memory is not None]}")
        if self.memory is None:
            self.buffer.load_state_dict(state["buffer"])
        else:
            self.memory.load_state_dict(state["memory"])
        self.n_trained = int(state.get("n_trained", 0))
