"""Averaged GEM (A-GEM): one constraint on the average memory loss, closed-form projection.

Name: ``agem``. Scenarios: task-, domain- and class-IL. Task labels: not needed (stored with every
memory sample, so a multi-head model scores each memory sample on its own task's head).

Paper: A. Chaudhry, M. Ranzato, M. Rohrbach, M. Elhoseiny, "Efficient Lifelong Learning with
A-GEM", ICLR 2019 (official code: facebookresearch/agem, ``fc_permute_mnist.py``,
``model/model.py``).

Memory: one episodic memory M holding, for every past experience, a random subset of its
training samples (``patterns_per_experience`` each, or a total ``mem_size`` split evenly over the
experiences seen, older subsets truncated; or ``patterns_per_class`` per class, growing:
``cl_plugins.core.episodic.EpisodicMemory``). The code fills, per task, a ring buffer of the
last ``mem_size`` samples *per class* of the shuffled stream; here a uniform random subset of the
experience is drawn at ``after_training_exp`` (see "deviations"). The current experience enters
M only after it has been trained on, as in the code (``episodic_filled_counter`` is advanced at
the end of each task).

Step (Eq. 11 of the paper), at ``before_update`` (after backward, before ``optimizer.step()``),
with g the gradient of the strategy's loss (other plugins' terms included):

    (x_ref, y_ref, t_ref) <- ``sample_size`` samples drawn uniformly without replacement from M
                             (all of M when it holds fewer; the code's ``np.random.choice``)
    g_ref = grad of CE(f(x_ref; t_ref), y_ref)                         (mean over the batch)
    if <g, g_ref> < 0:  g~ = g - (<g, g_ref> / (<g_ref, g_ref> + eps)) g_ref    else  g~ = g

g and g_ref are flattened over every trainable parameter either touches (shared parameters, the
current head, the heads of the memory's tasks); the dot products are accumulated in float64.
After the projection <g~, g_ref> = 0 (eps = 0; eps > 0 leaves a tiny negative dot product,
eps <g, g_ref> / (<g_ref, g_ref> + eps)). Past heads receive their component of the projection, as
in the code (one output layer with per-task logit masks): a ``.grad`` is created for them when
they had none.

Hooks: ``before_update`` (reference gradient, projection), ``after_training_exp`` (memory
update from ``strategy.experience.dataset``). The dataloader is never touched.

Hyper-parameters (defaults = the paper's MNIST protocol, ``fc_permute_mnist.py``):

- ``patterns_per_experience`` (int >= 1 or None, default 250): memory slots per experience (the
  code: ``mem_size`` 25 per class x 10 classes). Exactly one of it and ``mem_size`` must be set.
- ``mem_size`` (int >= 1 or None, default None): total budget split evenly over the
  experiences seen so far.
- ``patterns_per_class`` (int >= 1 or None, default None): van de Ven et al. 2022's A-GEM
  (code GMvandeVen/continual-learning, ``--agem`` = ``--replay=buffer --use-replay=inequality``,
  ``--budget``; S2: 100): ``min(patterns_per_class, n_c)`` samples of every class c of the
  experience, drawn uniformly without replacement at its end; never truncated, so the memory
  grows by ``patterns_per_class`` per class seen. Exactly one of the three budgets is set.
- ``sample_size`` (int >= 1, default 256): the reference batch (the code's ``EPS_MEM_BATCH_SIZE``;
  van de Ven et al.'s code uses its replay batch, the training batch size 128).
- ``batch_sampling`` (default ``"uniform"``): ``"uniform"`` = ``sample_size`` samples from the
  whole memory (A-GEM paper and code); ``"per_task"`` = ceil(sample_size / K) from each of the K
  task labels in memory (``ReplayBuffer.sample_per_task``): van de Ven et al.'s task-IL
  reference batch (one replay batch of ceil(128 / K) per past task, each on its own head); with
  one task label (domain-/class-IL) identical to ``"uniform"``, which is also his code there.
- ``eps`` (float >= 0, default 0.0): added to <g_ref, g_ref> in the projection's denominator
  (van de Ven et al.'s ``--eps-agem``, default 1e-7; the A-GEM code has none).
- ``seed`` (int >= 0 or None, default None): seed of the memory's generators (which samples are
  kept, which are drawn for g_ref); None draws it from torch's global RNG at construction.

Choices and deviations:

- Memory selection: uniform random per experience rather than the code's per-class ring buffer
  (the last ``mem_size`` samples of each class of a shuffled stream, i.e. a class-stratified
  random subset). With balanced classes the two differ by sampling noise only; on imbalanced
  experiences the class proportions here follow the data.
- Reference batch: uniform over the whole memory (the paper and code); Avalanche's AGEMPlugin
  instead draws ``sample_size // n_experiences`` from each experience (task-balanced).
- van de Ven et al.'s code: the reference batch is drawn epoch-wise from a shuffled
  ``DataLoader`` over the memory (no repeats within a pass), here afresh at every step; his
  task-IL reference loss is the mean over past tasks of per-task means, equal to the plain mean
  here because ``"per_task"`` gives every task the same count (when each holds at least
  ceil(sample_size / K) samples). His g and g_ref span every parameter (a shared output layer
  with per-task slices), as the flattening above.
- g_ref is computed at ``before_update`` with ``torch.autograd.grad`` at the same parameters as
  the code (which computes it before the current step); the model is in training mode, so
  BatchNorm running statistics also see the reference batches.
- Cost: one extra forward/backward pass over ``sample_size`` samples per step, plus two dot
  products over the parameter vector (the reference batch is 25x the training batch on B1, 2x on
  S1; measurements in ``docs/methods/agem.md``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from cl_plugins.core.checks import check_choice, check_int, check_non_negative
from cl_plugins.core.episodic import EpisodicMemory, check_memory_budget, single_task_label
from cl_plugins.core.memory_projection import MemoryProjectionPlugin

BATCH_SAMPLINGS = ("uniform", "per_task")


def agem_project(g: torch.Tensor, g_ref: torch.Tensor, eps: float = 0.0
                 ) -> Tuple[torch.Tensor, bool]:
    """A-GEM's step (Eq. 11): (g~, True) with g~ = g - (<g, g_ref> / (<g_ref, g_ref> + eps))
    g_ref when <g, g_ref> < 0, else (g, False). Dot products in float64; g~ has g's dtype."""
    g64, ref64 = g.double(), g_ref.double()  # converted once: each is P floats
    dot = torch.dot(g64, ref64)
    if not bool(dot < 0):
        return g, False
    coef = dot / (torch.dot(ref64, ref64) + eps)  # Eq. 11
    return (g64 - coef * ref64).to(g.dtype), True


class AGEMPlugin(MemoryProjectionPlugin, supports_distributed=True):
    METHOD_NAME = "agem"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"patterns_per_experience": {"values": [50, 250, 1000]},
                   "sample_size": {"values": [64, 256, 1024]}}
    PAPER = "A-GEM (Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019)"
    SUMMARY = ("episodic memory of past experiences; the step is projected onto the half-space "
               "<g, g_ref> >= 0 of a random memory batch's gradient, in closed form")
    SETS_DATALOADER = False

    def __init__(self, patterns_per_experience: Optional[int] = 250,
                 mem_size: Optional[int] = None, sample_size: int = 256,
                 seed: Optional[int] = None, patterns_per_class: Optional[int] = None,
                 batch_sampling: str = "uniform", eps: float = 0.0):
        check_memory_budget(patterns_per_experience, mem_size, patterns_per_class,
                            per_class_allowed=True)
        check_int("sample_size", sample_size, 1)
        check_choice("batch_sampling", batch_sampling, BATCH_SAMPLINGS)
        check_non_negative("eps", eps)
        self.patterns_per_experience, self.mem_size = patterns_per_experience, mem_size
        self.patterns_per_class = patterns_per_class
        self.sample_size, self.batch_sampling, self.eps = sample_size, batch_sampling, float(eps)
        super().__init__(EpisodicMemory(patterns_per_experience, mem_size, seed,
                                        patterns_per_class=patterns_per_class))

    def reference_batches(self, strategy):
        buf = self.memory.buffer  # one random batch of the whole memory
        ref = (buf.sample_per_task(self.sample_size, device=strategy.device)
               if self.batch_sampling == "per_task"
               else buf.sample(self.sample_size, device=strategy.device))
        return [(ref.x, ref.y, single_task_label(ref.t))]

    def project(self, g, G):
        new, projected = agem_project(g, G[0], self.eps)
        return new if projected else None
