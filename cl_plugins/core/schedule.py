"""Per-experience loss weights shared by several methods.

van de Ven, Siegelmann & Tolias (Nature Communications 2020; code github.com/GMvandeVen/
continual-learning) weight the current experience's loss by 1/t and the term that protects the
past (replayed samples, or distillation on the previous model) by 1 - 1/t while training the t-th
experience, t counted from 1, so that every experience seen so far counts equally.
"""

from __future__ import annotations

from typing import Tuple

from cl_plugins.core.checks import check_int


def vandeven_weights(t: int) -> Tuple[float, float]:
    """``(w_current, w_past) = (1/t, 1 - 1/t)`` while training the ``t``-th experience (t >= 1)."""
    check_int("t (the experience number, counted from 1)", t, 1)
    return 1.0 / t, 1.0 - 1.0 / t
