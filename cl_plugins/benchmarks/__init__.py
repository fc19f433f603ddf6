"""Continual-learning benchmarks built on Avalanche's generators, fully offline."""

from .builder import (BENCHMARKS, SCENARIOS, BenchmarkInfo, build_benchmark, describe_benchmark,
                      resolve_scenario)

__all__ = ["BENCHMARKS", "SCENARIOS", "BenchmarkInfo", "build_benchmark", "describe_benchmark",
           "resolve_scenario"]
