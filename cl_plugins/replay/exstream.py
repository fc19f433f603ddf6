"""ExStream: per-class buffers of cluster centroids over embeddings, built in one pass over the
stream, replayed into the layers above the embedding.

Name: ``exstream``. Scenarios: task-, domain- and class-IL (the paper: class-incremental and iid
streams). Task labels: not needed (buffers are kept per (task label, class label)).

Paper: T. L. Hayes, N. D. Cahill and C. Kanan, "Memory Efficient Experience Replay for
Streaming Learning", ICRA 2019 (arXiv:1809.05922). Code compared: tyler-hayes/ExStream
(``ExStream.py``, ``utils.py``, ``run_exstream_experiment.py``). Notes and measurements:
docs/methods/exstream.md. Mechanics: ``cl_plugins.core.cluster_buffer`` (the buffer, its merge
rule and its vectorisation) and ``cl_plugins.core.latent`` (the split at the embedding layer).

The model f = g o h is split at the module ``layer`` (the embedding e = h(x); g, the layers
above, is the paper's MLP trained on fixed features). Buffer of key k = (task, class): at most
``mem_per_class`` clusters (c, n). A new embedding e of key k:

    |C_k| < b:  C_k <- C_k + {(e, 1)}
    else:       (i, j) = argmin_{i<j} ||c_i - c_j||^2
                c_j <- (n_i c_i + n_j c_j) / (n_i + n_j),  n_j <- n_i + n_j,  (c_i, n_i) <- (e, 1)

Schedule. The paper's extractor is fixed (the code's CUB-200 run: ResNet-50 features,
``utils.load_cub200``); here the first experience is a
base initialisation (the whole model trains as the strategy does; ``freeze_after=1``), after
which h is frozen and in eval mode and the first experience's samples are streamed once, in a
random order, through h into the buffers. From then on, at each step on an incoming minibatch
(x, y, t) of size n:

    (c, y_c, t_c) <- every cluster of every buffer (or m of them, ``replay_mb_size``)
    loss = CE(g([h(x); c], [t; t_c]), [y; y_c])            (h frozen: only g learns)
    then h(x) joins the buffers, sample by sample (first epoch only: one pass)

The code (``ExStream.fit``) inserts each sample and then trains the MLP for one epoch over the
whole buffer in minibatches (``_consolidate_one_epoch``), the new sample entering as its own
cluster of count 1. Here one gradient step per incoming minibatch covers the whole buffer and
the new samples at once: the same rows as the code's epoch (the new samples are trained on
as themselves, as the singletons the code inserts), in one batch instead of
ceil(|buffer| / 100) batches; the merge the new samples cause applies from the next step. With
``train_mb_size=1`` the stream is processed sample by sample, as the paper. Counts weight the
merges only; training treats every centroid as one row (as the code).

Hooks (``core.latent.LatentReplayBase``): ``before_forward`` (appends the centroids' labels and
task labels, arms the hook that appends the centroids after the layer), ``after_forward``,
``after_training_iteration`` (insertion), ``after_training_exp`` (base initialisation fill).

Hyper-parameters:

- ``layer`` (default ``"backbone"``): the embedding layer (``model.named_modules()`` name).
- ``mem_per_class`` (int >= 2, default 16: the largest capacity of the code's CUB-200 runs,
  2/4/8/16 in ``utils.get_dataset_params``): clusters per class. Bytes (``nbytes``): per class
  ``mem_per_class x (d x 4 + 8)`` + 16 (float32 centroids, int64 counts, two int64 labels);
  ``core.cluster_buffer.capacity_for_bytes`` gives the capacity for an ER budget in bytes.
- ``replay_mb_size`` (int >= 1 or None, default None): centroids appended per step; None: all
  (the code's epoch over the buffer); m: m drawn without replacement (cheaper on big buffers).
- ``freeze_after`` (0 or 1, default 1): 0 freezes h from the start (a pretrained h, the
  paper's setting) and streams from the first experience.
- ``seed`` (int >= 0 or None): the plugin's generator (base-initialisation order, draws).

Deviations: the base initialisation (above; the paper uses a pretrained extractor); batch
updates instead of per-sample ones (above); Adam and the MLP are the user's (the code: Adam
lr 2e-3, BN, dropout 0.25); the code's "single buffer" variant (merge in the largest class) is
not modelled. A plugin appending input rows (ER) must be listed before this one (checked,
``core.latent``). Vectorised merge rule: ``core.cluster_buffer`` (the loop over a batch runs once per
sample of the most frequent class in it; all classes of a round merge at once).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from cl_plugins.core.checks import check_int
from cl_plugins.core.cluster_buffer import ClusterBuffer
from cl_plugins.core.latent import LatentReplayBase


class ExStreamPlugin(LatentReplayBase, supports_distributed=True):
    METHOD_NAME = "exstream"
    SCENARIOS = ("task", "domain", "class")
    NEEDS_TASK_LABELS = False
    SWEEP: dict = {"mem_per_class": {"values": [2, 4, 8, 16, 32]}}
    PAPER = ("Memory Efficient Experience Replay for Streaming Learning (Hayes, Cahill and "
             "Kanan, ICRA 2019)")
    SUMMARY = ("per-class buffers of embedding centroids (closest pair merged, count-weighted) "
               "replayed into the layers above the embedding; one pass over the stream")
    SETS_DATALOADER = False  # appends rows inside the forward pass
    SETTINGS = LatentReplayBase.SETTINGS + ("mem_per_class", "replay_mb_size")

    def __init__(self, layer: str = "backbone", mem_per_class: int = 16,
                 replay_mb_size: Optional[int] = None, freeze_after: int = 1,
                 seed: Optional[int] = None):
        super().__init__(layer, freeze_after, 0.0, seed)
        self.mem_per_class = check_int("mem_per_class", mem_per_class, 2)
        if replay_mb_size is not None:
            check_int("replay_mb_size", replay_mb_size, 1)
        self.replay_mb_size = replay_mb_size
        self.buffer = ClusterBuffer(self.mem_per_class)
        self._epoch = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the centroid buffers (every slot of every class seen)."""
        return self.buffer.nbytes

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        self._epoch = 0

    def after_training_epoch(self, strategy, **kwargs):
        self._epoch += 1

    def replay_rows(self, strategy):
        if not self.protecting or len(self.buffer) == 0:
            return None
        c, y, t, _ = self.buffer.contents()
        if self.replay_mb_size is not None and self.replay_mb_size < c.shape[0]:
            pick = torch.randperm(c.shape[0], generator=self.generator)[:self.replay_mb_size]
            c, y, t = c[pick], y[pick], t[pick]
        dev = strategy.device
        return c.to(dev), y.to(dev), t.to(dev)

    def observe(self, strategy, z, y, t):
        if self.protecting and self._epoch == 0:
            self.buffer.insert(z, y, t)

    def end_experience(self, strategy):
        if self.freeze_after == 1 and self.n_experiences == 1:  # base initialisation done
            ds = strategy.experience.dataset
            order = torch.randperm(len(ds), generator=self.generator)
            z, y, t = self.dataset_latents(strategy, ds, order)
            self.buffer.insert(z, y, t)

    def extra_state(self) -> Dict:
        return {"buffer": self.buffer.state_dict(), "epoch": self._epoch}

    def load_extra_state(self, state: Dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self._epoch = int(state["epoch"])
