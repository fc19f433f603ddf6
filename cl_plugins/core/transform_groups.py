"""Reading an Avalanche dataset's transform groups the way its per-sample path applies them.

Used by ``tensor_batches`` to decide whether a dataset's samples are fixed (no input transform,
target lookups only) and to apply those lookups to whole columns of rows.
"""

from __future__ import annotations

import functools


def group_transform(groups, group: str):
    """The transform that ``groups`` (an Avalanche ``TransformGroups`` or None) applies in
    ``group``, looked up as Avalanche's per-sample call does (``transform_groups[group]``) but
    without adding the key.

    A ``DefaultTransformGroups`` (what ``classification_subset`` makes for a class mapping's
    target lookup) keeps its transform in a defaultdict's factory, which ``dict.get`` does not
    call. Read with ``get`` (before 2026-12-07), a part of a dataset tree that no sample had yet
    been read from looked untransformed: in a concatenation of class-mapped experiences (joint,
    cumulative) only the first part's labels were remapped."""
    if groups is None:
        return None
    table = groups.transform_groups
    if group in table:
        return table[group]
    factory = getattr(table, "default_factory", None)
    return factory() if factory is not None else None


def fixed_transform(tr) -> bool:
    """None, or Avalanche's TupleTransform with no input transform and target lookups only."""
    if tr is None:
        return True
    parts = getattr(tr, "transforms", None)
    if type(tr).__name__ != "TupleTransform" or not parts or parts[0] is not None:
        return False
    return all(p is None or (isinstance(p, functools.partial) and p.func.__name__ == "lookup"
                             and p.func.__module__.startswith("avalanche."))
               for p in parts[1:])
