"""Latent replay: stored activations of a middle layer are replayed into the layers above it,
whose lower part is frozen (or slowed) after the first experience.

Name: ``latent_replay``. Scenarios: task-, domain- and class-IL. Task labels: not needed (stored
with every activation, so a multi-head ``ClassifierNet`` routes replayed rows to their heads).

Paper: L. Pellegrini, G. Graffieti, V. Lomonaco and D. Maltoni, "Latent Replay for Real-Time
Continual Learning", IROS 2020 (arXiv:1912.01100). Code compared: Avalanche 0.6's ``AR1``
(``avalanche/training/supervised/ar1.py``; its ``MobilenetV1.forward`` in
``avalanche/models/mobilenetv1.py`` concatenates ``latent_input`` after the lower layers) and
vlomonaco/ar1-pytorch ``ar1star_lat_replay.py`` (the authors' PyTorch AR1*). Notes and
measurements: docs/methods/latent_replay.md. Mechanics: ``cl_plugins.core.latent``.

The model f = g o h is split at the module ``layer`` (h: that module and every module that ran
before it; g: the rest). After the i-th experience, with RM the memory of stored (h(x), y, t):

    h_i  = min(|RM| // i, n_i)                               (|RM|: the capacity; AR1's h)
    RM  <- RM minus h_i random entries, plus h(x) of h_i random samples of experience i
    step on incoming (x, y, t) of size n, from experience 2 on:
        (z_m, y_m, t_m) <- the next m entries of RM (a random order, renewed when used up)
        loss = CE(g([h(x); z_m], [t; t_m]), [y; y_m])      (mean over the n + m rows)
    h: frozen from experience 2 on (lower_lr_scale = 0), or its step scaled by lower_lr_scale

Hooks (``core.latent.LatentReplayBase``): ``before_forward`` (first step: finds h by one traced
forward of two samples; freezes it when due; appends y_m, t_m to ``strategy.mbatch`` and arms
the layer's hook, which returns cat([h(x); z_m]): rows 0..n-1 stay the stream),
``after_forward``, ``before_update``/``after_update`` (the scaled step), ``after_training_exp``
(memory update).

Hyper-parameters (defaults: the paper's and AR1's where they apply):

- ``layer`` (default ``"backbone"``): the latent layer, a ``model.named_modules()`` name; the
  ClassifierNet's backbone output (the head alone is above it) or an inner layer such as
  ``"backbone.layers.1"``.
- ``mem_size`` (int >= 1, default 1500: ``rm_sz`` of ar1-pytorch ``params.cfg`` for CORe50
  NICv2-391 and of Avalanche's ``AR1``) or ``mem_bytes`` (int >= 1;
  then ``mem_size=None``): the memory in stored activations or in bytes. One slot costs the
  activation (``prod(shape) x itemsize``) + 16 bytes of int64 label and task label, counted as
  ER's ``ReplayBuffer.nbytes``; with ``mem_bytes`` the capacity is
  ``mem_bytes // slot_bytes``. ``nbytes`` is the memory allocated. An 8x8 digit costs ER 272
  bytes; a 32-unit backbone output 144: at ER's bytes latent replay stores 1.9x the samples.
- ``latent_dtype`` (None = float32 as computed, or ``"float16"``, ...): storage dtype.
- ``replay_mb_size`` (int >= 1 or None, default None): m. None: ceil(B |RM| / N) for the
  strategy's ``train_mb_size`` B and the experience's N samples, so an epoch passes once over
  RM (AR1's proportion of replayed rows). Our composition, not the authors': they keep a step
  at B rows, round(B N / (N + R)) incoming and the rest replayed (Caffe
  ``inc_training_Core50.py``; ar1-pytorch and Avalanche's AR1: N // ((N + R) // B) incoming),
  R = |RM|. Here the incoming minibatch stays B: a step has about B (1 + R / N) rows and an
  epoch N / B steps instead of (N + R) / B (CORe50 NICv2-391, N ~ 300, R = 1500, B = 128: 128 +
  640 rows and 3 steps an epoch here, 21 + 107 rows and 14 steps there).
- ``lower_lr_scale`` (float in [0, 1], default 0): 0 freezes h (Avalanche's AR1 from the
  second experience; ar1-pytorch from the start); > 0 multiplies h's optimizer step, hence its
  learning rate (``core.latent``), by it: the paper's "slow-down" of the layers below.
- ``freeze_after`` (0 or 1, default 1): experiences before h is protected; 0: from the start
  (a pretrained h, as ar1-pytorch's ImageNet MobileNet).
- ``seed`` (int >= 0 or None): the plugin's generator (memory draws, replay order); in the state.

Choices and deviations:

- Batch norm below the layer: the paper replaces BN by batch renormalisation (BRN) everywhere.
  Here h runs in eval mode once protected (running statistics and dropout fixed), as
  ar1-pytorch (``model.lat_features.eval()``, every batch); no BRN. Before (experience 1), h's
  BN trains as usual, whereas Avalanche's AR1 holds the lower part in eval mode in every
  experience, the first included (``self.model.eval()`` before training ``end_features`` /
  ``output``). The Caffe code does not freeze the BRN statistics below the layer.
- Stored activations are h's at the experience's end, computed in eval mode on the chosen
  samples (``dataset.eval()``), with h frozen afterwards exactly what h gives later (one forward
  of h_i samples). The paper's Caffe code also recomputes experience 1's activations after
  training (an extra forward), and keeps the first epoch's training forwards for later batches;
  Avalanche's AR1 keeps the first epoch's forwards always (for experience 1 from an h still
  being trained).
- Memory placement: AR1 fills RM with experience 1 and then replaces h_i random entries;
  when experience 1 has fewer samples than the capacity, free slots are filled first here.
- Replay order: AR1 slices RM in a fixed order each epoch; here a random permutation of RM is
  consumed m rows per step and renewed when used up (each entry once per pass).
- Rows appended after the layer: other plugins that read ``strategy.mb_x`` see n rows while
  ``mb_y`` and ``mb_output`` have n + m. A plugin that appends input rows in ``before_forward``
  (ER) must be listed before this one (labels and rows stay aligned); listed after, it is
  refused at the first step (``core.latent``).
- CWR* and the SI-style regulariser of AR1* are not part of this plugin (the AR1 plugin adds
  them over ``core.latent``).
"""

from __future__ import annotations

from typing import Dict, Optional

from cl_plugins.core.checks import check_int
from cl_plugins.core.latent import LatentMemory, LatentReplayBase, ReplayOrder, replay_share


class LatentReplayPlugin(LatentReplayBase, supports_distributed=True):
    METHOD_NAME = "latent_replay"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"mem_size": {"values": [200, 500, 1500]},
                   "lower_lr_scale": {"values": [0.0, 0.01, 0.1]},
                   "replay_mb_size": {"values": [16, 32, 64, 128]}}
    PAPER = ("Latent Replay for Real-Time Continual Learning (Pellegrini, Graffieti, Lomonaco "
             "and Maltoni, IROS 2020)")
    SUMMARY = ("stored activations of a middle layer are appended to each minibatch there; the "
               "layers below are frozen (or slowed) after the first experience")
    SETS_DATALOADER = False  # appends rows inside the forward pass
    SETTINGS = LatentReplayBase.SETTINGS + ("mem_size", "mem_bytes", "latent_dtype",
                                            "replay_mb_size")

    def __init__(self, layer: str = "backbone", mem_size: Optional[int] = 1500,
                 mem_bytes: Optional[int] = None, replay_mb_size: Optional[int] = None,
                 lower_lr_scale: float = 0.0, freeze_after: int = 1,
                 latent_dtype: Optional[str] = None, seed: Optional[int] = None):
        super().__init__(layer, freeze_after, lower_lr_scale, seed)
        if replay_mb_size is not None:
            check_int("replay_mb_size", replay_mb_size, 1)
        self.memory = LatentMemory(mem_size, mem_bytes, latent_dtype, self.seed)
        self.mem_size, self.mem_bytes = mem_size, mem_bytes
        self.latent_dtype, self.replay_mb_size = latent_dtype, replay_mb_size
        self.order = ReplayOrder()
        self._m = 0  # replayed rows per step in this experience

    @property
    def nbytes(self) -> int:
        """Bytes of the latent memory (every slot allocated, as ER's buffer)."""
        return self.memory.nbytes

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        size = len(self.memory)
        self._m = (min(self.replay_mb_size, size) if self.replay_mb_size is not None
                   else replay_share(strategy.train_mb_size, size,
                                     len(strategy.experience.dataset)))

    def replay_rows(self, strategy):
        if self._m == 0 or not self.protecting:
            return None
        slots = self.order.next(self._m, len(self.memory), self.generator)
        b = self.memory.buffer.get(slots, strategy.device)
        return b.x, b.y, b.t

    def end_experience(self, strategy):
        self.store_experience(strategy, self.memory)
        self.order.reset()

    def extra_state(self) -> Dict:
        return {"memory": self.memory.state_dict(), "queue": self.order.queue.clone(),
                "m": self._m}

    def load_extra_state(self, state: Dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.order.queue, self._m = state["queue"].clone(), int(state["m"])
