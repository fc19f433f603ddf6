"""Per-task weights on the user's own model, written in place (the architectural family).

Masking methods (Piggyback, SupSup) and weight-generating ones (task-conditioned hypernetworks)
give each task its own effective weights ``W_eff(t)`` for some layers of an unchanged model. The
model object, its modules and its ``state_dict`` keys stay as the user built them, so the model
composes with other plugins and the runner's checkpoints. The mechanism, per step:

1. ``before_forward`` (``before_eval_forward``): the plugin computes ``W_eff(t)`` for the
   minibatch's task ``t`` from its own parameters, with autograd when training, and copies it into
   the layers' ``weight`` tensors (``LayerWeights.write``, under ``no_grad``), or into any
   parameters chosen by name, biases and a task's head included (``ParamWeights``).
2. The strategy runs its own forward and backward. Each layer's ``weight.grad`` is then exactly
   dL/dW_eff(t): the layer computed with W_eff(t).
3. ``after_backward``: those gradients are sent through W_eff(t)'s graph to the plugin's own
   parameters (``torch.autograd.backward(W_eff, dL/dW_eff)``). The layers' own gradients are
   dropped (``grad = None``), so the strategy's optimizer, weight decay and momentum included,
   leaves the layers alone (PyTorch optimizers skip a parameter whose gradient is None).
4. ``after_update``: the plugin's optimizer steps its parameters, and the layers get their
   reference weights back (``LayerWeights.restore``), so anything else that reads the model
   between steps (an evaluation, a checkpoint, another plugin) sees them.

The plugin's parameters live in the plugin, not in the model, and are trained by an optimizer
the plugin owns (``optimizer_like``: the strategy optimizer's class and settings unless the method
sets its own). Its state goes into the plugin's ``state_dict``, so a resumed run is exact.

Every minibatch must hold one task label (``minibatch_task``): the effective weights are those of
one task. Task-IL streams evaluate one experience, hence one task, per minibatch; a mixed
minibatch (e.g. a replay plugin's) is refused with a clear error rather than computed with the
wrong weights.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_layers(model: nn.Module, include_head: bool = False) -> Dict[str, nn.Module]:
    """``{name: layer}`` for every Linear / Conv layer of ``model`` with a weight, in module
    order. Layers under ``model.head`` are left out unless ``include_head``."""
    head = getattr(model, "head", None)
    skip = set() if include_head or not isinstance(head, nn.Module) else \
        {id(m) for m in head.modules()}
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, WEIGHT_LAYERS) and id(m) not in skip
              and isinstance(getattr(m, "weight", None), Tensor)}
    if not layers:
        where = "" if include_head else " outside model.head"
        raise ValueError(f"the model has no Linear or Conv layer{where} to give per-task weights")
    return layers


def minibatch_task(strategy, who: str) -> int:
    """The one task label of the current minibatch (``strategy.mb_task_id``)."""
    labels = torch.unique(torch.as_tensor(strategy.mb_task_id).reshape(-1))
    if labels.numel() != 1:
        raise ValueError(f"{who} gives each task its own weights, so a minibatch must hold one task "
                         f"label; got task labels {labels.tolist()} in one minibatch (a replay "
                         "plugin mixing tasks cannot be composed with it)")
    return int(labels[0])


def optimizer_like(optimizer: torch.optim.Optimizer, params: Iterable[Tensor],
                   **overrides) -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class with its first group's settings (``overrides``
    replace some), over ``params``."""
    group = optimizer.param_groups[0]
    settings = {k: group[k] for k in optimizer.defaults if k in group}
    settings.update(overrides)
    return type(optimizer)(list(params), **settings)


def tensor_cost(tensors: Iterable[Tensor]) -> Dict[str, int]:
    """``{"params": elements, "bytes": storage}`` of some tensors (a bool mask: 1 byte each)."""
    tensors = list(tensors)
    return {"params": int(sum(t.numel() for t in tensors)),
            "bytes": int(sum(t.numel() * t.element_size() for t in tensors))}


class LayerWeights:
    """The weights of some layers, overridden in place and put back.

    ``save`` keeps a copy of the layers' own weights (once per override), ``write`` copies
    effective weights in, ``restore`` puts the saved ones back. ``base`` is the layers' own
    weights: the saved copy during an override, otherwise detached views of the live ones."""

    def __init__(self, layers: Dict[str, nn.Module]):
        self.layers = dict(layers)
        self.saved: Optional[Dict[str, Tensor]] = None

    def save(self) -> Dict[str, Tensor]:
        if self.saved is None:
            self.saved = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        return self.saved

    def base(self) -> Dict[str, Tensor]:
        if self.saved is not None:
            return self.saved
        return {n: m.weight.detach() for n, m in self.layers.items()}

    @torch.no_grad()
    def write(self, weights: Dict[str, Tensor]) -> None:
        self.save()
        for n, w in weights.items():
            self.layers[n].weight.copy_(w.detach())

    @torch.no_grad()
    def restore(self) -> None:
        if self.saved is not None:
            for n, w in self.saved.items():
                self.layers[n].weight.copy_(w)
            self.saved = None

    def take_grads(self) -> Dict[str, Tensor]:
        """dL/dW_eff of every layer (zeros where no gradient reached it); the layers' ``grad``
        is dropped so the strategy's optimizer does not move them."""
        grads = {}
        for n, m in self.layers.items():
            g = m.weight.grad
            grads[n] = torch.zeros_like(m.weight) if g is None else g
            m.weight.grad = None
        return grads


class ParamWeights:
    """Parameters of ``model`` chosen by name (any parameter: a bias, a task's head), overridden
    in place and put back: the interface of ``LayerWeights``, keyed by parameter name.

    ``names``: the parameters ``save`` copies and ``base`` returns (a masking method's W0); a
    parameter ``write`` overrides is saved first if it is not among them (e.g. the head of the
    minibatch's task, which may not exist when the plugin binds). ``take_grads`` covers every
    saved parameter. Names are looked up on every call, so parameters added to the model later
    (new heads) are found."""

    def __init__(self, model: nn.Module, names: Iterable[str] = ()):
        self.model = model
        self.names = list(names)
        self.saved: Optional[Dict[str, Tensor]] = None

    def save(self) -> Dict[str, Tensor]:
        if self.saved is None:
            self.saved = {n: self.model.get_parameter(n).detach().clone() for n in self.names}
        return self.saved

    def base(self) -> Dict[str, Tensor]:
        if self.saved is not None:
            return self.saved
        return {n: self.model.get_parameter(n).detach() for n in self.names}

    @torch.no_grad()
    def write(self, weights: Dict[str, Tensor]) -> None:
        saved = self.save()
        for n, w in weights.items():
            p = self.model.get_parameter(n)
            if n not in saved:
                saved[n] = p.detach().clone()
            p.copy_(w.detach())

    @torch.no_grad()
    def restore(self) -> None:
        if self.saved is not None:
            for n, w in self.saved.items():
                self.model.get_parameter(n).copy_(w)
            self.saved = None

    def take_grads(self) -> Dict[str, Tensor]:
        """dL/dW_eff of every saved parameter (zeros where none reached it); the parameters'
        ``grad`` is dropped so the strategy's optimizer does not move them."""
        grads = {}
        for n in (self.saved or {}):
            p = self.model.get_parameter(n)
            grads[n] = torch.zeros_like(p) if p.grad is None else p.grad
            p.grad = None
        return grads


class WeightOverridePlugin(SupervisedPlugin):
    """Hook skeleton of the in-place mechanism above. A method implements:

    - ``effective_weights(task, train)``: ``{layer name: W_eff}`` for ``task``; with autograd
      through the method's parameters when ``train`` is True;
    - ``own_parameters(task)``: the parameters the plugin's optimizer trains for ``task``;
    - ``make_optimizer(strategy, params)`` (optional): default ``optimizer_like`` the strategy's;
    - ``targets(model)`` (optional): what is overridden, default the layers' ``weight``
      (``LayerWeights``); ``ParamWeights`` overrides parameters by name (biases, heads).

    ``self.layers`` (what ``targets`` returns) is bound to the strategy's model by every hook;
    ``self.layers.base()`` gives the layers' own weights (W0 of a fixed backbone), also while
    an override is in force. ``INCLUDE_HEAD`` says whether the head's layers get per-task
    weights too. The plugin's ``state_dict`` includes ``override_state()``.
    """

    INCLUDE_HEAD = False

    def __init__(self):
        super().__init__()
        self.layers: Optional[LayerWeights] = None
        self.own_optimizer: Optional[torch.optim.Optimizer] = None
        self._saved_optimizer: Optional[dict] = None  # loaded before the optimizer exists
        self._graph: Optional[List[Tensor]] = None
        self._names: List[str] = []
        self._task: Optional[int] = None
        self._model: Optional[nn.Module] = None

    # ---------------------------------------------------------------- to implement
    def effective_weights(self, task: int, train: bool) -> Dict[str, Tensor]:
        raise NotImplementedError

    def own_parameters(self, task: int) -> List[Tensor]:
        raise NotImplementedError

    def make_optimizer(self, strategy, params: List[Tensor]) -> torch.optim.Optimizer:
        return optimizer_like(strategy.optimizer, params)

    # ---------------------------------------------------------------- helpers
    def targets(self, model: nn.Module):
        """What the plugin overrides in ``model``: by default the ``weight`` of its Linear / Conv
        layers (``LayerWeights``, keys = layer names); a method may return a ``ParamWeights``
        instead (keys = parameter names: biases, any parameter)."""
        return LayerWeights(weight_layers(model, self.INCLUDE_HEAD))

    def bind(self, model: nn.Module):
        """Bind ``self.layers`` to ``model`` (again if the strategy's model changed)."""
        if self.layers is None or model is not self._model:
            self.layers = self.targets(model)
            self._model = model
        return self.layers

    def begin_task(self, strategy, task: int) -> None:
        """Called in ``before_training_exp`` once the layers are bound (create the task's
        parameters here). The default does nothing."""

    # ---------------------------------------------------------------- hooks
    def before_training_exp(self, strategy, **kwargs):
        self.bind(strategy.model)
        labels = sorted({int(t) for t in strategy.experience.task_labels})
        self._task = labels[0]
        self.begin_task(strategy, self._task)
        params = self.own_parameters(self._task)
        self.own_optimizer = self.make_optimizer(strategy, params) if params else None
        saved, self._saved_optimizer = self._saved_optimizer, None
        if self.own_optimizer is not None and saved is not None \
                and saved["task"] == self._task:  # resumed in the middle of this task
            self.own_optimizer.load_state_dict(saved["state"])

    def before_forward(self, strategy, **kwargs):
        task = minibatch_task(strategy, type(self).__name__)
        self.bind(strategy.model).save()  # base() is then a copy, not the live weights
        weights = self.effective_weights(task, train=True)
        self._names = list(weights)
        self._graph = [weights[n] for n in self._names]
        self.layers.write(weights)

    def after_backward(self, strategy, **kwargs):
        grads = self.layers.take_grads()
        if self._graph is not None:
            pairs = [(w, grads[n]) for n, w in zip(self._names, self._graph) if w.requires_grad]
            if pairs:
                torch.autograd.backward([w for w, _ in pairs], [g for _, g in pairs])
        self._graph = None

    def after_update(self, strategy, **kwargs):
        if self.own_optimizer is not None:
            self.own_optimizer.step()
            self.own_optimizer.zero_grad(set_to_none=True)
        self.layers.restore()

    @torch.no_grad()
    def before_eval_forward(self, strategy, **kwargs):
        self.bind(strategy.model).save()
        task = minibatch_task(strategy, type(self).__name__)
        self.layers.write(self.effective_weights(task, train=False))

    def after_eval_forward(self, strategy, **kwargs):
        self.layers.restore()

    # ---------------------------------------------------------------- state
    def override_state(self) -> dict:
        """The skeleton's part of the plugin's ``state_dict``: the own optimizer's state and its
        task (the layers' weights are the model's own, restored after every step). The optimizer
        lives for one task: a state loaded before another task's experience is not used."""
        opt = {"task": self._task, "state": self.own_optimizer.state_dict()} \
            if self.own_optimizer is not None else self._saved_optimizer
        return {"own_optimizer": opt}

    def load_override_state(self, state: dict) -> None:
        """Restore the skeleton's part; the optimizer state is loaded into the optimizer that
        the next ``before_training_exp`` makes."""
        self.layers, self._model, self.own_optimizer, self._graph = None, None, None, None
        self._saved_optimizer = state["own_optimizer"]
