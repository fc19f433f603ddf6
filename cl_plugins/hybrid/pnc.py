"""Progress & Compress: an active column learns each task, then is distilled into a knowledge base.

Name: ``pnc``. Scenarios: task-, domain- and class-IL. Task labels: not needed.

Paper: J. Schwarz, J. Luketina, W. M. Czarnecki, A. Grabska-Barwinska, Y. W. Teh, R. Pascanu,
R. Hadsell, "Progress & Compress: A scalable framework for continual learning", ICML 2018
(arXiv 1805.06370, v2 with appendices). No official code. Notes: docs/methods/pnc.md.

Two columns of the user's architecture: the knowledge base (KB) and the active column (AC), which
reads the KB's activations through layerwise adapters (``core.lateral``; Sec. 2.1, Eq. 1):

    h_i = s(W_i h_{i-1} + b_i + alpha_i * U_i s(V_i hKB_{i-1} + c_i))          # Eq. 1

Progress (Sec. 2.1; the strategy's own loop): the AC and adapters learn the task's loss without
penalty, the KB frozen. Compress (Sec. 2.2; after the task): the KB alone is distilled from the
fixed AC on the task's data, under online EWC (Sec. 4, Eq. 8-9; ``ewc``, an OnlineEWCPlugin):

    L_compress = E_x KL(p_AC(.|x) || p_KB(.|x)) + lambda/2 ||theta_KB - theta*_KB||^2_F*  # Eq. 2
    F*_k = gamma F*_{k-1} + F_k / norm(F_k)      (F_k: diagonal Fisher of the KB after compress k)

with p = softmax(logits / T) for both columns and no T^2 factor (Eq. 2 has none). The paper puts
gamma F*_{k-1} in Eq. 2, here F*_{k-1}: a constant factor (online_ewc.py).

Model: ``strategy.model`` (the KB, the user's object, kept) is wrapped in a
``core.lateral.TwoColumnNet``, which stays ``strategy.model`` (no runner checkpoint; the state
holds it); models it does not support raise a ValueError before training. Evaluation
(``eval_column``): "kb", the column that keeps every task, as Sec. 5.3; "ac", the AC as its
progress left it (adapters reading the KB of then), the column whose transfer Table 1 reports:
only the accuracy matrix's diagonal is meaningful then, and forward transfer = that diagonal
minus a no-transfer reference's (``ensemble``, or ``adapters=False``). That snapshot is not in
the state (a resumed run trains an experience before it evaluates).

Hooks: ``before_train_dataset_adaptation`` (wrap, check, restore); ``before_training_exp`` (AC
and adapters re-initialised from the plugin's generator, their optimizer state dropped, KB frozen);
``after_update`` (counts progress updates); ``after_training_exp`` (compress, then the KB's
Fisher); ``before_eval`` / ``before_eval_exp`` / ``after_eval_exp`` / ``after_eval`` (column).

Compress loop (``core.minibatches``): inside ``after_training_exp``, an optimizer of the strategy
optimizer's class and settings over the KB (``compress_lr`` replacing the rate), minibatches of
``train_mb_size`` of ``strategy.adapted_dataset`` reshuffled by the plugin's generator at every
pass; ``compress_epochs`` passes, or (None) exactly as many updates as progress made on this
experience, cycling over the data (App. B.1: 2500 updates per phase). The teacher is a frozen
copy of both columns at the end of progress (Sec. 2.2: fixed while the KB learns).

Hyper-parameters (Omniglot values of App. B.1 / Table 2 in brackets): ``ewc_lambda`` (>= 0, 800;
[15]), ``gamma`` ([0, 1], 1.0; [0.99]), ``fisher`` ("predicted"), ``fisher_samples`` (None = all),
``fisher_batch_size`` (128), ``fisher_norm`` ("none", "mean", "max"; "none"): online_ewc's
defaults, so both carry the same penalty unless told otherwise; Sec. 4 normalises each F_k but
names no norm, so the norm is our choice (online_ewc.py); ``temperature`` (> 0, 2.0 = App. B.1's
tau); ``compress_epochs`` (None: the progress update count); ``compress_lr`` (None: the
strategy's; [half the progress rate]); ``reset_active`` (True: fresh AC and adapters per task, as
Sec. 2.1 advises for diverse tasks; False: kept, Table 1's other row); ``adapters`` (True;
False: every alpha fixed at 0 and the adapters frozen, the AC never reads the KB: a no-transfer
reference); ``adapter_width`` (None: V_i keeps its input's width); ``eval_column`` ("kb", "ac");
``seed`` (>= 0, 0: re-initialisation and compress shuffling; the Fisher subset has the EWC's own).

Deviations: alpha_o of the output adapter is one scalar (heads of several widths), not a vector;
no adapter into the first layer (Eq. 1 does not say; both columns see the same input); the Fisher
is EWCPlugin's estimate (per-sample gradients, float64, labels by ``fisher``, all training
samples; the paper gives none for supervised tasks, App. B.2 uses 100 minibatches in RL), its
norm our choice; ``compress_lr`` defaults to the progress rate, not App. B.1's half (H2 halves
it); compress counts optimizer updates, not environment steps (supervised tasks only).
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_modules import avalanche_model_adaptation

from cl_plugins.core.checks import check_bool, check_choice, check_int, check_positive
from cl_plugins.core.distill import kd_loss
from cl_plugins.core.lateral import COLUMNS, TwoColumnNet, reinit_
from cl_plugins.core.minibatches import minimise, optimizer_like, shuffled_minibatches
from cl_plugins.core.params import shared_parameters, snapshot
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.snapshot import frozen_copy
from cl_plugins.core.state import check_settings, settings_of
from cl_plugins.regularization.online_ewc import OnlineEWCPlugin

SETTINGS = ("ewc_lambda", "gamma", "fisher", "fisher_samples", "fisher_batch_size",
            "fisher_norm", "temperature", "compress_epochs", "compress_lr", "reset_active",
            "adapters", "adapter_width", "eval_column", "seed")


class ProgressCompressPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "pnc"
    REPLACES_MODEL = True  # strategy.model becomes the two-column wrapper: no runner checkpoint
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"ewc_lambda": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e6},
                   "gamma": {"distribution": "uniform", "min": 0.5, "max": 1.0}}
    PAPER = "Progress & Compress (Schwarz et al., ICML 2018)"
    SUMMARY = ("active column with lateral adapters from a knowledge base; after each task the "
               "column is distilled (KL) into the KB under an online-EWC penalty")

    def __init__(self, ewc_lambda: float = 800.0, gamma: float = 1.0, fisher: str = "predicted",
                 fisher_samples: Optional[int] = None, fisher_batch_size: int = 128,
                 compress_epochs: Optional[int] = None, compress_lr: Optional[float] = None,
                 reset_active: bool = True, adapter_width: Optional[int] = None, seed: int = 0,
                 fisher_norm: str = "none", temperature: float = 2.0, eval_column: str = "kb",
                 adapters: bool = True):
        super().__init__()
        self.ewc = OnlineEWCPlugin(ewc_lambda, gamma, fisher, fisher_samples, fisher_batch_size,
                                   seed, fisher_norm)
        self.ewc_lambda, self.gamma, self.fisher = self.ewc.ewc_lambda, self.ewc.gamma, fisher
        self.fisher_samples, self.fisher_batch_size = fisher_samples, fisher_batch_size
        self.fisher_norm = self.ewc.fisher_norm
        self.temperature = float(check_positive("temperature", temperature))
        self.compress_epochs = None if compress_epochs is None else \
            check_int("compress_epochs", compress_epochs, 1)
        self.compress_lr = None if compress_lr is None else \
            float(check_positive("compress_lr", compress_lr))
        self.reset_active = check_bool("reset_active", reset_active)
        self.adapters = check_bool("adapters", adapters)
        self.adapter_width = None if adapter_width is None else \
            check_int("adapter_width", adapter_width, 1)
        self.eval_column = check_choice("eval_column", eval_column, COLUMNS)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(seed)
        self.net: Optional[TwoColumnNet] = None
        self.n_tasks = 0  # tasks compressed into the KB
        self.progress_updates = 0  # optimizer updates of the current (or last) progress phase
        self.view = None  # eval_column "ac": the two columns as the last progress left them
        self._pending = self._eval_column = None  # a loaded wrapper state; column before eval

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
            for p in module.parameters():  # adapters=False: frozen, alpha at 0 below
                p.requires_grad_(module is net.ac or self.adapters)
        for adapter in () if self.adapters else (*net.lateral, net.head_adapter):
            adapter.alpha.detach().zero_()  # no transfer: the AC never reads the KB
        net.column = "ac"
        self.progress_updates, self.view = 0, None
        self.ewc.quadratic_penalty.to(strategy.device)

    def after_update(self, strategy, **kwargs):
        if self.net is not None and self.net.column == "ac":
            self.progress_updates += 1

    def after_training_exp(self, strategy, **kwargs):
        teacher = frozen_copy(self.net)  # column "ac": the AC, its adapters reading the KB of now
        self.net.column = "kb"
        self.compress(strategy, teacher)
        kb = self.net.kb
        fisher = self.ewc.estimate_fisher(kb, strategy.experience.dataset)  # normalised F_k
        params = shared_parameters(kb)
        self.ewc.quadratic_penalty.add({n: f.to(params[n].dtype) for n, f in fisher.items()},
                                       snapshot(params))  # Eq. 9, anchored at the compressed KB
        self.n_tasks += 1
        self.view = teacher if self.eval_column == "ac" else None

    # ------------------------------------------------------------------------------ evaluation
    def before_eval(self, strategy, **kwargs):
        if self.net is None:
            return
        self._eval_column = self.net.column
        if self.eval_column == "kb":
            self.net.column = "kb"
        elif self.net.column == "kb" and self.view is None:
            raise ValueError(f"{type(self).__name__}(eval_column='ac') evaluates the active "
                             "column as its last progress phase left it; there is none since "
                             "load_state_dict (train an experience first)")

    def before_eval_exp(self, strategy, **kwargs):  # "ac" after a compress: the snapshot
        if self.view is not None and strategy.model is self.net and self.net.column == "kb":
            with torch.random.fork_rng(devices=[]):  # new heads: global stream untouched
                avalanche_model_adaptation(self.view, strategy.experience)
            strategy.model = self.view.to(strategy.device)

    def after_eval_exp(self, strategy, **kwargs):
        if self.view is not None and strategy.model is self.view:
            strategy.model = self.net

    def after_eval(self, strategy, **kwargs):
        if self.net is not None and self._eval_column is not None:
            self.net.column, self._eval_column = self._eval_column, None

    # ------------------------------------------------------------------------------ compress
    def compress_loss(self, teacher, kb, x, t, params=None):
        """(total, KL term, EWC term) of L_compress on one minibatch; ``params``: the KB's shared
        parameters (looked up when None)."""
        with torch.no_grad():
            target = teacher(x, t)
        kl = kd_loss(kb(x, t), target, self.temperature, scale_t2=False)  # Eq. 2: KL, no T^2
        if not len(self.ewc.quadratic_penalty):
            return kl, kl, torch.zeros_like(kl)
        ewc = self.ewc.penalty(shared_parameters(kb) if params is None else params)  # Eq. 2
        return kl + ewc, kl, ewc

    def compress(self, strategy, teacher) -> None:
        """L_compress minimised over the KB's parameters on the experience's data (docstring)."""
        kb = self.net.kb
        for p in kb.parameters():
            p.requires_grad_(True)
        kb.train()
        params = shared_parameters(kb)
        length = {"updates": self.progress_updates} if self.compress_epochs is None else \
            {"epochs": self.compress_epochs}
        batches = shuffled_minibatches(strategy.adapted_dataset, strategy.train_mb_size,
                                       self.generator, device=strategy.device, **length)
        minimise(lambda b: self.compress_loss(teacher, kb, b[0], b[-1], params)[0], batches,
                 optimizer_like(strategy.optimizer, kb.parameters(), self.compress_lr),
                 f"{type(self).__name__}: compress of task {self.n_tasks + 1} (lower "
                 "compress_lr or ewc_lambda)")

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        net = None if self.net is None else \
            {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {**settings_of(self, SETTINGS), "n_tasks": self.n_tasks,
                "progress_updates": self.progress_updates,
                "generator": self.generator.get_state(), "ewc": self.ewc.state_dict(),
                "net": net if net is not None else self._pending}

    def load_state_dict(self, state: dict) -> None:
        """A fresh model must have the heads of the tasks seen (adapt it to those experiences,
        as the runner's restore does) before the first training experience loads ``net``."""
        check_settings(self, state, SETTINGS)
        self.ewc.load_state_dict(state["ewc"])
        self.generator.set_state(state["generator"])
        self.n_tasks = int(state["n_tasks"])
        self.progress_updates, self.view = int(state["progress_updates"]), None
        if self.net is not None and state["net"] is not None:
            self.net.load_state_dict(state["net"])
        else:
            self._pending = state["net"]
