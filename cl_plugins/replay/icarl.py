"""iCaRL: herding exemplars, sigmoid/BCE training with distillation, nearest-mean-of-exemplars.

Name: ``icarl``. Scenarios: class-IL only. Task labels: not needed.

Paper: S.-A. Rebuffi, A. Kolesnikov, G. Sperl, C. H. Lampert, "iCaRL: Incremental Classifier and
Representation Learning", CVPR 2017 (official code: github.com/srebuffi/iCaRL,
``iCaRL-TheanoLasagne/main_cifar_100_theano.py``, the code behind the CIFAR-100 numbers).

What is implemented (phi(x) = L2-normalised ``model.backbone(x)``; our runner's models are
``ClassifierNet(backbone, head)``, the head being iCaRL's weight vectors w_y, with a bias)
-----------------------------------------------------------------------------------------------
Exemplar memory P = (P_1, ..., P_t) of total size K (``mem_size``), t = classes seen so far.

* Algorithm 4, ConstructExemplarSet (herding), for each class y new in the experience, on its
  training samples X_y, mu = mean_{x in X_y} phi(x):

      p_k = argmin_{x in X_y \\ {p_1..p_{k-1}}} || mu - (1/k) [phi(x) + sum_{j<k} phi(p_j)] ||,
      k = 1..m.

  Computed as argmin_x ||phi(x)||^2 - 2 <k mu - S_{k-1}, phi(x)> (the same argmin: the norm is
  multiplied by k^2 and a term independent of x dropped), in float64, one matrix-vector
  product per k on the strategy's device; ties go to the lowest sample index.
* Algorithm 5, ReduceExemplarSet: P_y <- (p_1, ..., p_m), the first m of the herding order.
* m = floor(K / t) exemplars per class after every experience (``fixed_memory=True``, the
  paper); with ``fixed_memory=False`` m = ``mem_size`` per class and the memory grows with the
  classes (van de Ven et al. 2022's "budget of 100 per class"). The memory is a
  ``ReplayBuffer`` filled with ``set_contents`` (classes in the order first seen, each class's
  rows in herding order, so reduction keeps row prefixes).
* Algorithm 3, UpdateRepresentation: train on D = (the experience's data) U (all exemplars) with

    l = - sum_{(x_i,y_i) in D} [ sum_{y new} d_{y=y_i} log g_y(x_i) + d_{y!=y_i} log(1 - g_y(x_i))
                                 + sum_{y old} q_i^y log g_y(x_i) + (1 - q_i^y) log(1 - g_y(x_i)) ]

  g_y = sigmoid(z_y) (z = the head's logits), q_i^y = sigmoid of the *previous* model's logit
  (a frozen copy taken at the end of the previous experience, in eval mode). The old classes'
  targets are q for every sample, the exemplars included; their own label only enters through
  q. Implemented as ``binary_cross_entropy_with_logits(z, target)`` averaged over the N x C
  entries of the minibatch's N x C output (C = the head's width), as the official code does
  (``binary_crossentropy(...).mean()`` over its 100 outputs); see Deviations for the columns of
  classes not seen yet.
* Algorithm 1, classification by nearest mean of exemplars (NME):

      mu_y = normalise( (1/|P_y|) sum_{p in P_y} phi(p) ),   y* = argmin_y || phi(x) - mu_y ||

  recomputed with the final network of every experience (after the exemplar update). At eval
  time ``strategy.mb_output`` is replaced by the scores -||phi(x) - mu_y|| (classes without
  exemplars: -1e4, the masked-head value), so Avalanche's accuracy metrics (and the runner's
  task-IL view, which restricts the scores to the experience's classes) see NME predictions.

Hooks
-----
``before_train_dataset_adaptation`` (rebuilds a previous model restored by
``load_state_dict``), ``after_train_dataset_adaptation`` (``claim_dataloader``, then
``strategy.adapted_dataset`` = experience data + exemplars, as Algorithm 3 and the official code;
Avalanche builds the dataloader from it next), ``before_training_exp`` (installs the iCaRL
criterion, see below), ``after_training_exp`` (restores the criterion, herding and reduction,
class means, copies the previous model), ``before_eval`` / ``after_eval`` (a forward hook on
``model.backbone`` so that NME reuses the features of the eval forward pass),
``after_eval_forward`` (NME scores).

The loss: iCaRL's BCE *replaces* the classification loss, it is not a term added to it. Adding
``bce - CE`` to ``strategy.loss`` in ``before_backward`` would compute the cross-entropy only to
cancel it (and cancel it only up to rounding). Instead, with ``loss="bce"`` the plugin swaps the
strategy's criterion (``strategy._criterion``, Avalanche's ``criterion()`` is
``_criterion(mb_output, mb_y)``) for the iCaRL criterion between ``before_training_exp`` and
``after_training_exp``, and restores the original one afterwards (evaluation, and training-time
evaluation with ``eval_every``, use the original). ``strategy.loss`` is still
``criterion() + the terms other plugins add in before_backward``, so the plugin composes with
regularisers and distillation plugins as every other method does. Only one plugin may swap the
criterion: a second iCaRL plugin in the same strategy raises ``ValueError``. ``loss="ce"`` keeps
the strategy's criterion (cross-entropy over current data + exemplars, no distillation): the
memory and the NME classifier alone.

Hyper-parameters (DEFAULTS = the paper's CIFAR-100 protocol: K = 2000, NME, BCE)
---------------------------------------------------------------------------------
- ``mem_size`` (int >= 1, default 2000): K, the total number of exemplars
  (``fixed_memory=True``), or the number per class (``fixed_memory=False``).
- ``fixed_memory`` (bool, default True).
- ``classifier`` (``"nme"`` | ``"head"``, default ``"nme"``): evaluation by nearest mean of
  exemplars, or by the head's outputs (the paper's "hybrid1").
- ``loss`` (``"bce"`` | ``"ce"``, default ``"bce"``), see above.
- ``flip_means`` (bool, default False): class means average the features of each exemplar and
  of its horizontal flip (the official CIFAR code does; the paper does not mention it). Only
  for images whose mirror image has the same label (CIFAR, not digits); the CIFAR-100 config
  turns it on.
- ``x_dtype`` (None or a dtype name, default None = the inputs' dtype): storage dtype of the
  exemplars, see ``cl_plugins.core.buffer``.
- ``x_range`` (None, ``[lo, hi]`` or ``[[lo_c, ...], [hi_c, ...]]``, default None): with
  ``x_dtype="uint8"``, the input values of pixel levels 0 and 255 (``[0.0, 1.0]`` without
  normalisation, ``cl_plugins.core.buffer.grid_range(mean, std)`` with it): the exemplars are
  stored as their 1-byte pixel levels (3,072 bytes per 32x32x3 image instead of 12,288) and read
  back as the exact float32 inputs; inputs off that grid raise a ValueError. See
  ``cl_plugins.core.buffer``.

Deviations and choices
----------------------
- Herding: with L2-normalised features, Algorithm 4 and the official code's herding
  (w_1 = mu; x_k = argmax <w_k, phi(x)>; w_{k+1} = w_k + mu - phi(x_k)) pick the same argmax,
  since w_k = k mu - S_{k-1} and ||phi(x)|| = 1. The official loop may hit an already chosen
  sample again (it is then not re-added, but its phi enters w again); here chosen samples are
  excluded, as in Algorithm 4 read as a set and in Avalanche, FACIL and Mammoth.
- m = floor(K / t); the official code rounds up (ceil(2000 / 30) = 67 -> 2010 exemplars), so
  it may exceed K by up to t - 1.
- The BCE covers every output column: old classes -> q, the sample's own class -> 1, all
  others -> 0. With the runner's class-IL ``MaskedHead`` (classes not yet seen masked to -1e4)
  the unseen columns contribute exactly 0 loss and 0 gradient, so the loss is the paper's sum
  over the t classes seen (Algorithm 3), divided by N x C. With an unmasked ``linear`` head the
  unseen classes are pushed towards 0 as well, as in the official code (100 outputs from the
  start); the CIFAR-100 config uses that head.
- The previous model's outputs q are computed on the fly for each minibatch (after any batch
  augmentation), as the official code does; Algorithm 3 stores them once before training,
  which is the same without augmentation. The previous model runs in eval mode (the official
  ``deterministic=True``): one extra forward pass per step from the second experience on.
- NME scores span only the classes that have exemplars; the official code also scores classes
  not seen yet, with a zero mean. Test features are not flipped (as the official code).
- Before the first experience has ended there are no class means: evaluation then reports the
  head's outputs.
- Exemplars are stored as the tensors the experience's dataset yields in eval mode and are
  replayed without the dataset's training transforms (the benchmarks of this library have
  none; a ``BatchAugmentPlugin`` augments the exemplars with the rest of each minibatch, as the
  official code augments its whole training set).
- The features are those of our backbones (ResNet-32 is not available; the CIFAR-100 config uses
  the reduced ResNet-18 and documents it). ``model.backbone`` must exist (ClassifierNet).
- Classes are assumed disjoint across experiences (class-IL). A class seen again gets its
  exemplar set rebuilt by herding over the new experience's samples, and it is trained with
  its one-hot target (not distilled) in that experience.
- Cost: the training set of experience s has n + K samples (more steps per epoch); each step of
  experience >= 2 adds one eval-mode forward pass of the previous model. Exemplar selection
  runs once per experience: one feature pass over the experience's data, herding, one feature
  pass over the exemplars.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier
from avalanche.models.utils import avalanche_forward
from torch import nn

from cl_plugins.core.buffer import ReplayBuffer
from cl_plugins.core.checks import check_bool, check_choice, check_int
from cl_plugins.core.replay_loader import claim_dataloader, describe
from cl_plugins.core.state import check_owner, owned_by

CLASSIFIERS = ("nme", "head")
LOSSES = ("bce", "ce")
UNSCORED = -1e4  # score of classes without exemplars (as MaskedHead's masked logits)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


# ------------------------------------------------------------------------------ math


def herding_order(features: torch.Tensor, m: int, normalize: bool = True) -> torch.Tensor:
    """The first min(m, n) indices of Algorithm 4's herding order over ``features`` [n, d].

    ``normalize``: L2-normalise the rows first (iCaRL's phi). Computed in float64 on the
    features' device."""
    f = features.detach().to(torch.float64).flatten(1)
    if normalize:
        f = F.normalize(f, dim=1)
    n = f.shape[0]
    m = min(int(m), n)
    mu = f.mean(0)
    sq = (f * f).sum(1)
    running = torch.zeros_like(mu)  # S_{k-1}: sum of the chosen features
    taken = torch.zeros(n, dtype=torch.bool, device=f.device)
    order = torch.empty(m, dtype=torch.long, device=f.device)
    for k in range(1, m + 1):
        # k^2 || mu - (S + phi) / k ||^2 = ||k mu - S||^2 - 2 <k mu - S, phi> + ||phi||^2
        score = sq - 2.0 * (f @ (k * mu - running))
        i = torch.argmin(score.masked_fill(taken, float("inf")))
        order[k - 1] = i
        taken[i] = True
        running += f[i]
    return order


def icarl_bce(logits: torch.Tensor, y: torch.Tensor, old_logits: Optional[torch.Tensor] = None,
              old_classes: Sequence[int] = ()) -> torch.Tensor:
    """iCaRL's loss (Algorithm 3): BCE of sigmoid(logits) against one-hot(y), with the columns
    ``old_classes`` replaced by sigmoid(old_logits); mean over the N x C entries."""
    target = F.one_hot(y.long(), logits.shape[1]).to(logits.dtype)
    if old_logits is not None and len(old_classes):
        cols = torch.as_tensor(list(old_classes), dtype=torch.long, device=logits.device)
        target[:, cols] = torch.sigmoid(old_logits.detach()[:, cols].to(logits.dtype))
    return F.binary_cross_entropy_with_logits(logits, target)


def nme_scores(features: torch.Tensor, means: torch.Tensor, classes: Sequence[int],
               n_outputs: int) -> torch.Tensor:
    """[N, n_outputs] scores: -|| normalise(features) - mean_c || in column c of ``classes``,
    ``UNSCORED`` elsewhere. ``means`` [len(classes), d] are already normalised."""
    f = F.normalize(features.flatten(1).to(means.dtype), dim=1)
    dist = torch.cdist(f, means, compute_mode="donot_use_mm_for_euclid_dist")
    out = torch.full((f.shape[0], n_outputs), UNSCORED, dtype=dist.dtype, device=dist.device)
    out[:, torch.as_tensor(list(classes), dtype=torch.long, device=out.device)] = -dist
    return out


def _frozen_copy(model: nn.Module) -> nn.Module:
    """Deep copy in eval mode, no gradients, without the hooks other plugins put on ``model``
    (their owners must not be copied, and must not see the copy's activations)."""
    memo = {}
    for mod in model.modules():
        for attr in _HOOK_DICTS:
            for hook in getattr(mod, attr, {}).values():
                memo[id(hook)] = hook
    old = copy.deepcopy(model, memo)
    for mod in old.modules():
        for attr in _HOOK_DICTS:
            if hasattr(mod, attr):
                setattr(mod, attr, type(getattr(mod, attr))())
    old.eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


class _FeatureTap:
    """Forward hook keeping the backbone's eval-mode output and the input it came from."""

    def __init__(self):
        self.inp = self.out = None

    def __call__(self, module, inputs, output):
        if not module.training and inputs:
            self.inp, self.out = inputs[0], output

    def take(self, x):
        out = self.out if self.inp is x else None
        self.inp = self.out = None
        return out


class _ICaRLCriterion:
    """The strategy's criterion while iCaRL trains (``loss="bce"``); delegates to the original
    criterion outside training (evaluation during training)."""

    def __init__(self, plugin: "ICaRLPlugin", strategy, base):
        self.plugin, self.strategy, self.base = plugin, strategy, base

    def __call__(self, output, y):
        if not self.strategy.is_training:
            return self.base(output, y)
        return self.plugin.training_loss(self.strategy, output, y)


# ------------------------------------------------------------------------------ plugin


class ICaRLPlugin(SupervisedPlugin):
    METHOD_NAME = "icarl"
    SCENARIOS = ("class",)
    NEEDS_TASK_LABELS = False
    DEFAULTS: dict = {"mem_size": 2000, "fixed_memory": True, "classifier": "nme",
                      "loss": "bce", "flip_means": False, "x_dtype": None, "x_range": None}
    SWEEP: dict = {"mem_size": {"values": [200, 500, 1000, 2000]}}
    PAPER = "iCaRL (Rebuffi, Kolesnikov, Sperl & Lampert, CVPR 2017)"
    SUMMARY = ("herding-selected exemplars (K in total) replayed with the current data; sigmoid "
               "BCE with the previous model's outputs as targets for old classes; "
               "nearest-mean-of-exemplars classification")
    SETS_DATALOADER = True  # the training set is the experience's data + the exemplars
    supports_distributed = False

    def __init__(self, mem_size: int = 2000, fixed_memory: bool = True, classifier: str = "nme",
                 loss: str = "bce", flip_means: bool = False, x_dtype: Optional[str] = None,
                 x_range=None):
        super().__init__()
        self.mem_size = check_int("mem_size", mem_size, 1)
        self.fixed_memory = check_bool("fixed_memory", fixed_memory)
        self.classifier = check_choice("classifier", classifier, CLASSIFIERS)
        self.loss = check_choice("loss", loss, LOSSES)
        self.flip_means = check_bool("flip_means", flip_means)
        # no randomness is drawn from the buffer (herding is deterministic): fixed seed
        self.buffer = ReplayBuffer(mem_size, policy="reservoir", seed=0, x_dtype=x_dtype,
                                   x_range=x_range)  # validates x_dtype and x_range
        self.x_dtype, self.x_range = x_dtype, self.buffer.x_range

        self.seen_classes: List[int] = []  # in the order first seen
        self.class_means: Optional[torch.Tensor] = None  # [len(mean_classes), d], normalised
        self.mean_classes: List[int] = []
        self.old_model: Optional[nn.Module] = None
        self.n_experiences = 0
        self._pending_old: Optional[Dict[str, torch.Tensor]] = None
        self._distill_classes: List[int] = []  # old classes of the experience being trained
        self._base_criterion = None
        self._tap: Optional[_FeatureTap] = None
        self._tap_handle = None
        self._means_dev: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ model checks

    @staticmethod
    def _check_model(model: nn.Module) -> None:
        if not isinstance(getattr(model, "backbone", None), nn.Module):
            raise ValueError(f"iCaRL needs a model with a feature extractor at model.backbone "
                             f"(cl_plugins' ClassifierNet); got {type(model).__name__} without "
                             "one")
        head = getattr(model, "head", None)
        if isinstance(head, MultiHeadClassifier):
            raise ValueError("iCaRL is a class-IL method: it needs one head over all classes "
                             "(model.head 'masked' or 'linear'); found a MultiHeadClassifier "
                             "at model.head")

    def _ensure_old_model(self, model: nn.Module) -> None:
        if self._pending_old is None:
            return
        old = _frozen_copy(model)
        try:
            old.load_state_dict(self._pending_old)
        except RuntimeError as err:
            raise ValueError(f"iCaRL: the saved previous model does not fit the model: "
                             f"{err}") from err
        self.old_model, self._pending_old = old, None

    # ------------------------------------------------------------------ training

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        # The model is still as it was after the previous experience: a restored previous
        # model's state dict fits it exactly.
        self._check_model(strategy.model)
        self._ensure_old_model(strategy.model)

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        claim_dataloader(strategy, self)
        if self.buffer.is_empty:
            return
        from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
        from avalanche.benchmarks.utils.utils import concat_datasets

        mem = self.buffer.get(torch.arange(len(self.buffer)), "cpu")
        t = mem.t if mem.t is not None else torch.zeros_like(mem.y)
        exemplars = _make_taskaware_tensor_classification_dataset(
            mem.x, mem.y, task_labels=t.tolist(), targets=mem.y)
        strategy.adapted_dataset = concat_datasets((strategy.adapted_dataset, exemplars))

    def before_training_exp(self, strategy, **kwargs):
        self._check_model(strategy.model)
        current = {int(c) for c in strategy.experience.classes_in_this_experience}
        self._distill_classes = [c for c in self.seen_classes if c not in current]
        if self.loss != "bce":
            return
        self._ensure_old_model(strategy.model)
        if self.old_model is not None:
            self.old_model.to(strategy.device)
        crit = strategy._criterion
        if isinstance(crit, _ICaRLCriterion):
            if crit.plugin is not self:
                raise ValueError(f"Two plugins want to replace the strategy's criterion: "
                                 f"{describe(self)} and {describe(crit.plugin)}; keep one")
            crit = crit.base  # left installed by an interrupted experience
        self._base_criterion = crit
        strategy._criterion = _ICaRLCriterion(self, strategy, crit)

    def training_loss(self, strategy, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The iCaRL loss of the current minibatch (called as the strategy's criterion)."""
        old_logits = None
        if self.old_model is not None and self._distill_classes:
            with torch.no_grad():
                old_logits = avalanche_forward(self.old_model, strategy.mb_x,
                                               strategy.mb_task_id)
        return icarl_bce(output, y, old_logits, self._distill_classes)

    def after_training_exp(self, strategy, **kwargs):
        crit = strategy._criterion
        if isinstance(crit, _ICaRLCriterion) and crit.plugin is self:
            strategy._criterion = crit.base
        self._base_criterion = None
        model = strategy.model
        was_training = model.training
        model.eval()
        try:
            self.update_memory(model, strategy.experience, strategy.device,
                               strategy.eval_mb_size or strategy.train_mb_size)
            self.compute_class_means(model, strategy.device,
                                     strategy.eval_mb_size or strategy.train_mb_size)
        finally:
            model.train(was_training)
        if self.loss == "bce":
            self.old_model = _frozen_copy(model)
            self._pending_old = None
        self.n_experiences += 1
        self._distill_classes = []

    # ------------------------------------------------------------------ memory

    @torch.no_grad()
    def _features(self, model, x: torch.Tensor, device, batch_size: int,
                  flip: bool = False) -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            if flip:
                xb = xb.flip(-1)
            out.append(model.backbone(xb).flatten(1))
        return torch.cat(out) if out else torch.empty(0)

    def per_class(self, n_classes: int) -> int:
        """m: exemplars per class when ``n_classes`` classes have been seen."""
        if not self.fixed_memory:
            return self.mem_size
        m = self.mem_size // n_classes
        if m < 1:
            raise ValueError(f"iCaRL: mem_size={self.mem_size} is smaller than the "
                             f"{n_classes} classes seen; it needs at least one exemplar per "
                             "class (raise mem_size or use fixed_memory=False)")
        return m

    @torch.no_grad()
    def update_memory(self, model: nn.Module, experience, device, batch_size: int) -> None:
        """Algorithms 4 and 5 after training on ``experience`` (model in eval mode)."""
        loader = torch.utils.data.DataLoader(experience.dataset.eval(), batch_size=batch_size,
                                             shuffle=False)
        xs, ys, ts, feats = [], [], [], []
        for batch in loader:
            x, y, t = batch[0], batch[1], batch[2]
            xs.append(x)
            ys.append(torch.as_tensor(y))
            ts.append(torch.as_tensor(t))
            feats.append(model.backbone(x.to(device)).flatten(1))
        x_new, y_new, t_new = torch.cat(xs), torch.cat(ys).long(), torch.cat(ts).long()
        f_new = torch.cat(feats)
        new_classes = sorted(int(c) for c in torch.unique(y_new).tolist())
        seen = self.seen_classes + [c for c in new_classes if c not in self.seen_classes]
        m = self.per_class(len(seen))

        parts = []  # (x, y, t) per class, in the order the classes were first seen
        stored = self.buffer.get(torch.arange(len(self.buffer)), "cpu") if len(self.buffer) \
            else None
        for c in seen:
            if c in new_classes:
                idx = torch.nonzero(y_new == c).flatten()
                pick = idx[herding_order(f_new[idx.to(f_new.device)], m).cpu()]
                parts.append((x_new[pick], y_new[pick], t_new[pick]))
            else:  # reduction: the first m rows of the class (its herding order)
                rows = torch.nonzero(stored.y == c).flatten()[:m]
                t_old = stored.t[rows] if stored.t is not None else torch.zeros_like(rows)
                parts.append((stored.x[rows], stored.y[rows], t_old))
        x_mem = torch.cat([p[0] for p in parts])
        y_mem = torch.cat([p[1] for p in parts])
        t_mem = torch.cat([p[2] for p in parts])
        if x_mem.shape[0] > self.buffer.capacity:  # fixed_memory=False: the memory grows
            self.buffer = ReplayBuffer(x_mem.shape[0], policy="reservoir", seed=0,
                                       x_dtype=self.x_dtype, x_range=self.x_range)
        self.buffer.set_contents(x_mem, y_mem, t_mem)
        self.seen_classes = seen

    @torch.no_grad()
    def compute_class_means(self, model: nn.Module, device, batch_size: int) -> None:
        """mu_y of Algorithm 1 for every class in memory, with the current network."""
        if self.buffer.is_empty:
            return
        mem = self.buffer.get(torch.arange(len(self.buffer)), "cpu")
        f = F.normalize(self._features(model, mem.x, device, batch_size).double(), dim=1)
        if self.flip_means:
            if mem.x.dim() != 4:
                raise ValueError(f"iCaRL flip_means=True needs image inputs [N, C, H, W]; "
                                 f"got exemplars of shape {tuple(mem.x.shape)}")
            f2 = F.normalize(self._features(model, mem.x, device, batch_size, True).double(),
                             dim=1)
        classes = [c for c in self.seen_classes if bool((mem.y == c).any())]
        means = []
        y = mem.y.to(f.device)
        for c in classes:
            sel = y == c
            mu = f[sel].mean(0)
            if self.flip_means:
                mu = (mu + f2[sel].mean(0)) / 2
            means.append(F.normalize(mu, dim=0))
        self.class_means = torch.stack(means).float().cpu()
        self.mean_classes = classes
        self._means_dev = None

    # ------------------------------------------------------------------ evaluation

    def before_eval(self, strategy, **kwargs):
        self._remove_tap()
        if self.classifier == "nme" and self.class_means is not None:
            self._check_model(strategy.model)
            self._tap = _FeatureTap()
            self._tap_handle = strategy.model.backbone.register_forward_hook(self._tap)
            self._means_dev = self.class_means.to(strategy.device)

    def after_eval_forward(self, strategy, **kwargs):
        if self.classifier != "nme" or self.class_means is None:
            return
        feats = self._tap.take(strategy.mb_x) if self._tap is not None else None
        if feats is None:
            with torch.no_grad():
                feats = strategy.model.backbone(strategy.mb_x)
        means = self._means_dev if self._means_dev is not None else \
            self.class_means.to(strategy.device)
        out = strategy.mb_output
        strategy.mb_output = nme_scores(feats.detach(), means, self.mean_classes,
                                        out.shape[1]).to(out.dtype)

    def after_eval(self, strategy, **kwargs):
        self._remove_tap()

    def _remove_tap(self):
        if self._tap_handle is not None:
            self._tap_handle.remove()
        self._tap_handle, self._tap = None, None

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """NME class predictions for inputs ``x`` (model in eval mode, after an experience)."""
        if self.class_means is None:
            raise ValueError("iCaRL.predict: no class means yet (train on an experience first)")
        with torch.no_grad():
            f = model.backbone(x)
        means = self.class_means.to(f.device)
        return nme_scores(f, means, self.mean_classes, max(self.mean_classes) + 1).argmax(1)

    # ------------------------------------------------------------------ state

    def _config(self) -> dict:
        return {"mem_size": self.mem_size, "fixed_memory": self.fixed_memory,
                "classifier": self.classifier, "loss": self.loss,
                "flip_means": self.flip_means}

    def state_dict(self) -> dict:
        if self.old_model is not None:
            old = {k: v.detach().cpu().clone() for k, v in self.old_model.state_dict().items()}
        elif self._pending_old is not None:
            old = {k: v.clone() for k, v in self._pending_old.items()}
        else:
            old = None
        return {**owned_by(self), "config": self._config(), "n_experiences": self.n_experiences,
                "seen_classes": list(self.seen_classes), "buffer": self.buffer.state_dict(),
                "class_means": None if self.class_means is None else self.class_means.clone(),
                "mean_classes": list(self.mean_classes), "old_model": old}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        for key, value in state["config"].items():
            if getattr(self, key) != value:
                raise ValueError(f"saved iCaRL state has {key}={value!r}, this plugin "
                                 f"{getattr(self, key)!r}")
        buf = state["buffer"]
        if buf["capacity"] != self.buffer.capacity:  # a grown memory (fixed_memory=False)
            self.buffer = ReplayBuffer(buf["capacity"], policy="reservoir", seed=0,
                                       x_dtype=self.x_dtype, x_range=self.x_range)
        self.buffer.load_state_dict(buf)
        self.n_experiences = int(state["n_experiences"])
        self.seen_classes = [int(c) for c in state["seen_classes"]]
        cm = state["class_means"]
        self.class_means = None if cm is None else cm.clone().float()
        self.mean_classes = [int(c) for c in state["mean_classes"]]
        self._means_dev = None
        self.old_model = None
        self._pending_old = (None if state["old_model"] is None
                             else {k: v.clone() for k, v in state["old_model"].items()})
        # the previous model is rebuilt from the strategy's model at the next training hook
