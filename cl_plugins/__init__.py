"""cl_plugins: continual-learning methods as Avalanche plugins, with paper reproductions."""

from cl_plugins.baselines.ensemble import EnsemblePlugin
from cl_plugins.registry import MethodSpec, get_method, list_methods, register

__version__ = "0.1.0"
__all__ = ["EnsemblePlugin", "MethodSpec", "get_method", "list_methods", "register"]
