"""ExStream: per-class buffers of cluster centroids over embeddings, built in one pass over the
stream; the layers above the embedding are trained on the buffers.

Name: ``exstream``. Scenarios: task-, domain- and class-IL (the paper: class-incremental and iid
streams). Task labels: not needed (buffers are kept per (task label, class label)).

Paper: T. L. Hayes, N. D. Cahill and C. Kanan, "Memory Efficient Experience Replay for
Streaming Learning", ICRA 2019 (arXiv:1809.05922). Code compared: tyler-hayes/ExStream
(``ExStream.py``, ``utils.py``, ``run_exstream_experiment.py``). Notes and measurements:
docs/methods/exstream.md. Mechanics: ``core.cluster_buffer`` (the buffer, its merge rule, its
vectorisation), ``core.latent`` (the split at the embedding layer), ``core.buffer_pass``.

The model f = g o h is split at the module ``layer`` (the embedding e = h(x); g, the layers
above, is the paper's MLP trained on fixed features). Buffer of key k = (task, class): at most
``mem_per_class`` clusters (c, n). A new embedding e of key k:

    |C_k| < b:  C_k <- C_k + {(e, 1)}
    else:       (i, j) = argmin_{i<j} ||c_i - c_j||^2
                c_j <- (n_i c_i + n_j c_j) / (n_i + n_j),  n_j <- n_i + n_j,  (c_i, n_i) <- (e, 1)

Schedule. The paper's extractor is fixed (the code's CUB-200 run: ResNet-50 features); here the
first experience is a base initialisation (the whole model trains as the strategy does, or for
``base_iterations`` steps; ``freeze_after=1``), after which h is frozen and in eval mode and the
first experience's samples are streamed once, in a random order, through h into the buffers.
From then on, for each incoming minibatch (x, y, t) of n rows (``training="buffer_epoch"``):

    h(x) joins the buffers, sample by sample in stream order (first epoch only: one pass)
    B_1..B_K <- every cluster of every buffer, shuffled (the plugin's generator), K = ceil(|C|/m)
                minibatches of m = min(buffer_batch_size, |C|) rows (the last: the last m rows)
    for k = 1..K:  one optimizer step on CE(g(c_{B_k}), y_{B_k})          (h frozen: g learns)

Step 1 is the strategy's own step (h's output on x replaced by B_1's centroids, the labels by
theirs); steps 2..K run in ``after_training_iteration`` with the strategy's optimizer and
criterion (``core.buffer_pass``). Difference from the code (``ExStream.fit``), which inserts ONE
sample and then trains one epoch over the buffer (``_consolidate_one_epoch``): here one epoch per
n = ``train_mb_size`` samples, n times fewer steps (H1: ~20 per incoming batch of 128 at 1,960
clusters, where the code's rule takes ~2,500; ~2x10^5 steps a task), and the merges a
minibatch causes are trained on once it is absorbed; ``train_mb_size=1`` is the code's schedule.
Counts weight the merges only; every centroid is one training row (as the code). Other plugins'
hooks see step 1 only; the runner's ``steps_per_exp`` and ``train_iterations`` count incoming
minibatches, ``steps`` this experience's optimizer steps. A non-finite loss in steps 2..K raises
``DivergenceError`` (one check a pass). ``training="joint_step"``, the earlier rule (kept for
comparison): one step per incoming minibatch on [h(x); every centroid] (or ``replay_mb_size``
of them), the minibatch inserted after the step.

Hooks (``core.latent.LatentReplayBase``): ``before_training_exp`` (base budget),
``before_forward`` (insertion, the pass, step 1's rows), ``after_forward``,
``after_training_iteration`` (steps 2..K), ``after_training_exp`` (base initialisation fill).

Hyper-parameters:

- ``layer`` (default ``"backbone"``): the embedding layer (``model.named_modules()`` name).
- ``mem_per_class`` (int >= 2, default 16: the largest capacity of the code's CUB-200 runs,
  2/4/8/16 in ``utils.get_dataset_params``): clusters per class. Bytes (``nbytes``): per class
  ``mem_per_class x (d x 4 + 8)`` + 16 (float32 centroids, int64 counts, two int64 labels);
  ``core.cluster_buffer.capacity_for_bytes`` gives the capacity for an ER budget in bytes.
- ``buffer_batch_size`` (int >= 1, default 100: ``batch_size`` of ``utils.get_mlp_params``).
- ``training`` (``"buffer_epoch"``, default, or ``"joint_step"``): above.
- ``replay_mb_size`` (int >= 1 or None, default None = all; ``joint_step`` only): centroids
  appended per step, drawn without replacement.
- ``base_iterations`` (int >= 1 or None, default None = the strategy's budget): optimizer steps
  of the base initialisation (e.g. another method's budget for the same phase), whatever
  ``train_epochs``; refused with ``freeze_after=0`` or an iteration budget in the strategy.
- ``freeze_after`` (0 or 1, default 1): 0 freezes h from the start (a pretrained h, the
  paper's setting) and streams from the first experience.
- ``seed`` (int >= 0 or None): the plugin's generator (fill order, pass orders, draws).

Deviations: the base initialisation (above; the paper uses a pretrained extractor); minibatch
instead of per-sample consolidation (above); Adam and the MLP are the user's (the code: Adam
lr 2e-3, BN, dropout 0.25); the code's "single buffer" variant (merge in the largest class) is
not modelled. ``buffer_epoch`` replaces the step's rows: a plugin that appends input rows (ER)
is refused; with ``joint_step`` it must be listed before this one (``core.latent``). Under
torch.distributed every rank runs the whole of each buffer minibatch (``core.buffer_pass``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from cl_plugins.core.buffer_pass import OutputSwap, pass_batches, upper_step
from cl_plugins.core.checks import check_choice, check_int
from cl_plugins.core.cluster_buffer import ClusterBuffer
from cl_plugins.core.data_parallel import gather_stream
from cl_plugins.core.divergence import DivergenceError
from cl_plugins.core.iterations import IterationBudgetPlugin
from cl_plugins.core.latent import LatentReplayBase

TRAININGS = ("buffer_epoch", "joint_step")


class ExStreamPlugin(LatentReplayBase, supports_distributed=True):
    METHOD_NAME = "exstream"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"mem_per_class": {"values": [2, 4, 8, 16, 32]}}
    PAPER = ("Memory Efficient Experience Replay for Streaming Learning (Hayes, Cahill and "
             "Kanan, ICRA 2019)")
    SUMMARY = ("per-class buffers of embedding centroids (closest pair merged, count-weighted); "
               "after each incoming minibatch the layers above the embedding train one pass "
               "over the buffers; one pass over the stream")
    SETS_DATALOADER = False  # its rows enter inside the forward pass
    SETTINGS = LatentReplayBase.SETTINGS + ("mem_per_class", "buffer_batch_size", "training",
                                            "replay_mb_size", "base_iterations")

    def __init__(self, layer: str = "backbone", mem_per_class: int = 16,
                 buffer_batch_size: int = 100, training: str = "buffer_epoch",
                 replay_mb_size: Optional[int] = None, base_iterations: Optional[int] = None,
                 freeze_after: int = 1, seed: Optional[int] = None):
        super().__init__(layer, freeze_after, 0.0, seed)
        self.mem_per_class = check_int("mem_per_class", mem_per_class, 2)
        self.buffer_batch_size = check_int("buffer_batch_size", buffer_batch_size, 1)
        self.training = check_choice("training", training, TRAININGS)
        if replay_mb_size is not None:
            check_int("replay_mb_size", replay_mb_size, 1)
            if training != "joint_step":
                raise ValueError(f"replay_mb_size applies to training='joint_step' only; got "
                                 f"replay_mb_size={replay_mb_size!r} with training={training!r} "
                                 "(each buffer pass covers every cluster)")
        if base_iterations is not None:
            check_int("base_iterations", base_iterations, 1)
            if freeze_after == 0:
                raise ValueError(f"base_iterations={base_iterations!r} sets the base "
                                 "initialisation's budget, which freeze_after=0 skips; set "
                                 "base_iterations=None or freeze_after=1")
        self.replay_mb_size, self.base_iterations = replay_mb_size, base_iterations
        self.buffer = ClusterBuffer(self.mem_per_class)
        self.swap: Optional[OutputSwap] = None
        self.steps, self._epoch = 0, 0  # optimizer steps, epochs in the current experience
        self._batches: List[torch.Tensor] = []  # the current pass's minibatches (rows)
        self._rows = None  # the buffer's (centroids, labels, task labels) for that pass
        self._base_left, self._saved_epochs = None, None  # base initialisation: steps left

    @property
    def nbytes(self) -> int:
        """Bytes of the centroid buffers (every slot of every class seen)."""
        return self.buffer.nbytes

    def attach(self, model) -> None:
        split = self.split
        super().attach(model)
        if self.swap is None or self.split is not split:  # after the split's own hook
            if self.swap is not None:
                self.swap.remove()
            self.swap = OutputSwap(self.split.module)

    # ------------------------------------------------------------------ hooks
    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        self._epoch, self.steps, self._base_left = 0, 0, None
        if self.base_iterations is not None and not self.protecting:
            budget = [type(p).__name__ for p in strategy.plugins
                      if isinstance(p, IterationBudgetPlugin)]
            if budget:
                raise ValueError(f"{self.who}(base_iterations={self.base_iterations}) sets the "
                                 f"base initialisation's steps, but {budget[0]} (strategy."
                                 "train_iterations) also sets them; unset one")
            self._saved_epochs = strategy.train_epochs
            strategy.train_epochs = math.ceil(self.base_iterations /
                                              max(1, len(strategy.dataloader)))
            self._base_left = self.base_iterations

    def after_training_epoch(self, strategy, **kwargs):
        self._epoch += 1

    def before_forward(self, strategy, **kwargs):
        super().before_forward(strategy, **kwargs)
        if self.training == "buffer_epoch" and self.protecting:
            self._start_pass(strategy)

    def after_forward(self, strategy, **kwargs):
        super().after_forward(strategy, **kwargs)
        self.swap.rows = None

    def after_training_iteration(self, strategy, **kwargs):
        super().after_training_iteration(strategy, **kwargs)  # joint_step: insertion
        self.steps += 1
        if self._batches:
            self._finish_pass(strategy)
        if self._base_left is not None:
            self._base_left -= 1
            if self._base_left <= 0:
                strategy.stop_training()

    def after_training_exp(self, strategy, **kwargs):
        if self._saved_epochs is not None:
            strategy.train_epochs, self._saved_epochs = self._saved_epochs, None
        super().after_training_exp(strategy, **kwargs)

    # ------------------------------------------------------------------ the buffer pass
    def _start_pass(self, strategy) -> None:
        """Absorb the incoming rows, draw the pass's order, set step 1's rows and labels."""
        mb, n = strategy.mbatch, self._n
        if mb[0].shape[0] != n or mb[1].shape[0] != n:
            raise ValueError(f"{self.who}(training='buffer_epoch') trains on buffer rows "
                             f"alone, but a plugin listed before it appended rows ({n} "
                             f"incoming, now {mb[0].shape[0]} inputs, {mb[1].shape[0]} labels);"
                             " use training='joint_step' to compose with it")
        z = self.split.latents(strategy.model, mb[0], mb[-1])  # eval mode, as h runs now
        if self._epoch == 0:  # one pass over the stream
            self.buffer.insert(*gather_stream(strategy, z, mb[1].detach(), mb[-1].detach()))
        self._rows = tuple(v.to(strategy.device) for v in self.buffer.contents()[:3])
        self._batches = pass_batches(len(self._rows[0]), self.buffer_batch_size, self.generator)
        first = self._batches[0].to(strategy.device)
        mb[1] = self._rows[1][first].to(mb[1].dtype)
        mb[-1] = self._rows[2][first].to(mb[-1].dtype)
        self.swap.rows = self._rows[0][first]

    def _finish_pass(self, strategy) -> None:
        """Steps 2..K of the pass (``core.buffer_pass.upper_step``)."""
        (c, y, t), rest, x = self._rows, self._batches[1:], strategy.mb_x[:1]
        self._batches, self._rows = [], None
        losses = [upper_step(strategy, self.swap, x, c[i], y[i], t[i])
                  for i in (b.to(c.device) for b in rest)]
        self.steps += len(rest)
        if losses and not math.isfinite(float(torch.stack(losses).sum())):
            raise DivergenceError(f"{self.who}: non-finite loss in the buffer pass ending at "
                                  f"optimizer step {self.steps} of this experience; lower the "
                                  "learning rate")

    # ------------------------------------------------------------------ joint_step
    def replay_rows(self, strategy):
        if self.training != "joint_step" or not self.protecting or len(self.buffer) == 0:
            return None
        c, y, t, _ = self.buffer.contents()
        if self.replay_mb_size is not None and self.replay_mb_size < c.shape[0]:
            pick = torch.randperm(c.shape[0], generator=self.generator)[:self.replay_mb_size]
            c, y, t = c[pick], y[pick], t[pick]
        return tuple(v.to(strategy.device) for v in (c, y, t))

    def observe(self, strategy, z, y, t):
        if self.training == "joint_step" and self.protecting and self._epoch == 0:
            self.buffer.insert(z, y, t)

    # ------------------------------------------------------------------ experience end, state
    def end_experience(self, strategy):
        if self.freeze_after == 1 and self.n_experiences == 1:  # base initialisation done
            ds = strategy.experience.dataset
            order = torch.randperm(len(ds), generator=self.generator)
            self.buffer.insert(*self.dataset_latents(strategy, ds, order))

    def extra_state(self) -> Dict:
        return {"buffer": self.buffer.state_dict(), "epoch": self._epoch}

    def load_extra_state(self, state: Dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self._epoch = int(state["epoch"])
