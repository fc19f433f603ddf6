"""Who owns the training dataloader: one plugin per strategy, or a clear error.

Replay methods feed old samples into training in one of two ways:

1. **They replace the training data** in ``before_training_exp`` (or
   ``after_train_dataset_adaptation``): ``strategy.dataloader = ReplayDataLoader(...)``
   (Avalanche's ``ReplayPlugin``, ``BiCPlugin``, ``RARPlugin``, ``CoPEPlugin``,
   ``GSS_greedyPlugin``) or ``strategy.adapted_dataset = memory`` (``GDumbPlugin``). Only one
   plugin can do that: the last one would silently win. Such a plugin declares the class
   attribute ``SETS_DATALOADER = True`` and calls :func:`claim_dataloader` at that hook, which
   raises a ``ValueError`` naming both plugins when another claimant is in the strategy.

2. **They extend each incoming minibatch** (ER and DER as in the DER paper / Mammoth): the
   dataloader is left alone; a buffer batch is appended to ``strategy.mbatch`` in
   ``before_forward`` (ER) or passed through the model separately in ``before_backward`` (DER),
   and the buffer is updated with the incoming minibatch after each step. Such plugins treat the
   incoming minibatch as the data stream, so they must not run next to a plugin of kind 1 (its
   minibatches already mix in memory samples, which would be stored again as new stream samples):
   they call :func:`require_stream_batches` in ``before_training_exp``. Several plugins of kind 2
   compose, provided each (a) records the stream part of the minibatch in
   ``before_training_iteration`` (before any plugin appended to it) and (b) only *appends* rows,
   so that row i < n of ``strategy.mbatch`` / ``strategy.mb_output`` is still stream sample i.

Avalanche's own dataloader-replacing plugins are recognised by class (``KNOWN_AVALANCHE_OWNERS``),
so mixing them with ours fails just as clearly.

Helpers for plugins of kind 2: :func:`stream_minibatch` (the (x, y, task label) minibatch to
record in ``before_training_iteration``, checked by :func:`check_minibatch`), :func:`append_rows`
(rule (b) above) and :func:`augmenter_before` (a ``BatchAugmentPlugin`` that has already run when
the plugin's ``before_forward`` runs, so the plugin must augment the rows it appends itself).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

KNOWN_AVALANCHE_OWNERS = ("ReplayPlugin", "BiCPlugin", "RARPlugin", "CoPEPlugin",
                          "GSS_greedyPlugin", "GDumbPlugin")


def _avalanche_owner(plugin) -> bool:
    for cls in type(plugin).__mro__:
        if cls.__name__ in KNOWN_AVALANCHE_OWNERS and cls.__module__.startswith("avalanche."):
            return True
    return False


def sets_dataloader(plugin) -> bool:
    """Whether ``plugin`` replaces the strategy's training dataloader or dataset."""
    marker = getattr(plugin, "SETS_DATALOADER", None)
    if marker is not None:
        return bool(marker)
    return _avalanche_owner(plugin)


def describe(plugin) -> str:
    name = getattr(plugin, "METHOD_NAME", None)
    cls = type(plugin).__name__
    return f"{cls} ({name!r})" if name else cls


def dataloader_owners(strategy) -> List[object]:
    """Every plugin of ``strategy`` that replaces the training dataloader or dataset."""
    return [p for p in getattr(strategy, "plugins", []) if sets_dataloader(p)]


def claim_dataloader(strategy, plugin) -> None:
    """Call before setting ``strategy.dataloader`` (or ``adapted_dataset``): raises a
    ValueError naming both plugins when another plugin of the strategy also sets it."""
    others = [p for p in dataloader_owners(strategy) if p is not plugin]
    if others:
        names = " and ".join(describe(p) for p in [plugin] + others)
        raise ValueError(
            f"Two plugins want to set the training dataloader: {names}. Only one plugin per "
            "strategy may replace strategy.dataloader / strategy.adapted_dataset (the last one "
            "would silently override the others); remove all but one of them.")


def require_stream_batches(strategy, plugin) -> None:
    """For plugins that store or extend the incoming minibatches (ER, DER): raises a
    ValueError naming both plugins when another plugin replaces the training dataloader, since
    its minibatches would not be the data stream."""
    owners = [p for p in dataloader_owners(strategy) if p is not plugin]
    if owners:
        raise ValueError(
            f"{describe(plugin)} extends and stores the incoming training minibatches as the "
            f"data stream, but {describe(owners[0])} replaces the training dataloader (its "
            "minibatches already mix in replayed samples, which would be stored again as new "
            f"stream samples): use {describe(plugin)} or {describe(owners[0])}, not both.")


def check_minibatch(plugin: str, mbatch) -> None:
    """Replay plugins extend (x, y, task label) minibatches; say so when they are not."""
    if len(mbatch) != 3:
        raise ValueError(f"{plugin} expects training minibatches (x, y, task_label); got "
                         f"{len(mbatch)} fields")


def stream_minibatch(plugin, mbatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, t) of a training minibatch, to record as the stream part in
    ``before_training_iteration``, before any plugin appends rows; ValueError (naming
    ``plugin``'s class) unless the minibatch has exactly these three fields."""
    check_minibatch(type(plugin).__name__, mbatch)
    x, y, t = mbatch
    return x, y, t


def append_rows(mbatch, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
    """Append replayed samples to ``strategy.mbatch`` in place (its rows stay first)."""
    mbatch[0] = torch.cat([mbatch[0], x])
    mbatch[1] = torch.cat([mbatch[1], y])
    mbatch[2] = torch.cat([mbatch[2], t])


def augmenter_before(strategy, plugin):
    """The first ``BatchAugmentPlugin`` listed before ``plugin`` in the strategy, if any (its
    ``before_forward`` runs before ``plugin``'s)."""
    from cl_plugins.core.augment import BatchAugmentPlugin

    for p in strategy.plugins:
        if p is plugin:
            return None
        if isinstance(p, BatchAugmentPlugin):
            return p
    return None
