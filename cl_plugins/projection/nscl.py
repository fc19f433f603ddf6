"""Adam-NSCL: every update of a shared layer is projected into the null space of the covariance
of that layer's inputs on all previous tasks.

Name: ``nscl``. Scenarios: task-, domain- and class-IL (the paper: task-IL with one head per
task). Task labels: not needed.

Paper: S. Wang, X. Li, J. Sun, Z. Xu, "Training Networks in Null Space of Feature Covariance for
Continual Learning", CVPR 2021. Official code: github.com/ShipengWang/Adam-NSCL (read for facts,
not copied). Specification followed: ``design/projection.md`` (Adam-NSCL).

Equations. A protected layer l is a Linear or Conv2d of the shared network (task heads excluded,
see :func:`cl_plugins.core.layer_inputs.protected_layers`), seen as a fan-in matrix
``W_l`` of shape ``[out, d]`` (Linear: ``d = in``; Conv2d: ``weight.view(out, -1)``,
``d = in*kh*kw``, input rows = the unfolded patches; with ``bias="append"`` the bias is one more
column and every input row gets a constant 1). After task t (never during it):

    C_l  <-  C_l + sum_rows x^T x                                  (uncentred, float64)

over one pass of the task's training data (eval mode, no grad, forward hooks through
:func:`~cl_plugins.core.layer_inputs.record_inputs`). ``C_l`` accumulates over all tasks; it is
never reset and never normalised. What a row ``x`` is, is the ``features`` option:

- ``"batch_mean"`` (official code, default): each mini-batch of ``stats_batch_size`` inputs
  contributes the rows of its *mean* input: Linear ``x = mean_b x_b`` (one row); Conv2d: the
  batch-mean input map is unfolded and each of its L patches is a row (``patches^T patches``);
- ``"per_sample"`` (the paper's description): every sample's rows (each of its patches).

Null space: ``C_l = U diag(lambda) U^T`` (``torch.linalg.eigh`` in float64); keep the
eigenvectors B_l whose eigenvalue satisfies ``|lambda| <= a * lambda_min``, with

    lambda_min = max(min |lambda|, tol),   tol = d * eps_float64 * max |lambda|

``min |lambda|`` is the smallest eigenvalue (not a fraction of the largest), as in the code;
``tol`` is the numerical-rank tolerance of ``torch.linalg.matrix_rank`` for a d x d matrix.
When C is numerically full rank, tol < min |lambda| and the rule is the code's. When C is rank
deficient (fewer rows than d, or input features that are always zero such as MNIST's border
pixels; batch-mean statistics add one row per batch), its null directions have eigenvalues
that are signed rounding noise, at most ~tol: thresholding them at ``a * min |lambda|`` would
keep a noise-dependent handful (5 of a 44-d null space, measured); with the tolerance every one
of them is kept (tested: a covariance with a known null dimension keeps all of it). Projector

    T_l = B_l B_l^T / ||B_l B_l^T||_F = B_l B_l^T / sqrt(k_l)      (frobenius_scale=True, code)
    T_l = B_l B_l^T                                                (frobenius_scale=False, paper)

Training task t+1 (the paper's Algorithm 1; the code's modified Adam): the optimizer computes
its step ``u`` from the raw gradient (Adam: moments of g + weight_decay * W), and the step
actually taken is ``u.view(out, -1) @ T_l``. Implemented for *any* optimizer by taking the
update, not the gradient: ``before_update`` snapshots the protected parameters, the optimizer
steps, and ``after_update`` sets

    W_l  <-  W_old + (W_l - W_old).view(out, -1) @ T_l

Guarantees (tested): ``||X_old D^T||_F^2 <= a * lambda_min * ||D||_F^2`` for the projected step D
(Condition 1 of the paper: old inputs' outputs barely move) and ``<D, u> >= 0`` (T is positive
semi-definite: Condition 2, the projected step does not point uphill). Task 1 has no statistics
yet: plain optimizer steps, no projection. Task heads (Avalanche ``MultiHeadClassifier``) are not
projected; a shared head (domain/class-IL) is a shared Linear layer and is protected.

BatchNorm (and any normalisation layer with affine parameters): its weight and bias are *not*
projected. As in the official code they are regularised with EWC,
``loss += bn_ewc_lambda * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2`` (one term per finished
task, no 1/2: the official code's EWC, from Hsu et al. 2018), F_k the importance of the
normalisation parameters with the model's *predicted* (arg-max) labels, in eval mode: by
default the code's batch-size-scaled squared mini-batch gradient, optionally the per-sample
Fisher (``bn_importance`` below). The terms live in a
:class:`~cl_plugins.core.quadratic.QuadraticPenalty` (attribute ``quadratic_penalty``). Running
statistics are not frozen: they follow the current task, as in the code.

Hooks:
- ``before_training_exp``: finds the protected layers (unsupported layers raise
  :class:`~cl_plugins.core.layer_inputs.UnsupportedLayerError` with the module path), checks
  them against the stored statistics, moves the projectors to the parameters' device and dtype,
  allocates the step buffers, and applies ``lr_after_first``;
- ``before_backward``: ``strategy.loss += `` the BN EWC penalty (from task 2 on);
- ``before_training_iteration`` / ``after_training_iteration``: start/stop capturing the step's
  layer inputs (gradient path only);
- ``before_update``: snapshot of the protected parameters (one fused copy), or, on the gradient
  path, the gradient projection;
- ``after_update``: (update path) the projection above (two matrix products per layer, into preallocated
  buffers; the projector acts through the cheaper of B_l or its complement, see
  :class:`~cl_plugins.core.subspace.FanInProjector`);
- ``after_training_exp``: the statistics pass, the eigendecompositions and projectors, the BN
  Fisher and anchor.

Hyper-parameters (defaults = the official code on 10-split CIFAR-100, ACC 73.77 / BWT -1.6):

- ``a`` (>= 1, default 10): null-space threshold. 10 for 10-split CIFAR-100 and 25-split
  TinyImageNet (58.28 / -6.05), 30 for 20-split CIFAR-100 (75.95 / -3.66).
- ``features`` (default ``"batch_mean"``, code) or ``"per_sample"`` (paper). The authors report
  almost the same numbers with both.
- ``frobenius_scale`` (default True, code): divide the projector by its Frobenius norm sqrt(k).
- ``bias`` (default ``"append"``): biases of protected layers. ``"append"``: the bias is one more
  fan-in column (constant 1 appended to every input row), projected with the weight; exact for
  Condition 1. ``"freeze"``: biases keep their value from the end of task 1 (restored after
  every step; statistics without the constant column). The reference network has no biases,
  so the choice does not affect the published protocol; "append" keeps the layer trainable.
- ``stats_batch_size`` (int >= 1, default 32): batch size of the statistics pass (with
  ``"batch_mean"`` it defines the statistic: use the protocol's training batch size, 32 for
  10-split CIFAR-100, 16 for 20-split CIFAR-100 and TinyImageNet). Also the BN importance's
  batch size (``"batch"``: part of the statistic, as in the code, whose training loader it is;
  ``"per_sample"``: only the chunk size).
- ``stats_shuffle`` (default True): the statistics pass visits the data in a random order
  (drawn from this plugin's generator), like the official code's shuffled training loader, so
  the batch means mix classes. Irrelevant for ``"per_sample"``.
- ``bn_ewc_lambda`` (>= 0, default 100, code): EWC coefficient of the normalisation parameters
  (0 disables the penalty and the Fisher pass).
- ``bn_importance`` (``"batch"`` (default, code) | ``"per_sample"``): the BN importance F_k.
  ``"batch"``: over the task's data in mini-batches of ``stats_batch_size`` (shuffled when
  ``stats_shuffle``), the mean over batches of ``B_b * g_b^2``, g_b the gradient of the batch's
  mean loss and B_b its size; in expectation ``B mu^2 + sigma^2`` (mu, sigma^2: the mean and
  variance of the per-sample gradients), what the official code computes. ``"per_sample"``: the
  mean of the squared per-sample gradients, ``mu^2 + sigma^2`` (the textbook diagonal Fisher;
  1.2-4.8x weaker on the NSCL protocols).
- ``lr_after_first`` (None or > 0, default None = unchanged): from the second task on, the
  learning rate of every optimizer parameter group that contains a projected parameter. The
  paper trains task 1 with lr 1e-4 and then the projected layers with 5e-5 (set 5e-5 together
  with a config whose default group is the protected layers' and whose BN/head groups are
  separate, see experiments/configs/wang2021_nscl_*.yaml). If such a group also holds other
  parameters, their learning rate changes too: a warning names them.
- ``projection_path`` (``"auto"`` (default) | ``"update"`` | ``"gradient"``): how the projected
  step is obtained. ``"update"``: the optimizer's update is projected after the step (above;
  any optimizer). ``"gradient"``: the gradient is projected before the step
  (:class:`~cl_plugins.core.input_side.InputSideGradientProjector`: for a Linear layer from the
  step's inputs and output gradients, ``D^T (X T)``, rank <= batch), which is the same step
  only for plain SGD (no momentum, no weight decay: the update is ``-lr g``), so it raises for
  any other optimizer. ``"auto"`` takes ``"gradient"`` for plain SGD and ``"update"`` otherwise;
  both give the same parameters up to rounding (tested), the gradient path at a fraction of the
  cost with small batches (P1, batch 10). With another plugin that edits gradients in
  ``before_update`` after this one, use ``"update"`` so its changes are projected too.
- ``seed`` (int >= 0, default 0): seeds the generator of the statistics pass order; its state
  is part of ``state_dict()``.

The paper rebuilds the optimizer at every task: run with ``strategy.reset_optimizer: true``
(Adam's moments and step count restart; the parameter groups are kept).

Deviations from the paper / official code, and why:

- Statistics and eigendecompositions in float64 (the code: float32 SVD): rounding in float32
  makes lambda_min noise and the kept rank jump between runs.
- The code thresholds the singular values of ``torch.svd(C)``; in exact arithmetic they are the
  absolute eigenvalues used here, but not numerically: on a rank-deficient C the null
  directions' values are rounding noise in either computation, and ``a * min`` of noise is
  not a threshold. On a full-rank C both select the same directions (tested); on a
  rank-deficient one see the rank tolerance (below).
- The step is projected through parameter deltas (p_old + (p - p_old) T) instead of inside a
  modified Adam: identical for Adam (the code projects ``exp_avg / denom`` times the step size,
  which is exactly the delta), and it works for any optimizer, including AdamW's decoupled
  weight decay (which is projected as well). Being independent of ``p.grad`` also makes it
  immune to PyTorch 2's ``zero_grad(set_to_none=True)`` trap (the code builds projectors only
  for parameters whose grad is not None).
- The statistics pass and the Fisher use the experience's eval transforms (no augmentation), so
  they are deterministic (the official code iterates a training data loader for this pass).
- Numerically rank-deficient covariances: the rank tolerance above. The code's float32 SVD has
  a noise floor of its own (~1e-7 relative) that keeps most, not all, of such a null space
  (3 to 43 of 44 directions on the test's matrices); the tolerance keeps all of it.
- Biases (absent from the reference network): see ``bias`` above.
- Unsupported layers with trainable weights (grouped convolutions, ConvTranspose, Conv1d, ...)
  raise instead of being silently left unprojected.
- ``supports_distributed = False``: statistics are not all-reduced across ranks yet.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.checks import (check_bool, check_choice, check_int, check_non_negative,
                                    check_positive, check_range)
from cl_plugins.core.layer_inputs import (call_model, fan_in, input_rows, iterate_batches,
                                          protected_layers, record_inputs)
from cl_plugins.core.params import snapshot
from cl_plugins.core.per_sample import cross_entropy_sample, per_sample_gradients
from cl_plugins.core.quadratic import QuadraticPenalty
from cl_plugins.core.input_side import InputSideGradientProjector
from cl_plugins.core.state import check_owner, owned_by
from cl_plugins.core.subspace import FanInProjector, sym_eigh

FEATURES = ("batch_mean", "per_sample")
PROJECTION_PATHS = ("auto", "update", "gradient")
BIAS_MODES = ("append", "freeze")
BN_IMPORTANCE = ("batch", "per_sample")
Tensors = Dict[str, torch.Tensor]


class _LayerStep:
    """Buffers and factors for one protected layer's projected update (fixed per experience)."""

    def __init__(self, module: torch.nn.Module, projector: Optional[FanInProjector],
                 bias_mode: str):
        w = module.weight
        self.module = module
        self.w = w.detach().view(w.shape[0], -1)  # [out, d] view sharing storage
        self.old_w = torch.empty_like(self.w)
        self.delta_w = torch.empty_like(self.w)
        b = module.bias
        self.b = None if b is None else b.detach()
        self.old_b = None if b is None else torch.empty_like(self.b)
        self.append = b is not None and bias_mode == "append"
        self.freeze_b = b is not None and bias_mode == "freeze"
        self.projector = projector
        if projector is None:
            return
        factor = projector.factor.to(device=w.device, dtype=w.dtype)
        d = self.w.shape[1]
        self.fw = factor[:d]  # rows of the weight's fan-in
        self.fw_t = self.fw.T
        self.fb = factor[d] if self.append else None  # the bias column's row, [r]
        self.delta_b = torch.empty_like(self.b) if self.append else None
        self.tmp = self.w.new_empty(self.w.shape[0], factor.shape[1])
        self.scale, self.subtract = projector.scale, projector.subtract

    def tensors(self):
        cur = [self.w] + ([self.b] if self.b is not None else [])
        old = [self.old_w] + ([self.old_b] if self.b is not None else [])
        return cur, old

    def project(self) -> None:
        """w <- old + (w - old) @ T, T = scale * F F^T (or scale * (I - F F^T) if subtract)."""
        s = self.scale
        torch.sub(self.w, self.old_w, out=self.delta_w)
        if self.append:
            torch.sub(self.b, self.old_b, out=self.delta_b)
        if self.tmp.shape[1] == 0:  # empty factor: T = 0 (subtract=False) or s * I
            if self.subtract:
                torch.add(self.old_w, self.delta_w, alpha=s, out=self.w)
                if self.append:
                    torch.add(self.old_b, self.delta_b, alpha=s, out=self.b)
            else:
                self.w.copy_(self.old_w)
                if self.append:
                    self.b.copy_(self.old_b)
        else:
            torch.mm(self.delta_w, self.fw, out=self.tmp)  # [out, r] = delta @ F
            if self.append:
                self.tmp.addr_(self.delta_b, self.fb)
            if self.subtract:
                # old + s * (delta - delta F F^T)
                torch.add(self.old_w, self.delta_w, alpha=s, out=self.w)
                self.w.addmm_(self.tmp, self.fw_t, alpha=-s)
                if self.append:
                    torch.add(self.old_b, self.delta_b, alpha=s, out=self.b)
                    self.b.addmv_(self.tmp, self.fb, alpha=-s)
            else:
                # old + s * delta F F^T
                torch.addmm(self.old_w, self.tmp, self.fw_t, alpha=s, out=self.w)
                if self.append:
                    torch.addmv(self.old_b, self.tmp, self.fb, alpha=s, out=self.b)
        if self.freeze_b:
            self.b.copy_(self.old_b)


class NSCLPlugin(SupervisedPlugin):
    METHOD_NAME = "nscl"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    DEFAULTS: dict = {"a": 10.0, "features": "batch_mean", "frobenius_scale": True,
                      "bias": "append", "stats_batch_size": 32, "stats_shuffle": True,
                      "bn_ewc_lambda": 100.0, "bn_importance": "batch", "lr_after_first": None,
                      "projection_path": "auto", "seed": 0}
    SWEEP: dict = {"a": {"distribution": "log_uniform_values", "min": 1.0, "max": 1000.0},
                   "bn_ewc_lambda": {"distribution": "log_uniform_values", "min": 1.0,
                                     "max": 1e4}}
    PAPER = "Adam-NSCL (Wang et al., CVPR 2021)"
    SUMMARY = ("each update of a shared layer projected onto the approximate null space of the "
               "uncentred covariance of its inputs on all previous tasks; BN affine with EWC")
    supports_distributed = False

    def __init__(self, a: float = 10.0, features: str = "batch_mean",
                 frobenius_scale: bool = True, bias: str = "append",
                 stats_batch_size: int = 32, stats_shuffle: bool = True,
                 bn_ewc_lambda: float = 100.0, bn_importance: str = "batch",
                 lr_after_first: Optional[float] = None,
                 projection_path: str = "auto", seed: int = 0):
        super().__init__()
        self.a = float(check_range("a", a, 1.0, None))
        self.features = check_choice("features", features, FEATURES)
        self.frobenius_scale = check_bool("frobenius_scale", frobenius_scale)
        self.bias = check_choice("bias", bias, BIAS_MODES)
        self.stats_batch_size = check_int("stats_batch_size", stats_batch_size, 1)
        self.stats_shuffle = check_bool("stats_shuffle", stats_shuffle)
        self.bn_ewc_lambda = float(check_non_negative("bn_ewc_lambda", bn_ewc_lambda))
        self.bn_importance = check_choice("bn_importance", bn_importance, BN_IMPORTANCE)
        if lr_after_first is not None:
            lr_after_first = float(check_positive("lr_after_first", lr_after_first))
        self.lr_after_first = lr_after_first
        self.projection_path = check_choice("projection_path", projection_path, PROJECTION_PATHS)
        self.seed = check_int("seed", seed, 0)
        self.generator = torch.Generator().manual_seed(seed)

        self.covariances: Tensors = {}  # layer path -> float64 [d, d], over all tasks so far
        self.projectors: Dict[str, FanInProjector] = {}
        self.null_dims: Dict[str, int] = {}  # k_l, for inspection
        self.tasks_seen = 0
        # bn_ewc_lambda * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 (no 1/2, as the code)
        self.quadratic_penalty = QuadraticPenalty(coef=self.bn_ewc_lambda, mode="separate")
        self._steps: List[_LayerStep] = []
        self._cur: List[torch.Tensor] = []
        self._old: List[torch.Tensor] = []
        self._norm_params: Tensors = {}
        self._grad_projector = InputSideGradientProjector()  # plain-SGD path
        self._layers: Dict[str, torch.nn.Module] = {}
        self._path: Optional[str] = None  # "update" | "gradient", decided at the first step

    # ------------------------------------------------------------------------------ hooks

    def before_training_exp(self, strategy, **kwargs):
        model = strategy.model
        layers, norms = protected_layers(model, self.METHOD_NAME)
        self._check_layers(layers)
        # statistics restored by load_state_dict live on the CPU
        self.covariances = {n: c.to(layers[n].weight.device) for n, c in self.covariances.items()}
        self._norm_params = self._norm_parameters(model, norms)
        self._steps, self._cur, self._old = [], [], []
        self._grad_projector.detach()
        self._layers, self._path = layers, None
        if self.projectors:
            for name, module in layers.items():
                w = module.weight
                self.projectors[name].to(device=w.device, dtype=w.dtype)
                step = _LayerStep(module, self.projectors[name], self.bias)
                self._steps.append(step)
                cur, old = step.tensors()
                self._cur += cur
                self._old += old
            if self.projection_path != "update":
                self._grad_projector.attach(layers, self.projectors)
            if self.lr_after_first is not None:
                self._set_lr(strategy.optimizer, model, layers)
        if len(self.quadratic_penalty):
            stored = self.quadratic_penalty.terms[0][0]
            if set(stored) != set(self._norm_params):
                raise ValueError(f"{type(self).__name__}: the model's normalisation parameters "
                                 f"{sorted(self._norm_params)} differ from those of the stored "
                                 f"EWC terms {sorted(stored)}")
            device = next(iter(self._norm_params.values())).device
            self.quadratic_penalty.to(device)

    def before_backward(self, strategy, **kwargs):
        if self.bn_ewc_lambda > 0 and len(self.quadratic_penalty) and self._norm_params:
            strategy.loss += self.bn_penalty(self._norm_params)

    def before_training_iteration(self, strategy, **kwargs):
        self._grad_projector.start_step()

    def after_training_iteration(self, strategy, **kwargs):
        self._grad_projector.end_step()

    @torch.no_grad()
    def before_update(self, strategy, **kwargs):
        if not self._steps:
            return
        if self._path is None:
            self._path = self._choose_path(strategy.optimizer)
        if self._path == "gradient":
            # plain SGD: the update is -lr * grad, so projecting the gradient projects the update
            self._grad_projector.project(self._layers, self.projectors,
                                         with_bias=self.bias == "append")
            for step in self._steps:
                if step.freeze_b and step.module.bias.grad is not None:
                    step.module.bias.grad.zero_()
        else:
            torch._foreach_copy_(self._old, self._cur)

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        if self._path == "update":
            for step in self._steps:
                step.project()

    def _choose_path(self, optimizer) -> str:
        """"gradient" when the protected parameters' optimizer is plain SGD (no momentum, no
        weight decay), where it is exact and cheaper; else "update"."""
        if self.projection_path == "update":
            return "update"
        protected = {id(p) for m in self._layers.values() for p in m.parameters(recurse=False)}
        groups = [g for g in getattr(optimizer, "param_groups", [])
                  if any(id(p) in protected for p in g["params"])]
        plain = isinstance(optimizer, torch.optim.SGD) and all(
            not g.get("momentum", 0) and not g.get("weight_decay", 0) for g in groups)
        if self.projection_path == "gradient" and not plain:
            raise ValueError("nscl: projection_path='gradient' needs plain SGD (no momentum, no "
                             f"weight decay) for the protected layers; the optimizer is "
                             f"{type(optimizer).__name__} with groups {[{k: v for k, v in g.items() if k != 'params'} for g in groups]}. "
                             "Use projection_path='update' (or 'auto').")
        if self.projection_path == "auto" and not plain:
            self._grad_projector.detach()  # no capture needed on the update path
        return "gradient" if plain else "update"

    def after_training_exp(self, strategy, **kwargs):
        self._grad_projector.detach()
        model = strategy.model
        dataset = strategy.experience.dataset
        layers, norms = protected_layers(model, self.METHOD_NAME)
        self._check_layers(layers)
        was_training = model.training
        model.eval()
        try:
            self.update_covariances(model, layers, dataset, strategy.device)
            norm_params = self._norm_parameters(model, norms)
            if self.bn_ewc_lambda > 0 and norm_params:
                estimate = (self.estimate_bn_fisher if self.bn_importance == "per_sample"
                            else self.estimate_bn_batch_importance)
                fisher = estimate(model, norm_params, dataset, strategy.device)
                self.quadratic_penalty.add(
                    {n: f.to(norm_params[n].dtype) for n, f in fisher.items()},
                    snapshot(norm_params))
        finally:
            model.train(was_training)
        self.tasks_seen += 1
        self.build_projectors(layers)
        self._steps, self._cur, self._old = [], [], []
        self._grad_projector.detach()
        self._path = None

    # ------------------------------------------------------------------------- statistics

    def update_covariances(self, model, layers, dataset, device) -> None:
        """C_l += sum of x^T x over one pass of ``dataset`` (float64), for every layer."""
        with_bias = self.bias == "append"
        for name, module in layers.items():
            if name not in self.covariances:
                d = fan_in(module, with_bias)
                self.covariances[name] = torch.zeros(d, d, dtype=torch.float64,
                                                     device=module.weight.device)
        batch_mean = self.features == "batch_mean"

        def accumulate(name, module, x):
            x = x.to(torch.float64)
            if batch_mean:
                x = x.mean(0, keepdim=True)
            rows = input_rows(module, x, with_bias)
            cov = self.covariances[name]
            cov.addmm_(rows.T.to(cov.device), rows.to(cov.device))

        with torch.no_grad(), record_inputs(layers, accumulate):
            for x, _y, t in iterate_batches(dataset, self.stats_batch_size, device,
                                            generator=self.generator,
                                            shuffle=self.stats_shuffle):
                # one task in the batch (the usual case): an int label takes Avalanche's
                # single-task path (cheaper, and dtype-safe for float64 models)
                call_model(model, x, int(t[0]) if bool((t == t[0]).all()) else t)

    def build_projectors(self, layers) -> None:
        """T_l from the eigendecomposition of C_l (float64), for every layer."""
        self.projectors, self.null_dims = {}, {}
        for name, module in layers.items():
            basis, complement = self.null_space(self.covariances[name])
            k = basis.shape[1]
            scale = 1.0 / math.sqrt(k) if self.frobenius_scale else 1.0
            self.projectors[name] = FanInProjector(basis, "onto", scale, complement=complement,
                                                   dtype=module.weight.dtype)
            self.null_dims[name] = k

    def null_space(self, cov: torch.Tensor):
        """``(B, V)``: eigenvectors with |lambda| <= a * max(min |lambda|, tol), and the others
        (tol = d * eps * max |lambda|: numerically zero eigenvalues count as tol)."""
        vals, vecs = sym_eigh(cov)
        mags = vals.abs()  # = the singular values of the symmetric C (the code's SVD)
        tol = mags.max() * cov.shape[0] * torch.finfo(mags.dtype).eps
        keep = mags <= self.a * torch.maximum(mags.min(), tol)
        return vecs[:, keep], vecs[:, ~keep]

    def projection_matrix(self, name: str) -> torch.Tensor:
        """The dense fan-in projector T_l (for tests and inspection)."""
        return self.projectors[name].matrix()

    # ------------------------------------------------------------------------ BN penalty

    @staticmethod
    def _norm_parameters(model, norms) -> Tensors:
        path_of = {id(m): path for path, m in norms.items()}
        out = {}
        for name, module in model.named_modules():
            if id(module) in path_of:
                for pname, p in module.named_parameters(recurse=False):
                    if p.requires_grad:
                        out[f"{name}.{pname}" if name else pname] = p
        return out

    def estimate_bn_fisher(self, model, params: Tensors, dataset, device) -> Tensors:
        """Diagonal Fisher (float64) of the normalisation parameters with predicted labels:
        the mean over the dataset's samples of the squared per-sample gradient."""
        total = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device)
                 for n, p in params.items()}
        n_seen = 0
        for x, _y, t in iterate_batches(dataset, self.stats_batch_size, device):
            for task in torch.unique(t).tolist():
                sel = t == task
                xs = x[sel]
                with torch.no_grad():
                    logits = call_model(model, xs, int(task))
                target = logits.argmax(dim=1)
                grads = per_sample_gradients(model, params, xs, target, cross_entropy_sample,
                                             task_label=int(task))
                for n, g in grads.items():
                    total[n] += g.pow(2).sum(0, dtype=torch.float64)
            n_seen += len(x)
        if n_seen == 0:
            raise ValueError(f"{type(self).__name__}: the experience's dataset is empty")
        return {n: s / n_seen for n, s in total.items()}

    def estimate_bn_batch_importance(self, model, params: Tensors, dataset, device) -> Tensors:
        """The code's BN importance (float64): the mean over mini-batches of ``B_b * g_b^2``,
        g_b the gradient of the batch's mean loss with predicted labels."""
        names, tensors = list(params), list(params.values())
        total = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
        n_batches = 0
        for x, _y, t in iterate_batches(dataset, self.stats_batch_size, device,
                                        generator=self.generator, shuffle=self.stats_shuffle):
            loss = 0.0
            for task in torch.unique(t).tolist():
                xs = x[t == task]
                logits = call_model(model, xs, int(task))
                target = logits.detach().argmax(dim=1)
                loss = loss + torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            grads = torch.autograd.grad(loss / len(x), tensors, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g.to(torch.float64).pow(2), alpha=len(x))
            n_batches += 1
        if n_batches == 0:
            raise ValueError(f"{type(self).__name__}: the experience's dataset is empty")
        return {n: s / n_batches for n, s in zip(names, total)}

    def bn_penalty(self, params: Tensors) -> torch.Tensor:
        """bn_ewc_lambda * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2, evaluated as one collapsed
        term (``QuadraticPenalty.loss``), so the cost does not grow with the number of tasks."""
        return self.quadratic_penalty.loss(params)

    # -------------------------------------------------------------------------- helpers

    def _check_layers(self, layers) -> None:
        if not self.covariances:
            return
        with_bias = self.bias == "append"
        if set(layers) != set(self.covariances):
            raise ValueError(f"{type(self).__name__}: the protected layers changed; stored "
                             f"statistics cover {sorted(self.covariances)}, the model has "
                             f"{sorted(layers)}")
        for name, module in layers.items():
            d = fan_in(module, with_bias)
            if self.covariances[name].shape[0] != d:
                raise ValueError(f"{type(self).__name__}: layer {name!r} has fan-in {d}, the "
                                 f"stored covariance {self.covariances[name].shape[0]}")

    def _set_lr(self, optimizer, model, layers) -> None:
        protected = {id(p) for m in layers.values() for p in m.parameters(recurse=False)}
        others = []
        for group in optimizer.param_groups:
            if not any(id(p) in protected for p in group["params"]):
                continue
            group["lr"] = self.lr_after_first
            others += [id(p) for p in group["params"] if id(p) not in protected]
        if others:
            names = [n for n, p in model.named_parameters() if id(p) in set(others)]
            warnings.warn(f"{type(self).__name__}: lr_after_first={self.lr_after_first} also "
                          f"applies to {len(others)} unprojected parameter tensor(s) that share "
                          "an optimizer parameter group with projected layers "
                          f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); put "
                          "them in their own group (optimizer.param_groups) to keep their "
                          "learning rate")

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {**owned_by(self), "method": self.METHOD_NAME, "a": self.a,
                "features": self.features, "frobenius_scale": self.frobenius_scale,
                "bn_importance": self.bn_importance, "bias": self.bias,
                "stats_batch_size": self.stats_batch_size, "stats_shuffle": self.stats_shuffle,
                "bn_ewc_lambda": self.bn_ewc_lambda, "seed": self.seed,
                "tasks_seen": self.tasks_seen,
                "covariances": {n: c.cpu() for n, c in self.covariances.items()},
                "projectors": {n: p.state_dict() for n, p in self.projectors.items()},
                "null_dims": dict(self.null_dims),
                "generator": self.generator.get_state(),
                "penalty": self.quadratic_penalty.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        for key in ("method", "a", "features", "frobenius_scale", "bn_importance", "bias",
                    "stats_batch_size", "stats_shuffle", "bn_ewc_lambda", "seed"):
            mine = self.METHOD_NAME if key == "method" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"saved {type(self).__name__} state has {key}="
                                 f"{state.get(key)!r}, this plugin {mine!r}")
        self.tasks_seen = int(state["tasks_seen"])
        self.covariances = {n: c.clone() for n, c in state["covariances"].items()}
        self.projectors = {n: FanInProjector.from_state_dict(s)
                           for n, s in state["projectors"].items()}
        self.null_dims = dict(state["null_dims"])
        self.generator.set_state(state["generator"])
        self.quadratic_penalty.load_state_dict(state["penalty"])
        self._steps, self._cur, self._old = [], [], []
        self._grad_projector.detach()
        self._path = None
