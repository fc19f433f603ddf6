"""The experiment runner: configs, evaluation, results, the ``cl-run`` command.

The names below are resolved lazily, so ``cl-run`` starts its error handling (Ctrl-C included)
before torch and Avalanche are imported."""

_LAZY = {"DEFAULT_CONFIG": ".config", "apply_override": ".config", "load_config": ".config",
         "build_optimizer": ".runner", "run_experiment": ".runner", "run_single": ".runner"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
