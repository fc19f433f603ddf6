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
  loops over past experiences only), plus a K x K QP on the CPU when a constraint is violated.
  Measured (1 CPU thread, step time vs naive in the same process, training the 5th experience):
  S1 (MLP 1024-400-400, batch 128, 4 x 275 memories) 40.8 ms vs 5.6 ms = 7.3x (Avalanche's
  GEMPlugin 7.7x); the 1,100 memory samples' forward/backward alone take ~30 ms, the float64
  Gram matrix, QP and write-back ~3-6 ms. B1 (batch 10, 4 x 1000 memories): ~75x, inherent to
  running 4,000 memory samples per 10-sample step.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch.utils.data import DataLoader, Subset

from cl_plugins.core.buffer import ReplayBuffer, check_x_range
from cl_plugins.core.checks import check_int, check_non_negative
from cl_plugins.core.state import check_owner, owned_by


def _check_memory_args(patterns_per_experience, mem_size, patterns_per_class=None,
                       per_class_allowed: bool = False) -> None:
    """Exactly one budget must be set: ``patterns_per_experience``, ``mem_size`` or (where the
    plugin offers it, ``per_class_allowed``) ``patterns_per_class``."""
    if patterns_per_experience is not None:
        check_int("patterns_per_experience", patterns_per_experience, 1)
    if mem_size is not None:
        check_int("mem_size", mem_size, 1)
    if patterns_per_class is not None:
        check_int("patterns_per_class", patterns_per_class, 1)
    n_set = sum(v is not None for v in (patterns_per_experience, mem_size, patterns_per_class))
    if n_set == 1:
        return
    if per_class_allowed:
        raise ValueError("exactly one of patterns_per_experience (slots per experience), mem_size "
                         "(total slots, split evenly over the experiences seen) and "
                         "patterns_per_class (slots per class of each experience; the memory "
                         "grows) must be set; got patterns_per_experience="
                         f"{patterns_per_experience!r}, mem_size={mem_size!r}, "
                         f"patterns_per_class={patterns_per_class!r}")
    raise ValueError("exactly one of patterns_per_experience (slots per experience) and "
                     "mem_size (total slots, split evenly over the experiences seen) must be "
                     f"set; got patterns_per_experience={patterns_per_experience!r}, "
                     f"mem_size={mem_size!r}")


class _EpisodicMemory:
    """Per-experience random subsets of the training data, kept in one ``ReplayBuffer`` with the
    rows grouped by experience (``sizes[k]`` rows for experience k, in order). Shared by GEM
    (one constraint per experience), A-GEM (samples over all of it) and ER's experience-end
    memory.

    Budgets (exactly one): ``patterns_per_experience`` (a uniform random subset of that size
    per experience), ``mem_size`` (``mem_size // k`` per experience after k experiences, older
    subsets truncated) or ``patterns_per_class``: ``min(patterns_per_class, n_c)`` samples drawn
    uniformly without replacement from each class c of the experience (rows grouped by class in
    increasing label order), never truncated, so the memory grows by ``patterns_per_class`` per
    class (van de Ven et al.'s ``--budget`` without ``--use-full-capacity``: 100 per class on
    Split MNIST). In domain-IL the same label in two experiences counts as two classes (as his
    code, which keeps one memory set per class of every context)."""

    def __init__(self, patterns_per_experience: Optional[int], mem_size: Optional[int],
                 seed: int, patterns_per_class: Optional[int] = None, x_dtype=None,
                 x_range=None):
        self.patterns_per_experience, self.mem_size = patterns_per_experience, mem_size
        self.patterns_per_class = patterns_per_class
        self.x_dtype = x_dtype
        self.x_range = check_x_range(x_range, x_dtype)  # the storage grid (ReplayBuffer)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # which samples are kept
        self.buffer: Optional[ReplayBuffer] = None  # its own generator: A-GEM's batches
        self.sizes: List[int] = []
        self._cache = None  # (device, per-experience (x, y, t)) on the device, for the hot path

    @property
    def n_experiences(self) -> int:
        return len(self.sizes)

    def __len__(self) -> int:
        return sum(self.sizes)

    def quota(self, n_experiences: int) -> Optional[int]:
        """Slots per experience after ``n_experiences`` (None: per-class budget, no quota)."""
        if self.patterns_per_class is not None:
            return None
        if self.mem_size is None:
            return self.patterns_per_experience
        q = self.mem_size // n_experiences
        if q < 1:
            raise ValueError(f"mem_size={self.mem_size} leaves no slot per experience after "
                             f"{n_experiences} experiences; use mem_size >= {n_experiences}")
        return q

    def offsets(self) -> List[int]:
        return np.cumsum([0] + self.sizes).tolist()

    def _select(self, dataset, q: Optional[int]) -> torch.Tensor:
        """Rows of ``dataset`` to keep: a uniform random q-subset, or per class."""
        if q is not None:
            return torch.randperm(len(dataset), generator=self.generator)[:min(q, len(dataset))]
        targets = torch.as_tensor(list(dataset.targets), dtype=torch.long)
        parts = []
        for c in torch.unique(targets).tolist():  # sorted
            rows = torch.nonzero(targets == c).flatten()
            pick = torch.randperm(rows.numel(), generator=self.generator)
            parts.append(rows[pick[:self.patterns_per_class]])
        return torch.cat(parts)

    @torch.no_grad()
    def add_experience(self, dataset) -> None:
        k = self.n_experiences + 1
        q = self.quota(k)
        idx = self._select(dataset, q)
        n_new = idx.numel()
        x, y, t = _load_rows(dataset, idx)
        parts = []
        if self.buffer is not None and len(self.buffer):
            old = self.buffer.get(torch.arange(len(self.buffer)), "cpu")
            if q is not None:
                off = self.offsets()
                keep = torch.cat([torch.arange(off[j], off[j] + min(s, q))
                                  for j, s in enumerate(self.sizes)])
                old = old.x[keep], old.y[keep], old.t[keep]
                self.sizes = [min(s, q) for s in self.sizes]
            else:
                old = old.x, old.y, old.t
            parts.append(old)
        parts.append((x, y, t))
        xs, ys, ts = (torch.cat(f) for f in zip(*parts))
        if self.patterns_per_class is not None:
            capacity = xs.shape[0]
        else:
            capacity = self.mem_size or self.patterns_per_experience * k
        if self.buffer is None or self.buffer.capacity < capacity:
            grown = ReplayBuffer(capacity, seed=self.seed + 1,  # a stream apart from ours
                                 x_dtype=self.x_dtype, x_range=self.x_range)
            if self.buffer is not None:  # keep the sampling stream going
                grown.generator.set_state(self.buffer.generator.get_state())
            self.buffer = grown
        self.buffer.set_contents(xs, ys, ts)
        self.sizes.append(n_new)
        self._cache = None

    def experiences(self, device) -> List[Tuple[torch.Tensor, torch.Tensor, object]]:
        """(x, y, task labels) of each experience's memory, on ``device`` (cached until the
        memory changes); the task labels are an int when the experience has a single one."""
        device = torch.device(device)
        if self._cache is None or self._cache[0] != device:
            b = self.buffer.get(torch.arange(len(self.buffer)), device)
            off, per_exp = self.offsets(), []
            for j in range(self.n_experiences):
                tj = b.t[off[j]:off[j + 1]]
                labels = tj.unique()
                per_exp.append((b.x[off[j]:off[j + 1]], b.y[off[j]:off[j + 1]],
                                int(labels[0]) if labels.numel() == 1 else tj))
            self._cache = (device, per_exp)
        return self._cache[1]

    def state_dict(self) -> dict:
        return {"patterns_per_experience": self.patterns_per_experience,
                "mem_size": self.mem_size, "patterns_per_class": self.patterns_per_class,
                "seed": self.seed, "sizes": list(self.sizes),
                "generator": self.generator.get_state(),
                "buffer": None if self.buffer is None else self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("patterns_per_experience", "mem_size", "patterns_per_class"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"load_state_dict: the state has {key}={state.get(key)!r}, this "
                                 f"plugin {getattr(self, key)!r}")
        self.seed = state["seed"]
        self.sizes = [int(s) for s in state["sizes"]]
        self.generator.set_state(state["generator"].clone())
        if state["buffer"] is None:
            self.buffer = None
        else:
            self.buffer = ReplayBuffer(state["buffer"]["capacity"], seed=state["buffer"]["seed"])
            self.buffer.load_state_dict(state["buffer"])
        self._cache = None


def _load_rows(dataset, idx: torch.Tensor):
    """Rows ``idx`` of an experience dataset as (x, y, t) tensors (t = 0 when absent)."""
    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=1024, shuffle=False)
    xs, ys, ts = [], [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        t = batch[-1] if len(batch) >= 3 else torch.zeros_like(y)
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
        ts.append(torch.as_tensor(t, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def _trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat(tensors: Sequence[Optional[torch.Tensor]], params: Sequence[torch.Tensor]):
    """One vector from per-parameter tensors, zeros where a tensor is None."""
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1)
                      for t, p in zip(tensors, params)])


def _write_grads(params: Sequence[torch.nn.Parameter], vec: torch.Tensor) -> None:
    """p.grad <- the matching slice of ``vec`` (created where a parameter had no gradient)."""
    i = 0
    for p in params:
        n = p.numel()
        new = vec[i:i + n].view_as(p)
        if p.grad is None:
            p.grad = new.to(p.dtype).clone()
        else:
            p.grad.copy_(new)
        i += n


def _memory_gradients(strategy, params, batches) -> List[Tuple[Optional[torch.Tensor], ...]]:
    """Gradient of the strategy's criterion on each (x, y, task labels) batch, per parameter
    (None where a parameter takes no part, e.g. another task's head)."""
    out = []
    for x, y, t in batches:
        loss = strategy._criterion(avalanche_forward(strategy.model, x, t), y)
        out.append(torch.autograd.grad(loss, params, allow_unused=True))
    return out


def _touched(params, grads_lists) -> List[int]:
    """Indices of the parameters that the current gradient or any memory gradient touches."""
    return [i for i, p in enumerate(params)
            if p.grad is not None or any(g[i] is not None for g in grads_lists)]


def _solve_gem_dual(P: np.ndarray, Gg: np.ndarray, memory_strength: float) -> np.ndarray:
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


class GEMPlugin(SupervisedPlugin):
    METHOD_NAME = "gem"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    DEFAULTS: dict = {"patterns_per_experience": 256, "mem_size": None, "memory_strength": 0.5,
                      "eps": 1e-3, "seed": None}
    SWEEP: dict = {"memory_strength": {"values": [0.0, 0.1, 0.5, 1.0]},
                   "patterns_per_experience": {"values": [64, 256, 1000]}}
    PAPER = "Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017)"
    SUMMARY = ("per-experience episodic memories; each step is projected by a QP so that no "
               "memory's loss increases (<g~, g_k> >= 0), with margin memory_strength")
    SETS_DATALOADER = False
    supports_distributed = False

    def __init__(self, patterns_per_experience: Optional[int] = 256,
                 mem_size: Optional[int] = None, memory_strength: float = 0.5,
                 eps: float = 1e-3, seed: Optional[int] = None):
        super().__init__()
        _check_memory_args(patterns_per_experience, mem_size)
        check_non_negative("memory_strength", memory_strength)
        check_non_negative("eps", eps)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        check_int("seed", seed, 0)
        self.patterns_per_experience, self.mem_size = patterns_per_experience, mem_size
        self.memory_strength, self.eps = float(memory_strength), float(eps)
        self.memory = _EpisodicMemory(patterns_per_experience, mem_size, seed)
        self.n_steps = 0  # steps with a non-empty memory
        self.n_projected = 0  # of which violated a constraint (diagnostics)

    # ------------------------------------------------------------------------------ the math

    @staticmethod
    def project(g: torch.Tensor, G: torch.Tensor, memory_strength: float = 0.5,
                eps: float = 1e-3) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """GEM's step for gradient ``g`` [P] and memory gradients ``G`` [K, P]: returns
        (g~, v*) with g~ = g + G^T v*, or (g, None) when no <g, g_k> < 0 (see the module
        docstring). Computed in float64; g~ has g's dtype."""
        G64, g64 = G.double(), g.double()
        dots = G64 @ g64
        if not bool((dots < 0).any()):
            return g, None
        P = G64 @ G64.T
        P = 0.5 * (P + P.T) + eps * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        v = _solve_gem_dual(P.cpu().numpy(), dots.cpu().numpy(), memory_strength)
        v = torch.from_numpy(v).to(G64.device)
        return (g64 + v @ G64).to(g.dtype), v

    # ------------------------------------------------------------------------------ hooks

    def before_update(self, strategy, **kwargs):
        if self.memory.n_experiences == 0:
            return
        params = _trainable(strategy.model)
        mem = _memory_gradients(strategy, params, self.memory.experiences(strategy.device))
        idx = _touched(params, mem)
        ps = [params[i] for i in idx]
        g = _flat([p.grad for p in ps], ps)
        G = torch.stack([_flat([m[i] for i in idx], ps) for m in mem])
        new, v = self.project(g, G, self.memory_strength, self.eps)
        self.n_steps += 1
        if v is not None:
            self.n_projected += 1
            _write_grads(ps, new)

    def after_training_exp(self, strategy, **kwargs):
        self.memory.add_experience(strategy.experience.dataset)

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {**owned_by(self), "memory": self.memory.state_dict(), "n_steps": self.n_steps,
                "n_projected": self.n_projected}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        self.memory.load_state_dict(state["memory"])
        self.n_steps, self.n_projected = int(state["n_steps"]), int(state["n_projected"])
