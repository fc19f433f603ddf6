"""Baselines: naive, joint and cumulative are Avalanche's templates; ensemble is ours."""

from .ensemble import EnsemblePlugin

__all__ = ["EnsemblePlugin"]
