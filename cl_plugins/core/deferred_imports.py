"""Import two of Avalanche's dependencies only when they are used.

``import avalanche`` costs about 5 s on the 2-core machine, and two of its imports serve nothing
in most runs (issue 21's profile, ``python -X importtime``):

- ``qpsolvers`` (1.4 s): imported by Avalanche's GEM plugin at module level, it probes every
  solver it knows at import, jax included (``qpsolvers[open_source_solvers]`` pulls jaxopt);
  only ``avalanche_gem`` calls it, and our GEM uses ``quadprog`` directly;
- ``wandb`` (0.6 s): imported by Avalanche's confusion-matrix metric; used only with ``--wandb``.

``defer(name)`` puts a stand-in module in ``sys.modules`` before Avalanche is imported. It holds
the real module's ``__file__`` and ``__spec__`` (so ``inspect.getmodule``, which torch calls at
import and which reads ``__file__`` of every loaded module, does not load it), and the first
read or write of any other attribute imports the real module, which from then on is what
``sys.modules`` holds and what the stand-in forwards every access to. Importing a submodule
(``import wandb.sdk``) reads the parent's ``__path__`` and so loads the real parent first. A
module that is already imported, or not installed, is left alone.

``cl_plugins/__init__.py`` calls ``defer_heavy_imports()``, so this applies whenever cl_plugins is
imported before Avalanche (``cl-run``, the tests, scripts that import us first).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

DEFERRED = ("qpsolvers", "wandb")
_OWN = ("__file__", "__spec__", "__name__", "__loader__", "__package__", "_deferred_real")


class _StandIn(types.ModuleType):
    def _real(self):
        real = self.__dict__.get("_deferred_real")
        if real is None:
            name = self.__name__
            if sys.modules.get(name) is self:
                del sys.modules[name]
            real = importlib.import_module(name)
            types.ModuleType.__setattr__(self, "_deferred_real", real)
        return real

    def __getattr__(self, attr):
        return getattr(self._real(), attr)

    def __setattr__(self, attr, value):
        if attr in _OWN:
            types.ModuleType.__setattr__(self, attr, value)
        else:
            setattr(self._real(), attr, value)

    def __delattr__(self, attr):
        delattr(self._real(), attr)

    def __dir__(self):
        return dir(self._real())


def defer(name: str) -> bool:
    """Stand in for top-level module ``name`` until it is used; True if a stand-in was set."""
    if name in sys.modules or "." in name:
        return False
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    stand_in = _StandIn(name)
    stand_in.__file__ = spec.origin
    stand_in.__spec__ = spec
    stand_in.__loader__ = spec.loader
    stand_in.__package__ = name
    sys.modules[name] = stand_in
    return True


def defer_heavy_imports() -> None:
    for name in DEFERRED:
        defer(name)
