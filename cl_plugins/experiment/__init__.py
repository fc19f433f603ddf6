"""The experiment runner: configs, evaluation, results, the ``cl-run`` command."""

from .config import DEFAULT_CONFIG, apply_override, load_config
from .runner import build_optimizer, run_experiment, run_single

__all__ = ["DEFAULT_CONFIG", "apply_override", "build_optimizer", "load_config",
           "run_experiment", "run_single"]
