"""A replay buffer of tensors: reservoir and class-balanced policies, RNG in the state.

``ReplayBuffer`` is the storage every replay method of this library builds on (ER, DER/DER++,
GEM, A-GEM, GDumb, MIR, iCaRL). It holds, in preallocated tensors of ``capacity`` slots:

- ``x``: the inputs, in the dtype they arrive in (uint8 stays uint8; float stays float32), or in
  ``x_dtype`` when given (e.g. ``torch.float16`` halves the memory of float inputs, and
  ``"uint8"`` with ``x_range`` stores float inputs on a pixel grid as their 1-byte levels);
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
rounding error.

Every such input value is ``(v / 255 - m_c) / s_c`` for a pixel level v in 0..255 (``v / 255``
without normalisation): it lies on a known 256-level grid per channel. ``x_dtype="uint8"`` with
``x_range`` (the input values of levels 0 and 255, ``grid_range(mean, std)``) stores the level
v itself, 1 byte per value: a 28x28 MNIST image costs 784 bytes, a padded 32x32 one 1,024, an
8x8 digit 64, a 32x32x3 CIFAR image 3,072 (plus the 8-byte label, 8-byte task label and 4 bytes
per stored logit as before; 792 bytes per sample for MNIST with labels only, 800 with task
labels). Reads return float32 ``(v / 255 - m) / s``, computed with the float32 operations of the
benchmarks (m, s recovered from ``x_range`` in float64), so replayed inputs are bit-identical to
the benchmark's; the one exception is a mean whose float32 rounding sits on a tie after the
round trip through ``x_range`` (1 of 2 million random (mean, std) pairs), where values differ by
about one float32 ulp. An input farther than a quarter of the level spacing from the grid (a
wrong ``x_range``, augmented or rescaled inputs) raises a ValueError instead of being rounded.
Every ``add`` encodes and checks the whole batch (not only the samples stored) and every read
decodes: measured on one CPU thread for a batch of 128 normalised MNIST images, ``add`` takes
0.19 ms instead of 0.07 and ``sample(128)`` 0.10 ms instead of 0.04 (a naive S1 step: 9 ms).
uint8 tensors added to a buffer without ``x_range`` are stored as they are (1 byte per pixel;
reads return uint8 and the caller normalises them).

Why not Avalanche's ``storage_policy`` classes: they store ``AvalancheDataset`` subsets and are
updated once per experience from ``strategy.experience.dataset``; the online methods here (ER and
DER as in the DER paper / Mammoth, MIR, GDumb's sampler) update the memory after every
minibatch, with tensors and logits that exist only inside the training step.
"""

from __future__ import annotations

import bisect
import math
import numbers
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from cl_plugins.core.checks import check_choice, check_int
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_fields

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


def storage_dtype(name: str, value) -> Optional[torch.dtype]:
    """The storage dtype ``value`` names (a torch dtype, one of ``"float32"``, ``"float16"``,
    ``"bfloat16"``, ``"float64"``, ``"uint8"``, or None: the inputs' own); a ValueError naming
    the argument ``name`` otherwise."""
    if value is None or isinstance(value, torch.dtype):
        return value
    return _DTYPES[check_choice(name, value, tuple(_DTYPES))]


def resolve_seed(seed: Optional[int]) -> int:
    """``seed`` checked (an integer >= 0), or, for None, one drawn from torch's global RNG (so a
    run seeded with ``torch.manual_seed`` is reproducible, and run seeds give other draws)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return check_int("seed", seed, 0)


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


XRange = Tuple[Tuple[float, ...], Tuple[float, ...]]  # per-channel (lo, hi); one entry: all

_X_RANGE_FORMS = ("(lo, hi) with two numbers (the input values of pixel levels 0 and 255, same "
                  "for every channel) or ([lo_0, lo_1, ...], [hi_0, hi_1, ...]) with one pair "
                  "per channel, hi > lo; cl_plugins.core.buffer.grid_range(mean, std) gives it "
                  "for a benchmark's normalisation")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_x_range(x_range, x_dtype=torch.uint8, name: str = "x_range") -> Optional[XRange]:
    """Validate ``x_range`` (see :class:`ReplayBuffer`) and return it as a pair of per-channel
    float tuples (None stays None). ``x_dtype`` (a dtype, its name or None) must be uint8 when
    ``x_range`` is given: the range describes the value grid of uint8 storage."""
    if x_range is None:
        return None
    bad = ValueError(f"{name} must be {_X_RANGE_FORMS}; got {x_range!r}")
    if isinstance(x_range, (str, bytes)) or not isinstance(x_range, Sequence) \
            or len(x_range) != 2:
        raise bad
    lo, hi = x_range
    if _is_number(lo) and _is_number(hi):
        lo, hi = (float(lo),), (float(hi),)
    elif all(isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in (lo, hi)):
        if len(lo) == 0 or len(lo) != len(hi):
            raise ValueError(f"{name}: the lists of lo and hi values need one entry per channel "
                             f"each (the same length, at least 1); got {len(lo)} lo and "
                             f"{len(hi)} hi values in {x_range!r}")
        if not all(_is_number(v) for v in (*lo, *hi)):
            raise bad
        lo, hi = tuple(float(v) for v in lo), tuple(float(v) for v in hi)
    else:
        raise bad
    if not all(math.isfinite(v) for v in (*lo, *hi)):
        raise ValueError(f"{name} values must be finite; got {x_range!r}")
    if any(h <= lw for lw, h in zip(lo, hi)):
        raise ValueError(f"{name} needs hi > lo for every channel (hi: the value of pixel level "
                         f"255, lo: of level 0); got lo={list(lo)}, hi={list(hi)}")
    dtype = storage_dtype("x_dtype", x_dtype)
    if dtype != torch.uint8:
        shown = None if dtype is None else _dtype_name(dtype)
        raise ValueError(f"{name} sets the value grid of uint8 input storage: it needs "
                         f"x_dtype='uint8'; got x_dtype={shown!r} (leave {name}=None for other "
                         "storage dtypes)")
    return lo, hi


def grid_range(mean: Union[None, float, Sequence[float]] = None,
               std: Union[None, float, Sequence[float]] = None):
    """``x_range`` for inputs made from uint8 pixels v as ``(v / 255 - mean_c) / std_c`` (the
    benchmarks of ``cl_plugins.benchmarks`` with ``normalize``): per channel
    (lo, hi) = ((0 - m) / s, (1 - m) / s), as ``([lo_c, ...], [hi_c, ...])`` for per-channel
    lists and ``(lo, hi)`` for numbers; ``(0.0, 1.0)`` without normalisation (both None). Pass
    the benchmark's own mean and std (``BenchmarkInfo.options["mean"]`` / ``["std"]``): the
    buffer recovers them from the range and reads back bit-identical float32 values."""
    if mean is None and std is None:
        return (0.0, 1.0)
    if mean is None or std is None:
        raise ValueError("grid_range: mean and std must be given together (both None: inputs "
                         "v / 255 without normalisation)")
    if _is_number(mean) and _is_number(std):
        ms, scalar = [(float(mean), float(std))], True
    elif (isinstance(mean, Sequence) and isinstance(std, Sequence) and len(mean) == len(std) > 0
          and all(_is_number(v) for v in (*mean, *std))):
        ms, scalar = [(float(m), float(s)) for m, s in zip(mean, std)], False
    else:
        raise ValueError(f"grid_range: mean and std must be two numbers or two lists of numbers "
                         f"of the same length (one per channel); got mean={mean!r}, std={std!r}")
    if any(not s > 0 or not math.isfinite(s) or not math.isfinite(m) for m, s in ms):
        raise ValueError(f"grid_range: std must be positive and mean, std finite; got "
                         f"mean={mean!r}, std={std!r}")
    lo = [(0.0 - m) / s for m, s in ms]
    hi = [(1.0 - m) / s for m, s in ms]
    return (lo[0], hi[0]) if scalar else (lo, hi)


def _grid_mean_std(x_range: XRange) -> Tuple[List[float], List[float]]:
    """The (mean, std) that give ``x_range`` through ``grid_range``: s = 1 / (hi - lo),
    m = -lo / (hi - lo) (float64; equal to the benchmark's values after float32 rounding)."""
    width = [h - lw for lw, h in zip(*x_range)]
    return [-lw / w for lw, w in zip(x_range[0], width)], [1.0 / w for w in width]


class _Grid:
    """uint8 codes <-> float32 input values on the 256-level grid of an ``x_range``."""

    def __init__(self, x_range: XRange):
        self.x_range = x_range
        self.channels = len(x_range[0])
        mean, std = _grid_mean_std(x_range)
        self._consts = {"m": mean, "s": std, "lo": list(x_range[0]),
                        "scale": [255.0 / (h - lw) for lw, h in zip(*x_range)]}
        self._on: Dict[tuple, Dict[str, torch.Tensor]] = {}

    def _tensors(self, device: torch.device, dim: int) -> Dict[str, torch.Tensor]:
        """float32 m, s, lo, 255 / (hi - lo) on ``device``, shaped to broadcast along dim 1 (the
        channel dimension) of a ``dim``-dimensional batch."""
        key = (device, dim)
        if key not in self._on:
            shape = (1, self.channels) + (1,) * (dim - 2) if self.channels > 1 else ()
            self._on[key] = {k: torch.tensor(v, dtype=torch.float32, device=device).view(shape)
                             for k, v in self._consts.items()}
        return self._on[key]

    def check_shape(self, x: torch.Tensor, what: str) -> None:
        if self.channels > 1 and (x.dim() < 2 or x.shape[1] != self.channels):
            raise ValueError(f"ReplayBuffer.{what}: x_range gives {self.channels} channels "
                             f"(one (lo, hi) pair each, along dim 1), but the inputs have shape "
                             f"{tuple(x.shape)}")

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """float32 (q / 255 - m) / s: the float32 operations of the benchmarks
        (preprocess.to_float then preprocess.normalize, stored.UInt8ImageDataset), so the values
        are theirs bit for bit (given the same float32 m and s)."""
        c = self._tensors(q.device, q.dim())
        return q.to(torch.float32).div_(255.0).sub_(c["m"]).div_(c["s"])

    def encode(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """uint8 codes q = round((x - lo) * 255 / (hi - lo)); ValueError unless every value is
        within a quarter of the level spacing of a level in 0..255."""
        if not x.is_floating_point():
            raise ValueError(f"ReplayBuffer.{what}: with x_range the inputs must be floating "
                             f"point values on the grid of x_range={self.shown()}; got "
                             f"{_dtype_name(x.dtype)} inputs (to store uint8 pixel levels as "
                             "they are, leave x_range=None)")
        self.check_shape(x, what)
        c = self._tensors(x.device, x.dim())
        xf = x.detach().to(torch.float32)
        r = (xf - c["lo"]).mul_(c["scale"])  # in level units
        q = r.round().clamp_(0.0, 255.0)
        # |r - q| <= 1/4: within a quarter of the spacing of a level in 0..255 (NaN fails)
        if not bool(r.sub_(q).abs_().le_(0.25).all()):
            self._refuse(xf, what)
        return q.to(torch.uint8)

    def _refuse(self, xf: torch.Tensor, what: str) -> None:
        c = self._tensors(xf.device, xf.dim())
        r = (xf - c["lo"]) * c["scale"]
        err = torch.nan_to_num((r - r.round().clamp(0.0, 255.0)).abs(), nan=float("inf"))
        bad = ~(err <= 0.25)
        worst = int(err.flatten().argmax())
        ch = worst // math.prod(xf.shape[2:]) % self.channels if self.channels > 1 else 0
        spacing = (self.x_range[1][ch] - self.x_range[0][ch]) / 255.0
        value = float(xf.flatten()[worst])
        far = (f"the value {value:.8g} is {float(err[bad].max()) * spacing:.6g} from the nearest "
               "level" if math.isfinite(value) else f"found the non-finite value {value}")
        finite = xf[torch.isfinite(xf)]
        span = (f"[{float(finite.min()):.6g}, {float(finite.max()):.6g}]" if finite.numel()
                else "none finite")
        raise ValueError(
            f"ReplayBuffer.{what}: {int(bad.sum())} of {xf.numel()} input values are not on the "
            f"256-level grid of x_range={self.shown()} (level spacing {spacing:.6g}"
            f"{' in channel ' + str(ch) if self.channels > 1 else ''}; allowed distance "
            f"{spacing / 4:.6g}): {far}; the input values span {span}. x_range must give the "
            "input values of pixel levels 0 and 255 (grid_range(mean, std) for inputs "
            "(v / 255 - mean) / std), and the inputs must not be augmented or otherwise changed "
            "before they are stored; uint8 storage would lose information here")

    def shown(self):
        lo, hi = self.x_range
        return (lo[0], hi[0]) if self.channels == 1 else (list(lo), list(hi))


class ReplayBuffer:
    """Fixed-capacity memory of (x, y[, t][, logits]) tensors; see the module docstring.

    :param capacity: number of slots (int >= 1).
    :param policy: ``"reservoir"``, ``"class_balanced"`` or ``"greedy_class_balanced"``.
    :param seed: seed of the buffer's ``torch.Generator``; None draws one from torch's global
        RNG (so a run seeded with ``torch.manual_seed`` is reproducible, and different run seeds
        give different buffers).
    :param x_dtype: storage dtype of the inputs (torch dtype or its name, e.g. ``"float16"``);
        None keeps the dtype of the first batch added. Reads convert back to that dtype.
        ``"uint8"`` stores uint8 inputs as they are, and float inputs only with ``x_range``.
    :param x_range: with ``x_dtype="uint8"``: the 256-level grid the float inputs lie on, given
        by the input values of pixel levels 0 and 255: ``(lo, hi)`` (every channel) or
        ``([lo_c, ...], [hi_c, ...])`` (one pair per channel, channels along dim 1);
        :func:`grid_range` gives it from a benchmark's mean and std. Inputs are stored as
        q = round((x - lo) * 255 / (hi - lo)) and read back as float32
        ``(q / 255 - m) / s`` with m = -lo / (hi - lo), s = 1 / (hi - lo), the benchmarks' own
        float32 computation; an input farther than a quarter of the level spacing from the
        grid raises a ValueError at ``add`` / ``set_contents``. None (default): no grid.
    :param device: where the storage lives (default ``"cpu"``); reads move to the device asked.
    """

    def __init__(self, capacity: int, policy: str = "reservoir", seed: Optional[int] = None,
                 x_dtype: Union[None, str, torch.dtype] = None, device="cpu",
                 x_range=None):
        self.capacity = check_int("capacity", capacity, 1)
        self.policy = check_choice("policy", policy, POLICIES)
        self.seed = resolve_seed(seed)
        self.x_dtype = storage_dtype("x_dtype", x_dtype)
        self.x_range: Optional[XRange] = check_x_range(x_range, self.x_dtype)
        self._grid = None if self.x_range is None else _Grid(self.x_range)
        self.device = torch.device(device)
        self.generator = seeded_generator(self.seed)
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
        """Stored inputs, in the storage dtype (a view: do not modify); with ``x_range`` these
        are the uint8 level codes: ``get`` / ``sample`` / ... return the input values."""
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
        self._x_out_dtype = torch.float32 if self._grid is not None else x.dtype
        self._store["x"] = torch.empty((n, *x.shape[1:]), dtype=self.x_dtype or x.dtype,
                                       device=dev)
        self._store["y"] = torch.empty(n, dtype=torch.long, device=dev)
        if t is not None:
            self._store["t"] = torch.empty(n, dtype=torch.long, device=dev)
        if logits is not None:
            self._store["logits"] = torch.empty((n, *logits.shape[1:]), dtype=torch.float32,
                                                device=dev)

    def _encode_x(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """The inputs as they go to storage: uint8 codes with ``x_range`` (checked to lie on
        its grid); float inputs into uint8 storage without a grid are refused."""
        if self._grid is not None:
            return self._grid.encode(x, what)
        if self.x_dtype == torch.uint8 and x.dtype != torch.uint8:
            raise ValueError(f"ReplayBuffer.{what}: x_dtype='uint8' without x_range stores uint8 "
                             f"inputs only; got {_dtype_name(x.dtype)} inputs, which a cast would "
                             "truncate. Pass x_range (the input values of pixel levels 0 and "
                             "255, e.g. grid_range(mean, std)) to store float inputs that lie on "
                             "a 256-level grid, or another x_dtype")
        return x

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
        code = self._encode_x(x, "add")  # before any change: a refused batch leaves no trace
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
        self._write(s, p, {"x": code, "y": y, "t": t, "logits": logits})
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
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            # checked before the reset: refused contents leave the buffer as it was
            code = self._encode_x(x, "set_contents")
        keep_seen, keep_classes, keep_full = self.n_seen, self.seen_per_class, self._full_classes
        self._reset()
        self.n_seen, self.seen_per_class, self._full_classes = keep_seen, keep_classes, keep_full
        self._check_fields(x, y, t, logits, "set_contents")
        self._allocate(x, t, logits)
        n = x.shape[0]
        idx = torch.arange(n)
        self._write(idx, idx, {"x": code, "y": y, "t": t, "logits": logits})
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
            if name == "x" and self._grid is not None:
                return self._grid.decode(v)  # float32 input values
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
            "x_range": None if self.x_range is None else [list(v) for v in self.x_range],
            "x_out_dtype": None if self._x_out_dtype is None else _dtype_name(self._x_out_dtype),
            "data": {k: v[:self._size].detach().cpu().clone() for k, v in self._store.items()},
            "shapes": {k: list(v.shape[1:]) for k, v in self._store.items()},
            "dtypes": {k: _dtype_name(v.dtype) for k, v in self._store.items()},
            "seen_per_class": dict(self.seen_per_class),
            "full_classes": sorted(self._full_classes),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        check_fields("ReplayBuffer", state, {"capacity": self.capacity, "policy": self.policy})
        x_dtype = None if state["x_dtype"] is None else getattr(torch, state["x_dtype"])
        x_range = check_x_range(state.get("x_range"), x_dtype)  # states before x_range: None
        self._reset()
        self.seed = state["seed"]
        self.x_dtype, self.x_range = x_dtype, x_range
        self._grid = None if x_range is None else _Grid(x_range)
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
