"""Avalanche's ``WandBLogger``, made to work with current wandb releases.

Avalanche 0.6's logger calls ``wandb.util.generate_id`` and ``wandb.viz.CustomChart``; recent
wandb releases moved both (``wandb.sdk.lib.runid.generate_id``, ``wandb.plot.CustomChart``).
Rather than patching the global ``wandb`` module, the logger talks to a thin proxy that adds the
two old names and forwards everything else to ``wandb`` itself.
"""

from __future__ import annotations

import types
import uuid

from avalanche.logging import WandBLogger as _AvalancheWandBLogger


class _WandbCompat:
    def __init__(self, wandb):
        self._wandb = wandb
        old_util = getattr(wandb, "util", None)
        gen = getattr(old_util, "generate_id", None) or (lambda: uuid.uuid4().hex[:8])
        self.util = types.SimpleNamespace(generate_id=gen)
        viz = getattr(wandb, "viz", None)
        if viz is None or not hasattr(viz, "CustomChart"):
            viz = types.SimpleNamespace(CustomChart=wandb.plot.CustomChart)
        self.viz = viz

    def __getattr__(self, name):
        return getattr(self._wandb, name)


class WandBLogger(_AvalancheWandBLogger):
    def import_wandb(self):
        import wandb

        self.wandb = _WandbCompat(wandb)
