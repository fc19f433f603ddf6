"""Collective operations for runs over several processes (``torch.distributed``), written once.

Every function is a no-op, or returns its input, in a single process, so a plugin calls them
unconditionally. Under ``torchrun`` (``cl-run --nproc=N``) the runner starts the process group
through Avalanche's ``DistributedHelper.init_distributed`` (gloo on the CPU, nccl on GPUs) and
adds :class:`cl_plugins.core.data_parallel.DataParallelPlugin` first to every strategy.

Rules the plugins follow (docs/distributed.md):
- a statistic computed from data is a sum and a count, each rank taking a contiguous block of
  the data (:func:`shard_range`); both are summed over ranks (:func:`all_reduce_sum_`) and only
  then divided: never an average of per-rank averages;
- parameters, optimizer state and every generator stay identical on all ranks, so state that
  follows from them (penalty anchors, path integrals of averaged gradients) needs no exchange.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started (its ``WORLD_SIZE``; 1 without torchrun),
    readable before the process group exists."""
    try:  # CL_RUN_NPROC: set by cl-run --nproc while it checks the config before launching
        return max(1, int(os.environ.get("WORLD_SIZE") or os.environ.get("CL_RUN_NPROC") or 1))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files, checkpoints and logs."""
    return rank() == 0


def shard_range(n: int, parts: int = None, index: int = None) -> Tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous block of ``n`` items (blocks differ in size
    by at most one; the first ``n % parts`` blocks are the longer ones)."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA ones."""
    return torch.device("cpu") if dist.get_backend() == "gloo" else tensor.device


@torch.no_grad()
def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place, in one collective per dtype (the tensors are
    flattened into one buffer, as DDP's buckets)."""
    if not is_distributed() or not tensors:
        return
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        device = _comm_device(group[0])
        flat = torch.cat([t.reshape(-1).to(device) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_object(obj, src: int = 0):
    """``obj`` as rank ``src`` holds it, on every rank (pickled; for small control values)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (first dims may differ;
    the other dims must agree)."""
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    local = tensor.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest,) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(tensor.device)


def sync_rng() -> None:
    """Give every rank rank 0's torch CPU generator state (the state the data order is drawn
    from), so per-rank draws (dropout on each rank's rows) cannot make the ranks disagree on
    the next epoch's permutation."""
    if not is_distributed():
        return
    torch.set_rng_state(broadcast_object(torch.get_rng_state()))


def unsafe_plugins(plugins: Sequence) -> List[str]:
    """The plugins, by class name, not marked ``supports_distributed`` (Avalanche's class
    keyword), each with the reason its class gives (``distributed_note``), if any."""
    out = []
    for p in plugins:
        if not getattr(p, "supports_distributed", False):
            note = getattr(p, "distributed_note", "") or "not checked under torch.distributed"
            out.append(f"{type(p).__name__} ({note})")
    return out
