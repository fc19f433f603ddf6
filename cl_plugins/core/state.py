"""Plugin states name the class that wrote them.

Every plugin's ``state_dict()`` returns ``{**owned_by(self), ...}`` and its ``load_state_dict()``
starts with ``check_owner(self, state)``, so a state handed to the wrong plugin fails with a
message naming both classes ("this state was saved by EWCPlugin; SIPlugin cannot load it")
instead of a KeyError or a hyper-parameter mismatch deep inside. The name is the class's own
(``type(self).__name__``): a subclass (OnlineEWCPlugin of EWCPlugin) does not load its base's
states, nor the base its subclass's.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

OWNER_KEY = "saved_by"
_MISSING = object()


def owned_by(plugin: Any) -> Dict[str, str]:
    """The entry naming ``plugin``'s class, to put first in its state dict."""
    return {OWNER_KEY: type(plugin).__name__}


def check_owner(plugin: Any, state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` was written by ``plugin``'s class."""
    mine = type(plugin).__name__
    if not isinstance(state, dict):
        raise ValueError(f"{mine}.load_state_dict expects the dict its state_dict() returns; got "
                         f"a {type(state).__name__}")
    owner = state.get(OWNER_KEY)
    if owner is None:
        raise ValueError(f"this state names no plugin class (no {OWNER_KEY!r} key: not a plugin "
                         f"state_dict, or one written before states named their class); {mine} "
                         "cannot load it")
    if owner != mine:
        raise ValueError(f"this state was saved by {owner}; {mine} cannot load it")


def settings_of(plugin: Any, keys: Iterable[str]) -> Dict[str, Any]:
    """``owned_by(plugin)`` plus the current value of each setting in ``keys``, to start a state
    dict with: ``{**settings_of(self, SETTINGS), "penalty": ...}``."""
    return {**owned_by(plugin), **{k: getattr(plugin, k) for k in keys}}


def check_fields(who: str, state: Any, current: Dict[str, Any], *,
                 missing_as_none: bool = False, this: str = "one") -> None:
    """Refuse a saved state whose settings differ from ``current`` (name -> this object's
    value), naming ``who``, the setting and both values. ``missing_as_none``: a setting absent
    from the state counts as None (sub-states written before that setting existed)."""
    for key, value in current.items():
        saved = state.get(key, None if missing_as_none else _MISSING)
        if saved is _MISSING:
            raise ValueError(f"{who}.load_state_dict: the state has no setting {key!r}; this "
                             f"{this} has {key}={value!r}")
        if saved != value:
            raise ValueError(f"{who}.load_state_dict: the state was saved with {key}={saved!r}, "
                             f"this {this} has {key}={value!r}")


def check_settings(plugin: Any, state: Any, keys: Iterable[str]) -> None:
    """``check_owner``, then refuse a state whose saved settings differ from ``plugin``'s.

    The error names the plugin class, the setting and both values, so loading the state of a run
    with other hyper-parameters fails at once instead of silently mixing two configurations.
    """
    check_owner(plugin, state)
    check_fields(type(plugin).__name__, state, {k: getattr(plugin, k) for k in keys},
                 this="plugin")
