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

The replayed samples join the minibatch, so the strategy's own criterion covers them and other
plugins' loss terms compose with them. Only incoming samples are inserted, after the optimizer
step, so step s never replays its own samples (as Mammoth); the first step trains on B alone.
van de Ven et al. 2022's variant (``--replay=buffer``, protocol S2: ``mem_per_class``,
``loss_weighting="vandeven"``, ``batch_sampling="per_task"``) fills M per class at the end of
each experience and, while training the t-th experience (weights: ``cl_plugins.core.schedule``),

    loss = (1/t) CE(f(x, t), y) + (1 - 1/t) CE(f(x_m, t_m), y_m)

Hooks (``strategy.dataloader`` is never touched): ``before_training_exp`` (refuses a plugin that
replaces the dataloader: ER reads the incoming minibatches as the stream, ``core.replay_loader``),
``before_training_iteration`` (records the incoming minibatch before any plugin extends it),
``before_forward`` (appends the memory batch to ``strategy.mbatch``; rows 0..n-1 stay the
stream), ``before_backward`` (``"vandeven"`` weighting only), ``after_training_iteration``
(online memory update), ``after_training_exp`` (experience-end memory update; experience count).

Hyper-parameters (defaults = ANCHORS R1, buffer 500, DER paper Table 2 / Mammoth):

- ``mem_size`` (int >= 1, or None with ``mem_per_class``; default 500): slots of the online
  memory. R1 uses 200 / 500 (lr 0.2 / 0.2 on Rotated MNIST); S1 uses 1,100 / 4,400.
- ``mem_per_class`` (int >= 1 or None, default None): van de Ven et al.'s memory (code
  GMvandeVen/continual-learning, ``--budget``; S2: 100): at each experience's end
  ``min(mem_per_class, n_c)`` samples of every class c, drawn uniformly without replacement
  (his ``construct_memory_set``, random selection), are added for good; the current experience
  is never replayed while trained on. A label seen in two experiences (domain-IL) counts twice,
  as in his code. Needs ``mem_size=None`` and ``policy="reservoir"``; ``x_dtype``, ``x_range``
  and ``seed`` apply. His ``--use-full-capacity`` is not modelled.
- ``replay_mb_size`` (int >= 1 or None = ``train_mb_size`` as Mammoth; default None): m above.
- ``policy`` (default ``"reservoir"``): ``"reservoir"``, ``"class_balanced"`` (CBRS) or
  ``"greedy_class_balanced"`` (GDumb's sampler), updated every step (``cl_plugins.core.buffer``);
  or ``"per_experience"``: Hsu et al.'s Naive_Rehearsal (GT-RIPL/Continual-Learning-Benchmark,
  protocol S1): a uniform random subset kept at each experience's end, ``mem_size // k`` each
  after k experiences, older subsets truncated (``cl_plugins.core.episodic.EpisodicMemory``, as
  GEM's ``mem_size``), so only past experiences are replayed. The online policies also replay
  the current experience's stored samples, which costs a little on S1 domain-IL
  (``docs/methods/er.md``).
- ``seed`` (int >= 0 or None, default None): seed of the memory's generator (stored and drawn
  samples); None: drawn from torch's global RNG at construction. In ``state_dict()``.
- ``x_dtype`` (None = the inputs' dtype, ``"float32"``, ``"float16"``, ``"uint8"``, ...): the
  inputs' storage dtype (memory accounting: ``cl_plugins.core.buffer``).
- ``x_range`` (None, ``[lo, hi]`` or ``[[lo_c, ...], [hi_c, ...]]``, default None): with
  ``x_dtype="uint8"``, the input values of pixel levels 0 and 255 (``grid_range(mean, std)`` of
  ``cl_plugins.core.buffer`` for normalised inputs): inputs are stored as their 1-byte level
  (784 instead of 3,136 bytes per 28x28 image) and replayed exactly; off-grid inputs raise.
- ``loss_weighting`` (default ``"batch"``): ``"batch"`` = one mean over all n + m rows
  (Chaudhry et al., Mammoth); ``"vandeven"`` = the stream rows' and the replayed rows' means
  weighted 1/t and 1 - 1/t (his ``rnt * loss_cur + (1 - rnt) * loss_replay``, ``rnt =
  1/context``), done at ``before_backward`` by swapping the criterion's share of
  ``strategy.loss`` (recomputed from the same outputs) for the weighted means, so other plugins'
  terms stay unweighted, as the weight penalties in his code. Exact up to float rounding;
  assumes a per-sample-mean criterion.
- ``batch_sampling`` (default ``"uniform"``): ``"uniform"`` = m distinct samples from the whole
  memory; ``"per_task"`` = ceil(m / K) from each of the K task labels in memory
  (``ReplayBuffer.sample_per_task``): his task-IL replay; with one task label identical to
  ``"uniform"`` (same draws), as is his domain-/class-IL replay.

Choices and deviations:

- Augmentation: Mammoth stores non-augmented inputs and augments replayed ones. Here the incoming
  inputs are recorded before any plugin changes them; a ``BatchAugmentPlugin`` after ER (the
  runner's order) augments the whole extended batch, one before ER has already run, so ER
  augments its memory batch itself with the same settings.
- Inputs are stored as float32 by default (our benchmarks hold normalised floats, not the uint8
  source); ``x_dtype="uint8"`` with ``x_range`` stores the pixel levels.
- Cost: a step trains on n + m samples, up to ~2x naive's with m = ``train_mb_size``; the
  memory update and the draw are small (``docs/methods/er.md``). torch.distributed: every rank
  stores the whole minibatch (gathered) and replays its share of the same memory batch.
- Several epochs offer an experience's samples to the memory again at every pass (as Mammoth's
  multi-epoch settings); the online protocols (R1) train a single epoch.
- Task-IL: ``MultiTaskModule.forward`` (``ClassifierNet``) splits a mixed batch by task label.
- van de Ven et al.'s replay draws batches epoch-wise from a shuffled ``DataLoader`` over the
  memory (``drop_last``); here each step draws afresh (same marginal, no no-repeat coupling).
  His task-IL replay loss is the mean of per-task means, equal to the plain mean here as
  ``"per_task"`` gives equal counts (when every task holds ceil(m / K) samples: 200 >= 128 on
  S2). His forward runs the two batches separately (no BatchNorm in the S2 MLP: no difference).
"""

from __future__ import annotations

from typing import Optional

from avalanche.core import SupervisedPlugin

from cl_plugins.core.augment import random_crop_flip
from cl_plugins.core.buffer import POLICIES, ReplayBuffer
from cl_plugins.core.checks import check_choice, check_int
from cl_plugins.core.data_parallel import gather_stream, rank_share
from cl_plugins.core.episodic import EpisodicMemory
from cl_plugins.core.replay_loader import (append_rows, augmenter_before, require_stream_batches,
                                           stream_minibatch)
from cl_plugins.core.schedule import vandeven_weights
from cl_plugins.core.state import check_owner, owned_by

LOSS_WEIGHTINGS = ("batch", "vandeven")
BATCH_SAMPLINGS = ("uniform", "per_task")


def check_memory_args(mem_size, mem_per_class, policy) -> None:
    """The online memory needs ``mem_size``; ``mem_per_class`` needs ``mem_size=None`` and the
    default policy (the online memory's settings)."""
    if mem_per_class is None:
        if mem_size is None:
            raise ValueError("mem_size=None needs mem_per_class (the memory filled at the end "
                             "of each experience); set mem_size >= 1 for the online memory")
        check_int("mem_size", mem_size, 1)
        return
    check_int("mem_per_class", mem_per_class, 1)
    if mem_size is not None:
        raise ValueError(f"mem_per_class={mem_per_class} gives a memory that grows by "
                         "mem_per_class per class seen; set mem_size=None (mem_size, "
                         f"here {mem_size!r}, is the size of the online memory)")
    if policy != "reservoir":
        raise ValueError(f"policy={policy!r} applies to the online memory (mem_size); "
                         "with mem_per_class the memory is filled at the end of each "
                         "experience, per class: leave policy at 'reservoir'")


class ERPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "er"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"mem_size": {"values": [200, 500, 1100, 4400]},
                   "replay_mb_size": {"values": [10, 32, 128]},
                   "policy": {"values": ["reservoir", "class_balanced"]}}
    PAPER = ("Experience Replay (Chaudhry et al. 2019; ER baseline of Buzzega et al., "
             "NeurIPS 2020)")
    SUMMARY = ("each minibatch is concatenated with a random minibatch of a reservoir (or "
               "class-balanced) memory, updated online after every step")
    SETS_DATALOADER = False  # extends the minibatch in before_forward instead

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
        check_memory_args(mem_size, mem_per_class, policy)
        self.mem_size, self.replay_mb_size, self.policy = mem_size, replay_mb_size, policy
        self.mem_per_class = mem_per_class
        self.loss_weighting, self.batch_sampling = loss_weighting, batch_sampling
        # exactly one of: the online buffer, or the memory filled at each experience's end
        self.buffer: Optional[ReplayBuffer] = None
        self.memory: Optional[EpisodicMemory] = None
        if policy == "per_experience":  # Hsu et al.'s Naive_Rehearsal budget
            self.memory = EpisodicMemory(None, mem_size, seed, x_dtype=x_dtype, x_range=x_range)
        elif mem_per_class is None:
            self.buffer = ReplayBuffer(mem_size, policy=policy, seed=seed, x_dtype=x_dtype,
                                       x_range=x_range)
        else:
            self.memory = EpisodicMemory(None, None, seed, patterns_per_class=mem_per_class,
                                         x_dtype=x_dtype, x_range=x_range)
        self.n_experiences = 0  # experiences finished (t - 1 while training the t-th)
        self._incoming = None  # (x, y, t) of the current step, before any extension
        self._n_replayed = 0  # rows appended this step
        self._augment = None

    @property
    def store(self) -> Optional[ReplayBuffer]:
        """The buffer replayed from: the online one, or the experience-end memory's (None
        before its first experience ends)."""
        return self.buffer if self.memory is None else self.memory.buffer

    def before_training_exp(self, strategy, **kwargs):
        require_stream_batches(strategy, self)
        self._augment = augmenter_before(strategy, self)

    def before_training_iteration(self, strategy, **kwargs):
        self._incoming = stream_minibatch(self, strategy.mbatch)
        self._n_replayed = 0

    def before_forward(self, strategy, **kwargs):
        store = self.store
        if store is None or store.is_empty:
            return
        m = self.replay_mb_size or strategy.train_mb_size
        sample = store.sample_per_task if self.batch_sampling == "per_task" else store.sample
        mem = sample(m, device=strategy.device)  # the same m rows on every rank
        xm, ym, tm = rank_share(mem.x, mem.y, mem.t)
        if self._augment is not None:
            xm = random_crop_flip(xm, self._augment.padding, self._augment.flip_p)
        append_rows(strategy.mbatch, xm, ym, tm)
        self._n_replayed = xm.shape[0]

    def before_backward(self, strategy, **kwargs):
        if self.loss_weighting != "vandeven" or self._n_replayed == 0:
            return
        n = self._incoming[0].shape[0]
        out, y = strategy.mb_output, strategy.mb_y
        crit = strategy._criterion  # private: Avalanche 0.6 has no public handle on the loss fn
        w_cur, w_rep = vandeven_weights(self.n_experiences + 1)
        # strategy.loss holds crit(out, y) (mean over all rows) plus other plugins' terms:
        # swap the criterion's share for the two weighted means.
        strategy.loss += (w_cur * crit(out[:n], y[:n]) + w_rep * crit(out[n:], y[n:])
                          - crit(out, y))

    def after_training_iteration(self, strategy, **kwargs):
        if self.memory is None:
            x, y, t = gather_stream(strategy, *self._incoming)  # the whole minibatch's rows
            self.buffer.add(x, y, t)
        self._incoming = None

    def after_training_exp(self, strategy, **kwargs):
        if self.memory is not None:
            self.memory.add_experience(strategy.experience.dataset)
        self.n_experiences += 1

    def state_dict(self) -> dict:
        kept = ({"buffer": self.buffer.state_dict()} if self.memory is None
                else {"memory": self.memory.state_dict()})
        return {**owned_by(self), **kept, "n_trained": self.n_experiences}

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
        self.n_experiences = int(state.get("n_trained", 0))
