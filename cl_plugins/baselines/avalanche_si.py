"""Avalanche 0.6's Synaptic Intelligence plugin with its CPU aliasing bug worked around.

Registered as ``avalanche_si`` (a reference method, run beside our ``si``).

Why: Avalanche's plugin stores parameter snapshots with ``param.detach().cpu().flatten()``. On a
GPU ``.cpu()`` copies; on a CPU it returns the parameter's own storage, so the "snapshot" is a
view that follows every optimizer step. The start-of-step weights (``old_theta``) and the
start-of-task anchor (``ewc_data[0]``) then always equal the current weights: the path integral
``sum g * (theta_new - theta_old)`` is exactly 0, the importance is 0 and the plugin does
nothing (our S2 domain-/class-IL runs of the stock plugin on CPU were bit-identical to naive).
The continual-learning-baselines reference runs (0.97 on Split MNIST) used a GPU, where the
plugin works.

What this class changes: after Avalanche's own ``before_training_exp`` and
``before_training_iteration`` it replaces those two snapshots by copies. Everything else,
including Avalanche's choices (full-loss gradient, importance clipped at 0.001, ``lambda / 2``),
is Avalanche's code, unchanged, on any device.
"""

from __future__ import annotations

from avalanche.training.plugins import SynapticIntelligencePlugin


def _detach_copies(param_dict) -> None:
    for entry in param_dict.values():
        entry.data = entry.data.clone()


class AvalancheSIPlugin(SynapticIntelligencePlugin):
    """Avalanche's ``SynapticIntelligencePlugin`` whose snapshots are copies on every device."""

    def before_training_exp(self, strategy, **kwargs):
        super().before_training_exp(strategy, **kwargs)
        _detach_copies(self.ewc_data[0])  # the anchor theta* of the task

    def before_training_iteration(self, strategy, **kwargs):
        super().before_training_iteration(strategy, **kwargs)
        _detach_copies(self.syn_data["old_theta"])  # the weights before this step
