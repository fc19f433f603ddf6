"""Shuffled minibatches for a training loop a plugin runs itself, outside the template's.

Some methods train a second model or a second phase inside a hook (Progress & Compress distils
its active column into the knowledge base in ``after_training_exp``). ``shuffled_minibatches``
gives such a loop its data: each pass over the dataset is a fresh permutation drawn from the
plugin's own ``torch.Generator`` (the global random stream is not touched), cut into minibatches
of ``batch_size`` (the last one of a pass may be smaller, as a template's loader), and the loop
runs either ``epochs`` whole passes or exactly ``updates`` minibatches, cycling over the data
(reshuffled at every pass) as often as needed.

How samples are read: a ``TensorDataset``, or an Avalanche dataset whose samples are the same
each time they are read (no input transform in its current group) and that fits in 2 GiB, is
read once into tensors (``core.tensor_batches``, on ``device``) and every minibatch is an index
into them, with no per-sample Python work; any other dataset (random augmentation) is read
through a ``DataLoader`` with the same index batches, its transforms applied afresh each time.
Either way the same permutations pick the same samples.

``optimizer_like`` builds the loop's optimizer (the strategy optimizer's class and settings over
other parameters, optionally another learning rate) and ``minimise`` runs it: one update per
minibatch, raising ``DivergenceError`` at the first non-finite loss.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from cl_plugins.core.checks import check_int
from cl_plugins.core.divergence import DivergenceError
from cl_plugins.core.tensor_batches import fixed_samples, read_all


def dataset_tensors(dataset, max_bytes: int = 2 << 30) -> Optional[List[torch.Tensor]]:
    """Every sample of ``dataset``, one tensor per field, when its samples never change and
    fit in ``max_bytes``; else None. (Through ``core.tensor_batches.read_all``, which reads one
    sample first: Avalanche builds a dataset's target lookups on its first read.)"""
    if isinstance(dataset, TensorDataset):
        return list(dataset.tensors)
    if not fixed_samples(dataset):
        return None
    from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader

    return read_all(SingleDatasetDataLoader(dataset, batch_size=1), max_bytes)


def _index_batches(n: int, batch_size: int, generator: torch.Generator, updates, epochs):
    done = passes = 0
    while (done < updates) if updates is not None else (passes < epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if updates is not None and done == updates:
                return
            yield perm[start:start + batch_size]
            done += 1
        passes += 1


def shuffled_minibatches(dataset, batch_size: int, generator: torch.Generator, *,
                         updates: Optional[int] = None, epochs: Optional[int] = None,
                         device=None) -> Iterator[List[torch.Tensor]]:
    """Minibatches of ``dataset`` (lists of tensors, one per field, on ``device``): ``epochs``
    passes or exactly ``updates`` minibatches (give one of the two), as the module docstring
    describes."""
    if (updates is None) == (epochs is None):
        raise ValueError("shuffled_minibatches needs exactly one of updates, epochs")
    check_int("batch_size", batch_size, 1)
    check_int("updates" if updates is not None else "epochs",
              updates if updates is not None else epochs, 0)
    n = len(dataset)
    if (updates if updates is not None else epochs) == 0:
        return
    if n == 0:
        raise ValueError("shuffled_minibatches: the dataset is empty; there is nothing to train on")
    batches = _index_batches(n, batch_size, generator, updates, epochs)
    rows = dataset_tensors(dataset)
    if rows is not None:
        rows = [r.to(device) if device is not None else r for r in rows]
        for idx in batches:
            yield [r[idx.to(r.device)] for r in rows]
        return
    loader = DataLoader(dataset, batch_sampler=[idx.tolist() for idx in batches],
                        collate_fn=getattr(dataset, "collate_fn", None),
                        generator=torch.Generator())  # its unused worker seed: not global
    for batch in loader:
        yield [f.to(device) if device is not None and torch.is_tensor(f) else f for f in batch]


def optimizer_like(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                   lr: Optional[float] = None) -> torch.optim.Optimizer:
    """A fresh optimizer of ``optimizer``'s class and default settings over ``params``, with
    learning rate ``lr`` when given (its own state starts empty)."""
    settings = dict(optimizer.defaults)
    if lr is not None:
        settings["lr"] = lr
    return type(optimizer)(params, **settings)


def minimise(loss_fn: Callable[[List[torch.Tensor]], torch.Tensor], batches: Iterable,
             optimizer: torch.optim.Optimizer, who: str) -> int:
    """One ``optimizer`` update of ``loss_fn(batch)`` per minibatch of ``batches``; the number of
    updates. A non-finite loss raises DivergenceError, its message starting with ``who``."""
    done = 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        if not math.isfinite(loss.item()):
            raise DivergenceError(f"{who}: non-finite loss ({loss.item()}) at update {done}")
        loss.backward()
        optimizer.step()
        done += 1
    return done
