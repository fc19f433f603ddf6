"""Latent replay mechanics: a model split at a named layer, its lower part frozen or slowed, and
stored activations fed into the upper part (latent replay, ExStream, later AR1*).

Pieces (each usable alone; ``LatentReplayBase`` wires them into Avalanche's hooks):

- ``LatentSplit(model, layer, who)``: one forward hook on the module named ``layer`` (a name of
  ``model.named_modules()``, e.g. ``"backbone"`` for a ``ClassifierNet``'s features). While
  ``armed``, the hook keeps the layer's output (``take()``) and, when ``extra`` holds stored
  activations, returns ``cat([output, extra])``: the layers above run on the current rows
  followed by the replayed ones. ``stop`` makes the hook end the forward pass right after the
  layer (``latents()``: the lower part alone, e.g. to fill a memory). A copied or pickled hook
  is inert.
- ``trace_lower(model, module, run)``: the modules whose forward completes before ``module``'s
  output exists, ``module`` and its submodules included, in execution order, found by running
  ``run()`` once with recording hooks and stopping after ``module``. Their own parameters are
  the *lower part*. (A parameter that a container uses itself before calling ``module``,
  rather than through a submodule, is not found: it would stay trainable.)
- ``LowerPart``: the lower modules and parameters; ``freeze()`` sets ``requires_grad=False``
  (no graph is built below the layer, so the lower part costs a forward only) and ``hold_modes()``
  puts the lower modules in eval mode (BatchNorm statistics and dropout fixed: the stored
  activations stay those the lower part computes); ``snapshot()`` / ``scale_step(scale)`` turn
  any optimizer's step on the lower parameters into ``scale`` times that step (exactly a learning
  rate times ``scale`` for SGD with or without momentum and weight decay, Adam and AdamW, whose
  steps are proportional to the learning rate given their state; the state itself is updated as
  usual).
- ``LatentMemory``: AR1's latent memory (Avalanche 0.6 ``training/supervised/ar1.py``
  ``_after_training_exp``; vlomonaco/ar1-pytorch ``ar1star_lat_replay.py``): after the i-th
  experience, h = min(capacity // i, n_i) activations drawn uniformly from that experience
  replace h uniformly drawn stored ones (free slots are filled first), so each past experience
  keeps capacity / i slots in expectation. Storage is a ``core.buffer.ReplayBuffer`` (x = the
  activations): its bytes are counted as ER's (``nbytes``: every slot of x, y and t), and a
  budget can be given in bytes (``mem_bytes``): capacity = mem_bytes // bytes per slot, known
  once the activation shape is (``slot_bytes``).
- ``replay_share`` (AR1's replayed rows per step) and ``ReplayOrder`` (memory slots in random
  passes, m a step).
- ``LatentReplayBase``: a plugin skeleton. A subclass writes ``replay_rows`` (the stored rows to
  append this step), ``observe`` (the current rows' activations after each step) and
  ``end_experience``; the base owns the split, the lower part's schedule (trained on the first
  ``freeze_after`` experiences, then frozen or slowed by ``lower_lr_scale``), the appended
  labels and task labels, the step scaling, the generator and the state; ``dataset_latents``
  and ``store_experience`` compute activations of an experience's samples (eval mode) and apply
  AR1's memory update.

Labels: the replayed rows' labels and task labels are appended to ``strategy.mbatch[1]`` and
``strategy.mbatch[-1]`` in ``before_forward``; ``mbatch[0]`` (the inputs) keeps its n rows. The
template's criterion reads ``mb_y`` (``mbatch[1]``) after the forward, so it sees the n + m
rows; a ``ClassifierNet`` passes the n + m task labels to its head with the n + m features.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn

from cl_plugins.core.buffer import ReplayBuffer, resolve_seed, storage_dtype
from cl_plugins.core.checks import check_int, check_range
from cl_plugins.core.data_parallel import gather_stream, rank_share
from cl_plugins.core.feature_distill import named_modules
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_owner, check_settings, owned_by

Rows = Tuple[Tensor, Tensor, Tensor]  # (activations, labels, task labels)


class _Stop(Exception):
    """Ends a forward pass once the latent layer has run."""


def check_layer(layer) -> str:
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a module name (as in model.named_modules(), e.g. "
                         f"'backbone'); got {layer!r}")
    return layer


class _SplitHook:
    def __init__(self, split: Optional["LatentSplit"]):
        self.split = split

    def __call__(self, module, inputs, output):
        s = self.split
        if s is None or not s.armed:
            return None
        if not isinstance(output, Tensor):
            raise ValueError(f"{s.who}: layer {s.layer!r} ({type(module).__name__}) returns a "
                             f"{type(output).__name__}, not a tensor; choose a layer that "
                             "outputs activations")
        s.output = output
        if s.stop:
            raise _Stop()
        if s.extra is not None:
            return torch.cat([output, s.extra.to(output.device, output.dtype)])
        return None

    def __reduce__(self):
        return (_SplitHook, (None,))

    def __deepcopy__(self, memo):
        return _SplitHook(None)


@contextmanager
def modes_kept(model: nn.Module, eval_mode: bool = True):
    """Run with ``model`` in eval mode (if asked); every module's mode is restored after."""
    saved = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


class LatentSplit:
    def __init__(self, model: nn.Module, layer: str, who: str):
        self.layer, self.who = check_layer(layer), who
        self.module = named_modules(model, [layer], who)[layer]
        self.armed, self.stop = False, False
        self.extra: Optional[Tensor] = None
        self.output: Optional[Tensor] = None
        self.handle = self.module.register_forward_hook(_SplitHook(self))

    def take(self) -> Optional[Tensor]:
        out, self.output = self.output, None
        return out

    @torch.no_grad()
    def latents(self, model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        """The layer's output for inputs ``x`` (task labels ``t``), the model in eval mode,
        without running the layers above."""
        self.armed, self.stop, self.output = True, True, None
        try:
            with modes_kept(model):
                avalanche_forward(model, x, t)
        except _Stop:
            pass
        finally:
            self.armed, self.stop = False, False
        if self.output is None:
            raise ValueError(f"{self.who}: layer {self.layer!r} did not run in the model's "
                             "forward pass; choose a module the forward calls")
        return self.take()

    def remove(self) -> None:
        self.handle.remove()
        self.armed, self.extra, self.output = False, None, None


def trace_lower(model: nn.Module, module: nn.Module, run: Callable[[], object]) -> List[nn.Module]:
    """Modules completing before ``module``'s output exists (``module`` included), in order."""
    done: List[nn.Module] = []

    def record(m, i, o):
        done.append(m)

    def stop(m, i, o):
        raise _Stop()

    handles = [m.register_forward_hook(record) for m in model.modules()]
    handles.append(module.register_forward_hook(stop))  # after ``record`` on the same module
    try:
        with torch.no_grad(), modes_kept(model):
            run()
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if module not in done:
        raise ValueError("the latent layer did not run in the model's forward pass")
    return list(dict.fromkeys(done))


class LowerPart:
    """The modules and parameters below (and of) the latent layer."""

    def __init__(self, modules: List[nn.Module]):
        self.modules = modules
        params = [p for m in modules for p in m.parameters(recurse=False)]
        self.params = list({id(p): p for p in params}.values())
        self._old: Optional[List[Tensor]] = None

    def freeze(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def hold_modes(self) -> None:
        for m in self.modules:
            m.training = False

    def snapshot(self) -> None:
        self._old = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def scale_step(self, scale: float) -> None:
        """p <- p_old + scale (p - p_old) for the step taken since ``snapshot()``."""
        if self._old is None:
            return
        for p, old in zip(self.params, self._old):
            p.copy_(old + scale * (p - old))
        self._old = None


class LatentMemory:
    """AR1's latent memory over a ``ReplayBuffer`` (module docstring); capacity from
    ``mem_size`` slots or ``mem_bytes`` bytes, fixed at the first ``update``."""

    def __init__(self, mem_size: Optional[int], mem_bytes: Optional[int], dtype=None,
                 seed: int = 0):
        if (mem_size is None) == (mem_bytes is None):
            raise ValueError(f"give exactly one of mem_size (stored activations) and mem_bytes "
                             f"(bytes); got mem_size={mem_size!r}, mem_bytes={mem_bytes!r}")
        self.mem_size = None if mem_size is None else check_int("mem_size", mem_size, 1)
        self.mem_bytes = None if mem_bytes is None else check_int("mem_bytes", mem_bytes, 1)
        self.dtype = storage_dtype("latent_dtype", dtype)
        if self.dtype == torch.uint8:
            raise ValueError("latent_dtype must be a float dtype ('float32', 'float16', "
                             "'bfloat16', 'float64') or None; got 'uint8'")
        self.seed = seed
        self.buffer: Optional[ReplayBuffer] = None

    def slot_bytes(self, shape, dtype: torch.dtype) -> int:
        """Bytes of one slot: the activation, its int64 label and int64 task label."""
        item = torch.empty((), dtype=self.dtype or dtype).element_size()
        return math.prod(shape) * item + 16

    def capacity_for(self, shape, dtype) -> int:
        if self.mem_size is not None:
            return self.mem_size
        cap = self.mem_bytes // self.slot_bytes(shape, dtype)
        if cap < 1:
            raise ValueError(f"mem_bytes={self.mem_bytes} is less than one stored activation "
                             f"({self.slot_bytes(shape, dtype)} bytes for shape {tuple(shape)})")
        return cap

    def __len__(self) -> int:
        return 0 if self.buffer is None else len(self.buffer)

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.nbytes

    def update(self, z: Tensor, y: Tensor, t: Tensor, i: int, gen: torch.Generator) -> None:
        """After the i-th experience (i = 1, 2, ...): its h activations in (AR1)."""
        if self.buffer is None:
            self.buffer = ReplayBuffer(self.capacity_for(z.shape[1:], z.dtype), seed=self.seed,
                                       x_dtype=self.dtype)
        cap, n = self.buffer.capacity, z.shape[0]
        h = min(cap // i, n)
        pick = torch.randperm(n, generator=gen)[:h]
        size = len(self.buffer)
        if size == 0:
            self.buffer.set_contents(z[pick], y[pick], t[pick])
            return
        old = self.buffer.get(torch.arange(size))
        n_free = min(cap - size, h)
        slots = torch.randperm(size, generator=gen)[:h - n_free]
        x, yy, tt = old.x.clone(), old.y.clone(), old.t.clone()
        x[slots], yy[slots], tt[slots] = (v[pick[n_free:]].to(x.device) for v in (z, y, t))
        new = pick[:n_free]
        self.buffer.set_contents(torch.cat([x, z[new]]), torch.cat([yy, y[new]]),
                                 torch.cat([tt, t[new]]))

    def state_dict(self) -> Dict:
        return {"buffer": None if self.buffer is None else self.buffer.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        b = state["buffer"]
        self.buffer = None
        if b is not None:
            self.buffer = ReplayBuffer(b["capacity"], seed=self.seed, x_dtype=self.dtype)
            self.buffer.load_state_dict(b)


def replay_share(train_mb_size: int, memory_len: int, n_current: int) -> int:
    """Rows to replay a step so that an epoch over ``n_current`` samples in minibatches of
    ``train_mb_size`` passes once over ``memory_len`` stored rows: ceil(B R / N), at most R
    (AR1's share; its code instead shrinks the incoming minibatch to B minus that)."""
    if memory_len == 0:
        return 0
    return min(memory_len, math.ceil(train_mb_size * memory_len / max(1, n_current)))


class ReplayOrder:
    """Memory slots to replay, m at a time, from random permutations of the memory (each slot
    once per pass; a new permutation is appended when fewer than m remain)."""

    def __init__(self):
        self.queue = torch.zeros(0, dtype=torch.long)

    def next(self, m: int, size: int, gen: torch.Generator) -> Tensor:
        while self.queue.numel() < m:
            self.queue = torch.cat([self.queue, torch.randperm(size, generator=gen)])
        out, self.queue = self.queue[:m], self.queue[m:]
        return out

    def reset(self) -> None:
        self.queue = torch.zeros(0, dtype=torch.long)


class LatentReplayBase(SupervisedPlugin):
    """Plugin skeleton of latent replay (module docstring). Subclasses set ``SETTINGS`` (which
    must include the base's) and write ``replay_rows``, ``observe``, ``end_experience``,
    ``extra_state`` and ``load_extra_state``."""

    SETTINGS: Tuple[str, ...] = ("layer", "freeze_after", "lower_lr_scale")

    def __init__(self, layer: str, freeze_after: int, lower_lr_scale: float,
                 seed: Optional[int]):
        super().__init__()
        self.layer = check_layer(layer)
        self.freeze_after = check_int("freeze_after", freeze_after, 0, 1)
        self.lower_lr_scale = float(check_range("lower_lr_scale", lower_lr_scale, 0.0, 1.0))
        self.seed = resolve_seed(seed)
        self.generator = seeded_generator(self.seed)
        self.n_experiences = 0
        self.split: Optional[LatentSplit] = None
        self.lower: Optional[LowerPart] = None
        self._model = None
        self._n = 0  # current rows this step
        self._n_inputs = 0  # input rows after this plugin's before_forward
        self._z: Optional[Tensor] = None

    @property
    def who(self) -> str:
        return type(self).__name__

    @property
    def protecting(self) -> bool:
        """True once the lower part is frozen or slowed (after ``freeze_after`` experiences)."""
        return self.n_experiences >= self.freeze_after

    # -------------------------------------------------------------- for subclasses
    def replay_rows(self, strategy) -> Optional[Rows]:
        return None

    def observe(self, strategy, z: Tensor, y: Tensor, t: Tensor) -> None:
        """The current rows' activations (detached) after each training step."""

    def end_experience(self, strategy) -> None:
        """After ``n_experiences`` was incremented at the end of an experience."""

    def extra_state(self) -> Dict:
        return {}

    def load_extra_state(self, state: Dict) -> None:
        pass

    # -------------------------------------------------------------- helpers
    def attach(self, model: nn.Module) -> None:
        if self._model is not model:
            if self.split is not None:
                self.split.remove()
            self.split, self.lower, self._model = LatentSplit(model, self.layer, self.who), \
                None, model

    @torch.no_grad()
    def dataset_latents(self, strategy, dataset, index: Tensor) -> Rows:
        """Activations (eval mode), labels and task labels of ``dataset[index]``, on the CPU."""
        self.attach(strategy.model)
        ds = dataset.eval() if hasattr(dataset, "eval") else dataset
        # a loader of its own generator: iterating draws its base seed from it, not from the
        # global RNG that the strategy's shuffling and the model use
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, index.tolist()),
                                             batch_size=strategy.eval_mb_size or 256,
                                             generator=torch.Generator().manual_seed(0))
        zs, ys, ts = [], [], []
        for batch in loader:
            x, y, t = (v.to(strategy.device) for v in (batch[0], batch[1], batch[-1]))
            zs.append(self.split.latents(strategy.model, x, t).cpu())
            ys.append(y.cpu().long())
            ts.append(t.cpu().long())
        return torch.cat(zs), torch.cat(ys), torch.cat(ts)

    def store_experience(self, strategy, memory: LatentMemory) -> None:
        """AR1's memory update at the end of experience ``n_experiences``: the activations of
        h_i random samples of ``strategy.experience.dataset`` (only those are computed)."""
        ds, i = strategy.experience.dataset, self.n_experiences
        order = torch.randperm(len(ds), generator=self.generator)
        if memory.buffer is None:  # capacity from the activation's shape (one sample)
            z1 = self.dataset_latents(strategy, ds, order[:1])[0]
            cap = memory.capacity_for(z1.shape[1:], z1.dtype)
        else:
            cap = memory.buffer.capacity
        z, y, t = self.dataset_latents(strategy, ds, order[:min(cap // i, len(ds))])
        memory.update(z, y, t, i, self.generator)

    # -------------------------------------------------------------- hooks
    def before_training_exp(self, strategy, **kwargs):
        self.attach(strategy.model)

    def before_training_iteration(self, strategy, **kwargs):
        self._n = strategy.mbatch[0].shape[0]
        if self.lower is not None and self.protecting:
            self.lower.hold_modes()

    def before_forward(self, strategy, **kwargs):
        self.attach(strategy.model)
        if self.lower is None:
            x, t = strategy.mbatch[0][:2], strategy.mbatch[-1][:2]
            self.lower = LowerPart(trace_lower(strategy.model, self.split.module,
                                               lambda: avalanche_forward(strategy.model, x, t)))
        if self.protecting:
            if self.lower_lr_scale == 0.0:
                self.lower.freeze()
            self.lower.hold_modes()
        rows = self.replay_rows(strategy)
        if rows is not None and rows[0].shape[0] > 0:
            z, y, t = rank_share(*rows)  # torch.distributed: this rank's share of the same draw
            mb = strategy.mbatch
            mb[1] = torch.cat([mb[1], y.to(mb[1].device, mb[1].dtype)])
            mb[-1] = torch.cat([mb[-1], t.to(mb[-1].device, mb[-1].dtype)])
            self.split.extra = z
        self.split.armed = True
        self._n_inputs = strategy.mbatch[0].shape[0]

    def after_forward(self, strategy, **kwargs):
        self.split.armed, self.split.extra = False, None
        if strategy.mbatch[0].shape[0] != self._n_inputs:
            raise ValueError(f"{self.who}: a plugin listed after it appended input rows in "
                             "before_forward (ER, MIR, generative replay): their labels would "
                             f"follow the replayed activations' labels; list it before {self.who}")
        out = self.split.take()
        self._z = None if out is None else out.detach()[:self._n]

    def before_update(self, strategy, **kwargs):
        if self.protecting and 0.0 < self.lower_lr_scale < 1.0:
            self.lower.snapshot()

    def after_update(self, strategy, **kwargs):
        if self.protecting and 0.0 < self.lower_lr_scale < 1.0:
            self.lower.scale_step(self.lower_lr_scale)

    def after_training_iteration(self, strategy, **kwargs):
        if self._z is not None:
            n = self._n
            # torch.distributed: every rank observes the whole minibatch, in order
            self.observe(strategy, *gather_stream(strategy, self._z,
                                                  strategy.mbatch[1][:n].detach(),
                                                  strategy.mbatch[-1][:n].detach()))
        self._z = None

    def after_training_exp(self, strategy, **kwargs):
        self.n_experiences += 1
        self.end_experience(strategy)

    # -------------------------------------------------------------- state
    def state_dict(self) -> Dict:
        return {**owned_by(self), "config": {k: getattr(self, k) for k in self.SETTINGS},
                "seed": self.seed, "n_experiences": self.n_experiences,
                "generator": self.generator.get_state(), "extra": self.extra_state()}

    def load_state_dict(self, state: Dict) -> None:
        check_owner(self, state)
        check_settings(self, {**state, **state["config"]}, self.SETTINGS)
        self.seed, self.n_experiences = state["seed"], int(state["n_experiences"])
        self.generator.set_state(state["generator"].clone())
        self.lower = None  # traced again (and frozen again) at the next forward
        self.load_extra_state(state["extra"])
