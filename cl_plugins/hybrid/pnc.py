"""Progress & Compress: an active column learns each task, then is distilled into a knowledge base.

Name: ``pnc``. Scenarios: task-, domain- and class-IL. Task labels: not needed.

Paper: J. Schwarz, J. Luketina, W. M. Czarnecki, A. Grabska-Barwinska, Y. W. Teh, R. Pascanu,
R. Hadsell, "Progress & Compress: A scalable framework for continual learning", ICML 2018
(arXiv 1805.06370). No official code. Facts checked and their sources (the abstract; the
re-implementation AGI-Labs/continual_rl for the adapter form, the KL's direction and the reset:
the paper's body was not reachable), the decisions and measurements: docs/methods/pnc.md.

Two columns of the user's architecture: the knowledge base (KB) and the active column (AC), which
receives the KB's activations through layerwise adapters (``core.lateral``, Eq. 1):

    h_i = s(W_i h_{i-1} + b_i + alpha_i * U_i s(V_i hKB_{i-1} + c_i))          # Eq. 1

Progress (each task, the strategy's own loop): the AC and its adapters train on the task's loss
(the strategy's criterion), the KB frozen. Compress (after the task): the KB is distilled from
the AC on the task's data, protected by online EWC (``ewc_lambda`` = lambda, F* the running
Fisher, theta*_KB the KB after the previous compress):

    L_compress = E_x[ KL(p_AC(.|x) || p_KB(.|x)) ]
                 + (lambda / 2) sum_i F*_i (theta_KB,i - theta*_KB,i)^2
    F*_k = gamma F*_{k-1} + F_k      (F_k: diagonal Fisher of the KB after compressing task k)

The penalty is an ``OnlineEWCPlugin``'s (attribute ``ewc``: its Fisher estimate, its
``QuadraticPenalty`` in online mode), applied to the KB's shared parameters; the paper writes
gamma F*_{k-1} in the penalty, here F*_{k-1} (a constant factor, as online_ewc.py explains).

Model: the first ``before_train_dataset_adaptation`` wraps ``strategy.model`` (the KB, the user's
own ``ClassifierNet`` object, kept) in a ``core.lateral.TwoColumnNet``, which stays
``strategy.model`` from then on (as the ensemble's wrapper does; the runner then writes no
checkpoint, and this plugin's state holds the whole wrapper). Unsupported models (anything but an
MLP ``ClassifierNet`` with a linear, masked or multi-head head) raise a ValueError there, before
any training. Its forward is the AC's during the progress phase and the KB's otherwise:
**evaluation always uses the KB**, the column that keeps every task (the AC is a scratch column
for the current task; the paper's evaluation protocol could not be checked), ``before_eval``
switching to it even for an evaluation inside the progress phase.

Hooks: ``before_train_dataset_adaptation`` (wrap, check, restore a loaded state);
``before_training_exp`` (AC and adapters re-initialised from the plugin's generator, their
optimizer state dropped; KB frozen; forward = AC); ``after_training_exp`` (compress, then the
KB's Fisher; forward = KB); ``before_eval`` / ``after_eval`` (KB forward, then back).

Compress loop (decision): Avalanche's template has one training loop, which the progress phase
uses; the compress phase runs inside ``after_training_exp`` with its own optimizer over the KB's
parameters (the strategy optimizer's class and settings, ``compress_lr`` overriding the learning
rate), ``compress_epochs`` passes (None: the strategy's ``train_epochs``) over the experience's
training data (``strategy.adapted_dataset``, train transforms) in minibatches of
``train_mb_size``, shuffled by the plugin's generator; a non-finite loss raises DivergenceError.
The teacher is a frozen copy of the two columns taken when progress ends (so the AC's targets do
not move while the KB they read changes).

Hyper-parameters: ``ewc_lambda`` (>= 0, default 800), ``gamma`` ([0, 1], default 1.0),
``fisher`` (default "predicted"), ``fisher_samples`` (None = all), ``fisher_batch_size`` (128):
online_ewc's defaults, so that ``pnc`` and ``online_ewc`` run with the same penalty (the paper's
values, not checked, are for Omniglot and RL); ``compress_epochs`` (None), ``compress_lr``
(None); ``reset_active`` (default True: a fresh AC and fresh adapters for every task, as the
re-implementation resets the AC at each task; False keeps them, trained on); ``adapter_width`` (None: each V_i keeps the width
of its input; an int: V_i projects to that width); ``seed`` (>= 0, default 0: the generator of
the re-initialisation and compress shuffling; the Fisher subset has the EWC part's own).

Deviations: the KB is distilled for a fixed number of passes, not for a number of environment
steps; the Fisher follows EWCPlugin's estimate (per-sample gradients, float64); the KL has no
temperature; alpha_o of the output adapter is one scalar (heads of several widths); the first
layer has no adapter (both columns see the same input).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

from cl_plugins.core.checks import check_bool, check_int, check_positive
from cl_plugins.core.distill import kd_loss
from cl_plugins.core.divergence import DivergenceError
from cl_plugins.core.lateral import TwoColumnNet, reinit_
from cl_plugins.core.params import shared_parameters, snapshot
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.snapshot import frozen_copy
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

SETTINGS = ("ewc_lambda", "gamma", "fisher", "fisher_samples", "fisher_batch_size",
            "compress_epochs", "compress_lr", "reset_active", "adapter_width", "seed")


def distill_kl(kb_logits: torch.Tensor, ac_logits: torch.Tensor) -> torch.Tensor:
    """E_x KL(p_AC || p_KB), the mean over the batch (L_compress's first term)."""
    return kd_loss(kb_logits, ac_logits, temperature=1.0, scale_t2=False)


class ProgressCompressPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "pnc"
    REPLACES_MODEL = True  # strategy.model becomes the two-column wrapper: no runner checkpoint
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"ewc_lambda": {"distribution": "log_uniform_values", "min": 1.0, "max": 1e6},
                   "gamma": {"distribution": "uniform", "min": 0.5, "max": 1.0}}
    PAPER = "Progress & Compress (Schwarz et al., ICML 2018)"
    SUMMARY = ("active column with lateral adapters from a knowledge base; after each task the "
               "column is distilled (KL) into the KB under an online-EWC penalty")

    def __init__(self, ewc_lambda: float = 800.0, gamma: float = 1.0, fisher: str = "predicted",
                 fisher_samples: Optional[int] = None, fisher_batch_size: int = 128,
                 compress_epochs: Optional[int] = None, compress_lr: Optional[float] = None,
                 reset_active: bool = True, adapter_width: Optional[int] = None, seed: int = 0):
        super().__init__()
        self.ewc = OnlineEWCPlugin(ewc_lambda, gamma, fisher, fisher_samples, fisher_batch_size,
                                   seed)
        self.ewc_lambda, self.gamma, self.fisher = self.ewc.ewc_lambda, self.ewc.gamma, fisher
        self.fisher_samples, self.fisher_batch_size = fisher_samples, fisher_batch_size
        self.compress_epochs = None if compress_epochs is None else \
            check_int("compress_epochs", compress_epochs, 1)
        self.compress_lr = None if compress_lr is None else \
            float(check_positive("compress_lr", compress_lr))
        self.reset_active = check_bool("reset_active", reset_active)
        self.adapter_width = None if adapter_width is None else \
            check_int("adapter_width", adapter_width, 1)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(seed)
        self.net: Optional[TwoColumnNet] = None
        self.n_tasks = 0  # tasks compressed into the KB
        self._pending = None  # a loaded wrapper state, applied when the model is wrapped
        self._eval_column = None

    # ------------------------------------------------------------------------------ the model
    def before_train_dataset_adaptation(self, strategy, **kwargs):
        if self.net is None or strategy.model is not self.net:
            if isinstance(strategy.model, TwoColumnNet):
                raise ValueError(f"{type(self).__name__}: strategy.model is already another "
                                 "plugin's TwoColumnNet")
            self.net = TwoColumnNet(strategy.model, self.adapter_width).to(strategy.device)
            if self._pending is not None:
                self.net.load_state_dict(self._pending)
                self._pending = None
            strategy.model = self.net

    def before_training_exp(self, strategy, **kwargs):
        net = self.net
        if self.reset_active or self.n_tasks == 0:
            state = strategy.optimizer.state
            for module in net.active_modules():
                reinit_(module, self.generator)
                for p in module.parameters():
                    state.pop(p, None)  # a fresh column starts without momentum
        for p in net.kb.parameters():
            p.requires_grad_(False)  # progress: the KB is frozen
        for module in net.active_modules():
            for p in module.parameters():
                p.requires_grad_(True)
        net.column = "ac"
        self.ewc.quadratic_penalty.to(strategy.device)

    def after_training_exp(self, strategy, **kwargs):
        teacher = frozen_copy(self.net)  # the two columns as progress left them (column "ac")
        self.net.column = "kb"
        self.compress(strategy, teacher)
        kb = self.net.kb
        fisher = self.ewc.estimate_fisher(kb, strategy.experience.dataset)
        params = shared_parameters(kb)
        self.ewc.quadratic_penalty.add({n: f.to(params[n].dtype) for n, f in fisher.items()},
                                       snapshot(params))
        self.n_tasks += 1

    def before_eval(self, strategy, **kwargs):
        if self.net is not None:
            self._eval_column, self.net.column = self.net.column, "kb"

    def after_eval(self, strategy, **kwargs):
        if self.net is not None and self._eval_column is not None:
            self.net.column, self._eval_column = self._eval_column, None

    # ------------------------------------------------------------------------------ compress
    def compress_loss(self, teacher, kb, x, t, params=None):
        """(total, KL term, EWC term) of L_compress on one minibatch; ``params``: the KB's shared
        parameters (looked up when None)."""
        with torch.no_grad():
            target = teacher(x, t)
        kl = distill_kl(kb(x, t), target)  # L_compress: KL term
        if not len(self.ewc.quadratic_penalty):
            return kl, kl, torch.zeros_like(kl)
        ewc = self.ewc.penalty(shared_parameters(kb) if params is None else params)  # online EWC
        return kl + ewc, kl, ewc

    def compress(self, strategy, teacher) -> None:
        """L_compress minimised over the KB's parameters on the experience's data (docstring)."""
        kb = self.net.kb
        for p in kb.parameters():
            p.requires_grad_(True)
        kb.train()
        params = shared_parameters(kb)
        settings = dict(strategy.optimizer.defaults)
        if self.compress_lr is not None:
            settings["lr"] = self.compress_lr
        optimizer = type(strategy.optimizer)(kb.parameters(), **settings)
        dataset = strategy.adapted_dataset
        loader = DataLoader(dataset, batch_size=strategy.train_mb_size, shuffle=True,
                            generator=self.generator,
                            collate_fn=getattr(dataset, "collate_fn", None))
        for _ in range(self.compress_epochs or strategy.train_epochs):
            for batch in loader:
                x, t = batch[0].to(strategy.device), batch[-1].to(strategy.device)
                optimizer.zero_grad(set_to_none=True)
                loss, _, _ = self.compress_loss(teacher, kb, x, t, params)
                if not math.isfinite(loss.item()):
                    raise DivergenceError(f"{type(self).__name__}: non-finite compress loss "
                                          f"({loss.item()}) after task {self.n_tasks}; lower "
                                          "compress_lr or ewc_lambda")
                loss.backward()
                optimizer.step()

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        net = None if self.net is None else \
            {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {**settings_of(self, SETTINGS), "n_tasks": self.n_tasks,
                "generator": self.generator.get_state(), "ewc": self.ewc.state_dict(),
                "net": net if net is not None else self._pending}

    def load_state_dict(self, state: dict) -> None:
        """A fresh model must have the heads of the tasks seen (adapt it to those experiences,
        as the runner's restore does) before the first training experience loads ``net``."""
        check_settings(self, state, SETTINGS)
        self.ewc.load_state_dict(state["ewc"])
        self.generator.set_state(state["generator"])
        self.n_tasks = int(state["n_tasks"])
        if self.net is not None and state["net"] is not None:
            self.net.load_state_dict(state["net"])
        else:
            self._pending = state["net"]
