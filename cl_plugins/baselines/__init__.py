"""Baselines: naive, joint and cumulative are Avalanche's templates; ensemble is ours;
avalanche_si is Avalanche's SI plugin with its CPU snapshot aliasing worked around."""

from .avalanche_si import AvalancheSIPlugin
from .ensemble import EnsemblePlugin

__all__ = ["AvalancheSIPlugin", "EnsemblePlugin"]
