"""Data-parallel training over ``torch.distributed`` ranks, as one Avalanche plugin.

A run on N ranks with per-rank batch B *is* the one-process run with batch N*B, each minibatch's
forward and backward split over the ranks:

- every rank builds the same, unsharded training loader at the global batch N*B (the
  template's own loader, ``distributed_sampling=False``) from the same generator state, so all
  ranks draw the same permutation, the one a single process would draw; rank r keeps its
  contiguous block of rows of each minibatch (``shard_range``: sizes differ by at most one);
- after the backward pass each rank scales its gradients (the model's and those of any plugin's
  own optimizer, ``own_optimizer``) by n_r / n (the rows its mean loss
  averages over all ranks' rows, replayed rows a plugin appended included) and one all-reduce
  sums them: the gradient of the mean loss over the whole minibatch, which a penalty identical on
  every rank keeps exactly (sum_r n_r / n = 1);
- parameters, optimizer state and plugin generators therefore stay identical on every rank;
  the plugin checks this before each experience and each evaluation (a parameter checksum,
  after every plugin's end-of-experience work) and raises when a plugin broke it;
- evaluation: every rank evaluates the whole test stream (unsharded), so every rank's accuracy
  matrix is the full one and rank 0 writes it;
- a non-finite loss on any rank is seen by all in the same all-reduce: each rank's loss is made
  NaN, so every rank's ``DivergenceGuard`` stops the run at the same step.

Why not ``DistributedHelper.wrap_model`` (DistributedDataParallel)? The wrapper hides the
model's own attributes (heads, backbone, columns) that Avalanche's ``avalanche_forward`` and our
plugins read, and must be rebuilt whenever a dynamic module grows; the arithmetic above is
DDP's (an all-reduce of gradients before the step), applied to the model itself. Differences
from one process at batch N*B: float summation order; BatchNorm sees each rank's rows only (as
under DDP without SyncBatchNorm); dropout and augmentation draw per rank. Cost: the loader
collates the whole global minibatch on every rank (N times the loading work of sharded
sampling), the price of drawing exactly the one-process permutation.

Hooks: ``before_training_exp`` (the loader), ``before_training_epoch`` (generator sync, a
check that no later plugin replaced the loader), ``after_backward`` (the all-reduce),
``before_eval_exp`` (unsharded evaluation), ``before_eval`` and ``before_training_exp`` (the
checksum). It must be
the first plugin of the strategy: others read the averaged gradients in their hooks.
"""

from __future__ import annotations

import math

import torch
from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader, TaskBalancedDataLoader
from avalanche.core import SupervisedPlugin

from cl_plugins.core import distributed as dist


def gather_stream(strategy, *tensors):
    """The whole stream minibatch's rows of ``tensors`` (each this rank's rows, first dim), in
    the minibatch's order: every rank's share gathered (a weight-0 duplicate row left out). In
    one process: ``tensors`` unchanged. For plugins that keep data seen in training (replay
    buffers), so every rank stores what one process would."""
    if not dist.is_distributed():
        return tensors
    real = _plugin_of(strategy).current_rows()
    return tuple(dist.gather_rows(t[:real]) for t in tensors)


def rank_share(*tensors):
    """This rank's contiguous share of rows that every rank holds identically (e.g. a replay
    minibatch drawn with the same generator on every rank); ``None`` entries stay ``None``; in
    one process, unchanged."""
    if not dist.is_distributed():
        return tensors
    start, stop = dist.shard_range(len(next(t for t in tensors if t is not None)))
    return tuple(None if t is None else t[start:stop] for t in tensors)


def share_weight(strategy, part: int, whole: int) -> float:
    """The factor for a loss term that is a mean over this rank's ``part`` rows of ``whole``
    rows shared out over the ranks (``rank_share``) and kept apart from the criterion's mean
    (DER's replay terms): with it, the ranks' gradients sum to the whole term's, whatever the
    stream rows' split. 1.0 in one process. Costs one small all-reduce per step when used."""
    if not dist.is_distributed():
        return 1.0
    plugin = _plugin_of(strategy)
    mine = plugin.rows_in_loss(strategy)
    return 0.0 if mine == 0 else (part / whole) * plugin.total_rows(strategy) / mine


def trained_parameters(strategy) -> list:
    """The model's parameters and those of every plugin's own optimizer (``own_optimizer``:
    PNN's adapters, HAT's task embeddings, ...), each once."""
    seen, out = set(), []
    groups = [list(strategy.model.parameters())] + [
        [p for g in opt.param_groups for p in g["params"]]
        for opt in (getattr(pl, "own_optimizer", None) for pl in strategy.plugins)
        if opt is not None]
    for group in groups:
        for p in group:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def use_loader(strategy, loader):
    """Set ``strategy.dataloader`` to ``loader`` (a plugin that trains on its own data, as
    GDumb on its memory). Under torch.distributed ``loader`` must be built identically on
    every rank at the global batch ``strategy.train_mb_size``: each rank then gets its rows of
    every minibatch, as with the template's loader."""
    if dist.is_distributed():
        plugin = _plugin_of(strategy)
        loader = plugin._loader = _RankRows(loader)
    strategy.dataloader = loader


def _plugin_of(strategy) -> "DataParallelPlugin":
    plugin = next((p for p in strategy.plugins if isinstance(p, DataParallelPlugin)), None)
    if plugin is None:
        raise RuntimeError("under torch.distributed the strategy needs DataParallelPlugin "
                           "(first in its plugins)")
    return plugin


class _RankRows:
    """Iterate ``loader`` and yield this rank's rows of each minibatch. ``real`` is the number
    of those rows that are this rank's share (0 when the minibatch has fewer rows than ranks and
    this rank computes one duplicate row, weighted 0)."""

    def __init__(self, loader):
        self.loader = loader
        self.real = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            start, stop = dist.shard_range(len(batch[0]))
            self.real = stop - start
            if stop == start:
                start, stop = 0, 1
            yield [t[start:stop] if torch.is_tensor(t) and t.dim() > 0 else t for t in batch]


class DataParallelPlugin(SupervisedPlugin, supports_distributed=True):
    """Split each global minibatch over the ranks and average the gradients (module docstring).

    In a single process it does nothing. The runner adds it, first, whenever ``cl-run`` runs
    under ``torchrun``; in your own script, start the process group, give the strategy
    ``train_mb_size`` = N * (rows per rank) and put this plugin first.
    """

    def __init__(self):
        super().__init__()
        self._loader = None
        self._total = None  # (training iteration, rows over all ranks)

    def before_training_exp(self, strategy, **kwargs):
        if not dist.is_distributed():
            return
        self._check_same_parameters(strategy)
        args = strategy._obtain_common_dataloader_parameters(  # the template's own arguments
            batch_size=strategy.train_mb_size, num_workers=0, shuffle=True, pin_memory=None,
            persistent_workers=False, drop_last=False)
        loader = TaskBalancedDataLoader(strategy.adapted_dataset, oversample_small_groups=True,
                                        distributed_sampling=False, **args)
        strategy.dataloader = self._loader = _RankRows(loader)

    def before_training_epoch(self, strategy, **kwargs):
        if not dist.is_distributed():
            return
        if strategy.dataloader is not self._loader:
            raise RuntimeError("a plugin replaced the training data loader after "
                               "DataParallelPlugin built it; that plugin is not "
                               "distributed-safe (docs/distributed.md)")
        dist.sync_rng()

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs):
        if not dist.is_distributed():
            return
        params = [p for p in trained_parameters(strategy) if p.requires_grad]
        rows = self.rows_in_loss(strategy)
        grads = [p.grad * rows if p.grad is not None else torch.zeros_like(p) for p in params]
        loss = strategy.loss
        finite = math.isfinite(loss.item() if torch.is_tensor(loss) else float(loss))
        # presence of each gradient, ranks with a non-finite loss, rows in the loss
        flags = torch.tensor([p.grad is not None for p in params] + [not finite, rows],
                             dtype=grads[0].dtype if grads else torch.float32,
                             device=grads[0].device if grads else strategy.device)
        dist.all_reduce_sum_(grads + [flags])
        total = max(flags[-1].item(), 1.0)
        for p, g, present in zip(params, grads, flags[:-2].tolist()):
            p.grad = g.div_(total) if present > 0 else None
        if flags[-2].item() > 0 and finite:  # another rank diverged: stop here too
            strategy.loss = loss * float("nan") if torch.is_tensor(loss) else float("nan")

    def rows_in_loss(self, strategy) -> int:
        """The rows this rank's mean loss averages: its share of the stream minibatch plus the
        rows plugins appended (e.g. its share of a replay minibatch)."""
        return len(strategy.mb_y) - (1 if self._loader.real == 0 else 0)

    def total_rows(self, strategy) -> int:
        """Every rank's ``rows_in_loss`` summed (one all-reduce, once per step)."""
        step = strategy.clock.train_iterations
        if self._total is None or self._total[0] != step:
            count = torch.tensor([float(self.rows_in_loss(strategy))])
            dist.all_reduce_sum_([count])
            self._total = (step, int(count.item()))
        return self._total[1]

    def current_rows(self) -> int:
        """This rank's share of the stream minibatch (0 for a weight-0 duplicate row)."""
        return self._loader.real

    def before_eval_exp(self, strategy, **kwargs):
        if not dist.is_distributed():
            return
        args = strategy._obtain_common_dataloader_parameters(
            batch_size=strategy.eval_mb_size, num_workers=0, shuffle=False, pin_memory=None,
            persistent_workers=False)
        strategy.dataloader = SingleDatasetDataLoader(strategy.adapted_dataset,
                                                      distributed_sampling=False, **args)

    def before_eval(self, strategy, **kwargs):
        self._check_same_parameters(strategy)

    @torch.no_grad()
    def _check_same_parameters(self, strategy) -> None:
        if not dist.is_distributed():
            return
        total = sum(p.detach().double().sum() for p in trained_parameters(strategy))
        if not math.isfinite(float(total)):
            return  # DivergenceGuard reports non-finite parameters
        spread = torch.stack([total, -total]).reshape(2).cpu()
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        if spread[0].item() != -spread[1].item():  # the largest and smallest checksums
            done = strategy.clock.train_exp_counter
            raise RuntimeError(f"the ranks' parameters differ after {done} training "
                               "experience(s): a plugin changed them from data of its own rank "
                               "only (not distributed-safe; docs/distributed.md)")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"DataParallelPlugin has no state; got keys {sorted(state)}")
