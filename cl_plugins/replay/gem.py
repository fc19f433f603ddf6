"""Gradient Episodic Memory (GEM): the step is projected so that no past task's memory loss
increases, by solving a small quadratic program (QP) at every step where a constraint is violated.

Name: ``gem``. Scenarios: task-, domain- and class-IL. Task labels: not needed (stored with every
memory sample, so a multi-head model scores each memory on its own task's head).

Paper: D. Lopez-Paz, M. Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
(official code: facebookresearch/GradientEpisodicMemory, ``model/gem.py``).

Memory (Sec. 3 of the paper): one episodic memory M_k per past experience k. The paper fills
M_k with "the last m examples" of task k (the code: a ring buffer over the task's training
stream). The stream is shuffled (the official ``Continuum`` shuffles every task; Avalanche
shuffles every epoch), so the last m samples seen are a uniformly random m-subset of the
experience; GEMPlugin draws that subset directly at ``after_training_exp`` with its own
generator (same distribution, no per-step copy, independent of other plugins' minibatch
changes). m is either fixed (``patterns_per_experience``, the paper's m = M / T for a known
number of tasks T) or ``mem_size // k`` after k experiences (``mem_size``: a total budget M,
older memories truncated to their first m rows, which stay a random subset: the paper's
"gradually reduce m as we observe new tasks" and Hsu et al.'s ``memory_size // task_count``).

Step (Eqs. 10-13 of the paper and ``project2cone2`` of the code), at ``before_update`` (after
backward, before ``optimizer.step()``), with g the gradient of the strategy's loss (other
plugins' terms included) and, for each past experience k, g_k = grad of CE(f(M_k; t_k), y_k)
(mean over M_k, the model called with M_k's task labels: its own head in task-IL, as the
paper's CIFAR code masks every other task's outputs). All are flattened over every trainable
parameter that any of them touches (shared parameters, the current head and the past heads);
G = [g_1; ...; g_K] (K x P).

    if <g, g_k> >= 0 for every k:  g~ = g                             (nothing changes)
    else:  v* = argmin_v  1/2 v^T (G G^T + eps I) v + g^T G^T v   s.t.  v >= gamma   (dual QP)
           g~ = G^T v* + g

gamma = ``memory_strength``. The paper describes gamma as "a small constant added to v*"; the
official code (followed here) imposes it as the lower bound v >= gamma of the dual QP (quadprog
``solve_qp(P, -G g, I, gamma 1)``). With eps = 0 this is exactly the Euclidean projection of
g + gamma * sum_k g_k onto the cone {z : G z >= 0} (substitute v = gamma 1 + w): every memory
gradient is added with weight >= gamma whenever *some* constraint is violated, which biases the
step towards positive backward transfer. The QP is K x K, built and solved in float64 (as the
code: ``.double()`` before ``np.dot``); g~ is written back in the parameters' dtype. Past heads
receive the component G^T v* of their task's gradient, as in the paper (one output layer whose
other-task logits are masked): a ``.grad`` is created for them when they had none.

eps: the official code adds eps I (eps = 1e-3) to G G^T so that the QP stays strictly convex
when memory gradients are (nearly) linearly dependent (quadprog needs a positive definite
matrix); Hsu et al.'s and Avalanche's GEM do the same. It turns the hard constraints into soft
ones: at the solution <g~, g_k> = mu_k - eps v*_k (mu_k >= 0 the multiplier of v_k >= gamma), so
a constraint may stay violated by eps v*_k. eps = 0 gives the exact projection (and needs
linearly independent g_k).

Hooks: ``before_update`` (memory gradients, check, QP, write-back), ``after_training_exp``
(memory update from ``strategy.experience.dataset``). The dataloader is never touched.

Hyper-parameters (defaults = the paper's MNIST/CIFAR runs, ``run_experiments.sh``):

- ``patterns_per_experience`` (int >= 1 or None, default 256 = the code's ``n_memories``):
  memory slots per experience. Exactly one of it and ``mem_size`` must be set.
- ``mem_size`` (int >= 1 or None, default None): total budget split evenly over the experiences
  seen so far (S1: 1100, Hsu et al.'s ``GEM_1100``).
- ``memory_strength`` (float >= 0, default 0.5): gamma above.
- ``eps`` (float >= 0, default 1e-3): the QP's diagonal regulariser (official code).
- ``seed`` (int >= 0 or None, default None): seed of the memory's generator (which samples are
  kept); None draws it from torch's global RNG at construction (so it follows the run seed).

The memory is ``cl_plugins.core.episodic.EpisodicMemory``; the flattening of g and the g_k over
the touched parameters and the write-back are ``cl_plugins.core.episodic``'s gradient helpers.

Choices and deviations:

- Memory selection: a uniform random subset drawn at the end of the experience instead of a
  ring buffer of the last samples (same distribution, see above). Several epochs: the code's
  ring buffer keeps samples of the last epoch; the subset here is over the experience's samples.
- The memory gradients are computed at ``before_update`` with ``torch.autograd.grad`` (same
  parameters as the code, which computes them before the current minibatch's backward); the
  model is in training mode as in the code, so BatchNorm running statistics also see the memory
  batches and dropout is active on them.
- Constraints are per *experience* (Avalanche's unit), also in domain-/class-IL where every
  experience has task label 0.
- Cost: K extra forward/backward passes over |M_k| samples each per step (the method's own cost;
  loops over past experiences only), plus a K x K QP on the CPU when a constraint is violated
  (about 7x naive's step time on S1, as Avalanche's GEMPlugin; measurements in
  ``docs/methods/gem.md``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from cl_plugins.core.checks import check_non_negative
from cl_plugins.core.episodic import EpisodicMemory, check_memory_budget
from cl_plugins.core.memory_projection import MemoryProjectionPlugin


def solve_gem_dual(P: np.ndarray, Gg: np.ndarray, memory_strength: float) -> np.ndarray:
    """argmin_v 1/2 v^T P v + (G g)^T v  s.t.  v >= memory_strength, by quadprog (float64)."""
    try:
        import quadprog
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("GEM needs the quadprog package: pip install quadprog") from err
    K = P.shape[0]
    try:
        return quadprog.solve_qp(P, -Gg, np.eye(K), np.full(K, float(memory_strength)))[0]
    except ValueError as err:
        raise ValueError(f"GEM's QP failed ({err}); the memory gradients are probably linearly "
                         "dependent: use eps > 0 (the official code's 1e-3)") from err


def gem_project(g: torch.Tensor, G: torch.Tensor, memory_strength: float = 0.5,
                eps: float = 1e-3) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """GEM's step (Eqs. 10-13, see the module docstring) for gradient ``g`` [P] and memory
    gradients ``G`` [K, P]: returns (g~, v*) with g~ = g + G^T v*, or (g, None) when no
    <g, g_k> < 0. The dual QP (the official code's eps I and lower bound v >= gamma) is built
    and solved in float64; g~ has g's dtype."""
    G64, g64 = G.double(), g.double()
    dots = G64 @ g64
    if not bool((dots < 0).any()):
        return g, None
    # Eqs. 10-13: v* of the dual, then g~ = G^T v* + g
    P = G64 @ G64.T
    P = 0.5 * (P + P.T) + eps * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    v = solve_gem_dual(P.cpu().numpy(), dots.cpu().numpy(), memory_strength)
    v = torch.from_numpy(v).to(G64.device)
    return (g64 + v @ G64).to(g.dtype), v


class GEMPlugin(MemoryProjectionPlugin, supports_distributed=True):
    METHOD_NAME = "gem"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"memory_strength": {"values": [0.0, 0.1, 0.5, 1.0]},
                   "patterns_per_experience": {"values": [64, 256, 1000]}}
    PAPER = "Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017)"
    SUMMARY = ("per-experience episodic memories; each step is projected by a QP so that no "
               "memory's loss increases (<g~, g_k> >= 0), with margin memory_strength")
    SETS_DATALOADER = False

    def __init__(self, patterns_per_experience: Optional[int] = 256,
                 mem_size: Optional[int] = None, memory_strength: float = 0.5,
                 eps: float = 1e-3, seed: Optional[int] = None):
        check_memory_budget(patterns_per_experience, mem_size)
        check_non_negative("memory_strength", memory_strength)
        check_non_negative("eps", eps)
        self.patterns_per_experience, self.mem_size = patterns_per_experience, mem_size
        self.memory_strength, self.eps = float(memory_strength), float(eps)
        super().__init__(EpisodicMemory(patterns_per_experience, mem_size, seed))

    def reference_batches(self, strategy):
        return self.memory.experiences(strategy.device)  # one constraint per experience

    def project(self, g, G):
        new, v = gem_project(g, G, self.memory_strength, self.eps)
        return None if v is None else new
