"""The template's own minibatches, sliced from tensors instead of gathered sample by sample.

Avalanche's loaders fetch every sample through ``AvalancheDataset.__getitem__`` (six nested
levels of index mapping, transform groups and data attributes, then a collate): on split MNIST
about 30 us a sample, as much as the MLP's step (issue 21: 290,000 calls, 8 of the 23 s of an S1
run). ``TensorBatchesPlugin`` keeps what decides *which* samples form a minibatch and changes
only *how* they are fetched:

- **when**: ``before_training_exp`` / ``before_eval_exp``, after the template made its loader and
  after the other plugins' hooks, so a plugin that replaced the loader keeps its own;
- **which loaders**: Avalanche's ``MultiDatasetDataLoader`` family (``TaskBalancedDataLoader``,
  ``SingleDatasetDataLoader``: what ``SupervisedTemplate`` makes), with no worker processes;
- **which data**: leaves that are ``TensorDataset``s or this package's benchmark datasets, with no
  input transform in the tree (target-only class-id lookups, as Avalanche's scenarios add, are
  fine), so every sample reads the same each time;
- **how**: the rows are gathered once per loader, straight from the leaf tensors (subset indices,
  concatenations and target lookups applied as Avalanche applies them per sample; any other leaf
  is read through the loader's own path once, under ``fork_rng``). Each epoch runs Avalanche's
  own batch sampler (``MultiDatasetSampler`` over the loader's samplers) after drawing the one
  number a torch ``DataLoader`` iterator draws (its worker base seed), and yields
  ``[field[idx] for field in fields]``: the minibatches, the global random stream and so the
  whole run are bit-identical to Avalanche's path (tests/core/test_tensor_batches.py);
- **memory**: data over ``max_bytes`` (2 GiB) keeps the per-sample path. Evaluation rows are kept
  per test experience within the same budget, unless something adapts the evaluation data.

The runner adds it to single-process runs (``strategy.tensor_batches``, default true); under
torch.distributed ``DataParallelPlugin`` owns the loader.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from avalanche.core import SupervisedPlugin

from cl_plugins.core.transform_groups import fixed_transform, group_transform

_LEAF_MODULES = ("cl_plugins.benchmarks",)


def _fixed_node(node, group) -> bool:
    if not hasattr(node, "_datasets"):  # a leaf (FFCV marks its leaves with ffcv_info)
        return ((isinstance(node, torch.utils.data.TensorDataset)
                 or type(node).__module__.startswith(_LEAF_MODULES))
                and not hasattr(node, "ffcv_info"))
    for groups in (node._frozen_transform_groups, node._transform_groups):
        if not fixed_transform(group_transform(groups, group)):
            return False
    return all(_fixed_node(child, group) for child in node._datasets)


def fixed_samples(dataset) -> bool:
    """Whether every sample of this AvalancheDataset is the same each time it is read."""
    from avalanche.benchmarks.utils.data import AvalancheDataset

    return (isinstance(dataset, AvalancheDataset)
            and type(dataset).__getitem__ is AvalancheDataset.__getitem__
            and _fixed_node(dataset._flat_data, _group(dataset)))


def _group(dataset) -> str:
    return dataset._flat_data._transform_groups.current_group


def _sample_leaf(node, idx):
    if isinstance(node, torch.utils.data.TensorDataset):
        return [t[idx] for t in node.tensors]
    rows = getattr(node, "rows", None)  # this package's benchmark datasets
    return list(rows(idx)) if rows is not None else None


def _value_leaf(node, idx):
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    if isinstance(node, ConstantSequence):
        return [torch.full((len(idx),), node._constant_value)]
    try:
        return [torch.as_tensor(node if torch.is_tensor(node) else list(node))[idx]]
    except (TypeError, ValueError, RuntimeError):
        return None


def _gather(node, idx: torch.Tensor, group, leaf) -> Optional[List[torch.Tensor]]:
    """Fields of items ``idx`` of a FlatData tree node as Avalanche's per-item path builds them
    (subset indices, concatenation, then the frozen and the current target lookups); ``leaf``
    reads a leaf's rows (None: it cannot, and neither can this)."""
    if not hasattr(node, "_datasets"):
        return leaf(node, idx)
    if node._indices is not None:
        idx = torch.as_tensor(node._indices, dtype=torch.long)[idx]
    if len(node._datasets) == 1:
        fields = _gather(node._datasets[0], idx, group, leaf)
    else:
        ends = torch.as_tensor(node._cumulative_sizes, dtype=torch.long)
        which = torch.searchsorted(ends, idx, right=True)
        fields = None
        for k in torch.unique(which).tolist():
            mask = which == k
            part = _gather(node._datasets[k], idx[mask] - (ends[k - 1] if k else 0), group, leaf)
            if part is None:
                return None
            if fields is None:
                fields = [p.new_empty((len(idx),) + p.shape[1:]) for p in part]
            for f, p in zip(fields, part):
                f[mask] = p
    if fields is None:
        return None
    for name in ("_frozen_transform_groups", "_transform_groups"):
        tr = group_transform(getattr(node, name, None), group)
        for k, p in enumerate(tr.transforms[1:] if tr is not None else (), start=1):
            if p is not None:  # partial(lookup, table): y -> table[y]
                fields[k] = torch.as_tensor(p.args[0])[fields[k]]
    return fields


def dataset_rows(dataset) -> Optional[List[torch.Tensor]]:
    """Every sample of a fixed-sample AvalancheDataset, one tensor per field, with the data
    attributes that ``__getitem__`` appends (task labels); None if some part has no row reader."""
    idx = torch.arange(len(dataset))
    fields = _gather(dataset._flat_data, idx, _group(dataset), _sample_leaf)
    for attr in dataset._data_attributes.values():
        if fields is not None and attr.use_in_getitem:
            values = _gather(attr.data, idx, None, _value_leaf)
            fields = fields + values if values is not None else None
    return fields


def eligible(loader) -> bool:
    from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader

    return (isinstance(loader, MultiDatasetDataLoader)
            and not loader.loader_kwargs.get("num_workers")
            and all(fixed_samples(d) for d in loader.datasets))


def read_all(loader, max_bytes: int) -> Optional[List[torch.Tensor]]:
    """Every sample of the loader's datasets, in order, one tensor per batch field; None when
    they would take more than ``max_bytes`` or a field is not a tensor. Rows are gathered
    straight from the leaf tensors where possible, else read through the loader's own path."""
    n = sum(len(d) for d in loader.datasets)
    if n == 0:
        return None
    with torch.random.fork_rng(devices=[]):
        first = next(iter(loader._make_pytorch_loader(loader.datasets, [[0]])))
        if not isinstance(first, (list, tuple)) or not all(torch.is_tensor(f) for f in first):
            return None
        if sum(f.element_size() * f.numel() for f in first) * n > max_bytes:
            return None
        parts = [dataset_rows(d) for d in loader.datasets]
        if any(p is None or len(p) != len(first) for p in parts):
            chunks = [list(range(i, min(i + 4096, n))) for i in range(0, n, 4096)]
            parts = list(loader._make_pytorch_loader(loader.datasets, chunks))
    fields = [torch.cat([p[k] for p in parts]) for k in range(len(first))]
    return [f.to(dtype=g.dtype) for f, g in zip(fields, first)]


class TensorLoader:
    """Iterates like ``loader`` (same sampler, same random draws), slicing ``fields``."""

    def __init__(self, loader, fields: List[torch.Tensor]):
        self.loader, self.fields = loader, fields

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self):
        from avalanche.benchmarks.utils.data_loader import MultiDatasetSampler

        lo = self.loader
        samplers = lo._create_samplers(lo.datasets, lo.batch_sizes, lo.distributed_sampling,
                                       lo.loader_kwargs)
        batches = iter(MultiDatasetSampler(
            lo.datasets, samplers, termination_dataset_idx=lo.termination_dataset,
            oversample_small_datasets=lo.oversample_small_datasets, never_ending=lo.never_ending))
        torch.empty((), dtype=torch.int64).random_()  # a DataLoader iterator's base seed
        for idx in batches:
            idx = torch.as_tensor(idx, dtype=torch.long)
            yield [f[idx] for f in self.fields]


class TensorBatchesPlugin(SupervisedPlugin, supports_distributed=False):
    """Serves the template's training and evaluation minibatches from tensors (module doc).

    :param max_bytes: the most memory one loader's tensors may take (and the evaluation cache
        in all); larger data keeps Avalanche's per-sample path.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        super().__init__()
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a whole number of bytes >= 0; got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._eval: Dict[int, Any] = {}  # id(experience.dataset) -> (dataset, length, fields)
        self._eval_bytes = 0

    def before_training_exp(self, strategy, **kwargs):
        fields = read_all(strategy.dataloader, self.max_bytes) \
            if eligible(strategy.dataloader) else None
        if fields is not None:
            strategy.dataloader = TensorLoader(strategy.dataloader, fields)

    def before_eval_exp(self, strategy, **kwargs):
        loader, data = strategy.dataloader, strategy.experience.dataset
        if not eligible(loader):
            return
        n, cacheable = sum(len(d) for d in loader.datasets), not _adapts_eval_data(strategy)
        cached = self._eval.get(id(data))
        fields = cached[2] if cacheable and cached and cached[0] is data and cached[1] == n \
            else read_all(loader, self.max_bytes)
        if fields is None:
            return
        size = sum(f.element_size() * f.numel() for f in fields)
        if cacheable and cached is None and self._eval_bytes + size <= self.max_bytes:
            self._eval[id(data)] = (data, n, fields)
            self._eval_bytes += size
        strategy.dataloader = TensorLoader(loader, fields)

    def state_dict(self) -> Dict[str, Any]:
        return {}  # a cache only: rebuilt from the data after a resume

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def _adapts_eval_data(strategy) -> bool:
    """A plugin or template that changes the evaluation dataset: no caching across calls."""
    from avalanche.training.templates import SupervisedTemplate

    if type(strategy).eval_dataset_adaptation is not SupervisedTemplate.eval_dataset_adaptation:
        return True
    base = SupervisedPlugin
    return any(getattr(type(p), h, None) is not getattr(base, h, None)
               for p in strategy.plugins
               for h in ("before_eval_dataset_adaptation", "after_eval_dataset_adaptation"))
