"""Dark Experience Replay: DER and DER++ (logit replay from a reservoir memory), online.

Name: ``der``. Scenarios: task-, domain- and class-IL. Task labels: not needed (stored with every
sample for multi-head models).

Paper: P. Buzzega, M. Boschini, A. Porrello, D. Abati, S. Calderara, "Dark Experience for General
Continual Learning: a Strong, Simple Baseline", NeurIPS 2020 (code: Mammoth, ``models/der.py``,
``models/derpp.py``).

Equations (Eqs. 4 and 6 of the paper, with the expectations over the memory M estimated by
minibatches drawn uniformly from it), at every step with incoming minibatch (x, y):

    DER:   loss = CE(f(x), y) + alpha * MSE(f(x'), z')
    DER++: loss = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

where (x', z') and (x'', y'') are two *independent* minibatches of ``replay_mb_size`` samples
from M, z' the logits stored with x' when it was inserted, MSE the mean over all samples and
outputs (``F.mse_loss``), CE the mean cross-entropy. beta = 0 is DER. After the optimizer step,
M is updated with (x, y, f(x)) by reservoir sampling, f(x) being the logits the step computed
(before the update; Mammoth stores ``outputs.data``). The logits are never refreshed.

Hooks: ``before_training_exp`` (dataloader-ownership check, see
``cl_plugins.core.replay_loader``; DER never touches ``strategy.dataloader``; forward hook on a
masked head, see below; removed at ``after_training_exp``), ``before_training_iteration``
(records the incoming minibatch before any plugin extends it), ``after_forward`` (keeps the
step's logits), ``before_backward`` (``strategy.loss += alpha * MSE + beta * CE``: the
strategy's loss is kept, so other plugins' terms compose), ``after_training_iteration``
(memory update with the logits of rows 0..n-1 of the step's output: rows beyond n, appended by
another replay plugin such as ER, are not stream samples and are not stored).

Hyper-parameters (defaults = protocol R1's buffer-500 DER++ row: lr 0.2, alpha 0.5, beta 1; its
DER 500 row is alpha 0.5 with beta 0; ``experiments/configs/buzzega2020_der_rotated_mnist.yaml``):

- ``mem_size`` (int >= 1, default 500). R1 also uses 200 (DER++: alpha 1, beta 0.5, lr 0.1;
  DER: alpha 1.0, lr 0.2). The memory policy is always reservoir, as in the paper.
- ``alpha`` (>= 0, default 0.5): weight of the logit-matching term.
- ``beta`` (>= 0, default 1.0): weight of the replayed cross-entropy; 0 gives DER.
- ``replay_mb_size`` (int >= 1 or None = ``train_mb_size``, default None): the size of each of
  the two memory minibatches (Mammoth's ``minibatch_size``, equal to ``batch_size`` in its
  Rotated/Permuted MNIST and Split CIFAR-10 configurations).
- ``seed`` (int >= 0 or None, default None): the memory's generator seed; None draws it from
  torch's global RNG at construction (it follows the run seed). Part of ``state_dict()``.
- ``x_dtype``, ``x_range`` (default None): input storage of the memory (e.g. 1-byte pixel
  levels), see ``cl_plugins.core.buffer``.

Choices and deviations:

- One forward pass over [x'; x''] instead of Mammoth's two (the same outputs for models without
  batch statistics, e.g. the MLPs of R1; a model with BatchNorm sees one batch of 2m replayed
  samples instead of two batches of m in training mode).
- Masked heads (class-IL ``MaskedHead``, unseen classes' logits set to -1e4): DER stores and
  matches the head's *unmasked* logits (the output of ``head.linear``, read with a forward hook
  during the training forward pass and during DER's own memory forward pass), so every class's
  logit is a network output, as with Mammoth's heads, which are never masked: the logits of
  classes not yet seen when a sample was stored are pulled toward their values at that time,
  which is what keeps old samples from drifting into new classes in class-IL. Matching the
  masked logits instead would leave those entries unconstrained (or compare against -1e4). The
  DER++ cross-entropy uses the model's (masked) output, as the task loss does.
- Augmentation: Mammoth augments the replayed inputs. When the strategy has a
  ``BatchAugmentPlugin``, DER applies the same random crop/flip to the memory minibatches.
- Inputs are stored as float32 by default (see ``cl_plugins.core.buffer`` for the bytes); the
  logits as float32 (10 classes: 40 more bytes per sample).
- Cost: DER adds a forward/backward pass over m replayed samples, DER++ over 2m, so with
  m = ``train_mb_size`` a step costs about 2x / 3x naive's, as in Mammoth (measured:
  ``docs/methods/der.md``). A smaller ``replay_mb_size`` is cheaper.
- When one training step is repeated over several epochs, each pass offers the samples to the
  reservoir again (as Mammoth's multi-epoch settings do); R1 trains a single epoch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward

from cl_plugins.core.augment import BatchAugmentPlugin
from cl_plugins.core.buffer import ReplayBatch, ReplayBuffer
from cl_plugins.core.checks import check_int, check_non_negative
from cl_plugins.core.data_parallel import gather_stream, rank_share, share_weight
from cl_plugins.core.replay_loader import require_stream_batches, stream_minibatch
from cl_plugins.core.state import check_owner, owned_by
from cl_plugins.models.heads import MaskedHead


def unmasked_logits_layer(model) -> Optional[torch.nn.Module]:
    """The layer whose output is the head's logits before masking, for masked heads."""
    head = getattr(model, "head", None)
    return head.linear if isinstance(head, MaskedHead) else None


class DERPlugin(SupervisedPlugin, supports_distributed=True):
    METHOD_NAME = "der"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"alpha": {"values": [0.1, 0.2, 0.5, 1.0]},
                   "beta": {"values": [0.0, 0.5, 1.0]},
                   "mem_size": {"values": [200, 500, 5120]}}
    PAPER = "DER / DER++ (Buzzega et al., NeurIPS 2020)"
    SUMMARY = ("reservoir memory of inputs, labels and logits; loss += alpha MSE on replayed "
               "logits (+ beta CE on replayed labels for DER++)")
    SETS_DATALOADER = False  # replays through extra forward passes in before_backward

    def __init__(self, mem_size: int = 500, alpha: float = 0.5, beta: float = 1.0,
                 replay_mb_size: Optional[int] = None, seed: Optional[int] = None,
                 x_dtype: Optional[str] = None, x_range=None):
        super().__init__()
        check_int("mem_size", mem_size, 1)
        self.alpha = check_non_negative("alpha", alpha)
        self.beta = check_non_negative("beta", beta)
        if replay_mb_size is not None:
            check_int("replay_mb_size", replay_mb_size, 1)
        self.mem_size, self.replay_mb_size = mem_size, replay_mb_size
        self.buffer = ReplayBuffer(mem_size, policy="reservoir", seed=seed, x_dtype=x_dtype,
                                   x_range=x_range)  # checks seed, x_dtype, x_range
        self._incoming = None
        self._augment = None
        self._hook = None  # forward hook on a masked head's linear layer
        self._capturing = False
        self._raw = None  # unmasked logits captured by the hook
        self._step_logits = None  # logits of the current step's training forward pass

    def _capture(self, module, inputs, output):
        if self._capturing:
            self._raw = output

    def _logits(self, output: torch.Tensor) -> torch.Tensor:
        """The logits to match: the unmasked ones when the head masks."""
        return output if self._hook is None else self._raw

    def before_training_exp(self, strategy, **kwargs):
        require_stream_batches(strategy, self)
        self._augment = next((p for p in strategy.plugins if isinstance(p, BatchAugmentPlugin)),
                             None)
        layer = unmasked_logits_layer(strategy.model)
        if layer is not None:
            self._hook = layer.register_forward_hook(self._capture)

    def after_training_exp(self, strategy, **kwargs):
        if self._hook is not None:  # the model may be replaced before the next experience
            self._hook.remove()
        self._hook, self._raw, self._step_logits, self._capturing = None, None, None, False

    def before_training_iteration(self, strategy, **kwargs):
        self._incoming = stream_minibatch(self, strategy.mbatch)
        self._capturing = True  # the training forward pass: keep the unmasked logits

    def after_forward(self, strategy, **kwargs):
        self._capturing = False
        # the logits to store after the step (the last capture is the training forward pass)
        self._step_logits = (strategy.mb_output if self._hook is None else self._raw).detach()
        self._raw = None

    def before_backward(self, strategy, **kwargs):
        if self.buffer.is_empty or (self.alpha == 0 and self.beta == 0):
            return
        m = self.replay_mb_size or strategy.train_mb_size
        parts = []
        def draw():  # the same draw on every rank; each replays its share (torch.distributed)
            return ReplayBatch(*rank_share(*self.buffer.sample(m, device=strategy.device)))

        if self.alpha > 0:
            parts.append(draw())
        if self.beta > 0:
            parts.append(draw())
        x = torch.cat([p.x for p in parts])
        if self._augment is not None:
            x = self._augment.augment(x)
        self._capturing = True
        out = avalanche_forward(strategy.model, x, torch.cat([p.t for p in parts]))
        self._capturing = False
        sizes = [p.x.shape[0] for p in parts]
        share = share_weight(strategy, sizes[0], m)  # 1 in one process
        if self.alpha > 0:
            z = self._logits(out).split(sizes)[0]
            strategy.loss += self.alpha * share * F.mse_loss(z, parts[0].logits)  # Eq. 4
        if self.beta > 0:
            strategy.loss += self.beta * share * F.cross_entropy(out.split(sizes)[-1],
                                                                 parts[-1].y)  # Eq. 6
        self._raw = None

    def after_training_iteration(self, strategy, **kwargs):
        x, y, t = self._incoming
        x, y, t, z = gather_stream(strategy, x, y, t, self._step_logits[:x.shape[0]])
        self.buffer.add(x, y, t, logits=z)
        self._incoming, self._step_logits = None, None

    def state_dict(self) -> dict:
        return {**owned_by(self), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_owner(self, state)
        self.buffer.load_state_dict(state["buffer"])
