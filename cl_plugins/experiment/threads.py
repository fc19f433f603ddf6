"""How many intra-op CPU threads a run uses: chosen per run from the work of one training step.

PyTorch starts one intra-op thread per core. A step with little arithmetic gains nothing from
the second thread (the main job's and P1's MLPs: a tie on the 2-core machine) and, on a machine
shared with other jobs, can lose many times over to contention; a step with enough arithmetic
gains almost linearly (the S1 MLP at batch 128: 1.67x with two threads).

``strategy.threads`` (config and ``--strategy.threads=N``):

- ``auto`` (default): when ``OMP_NUM_THREADS`` is set, it is respected; on a GPU, torch's own
  default stays; otherwise the forward FLOPs of one training minibatch are counted once
  (``torch.utils.flop_counter`` on a one-sample forward, times the batch) and the run uses
  one thread below ``MIN_FLOPS_PER_THREAD`` per thread, else as many threads as that allows, at
  most the cores this process may use (its CPU affinity);
- a whole number >= 1: exactly that many.

The choice and its reason are recorded in the run's JSON (``threads``).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import torch

# Forward FLOPs of one minibatch that one more intra-op thread needs to pay off (measured on
# the 2-core CPU machine, 2026-12-06, experiments/threads_crossover.py, 100 steps: a second
# thread is a tie at 0.002-0.005 GFLOP (the P1 and main-job MLPs), 1.67x faster at 0.146 GFLOP
# (the S1 MLP at batch 128) and 1.7-1.8x at 1.5-36 GFLOP; docs/speed.md).
MIN_FLOPS_PER_THREAD = 0.05e9


def available_cores() -> int:
    """The cores this process may use (its CPU affinity), shared among torchrun's local ranks."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def forward_flops(model: torch.nn.Module, input_shape, batch: int) -> float:
    """Forward FLOPs of a ``batch``-sized minibatch (a one-sample forward, counted, times
    ``batch``); 0.0 if the model cannot be run on a zero input of that shape."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters(), None)
    x = torch.zeros((1,) + tuple(input_shape),
                    device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        from avalanche.models.utils import avalanche_forward

        with torch.no_grad(), torch.random.fork_rng(devices=[]), \
                FlopCounterMode(display=False) as counter:
            avalanche_forward(model, x, torch.zeros(1, dtype=torch.long, device=x.device))
        return float(counter.get_total_flops()) * batch
    except Exception:  # a model that needs other inputs: counted as unknown
        return 0.0
    finally:
        model.train(was_training)


def choose_threads(setting, model, input_shape, batch: int, device) -> Tuple[int, str]:
    """(threads, reason) for ``strategy.threads`` = ``setting``."""
    if setting != "auto":
        return int(setting), "strategy.threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if torch.device(device).type != "cpu":
        return torch.get_num_threads(), "GPU run: torch's default"
    flops = forward_flops(model, input_shape, batch)
    if flops <= 0:
        return 1, "auto: model FLOPs unknown, 1 thread"
    n = max(1, min(available_cores(), int(flops // MIN_FLOPS_PER_THREAD)))
    return n, f"auto: {flops / 1e9:.3g} GFLOP per forward minibatch, {available_cores()} cores"


def apply_threads(setting, model, input_shape, batch: int, device) -> Dict[str, Any]:
    n, why = choose_threads(setting, model, input_shape, batch, device)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return {"threads": n, "reason": why}
