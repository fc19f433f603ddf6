"""Feature Encoding Layer (FEL) of RGO: a parameter-free, task-specific permutation of features.

Paper: H. Liu, H. Liu, "Continual Learning with Recursive Gradient Optimization", ICLR 2022
(Sec. 4, "virtual Feature Encoding Layer"). Each task t sees the network through its own fixed
permutation of every hidden representation: neurons of a linear layer's output, channels of a
conv map (the same permutation at every spatial position). The layer has no parameter; it only
needs the task label, at training, evaluation and in RGO's statistics pass alike.

Rules (those of :mod:`cl_plugins.projection.rgo`):

- the permutation of task t is drawn by ``numpy.random.Generator.permutation(width)`` from a
  generator seeded by the pair (run seed, t) (``numpy.random.SeedSequence([seed, t])``), so it
  is deterministic per (seed, task) and independent of every other random stream;
- task 0 (the first task) uses the identity;
- within a task, every FEL of the same width uses the same permutation (the seed does not
  depend on the layer), as the reference code (one ``tf.random_shuffle(eye(n), seed=task)`` per
  width);
- applied along dimension 1 of ``[N, C]`` or ``[N, C, H, W]`` features; no effect on
  ``train()``/``eval()`` (identical outputs in both modes).

How the task label arrives: an FEL backbone (``FELMLP``, ``ResNet18NoBN``) takes
``forward(x, task_labels=None)`` and passes the labels to its encoding layers. Inside a
:class:`~cl_plugins.models.classifier.ClassifierNet`, whose forward calls the backbone without
labels, :meth:`FeatureEncodingLayer.route_task_labels` (installed by ``build_model``) adds a
forward pre-hook that hands the net's ``task_labels`` argument to the backbone for the duration
of the call (and clears it afterwards, also when the forward raises, so a later direct
``backbone(x)`` call without labels raises instead of silently reusing stale ones). Labels may
be an int (one task for the batch: one ``index_select``) or a tensor of per-sample labels (one
``index_select`` per distinct task in the batch; no loop over samples).

``enabled=False`` makes the layer the identity for every task ("RGO without FEL" is the same
network with identity encodings: same parameters, same initialisation).
"""

from __future__ import annotations

from typing import Dict, Tuple, Union

import numpy as np
import torch
from torch import nn

from cl_plugins.core.checks import check_bool, check_int

TaskLabels = Union[int, torch.Tensor, None]


class FeatureEncodingLayer(nn.Module):
    """Permute dimension 1 of the input by the permutation of its task (identity for task 0).

    Args:
        width: size of dimension 1 (features or channels).
        seed: the run seed; the permutation of task t depends on (seed, t) only.
        enabled: False makes the layer the identity for every task.
    """

    def __init__(self, width: int, seed: int = 0, enabled: bool = True):
        super().__init__()
        self.width = check_int("width", width, 1)
        self.seed = check_int("seed", seed, 0)
        self.enabled = check_bool("enabled", enabled)
        self._cache: Dict[Tuple[int, str], torch.Tensor] = {}

    # ------------------------------------------------------------------------ permutations
    @staticmethod
    def permutation_of(task: int, width: int, seed: int) -> torch.Tensor:
        """The permutation (LongTensor [width], CPU) of ``task``: identity for task 0."""
        task = int(task)
        if task < 0:
            raise ValueError(f"task labels must be >= 0; got {task}")
        if task == 0:
            return torch.arange(width)
        # numpy, not torch.randperm: a first use inside torch.func transforms (vmap over
        # per-sample gradients) must not call a torch random operation
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), task]))
        return torch.from_numpy(rng.permutation(width).astype(np.int64))

    def permutation(self, task: int, device=None) -> torch.Tensor:
        key = (int(task), str(device or "cpu"))
        perm = self._cache.get(key)
        if perm is None:
            perm = self.permutation_of(task, self.width, self.seed).to(device or "cpu")
            self._cache[key] = perm
        return perm

    # ----------------------------------------------------------------------------- forward
    @staticmethod
    def resolve(task_labels: TaskLabels) -> TaskLabels:
        """An int when the whole batch has one task (one host sync per forward), else the
        per-sample label tensor; ``None`` stays ``None``. Backbones call it once per forward."""
        if task_labels is None or isinstance(task_labels, int):
            return task_labels
        t = torch.as_tensor(task_labels)
        if t.dim() == 0:
            return int(t)
        uniq = torch.unique(t)
        return int(uniq[0]) if uniq.numel() == 1 else t

    def forward(self, x: torch.Tensor, task_labels: TaskLabels = None) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.dim() < 2 or x.shape[1] != self.width:
            raise ValueError(f"FeatureEncodingLayer(width={self.width}) got an input of shape "
                             f"{tuple(x.shape)}; dimension 1 must have {self.width} entries")
        if task_labels is None:
            raise ValueError("FeatureEncodingLayer needs the task labels: call the model as "
                             "model(x, task_labels) (a ClassifierNet built by build_model "
                             "routes them to its backbone), or backbone(x, task_labels)")
        labels = self.resolve(task_labels)
        if isinstance(labels, int):
            if labels == 0:
                return x
            return x.index_select(1, self.permutation(labels, x.device))
        labels = labels.to(x.device)
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"got {labels.shape[0]} task labels for a batch of {x.shape[0]}")
        out = x.clone()
        for task in torch.unique(labels).tolist():  # a loop over tasks, not samples
            sel = labels == task
            if task != 0:
                out[sel] = x[sel].index_select(1, self.permutation(task, x.device))
        return out

    def matrix(self, task: int) -> torch.Tensor:
        """The permutation as a [width, width] matrix M with ``fel(x) = x @ M`` (for [N, width])."""
        eye = torch.eye(self.width)
        return eye[:, self.permutation(task)]

    def extra_repr(self) -> str:
        return f"width={self.width}, seed={self.seed}, enabled={self.enabled}"

    # The seed is part of the model's state_dict (as a tensor, like every other entry), so a
    # restored model keeps its encodings.
    # ``enabled`` is structural (a constructor choice), not state.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.seed, dtype=torch.long)

    def set_extra_state(self, state) -> None:
        self.seed = int(torch.as_tensor(state))
        self._cache.clear()

    # ------------------------------------------------------------------- label routing
    @staticmethod
    def route_task_labels(net: nn.Module) -> nn.Module:
        """Make ``net(x, task_labels)`` hand ``task_labels`` to ``net.backbone`` for the call.

        For a ``ClassifierNet`` whose backbone has ``set_task_labels``; hooks are module-level
        functions that read ``module.backbone`` (no closure), so copies of ``net`` route to
        their own backbone. Returns ``net``.
        """
        if not hasattr(getattr(net, "backbone", None), "set_task_labels"):
            raise ValueError(f"route_task_labels needs a net whose backbone has set_task_labels;"
                             f" got {type(net).__name__}")
        net.register_forward_pre_hook(FeatureEncodingLayer._set_labels_hook, with_kwargs=True)
        # always_call: cleared even when the forward raises after the backbone ran (e.g. an
        # unseen task's head), so a later plain ``backbone(x)`` cannot reuse the labels
        net.register_forward_hook(FeatureEncodingLayer._clear_labels_hook, always_call=True)
        return net

    @staticmethod
    def _set_labels_hook(module, args, kwargs):
        labels = args[1] if len(args) > 1 else kwargs.get("task_labels")
        module.backbone.set_task_labels(labels)

    @staticmethod
    def _clear_labels_hook(module, args, output):
        module.backbone.set_task_labels(None)
