"""Maximally Interfered Retrieval (ER-MIR): replay the memory samples the next step would hurt most.

Name: ``mir``. Scenarios: task-, domain- and class-IL. Task labels: not needed (stored with every
sample, so task-IL multi-head models route replayed samples to their own head).

Paper: R. Aljundi, L. Caccia, E. Belilovsky, M. Caccia, M. Lin, L. Charlin, T. Tuytelaars,
"Online Continual Learning with Maximally Interfered Retrieval", NeurIPS 2019 (Algorithm 1,
ER-MIR); official code optimass/Maximally_Interfered_Retrieval (``mir.py``,
``retrieve_replay_update``; ``Scripts/ER_experiments.sh``).

Algorithm, at every training step with incoming minibatch B = (x, y, t) of size n and learning
rate alpha (each parameter's own optimizer group lr, read at that step):

    theta_v = theta - alpha * grad_theta CE(f_theta(x, t), y)             (virtual SGD step)
    C       <- ``subsample`` samples drawn uniformly without replacement from memory M
               (not from the current experience, see ``exclude_current_experience``)
    s(c)    = CE(f_theta_v(x_c), y_c) - CE(f_theta(x_c), y_c)           for every c in C
    B_M     <- the ``mem_mb_size`` candidates with the largest s (top-k)
    loss    = CE(f([x; x_M], [t; t_M]), [y; y_M])                       (mean over n + k)
    theta  <- optimizer step on loss
    M      <- reservoir(M, B)

The retrieved samples join the minibatch exactly as in ER (``cl_plugins.replay.er``): rows
0..n-1 of ``strategy.mbatch`` stay the stream, k rows are appended in ``before_forward``, so the
strategy's own criterion covers them and other plugins' loss terms compose.

Implementation: the virtual step never copies the model. One forward/backward of the incoming
batch gives g = dCE/dtheta (``torch.autograd.grad``, the ``.grad`` fields are not touched); the
virtual parameters theta - alpha g are passed to the *same* module through
``torch.func.functional_call``. The two candidate forwards (theta and theta_v) run under
``no_grad`` in eval mode. Buffers (BatchNorm running statistics) are passed as clones to the
virtual-gradient forward, so the extra forward leaves them untouched.

Hooks: ``before_training_exp`` (MIR reads the incoming minibatches as the stream, so it refuses
a plugin that replaces the dataloader: ``require_stream_batches``), ``before_training_iteration``
(records the incoming minibatch before any plugin extends it), ``before_forward`` (retrieval,
rows appended), ``after_training_iteration`` (reservoir update with the incoming samples, after
the optimizer step, as the official code). ``strategy.dataloader`` is never touched.

Hyper-parameters (defaults = the official Split MNIST script: ``--mem_size 50`` per class x 10
classes, ``--subsample 50``, ``--buffer_batch_size 10``; with SGD lr 0.1, batch 10, one epoch,
1,000 samples per task, set in the config):

- ``mem_size`` (int >= 1, default 500): memory slots (the script also runs 20 and 100 per class).
- ``subsample`` (int >= 1, default 50): candidates C scored per step.
- ``mem_mb_size`` (int >= 1, default 10): retrieved samples k per step (<= ``subsample``).
- ``exclude_current_experience`` (bool, default True): candidates come only from earlier
  experiences (the official ``buffer.sample(..., exclude_task=task)``; with no earlier sample,
  as during the first experience, the step trains on B alone, like the official
  ``rehearse=task > 0``). False draws from the whole memory (the paper's Algorithm 1 text).
- ``policy`` (default ``"reservoir"``, the paper's): memory policy, see ``cl_plugins.core.buffer``.
- ``seed`` (int >= 0 or None, default None): the memory's generator (reservoir draws and
  candidate draws); None follows torch's global RNG at construction. Part of ``state_dict()``.
- ``x_dtype``, ``x_range`` (default None): input storage of the memory (e.g. 1-byte pixel
  levels), see ``cl_plugins.core.buffer``.

Choices and deviations:

- Loss on B u B_M: the paper's Algorithm 1 updates on the union (one mean over n + k samples,
  used here). The official code instead sums two means, CE(B) + CE(B_M): with n = k = 10 its
  replay gradient is twice ours at the same lr (set the lr accordingly to match it).
- Scores are computed in eval mode (dropout off, BatchNorm on running statistics), so that
  s(c) is a property of c alone; the official code scores in train mode. Identical for models
  without dropout or BatchNorm (every MLP of the MNIST protocols).
- The virtual step uses the gradient of the incoming batch's cross-entropy only, with plain SGD
  (theta - alpha g), as the paper and the official code: not the optimizer's own update
  (momentum, Adam) and not other plugins' loss terms.
- The official MNIST runs use ``--compare_to_old_logits`` (a variant scoring against
  min(current loss, loss of the logits stored at insertion)); not implemented: the paper's
  ER-MIR criterion is s(c) above.
- ``exclude_current_experience`` follows the experience index (stored per memory slot), not the
  task label: in class- and domain-IL every task label is 0. In an online stream (Avalanche's
  sub-experiences) the index is the origin experience's.
- Cost per step: one extra forward/backward of B, two forwards of the C candidates, and
  training on n + k samples; with C = 5n the scoring alone is ~4x the FLOPs of a naive step, so
  MIR cannot meet the 1.3x step-time target (measured step times: ``docs/methods/mir.md``).
- Augmentation as ER: a ``BatchAugmentPlugin`` placed before MIR has already run when MIR's
  ``before_forward`` runs, so MIR augments its retrieved rows itself with the same settings;
  the virtual step uses the incoming batch as recorded (unaugmented).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from torch import nn
from torch.func import functional_call

from cl_plugins.core.buffer import ReplayBuffer
from cl_plugins.core.checks import check_bool, check_int
from cl_plugins.core.replay_loader import (append_rows, augmenter_before,
                                           require_stream_batches, stream_minibatch)
from cl_plugins.core.state import check_owner, owned_by


def _forward(model: nn.Module, params, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``model(x, t)`` (``model(x)`` for a model without task labels), with ``params`` (a
    name -> tensor dict, possibly partial) in place of the module's own tensors."""
    args = (x, t) if isinstance(model, MultiTaskModule) else (x,)
    return functional_call(model, params, args) if params else model(*args)


def _set_modes(model: nn.Module, modes) -> None:
    for m, training in zip(model.modules(), modes):
        m.training = training


def interference_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                        cand_x: torch.Tensor, cand_y: torch.Tensor, cand_t: torch.Tensor,
                        lrs: Dict[str, float]) -> torch.Tensor:
    """s(c) = CE(f_{theta_v}(x_c), y_c) - CE(f_theta(x_c), y_c) for every candidate c, with
    theta_v = theta - lr * grad CE(f_theta(x, t), y) (``lrs``: parameter name -> lr; parameters
    not listed are not updated). The model's parameters, buffers and ``.grad`` are unchanged."""
    # virtual-step gradient, in the model's current (training) mode; cloned buffers absorb any
    # running-statistics update of this extra forward
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and n in lrs}
    loss = F.cross_entropy(_forward(model, buffers, x, t), y)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    virtual = {n: p.detach() - lrs[n] * g for (n, p), g in zip(params.items(), grads)
               if g is not None}  # theta_v (Algorithm 1)
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            pre = F.cross_entropy(_forward(model, None, cand_x, cand_t), cand_y, reduction="none")
            post = F.cross_entropy(_forward(model, virtual, cand_x, cand_t), cand_y,
                                   reduction="none")
    finally:
        _set_modes(model, modes)
    return post - pre  # s(c)


def parameter_lrs(model: nn.Module, optimizer) -> Dict[str, float]:
    """Each optimised parameter's current learning rate (its param group's), by name."""
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


class MIRPlugin(SupervisedPlugin):
    METHOD_NAME = "mir"
    # why torch.distributed runs refuse it (docs/distributed.md)
    distributed_note = ("its candidates are scored by a virtual step on this rank's rows only")
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"mem_size": {"values": [200, 500, 1000]},
                   "subsample": {"values": [25, 50, 100, 200]},
                   "mem_mb_size": {"values": [10, 32, 128]}}
    PAPER = "ER-MIR (Aljundi et al., NeurIPS 2019)"
    SUMMARY = ("each minibatch is concatenated with the memory samples whose loss a virtual SGD "
               "step on it would increase most (top-k of a random subsample); reservoir memory")
    SETS_DATALOADER = False  # extends the minibatch in before_forward instead

    def __init__(self, mem_size: int = 500, subsample: int = 50, mem_mb_size: int = 10,
                 exclude_current_experience: bool = True, policy: str = "reservoir",
                 seed: Optional[int] = None, x_dtype: Optional[str] = None, x_range=None):
        super().__init__()
        self.mem_size = check_int("mem_size", mem_size, 1)
        self.subsample = check_int("subsample", subsample, 1)
        self.mem_mb_size = check_int("mem_mb_size", mem_mb_size, 1, subsample)
        self.exclude_current_experience = check_bool("exclude_current_experience",
                                                     exclude_current_experience)
        self.buffer = ReplayBuffer(mem_size, policy=policy, seed=seed, x_dtype=x_dtype,
                                   x_range=x_range)  # checks policy, seed, x_dtype, x_range
        self.policy = policy
        self.slot_experience = torch.full((mem_size,), -1, dtype=torch.long)  # per memory slot
        self._experience = 0
        self._incoming = None
        self._augment = None
        self.last_retrieved: Optional[torch.Tensor] = None  # buffer slots replayed this step

    # ----------------------------------------------------------------------------- retrieval

    def candidates(self, device):
        """Up to ``subsample`` random memory samples (earlier experiences only, if asked);
        None when there is none."""
        n = len(self.buffer)
        if n == 0:
            return None
        if self.exclude_current_experience:
            eligible = (self.slot_experience[:n] != self._experience).nonzero().squeeze(1)
        else:
            eligible = torch.arange(n)
        if eligible.numel() == 0:
            return None
        pick = torch.randperm(eligible.numel(), generator=self.buffer.generator)[:self.subsample]
        return self.buffer.get(eligible[pick], device)

    def retrieve(self, model, optimizer, x, y, t, device) -> Optional[Tuple]:
        """(x_M, y_M, t_M, slots) of the ``mem_mb_size`` most interfered candidates."""
        cand = self.candidates(device)
        if cand is None:
            return None
        if cand.y.numel() <= self.mem_mb_size:  # every candidate is retrieved: no scoring
            return cand.x, cand.y, cand.t, cand.index
        scores = interference_scores(model, x, y, t, cand.x, cand.y, cand.t,
                                     parameter_lrs(model, optimizer))
        top = torch.topk(scores, self.mem_mb_size).indices  # B_M
        top_cpu = top.cpu()
        return cand.x[top], cand.y[top], cand.t[top], cand.index[top_cpu]

    # ------------------------------------------------------------------------------- hooks

    def before_training_exp(self, strategy, **kwargs):
        require_stream_batches(strategy, self)
        self._augment = augmenter_before(strategy, self)
        exp = getattr(strategy.experience, "origin_experience", None) or strategy.experience
        self._experience = int(exp.current_experience)

    def before_training_iteration(self, strategy, **kwargs):
        self._incoming = stream_minibatch(self, strategy.mbatch)

    def before_forward(self, strategy, **kwargs):
        self.last_retrieved = None
        x, y, t = self._incoming
        got = self.retrieve(strategy.model, strategy.optimizer, x, y, t, strategy.device)
        if got is None:
            return
        xm, ym, tm, slots = got
        if self._augment is not None:
            xm = self._augment.augment(xm)
        append_rows(strategy.mbatch, xm, ym, tm)
        self.last_retrieved = slots

    def after_training_iteration(self, strategy, **kwargs):
        x, y, t = self._incoming
        slots = self.buffer.add(x, y, t)
        self.slot_experience[slots[slots >= 0]] = self._experience
        self._incoming = None

    # ------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {**owned_by(self), "buffer": self.buffer.state_dict(),
                "slot_experience": self.slot_experience.clone()}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        self.buffer.load_state_dict(state["buffer"])
        self.slot_experience = state["slot_experience"].clone()
