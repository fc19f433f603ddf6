"""Online EWC: one running Fisher, anchored at the parameters after the latest task.

Name: ``online_ewc``. Scenarios: task-, domain- and class-IL. Task labels: not needed.

Paper: J. Schwarz, J. Luketina, W. M. Czarnecki, A. Grabska-Barwinska, Y. W. Teh, R. Pascanu,
R. Hadsell, "Progress & Compress: A scalable framework for continual learning", ICML 2018
(Sec. 4, Eq. 8-9); the same method as evaluated by van de Ven & Tolias 2018 (protocol P2)
and Hsu et al. 2018 (protocol S1, ``EWC_online_mnist``); protocol labels as in
experiments/reproduce.py.

Equations (theta = the shared parameters, T = tasks finished so far):

    F*_T = gamma * F*_{T-1} + F_T          (Eq. 9; F_T: the diagonal Fisher of task T,
                                            divided by its norm when ``fisher_norm`` is set)
    loss = L_task(theta) + (lambda / 2) * sum_i F*_T,i (theta_i - theta*_T,i)^2      (Eq. 8)

with theta*_T the parameters at the end of task T and F_T estimated exactly as in
:class:`~cl_plugins.regularization.ewc.EWCPlugin` (mean over training samples of the squared
per-sample log-likelihood gradient; ``fisher`` chooses the labels: ``"exact"``, ``"true"``,
``"empirical"``, ``"predicted"``, see ewc.py). Memory and per-step cost stay constant in the
number of tasks, unlike EWC's one term per task. With gamma = 1 this equals
``EWCPlugin(mode="accumulate")``.

EWC++ (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018) is a different
online variant: the Fisher is a moving average F <- alpha F_batch + (1 - alpha) F updated
*during* training from the mini-batch gradients, and is part of RWalk; it is implemented in
rwalk.py, not here.

Hooks: as EWCPlugin (``before_training_exp`` checks and device, ``before_backward`` adds the
penalty to ``strategy.loss``, ``after_training_exp`` estimates F_T and merges it); the running
term is a :class:`~cl_plugins.core.quadratic.QuadraticPenalty` in ``online`` mode with
``coef = lambda / 2`` (attribute ``quadratic_penalty``).

Hyper-parameters (defaults = protocol S1, Split MNIST task-IL, Hsu et al. 2018):

- ``ewc_lambda`` (>= 0, default 800): lambda above. Hsu et al.'s coefficient (400 task-IL, 700
  domain-IL, 100 class-IL) multiplies sum F (theta - theta*)^2 without the 1/2, hence
  ``ewc_lambda = 2 * reg_coef``. Other libraries' lambdas convert as in docs/methods/ewc.md.
- ``gamma`` (in [0, 1], default 1.0): decay of the old Fisher. 1.0 is what Hsu et al. and van de
  Ven's online EWC use; gamma = 0 keeps only the latest task's Fisher.
- ``fisher`` (default ``"predicted"``: the arg-max label, as both S1 (Hsu) and P2 (van de Ven &
  Tolias 2018) compute it), ``fisher_samples`` (default None = all training samples; S1's
  60,000), ``fisher_batch_size`` (default 128, memory/speed only), ``seed`` (default 0): as in
  EWCPlugin.
- ``fisher_norm`` (``"none"``, ``"mean"`` or ``"max"``; default ``"none"``): each task's F_T,
  over all shared parameters together, is divided by its mean entry or its largest entry before
  the gamma merge, F*_T = gamma F*_{T-1} + F_T / norm(F_T) (``core.fisher_scale``; an all-zero
  F_T is merged unchanged, adding nothing, rather than producing NaN). Schwarz et al. (Sec. 4,
  last paragraph) normalise each task's Fisher so that tasks count equally whatever the scale
  of their Fisher, but do not say by which norm: the norm is our choice. "none" is the default
  because the S1 and P2 anchors were measured with raw Fishers, and with it every stored result
  keeps its meaning; a lambda tuned for one setting does not carry over to another.

Why these defaults differ from EWCPlugin's (exact Fisher, lambda 1e5 from S2): protocol S2 has no
online EWC; S1 is the anchor that gives online EWC's coefficient, and a coefficient only carries
over together with the Fisher it was tuned for (the exact Fisher of a confident model is orders
of magnitude larger than the arg-max one).

Deviations from the paper / official code, and why:

- Schwarz et al. (and van de Ven's older code) write the penalty with gamma * F*_T; here it is
  F*_T (as in Hsu et al.'s code and the usual statement of online EWC). The two differ by a
  constant factor only: ``ewc_lambda`` here = gamma * their lambda. Identical at gamma = 1.
- Schwarz et al. write gamma < 1 (Eq. 8; 0.95 for online EWC on Omniglot, Table 2); the
  default here is S1's gamma = 1.0. Their per-task Fisher normalisation (Sec. 4) is off by
  default (``fisher_norm="none"``, above); switched on, its norm is our choice (none is named).
- In Progress & Compress the online-EWC penalty protects the knowledge base during the compress
  phase; this plugin applies it to ordinary training, as the online-EWC baselines of S1, P2 and
  R1 do (the full method is ``pnc``).
- The deviations listed in ewc.py (per-sample gradients in batches, float64 accumulation, eval
  transforms, shared parameters only) apply here too.
"""

from __future__ import annotations

from typing import Optional

from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import check_choice, check_range
from cl_plugins.core.fisher_scale import FISHER_NORMS, normalize_fisher
from cl_plugins.core.state import check_settings
from cl_plugins.regularization.ewc import EWCPlugin


class OnlineEWCPlugin(EWCPlugin, supports_distributed=True):
    METHOD_NAME = "online_ewc"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"ewc_lambda": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e10},
                   "gamma": {"distribution": "uniform", "min": 0.5, "max": 1.0}}
    PAPER = "online EWC (Schwarz et al., ICML 2018, Progress & Compress)"
    SUMMARY = ("one quadratic penalty (lambda/2) sum F (theta - theta*)^2 with F <- gamma F + "
               "F_new, anchored at the latest parameters")

    def __init__(self, ewc_lambda: float = 800.0, gamma: float = 1.0, fisher: str = "predicted",
                 fisher_samples: Optional[int] = None, fisher_batch_size: int = 128,
                 seed: int = 0, fisher_norm: str = "none"):
        SupervisedPlugin.__init__(self)
        self.gamma = float(check_range("gamma", gamma, 0.0, 1.0))
        self.fisher_norm = check_choice("fisher_norm", fisher_norm, FISHER_NORMS)
        self.configure(ewc_lambda, "online", self.gamma, fisher, fisher_samples,
                       fisher_batch_size, seed)

    def estimate_fisher(self, model, dataset):
        """F_T as it joins the running Fisher: EWCPlugin's estimate divided by its
        ``fisher_norm`` (``core.fisher_scale``; the estimate itself for "none")."""
        return normalize_fisher(super().estimate_fisher(model, dataset), self.fisher_norm)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gamma": self.gamma, "fisher_norm": self.fisher_norm}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(state, dict) and "fisher_norm" not in state:
            state = {**state, "fisher_norm": "none"}  # written before it existed: raw Fishers
        check_settings(self, state, ("gamma", "fisher_norm"))
        super().load_state_dict(state)
