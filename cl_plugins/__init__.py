"""cl_plugins: continual-learning methods as Avalanche plugins, with paper reproductions.

Every plugin class is importable from the top level (``from cl_plugins import GPMPlugin``); the
classes are resolved lazily from the registry's list, so ``import cl_plugins`` stays cheap.
"""

from cl_plugins.core.deferred_imports import defer_heavy_imports

defer_heavy_imports()  # before Avalanche is imported: core/deferred_imports.py

from cl_plugins.registry import (PLUGIN_CLASSES, MethodSpec, get_method,  # noqa: E402
                                 list_methods, register)

__version__ = "0.1.0"

_PLUGIN_PATHS = {path.split(":")[1]: path for path in PLUGIN_CLASSES}
__all__ = ["MethodSpec", "get_method", "list_methods", "register", *_PLUGIN_PATHS]


def __getattr__(name):
    if name in _PLUGIN_PATHS:
        import importlib

        module, cls = _PLUGIN_PATHS[name].split(":")
        return getattr(importlib.import_module(module), cls)
    raise AttributeError(f"module 'cl_plugins' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PLUGIN_PATHS))
