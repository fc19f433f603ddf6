"""Episodic memories filled at the end of each experience, and flat-gradient helpers.

``EpisodicMemory`` keeps, for every experience seen, a random subset of its training data, in one
``ReplayBuffer`` whose rows are grouped by experience. GEM uses one constraint per experience
(``experiences()``), A-GEM samples its reference batch from the whole buffer, ER's
``policy="per_experience"`` and ``mem_per_class`` replay from it.

The gradient helpers serve the projection methods (GEM, A-GEM): the gradients of the memory
losses per parameter (``memory_gradients``), flattened together with the current gradient over
the parameters that any of them touches (``flat_gradients``), and the projected vector written
back into ``.grad`` (``write_grads``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from avalanche.models import avalanche_forward
from torch.utils.data import DataLoader, Subset

from cl_plugins.core.buffer import ReplayBuffer, check_x_range, resolve_seed, storage_dtype
from cl_plugins.core.checks import check_int
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_fields

MEMORY_SETTINGS = ("patterns_per_experience", "mem_size", "patterns_per_class")


def check_memory_budget(patterns_per_experience, mem_size, patterns_per_class=None,
                        per_class_allowed: bool = False) -> None:
    """Exactly one budget must be set: ``patterns_per_experience``, ``mem_size`` or (where the
    plugin offers it, ``per_class_allowed``) ``patterns_per_class``."""
    values = (patterns_per_experience, mem_size, patterns_per_class)
    for name, value in zip(MEMORY_SETTINGS, values):
        if value is not None:
            check_int(name, value, 1)
    if sum(v is not None for v in values) == 1:
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


class EpisodicMemory:
    """Per-experience random subsets of the training data, in one ``ReplayBuffer`` with the rows
    grouped by experience (``sizes[k]`` rows for experience k, in order).

    Budgets (exactly one): ``patterns_per_experience`` (a uniform random subset of that size
    per experience), ``mem_size`` (``mem_size // k`` per experience after k experiences, older
    subsets truncated to their first rows) or ``patterns_per_class``: ``min(patterns_per_class,
    n_c)`` samples drawn uniformly without replacement from each class c of the experience (rows
    grouped by class in increasing label order), never truncated, so the memory grows by
    ``patterns_per_class`` per class (van de Ven et al.'s ``--budget`` without
    ``--use-full-capacity``: 100 per class on Split MNIST). In domain-IL the same label in two
    experiences counts as two classes (as his code, which keeps one set per class of every
    context).

    ``seed`` seeds the generator choosing the kept samples (None: drawn from torch's global RNG
    here); the buffer gets ``seed + 1``, so its draws (A-GEM's and ER's batches) are a stream
    apart. ``x_dtype`` and ``x_range``: the buffer's input storage (see ``ReplayBuffer``)."""

    def __init__(self, patterns_per_experience: Optional[int], mem_size: Optional[int],
                 seed: Optional[int], patterns_per_class: Optional[int] = None, x_dtype=None,
                 x_range=None):
        self.seed = resolve_seed(seed)
        self.generator = seeded_generator(self.seed)  # which samples are kept
        self.patterns_per_experience, self.mem_size = patterns_per_experience, mem_size
        self.patterns_per_class = patterns_per_class
        self.x_dtype = storage_dtype("x_dtype", x_dtype)
        self.x_range = check_x_range(x_range, self.x_dtype)
        self.buffer: Optional[ReplayBuffer] = None
        self.sizes: List[int] = []
        self._cache = None  # (device, per-experience (x, y, t)) on the device, for the hot path

    @property
    def n_experiences(self) -> int:
        return len(self.sizes)

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
        new = load_rows(dataset, idx)
        parts = []
        if self.buffer is not None and len(self.buffer):
            old = self.buffer.get(torch.arange(len(self.buffer)), "cpu")
            if q is not None:  # truncate every older subset to its first q rows
                off = self.offsets()
                keep = torch.cat([torch.arange(off[j], off[j] + min(s, q))
                                  for j, s in enumerate(self.sizes)])
                parts.append((old.x[keep], old.y[keep], old.t[keep]))
                self.sizes = [min(s, q) for s in self.sizes]
            else:
                parts.append((old.x, old.y, old.t))
        parts.append(new)
        xs, ys, ts = (torch.cat(f) for f in zip(*parts))
        if self.patterns_per_class is not None:
            capacity = xs.shape[0]
        else:
            capacity = self.mem_size or self.patterns_per_experience * k
        if self.buffer is None or self.buffer.capacity < capacity:
            grown = ReplayBuffer(capacity, seed=self.seed + 1, x_dtype=self.x_dtype,
                                 x_range=self.x_range)
            if self.buffer is not None:  # keep the sampling stream going
                grown.generator.set_state(self.buffer.generator.get_state())
            self.buffer = grown
        self.buffer.set_contents(xs, ys, ts)
        self.sizes.append(idx.numel())
        self._cache = None

    def experiences(self, device) -> List[Tuple[torch.Tensor, torch.Tensor, object]]:
        """(x, y, task labels) of each experience's memory, on ``device`` (cached until the
        memory changes); the task labels are an int when the experience has a single one."""
        device = torch.device(device)
        if self._cache is None or self._cache[0] != device:
            b = self.buffer.get(torch.arange(len(self.buffer)), device)
            off, per_exp = self.offsets(), []
            for j in range(self.n_experiences):
                x, y, t = (v[off[j]:off[j + 1]] for v in (b.x, b.y, b.t))
                per_exp.append((x, y, single_task_label(t)))
            self._cache = (device, per_exp)
        return self._cache[1]

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in MEMORY_SETTINGS},
                "seed": self.seed, "sizes": list(self.sizes),
                "generator": self.generator.get_state(),
                "buffer": None if self.buffer is None else self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # a sub-state (no owner entry); a setting absent from the state counts as None
        check_fields("EpisodicMemory", state, {k: getattr(self, k) for k in MEMORY_SETTINGS},
                     missing_as_none=True)
        self.seed = state["seed"]
        self.sizes = [int(s) for s in state["sizes"]]
        self.generator.set_state(state["generator"].clone())
        if state["buffer"] is None:
            self.buffer = None
        else:
            self.buffer = ReplayBuffer(state["buffer"]["capacity"], seed=state["buffer"]["seed"])
            self.buffer.load_state_dict(state["buffer"])
        self._cache = None


def load_rows(dataset, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def single_task_label(t: torch.Tensor):
    """``t``'s one task label as an int when all rows share it, else ``t`` itself (what
    ``avalanche_forward`` takes)."""
    labels = t.unique()
    return int(labels[0]) if labels.numel() == 1 else t


# ------------------------------------------------------------------------ flat gradients


def trainable_params(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flatten(tensors: Sequence[Optional[torch.Tensor]], params: Sequence[torch.Tensor]):
    """One vector from per-parameter tensors, zeros where a tensor is None."""
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1)
                      for t, p in zip(tensors, params)])


def write_grads(params: Sequence[torch.nn.Parameter], vec: torch.Tensor) -> None:
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


def memory_gradients(strategy, params, batches) -> List[Tuple[Optional[torch.Tensor], ...]]:
    """Gradient of the strategy's criterion on each (x, y, task labels) batch, per parameter
    (None where a parameter takes no part, e.g. another task's head)."""
    out = []
    for x, y, t in batches:
        # private: Avalanche 0.6's public criterion() reads only the current minibatch
        loss = strategy._criterion(avalanche_forward(strategy.model, x, t), y)
        out.append(torch.autograd.grad(loss, params, allow_unused=True))
    return out


def touched(params, grads_lists) -> List[int]:
    """Indices of the parameters that the current gradient or any memory gradient touches."""
    return [i for i, p in enumerate(params)
            if p.grad is not None or any(g[i] is not None for g in grads_lists)]


def flat_gradients(params, grads_lists):
    """(ps, g, G): the parameters touched by ``.grad`` or any per-parameter list of
    ``grads_lists``, the current gradient flattened over them [P] and one row per list [K, P]."""
    idx = touched(params, grads_lists)
    ps = [params[i] for i in idx]
    g = flatten([p.grad for p in ps], ps)
    G = torch.stack([flatten([m[i] for i in idx], ps) for m in grads_lists])
    return ps, g, G
