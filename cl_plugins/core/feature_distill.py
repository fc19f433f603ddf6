"""The mechanics every feature-distillation plugin shares: teacher, layer taps, rows, state.

A distillation plugin (``cl_plugins/distillation/``) subclasses ``FeatureDistillPlugin`` and
writes only its loss, ``distill_loss(student, teacher, y, t)``, from the features of named layers
(``layers``) of the student (the model being trained) and of the teacher (a frozen, hook-free
copy of the model that ended the previous experience, ``core.snapshot.frozen_copy``). This
module does the rest:

- **taps**: forward hooks on the named modules (``LayerTaps``) keep their outputs of the
  strategy's own training forward pass (armed in ``before_forward``, disarmed in
  ``after_forward``), so the student's features cost nothing extra; the teacher runs once per
  step, under ``no_grad``, on the selected rows only. A name that is not a module of the model
  raises ``ValueError`` listing the names there are; a module whose output is not a tensor too.
  ``teacher_layers`` (default: the same names) taps other modules of the teacher, pairwise
  (FitNets' guided and hint layers); the teacher's features come keyed by those names.
- **rows** (``inputs``): ``"current"``: the incoming minibatch (rows 0..n-1, recorded in
  ``before_training_iteration`` before any plugin extends it); ``"replay"``: the rows a replay
  plugin appended (ER: ``cl_plugins.replay.er``, which concatenates memory samples to the
  minibatch in ``before_forward``); ``"both"``: every row. ``"replay"``/``"both"`` without such
  a plugin raises at ``before_training_exp``.
- **term**: ``strategy.loss += weight * distill_loss(...)`` in ``before_backward``, from the
  second experience on (no teacher before); added, never replacing the loss. The student's
  features of every step, the first experience's too, go through ``check_features`` first.
- **state**: the settings (``SETTINGS``, checked on load), the experience count, the teacher's
  weights (rebuilt from a copy of the model at the next hook), and ``extra_state()`` of a
  subclass (regressors, RNG).

Trainable additions of a subclass (FitNets' regressor) join the strategy's optimizer as a
parameter group (``add_param_group``), since Avalanche builds it from the model's parameters.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn

from cl_plugins.core.checks import check_choice, check_non_negative
from cl_plugins.core.distill import restore_teacher, teacher_state
from cl_plugins.core.params import task_specific_prefixes
from cl_plugins.core.snapshot import frozen_copy
from cl_plugins.core.state import check_owner, check_settings, owned_by

INPUTS = ("current", "replay", "both")
# Plugins that append replayed rows to the training minibatch (``core.replay_loader.append_rows``)
ROW_APPENDERS = ("ERPlugin", "MIRPlugin")


def check_layers(layers, name: str = "layers") -> Tuple[str, ...]:
    """``layers``: a module name or a non-empty list of them (``model.named_modules()`` names,
    e.g. ``"backbone"`` for a ClassifierNet's features); returned as a tuple."""
    names = (layers,) if isinstance(layers, str) else tuple(layers or ())
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{name} must be a module name or a non-empty list of module names "
                         f"(as in model.named_modules(), e.g. 'backbone'); got {layers!r}")
    return names


class TapsComplete(Exception):
    """Raised by a ``stop_early`` tap once every tapped layer has run: the teacher's forward
    stops there (its head is not needed, and may lack the current task's)."""


class TapHook:
    """One forward hook of ``LayerTaps``; a pickled or deep-copied hook is inert (the model may
    be copied or saved while it is registered)."""

    def __init__(self, taps: Optional["LayerTaps"], name: str):
        self.taps, self.name = taps, name

    def __call__(self, module, inputs, output):
        if self.taps is not None and self.taps.armed:
            if not isinstance(output, Tensor):
                raise ValueError(f"{self.taps.who}: layer {self.name!r} "
                                 f"({type(module).__name__}) returns a {type(output).__name__}, "
                                 "not a tensor; tap a module that outputs features")
            self.taps.outputs[self.name] = output
            if self.taps.stop_early and len(self.taps.outputs) == self.taps.n_names:
                raise TapsComplete()

    def __reduce__(self):
        return (TapHook, (None, self.name))

    def __deepcopy__(self, memo):
        return TapHook(None, self.name)


def named_modules(model: nn.Module, names: Sequence[str], who: str) -> Dict[str, nn.Module]:
    """``model``'s modules by name; ``ValueError`` naming ``who`` and listing the modules there
    are when one of ``names`` is not among them."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        known = [n for n in modules if n][:30]
        raise ValueError(f"{who}: the model has no module named {missing}; its modules are "
                         f"{known}{' ...' if len(modules) > 31 else ''}")
    return modules


class LayerTaps:
    """Forward hooks on named modules of ``model``; while ``armed``, ``outputs[name]`` keeps the
    module's last output. ``stop_early``: end the forward pass once all of them have run."""

    def __init__(self, model: nn.Module, names: Sequence[str], who: str,
                 stop_early: bool = False):
        modules = named_modules(model, names, who)
        self.who, self.armed, self.stop_early = who, False, stop_early
        self.n_names = len(set(names))
        self.outputs: Dict[str, Tensor] = {}
        self.handles = [modules[n].register_forward_hook(TapHook(self, n)) for n in names]

    def take(self) -> Dict[str, Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.outputs, self.armed = [], {}, False


def add_param_group(strategy, params: Iterable[nn.Parameter]) -> None:
    """Add ``params`` to ``strategy.optimizer`` as one group (skipping those it already holds)."""
    held = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    new = [p for p in params if id(p) not in held]
    if new:
        strategy.optimizer.add_param_group({"params": new})


class FeatureDistillPlugin(SupervisedPlugin):
    """Base of the feature-distillation plugins (see the module docstring)."""

    SETTINGS: Tuple[str, ...] = ("weight", "layers", "inputs")

    def __init__(self, weight: float, layers, inputs: str, teacher_layers=None):
        super().__init__()
        self.weight = float(check_non_negative("weight", weight))
        self.layers = check_layers(layers)
        self.teacher_layers = self.layers if teacher_layers is None else \
            check_layers(teacher_layers, "teacher_layers")
        if len(self.teacher_layers) != len(self.layers):
            raise ValueError(f"teacher_layers must name one teacher module per student layer "
                             f"({len(self.layers)}: {list(self.layers)}); got "
                             f"{list(self.teacher_layers)}")
        self.inputs = check_choice("inputs", inputs, INPUTS)
        self.teacher: Optional[nn.Module] = None
        self.n_experiences = 0  # finished experiences
        self._pending_teacher: Optional[Dict[str, Tensor]] = None  # loaded, not rebuilt yet
        self._taps: Optional[LayerTaps] = None
        self._teacher_taps: Optional[LayerTaps] = None
        self._n_stream: Optional[int] = None

    # ------------------------------------------------------------------ for subclasses
    def distill_loss(self, student: Dict[str, Tensor], teacher: Dict[str, Tensor], y: Tensor,
                     t: Tensor) -> Tensor:
        """The distillation term on the selected rows: layer name -> features, labels, tasks."""
        raise NotImplementedError

    def check_features(self, student: Dict[str, Tensor]) -> None:
        """Called on the student's tapped features at every training step, the first experience
        included, before any update (subclasses: raise ``ValueError`` on shapes they cannot
        use, naming the layer and the shape)."""

    def prepare(self, strategy) -> None:
        """Called at ``before_training_exp`` once the teacher exists (subclasses: check the
        model, build regressors)."""

    def extra_state(self) -> Dict:
        return {}

    def load_extra_state(self, state: Dict) -> None:
        pass

    # ------------------------------------------------------------------ mechanics
    @property
    def who(self) -> str:
        return type(self).__name__

    def _ensure_teacher(self, model: nn.Module) -> None:
        if self._pending_teacher is None:
            return
        skip = tuple(task_specific_prefixes(model))  # a head Avalanche added for the new task
        self.teacher = restore_teacher(model, self._pending_teacher, self.who,
                                       may_lack=lambda k: bool(skip and k.startswith(skip)))
        self._pending_teacher = None

    def rows(self, total: int) -> slice:
        """The minibatch rows the term is computed on (see ``inputs``)."""
        n = total if self._n_stream is None else self._n_stream
        return {"current": slice(0, n), "replay": slice(n, total), "both": slice(0, total)}[
            self.inputs]

    def teacher_features(self, x: Tensor, t: Tensor) -> Dict[str, Tensor]:
        """The teacher's tapped features of ``x`` (no gradient)."""
        self._teacher_taps.armed = True
        try:
            with torch.no_grad():
                avalanche_forward(self.teacher, x, t)
        except TapsComplete:
            pass
        finally:
            self._teacher_taps.armed = False
        out = self._teacher_taps.take()
        missing = sorted(set(self.teacher_layers) - set(out))
        if missing:
            raise ValueError(f"{self.who}: teacher layers {missing} did not run in the teacher's "
                             "forward pass; tap modules the model's forward calls")
        return out

    def _remove_taps(self) -> None:
        for taps in (self._taps, self._teacher_taps):
            if taps is not None:
                taps.remove()
        self._taps = self._teacher_taps = None

    def before_training_exp(self, strategy, **kwargs):
        if self.inputs != "current":
            appenders = [p for p in strategy.plugins if type(p).__name__ in ROW_APPENDERS]
            if not appenders:
                raise ValueError(f"{self.who}: inputs={self.inputs!r} distils on replayed rows, "
                                 f"but no plugin appends them to the minibatch (one of "
                                 f"{list(ROW_APPENDERS)}); add one (plus: [er]) or use "
                                 "inputs='current'")
        named_modules(strategy.model, list(dict.fromkeys(self.layers + self.teacher_layers)),
                      self.who)  # unknown names fail at once
        self._ensure_teacher(strategy.model)
        self._remove_taps()
        self._taps = LayerTaps(strategy.model, self.layers, self.who)  # checked from the start
        if self.teacher is None:
            return
        self.teacher.to(strategy.device)
        self._teacher_taps = LayerTaps(self.teacher, self.teacher_layers, self.who, True)
        self.prepare(strategy)

    def before_training_iteration(self, strategy, **kwargs):
        self._n_stream = strategy.mbatch[0].shape[0]

    def before_forward(self, strategy, **kwargs):
        if self._taps is not None:
            self._taps.armed = True

    def after_forward(self, strategy, **kwargs):
        if self._taps is not None:
            self._taps.armed = False

    def before_backward(self, strategy, **kwargs):
        if self._taps is None:
            return
        student = self._taps.take()
        missing = [n for n in self.layers if n not in student]
        if missing:
            raise ValueError(f"{self.who}: layers {missing} did not run in the training forward "
                             "pass; tap modules the model's forward calls")
        self.check_features(student)
        rows = self.rows(strategy.mb_x.shape[0])
        if self.teacher is None or self.weight == 0.0 or rows.stop <= rows.start:
            return
        x, y, t = strategy.mb_x[rows], strategy.mb_y[rows], strategy.mb_task_id[rows]
        student = {k: v[rows] for k, v in student.items()}
        teacher = self.teacher_features(x, t)
        strategy.loss += self.weight * self.distill_loss(student, teacher, y, t)

    def after_training_exp(self, strategy, **kwargs):
        self._remove_taps()  # before the copy (frozen_copy drops hooks anyway)
        self.n_experiences += 1
        self._pending_teacher, self._n_stream = None, None
        self.teacher = frozen_copy(strategy.model)

    def after_training(self, strategy, **kwargs):
        self._remove_taps()

    def state_dict(self) -> Dict:
        return {**owned_by(self), "config": {k: getattr(self, k) for k in self.SETTINGS},
                "n_experiences": self.n_experiences,
                "teacher": teacher_state(self.teacher, self._pending_teacher),
                "extra": self.extra_state()}

    def load_state_dict(self, state: Dict) -> None:
        check_owner(self, state)
        check_settings(self, {**state, **state["config"]}, self.SETTINGS)
        self.n_experiences = int(state["n_experiences"])
        self._remove_taps()
        self.teacher = None  # rebuilt from a copy of the model at the next hook
        self._pending_teacher = teacher_state(None, state["teacher"])
        self.load_extra_state(state.get("extra") or {})

