"""Object state as plain data, and back into live objects of the same classes.

A checkpoint must load with ``torch.load(..., weights_only=True)``: tensors, dicts, lists, tuples,
strings, numbers, booleans and None, nothing that names a class to import. Some of what a run
accumulates lives in objects, though: Avalanche's metric objects (stream BWT / forgetting keep the
first accuracy of every experience in nested ``Forgetting`` / ``Mean`` / ``defaultdict(Accuracy)``
objects). :func:`to_plain` writes an object's ``__dict__``, recursively, as plain data;
:func:`restore_into` writes it back *into* freshly built objects of the same classes (the runner
rebuilds the same evaluator), so no class is ever created from what a file says.

Encoding: every dict in the output is a tag (so user dicts can never be mistaken for one):
``{"__kind__": "object", "class": "module.QualName", "state": {attr: value}}``,
``{"__kind__": "dict" | "defaultdict", "items": [[key, value], ...]}``; lists, tuples, tensors and
scalars stand for themselves. A value this cannot represent exactly (numpy values, sets, functions,
objects without ``__dict__``, an object reached twice, whose sharing would be lost) raises
:class:`UnrepresentableState` naming its path; it is never dropped.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from typing import Any

import torch

__all__ = ["UnrepresentableState", "to_plain", "restore_into", "check_plain"]

_SCALARS = (type(None), bool, int, float, str)
_KIND = "__kind__"


class UnrepresentableState(TypeError):
    """A value that plain data cannot hold exactly, or a saved state that does not fit."""


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def to_plain(obj: Any, where: str = "state") -> Any:
    """``obj`` (an object with a ``__dict__``, or a container or scalar) as plain data."""
    return _encode(obj, where, set())


def _encode(obj: Any, where: str, seen: set) -> Any:
    if type(obj) in _SCALARS:
        return obj
    if type(obj) is not tuple:  # immutable tuples may be shared (their mutable items may not)
        if id(obj) in seen:  # shared or cyclic: the restored copies would not be shared
            raise UnrepresentableState(f"{where}: {_class_name(obj)} object is reached twice")
        seen.add(id(obj))
    if torch.is_tensor(obj):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise UnrepresentableState(f"{where}: tensor subclass {_class_name(obj)}")
        return obj.detach().cpu().clone()
    if type(obj) in (list, tuple):
        out = [_encode(v, f"{where}[{i}]", seen) for i, v in enumerate(obj)]
        return out if type(obj) is list else tuple(out)
    if type(obj) in (dict, defaultdict):
        items = []
        for k, v in obj.items():
            if not _is_plain_key(k):
                raise UnrepresentableState(f"{where}: dict key {k!r} of type {type(k).__name__}")
            items.append([k, _encode(v, f"{where}[{k!r}]", seen)])
        return {_KIND: type(obj).__name__, "items": items}
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, enum.Enum)) and not callable(obj) \
            and type(obj).__module__.split(".")[0] not in ("builtins", "numpy"):
        return {_KIND: "object", "class": _class_name(obj),
                "state": {k: _encode(v, f"{where}.{k}", seen) for k, v in vars(obj).items()}}
    raise UnrepresentableState(f"{where}: cannot store a {_class_name(obj)} as plain data")


def _is_plain_key(k: Any) -> bool:
    return type(k) in _SCALARS or (type(k) is tuple and all(_is_plain_key(x) for x in k))


def restore_into(fresh: Any, plain: Any, where: str = "state") -> Any:
    """The value that ``plain`` encodes. Objects are not created: each saved object is written
    into ``fresh``'s counterpart (same position, same class), which is returned; a
    ``defaultdict``'s new entries come from the fresh one's ``default_factory``."""
    if type(plain) in _SCALARS:
        return plain
    if torch.is_tensor(plain):
        device = fresh.device if torch.is_tensor(fresh) else "cpu"
        return plain.clone().to(device)
    if type(plain) in (list, tuple):
        olds = list(fresh) if type(fresh) is type(plain) else []
        out = [restore_into(olds[i] if i < len(olds) else None, v, f"{where}[{i}]")
               for i, v in enumerate(plain)]
        return out if type(plain) is list else tuple(out)
    kind = plain.get(_KIND) if type(plain) is dict else None
    if kind == "object":
        if fresh is None:
            raise UnrepresentableState(f"{where}: saved {plain['class']} has no counterpart in "
                                       "the rebuilt objects to restore into")
        if _class_name(fresh) != plain["class"]:
            raise UnrepresentableState(f"{where}: saved {plain['class']}, the rebuilt object is "
                                       f"a {_class_name(fresh)}")
        attrs = vars(fresh)
        new = {k: restore_into(attrs.get(k), v, f"{where}.{k}") for k, v in plain["state"].items()}
        attrs.update(new)
        return fresh
    if kind in ("dict", "defaultdict"):
        if kind == "defaultdict":
            if not isinstance(fresh, defaultdict):
                raise UnrepresentableState(f"{where}: saved a defaultdict, the rebuilt value is "
                                           f"a {_class_name(fresh)}")
            out: dict = defaultdict(fresh.default_factory)
        else:
            out = {}
        olds = fresh if isinstance(fresh, dict) else {}
        for k, v in plain["items"]:
            counterpart = olds.get(k)
            if counterpart is None and kind == "defaultdict" and fresh.default_factory:
                counterpart = fresh.default_factory()
            out[k] = restore_into(counterpart, v, f"{where}[{k!r}]")
        return out
    raise UnrepresentableState(f"{where}: not a state written by to_plain ({type(plain).__name__})")


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise :class:`UnrepresentableState` naming the first value that
    ``torch.load(weights_only=True)`` would refuse or that is not plain data."""
    if type(obj) in _SCALARS or type(obj) is torch.Tensor:
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif type(obj) is dict:
        for k, v in obj.items():
            if not _is_plain_key(k):
                raise UnrepresentableState(f"{where}: dict key {k!r} of type {type(k).__name__}")
            check_plain(v, f"{where}[{k!r}]")
    else:
        raise UnrepresentableState(f"{where}: {_class_name(obj)} is not plain data (tensors, "
                                   "dict, list, tuple, str, int, float, bool, None)")
