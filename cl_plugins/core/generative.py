"""``GenerativeReplayBase``: the mechanics shared by the methods that replay generated inputs.

Used by ``generative_replay`` (DGR, DGR+distill) and ``negative_replay``. Each subclass writes
``replay_loss(out, teacher_out, y)``, the loss of the replayed rows; the base class owns:

- the generator (``cl_plugins.core.generator`` protocol; default ``cl_plugins.core.vae.VAE``,
  built at the first step from the inputs' shape, its initial weights drawn from the plugin's
  own seeded generator ``rng``), trained once per solver step on the incoming inputs and the
  replayed ones (weights 1/t and 1 - 1/t, as van de Ven's ``generator.train_a_batch(x, x_=x_,
  rnt=1./context)`` in ``train/train_task_based.py``);
- at each experience's end, frozen copies of the model (the previous *solver*, ``teacher``) and
  of the generator (``prev_generator``), as his ``copy.deepcopy(model).eval()`` and
  ``copy.deepcopy(generator).eval()``;
- at each step from the second experience on: ``m`` inputs sampled from ``prev_generator``,
  labelled by the teacher (``label``: its argmax) and appended to ``strategy.mbatch`` after the
  stream rows (``cl_plugins.core.replay_loader.append_rows``). With one head (domain-, class-IL)
  the m rows go once; with per-task heads (task-IL) the same m inputs go once per past task
  label k, each copy on head k and labelled by the teacher's head k (his code evaluates one
  generated batch on every past context's active classes and averages the per-context losses:
  equal counts make that the mean over all copies);
- the loss: at ``before_backward`` the criterion's share of ``strategy.loss`` (recomputed from
  the same outputs) is swapped for ``w_cur * crit(stream rows) + w_rep * replay_loss`` with
  (w_cur, w_rep) = (1/t, 1 - 1/t) (``loss_weighting="vandeven"``, ``core.schedule``) or the
  rows' shares (``"batch"``: one mean over all rows); other plugins' terms keep their weight
  (exact up to rounding for a per-sample-mean criterion, as ER's ``loss_weighting``);
- the state: generator weights and optimizer state, the frozen copies, the RNG, the counters.

The plugin must be the only one appending rows to the minibatch (checked at ``before_forward``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward

from cl_plugins.core.checks import check_choice, check_int, check_positive
from cl_plugins.core.distill import restore_teacher, teacher_state
from cl_plugins.core.generator import check_generator
from cl_plugins.core.heads_layout import head_layout
from cl_plugins.core.params import task_specific_prefixes
from cl_plugins.core.data_parallel import gather_stream, rank_share
from cl_plugins.core.replay_loader import append_rows, require_stream_batches, stream_minibatch
from cl_plugins.core.schedule import vandeven_weights
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.snapshot import frozen_copy
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.vae import VAE, parse_x_range

LOSS_WEIGHTINGS = ("vandeven", "batch")
BASE_SETTINGS = ("replay_mb_size", "loss_weighting", "vae_fc_layers", "vae_fc_units",
                 "vae_z_dim", "vae_lr", "x_range")


def to_cpu(obj):
    """A copy of ``obj`` (nested dicts / lists of tensors) with every tensor cloned on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class GenerativeReplayBase(SupervisedPlugin):
    SETS_DATALOADER = False  # extends the minibatch in before_forward instead
    SETTINGS: Sequence[str] = BASE_SETTINGS

    def __init__(self, generator, replay_mb_size: Optional[int], loss_weighting: str,
                 seed: Optional[int], vae_fc_layers: int, vae_fc_units: int, vae_z_dim: int,
                 vae_lr: float, x_range):
        super().__init__()
        if replay_mb_size is not None:
            check_int("replay_mb_size", replay_mb_size, 1)
        self.replay_mb_size = replay_mb_size
        self.loss_weighting = check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        check_int("vae_fc_layers", vae_fc_layers, 2)
        check_int("vae_fc_units", vae_fc_units, 1)
        check_int("vae_z_dim", vae_z_dim, 1)
        self.vae_lr = float(check_positive("vae_lr", vae_lr))
        self.vae_fc_layers, self.vae_fc_units, self.vae_z_dim = (vae_fc_layers, vae_fc_units,
                                                                 vae_z_dim)
        parse_x_range(x_range, None)
        self.x_range = x_range
        if seed is None:  # drawn from torch's global RNG at construction, as ER's memory
            seed = int(torch.randint(0, 2 ** 62, (1,)))
        self.rng = seeded_generator(seed)
        self.generator = None if generator is None else check_generator("generator", generator)
        self.input_shape: Optional[List[int]] = None
        self.teacher = self.prev_generator = self._pending_teacher = None
        self.n_experiences = 0  # t - 1 while training the t-th experience
        self.old_tasks: List[int] = []  # task labels of the finished experiences
        self.old_classes: List[int] = []  # classes of the finished experiences
        self.current_classes: List[int] = []
        self.layout = "single"
        self._incoming = self._x_gen = self._teacher_out = None
        self._start = self._n_rep = 0

    # ---------------------------------------------------------------- to write in a subclass
    def replay_loss(self, out: torch.Tensor, teacher_out: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
        """The loss of the replayed rows: their outputs, the teacher's, their labels."""
        raise NotImplementedError

    def label(self, teacher_out: torch.Tensor) -> torch.Tensor:
        """Hard labels of the replayed rows: the teacher's most probable class."""
        return teacher_out.argmax(dim=1)

    # ---------------------------------------------------------------- generator, teacher
    def _build_vae(self, shape: Sequence[int], draw_init: bool = True) -> VAE:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.rng)) if draw_init else 0
        with torch.random.fork_rng(devices=[]):  # the global RNG is left untouched
            torch.manual_seed(seed)
            vae = VAE(shape, self.vae_fc_layers, self.vae_fc_units, self.vae_z_dim,
                      lr=self.vae_lr, x_range=self.x_range)
        self.input_shape = [int(s) for s in shape]
        return vae

    def _frozen_generator(self):
        opt, self.generator.optimizer = self.generator.optimizer, None  # not copied
        try:
            return frozen_copy(self.generator)
        finally:
            self.generator.optimizer = opt

    def _ensure_teacher(self, model) -> None:
        if self._pending_teacher is None:
            return
        # it may lack only what Avalanche added for the current task (a head, its unit mask)
        skip = tuple(task_specific_prefixes(model))
        self.teacher = restore_teacher(
            model, self._pending_teacher, type(self).__name__,
            may_lack=lambda k: bool(skip and k.startswith(skip)) or ".active_units_T" in f".{k}")
        self._pending_teacher = None

    def _to_device(self, device) -> None:
        for name in ("teacher", "prev_generator", "generator"):
            if getattr(self, name) is not None:
                getattr(self, name).to(device)
        opt = getattr(self.generator, "optimizer", None)
        for st in (opt.state.values() if opt is not None else ()):
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = v.to(device)

    # ---------------------------------------------------------------- hooks
    def before_train_dataset_adaptation(self, strategy, **kwargs):
        self._ensure_teacher(strategy.model)

    def before_training_exp(self, strategy, **kwargs):
        require_stream_batches(strategy, self)
        self._ensure_teacher(strategy.model)
        self.layout = head_layout(strategy.model, type(self).__name__)
        self.current_classes = sorted(int(c) for c in
                                      strategy.experience.classes_in_this_experience)
        self._to_device(strategy.device)

    def before_training_iteration(self, strategy, **kwargs):
        self._incoming = stream_minibatch(self, strategy.mbatch)
        self._x_gen, self._teacher_out, self._n_rep = None, None, 0
        if self.generator is None:
            self.generator = self._build_vae(self._incoming[0].shape[1:]).to(strategy.device)

    def before_forward(self, strategy, **kwargs):
        if self.prev_generator is None:
            return  # first experience: nothing to replay
        x, _, t = self._incoming
        self._start = strategy.mbatch[0].shape[0]
        if self._start != x.shape[0]:
            raise ValueError(f"{type(self).__name__} must be the only plugin that appends rows "
                             f"to the minibatch; {self._start - x.shape[0]} rows were appended "
                             "before it")
        m = self.replay_mb_size or strategy.train_mb_size
        x_gen = self.prev_generator.sample(m, self.rng).to(device=x.device, dtype=x.dtype)
        (x_mine,) = rank_share(x_gen)  # torch.distributed: this rank's share of the same draw
        k = x_mine.shape[0]
        if self.layout == "single":  # one head: the task label does not choose the outputs
            x_rep, t_rep = x_mine, t[:1].expand(k)
        else:  # per-task heads: the same inputs once per past task, each on its own head
            x_rep = x_mine.repeat(len(self.old_tasks), *[1] * (x_mine.dim() - 1))
            t_rep = torch.as_tensor(self.old_tasks, device=t.device,
                                    dtype=t.dtype).repeat_interleave(k)
        with torch.no_grad():
            q = avalanche_forward(self.teacher, x_rep, t_rep)
        append_rows(strategy.mbatch, x_rep, self.label(q).to(t.device), t_rep)
        self._x_gen, self._teacher_out, self._n_rep = x_gen, q, x_rep.shape[0]

    def before_backward(self, strategy, **kwargs):
        if self._n_rep == 0:
            return
        n, r = self._start, self._n_rep
        out, y = strategy.mb_output, strategy.mb_y
        crit = strategy._criterion  # private: Avalanche 0.6 has no public handle on the loss fn
        rep = self.replay_loss(out[n:n + r], self._teacher_out, y[n:n + r])
        if self.loss_weighting == "vandeven":
            w_cur, w_rep = vandeven_weights(self.n_experiences + 1)
        else:
            w_cur, w_rep = n / (n + r), r / (n + r)
        # strategy.loss holds crit(out, y) plus other plugins' terms: swap the criterion's share
        # (generative_replay's Eq. W, negative_replay's Eq. B)
        strategy.loss += w_cur * crit(out[:n], y[:n]) + w_rep * rep - crit(out, y)

    def after_training_iteration(self, strategy, **kwargs):
        w_cur = vandeven_weights(self.n_experiences + 1)[0]
        # torch.distributed: every rank trains the generator on the whole minibatch (gathered)
        # and the whole generated draw, so every rank keeps the one-process generator
        (x,) = gather_stream(strategy, self._incoming[0])
        self.generator.train_step(x, self._x_gen, w_cur, self.rng)
        self._incoming = self._x_gen = self._teacher_out = None

    def after_training_exp(self, strategy, **kwargs):
        exp = strategy.experience
        self.teacher, self._pending_teacher = frozen_copy(strategy.model), None
        self.prev_generator = self._frozen_generator()
        self.old_tasks = sorted(set(self.old_tasks) | {int(k) for k in exp.task_labels})
        self.old_classes = sorted(set(self.old_classes) |
                                  {int(c) for c in exp.classes_in_this_experience})
        self.n_experiences += 1

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        gen = self.generator
        opt = getattr(gen, "optimizer", None)
        prev = self.prev_generator
        return {**settings_of(self, self.SETTINGS), "n_experiences": self.n_experiences,
                "old_tasks": list(self.old_tasks), "old_classes": list(self.old_classes),
                "rng": self.rng.get_state(), "input_shape": self.input_shape,
                "generator": None if gen is None else to_cpu(gen.state_dict()),
                "generator_optimizer": None if opt is None else to_cpu(opt.state_dict()),
                "prev_generator": None if prev is None else to_cpu(prev.state_dict()),
                "teacher": teacher_state(self.teacher, self._pending_teacher)}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, self.SETTINGS)
        self.n_experiences = int(state["n_experiences"])
        self.old_tasks = [int(k) for k in state["old_tasks"]]
        self.old_classes = [int(c) for c in state["old_classes"]]
        self.rng.set_state(state["rng"])
        self.input_shape = state["input_shape"]
        if state["generator"] is not None:
            if self.generator is None:  # the default VAE, rebuilt to hold the saved weights
                self.generator = self._build_vae(self.input_shape, draw_init=False)
            self.generator.load_state_dict(state["generator"])
            if state["generator_optimizer"] is not None and self.generator.optimizer is not None:
                self.generator.optimizer.load_state_dict(state["generator_optimizer"])
        self.prev_generator = None
        if state["prev_generator"] is not None:
            self.prev_generator = self._frozen_generator()
            self.prev_generator.load_state_dict(state["prev_generator"])
        # the teacher is rebuilt from a copy of the model at the next hook
        self.teacher, self._pending_teacher = None, teacher_state(None, state["teacher"])
