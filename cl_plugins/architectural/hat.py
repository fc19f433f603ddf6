"""HAT: Hard Attention to the Task (per-layer task gates on the user's own model).

Name: ``hat``. Scenarios: task-IL only. Paper: J. Serrà, D. Surís, M. Miron and A. Karatzoglou,
"Overcoming catastrophic forgetting with hard attention to the task", ICML 2018
(arXiv:1801.01423); code read for facts: joansj/hat (``src/approaches/hat.py``,
``src/networks/mlp_hat.py``, ``alexnet_hat.py``). Sources, notes, measurements:
docs/methods/hat.md. Gated: every Linear / Conv layer outside ``model.head`` (every hidden
layer, never the output layer, as the paper); layer l has a task embedding e^t_l, one entry per
output unit (channel), kept by the plugin. For task t:

    a^t_l = sigmoid(s e^t_l)                                      # Eq. 1: the gate
    s = 1/s_max + (s_max - 1/s_max) (b - 1)/(B - 1)                # Eq. 3: batch b of B per epoch
    g'_{l,ij} = [1 - min(a^{<t}_{l,i}, a^{<t}_{l-1,j})] g_{l,ij}    # Eq. 2 (bias: 1 - a^{<t}_{l,i})
    q'_l = s_max [cosh(s e_l) + 1] / (s [cosh(e_l) + 1]) q_l        # Eq. 4: embedding gradient
    L = CE + c sum a^t (1 - a^{<t}) / sum (1 - a^{<t})              # Eq. 5: over all gated units
    a^{<t+1} = max(a^{<t}, a^t at s = s_max)                       # after each task; test: s_max

A forward hook scales each gated layer's output by its gate (per channel for a conv); the code
gates after ReLU / dropout / max-pool, which commute with a gate >= 0. Conv in Eq. 2 as the
code's ``alexnet_hat.get_view_for`` (after a flattened conv map, each channel's a^{<t} repeats
over its positions); the first gated layer has the output side only.

Hooks: ``before_train_dataset_adaptation`` (task labels), ``before_training_exp`` (e^t ~ N(0,1),
own optimizer, Eq. 2 factors), ``before/after_forward`` (gates at s), ``before_backward`` (Eq. 5),
``after_backward`` (Eq. 2, 4, clip), ``after_update`` (embedding step, clamp),
``after_training_exp`` (a^{<t+1}), ``before/after_eval_forward`` (gates at s_max).

Hyper-parameters (the code's ``Appr``; the paper's s_max = 400, c = 0.75): ``s_max`` 400, ``c``
0.75, ``clipgrad`` 10000 (all gradients' norm), ``thres_cosh`` 50 (Eq. 4's clamp of s e),
``thres_emb`` 6 (embeddings in +-6), ``seed`` 0 (e^t from a generator seeded with (seed, t)).

Deviations (reasons in docs/methods/hat.md): Eq. 3 as in the paper (the code's i/N never reaches
s_max; one batch per epoch: 1/s_max as the code); the embeddings have the plugin's own optimizer
(``optimizer_like`` the strategy's; the code's plateau lr decay is the runner's business); weight
decay is refused and each later task clears the strategy optimizer's state of the gated layers
(a zero gradient must mean no step; with Adam only fully closed units are safe); normalisation
layers and activations that do not commute with a gate are refused; Eq. 5 is 0 when no unit is
free (the code: 0/0); an untrained task runs ungated. ``cost_per_task``: the embeddings.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from cl_plugins.core.checks import check_int, check_non_negative, check_positive, check_range
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.core.task_labels import require_task_labels
from cl_plugins.core.weight_override import minibatch_task, optimizer_like, tensor_cost, \
    weight_layers

_REFUSED = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Tanh, nn.Sigmoid,
            nn.GELU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish, nn.Softplus, nn.ReLU6, nn.Hardtanh)


def annealed_s(batch: int, n_batches: int, s_max: float) -> float:
    """Eq. 3: s for ``batch`` (0-based) of the ``n_batches`` of an epoch."""
    frac = batch / (n_batches - 1) if n_batches > 1 else 0.0
    return 1.0 / s_max + (s_max - 1.0 / s_max) * frac


def attention_regulariser(gates: List[Tensor], previous: List[Tensor]) -> Tensor:
    """Eq. 5: sum a^t (1 - a^{<t}) / sum (1 - a^{<t}) over every gated unit (0 if none is free)."""
    num = sum((a * (1 - p)).sum() for a, p in zip(gates, previous))
    den = sum((1 - p).sum() for p in previous)
    return num / den if den > 0 else num * 0.0


def embedding_grad_scale(e: Tensor, s: float, s_max: float, thres_cosh: float) -> Tensor:
    """Eq. 4's factor, with the code's clamp of s e at +-thres_cosh (cosh overflows)."""
    num = torch.cosh(torch.clamp(s * e, -thres_cosh, thres_cosh)) + 1
    return s_max / s * num / (torch.cosh(e) + 1)


def input_view(prev: Tensor, weight: Tensor, name: str) -> Tensor:
    """The previous gated layer's per-unit values laid along ``weight``'s input dimension."""
    n_in, n_prev = weight.shape[1], prev.numel()
    if n_in % n_prev:
        raise ValueError(f"HAT: {name!r} has {n_in} inputs for {n_prev} gated units (not a chain)")
    return prev.repeat_interleave(n_in // n_prev).reshape(1, -1, *[1] * (weight.dim() - 2))


def compensation(layers: Dict[str, nn.Module], cumulative: List[Tensor]) -> Dict[str, Tensor]:
    """Eq. 2's factors ``{parameter: 1 - min(a_post, a_pre)}`` (broadcastable) from a^{<t}."""
    out, prev = {}, None
    for (name, m), a in zip(layers.items(), cumulative):
        post = a.reshape(-1, *[1] * (m.weight.dim() - 1))
        both = post if prev is None else torch.minimum(post, input_view(prev, m.weight, name))
        out[name + ".weight"] = 1 - both
        if isinstance(getattr(m, "bias", None), Tensor):
            out[name + ".bias"] = 1 - a
        prev = a
    return out


class HATPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "hat"
    SCENARIOS = ("task",)
    NEEDS_TASK_LABELS = True
    SWEEP: dict = {"c": {"values": [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 4.0]},
                   "s_max": {"values": [25.0, 50.0, 100.0, 200.0, 400.0, 800.0]}}
    PAPER = ("Overcoming catastrophic forgetting with hard attention to the task (Serra et al., "
             "ICML 2018)")
    SUMMARY = ("learned per-task sigmoid gates on every hidden unit; the gradients of units used "
               "by earlier tasks are masked; an attention-sparsity regulariser")
    SETTINGS = ("s_max", "c", "clipgrad", "thres_cosh", "thres_emb", "seed")

    def __init__(self, s_max: float = 400.0, c: float = 0.75, clipgrad: float = 10000.0,
                 thres_cosh: float = 50.0, thres_emb: float = 6.0, seed: int = 0):
        super().__init__()
        self.s_max = check_range("s_max", s_max, 1.0, None, low_inclusive=False)
        self.c = check_non_negative("c", c)
        self.clipgrad, self.thres_cosh, self.thres_emb = (check_positive(n, v) for n, v in (
            ("clipgrad", clipgrad), ("thres_cosh", thres_cosh), ("thres_emb", thres_emb)))
        self.seed = check_int("seed", seed, 0)
        self.embeddings: Dict[int, List[Tensor]] = {}  # task -> e^t_l, one per gated layer
        self.cumulative: Optional[List[Tensor]] = None  # a^{<t}
        self.trained_tasks: List[int] = []
        self.task: Optional[int] = None  # the task being trained, its optimizer
        self.own_optimizer, self._saved_optimizer = None, None
        self._layers: Dict[str, nn.Module] = {}
        self._model, self._handles, self._s, self._keep = None, [], 1.0, []
        self._gates = self._train_gates = None  # the hooks apply _gates while not None

    def bind(self, model: nn.Module) -> Dict[str, nn.Module]:
        """Forward hooks on ``model``'s gated layers (again if the model object changed)."""
        if model is self._model:
            return self._layers
        bad = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
               if isinstance(m, _REFUSED)]
        if bad:
            raise ValueError(f"HAT gates each layer's output units; this model has {bad}, which "
                             "would undo a gate: use ReLU and no normalisation layer")
        layers = weight_layers(model)
        compensation(layers, [torch.zeros(m.weight.shape[0]) for m in layers.values()])  # chain?
        for h in self._handles:
            h.remove()
        self._handles = [m.register_forward_hook(self._hook(i))
                         for i, m in enumerate(layers.values())]
        self._layers, self._model = layers, model
        return layers

    def _hook(self, i: int):
        def gate(module, inputs, output):  # Eq. 1 applied to the layer's output units
            a = None if self._gates is None else self._gates[i]
            return None if a is None else output * a.reshape(1, -1, *[1] * (output.dim() - 2))
        return gate

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        require_task_labels(type(self).__name__, strategy.experience, self.trained_tasks)

    def before_training_exp(self, strategy, **kwargs):
        layers, dev = self.bind(strategy.model), strategy.device
        decay = sorted({g.get("weight_decay", 0) for g in strategy.optimizer.param_groups} - {0})
        if decay:
            raise ValueError(f"HAT masks the gradients of units used by earlier tasks; weight "
                             f"decay ({decay}) would still move them. Set weight_decay to 0")
        self.task = task = sorted({int(t) for t in strategy.experience.task_labels})[0]
        fresh = task not in self.embeddings
        if fresh:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + task)
            self.embeddings[task] = [torch.randn(m.weight.shape[0], generator=g).to(m.weight)
                                     for m in layers.values()]
        self.embeddings[task] = [e.detach().to(dev).clone().requires_grad_(True)
                                 for e in self.embeddings[task]]
        self.own_optimizer = optimizer_like(strategy.optimizer, self.embeddings[task])
        saved, self._saved_optimizer = self._saved_optimizer, None
        if saved is not None and saved["task"] == task:  # resumed in the middle of this task
            self.own_optimizer.load_state_dict(saved["state"])
        self._keep = []
        if self.cumulative is not None:
            self.cumulative = [a.to(dev) for a in self.cumulative]
            params = dict(strategy.model.named_parameters())
            self._keep = [(params[n], k) for n, k in compensation(layers, self.cumulative).items()]
            for p, _ in self._keep if fresh else []:
                strategy.optimizer.state.pop(p, None)  # no momentum from before the masks

    def before_forward(self, strategy, **kwargs):
        minibatch_task(strategy, type(self).__name__)  # one task label: the trained one
        self._s = annealed_s(strategy.clock.train_epoch_iterations, len(strategy.dataloader),
                             self.s_max)  # Eq. 3
        self._gates = self._train_gates = [torch.sigmoid(self._s * e)  # Eq. 1
                                           for e in self.embeddings[self.task]]

    def after_forward(self, strategy, **kwargs):
        self._gates = None

    def before_backward(self, strategy, **kwargs):
        gates = self._train_gates
        prev = self.cumulative or [torch.zeros_like(a) for a in gates]
        strategy.loss = strategy.loss + self.c * attention_regulariser(gates, prev)  # Eq. 5

    def after_backward(self, strategy, **kwargs):
        for p, keep in self._keep:  # Eq. 2
            if p.grad is not None:
                p.grad.mul_(keep)
        emb = self.embeddings[self.task]
        for e in (e for e in emb if e.grad is not None):  # Eq. 4
            e.grad.mul_(embedding_grad_scale(e.detach(), self._s, self.s_max, self.thres_cosh))
        torch.nn.utils.clip_grad_norm_(list(strategy.model.parameters()) + emb, self.clipgrad)
        self._train_gates = None

    def after_update(self, strategy, **kwargs):
        self.own_optimizer.step()
        self.own_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e in self.embeddings[self.task]:
                e.clamp_(-self.thres_emb, self.thres_emb)

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        t = self.task
        self.embeddings[t] = [e.detach().clone() for e in self.embeddings[t]]
        gates = [torch.sigmoid(self.s_max * e) for e in self.embeddings[t]]
        self.cumulative = gates if self.cumulative is None else \
            [torch.maximum(p, a) for p, a in zip(self.cumulative, gates)]
        self.trained_tasks.append(t)
        self.task, self.own_optimizer, self._keep = None, None, []

    def before_eval_forward(self, strategy, **kwargs):
        self.bind(strategy.model)
        emb = self.embeddings.get(minibatch_task(strategy, type(self).__name__))
        self._gates = None if emb is None else [  # test time: s = s_max
            torch.sigmoid(self.s_max * e.detach().to(strategy.device)) for e in emb]

    after_eval_forward = after_forward

    def cost_per_task(self) -> Dict[int, Dict[str, int]]:
        """``{task: {"params", "bytes"}}``: the task's embeddings (float32: 4 bytes a unit)."""
        return {t: tensor_cost(self.embeddings[t]) for t in sorted(self.trained_tasks)}

    def state_dict(self) -> dict:
        cpu = (lambda ts: None if ts is None else [t.detach().cpu() if t.requires_grad
                                                   else t.cpu() for t in ts])
        opt = {"task": self.task, "state": self.own_optimizer.state_dict()} \
            if self.own_optimizer is not None else self._saved_optimizer
        return {**settings_of(self, self.SETTINGS), "trained_tasks": list(self.trained_tasks),
                "embeddings": {t: cpu(es) for t, es in self.embeddings.items()},
                "cumulative": cpu(self.cumulative), "task": self.task, "own_optimizer": opt}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, self.SETTINGS)
        self.embeddings = {int(t): list(es) for t, es in state["embeddings"].items()}
        self.cumulative = None if state["cumulative"] is None else list(state["cumulative"])
        self.trained_tasks = [int(t) for t in state["trained_tasks"]]
        self.task, self._saved_optimizer = state["task"], state["own_optimizer"]
        self.own_optimizer, self._keep, self._gates, self._train_gates = None, [], None, None
