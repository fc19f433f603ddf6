"""Adam-NSCL: every update of a shared layer is projected into the null space of the covariance
of that layer's inputs on all previous tasks.

Name ``nscl``; task-, domain- and class-IL (paper: task-IL); task labels not needed. Paper: S. Wang,
X. Li, J. Sun, Z. Xu, "Training Networks in Null Space of Feature Covariance for Continual
Learning", CVPR 2021; official code github.com/ShipengWang/Adam-NSCL (read for facts, not copied).
Protocol, published numbers, measurements: ``docs/methods/nscl.md``.

Protected layer l: a shared Linear/Conv2d (not a task head), ``W_l`` ``[out, d]`` acting on fan-in
rows x (:mod:`cl_plugins.core.layer_inputs`; ``bias="append"``: a constant-1 column). After task t
(``after_training_exp``), over one eval-mode pass of its data (eval transforms):

    C_l <- C_l + sum_rows x^T x                       # (1) uncentred, float64, never reset
    B_l = {u_i : |lambda_i| <= a * max(min |lambda|, tol)}, tol = d eps64 max |lambda|  # (2)
    T_l = B_l B_l^T / sqrt(k_l)  (frobenius_scale, code)  or  B_l B_l^T  (paper)       # (3)

and while training task t+1 (Algorithm 1), for any optimizer (task 1: plain steps):

    W_l <- W_old + (W_l - W_old).view(out, -1) @ T_l     # (4) the optimizer's step, projected

(numbering of this card, not the paper's): ``||X_old D^T||^2 <= a lambda_min ||D||^2`` (Condition
1) and ``<D, u> >= 0`` (Condition 2) for the step D (tested). Normalisation layers' affine
parameters are not projected: as in the code, ``loss += bn_ewc_lambda * sum_k sum_i F_k,i
(theta_i - theta*_k,i)^2`` (no 1/2), F_k at the predicted labels
(:mod:`cl_plugins.core.norm_importance`); their running statistics follow the current task.

Hooks: ``before_training_exp`` (checks, step buffers, ``lr_after_first``), ``before_backward``
(EWC term), ``before/after_training_iteration`` (input capture), ``before_update`` (snapshot or
gradient projection), ``after_update`` (the projection), ``after_training_exp`` (statistics,
null spaces, importance and anchor).

Hyper-parameters (defaults: the code on 10-split CIFAR-100): ``a`` (>= 1, 10); ``features``
(``"batch_mean"``, code: the rows of each mini-batch's mean input | ``"per_sample"``, paper);
``frobenius_scale`` (True); ``bias`` (``"append"`` | ``"freeze"``: biases keep their task-1
value); ``stats_batch_size`` (32: part of the statistic, use the protocol's batch size);
``stats_shuffle`` (True: pass order from this plugin's generator); ``bn_ewc_lambda`` (>= 0, 100);
``bn_importance`` (``"batch"``, code: mean of ``B_b g_b^2`` | ``"per_sample"``: Fisher);
``lr_after_first`` (None | > 0: from task 2 on, the lr of the optimizer groups holding projected
parameters; warns about others in them); ``projection_path`` (``"auto"``: ``"gradient"`` under
plain SGD, where projecting the gradient (:mod:`cl_plugins.core.input_side`) is the same step,
else ``"update"``; ``"gradient"`` raises for other optimizers); ``seed`` (0, saved in
``state_dict()``). The paper rebuilds the optimizer per task: ``strategy.reset_optimizer: true``.

Deviations: float64 statistics and ``eigh`` (code: float32 SVD; same selection on a full-rank C,
tested); the rank tolerance ``tol`` keeps a rank-deficient C's whole null space (its eigenvalues
are signed noise; ``a * min`` of noise keeps a few, the code's float32 SVD most); the update is
projected, not a modified Adam's step (identical for Adam; any optimizer; no reliance on
``p.grad``); eval transforms for the statistics; unsupported layers raise; biases (absent from
the reference network) per ``bias``; statistics not all-reduced across ranks.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import (check_bool, check_choice, check_int, check_non_negative,
                                    check_positive, check_range)
from cl_plugins.core.input_side import (InputSideGradientProjector, StepCaptureHooks,
                                        groups_holding, plain_sgd, set_group_lr)
from cl_plugins.core.layer_inputs import accumulate_covariances, check_fan_ins, protected_layers
from cl_plugins.core.norm_importance import importance, norm_parameters
from cl_plugins.core.params import snapshot
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.seeding import seeded_generator
from cl_plugins.core.state import check_settings, owned_by, settings_of
from cl_plugins.core.subspace import FanInProjector, UpdateProjection, sym_eigh

FEATURES = ("batch_mean", "per_sample")
PROJECTION_PATHS = ("auto", "update", "gradient")
BIAS_MODES = ("append", "freeze")
BN_IMPORTANCE = ("batch", "per_sample")
SETTINGS = ("a", "features", "frobenius_scale", "bn_importance", "bias", "stats_batch_size",
            "stats_shuffle", "bn_ewc_lambda", "seed")


def null_space(cov: torch.Tensor, a: float):
    """``(B, V)``: eigenvectors of ``cov`` with ``|lambda| <= a * max(min |lambda|, tol)`` and
    the others (``tol = d * eps * max |lambda|``: numerically zero eigenvalues count as tol)."""
    vals, vecs = sym_eigh(cov)
    mags = vals.abs()  # = the singular values of the symmetric C (the code's SVD)
    tol = mags.max() * cov.shape[0] * torch.finfo(mags.dtype).eps
    keep = mags <= a * torch.maximum(mags.min(), tol)  # (2)
    return vecs[:, keep], vecs[:, ~keep]


class NSCLPlugin(StepCaptureHooks, SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "nscl"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"a": {"distribution": "log_uniform_values", "min": 1.0, "max": 1000.0},
                   "bn_ewc_lambda": {"distribution": "log_uniform_values", "min": 1.0, "max": 1e4}}
    PAPER = "Adam-NSCL (Wang et al., CVPR 2021)"
    SUMMARY = ("each update of a shared layer projected onto the approximate null space of the "
               "uncentred covariance of its inputs on all previous tasks; BN affine with EWC")

    def __init__(self, a: float = 10.0, features: str = "batch_mean", frobenius_scale: bool = True,
                 bias: str = "append", stats_batch_size: int = 32, stats_shuffle: bool = True,
                 bn_ewc_lambda: float = 100.0, bn_importance: str = "batch",
                 lr_after_first: Optional[float] = None, projection_path: str = "auto",
                 seed: int = 0):
        super().__init__()
        self.a = float(check_range("a", a, 1.0, None))
        self.features = check_choice("features", features, FEATURES)
        self.frobenius_scale = check_bool("frobenius_scale", frobenius_scale)
        self.bias = check_choice("bias", bias, BIAS_MODES)
        self.stats_batch_size = check_int("stats_batch_size", stats_batch_size, 1)
        self.stats_shuffle = check_bool("stats_shuffle", stats_shuffle)
        self.bn_ewc_lambda = float(check_non_negative("bn_ewc_lambda", bn_ewc_lambda))
        self.bn_importance = check_choice("bn_importance", bn_importance, BN_IMPORTANCE)
        self.lr_after_first = None if lr_after_first is None else float(
            check_positive("lr_after_first", lr_after_first))
        self.projection_path = check_choice("projection_path", projection_path, PROJECTION_PATHS)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(self.seed)
        self.covariances: Dict[str, torch.Tensor] = {}  # layer path -> C_l, float64 [d, d]
        self.projectors: Dict[str, FanInProjector] = {}
        self.null_dims: Dict[str, int] = {}  # k_l, for inspection
        self.n_experiences = 0
        self.quadratic_penalty = QuadraticPenalty(coef=self.bn_ewc_lambda, mode="separate")
        self._norm_params: Dict[str, torch.Tensor] = {}
        self._grad_projector = InputSideGradientProjector()  # plain-SGD path
        self._reset_steps()

    def _reset_steps(self, layers=None) -> None:
        self._update: Optional[UpdateProjection] = None  # from task 2 on
        self._grad_projector.detach()
        self._layers, self._path = layers or {}, None  # path: "update" | "gradient", at step 1
        self._protected = [p for m in self._layers.values() for p in m.parameters(recurse=False)]

    def before_training_exp(self, strategy, **kwargs):
        model = strategy.model
        layers, norms = protected_layers(model, self.METHOD_NAME)
        check_fan_ins(self, layers, self.covariances, self.bias == "append")
        # statistics restored by load_state_dict live on the CPU
        self.covariances = {n: c.to(layers[n].weight.device) for n, c in self.covariances.items()}
        self._norm_params = norm_parameters(model, norms)
        self._reset_steps(layers)
        if self.projectors:
            self._update = UpdateProjection(layers, self.projectors, self.bias)
            if self.projection_path != "update":
                self._grad_projector.attach(layers, self.projectors)
            if self.lr_after_first is not None:
                set_group_lr(strategy.optimizer, model, self._protected, self.lr_after_first,
                             type(self).__name__)
        if len(self.quadratic_penalty):
            stored = self.quadratic_penalty.terms[0][0]
            if set(stored) != set(self._norm_params):
                raise ValueError(f"{type(self).__name__}: the model's normalisation parameters "
                                 f"{sorted(self._norm_params)} differ from those of the stored "
                                 f"EWC terms {sorted(stored)}")
            self.quadratic_penalty.to(next(iter(self._norm_params.values())).device)

    def before_backward(self, strategy, **kwargs):
        if self.bn_ewc_lambda > 0 and len(self.quadratic_penalty) and self._norm_params:
            strategy.loss += self.quadratic_penalty.loss(self._norm_params)

    @torch.no_grad()
    def before_update(self, strategy, **kwargs):
        if self._update is None:
            return
        if self._path is None:
            self._path = self._choose_path(strategy.optimizer)
        if self._path == "gradient":  # plain SGD: the update is -lr * grad
            self._grad_projector.project(self._layers, self.projectors,
                                         with_bias=self.bias == "append")
            self._update.zero_frozen_bias_grads()
        else:
            self._update.snapshot()

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        if self._path == "update":
            self._update.project()  # (4)

    def _choose_path(self, optimizer) -> str:
        if self.projection_path == "update":
            return "update"
        groups = groups_holding(optimizer, self._protected)
        plain = plain_sgd(optimizer, groups)
        if self.projection_path == "gradient" and not plain:
            settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
            raise ValueError("nscl: projection_path='gradient' needs plain SGD (no momentum, no "
                             f"weight decay) for the protected layers; the optimizer is "
                             f"{type(optimizer).__name__} with groups {settings}. "
                             "Use projection_path='update' (or 'auto').")
        if not plain:
            self._grad_projector.detach()  # no capture needed on the update path
        return "gradient" if plain else "update"

    def after_training_exp(self, strategy, **kwargs):
        self._grad_projector.detach()
        model, dataset, device = strategy.model, strategy.experience.dataset, strategy.device
        layers, norms = protected_layers(model, self.METHOD_NAME)
        check_fan_ins(self, layers, self.covariances, self.bias == "append")
        was_training = model.training
        model.eval()
        try:
            accumulate_covariances(self.covariances, model, layers, dataset, device,  # (1)
                                   self.stats_batch_size, with_bias=self.bias == "append",
                                   batch_mean=self.features == "batch_mean",
                                   generator=self.generator, shuffle=self.stats_shuffle)
            params = norm_parameters(model, norms)
            if self.bn_ewc_lambda > 0 and params:
                fisher = importance(self.bn_importance, model, params, dataset, device,
                                    self.stats_batch_size, self.generator, self.stats_shuffle)
                self.quadratic_penalty.add({n: f.to(params[n].dtype) for n, f in fisher.items()},
                                           snapshot(params))
        finally:
            model.train(was_training)
        self.n_experiences += 1
        self.build_projectors(layers)
        self._reset_steps()

    def build_projectors(self, layers) -> None:
        """T_l (3) from the null space of C_l, for every layer."""
        self.projectors, self.null_dims = {}, {}
        for name, module in layers.items():
            basis, complement = null_space(self.covariances[name], self.a)
            k = basis.shape[1]
            scale = 1.0 / math.sqrt(k) if self.frobenius_scale else 1.0
            self.projectors[name] = FanInProjector(basis, "onto", scale, complement=complement,
                                                   dtype=module.weight.dtype)
            self.null_dims[name] = k

    def projection_matrix(self, name: str) -> torch.Tensor:
        """The dense fan-in projector T_l (for tests and inspection)."""
        return self.projectors[name].matrix()

    def state_dict(self) -> dict:
        return {**owned_by(self), "method": self.METHOD_NAME, **settings_of(self, SETTINGS),
                "tasks_seen": self.n_experiences,
                "covariances": {n: c.cpu() for n, c in self.covariances.items()},
                "projectors": {n: p.state_dict() for n, p in self.projectors.items()},
                "null_dims": dict(self.null_dims), "generator": self.generator.get_state(),
                "penalty": self.quadratic_penalty.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_settings(self, state, SETTINGS)
        self.n_experiences = int(state["tasks_seen"])
        self.covariances = {n: c.clone() for n, c in state["covariances"].items()}
        self.projectors = {n: FanInProjector.from_state_dict(s)
                           for n, s in state["projectors"].items()}
        self.null_dims = dict(state["null_dims"])
        self.generator.set_state(state["generator"])
        self.quadratic_penalty.load_state_dict(state["penalty"])
        self._reset_steps()
